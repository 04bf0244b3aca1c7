"""Wrap a plain scoring function as a :class:`~flowalign.rewards.base.Reward`.

Notebooks and scripts can pass ``fn(media, prompts, metadata) -> Tensor | list[float] |
RewardOutput`` wherever a reward is expected; ``build_reward`` wraps it in :class:`CallableReward`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor

from ._media import check_media
from .base import RewardOutput, as_reward_output

__all__ = ["CallableReward", "MODALITIES"]

MODALITIES = ("image", "video", "text")


class CallableReward:
    """A :class:`Reward` around ``fn(media, prompts, metadata)``.

    For ``"image"`` / ``"video"`` the media is validated and clamped with
    :func:`~flowalign.rewards._media.check_media` before ``fn`` sees it; ``fn``'s return value
    (``[B]`` tensor, array, list of floats, or a :class:`RewardOutput`) must hold one score per sample.

    Args:
        fn: the scoring function.
        name: the reward's name; defaults to ``fn.__name__`` (or the callable's class name).
        modality: ``"image"`` (``[B, 3, H, W]``), ``"video"`` (``[B, F, 3, H, W]``) or ``"text"``.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None, modality: str = "image") -> None:
        if not callable(fn):
            raise TypeError(f"CallableReward: fn must be callable, got {type(fn).__name__}")
        if modality not in MODALITIES:
            raise ValueError(f"CallableReward: modality must be one of {list(MODALITIES)}, got {modality!r}")
        if name is None:
            name = getattr(fn, "__name__", None) or type(fn).__name__
        if not isinstance(name, str) or not name:
            raise ValueError(f"CallableReward: name must be a non-empty string, got {name!r}")
        self.fn = fn
        self.name = name
        self.modality = modality

    def __call__(
        self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
    ) -> RewardOutput:
        """Score ``B`` samples; returns scores ``[B]``."""
        if self.modality in ("image", "video"):
            media = check_media(media, self.modality)
        batch = len(media)
        result = self.fn(media, prompts, metadata)
        try:
            out = as_reward_output(result)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"reward {self.name!r} must return a [B] tensor, a list of floats or a RewardOutput; "
                f"got {type(result).__name__} ({err})"
            ) from err
        if out.scores.shape[0] != batch:
            raise ValueError(f"reward {self.name!r} returned {out.scores.shape[0]} scores for a batch of {batch}")
        return out

    def __repr__(self) -> str:
        return f"CallableReward(name={self.name!r}, modality={self.modality!r}, fn={self.fn!r})"
