"""dLLM benchmarks on the quickstart masked diffusion LM (issue 6).

    python bench/dllm_estimators.py                         # every section
    python bench/dllm_estimators.py --section estimators    # log-likelihood estimator variance only
    python bench/dllm_estimators.py --section algorithms --jobs 8   # 8 runs at a time (one thread each)
    python bench/dllm_estimators.py --section estimators --sequences 16 --repeats 32 --budgets 2 4 8 16

Section ``estimators``: completions are sampled from the model (temperature 1, low-confidence
remasking, ``steps = gen_length``) on held-out prompts; for each sequence, every log-likelihood
estimator of ``flowalign.dllm.logprob`` is run ``--repeats`` times with different seeds at equal
forward-pass budgets ``K`` (forwards per sequence), and the tables give

* the variance across repeats of the sequence estimate (mean over sequences), and
* its bias: mean estimate minus the *exact* ELBO of that sequence, which the 5-token window lets us
  compute by enumerating the ``2^Lg - 1`` masks with their Beta weights (no Monte Carlo). The exact
  any-order log-likelihood ``log (1/Lg!) sum_orders prod p`` (a DP over the ``2^Lg`` visible sets)
  is printed beside it (``ELBO <= log p``).

Estimators at budget ``K``: one-step (diffu-GRPO; the mean of ``K`` prompt-mask draws), coupled
pairs (coupled-GRPO's complementary masks, ``K/2`` pairs, ``t ~ U[0.2, 0.8]``; its full-mask
``L_T`` term is the one-step row), double Monte Carlo ELBO (``K`` times x 1 mask, and ``K/2`` x 2),
semi-deterministic ELBO (GDPO: ``K`` Gauss-Legendre nodes x 1 mask, and 2 nodes x ``K/2`` masks).
GDPO's claim is that semi-deterministic beats double Monte Carlo at equal budget; the script prints
the variance ratio. Runs in well under 2 minutes on 2 CPU cores with the defaults.

The model is ``assets/dllm_quickstart/model`` (``--model``); if it is missing, a tiny random model
with the same tokenizer and architecture stands in (the numbers then describe that model).

Section ``algorithms`` (``--section algorithms --budget 40``): every dLLM algorithm, with its
shipped ``configs/dllm/<name>_addition.yaml``, and a continued-pretraining control
(``flowalign.dllm.pretrain`` on fresh data with the same dropped-carry flaw) each train for the same
wall-clock budget (evaluation excluded from the clock), same seed; it prints final / best held-out
accuracy, seconds and model forwards per iteration and the time to +15 points, and writes the
accuracy-vs-time PNG ``assets/figures/dllm_algorithms.png``. About ``9 x (budget + 15)`` seconds.

Sections register themselves in :data:`SECTIONS`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from flowalign.dllm.logprob import (
    MaskSet,
    average_mask_sets,
    draw_coupled_masks,
    draw_double_mc_masks,
    draw_prompt_masks,
    draw_semi_deterministic_masks,
    masked_logprob,
)
from flowalign.dllm.model import MaskedDiffusionLM
from flowalign.dllm.sampling import SamplingSpec, generate
from flowalign.training.plots import format_table, save_curves
from parallel import run_jobs  # noqa: E402  (bench/parallel.py)

QUICKSTART = os.path.join(REPO, "assets", "dllm_quickstart")
GEN_LENGTH = 5  # the quickstart completion window: 4 answer digits + [EOS]


# --------------------------------------------------------------------------------------------
# model and data
# --------------------------------------------------------------------------------------------
def _random_stand_in(seed: int = 0) -> MaskedDiffusionLM:
    """A random-weight model with the quickstart's tokenizer and architecture, saved and reloaded
    through MaskedDiffusionLM.from_pretrained (used only when the shipped model is missing)."""
    spec = importlib.util.spec_from_file_location("make_dllm_quickstart", os.path.join(REPO, "assets", "make_dllm_quickstart.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tok = mod.build_tokenizer()
    net = mod.build_model(len(tok), hidden=64, layers=2, heads=4, seed=seed)
    wrapped = MaskedDiffusionLM(net, tok, mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, shift_logits=False, model_type="bert")
    with tempfile.TemporaryDirectory(prefix="dllm-stand-in-") as path:
        wrapped.save_pretrained(path)
        return MaskedDiffusionLM.from_pretrained(path)


def load_model(path: str) -> tuple[MaskedDiffusionLM, str]:
    if os.path.isdir(path):
        return MaskedDiffusionLM.from_pretrained(path).eval(), path
    return _random_stand_in().eval(), "random stand-in (quickstart model not found)"


def load_prompts(path: str, n: int, seed: int) -> list[str]:
    if os.path.isfile(path):
        with open(path) as fh:
            prompts = [json.loads(line)["prompt"] for line in fh if line.strip()]
        if len(prompts) < n:
            raise ValueError(f"{path} has {len(prompts)} prompts, --sequences asks for {n}")
        return prompts[:n]
    from flowalign.dllm.tasks import addition_prompt

    rng = random.Random(seed)
    return [addition_prompt(rng.randint(10, 999), rng.randint(10, 999), digits=3) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# exact references by enumeration (the window is tiny)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def exact_references(fn, seqs: torch.Tensor, attn: torch.Tensor, P: int, mask_id: int,
                     suppress: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exact ELBO [B], exact any-order log-likelihood [B])`` by enumerating visible sets.

    ``lp[V, k]`` = log p(x_k | completion tokens in V visible, the rest masked), one forward per
    visible set ``V``. ELBO = sum_{M != {}} B(|M|, n-|M|+1) sum_{k in M} lp[~M, k] (the t-integral
    of the Bernoulli mask probabilities); log p = log (1/n!) A(full), A(S) = sum_{k in S}
    A(S - k) p(x_k | S - k) (the average over unmasking orders, computed over subsets).
    """
    B, L = seqs.shape
    n = L - P
    sets = list(range(2**n))  # bit k of v set = completion token k visible

    def visible_set_log_probs(v: int) -> torch.Tensor:  # [B, n], 0 where visible
        masked = torch.tensor([not (v >> k & 1) for k in range(n)]).view(1, 1, n).expand(B, 1, n)
        ones = torch.ones(B, 1)
        return masked_logprob(fn, seqs, attn, P, mask_id, MaskSet(completion=masked.contiguous(), t=ones, weight=ones),
                              suppress_tokens=suppress)

    lp = torch.stack([visible_set_log_probs(v) for v in sets], dim=1).double()  # [B, 2^n, n]
    elbo = torch.zeros(B, dtype=torch.float64)
    for v in sets:
        masked = [k for k in range(n) if not (v >> k & 1)]
        if masked:
            m = len(masked)
            beta = math.gamma(m) * math.gamma(n - m + 1) / math.gamma(n + 1)
            elbo += beta * lp[:, v, masked].sum(-1)
    logA = torch.full((B, 2**n), -math.inf, dtype=torch.float64)
    logA[:, 0] = 0.0
    for S in sorted(sets, key=int.bit_count)[1:]:
        terms = [logA[:, S & ~(1 << k)] + lp[:, S & ~(1 << k), k] for k in range(n) if S >> k & 1]
        logA[:, S] = torch.logsumexp(torch.stack(terms, dim=1), dim=1)
    return elbo, logA[:, -1] - math.log(math.factorial(n))


# --------------------------------------------------------------------------------------------
# estimator configurations at a forward budget K
# --------------------------------------------------------------------------------------------
MaskDrawer = Callable[[int, int, int, torch.Tensor, torch.Generator], MaskSet]


def _one_step(K, n_rows, Lg, attn_prompt, g):
    return MaskSet(completion=torch.ones(n_rows, K, Lg, dtype=torch.bool), t=torch.ones(n_rows, K),
                   weight=torch.full((n_rows, K), 1.0 / K), prompt=draw_prompt_masks(attn_prompt, 0.15, g, num=K))


def _coupled_pairs(K, n_rows, Lg, attn_prompt, g):
    return average_mask_sets([draw_coupled_masks(n_rows, Lg, g, include_full_mask=False) for _ in range(K // 2)])


ESTIMATORS: dict[str, MaskDrawer] = {
    "one-step (diffu-GRPO)": _one_step,
    "coupled pairs (coupled-GRPO)": _coupled_pairs,
    "double MC  K x 1": lambda K, n, Lg, a, g: draw_double_mc_masks(n, Lg, K, 1, g),
    "double MC  K/2 x 2": lambda K, n, Lg, a, g: draw_double_mc_masks(n, Lg, K // 2, 2, g),
    "semi-det   K nodes x 1 (GDPO)": lambda K, n, Lg, a, g: draw_semi_deterministic_masks(n, Lg, K, 1, g),
    "semi-det   2 nodes x K/2": lambda K, n, Lg, a, g: draw_semi_deterministic_masks(n, Lg, 2, K // 2, g),
}


@torch.no_grad()
def run_estimators(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    lm, where = load_model(args.model)
    mask_id, eos_id = lm.mask_token_id, lm.eos_token_id
    suppress = tuple(sorted(set(lm.tokenizer.all_special_ids) - {mask_id, eos_id}))
    prompts = load_prompts(args.prompts, args.sequences, args.seed)
    ids, pattn = lm.pad_prompts(lm.encode(prompts))
    spec = SamplingSpec(gen_length=GEN_LENGTH, steps=GEN_LENGTH, temperature=1.0, suppress_tokens=suppress)
    traj = generate(lm, ids, pattn, spec, mask_id=mask_id, eos_id=eos_id, generator=torch.Generator().manual_seed(args.seed))
    seqs, attn, P = traj.sequences, traj.attention_mask, traj.prompt_length
    B, Lg = seqs.shape[0], GEN_LENGTH
    elbo, loglik = exact_references(lm, seqs, attn, P, mask_id, suppress)
    print(f"model: {where}\nsequences: {B} sampled completions (T=1) of {Lg} tokens, e.g. "
          f"{prompts[0]!r} -> {lm.decode(traj.completion_ids[:1])[0]!r}")
    print(f"exact ELBO (mean over sequences) {elbo.mean():.3f}   exact any-order log p {loglik.mean():.3f}   "
          f"gap {(loglik - elbo).mean():.3f} (>= 0: {bool((loglik >= elbo - 1e-6).all())})\n")

    R = args.repeats
    rows_seq = seqs.repeat(R, 1)
    rows_attn = attn.repeat(R, 1)
    var_rows, bias_rows, raw = [], [], {}
    for name, drawer in ESTIMATORS.items():
        vrow, brow = [name], [name]
        for K in args.budgets:
            g = torch.Generator().manual_seed(args.seed + 1000 * K)
            masks = drawer(K, R * B, Lg, rows_attn[:, :P], g)
            if masks.num_forwards != K:
                raise RuntimeError(f"{name} used {masks.num_forwards} forwards at budget {K}")
            est = masked_logprob(lm, rows_seq, rows_attn, P, mask_id, masks, batch_size=args.batch_size,
                                 suppress_tokens=suppress).sum(-1).double().view(R, B)
            var = est.var(dim=0).mean().item()
            bias = (est.mean(dim=0) - elbo).mean().item()
            raw[(name, K)] = {"variance": var, "bias": bias}
            vrow.append(var)
            brow.append(bias)
        var_rows.append(vrow)
        bias_rows.append(brow)
    header = ["estimator"] + [f"K={K}" for K in args.budgets]
    print(f"Variance of the sequence log-likelihood estimate across {R} seeds (mean over {B} sequences), "
          f"at K forwards per sequence")
    print(format_table(header, var_rows))
    print("\nBias: mean estimate minus the exact ELBO (one-step and coupled target other quantities)")
    print(format_table(header, bias_rows))

    ratios: dict[str, list[float]] = {}
    for sd in ("semi-det   K nodes x 1 (GDPO)", "semi-det   2 nodes x K/2"):
        ratios[sd] = [raw[("double MC  K x 1", K)]["variance"] / max(raw[(sd, K)]["variance"], 1e-300)
                      for K in args.budgets]
        wins = sum(r > 1 for r in ratios[sd])
        verdict = "beats" if wins == len(args.budgets) else ("mostly beats" if wins > len(args.budgets) / 2
                                                            else "does not beat")
        print(f"\n{sd.split('   ')[1]} {verdict} double MC (K times x 1 mask): variance ratio double/semi-det = "
              + ", ".join(f"{r:.1f}x at K={K}" for r, K in zip(ratios[sd], args.budgets)))
    print("(double MC's variance is heavy-tailed -- 1/t weights at small t -- so its column is noisy across seeds)")
    print(f"(estimators section: {time.perf_counter() - t0:.1f} s)")
    return {"model": where, "exact_elbo": elbo.mean().item(), "exact_log_lik": loglik.mean().item(),
            "variance_ratio_double_mc_over_semi_det": ratios,
            "table": {f"{n} @K={K}": v for (n, K), v in raw.items()}}


# --------------------------------------------------------------------------------------------
# section: algorithms (accuracy vs training time on the quickstart task)
# --------------------------------------------------------------------------------------------
def _curve_from_metrics(run_dir: str) -> list[tuple[float, float]]:
    """``[(training seconds, held-out accuracy)]`` of a run, from its metrics.jsonl (evaluation
    time excluded: eval records are matched to the ``time/train_elapsed_s`` of their step)."""
    from flowalign.training.metrics import read_metrics

    recs = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    elapsed = {r["step"]: r["time/train_elapsed_s"] for r in recs if "time/train_elapsed_s" in r}
    elapsed[0] = 0.0
    return sorted((elapsed[r["step"]], r["eval/accuracy"]) for r in recs if "eval/accuracy" in r and r["step"] in elapsed)


def _time_to_gain(curve: list[tuple[float, float]], gain: float) -> float | None:
    base = curve[0][1]
    return next((t for t, acc in curve if acc >= base + gain - 1e-9), None)


def _continued_pretraining(args: argparse.Namespace, out_dir: str) -> dict:
    """The control: continue masked-diffusion pretraining (flowalign.dllm.pretrain) on fresh
    flawed data for the same training-time budget, evaluated exactly like the RL runs."""
    import flowalign.dllm.pretrain as pretrain
    from flowalign.config import load_config
    from flowalign.recipes.dllm_rl import DLLMRecipe

    cfg = load_config(os.path.join(REPO, "configs", "dllm", "quickstart.yaml"), _bench_overrides(args, out_dir))
    recipe = DLLMRecipe(cfg)
    recipe.setup()
    try:
        exclude = {(int(e.metadata["a"]), int(e.metadata["b"])) for e in recipe.eval_examples if "a" in e.metadata}
        rng = random.Random(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        optimizer = torch.optim.AdamW(recipe.model.trainable_parameters(), lr=args.control_lr, weight_decay=0.0)
        curve = [(0.0, recipe.evaluate(0)["eval/accuracy"])]
        elapsed, steps = 0.0, 0
        while elapsed < args.budget:
            t0 = time.perf_counter()
            pretrain.pretrain_steps(recipe.model, lambda n: pretrain.flawed_addition_pairs(n, rng=rng, exclude=exclude),
                                    steps=args.control_chunk, batch_size=args.control_batch, lr=args.control_lr,
                                    gen_length=cfg.sampling.gen_length, generator=gen, optimizer=optimizer)
            elapsed += time.perf_counter() - t0
            steps += args.control_chunk
            curve.append((elapsed, recipe.evaluate(steps)["eval/accuracy"]))
    finally:
        recipe.cleanup()
    return {"curve": curve, "seconds_per_iteration": elapsed / steps, "forwards_per_iteration": float(args.control_batch),
            "iterations": steps}


def _bench_overrides(args: argparse.Namespace, out_dir: str) -> dict:
    return {"output_dir": out_dir, "seed": args.seed, "num_threads": args.threads, "train.resume": "never", "train.iterations": 100000,
            "train.time_budget_s": args.budget, "eval.every": args.eval_every, "logging.progress": False,
            "logging.tensorboard": False, "model.pretrained": args.model,
            "task.eval": args.prompts}


def _train_algorithm(name: str, args: argparse.Namespace, run_dir: str) -> dict:
    """One dLLM algorithm's shipped ``configs/dllm/<name>_addition.yaml`` for ``--budget`` training seconds."""
    import flowalign

    summary = flowalign.train(os.path.join(REPO, "configs", "dllm", f"{name}_addition.yaml"), _bench_overrides(args, run_dir))
    return {"curve": _curve_from_metrics(run_dir), "seconds_per_iteration": summary["seconds_per_iteration"],
            "forwards_per_iteration": summary["sequence_forwards_per_iteration"], "iterations": summary["iterations"]}


def _call(fn: Callable[..., dict], *args) -> dict:
    return fn(*args)


def run_algorithms(args: argparse.Namespace) -> dict:
    """Every dLLM algorithm (its shipped configs/dllm/<name>_addition.yaml) and the
    continued-pretraining control, each for ``--budget`` seconds of training (evaluation excluded),
    same seed; a table and ``assets/figures/dllm_algorithms.png`` (held-out accuracy vs time)."""
    from flowalign.algorithms import algorithm_names

    t_start = time.perf_counter()
    names = args.algorithms or sorted(algorithm_names(("dllm",)))
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {name: (_train_algorithm, name, args, os.path.join(tmp, name)) for name in names}
        if not args.no_control:
            jobs["continued pretraining"] = (_continued_pretraining, args, os.path.join(tmp, "control"))
        results = run_jobs(_call, jobs, args.jobs, args.threads)

    rows = []
    for name, r in results.items():
        curve = r["curve"]
        accs = [a for _, a in curve]
        ttg = _time_to_gain(curve, 0.15)
        rows.append([name, accs[0], accs[-1], max(accs), r["iterations"], r["seconds_per_iteration"],
                     r["forwards_per_iteration"], f"{ttg:.1f}" if ttg is not None else "never"])
        r.update({"before": accs[0], "final": accs[-1], "best": max(accs), "time_to_plus_15": ttg})
    print(format_table(["run", "before", "final acc", "best acc", "iterations", "s / it", "forwards / it",
                        "s to +15 pts"], rows))
    print(f"(held-out accuracy on {args.prompts}, greedy decoding; {args.budget:.0f} s of training each, evaluation "
          f"every {args.eval_every} iterations excluded from the clock; forwards = sequences through the model, "
          "rollouts + updates; the control trains the masked-diffusion loss on fresh flawed data, forwards = batch)")
    figure = _plot_algorithms(results, args.figure, args.budget, args.threads)
    print(f"figure: {figure}   (algorithms section: {time.perf_counter() - t_start:.0f} s)")
    return {"runs": results, "figure": figure}


def _plot_algorithms(results: dict[str, dict], path: str, budget: float, threads: int) -> str:
    """Held-out accuracy against training seconds, one curve per run, with the +15 points line."""
    base = next(iter(results.values()))["curve"][0][1]
    return save_curves(path, {name: r["curve"] for name, r in results.items()},
                       xlabel=f"training time (s, {threads} CPU thread(s) per run; evaluation excluded)", ylabel="held-out accuracy (greedy)",
                       title=f"dLLM quickstart: 3-digit addition with dropped carries, {budget:.0f} s per run",
                       reference=(base + 0.15, "base + 15 points"))


# --------------------------------------------------------------------------------------------
# sections and entry point
# --------------------------------------------------------------------------------------------
SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {"estimators": run_estimators, "algorithms": run_algorithms}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", choices=[*SECTIONS, "all"], default="all")
    p.add_argument("--model", default=os.path.join(QUICKSTART, "model"))
    p.add_argument("--prompts", default=os.path.join(QUICKSTART, "eval.jsonl"))
    p.add_argument("--sequences", type=int, default=16, help="sampled sequences (estimators section)")
    p.add_argument("--repeats", type=int, default=64, help="seeds per estimator and budget (estimators section)")
    p.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8, 16], help="forwards per sequence (even)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per model call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--jobs", type=int, default=1, help="algorithm runs at once, each in its own process (algorithms section; "
                   "bench/parallel.py)")
    p.add_argument("--budget", type=float, default=40.0, help="training seconds per run (algorithms section)")
    p.add_argument("--eval-every", type=int, default=5, help="iterations between evaluations (algorithms section)")
    p.add_argument("--algorithms", nargs="*", default=None, help="dLLM algorithms to run (default all; algorithms section)")
    p.add_argument("--no-control", action="store_true", help="skip the continued-pretraining control")
    p.add_argument("--control-lr", type=float, default=2e-4, help="continued-pretraining learning rate")
    p.add_argument("--control-batch", type=int, default=64, help="continued-pretraining batch size")
    p.add_argument("--control-chunk", type=int, default=25, help="continued-pretraining steps between evaluations")
    p.add_argument("--figure", default=os.path.join(REPO, "assets", "figures", "dllm_algorithms.png"))
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if any(K < 2 or K % 2 for K in args.budgets):
        raise SystemExit(f"--budgets must be even numbers >= 2 (coupled pairs, K/2 x 2 schemes), got {args.budgets}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = list(SECTIONS) if args.section == "all" else [args.section]
    results = {}
    for i, name in enumerate(names):
        if i:
            print()
        print(f"== {name} ==")
        results[name] = SECTIONS[name](args)
    return results


if __name__ == "__main__":
    main()
