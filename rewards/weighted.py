"""Compose several rewards into one: a weighted sum (docs/ARCHITECTURE.md, "Rewards": ``WeightedSum`` composes).

Multi-reward training optimizes a fixed linear combination ``r = Σ_i w_i · r_i`` of per-sample
scores -- Flow-GRPO's ``multi_score`` (Liu et al. 2025, "Flow-GRPO", reference code
``flow_grpo/rewards.py``: ``total += weight * score`` with per-reward details kept). The unweighted
parts are kept as components so each reward can be logged (and, for decoupled multi-reward
advantages, normalized separately).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .base import Reward, RewardOutput, as_reward_output

__all__ = ["WeightedSum"]


class WeightedSum:
    """A reward that is the weighted sum of named rewards.

    ``scores = Σ_i w_i · s_i`` (``s_i``: reward ``i``'s ``[B]`` scores). ``components`` holds each
    reward's unweighted scores under its name and each of its own components as
    ``"name/component"``. ``valid`` is the AND of the rewards' valid masks (``None`` if none has one).

    Args:
        rewards: name -> reward; all must share one ``modality``.
        weights: name -> finite float weight; missing names default to 1.0.

    Attributes:
        name: ``"+".join(names)``.
        modality: the rewards' shared modality.
        rewards: the name -> reward mapping (insertion order).
        weights: name -> weight for every reward.
    """

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float] | None = None) -> None:
        if not isinstance(rewards, Mapping):
            raise TypeError(f"WeightedSum: rewards must be a dict name -> reward, got {type(rewards).__name__}")
        if len(rewards) == 0:
            raise ValueError("WeightedSum: rewards is empty; give at least one reward")
        for key, reward in rewards.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"WeightedSum: reward names must be non-empty strings, got {key!r}")
            if not isinstance(reward, Reward):
                raise TypeError(
                    f"WeightedSum: reward {key!r} ({type(reward).__name__}) does not satisfy the Reward protocol "
                    "(needs name, modality and __call__(media, prompts, metadata))"
                )
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(rewards))
        if unknown:
            raise ValueError(f"WeightedSum: weights given for unknown reward(s) {unknown}; rewards are {list(rewards)}")
        self.rewards: dict[str, Reward] = dict(rewards)
        self.weights: dict[str, float] = {}
        for key in self.rewards:
            w = weights.get(key, 1.0)
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
                raise ValueError(f"WeightedSum: weight of reward {key!r} must be a finite number, got {w!r}")
            self.weights[key] = float(w)
        modalities = {key: r.modality for key, r in self.rewards.items()}
        if len(set(modalities.values())) != 1:
            listed = ", ".join(f"{k} ({m})" for k, m in modalities.items())
            raise ValueError(f"WeightedSum: all rewards must share one modality, got {listed}")
        self.modality: str = next(iter(modalities.values()))
        self.name: str = "+".join(self.rewards)

    def __call__(
        self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
    ) -> RewardOutput:
        """Score ``B`` samples with every reward and sum.

        Args:
            media: ``[B, ...]`` media for the shared modality.
            prompts: ``B`` prompts.
            metadata: optional ``B`` per-sample dicts.

        Returns:
            :class:`RewardOutput` with ``scores [B]`` (on ``media``'s device when it is a tensor).

        Raises:
            ValueError: a reward returns a batch of the wrong size, or a component name collides.
            FloatingPointError: a reward returns NaN / Inf scores.
        """
        batch = len(media)
        if len(prompts) != batch:
            raise ValueError(f"WeightedSum {self.name!r}: got {len(prompts)} prompts for a media batch of {batch}")
        if metadata is not None and len(metadata) != batch:
            raise ValueError(f"WeightedSum {self.name!r}: got {len(metadata)} metadata entries for a media batch of {batch}")
        device = media.device if isinstance(media, Tensor) else torch.device("cpu")
        total = torch.zeros(batch, dtype=torch.float32, device=device)
        components: dict[str, Tensor] = {}
        valid: Tensor | None = None
        for key, reward in self.rewards.items():
            out = as_reward_output(reward(media, prompts, metadata))
            scores = out.scores.to(device)
            if scores.shape[0] != batch:
                raise ValueError(f"reward {key!r} returned {scores.shape[0]} scores for a batch of {batch}")
            bad = ~torch.isfinite(scores)
            if bool(bad.any()):
                where = bad.nonzero().flatten().tolist()
                raise FloatingPointError(
                    f"reward {key!r} returned NaN/Inf scores at batch index(es) {where[:10]}"
                    f"{' ...' if len(where) > 10 else ''}; mark unscorable samples with valid=False and a finite score"
                )
            # r = Σ_i w_i · r_i (Flow-GRPO multi_score: weighted sum of per-reward scores).
            total = total + self.weights[key] * scores
            named = {key: scores, **{f"{key}/{c}": v.to(device) for c, v in out.components.items()}}
            for cname, value in named.items():
                if cname in components:
                    raise ValueError(f"WeightedSum {self.name!r}: component name {cname!r} is produced twice")
                components[cname] = value
            if out.valid is not None:
                mask = out.valid.to(device=device, dtype=torch.bool)
                valid = mask if valid is None else valid & mask
        return RewardOutput(scores=total, components=components, valid=valid)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {w:g} x {type(r).__name__}" for (k, r), w in zip(self.rewards.items(), self.weights.values()))
        return f"WeightedSum({parts})"
