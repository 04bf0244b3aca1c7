"""The reward contract (docs/ARCHITECTURE.md, "Rewards"): every reward in the zoo and every user reward
speaks it, so recipes never special-case a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@dataclass
class RewardOutput:
    """What a reward returns for a batch of ``B`` samples.

    Attributes:
        scores: ``[B]`` float32 scalar reward per sample (higher is better).
        components: named ``[B]`` tensors that make up or explain the score (logged, not trained on).
        valid: optional ``[B]`` bool mask; ``False`` marks a sample the reward could not score
            (its score is then ignored by advantage computation).
    """

    scores: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)
    valid: Tensor | None = None

    def __post_init__(self) -> None:
        if self.scores.ndim != 1:
            raise ValueError(f"RewardOutput.scores must be 1-D [B], got shape {tuple(self.scores.shape)}")
        self.scores = self.scores.float()
        for name, comp in self.components.items():
            if comp.shape != self.scores.shape:
                raise ValueError(
                    f"RewardOutput component {name!r} has shape {tuple(comp.shape)}, expected {tuple(self.scores.shape)}"
                )
        if self.valid is not None and self.valid.shape != self.scores.shape:
            raise ValueError(f"RewardOutput.valid has shape {tuple(self.valid.shape)}, expected {tuple(self.scores.shape)}")


@runtime_checkable
class Reward(Protocol):
    """A pointwise reward.

    Attributes:
        name: short identifier used in logs and metric names.
        modality: ``"image"`` (media ``[B, 3, H, W]``), ``"video"`` (``[B, F, 3, H, W]``) or ``"text"``.
    """

    name: str
    modality: str

    def __call__(
        self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
    ) -> RewardOutput:
        """Score ``B`` samples; ``media`` is float in [0, 1]; returns scores ``[B]``."""
        ...


def as_reward_output(value: RewardOutput | Tensor | Sequence[float]) -> RewardOutput:
    """Accept a plain callable's return value (tensor or list of floats) as a RewardOutput."""
    if isinstance(value, RewardOutput):
        return value
    return RewardOutput(scores=torch.as_tensor(value, dtype=torch.float32).reshape(-1))
