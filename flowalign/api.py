"""One Python call per CLI command, so notebooks and scripts need no YAML.

>>> import flowalign
>>> summary = flowalign.train("configs/quickstart.yaml", {"train.iterations": 20})
>>> summary["after"]["eval/judge/digit_judge/accuracy"]
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch

from flowalign.config import RLConfig, load_config
from flowalign.training.rundir import check_run_dir, clear_run_dir, fresh_output_dir


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def recipe_class(cfg: Any) -> type:
    """The recipe class named by ``cfg.recipe`` (flowalign.config.RECIPES)."""
    from flowalign.config import RECIPES, import_path

    return import_path(RECIPES[cfg.recipe], "recipe")


def train(config: str | os.PathLike | dict | RLConfig, overrides: Sequence[str] | dict[str, Any] = (), *,
          rewards: Any = None, judges: Any = None, output_dir: str | None = None) -> dict[str, Any]:
    """Run a training recipe and return its summary (before / after / best held-out metrics).

    Args:
        config: YAML path, nested dict or config dataclass (RLConfig; DLLMConfig for ``recipe: dllm``).
        overrides: ``["train.iterations=2"]`` or ``{"train.iterations": 2}``.
        rewards: Python reward(s) used instead of ``config.rewards``: a Reward object, a plain
            callable ``fn(media [B,3,H,W] in [0,1], prompts, metadata) -> [B] scores``, or a list/dict.
        judges: Python judge(s) used instead of ``config.eval.judges``.
        output_dir: the run directory. Given here, as an ``output_dir`` override or in a dict
            config, a run in it is continued as by ``flowalign train``
            (:func:`flowalign.training.rundir.check_run_dir`).
            Otherwise the run gets a directory of its own: the config's ``output_dir`` if it holds
            no run, else ``<output_dir>-2``, ``-3``, ... (single-process runs; with several processes
            the config's directory is used, as by the CLI).
    """
    cfg = load_config(config, overrides, world_size=_world_size())
    if output_dir is not None:
        cfg.output_dir = output_dir
    elif not _names_output_dir(config, overrides) and _world_size() == 1:
        chosen = fresh_output_dir(cfg.output_dir)
        if chosen != cfg.output_dir:
            print(f"[flowalign] {cfg.output_dir} holds another run: writing to {chosen} "
                  "(pass output_dir= to continue a run)")
        cfg.output_dir = chosen
    return run_training(cfg, rewards=rewards, judges=judges)


def run_training(cfg: Any, *, rewards: Any = None, judges: Any = None) -> dict[str, Any]:
    """Train ``cfg`` in ``cfg.output_dir`` as ``flowalign train`` does: a run there with the same
    settings is continued (or, when finished, reported without training); one with other settings
    is refused, naming the changed keys; ``train.resume=never`` removes it first."""
    recipe = recipe_class(cfg)(cfg, rewards=rewards, judges=judges)
    status = check_run_dir(recipe.cfg, recipe.replacements)
    summary_file = os.path.join(cfg.output_dir, "summary.json")
    if status.action == "finished" and os.path.isfile(summary_file):
        return _finished_summary(cfg, summary_file, status.step)
    if cfg.train.resume == "never" and _world_rank() == 0:
        removed = clear_run_dir(cfg.output_dir) if os.path.isdir(cfg.output_dir) else []
        if removed:
            print(f"[flowalign] train.resume=never: removed the previous run's {', '.join(removed)} from {cfg.output_dir}")
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()


def _finished_summary(cfg: Any, summary_file: str, step: int) -> dict[str, Any]:
    """The summary of a run that already reached ``train.iterations``, printed as at its end."""
    from flowalign.training.plots import before_after_table

    with open(summary_file, encoding="utf-8") as f:
        summary = json.load(f)
    print(f"[flowalign] {cfg.output_dir} already finished {step}/{cfg.train.iterations} iterations: nothing to train. "
          "Raise train.iterations to continue it, or pass output_dir=<new folder> (or train.resume=never) to train again.")
    if isinstance(summary.get("before"), dict) and isinstance(summary.get("after"), dict):
        print("\n" + before_after_table(summary["before"], summary["after"], summary.get("best"),
                                        summary.get("seconds_per_iteration", float("nan"))))
    print(f"\nrun directory: {cfg.output_dir}  (summary.json)")
    return summary


def _names_output_dir(config: Any, overrides: Sequence[str] | dict[str, Any]) -> bool:
    """Whether the caller chose the run directory: an ``output_dir`` override, or a dict config
    that sets it (a YAML file's ``output_dir`` is its author's default, shared by everyone using it)."""
    keys = overrides.keys() if isinstance(overrides, dict) else [o.split("=", 1)[0] for o in overrides]
    return any(k.strip() == "output_dir" for k in keys) or (isinstance(config, dict) and "output_dir" in config)


def _world_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def evaluate(config: str | os.PathLike | dict | RLConfig, overrides: Sequence[str] | dict[str, Any] = (), *,
             rewards: Any = None, judges: Any = None) -> dict[str, float]:
    """Score the configured model (``model.pretrained``) on the held-out prompts, without training.
    Reads nothing from and writes nothing to ``output_dir``."""
    cfg = load_config(config, overrides, world_size=_world_size())
    recipe = recipe_class(cfg)(cfg, rewards=rewards, judges=judges)
    recipe.setup(for_training=False)
    try:
        result = recipe.evaluate(step=0)
    finally:
        recipe.cleanup()
    return {k: v for k, v in result.items() if k != "media"}


@torch.no_grad()
def sample(model: str, prompts: Sequence[str], *, adapter: str = "toy", num_steps: int = 10, guidance_scale: float = 1.0,
           seed: int = 0, samples_per_prompt: int = 1, device: str = "cpu") -> torch.Tensor:
    """Deterministic ODE samples ``[len(prompts) * samples_per_prompt, 3, H, W]`` in [0, 1]."""
    from flowalign.pipelines import load_adapter_class
    from flowalign.rollout import sample_ode

    from flowalign.errors import loading

    with loading("model", model):
        pipe = load_adapter_class(adapter).from_pretrained(model, device=device)
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    latents = pipe.init_latents(len(expanded), torch.Generator().manual_seed(seed))
    final = sample_ode(pipe, pipe.encode(expanded), num_steps, latents=latents, guidance_scale=guidance_scale)
    return pipe.decode(final)
