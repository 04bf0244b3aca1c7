"""JPEG file size as a reward: DDPO's compressibility / incompressibility tasks.

Black et al. 2023, "Training Diffusion Models with Reinforcement Learning" (DDPO), Sec. 5.1 and
the appendix: the reward is the size of the image after JPEG compression at quality 95, in
kilobytes (bytes / 1000, as in the reference code ``ddpo_pytorch/rewards.py``), negated for
compressibility. No weights, no network: a cheap, exactly reproducible reward for smoke tests
and for showing reward hacking (the policy learns flat or noisy images).
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor

from ._media import to_pil_images
from .base import RewardOutput

__all__ = ["jpeg_size_kb", "JpegCompressibility", "JpegIncompressibility"]

DEFAULT_QUALITY = 95  # DDPO, Sec. 5.1 / ddpo_pytorch/rewards.py: image.save(..., "JPEG", quality=95)


def jpeg_size_kb(images: Sequence[Image.Image], quality: int = DEFAULT_QUALITY) -> Tensor:
    """JPEG-encoded size of each image in kB.

    Args:
        images: ``B`` PIL images.
        quality: JPEG quality (1..100), 95 in DDPO.

    Returns:
        ``[B]`` float32, ``len(JPEG bytes) / 1000`` (DDPO: ``buffer.tell() / 1000``).
    """
    _check_quality(quality)
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def _check_quality(quality: int) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an int in [1, 100], got {quality!r}")


class JpegIncompressibility:
    """DDPO incompressibility: ``score = +kB`` of the quality-95 JPEG (bigger file is better).

    ``__call__(media [B, 3, H, W] in [0, 1], prompts, metadata) -> RewardOutput`` with
    ``scores [B]`` and ``components {"jpeg_kb": [B]}``; prompts and metadata are unused.
    """

    name = "jpeg_incompressibility"
    modality = "image"
    sign = 1.0

    def __init__(self, quality: int = DEFAULT_QUALITY) -> None:
        _check_quality(quality)
        self.quality = quality

    def __call__(
        self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
    ) -> RewardOutput:
        """Score ``B`` images by their JPEG size; returns scores ``[B]`` on ``media``'s device."""
        kb = jpeg_size_kb(to_pil_images(media), self.quality).to(media.device)
        return RewardOutput(scores=self.sign * kb, components={"jpeg_kb": kb})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(quality={self.quality})"


class JpegCompressibility(JpegIncompressibility):
    """DDPO compressibility: ``score = −kB`` of the quality-95 JPEG (smaller file is better).

    Same interface as :class:`JpegIncompressibility`; ``components["jpeg_kb"]`` stays positive.
    """

    name = "jpeg_compressibility"
    sign = -1.0
