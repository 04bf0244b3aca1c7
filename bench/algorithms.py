"""Every algorithm on the quickstart digits task at an equal wall-clock budget, side by side.

    python bench/algorithms.py                         # 60 s of training per method, all methods
    python bench/algorithms.py --budget 30 --methods grpo branch_grpo awm
    python bench/algorithms.py --jobs 6 --threads 2          # 6 methods at a time on a 12+ core machine

Each method starts from the shipped base model with the same seed and trains (rollout + reward +
update; held-out evaluation is not counted) until its budget is spent, evaluating every
``--eval-every`` iterations on the same held-out prompts and fixed noise. It prints NFEs and seconds
per iteration, the held-out score at the end, and the time each method needs to reach flat GRPO's
final held-out score, and draws held-out score against training seconds into
``assets/figures/algorithms_reward_vs_time.png`` (the README shows it). The score is the accuracy
of the independent SVM judge (``eval/judge/digit_judge/accuracy``), which no method trains on and
which is comparable across methods whose training rewards differ (Pref-GRPO's win rates,
multi-reward's weighted sum); ``--metric eval/reward`` uses each method's own reward instead.

``pretrain`` is the control docs/ARCHITECTURE.md asks for: it continues the base model's own flow-matching
pretraining on the same flawed data (40 % of labels swapped) for the same budget, so a gain that
comes from more training rather than from the reward shows up there too.

Timings depend on the machine and on what else runs on it; the README records one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowalign.api import recipe_class  # noqa: E402
from flowalign.config import load_config  # noqa: E402
from flowalign.training.plots import format_table, save_curves  # noqa: E402
from parallel import run_jobs  # noqa: E402  (bench/parallel.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: method -> config (relative to configs/); "pretrain" is the continued-pretraining control.
from flowalign.algorithms import ALGORITHMS  # noqa: E402

#: method -> its shipped config (relative to the repository): every image / video algorithm of the
#: registry, and ``pretrain``, the control (continued pretraining on the same flawed data).
METHODS = {"grpo": "configs/quickstart.yaml",
           **{name: cls.config_file for name, cls in ALGORITHMS.items() if cls.recipe != "dllm" and name != "grpo"},
           "pretrain": "configs/quickstart.yaml"}


def continued_pretraining_step(recipe: Any, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                               batch: int) -> None:
    """One step of the base model's pretraining objective on the flawed data: the rectified-flow
    loss ``‖v(x_s, s, prompt) − (ε − x0)‖²`` (assets/make_quickstart.py) on a random batch."""
    from flowalign.data.digits import TRAIN_TEMPLATES, format_prompt
    from flowalign.losses.awm import flow_matching_pair

    idx = torch.randint(0, len(images), (batch,), generator=generator)
    template = torch.randint(0, len(TRAIN_TEMPLATES), (batch,), generator=generator)
    prompts = [format_prompt(TRAIN_TEMPLATES[t], int(d)) for t, d in zip(template.tolist(), labels[idx].tolist())]
    sigma = torch.rand(batch, generator=generator)
    x_s, target = flow_matching_pair(images[idx], torch.randn(images[idx].shape, generator=generator), sigma)
    v = recipe.adapter.predict(x_s, sigma, recipe.adapter.encode(prompts), 1.0)
    loss = torch.nn.functional.mse_loss(v.float(), target)
    recipe.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(recipe.params, 1.0)
    recipe.optimizer.step()


def run_method(name: str, budget: float, eval_every: int, eval_samples: int, seed: int, out: str, metric: str,
               overrides: dict[str, str]) -> dict[str, Any]:
    """Train one method for ``budget`` seconds of training time; returns its curve and rates."""
    print(f"[bench] {name}: {budget:.0f} s of training ...", flush=True)
    cfg = load_config(os.path.join(ROOT, METHODS[name]), {
        "seed": seed, "output_dir": os.path.join(out, name), "train.resume": "never", "train.iterations": 100_000,
        "num_threads": torch.get_num_threads(),  # --threads, not the config's
        "eval.samples_per_prompt": eval_samples, "logging.progress": False, "logging.tensorboard": False, **overrides})
    recipe = recipe_class(cfg)(cfg)
    recipe.setup()
    try:
        curve = [(0.0, recipe.evaluate(step=0)[metric])]
        spent, nfe, seconds, iteration = 0.0, [], [], 0
        if name == "pretrain":
            from flowalign.data.digits import corrupt_labels, load_digit_images

            images, labels = load_digit_images(16)
            flawed = corrupt_labels(labels, 0.4, 0)  # the flaw the base model was trained with
            generator = torch.Generator().manual_seed(seed)
            recipe.module.train()
        while spent < budget:
            if name == "pretrain":
                t0 = time.perf_counter()
                continued_pretraining_step(recipe, images, flawed, generator, batch=128)
                step_s = time.perf_counter() - t0
            else:
                metrics = recipe.train_iteration(iteration)
                step_s = metrics["time/rollout_s"] + metrics["time/reward_s"] + metrics["time/train_s"]
                nfe.append(metrics["rollout/nfe"])
            seconds.append(step_s)
            spent += step_s
            iteration += 1
            if iteration % eval_every == 0 or spent >= budget:
                curve.append((spent, recipe.evaluate(step=iteration)[metric]))
    finally:
        recipe.cleanup()
    return {"curve": curve, "iterations": iteration, "nfe": sum(nfe) / len(nfe) if nfe else float("nan"),
            "seconds": sum(seconds) / len(seconds)}


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float:
    """Training seconds at the first evaluation whose reward is >= ``target`` (inf if never)."""
    return next((t for t, r in curve if r >= target), float("inf"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--budget", type=float, default=60.0, help="training seconds per method")
    p.add_argument("--eval-every", type=int, default=5, help="iterations between held-out evaluations")
    p.add_argument("--eval-samples", type=int, default=4, help="ODE samples per held-out prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", default="eval/judge/digit_judge/accuracy", help="held-out metric compared")
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="config override for one method, e.g. awm:train.optimizer.lr=3e-4 (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="threads per method")
    p.add_argument("--jobs", type=int, default=1, help="methods trained at once, each in its own process (bench/parallel.py)")
    p.add_argument("--plot", default=os.path.join(ROOT, "assets", "figures", "algorithms_reward_vs_time.png"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    methods = ["grpo"] + [m for m in args.methods if m != "grpo"]  # flat GRPO is the reference
    overrides: dict[str, dict[str, str]] = {m: {} for m in methods}
    for item in args.set:
        method, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        if method not in overrides or not key or not value:
            p.error(f"--set {item!r}: expected METHOD:KEY=VALUE with METHOD among {methods}")
        overrides[method][key] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory() as out:
        results = run_jobs(run_method, {name: (name, args.budget, args.eval_every, args.eval_samples, args.seed, out, args.metric,
                                               overrides[name]) for name in methods}, args.jobs, args.threads)
    ref = results["grpo"]
    target = ref["curve"][-1][1]
    ref_reach = time_to_reach(ref["curve"], target)
    rows = []
    for name, r in results.items():
        reach = time_to_reach(r["curve"], target)
        relative = name != "pretrain"  # the control has no rollouts
        rows.append([name, r["iterations"], r["nfe"], r["nfe"] / ref["nfe"] if relative else None,
                     r["seconds"], r["seconds"] / ref["seconds"] if relative else None,
                     r["curve"][0][1], r["curve"][-1][1], max(v for _, v in r["curve"]),
                     reach if math.isfinite(reach) else "never", reach / ref_reach if math.isfinite(reach) and ref_reach > 0 else None])
    print(f"held-out metric: {args.metric}")
    print(format_table(["method", "iterations", "rollout NFE / it", "x GRPO", "s / it", "x GRPO", "before",
                        "at budget", "best", f"s to reach {target:.3f}", "x GRPO time"], rows))
    with open(os.path.splitext(args.plot)[0] + ".json", "w") as f:  # the curves, to redraw or compare without a rerun
        json.dump({"command": " ".join(sys.argv[1:]), "metric": args.metric, "budget_s": args.budget,
                   "curves": {name: r["curve"] for name, r in results.items()}}, f, indent=1)
    print(save_curves(args.plot, {name: r["curve"] for name, r in results.items()}, xlabel=f"training seconds ({args.threads} CPU thread(s) per method)",
                      ylabel=args.metric.removeprefix("eval/"), title=f"quickstart digits, {args.budget:.0f} s per method",
                      reference=(target, "flat GRPO at budget")))


if __name__ == "__main__":
    main()
