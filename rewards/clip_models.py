"""Shared pieces of the CLIP-family rewards (PickScore, CLIP score, LAION aesthetic, HPSv2).

* :func:`clip_pixel_values` -- the CLIP image preprocessing on PIL images: resize the shortest
  side to ``size`` (PIL bicubic), center-crop ``crop_size``, ``/255``, normalise. This is what
  transformers' ``CLIPImageProcessor`` (PIL backend; used by PickScore ``demo``, DDPO's
  ``aesthetic_scorer.py``, Flow-GRPO's ``pickscore_scorer.py``) and OpenAI ``clip`` / open_clip
  (torchvision ``Resize(size, BICUBIC)``, ``CenterCrop``, ``ToTensor``, ``Normalize``;
  ``open_clip/transform.py``) do; they differ only in the crop offset when the excess is odd
  (``ImageSpec.crop_rounding``). Done here rather than by the processor so the result does not
  depend on whether torchvision is installed (transformers 5 then switches to a tensor backend).
* :func:`load_clip_tokenizer` / :func:`tokenize` -- CLIP BPE tokenizer, 77 tokens, with the
  empty-vocabulary check transformers 5 needs offline.
* :func:`image_embeds` / :func:`text_embeds` -- projected (unnormalised) CLIP features.
* ``write_tiny_*`` -- tiny random checkpoints in the hub layout, used ONLY by tests and ``tiny()``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ._media import to_pil_images

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ImageSpec", "clip_pixel_values", "load_clip_tokenizer", "tokenize",
           "image_embeds", "text_embeds", "ClipFeatures", "resolve_file", "load_clip_model", "write_tiny_tokenizer",
           "write_tiny_clip"]

# OpenAI CLIP normalisation (openai/CLIP clip/clip.py `_transform`; open_clip/constants.py OPENAI_DATASET_*).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT_LENGTH = 77  # CLIP text context (openai/CLIP model.py, open_clip ViT-H-14.json)


@dataclass(frozen=True)
class ImageSpec:
    """CLIP image preprocessing constants.

    Attributes:
        size: shortest side after the bicubic resize.
        crop_size: side of the square center crop (``<= size``).
        mean, std: per-channel normalisation of the ``[0, 1]`` pixels.
        crop_rounding: ``"floor"`` -- crop offset ``(h - c) // 2`` (transformers ``center_crop``);
            ``"round"`` -- ``int(round((h - c) / 2))`` (torchvision ``CenterCrop``: openai clip, open_clip).
    """

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    crop_rounding: str = "floor"

    def __post_init__(self) -> None:
        if not (isinstance(self.size, int) and isinstance(self.crop_size, int) and 0 < self.crop_size <= self.size):
            raise ValueError(f"ImageSpec: need ints 0 < crop_size <= size, got size={self.size!r}, crop_size={self.crop_size!r}")
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(f"ImageSpec.crop_rounding must be 'floor' or 'round', got {self.crop_rounding!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"ImageSpec: mean/std must be 3 values with std > 0, got mean={self.mean}, std={self.std}")

    @classmethod
    def from_pretrained(cls, path: str) -> "ImageSpec":
        """Read the constants of a hub / local ``CLIPImageProcessor`` config (``preprocessor_config.json``)."""
        from transformers import CLIPImageProcessor

        proc = CLIPImageProcessor.from_pretrained(path)
        resample = int(getattr(proc.resample, "value", proc.resample))
        if not (proc.do_resize and proc.do_center_crop and proc.do_rescale and proc.do_normalize) or resample != 3:
            raise ValueError(f"image processor at {path!r} is not a standard CLIP one (bicubic resize, center crop, "
                             f"rescale, normalize): {proc.to_dict()}")
        if abs(float(proc.rescale_factor) - 1 / 255) > 1e-9:
            raise ValueError(f"image processor at {path!r}: rescale_factor must be 1/255, got {proc.rescale_factor}")
        size, crop = proc.size, proc.crop_size
        return cls(size=int(size["shortest_edge"]), crop_size=int(crop["height"]), mean=tuple(proc.image_mean),
                   std=tuple(proc.image_std))


def _preprocess_one(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One RGB PIL image -> ``[3, crop, crop]`` float32 normalised pixels."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.size, int(spec.size * long / short)  # both libraries truncate the long side
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    c = spec.crop_size
    if spec.crop_rounding == "floor":
        top, left = (new_h - c) // 2, (new_w - c) // 2
    else:
        top, left = int(round((new_h - c) / 2.0)), int(round((new_w - c) / 2.0))
    pixels = np.asarray(image, dtype=np.float32)[top:top + c, left:left + c] / np.float32(255.0)
    pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return pixels.transpose(2, 0, 1)


def clip_pixel_values(media: Tensor, spec: ImageSpec) -> Tensor:
    """CLIP preprocessing of an image batch.

    Args:
        media: ``[B, 3, H, W]`` float in [0, 1] (quantised to uint8 like every reward, ``_media``).
        spec: the model's :class:`ImageSpec`.

    Returns:
        ``[B, 3, crop, crop]`` float32 (CPU).
    """
    return torch.from_numpy(np.stack([_preprocess_one(im, spec) for im in to_pil_images(media)]))


def load_clip_tokenizer(path: str):
    """``CLIPTokenizer.from_pretrained(path)``; raises if the vocabulary is empty (transformers 5 offline)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(path)
    if len(tokenizer) <= 3:
        raise ValueError(f"CLIP tokenizer at {path!r} has only {len(tokenizer)} tokens: vocab.json / merges.txt were "
                         "not found (offline without a local copy?)")
    return tokenizer


def tokenize(tokenizer, prompts: list[str], max_length: int = CONTEXT_LENGTH) -> dict[str, Tensor]:
    """``input_ids`` / ``attention_mask`` ``[B, max_length]``, padded and truncated to 77 tokens.

    PickScore pads to the longest prompt; with CLIP's causal text mask the pooled EOS feature is the
    same, and fixed-length padding keeps scores exactly batch-size invariant.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of strings, got {prompts!r:.200}")
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def image_embeds(model, pixel_values: Tensor) -> Tensor:
    """``[B, 3, S, S]`` -> ``[B, D]`` projected CLIP image features (``get_image_features``, unnormalised)."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


def text_embeds(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``[B, L]`` tokens -> ``[B, D]`` projected CLIP text features (``get_text_features``, unnormalised)."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)


def load_clip_model(path: str, device: torch.device, dtype: str = "float32"):
    """``CLIPModel.from_pretrained(path)`` in eval mode, frozen, on ``device``."""
    from transformers import CLIPModel

    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    model = CLIPModel.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval().requires_grad_(False)


class ClipFeatures:
    """A frozen ``CLIPModel`` with its tokenizer and :class:`ImageSpec`: L2-normalised features.

    Args:
        model: a transformers ``CLIPModel`` (eval, on ``device``).
        tokenizer: its CLIP tokenizer.
        spec: its image preprocessing.
        device: where the model runs.
        batch_size: rows per forward pass (memory bound; results do not depend on it).
    """

    def __init__(self, model, tokenizer, spec: ImageSpec, device: torch.device, batch_size: int = 16):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model, self.tokenizer, self.spec, self.device, self.batch_size = model, tokenizer, spec, device, batch_size
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def from_pretrained(cls, path: str, processor_path: str | None = None, device: str = "cpu",
                        dtype: str = "float32", batch_size: int = 16) -> "ClipFeatures":
        """Model from ``path``; tokenizer and image constants from ``processor_path`` (default ``path``)."""
        device_ = torch.device(device)
        processor_path = processor_path or path
        return cls(load_clip_model(path, device_, dtype), load_clip_tokenizer(processor_path),
                   ImageSpec.from_pretrained(processor_path), device_, batch_size)

    @torch.no_grad()
    def images(self, media: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, D]`` float32 unit-norm image features (on ``device``)."""
        pixels = clip_pixel_values(media, self.spec)
        out = [image_embeds(self.model, chunk.to(self.device, self.dtype)).float()
               for chunk in pixels.split(self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> Tensor:
        """``B`` prompts -> ``[B, D]`` float32 unit-norm text features (on ``device``)."""
        enc = tokenize(self.tokenizer, prompts, min(CONTEXT_LENGTH, self.model.config.text_config.max_position_embeddings))
        out = [text_embeds(self.model, ids.to(self.device), mask.to(self.device)).float()
               for ids, mask in zip(enc["input_ids"].split(self.batch_size), enc["attention_mask"].split(self.batch_size))]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def check(self, media: Tensor, prompts) -> None:
        """Raise if ``media`` is not an image batch or ``prompts`` does not have one prompt per image."""
        if not isinstance(media, Tensor) or media.ndim != 4:
            raise ValueError(f"media must be an image batch [B, 3, H, W], got shape {tuple(getattr(media, 'shape', ()))}")
        if prompts is None or len(prompts) != media.shape[0]:
            raise ValueError(f"got {media.shape[0]} images but {None if prompts is None else len(prompts)} prompts")


def resolve_file(path: str, filename: str) -> str:
    """A local file, ``filename`` inside a local directory, or ``filename`` of hub repo ``path``."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a file, a directory or a hub repo id, got {path!r}")
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"{filename!r} not found in directory {path!r}")
        return candidate
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=path, filename=filename)
    except Exception as err:
        raise FileNotFoundError(f"could not find {filename!r} as a local path or in hub repo {path!r}: {err}") from err


# ----------------------------------------------------------------------------------------------
# Tiny random checkpoints for tests (hub layout: vocab.json + merges.txt, config.json + weights).

def _byte_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable character table (openai/CLIP simple_tokenizer.bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]  # in CLIP's vocab.json order: "!" is id 0


def write_tiny_tokenizer(directory: str, pad_token: str = "!") -> int:
    """Write a byte-level CLIP BPE vocabulary (``vocab.json``, ``merges.txt``) and return its size.

    256 byte symbols, the same with ``</w>``, a few merges, then ``<|startoftext|>`` and
    ``<|endoftext|>`` last (EOS has the highest id, as in CLIP). ``pad_token="!"`` (id 0) as in the
    LAION ViT-H-14 tokenizer (open_clip pads with 0).
    """
    os.makedirs(directory, exist_ok=True)
    chars = _byte_unicode()
    merges = [("a", "b"), ("c", "a"), ("p", "h"), ("o", "t</w>"), ("ab", "c</w>")]
    vocab = chars + [c + "</w>" for c in chars] + ["ab", "ca", "ph", "ot</w>", "abc</w>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH, "pad_token": pad_token}, f)
    return len(vocab)


def tiny_clip_config(vocab_size: int, image_size: int = 32, hidden_act: str = "quick_gelu", projection_dim: int = 16):
    """A tiny ``CLIPConfig`` (2 layers, width 32/48) with EOS = the last vocabulary id."""
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH, hidden_act=hidden_act,
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8, hidden_act=hidden_act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def write_tiny_clip(directory: str, seed: int = 0, hidden_act: str = "quick_gelu", image_size: int = 32):
    """Save a random tiny ``CLIPModel`` (+ tokenizer and ``preprocessor_config.json``) to ``directory``.

    Returns the in-memory model (eval mode) for comparison with what loads back.
    """
    from transformers import CLIPImageProcessor, CLIPModel

    os.makedirs(directory, exist_ok=True)
    vocab_size = write_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(vocab_size, image_size=image_size, hidden_act=hidden_act)).eval()
    with torch.no_grad():  # a non-default temperature, so a wrong logit_scale use shows
        model.logit_scale.fill_(3.0)
    model.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return model
