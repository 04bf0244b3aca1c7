"""The reward-server wire format (protocol version 1), shared by :mod:`flowalign.rewards.reward_server`
and the client :mod:`flowalign.rewards.remote`: constants, errors, and media <-> base64 PNG.
See :mod:`flowalign.rewards.remote` for the protocol description."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ._media import check_media, from_pil_images, to_uint8

PROTOCOL_VERSION = 1
TOKEN_ENV = "FLOWALIGN_REWARD_TOKEN"  # token source when none is passed (client and serve_from_config)
MEDIA_MODALITIES = ("image", "video")
_PAYLOAD_KEYS = {"media", "prompts", "metadata"}


class RemoteRewardError(RuntimeError):
    """A remote reward call failed; ``status`` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteRewardTimeout(RemoteRewardError):
    """The reward server did not answer within the timeout, on every attempt."""


class PayloadError(ValueError):
    """A malformed request (answered with HTTP 400 and this message)."""


# ------------------------------------------------------------------------------------------ media


def _png_b64(array: Any) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_media(media: Tensor, modality: str) -> list:
    """``[B, 3, H, W]`` -> ``B`` base64 PNGs, or ``[B, F, 3, H, W]`` -> ``B`` lists of ``F`` base64 PNGs."""
    arrays = to_uint8(check_media(media, modality))  # [B, (F,) H, W, 3] uint8
    if modality == "image":
        return [_png_b64(a) for a in arrays]
    return [[_png_b64(frame) for frame in video] for video in arrays]


def _decode_png(item: Any, where: str) -> Image.Image:
    if not isinstance(item, str):
        raise PayloadError(f"{where} must be a base64 PNG string, got {type(item).__name__}")
    try:
        data = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as err:
        raise PayloadError(f"{where} is not valid base64: {err}") from err
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "PNG":
            raise PayloadError(f"{where} is a {image.format} image; only PNG is accepted")
        image.load()
    except PayloadError:
        raise
    except Exception as err:  # PIL raises many types for corrupt data
        raise PayloadError(f"{where} is not a readable PNG: {err}") from err
    return image.convert("RGB")


def decode_media(items: Any, modality: str) -> Tensor:
    """Inverse of :func:`encode_media`: ``[B, 3, H, W]`` or ``[B, F, 3, H, W]`` float32 in [0, 1].

    Raises:
        PayloadError: naming the offending ``media[i]`` / ``media[i][f]`` entry.
    """
    if not isinstance(items, list) or not items:
        raise PayloadError(f"'media' must be a non-empty list, got {type(items).__name__ if not isinstance(items, list) else 'an empty list'}")
    try:
        if modality == "image":
            return from_pil_images([_decode_png(item, f"media[{i}]") for i, item in enumerate(items)])
        videos = []
        for i, frames in enumerate(items):
            if not isinstance(frames, list) or not frames:
                raise PayloadError(f"media[{i}] must be a non-empty list of per-frame base64 PNGs for a video reward")
            videos.append(from_pil_images([_decode_png(f, f"media[{i}][{j}]") for j, f in enumerate(frames)]))
        shapes = {tuple(v.shape) for v in videos}
        if len(shapes) > 1:
            raise PayloadError(f"videos in 'media' differ in shape (frames, 3, H, W): {sorted(shapes)}")
        return torch.stack(videos)
    except PayloadError:
        raise
    except ValueError as err:  # from_pil_images: frames / images of different sizes
        raise PayloadError(str(err)) from err
