"""Writing generated videos to disk: always an animated GIF (PIL, no extra dependency), plus an
H.264 MP4 when the optional ``video`` extra (``imageio[ffmpeg]``) is installed.

Frames are float tensors ``[F, 3, H, W]`` in [0, 1] (what video adapters' ``decode`` returns per
sample); :func:`save_video_grid` tiles several ``[N, F, 3, H, W]`` rows side by side, frame by frame.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch import Tensor

SUFFIXES = (".gif", ".mp4")


def mp4_available() -> bool:
    """Whether ``imageio`` with its ffmpeg plugin is importable (the ``video`` extra)."""
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _check_frames(frames: Tensor, name: str = "frames") -> Tensor:
    if not isinstance(frames, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [F, 3, H, W], got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"{name} must have shape [F, 3, H, W] with F >= 1, got {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got dtype {frames.dtype}")
    if not torch.isfinite(frames).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = frames.min().item(), frames.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{name} values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return frames


def to_uint8_frames(frames: Tensor) -> np.ndarray:
    """``[F, 3, H, W]`` floats in [0, 1] -> ``[F, H, W, 3]`` uint8 (round to nearest)."""
    frames = _check_frames(frames)
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad ``[F, H, W, 3]`` by replicating the last row / column so H and W are even
    (H.264 with yuv420p chroma subsampling needs even sizes)."""
    h, w = frames.shape[1:3]
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def save_video(path: str, frames: Tensor, fps: float = 8.0) -> list[str]:
    """Save one video as ``<stem>.gif`` and, when the ``video`` extra is installed, ``<stem>.mp4``.

    Args:
        path: output file; its suffix (``.gif`` / ``.mp4`` / none) only chooses the stem.
        frames: ``[F, 3, H, W]`` float in [0, 1].
        fps: frames per second (> 0). GIF stores frame durations in 1/100 s, so the GIF plays at
            ``100 / round(100 / fps)`` fps.

    Returns:
        The written paths (GIF first).
    """
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    stem, suffix = os.path.splitext(os.fspath(path))
    if suffix and suffix.lower() not in SUFFIXES:
        raise ValueError(f"path {path!r}: unsupported video suffix {suffix!r}; use one of {SUFFIXES} (or none)")
    array = to_uint8_frames(frames)
    if os.path.dirname(stem):
        os.makedirs(os.path.dirname(stem), exist_ok=True)
    written = [stem + ".gif"]
    images = [Image.fromarray(frame) for frame in array]
    images[0].save(written[0], save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, disposal=1)
    if mp4_available():
        import imageio.v2 as imageio

        written.append(stem + ".mp4")
        imageio.mimwrite(written[1], list(pad_to_even(array)), fps=fps, codec="libx264", pixelformat="yuv420p",
                         macro_block_size=1, quality=8)
    return written


def tile_video_grid(rows: list[Tensor], pad: int = 2, background: float = 1.0) -> Tensor:
    """Tile videos frame by frame: row ``r``, column ``c`` of the result shows ``rows[r][c]``.

    Args:
        rows: one ``[N, F, 3, H, W]`` tensor in [0, 1] per grid row (same N, F, H, W in all rows).
        pad: pixels of ``background`` between and around cells.

    Returns:
        ``[F, 3, R * (H + pad) + pad, N * (W + pad) + pad]``; cell ``(r, c)`` starts at pixel
        ``(pad + r * (H + pad), pad + c * (W + pad))``.
    """
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError("rows must be a non-empty list of [N, F, 3, H, W] tensors")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    shape = None
    for i, row in enumerate(rows):
        if not isinstance(row, Tensor) or row.ndim != 5 or row.shape[2] != 3:
            got = tuple(row.shape) if isinstance(row, Tensor) else type(row).__name__
            raise ValueError(f"rows[{i}] must be a [N, F, 3, H, W] tensor, got {got}")
        if shape is not None and tuple(row.shape) != shape:
            raise ValueError(f"rows[{i}] has shape {tuple(row.shape)} but rows[0] has {shape}; all rows must match")
        shape = tuple(row.shape)
    n, f, _, h, w = shape
    canvas = torch.full((f, 3, len(rows) * (h + pad) + pad, n * (w + pad) + pad), float(background))
    for r, row in enumerate(rows):
        for c in range(n):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            canvas[:, :, top:top + h, left:left + w] = row[c].detach().float().cpu()
    return canvas


def save_video_grid(path: str, rows: list[Tensor], fps: float = 8.0, pad: int = 2, scale: int = 1) -> list[str]:
    """Save videos tiled side by side (see :func:`tile_video_grid`), e.g. one row per prompt with
    its "before" and "after" samples as columns; ``scale`` upsamples by nearest neighbour."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    grid = tile_video_grid(rows, pad=pad)
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return save_video(path, grid, fps=fps)
