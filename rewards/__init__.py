"""The reward zoo (importable as ``flowalign.rewards``).

Importing this package is cheap (no torch): every public name loads on first use.

Writing a reward
----------------
A reward is any object with a ``name``, a ``modality`` (``"image"``: media ``[B, 3, H, W]``,
``"video"``: ``[B, F, 3, H, W]``, or ``"text"``) and
``__call__(media, prompts, metadata=None) -> RewardOutput`` (the :class:`Reward` protocol in
``flowalign.rewards.base``). Media arrive as float in [0, 1]; higher scores are better::

    import torch
    from flowalign.rewards import RewardOutput
    from flowalign.rewards._media import check_media, to_pil_images

    class Brightness:
        name = "brightness"
        modality = "image"

        def __init__(self, target: float = 0.5):
            self.target = target

        def __call__(self, media, prompts, metadata=None):
            media = check_media(media, "image")               # [B, 3, H, W], clamped to [0, 1]
            mean = media.mean(dim=(1, 2, 3))                  # [B]
            return RewardOutput(scores=-(mean - self.target).abs(), components={"mean": mean})

Use ``_media.to_pil_images`` / ``to_uint8`` / ``video_to_frames`` for models that want PIL
images, uint8 arrays or frames. A sample the reward cannot score gets ``valid=False`` (and a
finite score): NaN scores are an error.

Using it
--------
* In Python, pass the object (or a plain function ``fn(media, prompts, metadata) -> [B] tensor |
  list[float] | RewardOutput``, wrapped in :class:`CallableReward`) wherever a reward is taken::

      rewards = build_rewards([{"_component_": Brightness(), "weight": 0.5}, "jpeg_compressibility"])

* In a YAML config, name its class by path; other keys are constructor arguments::

      rewards:
        - {_component_: "my_package.rewards:Brightness", target: 0.6, weight: 0.5}
        - {_component_: jpeg_compressibility, weight: 1.0}

* To register it under a short name, declare an entry point in your package's
  ``pyproject.toml``; ``flowalign ls rewards`` lists it and configs can say ``brightness``::

      [project.entry-points."flowalign.rewards"]
      brightness = "my_package.rewards:Brightness"

Names resolve in order: built-ins (:data:`BUILTIN_REWARDS`), entry points, dotted paths
(:func:`resolve_reward_class`). :class:`WeightedSum` combines rewards as ``Σ w_i · r_i``.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule defining it (imported on first attribute access)
_LAZY: dict[str, str] = {
    "Reward": "base",
    "RewardOutput": "base",
    "WeightedSum": "weighted",
    "CallableReward": "callable",
    "build_reward": "registry",
    "build_rewards": "registry",
    "list_rewards": "registry",
    "resolve_reward_class": "registry",
    "BUILTIN_REWARDS": "registry",
    "RewardInfo": "registry",
    "ENTRY_POINT_GROUP": "registry",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
