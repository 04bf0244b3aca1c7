"""Build the shipped digits quickstart: the flawed base flow model, the reward CNN and the prompts.

Run (from the repository root; CPU only, no downloads):

    HF_HUB_OFFLINE=1 nice python assets/make_quickstart.py            # --seed 0 --out assets

Time on 2 CPU cores: about 4 min uncontended (classifier ~20 s, 600 flow steps of batch 128 at
~0.3 s each, evaluation ~20 s); the shipped run took 34 s + 385 s + 17 s on 2 cores shared with
other jobs.

Writes, under ``--out``:

* ``quickstart/digit-classifier/`` -- :class:`flowalign.rewards.digits.DigitClassifierNet`
  (``save_pretrained``), trained on the CORRECT labels of an 80 % split of scikit-learn's digits
  (upsampled to 16x16, light shift augmentation); its accuracy on the held-out 20 % is reported.
* ``quickstart/digits-flow/`` -- the toy text-to-image flow model
  (:func:`flowalign.pipelines.toy.build_toy_adapter`, ``ToyAdapter.save_pretrained``) pretrained
  with the rectified-flow loss on ALL 1797 digits whose labels were deliberately corrupted
  (:func:`flowalign.data.digits.corrupt_labels`), prompts drawn from ALL templates, 10 % empty
  prompts so classifier-free guidance works.
* ``prompts/digits_train.txt`` / ``prompts/digits_eval.txt`` -- TRAIN / EVAL templates x 10 digits.
* ``quickstart/base_samples.png`` -- 10 rows (digits 0-9) x 8 samples of the base model
  (10-step Euler ODE, guidance 1, the first EVAL template).
* ``quickstart/metrics.json`` -- every number this script measured (see ``quickstart/README.md``).

Everything is seeded by ``--seed`` (data split, label flaw, initialisation, batches, sampling).
CPU float results depend on the torch build and thread count, so another machine reproduces the
recipe and the measured numbers closely, not necessarily the exact weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from flowalign.data.digits import (ALL_TEMPLATES, EVAL_TEMPLATES, TRAIN_TEMPLATES, corrupt_labels, digit_prompts,
                                   format_prompt, load_digit_images, split_indices)
from flowalign.pipelines.toy import ToyAdapter, build_toy_adapter
from flowalign.rewards.digits import DigitClassifierNet, DigitClassifierReward, DigitJudge


def random_shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each ``[B, 1, S, S]`` image by up to ``max_shift`` pixels, filling with -1 (background)."""
    b, _, s, _ = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(b)])


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0 (Loshchilov & Hutter 2017, SGDR Eq. 5, one cycle)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_classifier(images: Tensor, labels: Tensor, train_idx: Tensor, test_idx: Tensor, seed: int,
                     epochs: int, batch: int = 64) -> tuple[DigitClassifierNet, float]:
    """Cross-entropy training of the reward CNN on the correct labels; returns (net, test accuracy)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitClassifierNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_idx) / batch)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, steps_per_epoch))
    net.train()
    for _ in range(epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for start in range(0, len(perm), batch):
            idx = perm[start:start + batch]
            x = random_shift(images[idx], 1, gen)
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    return net, accuracy


def train_flow(images: Tensor, labels: Tensor, seed: int, steps: int, batch: int, lr: float,
               drop_prob: float, log_every: int = 50) -> ToyAdapter:
    """Rectified-flow pretraining (Liu et al. 2022, "Flow Straight and Fast", Eq. 1, with time
    reversed so that s = 1 is noise, as in SD3 / diffusers): x_t = (1 - s) x0 + s eps with
    s ~ U(0, 1), loss = || v_theta(x_t, 1000 s, prompt) - (eps - x0) ||^2, prompts replaced by the
    empty prompt with probability ``drop_prob`` (classifier-free guidance training, Ho & Salimans
    2022, Sec. 3.2). The prompt encoder trains jointly with the UNet."""
    adapter = build_toy_adapter(seed)
    unet, encoder = adapter.unet, adapter.text_encoder.requires_grad_(True).train()
    gen = torch.Generator().manual_seed(seed + 1)
    # Token ids of every (template, digit) prompt, plus the empty prompt as the last row.
    table = encoder.tokenize([format_prompt(t, d) for t in ALL_TEMPLATES for d in range(10)] + [""])
    params = list(unet.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, max(1, steps // 20)))
    unet.train()
    start, running = time.time(), 0.0
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x0, digit = images[idx], labels[idx]
        template = torch.randint(0, len(ALL_TEMPLATES), (batch,), generator=gen)
        row = template * 10 + digit
        row = torch.where(torch.rand(batch, generator=gen) < drop_prob, len(table) - 1, row)
        eps = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(batch, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * eps
        v = unet(x_t, sigma * 1000.0, encoder_hidden_states=encoder(table[row])).sample
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % log_every == 0:
            print(f"  flow step {step + 1}/{steps} loss {running / log_every:.4f} ({time.time() - start:.0f} s)", flush=True)
            running = 0.0
    unet.eval()
    encoder.requires_grad_(False).eval()
    return adapter


def euler_step(x: Tensor, v: Tensor, sigma: float, sigma_next: float, sde_a: float, sigma_guard: float,
               noise: Tensor) -> Tensor:
    """One step from ``sigma`` to ``sigma_next`` (< sigma) for ``x, v, noise [B, ...]``.

    ``sde_a = 0``: the deterministic Euler ODE step ``x + (sigma_next - sigma) v``.
    ``sde_a > 0``: the Flow-GRPO SDE step (Liu et al. 2025, "Flow-GRPO", arXiv:2505.05470, the
    Euler-Maruyama discretisation of its marginal-preserving reverse SDE; same as the reference
    ``sde_step_with_logprob``): ``std = a sqrt(s / (1 - s))`` with ``s = 1`` replaced by
    ``sigma_guard`` (the schedule's second sigma) in the denominator,
    ``mean = x + (sigma_next - s) [v + std^2 / (2 s) (x + (1 - s) v)]``,
    ``x' = mean + std sqrt(s - sigma_next) noise``.
    """
    if sde_a == 0.0:
        return x + (sigma_next - sigma) * v
    std = sde_a * math.sqrt(sigma / (1 - (sigma_guard if sigma == 1.0 else sigma)))
    mean = x + (sigma_next - sigma) * (v + std ** 2 / (2 * sigma) * (x + (1 - sigma) * v))
    return mean + std * math.sqrt(sigma - sigma_next) * noise


@torch.no_grad()
def sample(adapter: ToyAdapter, prompts: list[str], seed: int, steps: int = 10, guidance: float = 1.0,
           sde_a: float = 0.0, chunk: int = 128) -> Tensor:
    """``[B, 3, 16, 16]`` media in [0, 1] from ``steps`` :func:`euler_step` s on the adapter's
    schedule (sigma = linspace(1, 0, steps + 1) for the quickstart model, shift 1); classifier-free
    guidance ``v_u + guidance (v_c - v_u)`` when ``guidance != 1``."""
    gen = torch.Generator().manual_seed(seed)
    if len(prompts) > chunk:  # bounded batches are several times faster on CPU than one huge batch
        return torch.cat([sample(adapter, prompts[i:i + chunk], seed + i, steps, guidance, sde_a, chunk)
                          for i in range(0, len(prompts), chunk)])
    cond = adapter.encode(prompts)
    x = adapter.init_latents(len(prompts), gen)
    sigmas = adapter.sigmas(steps).tolist()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = adapter.predict(x, s, cond, guidance_scale=guidance)
        noise = torch.randn(x.shape, generator=gen) if sde_a else torch.zeros_like(x)
        x = euler_step(x, v, s, s_next, sde_a, sigmas[1], noise)
    return adapter.decode(x)


def evaluate(adapter: ToyAdapter, reward: DigitClassifierReward, judge: DigitJudge, templates, per_prompt: int,
             seed: int, guidance: float, sde_a: float) -> dict:
    """Judge / reward accuracy on ``templates x 10 digits x per_prompt`` samples, the judge's mean
    max-probability (clean digits score high even when wrong), and the share of 8-sample groups
    that mix right and wrong digits (what group-relative RL needs)."""
    prompts = [p for p in digit_prompts(templates) for _ in range(per_prompt)]
    media = sample(adapter, prompts, seed, guidance=guidance, sde_a=sde_a)
    j, r = judge(media, prompts), reward(media, prompts)
    probs = torch.as_tensor(judge.svm.predict_proba(judge.features(media).numpy()))
    correct = j.components["accuracy"].view(-1, per_prompt)
    mixed = ((correct.sum(1) > 0) & (correct.sum(1) < per_prompt)).float().mean().item()
    return {
        "judge_accuracy": j.components["accuracy"].mean().item(),
        "reward_accuracy": r.components["accuracy"].mean().item(),
        "reward_mean_score": r.scores.mean().item(),
        "judge_reward_agreement": (j.components["accuracy"] == r.components["accuracy"]).float().mean().item(),
        "judge_mean_max_prob": probs.max(1).values.mean().item(),
        "judge_share_max_prob_over_0.8": (probs.max(1).values > 0.8).float().mean().item(),
        "share_of_groups_mixed": mixed,
        "num_samples": len(prompts),
    }


def save_grid(media: Tensor, rows: int, path: str, scale: int = 4) -> None:
    """Tile ``[rows * cols, 3, H, W]`` media row-major into one PNG (1-pixel grey gaps between
    tiles), each pixel drawn ``scale`` x ``scale``."""
    cols = media.shape[0] // rows
    tiles = F.pad(media[:, 0], [0, 1, 0, 1], value=0.35)
    h, w = tiles.shape[-2:]
    grid = tiles.reshape(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w)
    img = Image.fromarray((grid.clamp(0, 1) * 255).round().byte().numpy(), mode="L")
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="assets directory")
    parser.add_argument("--flaw", type=float, default=0.4, help="share of corrupted digit labels")
    parser.add_argument("--flaw-scheme", default="derangement", choices=["derangement", "uniform"])
    parser.add_argument("--flow-steps", type=int, default=600)
    parser.add_argument("--flow-batch", type=int, default=128)
    parser.add_argument("--flow-lr", type=float, default=2e-3)
    parser.add_argument("--classifier-epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = os.path.join(args.out, "quickstart")
    os.makedirs(quick, exist_ok=True)
    os.makedirs(os.path.join(args.out, "prompts"), exist_ok=True)
    metrics: dict = {"args": vars(args) | {"out": None}}

    images, labels = load_digit_images(16)
    train_idx, test_idx = split_indices(len(labels), 0.2, args.seed)

    t0 = time.time()
    net, test_acc = train_classifier(images, labels, train_idx, test_idx, args.seed, args.classifier_epochs)
    net.save_pretrained(os.path.join(quick, "digit-classifier"))
    metrics["classifier"] = {"test_accuracy": test_acc, "num_test": len(test_idx), "seconds": time.time() - t0}
    print(f"classifier: held-out accuracy {test_acc:.4f} on {len(test_idx)} digits ({time.time() - t0:.0f} s)", flush=True)

    flawed = corrupt_labels(labels, args.flaw, args.seed, scheme=args.flaw_scheme)
    t0 = time.time()
    adapter = train_flow(images, flawed, args.seed, args.flow_steps, args.flow_batch, args.flow_lr, drop_prob=0.1)
    adapter.save_pretrained(os.path.join(quick, "digits-flow"))
    metrics["flow"] = {"seconds": time.time() - t0, "label_flaw_measured": (flawed != labels).float().mean().item()}
    print(f"flow model trained in {time.time() - t0:.0f} s", flush=True)

    for name, templates in (("digits_train.txt", TRAIN_TEMPLATES), ("digits_eval.txt", EVAL_TEMPLATES)):
        with open(os.path.join(args.out, "prompts", name), "w") as f:
            f.write("\n".join(digit_prompts(templates)) + "\n")

    # Evaluate what was saved, through the real loading paths.
    adapter = ToyAdapter.from_pretrained(os.path.join(quick, "digits-flow"))
    reward = DigitClassifierReward(os.path.join(quick, "digit-classifier"))
    judge = DigitJudge()
    t0 = time.time()
    metrics["base_model"] = {}
    settings = [("eval", EVAL_TEMPLATES, mode, a, g) for mode, a in (("ode", 0.0), ("sde_a0.7", 0.7)) for g in (1.0, 2.0)]
    for split, templates, mode, a, guidance in settings + [("train", TRAIN_TEMPLATES, "ode", 0.0, 1.0)]:
        key = f"{split}/{mode}/guidance{guidance:g}"
        metrics["base_model"][key] = m = evaluate(adapter, reward, judge, templates, 8, args.seed + 7, guidance, a)
        print(f"  {key}: judge {m['judge_accuracy']:.3f} reward {m['reward_accuracy']:.3f} "
              f"max-prob {m['judge_mean_max_prob']:.3f} mixed groups {m['share_of_groups_mixed']:.2f}", flush=True)
    metrics["eval_seconds"] = time.time() - t0
    save_grid(sample(adapter, [format_prompt(EVAL_TEMPLATES[0], d) for d in range(10) for _ in range(8)], args.seed + 11),
              10, os.path.join(quick, "base_samples.png"))
    with open(os.path.join(quick, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)


if __name__ == "__main__":
    main()
