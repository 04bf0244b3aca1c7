"""Source images of image-editing prompt records (``{"prompt": ..., "image": "a.png" | ["a.png", "b.png"]}``).

Editing adapters (``source_images != 0`` in :class:`flowalign.pipelines.base.AdapterBase`) condition on
one (FLUX.1 Kontext, Qwen-Image-Edit) or several (Qwen-Image-Edit-Plus) images per prompt. The paths of a
prompt file's records are relative to the prompt file's folder; :func:`resolve_record_images` makes them
absolute once, so the rewards that receive ``"image"`` in their metadata (also remote ones) can open them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor

from flowalign.errors import ConfigError

_CACHE: dict[str, Tensor] = {}


def record_image_paths(record: dict[str, Any], *, source: str, where: str) -> list[str]:
    """The ``"image"`` entry of one prompt record as a non-empty list of absolute paths.

    Args:
        record: the prompt record.
        source: the prompt file the record came from (relative paths resolve against its folder).
        where: how errors name the record, e.g. ``"prompts.jsonl: record 3"`` or ``"data.train_prompts: a.jsonl:4"``.

    Raises:
        ConfigError: the record has no ``"image"`` key or it is not a path or a non-empty list of paths.
    """
    if "image" not in record:
        raise ConfigError(f"{where} has no \"image\": an image-editing model needs "
                          "{\"prompt\": ..., \"image\": \"path.png\"} records")
    image = record["image"]
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f"{where}: \"image\" must be a path or a non-empty list of paths, got {image!r}")
    folder = os.path.dirname(os.path.abspath(source))
    return [p if os.path.isabs(p) else os.path.join(folder, os.path.expanduser(p)) for p in paths]


def resolve_record_images(records: list[dict[str, Any]], *, source: str) -> list[dict[str, Any]]:
    """Copies of ``records`` whose ``"image"`` paths are absolute (a string stays a string, a list a list).

    Records without ``"image"`` are returned unchanged (text-only models ignore the key)."""
    out = []
    for i, record in enumerate(records):
        if "image" not in record:
            out.append(record)
            continue
        paths = record_image_paths(record, source=source, where=f"{source}: record {i}")
        out.append({**record, "image": paths[0] if isinstance(record["image"], str) else paths})
    return out


def load_image(path: str, *, where: str = "") -> Tensor:
    """One image file as a ``[3, H, W]`` float32 RGB tensor in [0, 1] (PIL ``.convert("RGB")``), cached per path.

    Raises:
        ConfigError: naming ``where`` and the path, when the file is missing or PIL cannot read it.
    """
    key = os.path.abspath(path)
    if key not in _CACHE:
        from PIL import Image, UnidentifiedImageError

        prefix = f"{where}: " if where else ""
        if not os.path.isfile(key):
            raise ConfigError(f"{prefix}source image not found: {path!r}")
        try:
            with Image.open(key) as im:
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ConfigError(f"{prefix}cannot read the source image {path!r}: {err}") from None
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        _CACHE[key] = data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float().div(255)
    return _CACHE[key]


def load_source_images(records: list[dict[str, Any]], *, source: str) -> list[list[Tensor]]:
    """Per record the list of its source images, each ``[3, H, W]`` float32 RGB in [0, 1].

    Args:
        records: prompt records with an ``"image"`` path or list of paths (relative to ``source``'s folder).
        source: the prompt file (or config key) the records came from, named in errors.

    Raises:
        ConfigError: naming the file, the record index and the path for a record without ``"image"``,
            a missing file, or one PIL cannot read.
    """
    paths = [record_image_paths(r, source=source, where=f"{source}: record {i}") for i, r in enumerate(records)]
    return [[load_image(p, where=f"{source}: record {i}") for p in per] for i, per in enumerate(paths)]


def check_image_records(path: str, key: str, source_images: int, model: str) -> None:
    """An editing model's prompt file must be JSONL whose every record names existing source image(s).

    Args:
        path: the prompt file.
        key: its config key (``data.train_prompts``, ``eval.prompts``), named in errors.
        source_images: the adapter's ``source_images`` (1: exactly one image per record; -1: one or more).
        model: the model name, for messages.

    Raises:
        ConfigError: naming ``key``, the file and the line of the first offending record.
    """
    from flowalign.config_files import read_text_file

    if not path.endswith(".jsonl"):
        raise ConfigError(f"{key}: {model} edits source images, so its prompt file must be JSONL with "
                          f"{{\"prompt\": ..., \"image\": \"path.png\"}} records; got {path!r}")
    for number, line in enumerate(read_text_file(path, key).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: {path}:{number} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{key}: {path}:{number} needs a \"prompt\" string")
        paths = record_image_paths(record, source=path, where=f"{key}: {path}:{number}")
        if source_images == 1 and len(paths) != 1:
            raise ConfigError(f"{key}: {path}:{number}: {model} edits exactly one source image per prompt, got {len(paths)}")
        for p in paths:
            if not os.path.isfile(p):
                raise ConfigError(f"{key}: {path}:{number}: source image not found: {p!r}")
