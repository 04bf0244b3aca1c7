"""Stable Diffusion 3 / 3.5 (MMDiT) adapter on top of diffusers' ``StableDiffusion3Pipeline`` components.

The denoiser is ``SD3Transformer2DModel``; prompts go through CLIP-L and CLIP-G (both with
projection: their pooled outputs are concatenated into ``pooled_projections``) and, optionally,
T5-XXL (``use_t5=False`` skips loading it; its sequence is then zeros, as the pipeline does when
``text_encoder_3`` is None). Encoding is the pipeline's own ``encode_prompt``; the schedule is the
pipeline's ``FlowMatchEulerDiscreteScheduler`` with its ``shift`` (3.0 for SD3/3.5).

Latents are the VAE latents ``[C, H/8, W/8]`` (C = 16 for SD3), in the flow convention the model
was trained with: ``x_t = (1 - sigma) x0 + sigma eps``, output ``v = eps - x0`` (Esser et al. 2024,
"Scaling Rectified Flow Transformers", Eq. 1-3), timestep ``1000 * sigma``.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from torch import Tensor


from .base import AdapterBase
from .common import (PromptEmbeddingCache, TransformerPipelineIO, checked_resolution, decode_shifted_latents, on_device,
                     place_modules)

SD3_OPTIONS = ("resolution", "shift", "use_t5", "max_sequence_length", "attention_backend", "offload_idle",
               "embedding_cache_dir")


class StableDiffusion3Adapter(TransformerPipelineIO, AdapterBase):
    """SD3 / SD3.5 pipeline adapter.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` (its components are used, never its ``__call__``).
        device: where the transformer (and, unless ``offload_idle``, the encoders and VAE) live.
        resolution: image side in pixels; default ``transformer.sample_size * vae_scale_factor``.
        shift: schedule shift; default the scheduler's own ``shift`` (3.0 for SD3/3.5).
        use_t5: use the T5 encoder; False replaces its sequence by zeros (the pipeline's behaviour).
        max_sequence_length: T5 tokens (the pipeline's default 256).
        attention_backend: diffusers attention backend of the transformer (None = SDPA).
        offload_idle: keep text encoders / VAE on the CPU except while encoding / decoding.
        embedding_cache_dir: cache prompt embeddings on disk (per encoder namespace).
        cache_namespace: identifies the checkpoint in the embedding cache (its path).
    """

    # Flow-GRPO's SD3.5 LoRA targets: the joint attention projections of both streams.
    lora_target_modules = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                           "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]

    def __init__(self, pipe: StableDiffusion3Pipeline, *, device: str | torch.device = "cpu", resolution: int | None = None,
                 shift: float | None = None, use_t5: bool = True, max_sequence_length: int = 256,
                 attention_backend: str | None = None, offload_idle: bool = False, embedding_cache_dir: str | None = None,
                 cache_namespace: str = "in-memory"):
        if not use_t5 and pipe.text_encoder_3 is not None:
            pipe = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.offload = bool(offload_idle)
        self.max_sequence_length = int(max_sequence_length)
        self.encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]
        place_modules(self.denoiser, self.encoders + [self.vae], device, self.offload, attention_backend)

        scale = pipe.vae_scale_factor
        resolution = int(resolution) if resolution is not None else self.denoiser.config.sample_size * scale
        multiple = scale * self.denoiser.config.patch_size
        self.resolution = checked_resolution(resolution, multiple, "VAE factor x patch size")
        self.latent_shape = (self.denoiser.config.in_channels, resolution // scale, resolution // scale)

        overrides = {} if shift is None else {"shift": float(shift), "use_dynamic_shifting": False}
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **overrides)
        self.cache = PromptEmbeddingCache(
            embedding_cache_dir, f"sd3|{cache_namespace}|t5={pipe.text_encoder_3 is not None}|len={self.max_sequence_length}")

    # -- loading / saving: from_pretrained, save_pretrained, save_lora_weights from TransformerPipelineIO --
    pipeline_cls: type = StableDiffusion3Pipeline
    options: tuple[str, ...] = SD3_OPTIONS
    family = "sd3"

    @classmethod
    def _load_kwargs(cls, options: dict) -> dict:
        """With ``use_t5=False`` T5 (``text_encoder_3`` / ``tokenizer_3``) is not loaded."""
        return {} if options.get("use_t5", True) else {"text_encoder_3": None, "tokenizer_3": None}

    # -- protocol -------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [n, 77 + L_t5, D], "pooled": [n, D_pool]}`` from the pipeline's encode_prompt."""
        def compute(batch: list[str]) -> dict[str, Tensor]:
            with ExitStack() as stack:
                for m in self.encoders:
                    stack.enter_context(on_device(m, self.device, self.offload))
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    prompt=batch, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
                    max_sequence_length=self.max_sequence_length)
            return {"prompt_embeds": embeds, "pooled": pooled}

        out = self.cache.get_or_compute(list(prompts), compute)
        return {k: v.to(self.device, self.dtype) for k, v in out.items()}

    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's schedule: ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)`` with the
        shift of Esser et al. 2024 Eq. 23 (``sigma' = s sigma / (1 + (s - 1) sigma)``), then a final 0."""
        kwargs = {}
        if self.scheduler.config.use_dynamic_shifting:  # resolution-dependent mu, as the SD3 pipeline computes it
            from .flux import calculate_mu

            c = self.scheduler.config
            p = self.denoiser.config.patch_size
            seq = (self.latent_shape[1] // p) * (self.latent_shape[2] // p)
            kwargs["mu"] = calculate_mu(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                        c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        self.scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        return self.scheduler.sigmas.clone()

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        return self._forward_module(hidden_states=x_t, timestep=sigma * 1000.0, encoder_hidden_states=tensors["prompt_embeds"],
                                    pooled_projections=tensors["pooled"], return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """``[B, C, h, w]`` latents -> ``[B, 3, H, W]`` images in [0, 1] (VAE scaling + shift factors)."""
        return decode_shifted_latents(self.vae, latents, self.device, self.offload)
