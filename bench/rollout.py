"""Where an iteration's time goes, and how much the framework adds over the bare model calls.

    python bench/rollout.py                      # quickstart config, group sizes 8 and 16
    python bench/rollout.py --iterations 5 --group-sizes 8 16 32

For each group size it runs real recipe iterations (rollout -> reward -> advantages -> PPO update)
and prints seconds per iteration split into rollout / reward / training / other, NFEs per
iteration, and the framework overhead: iteration time divided by the time of the *same* model
calls made directly (the denoiser's no-grad forwards of the rollout, its forward+backward passes
of the update at the same micro-batch sizes, and the reward model's forward). Target: <= 1.3x at
group size >= 8. Numbers depend on the machine; the README records the ones measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowalign.config import load_config, num_trained_steps  # noqa: E402
from flowalign.recipes.rl import RLRecipe  # noqa: E402
from flowalign.training.plots import format_table  # noqa: E402


def direct_model_time(recipe: RLRecipe, repeats: int) -> float:
    """Seconds for one iteration's model work done by hand: T rollout forwards over P*G latents,
    forward+backward over the trained edges in the recipe's micro-batches, one reward forward."""
    cfg, adapter = recipe.cfg, recipe.adapter
    unet = adapter.trainable_module()
    n = cfg.data.prompts_per_iter * cfg.sampling.group_size
    shape = (n, *adapter.latent_shape)
    prompts = [recipe.train_prompts[i % len(recipe.train_prompts)] for i in range(max(n, cfg.train.micro_batch_size))]
    embeds = adapter.encode(prompts).tensors["prompt_embeds"]
    trained = n * num_trained_steps(cfg.sampling)
    chunks = [len(c) for c in torch.arange(trained).tensor_split(cfg.train.steps_per_iter)]
    micro = [m for c in chunks for m in [cfg.train.micro_batch_size] * (c // cfg.train.micro_batch_size)
             + ([c % cfg.train.micro_batch_size] if c % cfg.train.micro_batch_size else [])]
    media = torch.rand(n, 3, *adapter.latent_shape[-2:])
    timings = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(cfg.sampling.num_steps):
                unet(torch.randn(shape), torch.full((n,), 500.0), encoder_hidden_states=embeds[:n])
        for m in micro:
            out = unet(torch.randn(m, *adapter.latent_shape), torch.full((m,), 500.0), encoder_hidden_states=embeds[:m]).sample
            out.square().mean().backward()
        recipe.reward_fn(media, prompts[:n])
        timings.append(time.perf_counter() - t0)
    unet.zero_grad(set_to_none=True)
    return statistics.median(timings)


def bench(config: str, group_size: int, iterations: int, warmup: int) -> list:
    out_dir = tempfile.mkdtemp(prefix="flowalign-bench-")
    cfg = load_config(config, {"sampling.group_size": group_size, "output_dir": out_dir, "train.resume": "never",
                               "num_threads": torch.get_num_threads(),
                               "logging.tensorboard": False, "logging.progress": False})
    recipe = RLRecipe(cfg)
    recipe.setup()
    rows = []
    for i in range(warmup + iterations):
        t0 = time.perf_counter()
        metrics = recipe.train_iteration(i)
        metrics["wall"] = time.perf_counter() - t0
        rows.append(metrics)
    rows = rows[warmup:]
    recipe.cleanup()
    mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
    rollout, reward, train, total = mean("time/rollout_s"), mean("time/reward_s"), mean("time/train_s"), mean("wall")
    other = total - rollout - reward - train  # advantages, gathers, bookkeeping
    direct = direct_model_time(recipe, repeats=max(2, iterations // 2))
    return [cfg.data.prompts_per_iter, group_size, mean("rollout/nfe"), rollout, reward, train, other, total, direct, total / direct]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--group-sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    rows = [bench(args.config, g, args.iterations, args.warmup) for g in args.group_sizes]
    print(format_table(["prompts", "group", "NFE/it", "rollout s", "reward s", "train s", "other s", "iteration s",
                        "direct model s", "overhead x"], rows))
    print("overhead = iteration wall time / the same model calls (denoiser fwd, fwd+bwd, reward fwd) made directly; target <= 1.3x")


if __name__ == "__main__":
    main()
