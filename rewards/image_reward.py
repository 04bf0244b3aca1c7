"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation") loaded from the released ``ImageReward.pt`` into transformers' BLIP classes.

The released model (THUDM/ImageReward, ``ImageReward/ImageReward.py``) is a BLIP ViT image encoder,
a BERT text encoder with cross-attention to the image tokens (BLIP ``med.py``), and an MLP on the
text ``[CLS]`` feature; the raw output is standardised with the released mean / std. The
``image-reward`` package cannot be a dependency (it pins transformers<5 and imports undeclared packages), so the checkpoint's keys are mapped
onto :class:`BlipVisionModel` / :class:`BlipTextModel` by :func:`original_to_hf_key` (and back by
:func:`hf_to_original_key`, which the tests use to write a checkpoint in the released layout).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from ._media import check_media, to_pil_images
from .clip_models import resolve_file
from .base import RewardOutput

__all__ = ["ImageReward", "original_to_hf_key", "hf_to_original_key", "preprocess_images"]

CHECKPOINT_NAME = "ImageReward.pt"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward/ImageReward.py: self.mean / self.std
IMAGE_SIZE = 224  # ImageReward.py: BLIP_Pretrain(image_size=224, vit='large'), _transform(224)
MAX_LENGTH = 35  # ImageReward.py score(): tokenizer(..., padding='max_length', truncation=True, max_length=35)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # ImageReward.py _transform: Normalize(...)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_DIM = 64  # BLIP ViT-B/L and BERT-base all use 64-dim heads: heads = width // 64
# BLIP vit.py: norm_layer=partial(nn.LayerNorm, eps=1e-6); med_config.json (BERT): layer_norm_eps 1e-12.
VISION_EPS, TEXT_EPS = 1e-6, 1e-12

# (released BLIP ViT name, transformers BlipVisionModel name); "{i}" is the block index.
_VISION_RULES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{i}.norm1.", "encoder.layers.{i}.layer_norm1."),
    ("blocks.{i}.attn.qkv.", "encoder.layers.{i}.self_attn.qkv."),
    ("blocks.{i}.attn.proj.", "encoder.layers.{i}.self_attn.projection."),
    ("blocks.{i}.norm2.", "encoder.layers.{i}.layer_norm2."),
    ("blocks.{i}.mlp.", "encoder.layers.{i}.mlp."),
    ("norm.", "post_layernorm."),
]
_PREFIXES = {"vision": "blip.visual_encoder.", "text": "blip.text_encoder.", "mlp": "mlp."}


def _rule_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


def _apply_rules(key: str, rules: list[tuple[str, str]]) -> str | None:
    for src, dst in rules:
        match = _rule_regex(src).match(key)
        if match:
            head = dst.replace("{i}", match.group(1)) if match.groups() else dst
            return head + key[match.end():]
    return None


def original_to_hf_key(key: str) -> tuple[str, str] | None:
    """Map a released ``ImageReward.pt`` key to ``(part, transformers key)``, part in vision|text|mlp.

    Returns ``None`` for keys the score does not use (BLIP's ``vision_proj`` / ``text_proj`` /
    momentum encoders, the ``position_ids`` buffer). The BLIP ``med.py`` text encoder and
    transformers' ``BlipTextModel`` share parameter names, so the text map only strips the prefix.
    """
    if key.endswith("position_ids"):
        return None
    for part, prefix in _PREFIXES.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if part != "vision":
                return part, rest
            mapped = _apply_rules(rest, _VISION_RULES)
            if mapped is None:
                raise KeyError(f"ImageReward checkpoint: unknown visual-encoder key {key!r}")
            return part, mapped
    return None


def hf_to_original_key(part: str, key: str) -> str:
    """Inverse of :func:`original_to_hf_key` (writes checkpoints in the released layout)."""
    if part not in _PREFIXES:
        raise ValueError(f"hf_to_original_key: part must be one of {sorted(_PREFIXES)}, got {part!r}")
    if part != "vision":
        return _PREFIXES[part] + key
    mapped = _apply_rules(key, [(dst, src) for src, dst in _VISION_RULES])
    if mapped is None:
        raise KeyError(f"hf_to_original_key: unknown BlipVisionModel key {key!r}")
    return _PREFIXES[part] + mapped


def preprocess_images(images: list[Image.Image], size: int = IMAGE_SIZE) -> Tensor:
    """ImageReward's ``_transform(224)``: Resize(shorter side, BICUBIC), CenterCrop, ToTensor, Normalize.

    Same arithmetic as torchvision's ``Resize(int)`` (long side ``int(size * long / short)``) and
    ``CenterCrop`` (offset ``round((h - size) / 2)``). Returns ``[B, 3, size, size]`` float32.
    """
    out = []
    for image in images:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size)).convert("RGB")
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
        out.append(x.permute(2, 0, 1).float() / 255.0)
    batch = torch.stack(out)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


class _MLP(nn.Module):
    """The released head's module layout (``mlp.layers.<i>``)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def _mlp_from_state(state: dict[str, Tensor]) -> _MLP:
    """ImageReward.py ``MLP``: Linear/Dropout stack *without* activations (its ReLUs are commented out)."""
    idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
    if not idx:
        raise KeyError("ImageReward checkpoint has no 'mlp.layers.*' weights")
    layers: list[nn.Module] = []
    for i in range(idx[-1] + 1):
        w = state.get(f"layers.{i}.weight")
        layers.append(nn.Linear(w.shape[1], w.shape[0]) if w is not None else nn.Dropout(0.0))
    return _MLP(layers)


def _split_checkpoint(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    parts: dict[str, dict[str, Tensor]] = {p: {} for p in _PREFIXES}
    for key, value in state.items():
        mapped = original_to_hf_key(key)
        if mapped is not None:
            parts[mapped[0]][mapped[1]] = value
    for part, prefix in _PREFIXES.items():
        if not parts[part]:
            raise KeyError(f"ImageReward checkpoint has no '{prefix}*' weights; is it an ImageReward.pt?")
    return parts


class ImageReward:
    """ImageReward score: ``(MLP(BERT_x-attn(prompt, BLIP-ViT(image))[CLS]) - mean) / std``.

    ``__call__(media [B, 3, H, W] in [0, 1], prompts, metadata) -> RewardOutput`` with ``scores [B]``
    (standardised, as ``ImageReward.score``) and ``components {"raw": [B]}`` (the MLP output).

    Args:
        path: directory holding ``ImageReward.pt``, the file itself, or a hub id ("THUDM/ImageReward").
        tokenizer: BERT tokenizer path / hub id; default: the checkpoint directory when it holds one,
            else "bert-base-uncased" (BLIP ``init_tokenizer``), plus BLIP's ``[DEC]`` / ``[ENC]`` tokens.
        device, dtype: where / in which precision the model runs.
        batch_size: images per forward pass.
    """

    name = "image_reward"
    modality = "image"

    def __init__(self, path: str = "THUDM/ImageReward", tokenizer: str | None = None, device: str = "cpu",
                 dtype: torch.dtype | str = torch.float32, batch_size: int = 16) -> None:
        from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ImageReward: batch_size must be a positive int, got {batch_size!r}")
        self.device, self.batch_size = torch.device(device), batch_size
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        file = resolve_file(path, CHECKPOINT_NAME)  # a file, a folder holding it, or a hub id such as THUDM/ImageReward
        self.checkpoint = file
        state = torch.load(file, map_location="cpu", weights_only=True)
        parts = _split_checkpoint(state)
        vis, txt = parts["vision"], parts["text"]
        hidden, patch = vis["embeddings.class_embedding"].shape[-1], vis["embeddings.patch_embedding.weight"].shape[-1]
        n_blocks = 1 + max(int(k.split(".")[2]) for k in vis if k.startswith("encoder.layers."))
        vision_cfg = BlipVisionConfig(
            hidden_size=hidden, intermediate_size=vis["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=n_blocks, num_attention_heads=hidden // HEAD_DIM, patch_size=patch,
            image_size=patch * math.isqrt(vis["embeddings.position_embedding"].shape[1] - 1),
            layer_norm_eps=VISION_EPS, hidden_act="gelu")
        vocab, width = txt["embeddings.word_embeddings.weight"].shape
        text_cfg = BlipTextConfig(
            vocab_size=vocab, hidden_size=width, num_attention_heads=width // HEAD_DIM,
            num_hidden_layers=1 + max(int(k.split(".")[2]) for k in txt if k.startswith("encoder.layer.")),
            intermediate_size=txt["encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=txt["embeddings.position_embeddings.weight"].shape[0],
            encoder_hidden_size=txt["encoder.layer.0.crossattention.self.key.weight"].shape[1],
            layer_norm_eps=TEXT_EPS, hidden_act="gelu", is_decoder=True, pad_token_id=0,
            bos_token_id=None, sep_token_id=None)  # generation-only ids; unused by the encoder
        self.vision = BlipVisionModel(vision_cfg)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.mlp = _mlp_from_state(parts["mlp"])
        for module, part in ((self.vision, vis), (self.text, txt), (self.mlp, parts["mlp"])):
            module.load_state_dict(part, strict=True)
            module.to(self.device, dtype).eval().requires_grad_(False)
        self.mlp.float()  # ImageReward.py: txt_features.float() before the MLP
        if tokenizer is None:
            folder = os.path.dirname(file)
            has_tok = any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer_config.json", "vocab.txt"))
            tokenizer = folder if has_tok else "bert-base-uncased"
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        # BLIP blip.py init_tokenizer: add_special_tokens({'bos_token': '[DEC]'}), then '[ENC]'.
        if "[DEC]" not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        if "[ENC]" not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        if len(self.tokenizer) != vocab:
            raise ValueError(f"ImageReward: tokenizer {tokenizer!r} has {len(self.tokenizer)} tokens but the checkpoint "
                             f"{file!r} embeds {vocab} (an empty or wrong vocabulary; offline hub lookups can do this)")

    @torch.no_grad()
    def raw_scores(self, pixel_values: Tensor, prompts: Sequence[str]) -> Tensor:
        """MLP output ``[B]`` for preprocessed ``pixel_values [B, 3, 224, 224]`` (ImageReward.py ``score``)."""
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt").to(self.device)
        dtype = self.vision.embeddings.patch_embedding.weight.dtype
        image_embeds = self.vision(pixel_values=pixel_values.to(self.device, dtype)).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts)
        return self.mlp(out.last_hidden_state[:, 0, :].float()).squeeze(-1)

    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """Score ``B`` images against their prompts; returns scores ``[B]`` on ``media``'s device."""
        media = check_media(media, "image")
        if len(prompts) != media.shape[0]:
            raise ValueError(f"ImageReward: got {len(prompts)} prompts for {media.shape[0]} images")
        pixels = preprocess_images(to_pil_images(media))
        raw = torch.cat([self.raw_scores(pixels[i:i + self.batch_size], prompts[i:i + self.batch_size])
                         for i in range(0, len(prompts), self.batch_size)]).float()
        scores = (raw - REWARD_MEAN) / REWARD_STD  # ImageReward.py: (rewards - self.mean) / self.std
        return RewardOutput(scores=scores.to(media.device), components={"raw": raw.to(media.device)})

    def original_state_dict(self) -> dict[str, Tensor]:
        """The weights in the released ``ImageReward.pt`` key layout (inverse key map)."""
        parts = {"vision": self.vision, "text": self.text, "mlp": self.mlp}
        return {hf_to_original_key(p, k): v.detach().cpu().clone() for p, m in parts.items()
                for k, v in m.state_dict().items()}

    @classmethod
    def tiny(cls, tmp_dir: str, seed: int = 0, **kwargs: Any) -> "ImageReward":
        """Tests only: a random tiny BLIP + MLP saved as ``ImageReward.pt`` in the released layout, loaded back."""
        from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        os.makedirs(tmp_dir, exist_ok=True)
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "dog", "cat", "red", "blue", "two",
                 "on", "the", "and", "car"] + list("abcdefghijklmnopqrstuvwxyz") + ["##" + c for c in "sed"]
        tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})  # WordPiece, lower-cased like bert-base-uncased
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.save_pretrained(tmp_dir)
        torch.manual_seed(seed)
        vision = BlipVisionModel(BlipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                  num_attention_heads=2, patch_size=32, image_size=IMAGE_SIZE))
        text = BlipTextModel(BlipTextConfig(vocab_size=len(tok), hidden_size=128, num_attention_heads=2,
                                            num_hidden_layers=2, intermediate_size=256, max_position_embeddings=64,
                                            encoder_hidden_size=128, is_decoder=True,
                                            bos_token_id=None, sep_token_id=None), add_pooling_layer=False)
        sizes = [128, 64, 32, 16, 8, 1]  # the released MLP is 768-1024-128-64-16-1, Linear at 0, 2, 4, 6, 7
        mlp = _MLP([nn.Linear(sizes[0], sizes[1]), nn.Dropout(0.2), nn.Linear(sizes[1], sizes[2]),
                            nn.Dropout(0.2), nn.Linear(sizes[2], sizes[3]), nn.Dropout(0.1),
                            nn.Linear(sizes[3], sizes[4]), nn.Linear(sizes[4], sizes[5])])
        # perturb every tensor (LayerNorms init to 1/0 would hide a swapped norm1/norm2 in the key map)
        state = {hf_to_original_key(p, k): v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
                 for p, m in (("vision", vision), ("text", text), ("mlp", mlp)) for k, v in m.state_dict().items()}
        state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)  # released extras
        state["blip.vision_proj.weight"], state["blip.text_proj.weight"] = torch.randn(8, 128), torch.randn(8, 128)
        torch.save(state, os.path.join(tmp_dir, CHECKPOINT_NAME))
        return cls(tmp_dir, **kwargs)

    def __repr__(self) -> str:
        return f"ImageReward(device={str(self.device)!r}, batch_size={self.batch_size})"
