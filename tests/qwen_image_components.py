"""Tiny random Qwen-Image components built in memory and offline (diffusers' ``get_dummy_components()`` of
tests/pipelines/qwenimage/test_qwenimage.py, with an offline byte-level Qwen2 tokenizer instead of the hub one).

Shared by tests/test_adapter_qwen_image.py and the Qwen-Image-Edit tests: import the builders, never the
fixtures of a test module.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from tests.tiny_components import qwen2_bpe_tokenizer

# Qwen2.5-VL's special tokens the Qwen-Image prompt templates and processors use.
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
# Non-trivial per-channel latent statistics, so that the VAE (un)normalisation is exercised by the tests.
LATENTS_MEAN = [0.1, -0.2, 0.3, 0.05]
LATENTS_STD = [0.5, 2.0, 1.5, 0.8]


def qwen2_tokenizer(directory: str) -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer (every byte a token, a few merges, Qwen2.5-VL's chat and vision special
    tokens), written to ``directory`` and read back offline."""
    return qwen2_bpe_tokenizer(directory, ["a p", "ap p", "r e", "d o", "o g", "i n", "e n"], SPECIAL_TOKENS)


def qwen25_vl_encoder(tok: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """diffusers' dummy Qwen2.5-VL (2 text layers of width 16, a 2-layer vision tower), sized to ``tok``."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tok),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "bos_token_id": None, "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": tok.pad_token_id},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tok), vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], vision_token_id=ids["<|image_pad|>"], image_token_id=ids["<|image_pad|>"])
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_transformer(num_layers: int = 2) -> QwenImageTransformer2DModel:
    """diffusers' dummy Qwen-Image MMDiT: 16 packed channels (4 latent channels x 2x2), 3 heads of 16."""
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers,
                                       attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                       guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def tiny_qwen_image_vae() -> AutoencoderKLQwenImage:
    """diffusers' dummy Qwen-Image VAE (4 latent channels, spatial factor 4) with non-trivial latent statistics."""
    return AutoencoderKLQwenImage(base_dim=4 * 6, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)


def qwen_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's released scheduler config (Qwen/Qwen-Image scheduler/scheduler_config.json): exponential
    dynamic shifting with mu between 0.5 and 0.9 for 256..8192 tokens, shift_terminal 0.02."""
    return FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                                           num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                                           time_shift_type="exponential", use_dynamic_shifting=True)


def tiny_qwen_image_pipeline(tmp: str, scheduler: FlowMatchEulerDiscreteScheduler | None = None) -> QwenImagePipeline:
    """A complete tiny ``QwenImagePipeline``; ``tmp`` receives the tokenizer files."""
    torch.manual_seed(0)
    tok = qwen2_tokenizer(os.path.join(tmp, "qwen2-tok"))
    return QwenImagePipeline(scheduler=scheduler or qwen_image_scheduler(), vae=tiny_qwen_image_vae(),
                             text_encoder=qwen25_vl_encoder(tok), tokenizer=tok, transformer=tiny_qwen_image_transformer())
