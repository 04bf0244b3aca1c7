"""Throughput and memory of the real model families' denoisers, with random weights (no download).

    python bench/models.py                              # CUDA: full size; CPU: reduced size (see table)
    python bench/models.py --families wan --batch-sizes 1 2 --steps 10
    python bench/models.py --full                       # force full size on CPU too (slow, ~100 GB RAM for FLUX)
    python bench/models.py --fsdp                       # FSDP2 train step, full + LoRA, 1 and 2 processes, per-rank memory

Each family's transformer is built from the dimensions of its public config (written below, no
download) and fed random text embeddings of the right shape (the text encoders are skipped: they run
once per prompt and can be cached with ``model.options.embedding_cache_dir``). Per family and batch
size it prints:

* rollout samples/s: ``--steps`` no-grad denoiser forwards (no CFG, no VAE decode) per sample;
  every timing is the best of ``--repeats`` runs after a warm-up;
* train step s: one forward + backward through the LoRA weights (rank ``--lora-rank`` on the
  attention projections, gradient checkpointing on, as the recipes train);
* peak memory: ``torch.cuda.max_memory_allocated`` for the family/batch on CUDA; on CPU the
  process' peak RSS so far (monotone over the run, so only an upper bound).

On CPU the models run at reduced size -- fewer layers, smaller resolution, shorter text -- and the
table's ``size`` column says exactly what ran; timings then only compare families with each other.

``--fsdp`` instead measures one training step (forward + backward + AdamW step, batch 1 per rank,
gradient checkpointing on) of each family sharded with FSDP2 (``flowalign.training.fsdp.shard_module``,
as ``train.fsdp.enabled`` does), full fine-tuning and LoRA, at 1 and 2 processes. The script starts
the processes itself (``torch.multiprocessing``, gloo on CPU / NCCL on CUDA; fresh processes per
row, so memory readings do not carry over) and prints one table, per rank:

* per-rank params: elements of this rank's parameter shards (frozen ones included);
* state MiB: bytes this rank holds in parameter shards + gradient shards + optimizer state, summed
  over the local tensors (exact; what sharding divides);
* peak MiB: on CPU the process' peak RSS during the steps (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` after the model is built and sharded; includes activations, gathered
  blocks, buffers, the Python runtime and libraries, and memory the allocator freed but kept, e.g.
  of the unsharded model); on CUDA ``torch.cuda.max_memory_allocated`` over the steps;
* step s: the slowest rank's best-of-``--repeats`` step after one warm-up step.

On CPU the families run at the reduced size; on CUDA at full size, and with one GPU at 1 process
only (``--fsdp-processes`` sets the counts; a CUDA run needs one GPU per process).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flowalign.training.plots import format_table  # noqa: E402

# -- public configs (transformer/config.json of each hub repo) -----------------------------------
SD35_MEDIUM = dict(  # stabilityai/stable-diffusion-3.5-medium
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX1_DEV = dict(  # black-forest-labs/FLUX.1-dev
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
WAN21_1_3B = dict(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
    freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    rope_max_seq_len=1024,
)
WAN21_I2V_14B = dict(  # Wan-AI/Wan2.1-I2V-14B-480P-Diffusers: 16 latent + 4 mask + 16 condition channels in; CLIP ViT-H image
    # tokens (1280) through the added K/V projections (diffusers scripts/convert_wan_to_diffusers.py, "Wan-I2V-14B-480p")
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16, text_dim=4096,
    freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
)
FLUX2_KLEIN_4B = dict(  # black-forest-labs/FLUX.2-klein-4B (and -base-4B): Qwen3-4B layers (9, 18, 27) -> 3 x 2560
    patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
FLUX2_DEV = dict(  # black-forest-labs/FLUX.2-dev (32B; = diffusers' Flux2Transformer2DModel defaults): Mistral-Small-3.1-24B
    # layers (10, 20, 30) -> 3 x 5120 = 15360; guidance-distilled (guidance embedding on)
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48,
    joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000, eps=1e-6, guidance_embeds=True,
)
Z_IMAGE_TURBO = dict(  # Tongyi-MAI/Z-Image-Turbo (6B): Qwen3-4B captions (2560)
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
    n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512),
)
HUNYUAN_VIDEO15_480P = dict(  # hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v (8.3B: 54 blocks x 2048 wide; the values of
    # diffusers' HunyuanVideo15Transformer3DModel defaults, with the t2v task type and 480p target size)
    in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54, num_refiner_layers=2,
    mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", text_embed_dim=3584, text_embed_2_dim=1472,
    image_embed_dim=1152, rope_theta=256.0, rope_axes_dim=(16, 56, 56), target_size=640, task_type="t2v",
)
QWEN_IMAGE = dict(  # Qwen/Qwen-Image (20B MMDiT): Qwen2.5-VL-7B captions (3584)
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
QWEN_IMAGE21 = dict(  # Qwen/Qwen-Image-2.1 (~7B single-stream, block-causal): no public config.json reachable here, so
    # these are diffusers' QwenImage21Transformer2DModel defaults, which the pipeline docs match (32 blocks; 64-channel
    # VAE latents, unpatched; Qwen3-VL-8B captions of 4096)
    patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128, num_attention_heads=32,
    context_in_dim=4096, mlp_ratio=3, axes_dims_rope=(16, 56, 56), causal_condition=True,
)
LTX2_19B = dict(  # Lightricks/LTX-2 (19B audio+video: 48 blocks, video 32 x 128 wide, audio 32 x 64; the values of diffusers'
    # LTX2VideoTransformer3DModel defaults, Gemma-3-12B captions of 3840)
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=128,
    cross_attention_dim=4096, audio_in_channels=128, audio_out_channels=128, audio_num_attention_heads=32,
    audio_attention_head_dim=64, audio_cross_attention_dim=2048, num_layers=48, caption_channels=3840,
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Case:
    """One family at one size: ``build()`` -> model, ``inputs(batch)`` -> forward kwargs."""

    family: str
    size: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict]


def cases(full: bool, device: torch.device, dtype: torch.dtype) -> dict[str, Case]:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel
    from diffusers import Flux2Transformer2DModel, ZImageTransformer2DModel
    from diffusers import HunyuanVideo15Transformer3DModel, LTX2VideoTransformer3DModel
    from diffusers import QwenImage21Transformer2DModel, QwenImageTransformer2DModel

    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    t = lambda b: torch.full((b,), 500.0, device=device)  # noqa: E731
    # SD3.5-medium: 1024 px -> 128 x 128 latents; text = 77 CLIP + 256 T5 tokens
    sd_layers, sd_px, sd_text = (24, 1024, 333) if full else (2, 128, 77)
    sd3 = Case("sd3.5-medium", f"{sd_layers}/24 layers, {sd_px}px, {sd_text} text tok",
               lambda: SD3Transformer2DModel(**{**SD35_MEDIUM, "num_layers": sd_layers,
                                                "dual_attention_layers": tuple(range(min(13, sd_layers)))}),
               lambda b: dict(hidden_states=rnd(b, 16, sd_px // 8, sd_px // 8), encoder_hidden_states=rnd(b, sd_text, 4096),
                              pooled_projections=rnd(b, 2048), timestep=t(b)))
    # FLUX.1-dev: 1024 px -> 64 x 64 packed 2x2 latents = 4096 image tokens; 512 T5 tokens
    fl_double, fl_single, fl_px, fl_text = (19, 38, 1024, 512) if full else (1, 1, 128, 64)
    n_img = (fl_px // 16) ** 2

    def flux_inputs(b: int) -> dict:
        side = fl_px // 16
        img_ids = torch.zeros(side, side, 3, device=device)
        img_ids[..., 1] = torch.arange(side, device=device)[:, None]
        img_ids[..., 2] = torch.arange(side, device=device)[None, :]
        return dict(hidden_states=rnd(b, n_img, 64), encoder_hidden_states=rnd(b, fl_text, 4096), pooled_projections=rnd(b, 768),
                    timestep=t(b) / 1000, img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(fl_text, 3, device=device),
                    guidance=torch.full((b,), 3.5, device=device))

    flux = Case("flux.1-dev", f"{fl_double}+{fl_single}/19+38 blocks, {fl_px}px, {fl_text} text tok",
                lambda: FluxTransformer2DModel(**{**FLUX1_DEV, "num_layers": fl_double, "num_single_layers": fl_single}), flux_inputs)

    # FLUX.1 Kontext [dev] (FLUX.1-dev's transformer config): the source image's packed latents (ids (1, row, col)) follow
    # the noisy ones, 4096 + 4096 image tokens at 1024 px (pipelines/flux_kontext.py)
    def kontext_inputs(b: int) -> dict:
        base = flux_inputs(b)
        source_ids = base["img_ids"].clone()
        source_ids[:, 0] = 1
        return {**base, "hidden_states": torch.cat([base["hidden_states"], rnd(b, n_img, 64)], dim=1),
                "img_ids": torch.cat([base["img_ids"], source_ids])}

    kontext = Case("flux.1-kontext-dev", f"{fl_double}+{fl_single}/19+38 blocks, {fl_px}px + {fl_px}px source, {fl_text} text tok",
                   lambda: FluxTransformer2DModel(**{**FLUX1_DEV, "num_layers": fl_double, "num_single_layers": fl_single}),
                   kontext_inputs)
    # Wan2.1-1.3B at 480p: 81 frames x 480 x 832 -> 21 x 60 x 104 latents; 512 UMT5 tokens
    wan_layers, (f, h, w), wan_text = (30, (81, 480, 832), 512) if full else (2, (9, 128, 128), 64)
    wan = Case("wan2.1-1.3b", f"{wan_layers}/30 layers, {f}x{h}x{w}, {wan_text} text tok",
               lambda: WanTransformer3DModel(**{**WAN21_1_3B, "num_layers": wan_layers}),
               lambda b: dict(hidden_states=rnd(b, 16, (f - 1) // 4 + 1, h // 8, w // 8), encoder_hidden_states=rnd(b, wan_text, 4096),
                              timestep=t(b)))
    # FLUX.2 [klein] 4B: 1024 px -> 128 x 64 x 64 patchified latents = 4096 tokens; 512 Qwen3 tokens (x 3 layers)
    k_double, k_single, k_px, k_text = (5, 20, 1024, 512) if full else (1, 1, 128, 64)

    def klein_inputs(b: int) -> dict:
        side = k_px // 16
        img_ids = torch.zeros(side, side, 4, device=device)
        img_ids[..., 1] = torch.arange(side, device=device)[:, None]
        img_ids[..., 2] = torch.arange(side, device=device)[None, :]
        txt_ids = torch.zeros(k_text, 4, device=device)
        txt_ids[:, 3] = torch.arange(k_text, device=device)
        return dict(hidden_states=rnd(b, side * side, 128), encoder_hidden_states=rnd(b, k_text, 7680), timestep=t(b) / 1000,
                    img_ids=img_ids.reshape(-1, 4), txt_ids=txt_ids, guidance=None)

    klein = Case("flux.2-klein-4b", f"{k_double}+{k_single}/5+20 blocks, {k_px}px, {k_text} text tok",
                 lambda: Flux2Transformer2DModel(**{**FLUX2_KLEIN_4B, "num_layers": k_double, "num_single_layers": k_single}),
                 klein_inputs)
    # FLUX.2 [dev]: the same 4096 image tokens at 1024 px; 512 Mistral-3 tokens of 15360; guidance 4.0 (Flux2Pipeline's
    # default guidance_scale, fed unscaled as `guidance`)
    d_double, d_single, d_px, d_text = (8, 48, 1024, 512) if full else (1, 1, 128, 64)

    def flux2_dev_inputs(b: int) -> dict:
        side = d_px // 16
        img_ids = torch.zeros(side, side, 4, device=device)
        img_ids[..., 1] = torch.arange(side, device=device)[:, None]
        img_ids[..., 2] = torch.arange(side, device=device)[None, :]
        txt_ids = torch.zeros(d_text, 4, device=device)
        txt_ids[:, 3] = torch.arange(d_text, device=device)
        return dict(hidden_states=rnd(b, side * side, 128), encoder_hidden_states=rnd(b, d_text, 15360), timestep=t(b) / 1000,
                    img_ids=img_ids.reshape(-1, 4), txt_ids=txt_ids, guidance=torch.full((b,), 4.0, device=device))

    flux2_dev = Case("flux.2-dev", f"{d_double}+{d_single}/8+48 blocks, {d_px}px, {d_text} text tok",
                     lambda: Flux2Transformer2DModel(**{**FLUX2_DEV, "num_layers": d_double, "num_single_layers": d_single}),
                     flux2_dev_inputs)
    # Z-Image-Turbo: 1024 px -> 16 x 128 x 128 latents = 4096 tokens of 2x2 patches; 512 Qwen3 tokens (un-padded)
    z_layers, z_refiners, z_px, z_text = (30, 2, 1024, 512) if full else (1, 1, 128, 64)

    class ZImageStacked(ZImageTransformer2DModel):
        """Z-Image returns one tensor per sample: stacked, so the ``[0].square().mean()`` loss here applies."""

        def forward(self, *args, **kwargs):
            return (torch.stack(super().forward(*args, **kwargs)[0]),)

    zimage = Case("z-image-turbo", f"{z_layers}/30 layers + {z_refiners}/2 refiners, {z_px}px, {z_text} text tok",
                  lambda: ZImageStacked(**{**Z_IMAGE_TURBO, "n_layers": z_layers, "n_refiner_layers": z_refiners}),
                  lambda b: dict(x=list(rnd(b, 16, 1, z_px // 8, z_px // 8).unbind(0)), t=t(b) / 1000,
                                 cap_feats=list(rnd(b, z_text, 2560).unbind(0))))
    # HunyuanVideo 1.5 480p t2v: 121 frames x 480 x 848 -> 31 x 30 x 53 latents (patch 1) = 49,290 tokens; 1000 Qwen2.5-VL
    # + 256 ByT5 + 729 (zero, masked) image tokens; input = [x_t, zero cond latents, zero mask] (65 channels)
    hy_layers, (hf, hh, hw), hy_text = (54, (121, 480, 848), 1000) if full else (2, (9, 128, 128), 64)

    def hunyuan_inputs(b: int) -> dict:
        latent = (b, 32, (hf - 1) // 4 + 1, hh // 16, hw // 16)
        x = torch.cat([rnd(*latent), torch.zeros(b, 33, *latent[2:], device=device, dtype=dtype)], dim=1)
        ones = lambda n: torch.ones(b, n, device=device, dtype=dtype)  # noqa: E731
        return dict(hidden_states=x, timestep=t(b).to(dtype), encoder_hidden_states=rnd(b, hy_text, 3584),
                    encoder_attention_mask=ones(hy_text), encoder_hidden_states_2=rnd(b, 256, 1472),
                    encoder_attention_mask_2=ones(256),
                    image_embeds=torch.zeros(b, 729, 1152, device=device, dtype=dtype))

    hunyuan = Case("hunyuanvideo-1.5-480p", f"{hy_layers}/54 layers, {hf}x{hh}x{hw}, {hy_text}+256 text tok",
                   lambda: HunyuanVideo15Transformer3DModel(**{**HUNYUAN_VIDEO15_480P, "num_layers": hy_layers}),
                   hunyuan_inputs)
    # Qwen-Image: 1024 px -> 16 x 128 x 128 latents -> 64 x 64 packed 2x2 tokens = 4096; up to 512 Qwen2.5-VL tokens
    # (padded only to the batch's longest prompt; 512 is the pipeline's max_sequence_length)
    q_layers, q_px, q_text = (60, 1024, 512) if full else (1, 128, 64)
    q_side = q_px // 16
    qwen = Case("qwen-image", f"{q_layers}/60 layers, {q_px}px, {q_text} text tok",
                lambda: QwenImageTransformer2DModel(**{**QWEN_IMAGE, "num_layers": q_layers}),
                lambda b: dict(hidden_states=rnd(b, q_side * q_side, 64), encoder_hidden_states=rnd(b, q_text, 3584),
                               timestep=t(b) / 1000, img_shapes=[[(1, q_side, q_side)]] * b))
    # Qwen-Image-Edit-2509 (Qwen-Image's transformer config): one 1:1 source at the pipeline's 1024 x 1024 condition area
    # appends 4096 packed condition tokens to the 4096 noisy ones (img_shapes lists both); Qwen2.5-VL sees the prompt and
    # the source at 384 x 384 -> 392 x 392 (28-multiple) = 196 merged image tokens (pipelines/qwen_image_edit.py)
    qe_text = q_text + (196 if full else 16)
    qwen_edit = Case("qwen-image-edit-2509", f"{q_layers}/60 layers, {q_px}px + {q_px}px source, {qe_text} text+image tok",
                     lambda: QwenImageTransformer2DModel(**{**QWEN_IMAGE, "num_layers": q_layers}),
                     lambda b: dict(hidden_states=rnd(b, 2 * q_side * q_side, 64), encoder_hidden_states=rnd(b, qe_text, 3584),
                                    timestep=t(b) / 1000, img_shapes=[[(1, q_side, q_side), (1, q_side, q_side)]] * b))
    # Qwen-Image 2.1: 1024 px -> 64 x 64 x 64 latents = 4096 unpatched tokens (1024 image slots) after up to 512 Qwen3-VL
    # tokens in one block-causal sequence; the adapter never pads text (pipelines/qwen_image21.py)
    q21_layers, q21_px, q21_text = (32, 1024, 512) if full else (1, 128, 64)
    q21_side = q21_px // 16

    def qwen21_inputs(b: int) -> dict:
        img_mask = torch.zeros(b, q21_text + q21_side * q21_side // 4, dtype=torch.bool, device=device)
        img_mask[:, q21_text:] = True
        return dict(hidden_states=rnd(b, q21_side * q21_side, 64), encoder_hidden_states=rnd(b, q21_text, 4096),
                    timestep=t(b) / 1000, img_shapes=[[(1, q21_side, q21_side)]] * b, img_mask=img_mask)

    qwen21 = Case("qwen-image-2.1", f"{q21_layers}/32 layers, {q21_px}px, {q21_text} text tok",
                  lambda: QwenImage21Transformer2DModel(**{**QWEN_IMAGE21, "num_layers": q21_layers}), qwen21_inputs)
    # Wan2.1-I2V-14B-480P: 33 frames x 480 x 832 (configs/grpo/wan_i2v_jpeg.yaml) -> 9 x 60 x 104 latents = 14,040 tokens;
    # input = [x_t, 4-channel first-frame mask, 16-channel condition latents]; 512 UMT5 + 257 CLIP image tokens
    i2v_layers, (i2v_f, i2v_h, i2v_w), i2v_text = (40, (33, 480, 832), 512) if full else (2, (9, 128, 128), 64)
    wan_i2v = Case("wan2.1-i2v-14b", f"{i2v_layers}/40 layers, {i2v_f}x{i2v_h}x{i2v_w}, {i2v_text}+257 text/image tok",
                   lambda: WanTransformer3DModel(**{**WAN21_I2V_14B, "num_layers": i2v_layers}),
                   lambda b: dict(hidden_states=rnd(b, 36, (i2v_f - 1) // 4 + 1, i2v_h // 8, i2v_w // 8),
                                  encoder_hidden_states=rnd(b, i2v_text, 4096), encoder_hidden_states_image=rnd(b, 257, 1280),
                                  timestep=t(b)))
    # LTX-2 at 512 x 768, 121 frames, 24 fps: 16 x 24 x 16 = 6,144 video tokens (VAE 32x / 8x) + 126 audio tokens;
    # 1024 connector tokens per stream. One call denoises both streams; the loss is on the video output.
    lx_layers, (lf, lh, lw), lx_text = (48, (121, 512, 768), 1024) if full else (2, (17, 128, 128), 64)
    lx_shape = ((lf - 1) // 8 + 1, lh // 32, lw // 32)
    lx_audio = round(lf / 24.0 * 25)  # 16 kHz / hop 160 / 4x temporal = 25 audio latents per second

    def ltx2_inputs(b: int) -> dict:
        ones = torch.ones(b, lx_text, device=device)
        return dict(hidden_states=rnd(b, lx_shape[0] * lx_shape[1] * lx_shape[2], 128), audio_hidden_states=rnd(b, lx_audio, 128),
                    encoder_hidden_states=rnd(b, lx_text, 3840), audio_encoder_hidden_states=rnd(b, lx_text, 3840),
                    timestep=t(b), sigma=t(b), encoder_attention_mask=ones, audio_encoder_attention_mask=ones,
                    num_frames=lx_shape[0], height=lx_shape[1], width=lx_shape[2], fps=24.0, audio_num_frames=lx_audio,
                    use_cross_timestep=True)

    ltx2 = Case("ltx-2-19b", f"{lx_layers}/48 layers, {lf}x{lh}x{lw} + {lx_audio} audio tok, {lx_text} text tok",
                lambda: LTX2VideoTransformer3DModel(**{**LTX2_19B, "num_layers": lx_layers}), ltx2_inputs)
    return {"sd3": sd3, "flux": flux, "flux_kontext": kontext, "wan": wan, "wan_i2v": wan_i2v,
            "flux2": klein, "flux2_dev": flux2_dev, "z_image": zimage, "hunyuan_video15": hunyuan, "ltx2": ltx2,
            "qwen_image": qwen, "qwen_image_edit_plus": qwen_edit, "qwen_image21": qwen21}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def build_model(case: Case, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Initialise directly on ``device`` in ``dtype`` (no fp32 copy of a 12B model in host memory),
    then upcast the modules diffusers keeps in fp32 (``_keep_in_fp32_modules``), as
    ``from_pretrained(torch_dtype=dtype)`` does."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = case.build()
    finally:
        torch.set_default_dtype(previous)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        if keep.intersection(name.split(".")):
            module.float()
    return model.eval()


def bench_case(case: Case, batch_sizes: list[int], steps: int, lora_rank: int, device: torch.device, dtype: torch.dtype,
               repeats: int = 2) -> list[list]:
    """Rows of the table for one family; each timing is the best of ``repeats`` (shared machines are noisy)."""
    from peft import LoraConfig

    model = build_model(case, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    model.enable_gradient_checkpointing()
    rows = []
    for b in batch_sizes:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        kwargs = case.inputs(b)
        try:
            with torch.no_grad():
                model(**kwargs, return_dict=False)  # warm-up
                rollout_s = min(_timed(lambda: [model(**kwargs, return_dict=False) for _ in range(steps)], device)
                                for _ in range(repeats))
            model.train()
            step = lambda: model(**kwargs, return_dict=False)[0].float().square().mean().backward()  # noqa: E731
            step()  # warm-up
            train_s = min(_timed(step, device) for _ in range(repeats))
            model.zero_grad(set_to_none=True)
            model.eval()
            rows.append([case.family, case.size, f"{params / 1e6:.0f}M", b, b / rollout_s, train_s, _peak_gib(device)])
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            model.eval()
            torch.cuda.empty_cache()
            rows.append([case.family, case.size, f"{params / 1e6:.0f}M", b, None, None, "OOM"])
        kwargs = None  # free this batch size's inputs before building the next
        print(f"  {case.family} batch {b}: done", file=sys.stderr, flush=True)
    model = None  # release the weights before the next family is built
    gc.collect()
    return rows


# -- --fsdp: one sharded training step per family / process count / mode --------------------------
FSDP_HEADER = ["family", "size", "processes", "mode", "per-rank params", "state MiB (params+grads+optim)", "peak MiB", "step s"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, ``t`` itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _nbytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))


def held_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds in parameter shards, gradient shards and optimizer state (local tensors)."""
    params = list(model.parameters())
    return {"params": _nbytes(params),
            "grads": _nbytes(p.grad for p in params if p.grad is not None),
            "optim": _nbytes(v for state in optimizer.state.values() for v in state.values())}


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """``VmHWM`` (peak resident set size since the last reset) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class FSDPJob:
    """One row of the ``--fsdp`` table: a family, a mode and a process count."""

    family: str
    mode: str  # "full" or "lora"
    processes: int
    full_size: bool
    lora_rank: int
    repeats: int
    port: int


def _fsdp_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, kwargs: dict) -> None:
    """Forward + backward + optimizer step; gradients stay allocated until the next step."""
    optimizer.zero_grad(set_to_none=True)
    model(**kwargs, return_dict=False)[0].float().square().mean().backward()
    optimizer.step()


def fsdp_rank_result(job: FSDPJob, rank: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build, shard and train ``job``'s model on this rank (the process group is up); this rank's numbers."""
    from peft import LoraConfig

    from flowalign.training.fsdp import shard_module

    case = cases(job.full_size, device, dtype)[job.family]
    model = build_model(case, device, dtype)  # same seed on every rank: identical weights before sharding
    if job.mode == "lora":
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=job.lora_rank, lora_alpha=job.lora_rank, target_modules=LORA_TARGETS,
                                     init_lora_weights="gaussian"))
    model.enable_gradient_checkpointing()
    model.train()
    model = shard_module(model, device_type=device.type, reshard_after_forward=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    torch.manual_seed(1000 + rank)  # each rank trains on its own batch
    kwargs = case.inputs(1)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = device.type == "cpu" and _reset_peak_rss()
    _fsdp_step(model, optimizer, kwargs)  # warm-up (creates the optimizer state)
    step_s = min(_timed(lambda: _fsdp_step(model, optimizer, kwargs), device) for _ in range(job.repeats))
    held = held_state_bytes(model, optimizer)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mib()
    return {"rank": rank, "size": case.size, "params": sum(_local(p).numel() for p in model.parameters()),
            "state_mib": sum(held.values()) / 2**20, "peak_mib": peak, "peak_reset": device.type == "cuda" or rss_reset,
            "step_s": step_s}


def _fsdp_worker(rank: int, job: FSDPJob, results) -> None:
    """One process of ``job``: join the group, run :func:`fsdp_rank_result`, put the result (or the error)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.processes))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job.port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=job.processes)
    try:
        results.put(fsdp_rank_result(job, rank, device, torch.bfloat16 if cuda else torch.float32))
    except torch.cuda.OutOfMemoryError:
        results.put({"rank": rank, "error": "OOM"})
    except Exception as exc:  # reported in the table; the other rows still run
        traceback.print_exc()
        results.put({"rank": rank, "error": f"{type(exc).__name__}: {exc}"[:120]})
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fsdp_job(job: FSDPJob, timeout_s: float) -> list:
    """Start ``job.processes`` fresh processes for one row and reduce their results to the row:
    per-rank values are rank 0's params and the largest state / peak / step time over ranks."""
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_fsdp_worker, args=(rank, job, results)) for rank in range(job.processes)]
    for p in procs:
        p.start()
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < job.processes:
        try:
            got.append(results.get(timeout=max(1.0, deadline - time.monotonic())))
        except queue.Empty:
            got.append({"rank": -1, "error": f"no result within {timeout_s:.0f} s"})
            break
        if time.monotonic() > deadline:
            break
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    print(f"  {job.family} {job.mode} x{job.processes}: done", file=sys.stderr, flush=True)
    errors = [r["error"] for r in got if "error" in r]
    if errors or len(got) < job.processes:
        return [job.family, "-", job.processes, job.mode, None, None, errors[0] if errors else "missing rank", None]
    by_rank = sorted(got, key=lambda r: r["rank"])
    peak = max(r["peak_mib"] for r in by_rank)
    return [job.family, by_rank[0]["size"], job.processes, job.mode, f"{by_rank[0]['params'] / 1e6:.1f}M",
            max(r["state_mib"] for r in by_rank), peak if all(r["peak_reset"] for r in by_rank) else f"{peak:.0f} (not reset)",
            max(r["step_s"] for r in by_rank)]


def fsdp_main(args: argparse.Namespace) -> str:
    """The ``--fsdp`` table: every family x process count x mode, each in fresh processes."""
    cuda = torch.cuda.is_available()
    full = cuda or args.full
    processes = args.fsdp_processes or ([1] if cuda and torch.cuda.device_count() < 2 else [1, 2])
    if cuda and max(processes) > torch.cuda.device_count():
        raise SystemExit(f"--fsdp-processes {max(processes)} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    peak = "peak MiB = torch.cuda.max_memory_allocated during the steps" if cuda else \
        "peak MiB = the process' peak RSS during the steps (VmHWM, reset after building + sharding)"
    print(f"FSDP2 train step: device {name}, {'bf16' if cuda else 'fp32'}, {'full size' if full else 'REDUCED size (CPU)'}, "
          f"processes {processes}, batch 1 per rank, AdamW, gradient checkpointing, reshard_after_forward=True", flush=True)
    rows = [run_fsdp_job(FSDPJob(family, mode, n, full, args.lora_rank, args.repeats, _free_port()), args.fsdp_timeout)
            for family in args.families for n in processes for mode in ("full", "lora")]
    header = FSDP_HEADER[:6] + ["peak MiB (cuda max allocated)" if cuda else "peak MiB (RSS)"] + FSDP_HEADER[7:]
    text = format_table(header, rows)
    print(text)
    print(f"per rank; state = local parameter + gradient + optimizer-state shards (exact bytes); {peak}; "
          "step s = slowest rank, best of --repeats after a warm-up")
    return text


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["sd3", "flux", "wan"],
                        choices=["sd3", "flux", "flux_kontext", "wan", "wan_i2v", "flux2", "flux2_dev", "z_image", "hunyuan_video15", "qwen_image",
                                 "qwen_image_edit_plus", "qwen_image21", "ltx2"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 1 2 4 on CUDA, 1 2 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="rollout steps per sample (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--full", action="store_true", help="full-size models on CPU too")
    parser.add_argument("--repeats", type=int, default=2, help="timings are the best of this many runs")
    parser.add_argument("--fsdp", action="store_true",
                        help="FSDP2 train-step table (full and LoRA, per-rank memory) instead of the rollout/LoRA table")
    parser.add_argument("--fsdp-processes", nargs="+", type=int, default=None,
                        help="process counts for --fsdp (default: 1 2; on CUDA 1 unless there are 2+ GPUs)")
    parser.add_argument("--fsdp-timeout", type=float, default=1200.0, help="seconds allowed for one --fsdp row")
    args = parser.parse_args(argv)
    if args.fsdp:
        return fsdp_main(args)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    full = cuda or args.full
    batch_sizes = args.batch_sizes or ([1, 2, 4] if cuda else [1, 2])
    steps = args.steps or (10 if cuda else 1)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}, dtype {dtype}, {'full size' if full else 'REDUCED size (CPU)'}; rollout = {steps} "
          f"no-grad forwards per sample, train = 1 fwd+bwd (LoRA r={args.lora_rank}, gradient checkpointing)", flush=True)
    table = cases(full, device, dtype)
    rows = []
    for family in args.families:
        rows += bench_case(table[family], batch_sizes, steps, args.lora_rank, device, dtype, args.repeats)
    memory = "peak GiB (cuda max allocated)" if cuda else "peak GiB (process RSS so far)"
    text = format_table(["family", "size", "params", "batch", "rollout samples/s", "train step s", memory], rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
