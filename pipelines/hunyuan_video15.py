"""HunyuanVideo 1.5 text-to-video adapter (``HunyuanVideo15Transformer3DModel`` + ``AutoencoderKLHunyuanVideo15`` +
Qwen2.5-VL text encoder + ByT5 glyph encoder), on diffusers' ``HunyuanVideo15Pipeline`` components.

HunyuanVideo 1.5 is a rectified-flow model (Tencent Hunyuan 2025, "HunyuanVideo 1.5 Technical Report"): the
transformer output already is the velocity ``v = eps - x0`` at ``x_t = (1 - sigma) x0 + sigma eps`` with
timestep ``1000 sigma``, which ``HunyuanVideo15Pipeline.__call__`` feeds to ``FlowMatchEulerDiscreteScheduler.step``
unchanged. No sign or scale conversion is needed.

**Transformer input.** The denoiser is shared with image-to-video: its input is the channel concatenation
``[x_t, cond_latents, mask]`` (``in_channels = 2 C + 1``) and it takes ``image_embeds`` (SigLIP tokens). For
text-to-video the pipeline sets ``cond_latents`` and ``mask`` to zeros (``prepare_cond_latents_and_mask``) and
``image_embeds`` to zeros ``[B, 729, image_embed_dim]`` (the transformer then masks the image tokens out); the adapter
builds the same zeros inside ``_velocity``, so its latent is the plain video latent ``(C, F_lat, H/16, W/16)``.

**Text.** Two streams: Qwen2.5-VL hidden states (third-from-last layer, chat template with the video system
message, the template prefix cropped: ``HunyuanVideo15Pipeline._get_mllm_prompt_embeds``) and ByT5 states of the
quoted glyph texts (zeros with an all-zero mask when the prompt quotes nothing: ``_get_byt5_prompt_embeds``). Both
come with attention masks, all four are cached per prompt.

**Guidance.** The pipeline applies CFG through its ``guider`` (``ClassifierFreeGuidance``:
``v = v_uncond + s (v_cond - v_uncond)``, Ho & Salimans 2022 Eq. 6) with an empty negative prompt by default;
flowalign's ``predict`` does the same with ``sampling.guidance_scale``. The guider's optional
``guidance_rescale`` / start-stop window are not reproduced (the released configs leave them off).

**Schedule.** ``sigmas = linspace(1, 0, T + 1)[:-1]`` passed to the scheduler, which applies the static SD3 shift
(Esser et al. 2024 Eq. 23; HunyuanVideo 1.5 480p t2v ships ``shift = 5``) and appends 0.
"""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin
from torch import Tensor

from .base import AdapterBase
from .common import (PromptEmbeddingCache, check_options, merged_lora_copy, model_name, on_device, save_options,
                     save_transformer_lora, saved_options, set_attention_backend)

HUNYUAN_VIDEO15_OPTIONS = ("height", "width", "num_frames", "shift", "max_sequence_length", "glyph_max_length",
                           "attention_backend", "offload_idle", "embedding_cache_dir")


# -- pure conversions -------------------------------------------------------------------------------
def hunyuan_video15_sigmas(num_steps: int, scheduler_config: dict, shift: float | None = None) -> Tensor:
    """``[num_steps + 1]`` fp32 schedule of ``HunyuanVideo15Pipeline``: ``linspace(1, 0, T + 1)[:-1]`` given to
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`` (step 4 of the pipeline's ``__call__``), which shifts
    them (Esser et al. 2024 Eq. 23, ``shift`` overrides the scheduler config's) and appends the terminal 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    overrides = {} if shift is None else {"shift": float(shift)}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, **overrides)
    if scheduler.config.use_dynamic_shifting:
        raise ValueError("HunyuanVideo 1.5 adapter: scheduler config has use_dynamic_shifting=True, which the "
                         "pipeline cannot use without a mu; set a static 'shift'")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
    return scheduler.sigmas.to(torch.float32).clone()


def hunyuan_latent_shape(channels: int, num_frames: int, height: int, width: int, temporal: int,
                         spatial: int, patch: int, patch_t: int) -> tuple[int, int, int, int]:
    """``(C, F_lat, H_lat, W_lat)`` as ``HunyuanVideo15Pipeline.prepare_latents`` (``F_lat = (F - 1) // temporal + 1``,
    ``H_lat = H // spatial``), checking that every size divides exactly (the pipeline would silently floor)."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames={num_frames}: must be 1 + a multiple of {temporal} (the VAE's temporal compression)")
    f_lat = (num_frames - 1) // temporal + 1
    if f_lat % patch_t:
        raise ValueError(f"num_frames={num_frames}: {f_lat} latent frames are not a multiple of patch_size_t={patch_t}")
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % (spatial * patch):
            raise ValueError(f"{name}={size}: must be a positive multiple of {spatial * patch} (VAE factor x patch size)")
    return channels, f_lat, height // spatial, width // spatial


def t2v_transformer_input(x_t: Tensor) -> Tensor:
    """``[B, 2C + 1, F, h, w]`` transformer input for text-to-video: ``cat([x_t, cond_latents, mask], dim=1)`` with
    the zero ``cond_latents [B, C, F, h, w]`` and zero ``mask [B, 1, F, h, w]`` of
    ``HunyuanVideo15Pipeline.prepare_cond_latents_and_mask``."""
    b, c, f, h, w = x_t.shape
    return torch.cat([x_t, x_t.new_zeros(b, c + 1, f, h, w)], dim=1)


class HunyuanVideo15Adapter(AdapterBase):
    """Pipeline adapter for HunyuanVideo 1.5 text-to-video.

    Args:
        pipe: a ``HunyuanVideo15Pipeline`` (its encoders, VAE and transformer are used; its scheduler config gives the
            shift; scheduler and guider are kept for ``save_pretrained``).
        height, width, num_frames: video size (480p t2v: 480 x 848 x 121 frames).
        shift: flow shift; ``None`` reads the scheduler config's ``shift``.
        max_sequence_length: Qwen2.5-VL tokens per prompt after the template crop (the pipeline's
            ``tokenizer_max_length``, 1000).
        glyph_max_length: ByT5 tokens of the quoted glyph text (the pipeline's ``tokenizer_2_max_length``, 256).
        attention_backend, offload_idle, embedding_cache_dir: see ``pipelines/common.py``.
    """

    # attention projections of both streams and the MLPs of the dual-stream blocks (diffusers' HunyuanVideo
    # DreamBooth-LoRA script targets to_q/to_k/to_v/to_out.0; the rival toolkit adds the add_* and ff projections)
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

    def __init__(self, pipe: HunyuanVideo15Pipeline, height: int = 480, width: int = 848, num_frames: int = 121,
                 shift: float | None = None, max_sequence_length: int = 1000, glyph_max_length: int = 256,
                 attention_backend: str | None = None, offload_idle: bool = False, embedding_cache_dir: str | None = None,
                 name: str = "hunyuan_video15"):
        if pipe.transformer is None:
            raise ValueError("HunyuanVideo15Adapter: the pipeline has no 'transformer'")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.text_encoder = pipe.text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = pipe.text_encoder_2.requires_grad_(False).eval()
        self.vae = pipe.vae.requires_grad_(False).eval()
        set_attention_backend(self.denoiser, attention_backend)
        cfg = self.denoiser.config
        if cfg.in_channels != 2 * self.vae.config.latent_channels + 1:
            raise ValueError(f"HunyuanVideo15Adapter: transformer in_channels={cfg.in_channels} is not 2 x "
                             f"latent_channels + 1 = {2 * self.vae.config.latent_channels + 1} (text-to-video layout)")
        self.shift = float(pipe.scheduler.config.shift if shift is None else shift)
        self.height, self.width, self.num_frames = int(height), int(width), int(num_frames)
        self.max_sequence_length, self.glyph_max_length = int(max_sequence_length), int(glyph_max_length)
        self.offload_idle = bool(offload_idle)
        self.latent_shape = hunyuan_latent_shape(self.vae.config.latent_channels, self.num_frames, self.height, self.width,
                                                 pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial,
                                                 cfg.patch_size, cfg.patch_size_t)
        self.cache = PromptEmbeddingCache(
            embedding_cache_dir, f"hunyuan_video15|{name}|{self.max_sequence_length}|{self.glyph_max_length}")

    # -- loading / saving -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        **options) -> "HunyuanVideo15Adapter":
        """Load a ``HunyuanVideo15Pipeline`` folder / hub id. ``options`` (``model.options``): height, width,
        num_frames, shift, max_sequence_length, glyph_max_length, attention_backend, offload_idle,
        embedding_cache_dir; defaults come from ``flowalign_adapter.json`` when a flowalign run saved ``path``."""
        check_options(options, HUNYUAN_VIDEO15_OPTIONS, "hunyuan_video15")
        options = saved_options(path, options, "HunyuanVideo15Pipeline.save_pretrained")
        pipe = HunyuanVideo15Pipeline.from_pretrained(path, torch_dtype=dtype)
        return cls(pipe, name=model_name(path), **options).to(device)

    def save_pretrained(self, directory: str) -> None:
        """``HunyuanVideo15Pipeline.save_pretrained`` layout (LoRA merged into a copy of the transformer) plus
        ``flowalign_adapter.json`` with the video size, shift and text lengths."""
        transformer = merged_lora_copy(self.denoiser) if self.has_lora() else self.denoiser
        HunyuanVideo15Pipeline(**{**self.pipe.components, "transformer": transformer}).save_pretrained(directory)
        save_options(directory, {"height": self.height, "width": self.width, "num_frames": self.num_frames,
                                 "shift": self.shift, "max_sequence_length": self.max_sequence_length,
                                 "glyph_max_length": self.glyph_max_length})

    def save_lora_weights(self, directory: str) -> None:
        """The transformer LoRA in the diffusers format (``transformer.``-prefixed keys + adapter metadata).
        ``HunyuanVideo15Pipeline`` has no ``load_lora_weights``; load it with
        ``pipe.transformer.load_lora_adapter(directory, prefix="transformer", use_safetensors=True)`` (what the test
        checks). The file is written by ``HunyuanVideoLoraLoaderMixin.save_lora_weights``, the diffusers layout."""
        save_transformer_lora(HunyuanVideoLoraLoaderMixin, self.denoiser, directory)

    def to(self, device: str | torch.device) -> "HunyuanVideo15Adapter":
        self.denoiser.to(device)
        idle = "cpu" if self.offload_idle else device
        for module in (self.text_encoder, self.text_encoder_2, self.vae):
            module.to(idle)
        return self

    # -- protocol -------------------------------------------------------------------------------
    def _encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Qwen2.5-VL states ``[n, L, D]`` + mask ``[n, L]`` and ByT5 glyph states ``[n, L2, D2]`` + mask ``[n, L2]``,
        from the pipeline's own ``_get_mllm_prompt_embeds`` / ``_get_byt5_prompt_embeds`` (masks as float)."""
        pipe = self.pipe
        with ExitStack() as stack:
            for module in (self.text_encoder, self.text_encoder_2):
                stack.enter_context(on_device(module, self.device, self.offload_idle))
            embeds, mask = pipe._get_mllm_prompt_embeds(
                text_encoder=self.text_encoder, tokenizer=pipe.tokenizer, prompt=prompts, device=self.device,
                tokenizer_max_length=self.max_sequence_length, system_message=pipe.system_message,
                crop_start=pipe.prompt_template_encode_start_idx)
            glyph, glyph_mask = pipe._get_byt5_prompt_embeds(
                tokenizer=pipe.tokenizer_2, text_encoder=self.text_encoder_2, prompt=prompts, device=self.device,
                tokenizer_max_length=self.glyph_max_length)
        return {"prompt_embeds": embeds, "prompt_mask": mask.float(), "glyph_embeds": glyph,
                "glyph_mask": glyph_mask.float()}

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, Tensor]:
        """The four text tensors of :meth:`_encode_text` through the on-disk cache, in the denoiser's dtype
        (``encode_prompt`` casts embeddings and masks to ``transformer.dtype`` too)."""
        out = self.cache.get_or_compute(list(prompts), self._encode_text)
        return {k: v.to(self.device, self.dtype) for k, v in out.items()}

    def sigmas(self, num_steps: int) -> Tensor:
        return hunyuan_video15_sigmas(num_steps, self.pipe.scheduler.config, self.shift)

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """Velocity ``[B, C, F, h, w]``: the transformer on ``[x_t, 0, 0]`` with zero image embeddings (t2v), timestep
        ``1000 sigma`` in the model dtype (the pipeline's ``t.expand(B).to(latent_model_input.dtype)``)."""
        n = x_t.shape[0]
        cfg = self.denoiser.config
        image_embeds = torch.zeros(n, self.pipe.vision_num_semantic_tokens, cfg.image_embed_dim, device=x_t.device,
                                   dtype=self.dtype)
        return self._forward_module(
            hidden_states=t2v_transformer_input(x_t.to(self.dtype)),
            image_embeds=image_embeds,
            timestep=(sigma.to(torch.float32) * 1000.0).to(self.dtype),  # diffusers' flow convention t = 1000 sigma
            encoder_hidden_states=tensors["prompt_embeds"],
            encoder_attention_mask=tensors["prompt_mask"],
            encoder_hidden_states_2=tensors["glyph_embeds"],
            encoder_attention_mask_2=tensors["glyph_mask"],
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """``[B, C, F, h, w]`` latents -> ``[B, F, 3, H, W]`` video in [0, 1]: ``latents / scaling_factor`` through the
        VAE, then ``x / 2 + 0.5`` clamped (step 8 of the pipeline and ``VideoProcessor.postprocess_video``).

        Decodes one video at a time: diffusers 0.42's ``AutoencoderKLHunyuanVideo15`` mid-block attention builds a
        ``[B, L, L]`` causal mask against ``[B, 1, L, C]`` queries, which only broadcasts for ``B = 1``."""
        with on_device(self.vae, self.device, self.offload_idle):
            z = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
            video = torch.cat([self.vae.decode(z[i:i + 1], return_dict=False)[0] for i in range(z.shape[0])])
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).to(latents.device)  # [B, F, 3, H, W]
