"""The reward-server wire format (protocol version 1), shared by :mod:`flowalign.rewards.reward_server`
and the client :mod:`flowalign.rewards.remote`: constants, errors, and media <-> base64 PNG.
See :mod:`flowalign.rewards.remote` for the protocol description.

Decoding (:func:`decode_media`) is two-phase so that untrusted input cannot make it allocate much:
first every entry is base64-decoded and its PNG header (signature + IHDR chunk, CRC checked) is read
for the width and height -- no pixel is decompressed -- and the per-image and per-request pixel
budgets are checked; only then are the images decompressed, one at a time, into one preallocated
``uint8`` buffer (about 15 bytes per pixel at the peak, float32 result included).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ._media import check_media, to_uint8

PROTOCOL_VERSION = 1
TOKEN_ENV = "FLOWALIGN_REWARD_TOKEN"  # token source when none is passed (client and serve_from_config)
MEDIA_MODALITIES = ("image", "video")
_PAYLOAD_KEYS = {"media", "prompts", "metadata"}

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # 16.8 MP: one image (or video frame)
DEFAULT_MAX_REQUEST_PIXELS = 64 * 2**20  # 67.1 MP: all images / frames of one request together


class RemoteRewardError(RuntimeError):
    """A remote reward call failed; ``status`` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteRewardTimeout(RemoteRewardError):
    """The reward server did not answer within the timeout, on every attempt."""


class PayloadError(ValueError):
    """A malformed request (answered with HTTP 400 and this message)."""


class PayloadTooLarge(PayloadError):
    """A request over one of the server's size limits (answered with HTTP 413).

    ``details`` goes into the JSON answer next to ``error``: the limit's name (``"limit"``) and value
    and, for pixel budgets, the offending entry (``"where"``, e.g. ``"media[2]"``), its ``width`` and
    ``height``.
    """

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_OTHER_FORMATS = ((b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"),
                  (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"))
_PNG_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # by color type


def png_size(data: bytes, where: str = "image") -> tuple[int, int]:
    """``(width, height)`` of a PNG from its header bytes alone (nothing is decompressed).

    Checks the 8-byte signature and that the first chunk is a well-formed ``IHDR`` (length 13,
    CRC, non-zero size up to 2**31 - 1, a valid bit depth / color type / method combination).

    Raises:
        PayloadError: the bytes are another format (named when recognized) or a malformed PNG.
    """
    if not data.startswith(_PNG_SIGNATURE):
        kind = next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), None)
        if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            kind = "WEBP"
        if kind is not None:
            raise PayloadError(f"{where} is a {kind} image; only PNG is accepted")
        raise PayloadError(f"{where} is not a readable PNG: no PNG signature")
    if len(data) < 33:
        raise PayloadError(f"{where} is not a readable PNG: truncated header ({len(data)} bytes)")
    length, kind = struct.unpack(">I4s", data[8:16])
    if length != 13 or kind != b"IHDR":
        raise PayloadError(f"{where} is not a readable PNG: the first chunk is not a 13-byte IHDR")
    width, height, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise PayloadError(f"{where} is not a readable PNG: IHDR checksum mismatch")
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise PayloadError(f"{where} is not a readable PNG: invalid size {width}x{height}")
    if depth not in _PNG_BIT_DEPTHS.get(color, ()) or compression or filtering or interlace > 1:
        raise PayloadError(f"{where} is not a readable PNG: invalid IHDR (bit depth {depth}, color type {color}, "
                           f"compression {compression}, filter {filtering}, interlace {interlace})")
    return width, height


def _b64_bytes(item: Any, where: str) -> bytes:
    if not isinstance(item, str):
        raise PayloadError(f"{where} must be a base64 PNG string, got {type(item).__name__}")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as err:
        raise PayloadError(f"{where} is not valid base64: {err}") from err


def _decode_png_into(out: np.ndarray, data: bytes, size: tuple[int, int], where: str, max_image_pixels: int | None) -> None:
    """Decompress one PNG whose header said ``size`` into ``out`` (``[H, W, 3]`` uint8)."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:  # reads the header only
            if image.size != size or (max_image_pixels is not None and image.width * image.height > max_image_pixels):
                raise PayloadError(f"{where}: PIL reads size {image.size}, the PNG header {size}")  # defense in depth
            image.load()
            out[...] = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    except PayloadError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own guard (Image.MAX_IMAGE_PIXELS), should we miss one
        raise PayloadTooLarge(f"{where}: {err}", limit="PIL.Image.MAX_IMAGE_PIXELS", where=where) from err
    except Exception as err:  # PIL raises many types for corrupt data
        raise PayloadError(f"{where} is not a readable PNG: {err}") from err


def decode_media(items: Any, modality: str, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 max_request_pixels: int | None = DEFAULT_MAX_REQUEST_PIXELS) -> Tensor:
    """Inverse of :func:`encode_media`: ``[B, 3, H, W]`` or ``[B, F, 3, H, W]`` float32 in [0, 1].

    Every PNG header is read and checked against the pixel budgets before any image is
    decompressed, so an oversized request costs no more memory than its own bytes.

    Args:
        items: ``B`` base64 PNGs (``"image"``) or ``B`` lists of ``F`` base64 PNGs (``"video"``).
        modality: ``"image"`` or ``"video"``.
        max_image_pixels: most pixels (width x height) of one image / frame; ``None``: no limit.
        max_request_pixels: most pixels of all images / frames together; ``None``: no limit.

    Raises:
        PayloadTooLarge: over a pixel budget, naming the budget and the offending ``media[i]`` /
            ``media[i][f]`` entry and its size.
        PayloadError: naming the offending entry (not base64, not a PNG, sizes that differ).
    """
    if not isinstance(items, list) or not items:
        raise PayloadError(f"'media' must be a non-empty list, got {type(items).__name__ if not isinstance(items, list) else 'an empty list'}")
    # phase 1: base64 and PNG headers only -- nothing is decompressed
    samples: list[list[tuple[str, Any]]] = []
    for i, item in enumerate(items):
        if modality == "image":
            samples.append([(f"media[{i}]", item)])
        elif not isinstance(item, list) or not item:
            raise PayloadError(f"media[{i}] must be a non-empty list of per-frame base64 PNGs for a video reward")
        else:
            samples.append([(f"media[{i}][{j}]", frame) for j, frame in enumerate(item)])
    total, headers = 0, []
    for sample in samples:
        row = []
        for where, item in sample:
            data = _b64_bytes(item, where)
            width, height = png_size(data, where)
            pixels = width * height
            if max_image_pixels is not None and pixels > max_image_pixels:
                raise PayloadTooLarge(
                    f"{where} is {width}x{height} = {pixels:,} pixels, over this server's max_image_pixels="
                    f"{max_image_pixels:,} per image (the PNG was not decoded)",
                    limit="max_image_pixels", max_image_pixels=max_image_pixels, where=where, width=width, height=height)
            total += pixels
            if max_request_pixels is not None and total > max_request_pixels:
                raise PayloadTooLarge(
                    f"the request's images add up to more than this server's max_request_pixels={max_request_pixels:,} "
                    f"at {where} ({width}x{height}; {total:,} pixels so far, nothing decoded); send fewer or smaller images",
                    limit="max_request_pixels", max_request_pixels=max_request_pixels, where=where, width=width,
                    height=height, pixels_so_far=total)
            row.append((where, data, (width, height)))
        headers.append(row)
    if modality == "image":
        sizes = sorted({(h, w) for row in headers for _, _, (w, h) in row})
        if len(sizes) > 1:
            raise PayloadError(f"images in 'media' have different sizes (height, width) {sizes}")
    else:
        for i, row in enumerate(headers):
            sizes = sorted({(h, w) for _, _, (w, h) in row})
            if len(sizes) > 1:
                raise PayloadError(f"frames of media[{i}] have different sizes (height, width) {sizes}")
        shapes = sorted({(len(row), 3, row[0][2][1], row[0][2][0]) for row in headers})
        if len(shapes) > 1:
            raise PayloadError(f"videos in 'media' differ in shape (frames, 3, H, W): {shapes}")
    # phase 2: decompress one image at a time into one uint8 buffer
    width, height = headers[0][0][2]
    frames = [entry for row in headers for entry in row]
    pixels = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for k, (where, data, size) in enumerate(frames):
        _decode_png_into(pixels[k], data, size, where, max_image_pixels)
    out = torch.empty((pixels.shape[0], 3, height, width), dtype=torch.float32)
    out.copy_(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    del pixels
    out.div_(255.0)
    if modality == "video":
        out = out.view(len(items), -1, 3, height, width)
    return out
