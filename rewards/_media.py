"""The one media-conversion helper every reward shares (docs/ARCHITECTURE.md, "Rewards").

Pipeline adapters decode to float media in [0, 1]: images ``[B, 3, H, W]``, video
``[B, F, 3, H, W]``. Rewards that run on PIL images or uint8 arrays convert here, so every
reward quantizes the same way: ``uint8 = round(255 * x)`` (the convention of diffusers'
``numpy_to_pil`` and of the DDPO reward functions), and ``from_pil_images`` divides by 255,
so ``tensor -> PIL -> tensor`` is exact at uint8 precision.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["RANGE_TOLERANCE", "check_media", "to_pil_images", "from_pil_images", "to_uint8", "video_to_frames"]

#: Values this far outside [0, 1] are accepted (then clamped): decoders overshoot by float error.
RANGE_TOLERANCE = 1e-3

_MEDIA_NDIM = {"image": 4, "video": 5}
_MEDIA_LAYOUT = {"image": "[B, 3, H, W]", "video": "[B, F, 3, H, W]"}


def _check_values(media: Tensor, what: str) -> Tensor:
    """Check ``media`` is a floating tensor with finite values in [0, 1] (± tolerance); clamp it."""
    if not isinstance(media, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(media).__name__}")
    if not media.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor with values in [0, 1], got dtype {media.dtype}")
    if media.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(media.shape)})")
    finite = torch.isfinite(media)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{what} contains {bad} NaN/Inf value(s) (shape {tuple(media.shape)})")
    lo, hi = float(media.min()), float(media.max())
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        hint = " (it looks like [-1, 1]: map it with (x + 1) / 2)" if lo < -0.5 else ""
        raise ValueError(f"{what} must have values in [0, 1], got range [{lo:.4g}, {hi:.4g}]{hint}")
    return media.clamp(0.0, 1.0)


def check_media(media: Tensor, modality: str) -> Tensor:
    """Validate decoded media and return it clamped to [0, 1].

    Args:
        media: ``[B, 3, H, W]`` (``modality="image"``) or ``[B, F, 3, H, W]`` (``"video"``),
            floating point, values in [0, 1]; values within ``RANGE_TOLERANCE`` outside are clamped.
        modality: ``"image"`` or ``"video"``.

    Returns:
        The same-shaped tensor, clamped to [0, 1].

    Raises:
        ValueError: naming the wrong modality, shape, dtype, range or non-finite values.
    """
    if modality not in _MEDIA_NDIM:
        raise ValueError(f"check_media: modality must be one of {sorted(_MEDIA_NDIM)}, got {modality!r}")
    if not isinstance(media, Tensor):
        raise TypeError(f"{modality} media must be a torch.Tensor, got {type(media).__name__}")
    layout = _MEDIA_LAYOUT[modality]
    if media.ndim != _MEDIA_NDIM[modality] or media.shape[-3] != 3:
        raise ValueError(f"{modality} media must have shape {layout} (3 = RGB channels), got shape {tuple(media.shape)}")
    return _check_values(media, f"{modality} media {layout}")


def to_uint8(media: Tensor) -> np.ndarray:
    """Quantize float media to channels-last uint8.

    Args:
        media: ``[B, ..., 3, H, W]`` float in [0, 1] (± tolerance).

    Returns:
        ``[B, ..., H, W, 3]`` uint8 numpy array, ``round(255 * x)``.
    """
    if isinstance(media, Tensor) and (media.ndim < 3 or media.shape[-3] != 3):
        raise ValueError(f"to_uint8: media must have shape [B, ..., 3, H, W], got shape {tuple(media.shape)}")
    media = _check_values(media, "to_uint8 media [B, ..., 3, H, W]")
    quantized = (media.detach().float() * 255.0).round().to(torch.uint8)
    return quantized.movedim(-3, -1).cpu().numpy()


def to_pil_images(media: Tensor) -> list[Image.Image]:
    """Convert an image batch to RGB PIL images.

    Args:
        media: ``[B, 3, H, W]`` float in [0, 1].

    Returns:
        ``B`` RGB images of size ``W x H``.
    """
    arrays = to_uint8(check_media(media, "image"))
    return [Image.fromarray(a) for a in arrays]  # uint8 [H, W, 3] -> mode "RGB"


def from_pil_images(images: list[Image.Image], size: tuple[int, int] | None = None) -> Tensor:
    """Convert PIL images to a float image batch.

    Args:
        images: non-empty list of PIL images (any mode; converted to RGB).
        size: optional ``(height, width)`` to resize every image to (bicubic) -- the tensor
            convention, *not* PIL's ``(width, height)``. Without it all images must share a size.

    Returns:
        ``[B, 3, H, W]`` float32 in [0, 1] (``uint8 / 255``).
    """
    if isinstance(images, Image.Image) or not isinstance(images, (list, tuple)):
        raise TypeError(f"from_pil_images: images must be a list of PIL images, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("from_pil_images: images is empty")
    if size is not None:
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ValueError(f"from_pil_images: size must be (height, width) positive ints, got {size!r}")
    arrays = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"from_pil_images: images[{i}] is a {type(image).__name__}, not a PIL image")
        image = image.convert("RGB")
        if size is not None and (image.height, image.width) != tuple(size):
            image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        sizes = sorted({(s[0], s[1]) for s in shapes})
        raise ValueError(f"from_pil_images: images have different sizes (height, width) {sizes}; pass size=(H, W)")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.float().div_(255.0).contiguous()


def video_to_frames(media: Tensor) -> tuple[Tensor, int]:
    """Flatten a video batch into frames for per-frame image rewards.

    Args:
        media: ``[B, F, 3, H, W]`` float in [0, 1].

    Returns:
        ``([B * F, 3, H, W], F)``; frames of video ``b`` are rows ``b * F : (b + 1) * F``, so
        ``frames.view(B, F, ...)`` undoes it.
    """
    media = check_media(media, "video")
    b, f = media.shape[:2]
    return media.reshape(b * f, *media.shape[2:]), int(f)
