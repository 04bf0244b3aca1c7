"""CLIP score: text-image agreement of any transformers ``CLIPModel``.

``scores = scale * max(cos(image_embeds, text_embeds), 0)`` with

* ``scale = 2.5`` -- CLIP-S of Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric
  for Image Captioning", Eq. 1 (``w = 2.5``, ViT-B/32);
* ``scale = 100`` (the default) -- torchmetrics ``CLIPScore`` (``torchmetrics/functional/multimodal/
  clip_score.py``: ``100 * cos``, clamped at 0), the number T2I papers report, with
  ``openai/clip-vit-large-patch14``.

``clamp=False`` gives ``scale * cos`` (a reward that keeps a gradient signal below 0).
Preprocessing is the model's ``CLIPProcessor`` (shortest side bicubic, center crop, mean/std).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
from torch import Tensor

from ._media import check_media
from .base import RewardOutput
from .clip_models import ClipFeatures, write_tiny_clip

__all__ = ["ClipScore", "clip_score_from_features"]


def clip_score_from_features(image_features: Tensor, text_features: Tensor, scale: float = 100.0,
                             clamp: bool = True) -> tuple[Tensor, Tensor]:
    """CLIP score of matched pairs.

    Args:
        image_features, text_features: ``[B, D]`` unit-norm CLIP features.
        scale: ``w`` (2.5 Hessel et al.; 100 torchmetrics).
        clamp: apply ``max(cos, 0)`` (Hessel et al. Eq. 1).

    Returns:
        ``(score [B], cosine [B])``.
    """
    cosine = (image_features * text_features).sum(dim=-1)
    return scale * (cosine.clamp_min(0.0) if clamp else cosine), cosine


class ClipScore:
    """CLIP-score reward (see module docstring).

    Args:
        path: any transformers ``CLIPModel`` (hub id or local directory).
        processor_path: its processor; default ``path``.
        device, dtype, batch_size: as in :class:`flowalign.rewards.pickscore.PickScore`.
        scale: ``w``; 100 (torchmetrics) or 2.5 (Hessel et al.).
        clamp: clamp the cosine at 0.
    """

    name = "clip_score"
    modality = "image"

    def __init__(self, path: str = "openai/clip-vit-large-patch14", processor_path: str | None = None,
                 device: str = "cpu", dtype: str = "float32", scale: float = 100.0, clamp: bool = True,
                 batch_size: int = 16) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        if not isinstance(clamp, bool):
            raise ValueError(f"clamp must be a bool, got {clamp!r}")
        self.scale, self.clamp, self.path = float(scale), clamp, path
        self.features = ClipFeatures.from_pretrained(path, processor_path, device, dtype, batch_size)

    @torch.no_grad()
    def embed(self, media: Tensor) -> Tensor:
        """``media [B, 3, H, W]`` in [0, 1] -> ``[B, D]`` unit-norm CLIP image embeddings (sample diversity)."""
        return self.features.images(check_media(media, "image"))

    @torch.no_grad()
    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """``media [B, 3, H, W]`` in [0, 1] + ``B`` prompts -> scores ``[B]`` on ``media``'s device."""
        self.features.check(media, prompts)
        media = check_media(media, "image")
        score, cosine = clip_score_from_features(self.features.images(media), self.features.texts(list(prompts)),
                                                 self.scale, self.clamp)
        return RewardOutput(scores=score.to(media.device), components={"cosine": cosine.to(media.device)})

    @classmethod
    def tiny(cls, tmp_dir: str, **kwargs: Any) -> "ClipScore":
        """Tests only: a random tiny CLIP saved in the hub layout, loaded back through ``__init__``."""
        directory = os.path.join(str(tmp_dir), "clip-score-tiny")
        write_tiny_clip(directory, seed=2)
        return cls(path=directory, **kwargs)

    def __repr__(self) -> str:
        return f"ClipScore(path={self.path!r}, scale={self.scale}, clamp={self.clamp})"
