"""Tiny random Qwen-Image components built in memory and offline (diffusers' ``get_dummy_components()`` of
tests/pipelines/qwenimage/test_qwenimage.py, with an offline byte-level Qwen2 tokenizer instead of the hub one).

Shared by tests/test_adapter_qwen_image.py and the Qwen-Image-Edit tests: import the builders, never the
fixtures of a test module.
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

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


# -- Qwen-Image 2.1 (QwenImage21Pipeline): no dummy components in diffusers' repo; sizes are ours -------------
# A Qwen3-VL-style chat template over content lists (the processor's apply_chat_template reads the system message
# as ``[{"type": "text", "text": ...}]``); only the text parts matter for text-to-image.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Latent statistics for the tiny 2.1 VAE (8 channels), non-trivial so that (un)normalisation is exercised.
LATENTS21_MEAN = [0.1, -0.2, 0.3, 0.05, -0.1, 0.2, 0.0, 0.4]
LATENTS21_STD = [0.5, 2.0, 1.5, 0.8, 1.2, 0.7, 1.0, 0.9]


def _image_only_qwen3_vl_processor_cls():
    """``Qwen3VLProcessor`` without its (torchvision) video processor, named as the real class so that saved
    pipelines list ``["transformers", "Qwen3VLProcessor"]`` as a real checkpoint does (the Qwen2-VL shim of
    tests/test_adapter_qwen_image_edit.py, for Qwen3-VL)."""
    from transformers import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnlyQwen3VLProcessor.__module__ = Qwen3VLProcessor.__module__
    ImageOnlyQwen3VLProcessor.__name__ = ImageOnlyQwen3VLProcessor.__qualname__ = "Qwen3VLProcessor"
    return ImageOnlyQwen3VLProcessor


def qwen3_vl_processor(directory: str):
    """An offline image-only ``Qwen3VLProcessor``: the byte-level Qwen tokenizer with Qwen3-VL's vision special
    tokens and :data:`QWEN3_VL_CHAT_TEMPLATE`, a default-configured PIL image processor."""
    from transformers import Qwen2VLImageProcessorPil

    tok = qwen2_bpe_tokenizer(directory, ["a p", "ap p", "r e", "d o", "o g", "i n", "e n"],
                              SPECIAL_TOKENS + ["<|video_pad|>"], QWEN3_VL_CHAT_TEMPLATE)
    return _image_only_qwen3_vl_processor_cls()(Qwen2VLImageProcessorPil(), tok, chat_template=QWEN3_VL_CHAT_TEMPLATE)


@contextlib.contextmanager
def qwen3_vl_processor_loader():
    """While active, ``Qwen3VLProcessor.from_pretrained(path)`` builds the image-only processor from ``path``
    (a saved tiny pipeline's processor folder) instead of requiring torchvision for the video processor."""
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil, Qwen3VLProcessor

    def load(cls, path, *args, **kwargs):
        tok = Qwen2Tokenizer.from_pretrained(path)
        return _image_only_qwen3_vl_processor_cls()(Qwen2VLImageProcessorPil.from_pretrained(path), tok,
                                                    chat_template=QWEN3_VL_CHAT_TEMPLATE)

    with mock.patch.object(Qwen3VLProcessor, "from_pretrained", classmethod(load)):
        yield


def qwen3_vl_encoder(tok, hidden: int = 16):
    """A tiny random ``Qwen3VLForConditionalGeneration`` (2 text layers of width ``hidden``, a 1-block vision tower),
    sized to ``tok``; ids of the vision special tokens taken from ``tok``."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + ["<|video_pad|>"]}
    config = Qwen3VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 8, "vocab_size": len(tok), "max_position_embeddings": 1024,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                         "mrope_interleaved": True},
                     "pad_token_id": tok.pad_token_id},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden,
                       "deepstack_visual_indexes": [0], "num_position_embeddings": 64},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return Qwen3VLForConditionalGeneration(config).eval()


def tiny_qwen_image21_transformer(context: int = 16, num_layers: int = 2):
    """A tiny ``QwenImage21Transformer2DModel``: 8 latent channels, 2 heads of 16, RoPE axes (8, 4, 4)."""
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel(patch_size=1, in_channels=8, out_channels=8, num_layers=num_layers,
                                         attention_head_dim=16, num_attention_heads=2, context_in_dim=context,
                                         mlp_ratio=2, axes_dims_rope=(8, 4, 4))


def tiny_qwen_image21_vae():
    """A tiny ``AutoencoderKLQwenImage21`` (8 latent channels, spatial factor 16 like the release: 5 levels)."""
    from diffusers import AutoencoderKLQwenImage21

    return AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
                                    temperal_downsample=[False, False, False, False], latents_mean=LATENTS21_MEAN,
                                    latents_std=LATENTS21_STD)


def tiny_qwen_image21_pipeline(tmp: str, scheduler: FlowMatchEulerDiscreteScheduler | None = None):
    """A complete tiny ``QwenImage21Pipeline``; ``tmp`` receives the tokenizer files."""
    from diffusers import QwenImage21Pipeline

    torch.manual_seed(0)
    processor = qwen3_vl_processor(os.path.join(tmp, "qwen3vl-tok"))
    return QwenImage21Pipeline(scheduler=scheduler or qwen_image_scheduler(), vae=tiny_qwen_image21_vae(),
                               text_encoder=qwen3_vl_encoder(processor.tokenizer), processor=processor,
                               transformer=tiny_qwen_image21_transformer())
