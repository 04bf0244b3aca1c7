"""PickScore (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for
Text-to-Image Generation"): a CLIP ViT-H/14 fine-tuned on human preferences.

Score, as in the PickScore README / ``yuvalkirstain/PickScore`` and Flow-GRPO's
``flow_grpo/pickscore_scorer.py``::

    raw = exp(logit_scale) * cos(image_embeds, text_embeds)      # the paper's PickScore, ~18-24

and Flow-GRPO trains on ``raw / 26`` ("norm to 0-1"): ``divisor=26`` is the default here, and
``components["pickscore"]`` always holds ``raw`` (``divisor=1`` makes the score the raw value).
Model: ``CLIPModel.from_pretrained("yuvalkirstain/PickScore_v1")``; tokenizer and image
preprocessing from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (its ``CLIPProcessor``: shortest side
224 bicubic, center crop 224, OpenAI mean/std; 77 tokens).
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

__all__ = ["PickScore", "pickscore_from_features"]


def pickscore_from_features(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
    """PickScore of matched pairs.

    Args:
        image_features, text_features: ``[B, D]`` unit-norm CLIP features.
        logit_scale: scalar, the model's *log* temperature (``CLIPModel.logit_scale``).

    Returns:
        ``(raw [B], cosine [B])`` with ``raw = exp(logit_scale) * cosine``.
    """
    cosine = (image_features * text_features).sum(dim=-1)
    return logit_scale.exp().float() * cosine, cosine


class PickScore:
    """PickScore reward: ``scores = exp(logit_scale) * cos(img, text) / divisor``.

    Args:
        path: PickScore ``CLIPModel`` (hub id or local ``save_pretrained`` directory).
        processor_path: its processor (tokenizer + ``preprocessor_config.json``).
        device: where the model runs ("cpu", "cuda", ...).
        dtype: model weights dtype ("float32" as in Flow-GRPO, or "bfloat16" / "float16").
        divisor: the raw score is divided by it (26 = Flow-GRPO's scale; 1 = raw PickScore).
        batch_size: images / prompts per forward pass.
    """

    name = "pickscore"
    modality = "image"

    def __init__(self, path: str = "yuvalkirstain/PickScore_v1",
                 processor_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: str = "cpu",
                 dtype: str = "float32", divisor: float = 26.0, batch_size: int = 16) -> None:
        if isinstance(divisor, bool) or not isinstance(divisor, (int, float)) or not math.isfinite(divisor) or divisor <= 0:
            raise ValueError(f"divisor must be a positive finite number, got {divisor!r}")
        self.divisor = float(divisor)
        self.features = ClipFeatures.from_pretrained(path, processor_path, device, dtype, batch_size)
        self.path = path

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
        raw, cosine = pickscore_from_features(self.features.images(media), self.features.texts(list(prompts)),
                                              self.features.model.logit_scale)
        dev = media.device
        return RewardOutput(scores=(raw / self.divisor).to(dev),
                            components={"pickscore": raw.to(dev), "cosine": cosine.to(dev)})

    @classmethod
    def tiny(cls, tmp_dir: str, **kwargs: Any) -> "PickScore":
        """Tests only: a random tiny CLIP saved in the hub layout, loaded back through ``__init__``."""
        directory = os.path.join(str(tmp_dir), "pickscore-tiny")
        write_tiny_clip(directory, seed=1, hidden_act="gelu")
        return cls(path=directory, processor_path=directory, **kwargs)

    def __repr__(self) -> str:
        return f"PickScore(path={self.path!r}, divisor={self.divisor})"
