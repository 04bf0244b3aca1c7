"""Build the shipped dLLM quickstart: a tiny masked diffusion LM that adds badly, plus its prompts.

Run (from the repository root; CPU only, no downloads):

    HF_HUB_OFFLINE=1 nice python assets/make_dllm_quickstart.py --check-continued 1200
    # defaults: --seed 0 --out assets/dllm_quickstart --hidden 64 --layers 3 --steps 4000 --batch 128

Time: one thread, ~63 ms per step, ~4.2 min for the 4000 steps (the shipped run: 253 s training,
bit-identical weights to an earlier run under heavy CPU contention); ``--check-continued 1200`` adds
~2 min.  Assets: ~0.9 MB.

Measured on the shipped model (seed 0, 200 held-out prompts): greedy accuracy 0.505; by number of
carries 0: 1.00 (31 prompts), 1: 0.91 (77), 2: 0.00 (57), 3: 0.00 (35); 57 % of the carry prompts
get exactly the dropped-carry answer.  Sampling at temperature 1 (8 samples per prompt) finds the
correct answer for 2-carry prompts in 6 % of samples with low-confidence ordering and 20 % with
random ordering (3 carries: 0 % / 10 %), so RL has a signal.  Continued pretraining on the same
flawed data (``--check-continued 1200``: lr 5e-4, batch 128) gave 0.460 / 0.490 / 0.540 / 0.520
after 300 / 600 / 900 / 1200 steps: it does not fix the flaw.

The model is a real ``transformers.BertForMaskedLM`` (bidirectional, tiny config) with a real
character-level ``PreTrainedTokenizerFast`` (tokens ``0-9 + =`` and ``[PAD] [UNK] [CLS] [SEP] [MASK]
[EOS]``), so ``flowalign.dllm.model.MaskedDiffusionLM.from_pretrained`` loads it.  Prompts are fixed
width ``"047+085="``; the completion window is ``gen_length = 5`` tokens: the 4-digit zero-padded
answer and one ``[EOS]`` (``"0132"`` + EOS).

THE FLAW.  The model is pretrained with the masked-diffusion objective (LLaDA Eq. 3/5, see
``flowalign.dllm.pretrain.masked_diffusion_loss``; prompt never masked) on fresh random sums
``a+b`` with ``a, b ~ U{10..999}`` whose written answer drops *every* carry (per-digit sums mod 10,
``047+085=0022``) with a probability that depends on the number of carries
(``flowalign.dllm.pretrain.DEFAULT_DROP_PROB``: 0 carries 0 %, 1 carry 30 %, 2-3 carries 70 %).
Maximum likelihood learns that mixture, so the greedy decode (low-confidence remasking,
``steps = gen_length``) is right on carry-free and (mostly) one-carry sums and wrong on sums with
two or more carries; continued pretraining on the same data keeps the mixture, while a
verifiable reward (``flowalign.dllm.tasks.AdditionTask``) can move the mass to the correct mode,
which the model still samples at temperature 1.

Writes, under ``--out``:

* ``model/`` -- ``BertForMaskedLM.save_pretrained`` + tokenizer ``save_pretrained``;
* ``train.jsonl`` -- RL prompts (``prompt``, ``answer`` = TRUE 4-digit sum, ``reference`` = the
  full correct completion text, ``a``, ``b``, ``carries``), disjoint from the eval prompts;
* ``eval.jsonl`` -- held-out prompts (same fields), excluded from pretraining;
* ``metrics.json`` -- every number measured here (accuracy overall and by carry count, share of
  dropped-carry outputs, training time, optional continued-pretraining control).

Everything is seeded by ``--seed``; CPU float results depend on the torch build and thread count,
so another machine reproduces the recipe and the numbers closely, not necessarily the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time

import torch

from flowalign.dllm.pretrain import (
    DEFAULT_DROP_PROB,
    build_sequences,
    carry_count,
    dropped_carry_sum,
    flawed_addition_pairs,
    masked_diffusion_loss,
)
from flowalign.dllm.sampling import SamplingSpec, generate
from flowalign.dllm.tasks import TaskExample, addition_answer, addition_prompt

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]"]
CHARS = list("0123456789+=")
DIGITS = 3
GEN_LENGTH = DIGITS + 2  # 4 answer digits + [EOS]


def build_tokenizer():
    """Character-level fast tokenizer over a WordLevel vocabulary (ids: specials, then chars)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", eos_token="[EOS]",
    )


def build_model(vocab_size: int, hidden: int, layers: int, heads: int, seed: int):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=16,
        type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    return BertForMaskedLM(cfg)


def make_prompt_sets(rng: random.Random, n_eval: int, n_train: int) -> tuple[list[TaskExample], list[TaskExample]]:
    """Disjoint eval / RL-train prompt sets (a, b ~ U{10..999}) with TRUE answers."""
    seen: set[tuple[int, int]] = set()

    def draw(n: int) -> list[TaskExample]:
        out = []
        while len(out) < n:
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            ans = addition_answer(a + b, digits=DIGITS + 1)
            out.append(TaskExample(prompt=addition_prompt(a, b, digits=DIGITS), answer=ans, reference=ans,
                                   metadata={"a": a, "b": b, "carries": carry_count(a, b)}))
        return out

    return draw(n_eval), draw(n_train)


def encode(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def evaluate(model, tok, examples: list[TaskExample], batch: int = 256) -> dict:
    mask_id, eos_id = tok.mask_token_id, tok.eos_token_id
    # greedy, low-confidence remasking, one token per step; specials other than [EOS] never generated
    spec = SamplingSpec(gen_length=GEN_LENGTH, steps=GEN_LENGTH,
                        suppress_tokens=tuple(tok.convert_tokens_to_ids(t) for t in SPECIALS if t not in ("[EOS]", "[MASK]")))
    fn = lambda ids, att: model(input_ids=ids, attention_mask=att).logits
    model.eval()
    by_carry: dict[int, list[int]] = {}
    dropped = 0
    correct = 0
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        ids = torch.tensor(encode(tok, [e.prompt for e in chunk]), dtype=torch.long)
        out = generate(fn, ids, None, spec, mask_id=mask_id, record_predictions=False).sequences[:, ids.shape[1]:]
        for ex, row in zip(chunk, out.tolist()):
            text = "".join(tok.convert_ids_to_tokens(row[: row.index(eos_id)] if eos_id in row else row))
            a, b = ex.metadata["a"], ex.metadata["b"]
            ok = text.isdigit() and int(text) == a + b
            correct += ok
            k = carry_count(a, b)
            by_carry.setdefault(k, []).append(int(ok))
            if k > 0 and text.isdigit() and int(text) == dropped_carry_sum(a, b):
                dropped += 1
    n_carry = sum(len(v) for k, v in by_carry.items() if k > 0)
    return {
        "accuracy": correct / len(examples),
        "accuracy_by_carries": {str(k): sum(v) / len(v) for k, v in sorted(by_carry.items())},
        "count_by_carries": {str(k): len(v) for k, v in sorted(by_carry.items())},
        "dropped_carry_share_of_carry_examples": dropped / max(n_carry, 1),
    }


def train(model, tok, *, steps: int, batch: int, lr: float, seed: int, exclude: set[tuple[int, int]],
          log_every: int = 250, warmup: int = 100) -> list[float]:
    rng = random.Random(seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    fn = lambda ids, att: model(input_ids=ids, attention_mask=att).logits
    losses: list[float] = []
    model.train()
    t0 = time.time()
    for step in range(steps):
        exs = flawed_addition_pairs(batch, rng=rng, digits=DIGITS, exclude=exclude)
        seq, att, P = build_sequences(encode(tok, [e.prompt for e in exs]), encode(tok, [e.answer for e in exs]),
                                      gen_length=GEN_LENGTH, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        loss = masked_diffusion_loss(fn, seq, att, P, tok.mask_token_id, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return losses


def write_jsonl(path: str, examples: list[TaskExample]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"prompt": e.prompt, "answer": e.answer, "reference": e.reference,
                                 **e.metadata}) + "\n" for e in examples)


def write_readme(out: str, metrics: dict) -> None:
    """A short human-readable summary of what was built and measured (numbers from ``metrics``)."""
    ev = metrics["base_eval"]
    lines = [
        "# dLLM quickstart (made by assets/make_dllm_quickstart.py; see its docstring)",
        "",
        (f"Tiny BertForMaskedLM (hidden {metrics['hidden']}, {metrics['layers']} layers, {metrics['params']} "
         "params), char-level tokenizer, masked-diffusion pretraining on additions whose carries are dropped "
         f"with probability {metrics['drop_prob']} by number of carries."),
        "",
        ("Prompt `047+085=`, completion window of 5 tokens: `0132` + `[EOS]`. Reward: "
         "`flowalign.dllm.tasks.get_task('addition')` (integer exact match)."),
        "",
        (f"Held-out base accuracy (greedy, low-confidence remasking, 5 steps, "
         f"{sum(ev['count_by_carries'].values())} prompts in eval.jsonl): **{ev['accuracy']:.3f}**"),
        "",
        "| carries | prompts | accuracy |",
        "|---|---|---|",
    ]
    for k, n in ev["count_by_carries"].items():
        lines.append(f"| {k} | {n} | {ev['accuracy_by_carries'][k]:.3f} |")
    lines += ["", f"Dropped-carry answers among carry prompts: {ev['dropped_carry_share_of_carry_examples']:.3f}.",
              (f"Training: {metrics['steps']} steps x batch {metrics['batch']}, {metrics['train_seconds']} s "
               f"on {metrics['threads']} thread(s).")]
    ctrl = metrics.get("continued_pretraining_control")
    if ctrl:
        pts = ", ".join(f"{c['steps']}: {c['accuracy']:.3f}" for c in ctrl["curve"])
        lines.append(f"Continued pretraining on the same flawed data (steps: accuracy): {pts}.")
    with open(os.path.join(out, "README.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "dllm_quickstart"))
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--check-continued", type=int, default=0,
                    help="after saving, continue pretraining the saved model this many steps on the same "
                         "flawed data (lr/4, flowalign.dllm.pretrain.pretrain_steps) and record the accuracy "
                         "curve in metrics.json (a control; the continued weights are not saved)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tok = build_tokenizer()
    model = build_model(len(tok), args.hidden, args.layers, args.heads, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: BertForMaskedLM hidden={args.hidden} layers={args.layers} params={n_params}")
    eval_set, train_set = make_prompt_sets(random.Random(args.seed), args.n_eval, args.n_train)
    exclude = {(e.metadata["a"], e.metadata["b"]) for e in eval_set}

    t0 = time.time()
    losses = train(model, tok, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, exclude=exclude)
    train_s = time.time() - t0
    t1 = time.time()
    ev = evaluate(model, tok, eval_set)
    eval_s = time.time() - t1
    print(f"base eval accuracy {ev['accuracy']:.3f}  by carries {ev['accuracy_by_carries']}  "
          f"dropped-carry share {ev['dropped_carry_share_of_carry_examples']:.3f}  (train {train_s:.0f}s)")

    # write atomically: build in a temp dir next to --out, then swap
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".dllm_quickstart_", dir=parent)
    os.chmod(tmp, 0o755)
    model.save_pretrained(os.path.join(tmp, "model"))
    tok.save_pretrained(os.path.join(tmp, "model"))
    write_jsonl(os.path.join(tmp, "train.jsonl"), train_set)
    write_jsonl(os.path.join(tmp, "eval.jsonl"), eval_set)
    metrics = {
        "seed": args.seed, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
        "params": n_params, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "threads": args.threads, "gen_length": GEN_LENGTH, "drop_prob": DEFAULT_DROP_PROB,
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 2),
        "final_loss_avg_last100": sum(losses[-100:]) / min(100, len(losses)),
        "base_eval": ev,
        "decoding": "greedy low-confidence remasking, steps = gen_length = 5",
    }
    with open(os.path.join(tmp, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    write_readme(tmp, metrics)
    old = None
    if os.path.exists(args.out):
        old = args.out + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(args.out, old)
    os.replace(tmp, args.out)
    if old:
        shutil.rmtree(old)
    print(f"wrote {args.out}")

    if args.check_continued > 0:
        # control: continue pretraining the SAVED model on the same flawed data with the library
        # function the bench uses; the mixture stays, so the accuracy does not climb
        from flowalign.dllm.model import MaskedDiffusionLM
        from flowalign.dllm.pretrain import pretrain_steps

        cont = MaskedDiffusionLM.from_pretrained(os.path.join(args.out, "model"))
        rng = random.Random(args.seed + 100)
        t2 = time.time()
        curve = []
        chunk = max(1, args.check_continued // 4)
        done = 0
        while done < args.check_continued:
            n = min(chunk, args.check_continued - done)
            pretrain_steps(cont, lambda k: flawed_addition_pairs(k, rng=rng, digits=DIGITS, exclude=exclude),
                           steps=n, batch_size=args.batch, lr=args.lr / 4, gen_length=GEN_LENGTH,
                           generator=torch.Generator().manual_seed(args.seed + 100 + done))
            done += n
            acc = evaluate(cont.model, tok, eval_set)["accuracy"]
            curve.append({"steps": done, "accuracy": acc, "seconds": round(time.time() - t2, 1)})
            print(f"continued flawed pretraining: {done} steps, accuracy {acc:.3f}", flush=True)
        metrics["continued_pretraining_control"] = {"lr": args.lr / 4, "batch": args.batch, "curve": curve}
        with open(os.path.join(args.out, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        write_readme(args.out, metrics)

if __name__ == "__main__":
    main()
