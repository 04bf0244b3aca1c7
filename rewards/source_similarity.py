"""Preservation reward of image editing: SSIM between the edit and its source image.

An edit should change what the instruction asks and keep the rest; this reward measures the "keep"
part. It compares each generated image with its prompt record's source image (``metadata["image"]``,
the path(s) the recipe made absolute; with several source images, the first one, the image being edited)
by the structural similarity index of Wang et al. 2004, "Image Quality Assessment: From Error Visibility
to Structural Similarity", Eq. 13, with the paper's constants (Sec. III-C): an 11 x 11 Gaussian window
of std 1.5, ``K1 = 0.01``, ``K2 = 0.03``, dynamic range ``L = 1``, no padding ("valid" windows), computed
per RGB channel and averaged over channels and windows (the convention of scikit-image's
``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``).

SSIM alone is maximised by copying the source: weight it against an instruction-following reward
(configs/grpo/flux_kontext_similarity.yaml pairs it with CLIP score).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._media import check_media
from .base import RewardOutput

__all__ = ["ssim", "SourceSSIM"]

K1, K2 = 0.01, 0.03  # Wang et al. 2004, Sec. III-C


def gaussian_window(size: int, sigma: float = 1.5) -> Tensor:
    """``[size, size]`` normalised Gaussian window (Wang et al. 2004, Sec. III-C: 11 x 11, std 1.5)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).float()


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM of image pairs (Wang et al. 2004, Eq. 13, local statistics weighted by a Gaussian).

    ``SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))``,
    ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2``, ``L = 1``.

    Args:
        x, y: ``[B, C, H, W]`` images in [0, 1] of the same shape.
        window: Gaussian window side (shrunk to the largest odd size that fits a smaller image).
        sigma: the window's std.

    Returns:
        ``[B]`` float32: SSIM averaged over channels and window positions (1 for identical images).
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two [B, C, H, W] tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd
    c = x.shape[1]
    w = gaussian_window(size, sigma).double().to(x.device)[None, None].expand(c, 1, size, size)
    x, y = x.double(), y.double()  # float64 local statistics: var = E[x^2] - mu^2 cancels exactly enough

    def local_mean(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x.square()
    var_y = local_mean(y * y) - mu_y.square()
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = K1**2, K2**2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def _resize(image: Tensor, height: int, width: int) -> Tensor:
    """``[3, h, w]`` -> ``[3, height, width]`` (bilinear with antialiasing; identity at that size)."""
    if image.shape[-2:] == (height, width):
        return image
    return F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


class SourceSSIM:
    """Preservation of the source image: ``score = SSIM(edit, source)`` in [-1, 1] (1 = identical).

    ``__call__(media [B, 3, H, W] in [0, 1], prompts, metadata) -> RewardOutput`` with ``scores [B]`` and
    ``components {"ssim": [B]}``; each ``metadata[i]["image"]`` is the source's path (or list of paths:
    the first is used), which is resized to the edit's size (bilinear, antialiased) before comparison.

    Args:
        window: SSIM's Gaussian window side (11 in Wang et al. 2004).
        sigma: its std (1.5).
    """

    name = "source_ssim"
    modality = "image"

    def __init__(self, window: int = 11, sigma: float = 1.5) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"source_ssim: window must be an odd positive int, got {window!r}")
        if not sigma > 0:
            raise ValueError(f"source_ssim: sigma must be > 0, got {sigma!r}")
        self.window, self.sigma = window, float(sigma)

    def _source(self, meta: dict[str, Any] | None, i: int) -> Tensor:
        from flowalign.data.images import load_image

        image = (meta or {}).get("image")
        path = image[0] if isinstance(image, list) and image else image
        if not isinstance(path, str):
            raise ValueError(f"source_ssim: sample {i} has no source image: its prompt record needs \"image\": \"path.png\" "
                             f"(an editing model's JSONL prompt file), got metadata {meta!r}")
        return load_image(path, where=f"source_ssim: sample {i}")

    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None) -> RewardOutput:
        """Score ``B`` edits against their source images; scores ``[B]`` on ``media``'s device."""
        media = check_media(media, "image")
        metadata = metadata if metadata is not None else [None] * media.shape[0]
        if len(metadata) != media.shape[0]:
            raise ValueError(f"source_ssim: {media.shape[0]} images but {len(metadata)} metadata records")
        h, w = media.shape[-2:]
        sources = torch.stack([_resize(self._source(m, i), h, w) for i, m in enumerate(metadata)]).to(media.device)
        score = ssim(media.float(), sources, self.window, self.sigma)
        return RewardOutput(scores=score, components={"ssim": score})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window}, sigma={self.sigma})"
