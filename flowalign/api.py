"""One Python call per CLI command, so notebooks and scripts need no YAML.

>>> import flowalign
>>> summary = flowalign.train("configs/quickstart.yaml", {"train.iterations": 20})
>>> summary["after"]["eval/judge/digit_judge/accuracy"]
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from flowalign.config import RLConfig, load_config


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def recipe_class(cfg: Any) -> type:
    """The recipe class named by ``cfg.recipe`` (flowalign.config.RECIPES)."""
    from flowalign.config import RECIPES, import_path

    return import_path(RECIPES[cfg.recipe], "recipe")


def train(config: str | os.PathLike | dict | RLConfig, overrides: Sequence[str] | dict[str, Any] = (), *,
          rewards: Any = None, judges: Any = None) -> dict[str, Any]:
    """Run a training recipe and return its summary (before / after / best held-out metrics).

    Args:
        config: YAML path, nested dict or config dataclass (RLConfig; DLLMConfig for ``recipe: dllm``).
        overrides: ``["train.iterations=2"]`` or ``{"train.iterations": 2}``.
        rewards: Python reward(s) used instead of ``config.rewards``: a Reward object, a plain
            callable ``fn(media [B,3,H,W] in [0,1], prompts, metadata) -> [B] scores``, or a list/dict.
        judges: Python judge(s) used instead of ``config.eval.judges``.
    """
    cfg = load_config(config, overrides, world_size=_world_size())
    recipe = recipe_class(cfg)(cfg, rewards=rewards, judges=judges)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()


def evaluate(config: str | os.PathLike | dict | RLConfig, overrides: Sequence[str] | dict[str, Any] = (), *,
             rewards: Any = None, judges: Any = None) -> dict[str, float]:
    """Score the configured model (``model.pretrained``) on the held-out prompts, without training."""
    cfg = load_config(config, overrides, world_size=_world_size())
    recipe = recipe_class(cfg)(cfg, rewards=rewards, judges=judges)
    recipe.setup()
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

    pipe = load_adapter_class(adapter).from_pretrained(model, device=device)
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    latents = pipe.init_latents(len(expanded), torch.Generator().manual_seed(seed))
    final = sample_ode(pipe, pipe.encode(expanded), num_steps, latents=latents, guidance_scale=guidance_scale)
    return pipe.decode(final)
