"""HPSv2 / HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"): an open_clip ViT-H/14 fine-tuned
on HPD v2 human preferences.

Score, as in ``tgxs002/HPSv2`` ``hpsv2/img_score.py``: ``diag(image_features @ text_features.T)``
with unit-norm open_clip features, i.e. ``cos(img, text)`` (no temperature; ~0.2-0.35).
Preprocessing is open_clip's eval transform (``open_clip/transform.py``: ``Resize(224, BICUBIC)``,
``CenterCrop(224)``, ``ToTensor``, ``Normalize(OPENAI mean/std)``); tokens from the BPE of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the same OpenAI vocabulary as open_clip's tokenizer).

open_clip cannot be a dependency here (it needs torchvision), so the released checkpoint
(``xswu/HPSv2``: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, ``{"state_dict": ...}`` in
open_clip's ``CLIP`` layout) is loaded into a transformers ``CLIPModel`` through
:func:`openclip_to_transformers`: the two architectures are the same pre-LN ViT / causal text
transformer (open_clip ``transformer.py`` vs transformers ``modeling_clip.py``); ``nn.MultiheadAttention``'s
packed ``in_proj`` splits into q/k/v, and the projections ``x @ proj`` become ``Linear`` weights ``proj.T``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import torch
from torch import Tensor

from ._media import check_media
from .base import RewardOutput
from .clip_models import ClipFeatures, ImageSpec, load_clip_tokenizer, resolve_file, write_tiny_clip

__all__ = ["openclip_to_transformers", "transformers_to_openclip", "config_from_openclip", "HPSv2", "HPSv21"]

_TOP = {  # open_clip name -> transformers CLIPModel name (same tensor)
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOWER = {"visual.": "vision_model.", "": "text_model."}
_OC_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)([._])(weight|bias)$")
_HF_BLOCK = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED = {"attn_mask", "visual.attn_mask"}  # causal-mask buffers of old open_clip versions


def openclip_to_transformers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an open_clip ``CLIP`` state dict (optionally ``module.``-prefixed) to ``CLIPModel`` names.

    Raises:
        ValueError: listing keys that have no counterpart (e.g. a non-CLIP or CoCa checkpoint).
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        block = _OC_BLOCK.match(key)
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()  # x @ proj == Linear(weight=proj.T)
        elif block:
            tower, index, name, sep, kind = block.groups()
            prefix = f"{_TOWER[tower or '']}encoder.layers.{index}."
            if name == "attn.in_proj" and sep == "_":  # nn.MultiheadAttention packs [q; k; v] along dim 0
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk.contiguous()
            elif name in _BLOCK and sep == ".":
                out[f"{prefix}{_BLOCK[name]}.{kind}"] = value
            else:
                unknown.append(key)
        elif key not in _IGNORED:
            unknown.append(key)
    if unknown:
        raise ValueError(f"open_clip state dict has keys with no transformers CLIP counterpart: {unknown[:10]}")
    return out


def transformers_to_openclip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`openclip_to_transformers` (``CLIPModel`` names -> open_clip ``CLIP`` names)."""
    top, block_names = {v: k for k, v in _TOP.items()}, {v: k for k, v in _BLOCK.items()}
    out, pending = {}, {}
    for key, value in state_dict.items():
        block = _HF_BLOCK.match(key)
        if key in top:
            out[top[key]] = value
        elif key in _TRANSPOSED.values():
            out[next(k for k, v in _TRANSPOSED.items() if v == key)] = value.t().contiguous()
        elif block:
            tower, index, name, kind = block.groups()
            prefix = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{index}."
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                pending.setdefault(f"{prefix}attn.in_proj_{kind}", {})[name[10]] = value
            elif name in block_names:
                out[f"{prefix}{block_names[name]}.{kind}"] = value
            else:
                raise ValueError(f"transformers CLIP key {key!r} has no open_clip counterpart")
        elif not key.endswith("position_ids"):
            raise ValueError(f"transformers CLIP key {key!r} has no open_clip counterpart")
    for key, parts in pending.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _layers(state_dict: dict[str, Tensor], prefix: str) -> int:
    found = {int(m.group(2)) for k in state_dict if (m := _HF_BLOCK.match(k)) and m.group(1) == prefix}
    if found != set(range(len(found))) or not found:
        raise ValueError(f"checkpoint has {prefix} layers {sorted(found)}; expected 0..N-1")
    return len(found)


def config_from_openclip(hf_state: dict[str, Tensor], vision_heads: int, text_heads: int, hidden_act: str,
                         tokenizer) -> Any:
    """A ``CLIPConfig`` read off the converted weights' shapes (heads and activation are not in them).

    ViT-H-14 (``open_clip/model_configs/ViT-H-14.json``): 16 vision heads (width 1280 / head_width 80),
    16 text heads, ``nn.GELU`` (not QuickGELU).
    """
    from transformers import CLIPConfig

    patch = hf_state["vision_model.embeddings.patch_embedding.weight"]
    grid = round((hf_state["vision_model.embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5)
    tokens = hf_state["text_model.embeddings.token_embedding.weight"]
    text = dict(vocab_size=tokens.shape[0], hidden_size=tokens.shape[1], num_attention_heads=text_heads,
                intermediate_size=hf_state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                num_hidden_layers=_layers(hf_state, "text_model"), hidden_act=hidden_act,
                max_position_embeddings=hf_state["text_model.embeddings.position_embedding.weight"].shape[0],
                eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=patch.shape[0], patch_size=patch.shape[-1], image_size=grid * patch.shape[-1],
                  intermediate_size=hf_state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=_layers(hf_state, "vision_model"), num_attention_heads=vision_heads,
                  hidden_act=hidden_act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=hf_state["visual_projection.weight"].shape[0])


class HPSv2:
    """HPSv2 reward: ``scores = cos(img, text)`` of the HPS-finetuned ViT-H/14.

    Args:
        path: the checkpoint file, a directory holding ``filename``, or a hub repo id (``xswu/HPSv2``).
        filename: checkpoint name in a directory / hub repo (default: this class's version).
        processor_path: the CLIP tokenizer (``vocab.json`` + ``merges.txt``).
        device, dtype, batch_size: as in :class:`flowalign.rewards.pickscore.PickScore`.
        vision_heads, text_heads, hidden_act: the architecture facts not in the weights (ViT-H-14).
    """

    name = "hpsv2"
    modality = "image"
    default_filename = "HPS_v2_compressed.pt"

    def __init__(self, path: str = "xswu/HPSv2", filename: str | None = None,
                 processor_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 16, vision_heads: int = 16, text_heads: int = 16,
                 hidden_act: str = "gelu") -> None:
        from transformers import CLIPModel

        file = resolve_file(path, filename or self.default_filename)
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"could not read HPS checkpoint {file!r}: {err}") from err
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"HPS checkpoint {file!r} holds a {type(checkpoint).__name__}, not a state dict")
        hf_state = openclip_to_transformers(state)
        tokenizer = load_clip_tokenizer(processor_path)
        try:
            config = config_from_openclip(hf_state, vision_heads, text_heads, hidden_act, tokenizer)
        except Exception as err:  # a missing key, or transformers' own config validation error
            raise ValueError(f"HPS checkpoint {file!r} with vision_heads={vision_heads!r}, text_heads={text_heads!r}, "
                             f"hidden_act={hidden_act!r} is not a CLIP architecture: {err}") from err
        model = CLIPModel(config)
        missing, unexpected = model.load_state_dict(hf_state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"HPS checkpoint {file!r} does not fit CLIPModel: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]}")
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'float32', got {dtype!r}")
        device_ = torch.device(device)
        model = model.to(device_, getattr(torch, dtype)).eval().requires_grad_(False)
        size = model.config.vision_config.image_size
        spec = ImageSpec(size=size, crop_size=size, crop_rounding="round")  # torchvision CenterCrop rounding
        self.features = ClipFeatures(model, tokenizer, spec, device_, batch_size)
        self.file = file

    @torch.no_grad()
    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """``media [B, 3, H, W]`` in [0, 1] + ``B`` prompts -> scores ``[B]`` on ``media``'s device."""
        self.features.check(media, prompts)
        media = check_media(media, "image")
        cosine = (self.features.images(media) * self.features.texts(list(prompts))).sum(dim=-1)
        return RewardOutput(scores=cosine.to(media.device))

    @classmethod
    def tiny(cls, tmp_dir: str, **kwargs: Any) -> "HPSv2":
        """Tests only: a tiny CLIP written as an open_clip ``{"state_dict": ...}`` checkpoint, loaded back."""
        directory = os.path.join(str(tmp_dir), f"{cls.name}-tiny")
        model = write_tiny_clip(directory, seed=5, hidden_act="gelu")
        torch.save({"state_dict": transformers_to_openclip(model.state_dict())},
                   os.path.join(directory, cls.default_filename))
        return cls(path=directory, processor_path=directory, vision_heads=4, text_heads=4, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(file={self.file!r})"


class HPSv21(HPSv2):
    """HPSv2.1: same model and score, weights ``HPS_v2.1_compressed.pt`` (retrained on more data)."""

    name = "hpsv21"
    default_filename = "HPS_v2.1_compressed.pt"
