"""Stable Diffusion 1.x / 2.x adapter: a DDPM UNet (epsilon- or v-prediction) seen as a flow model.

Built on the diffusers components of ``StableDiffusionPipeline`` (UNet, KL VAE, CLIP text encoder);
prompt encoding reuses the pipeline's own ``encode_prompt``. The UNet output is converted to the
flow velocity by :mod:`flowalign.pipelines.ddpm_flow`, the schedule is the model's DDIM schedule
mapped to flow sigmas, so ``sample_ode`` on this adapter *is* DDIM (eta = 0) sampling and reproduces
``StableDiffusionPipeline`` with a ``DDIMScheduler`` (``tests/test_adapter_sd.py``).

Conventions (all latents handed in and out are flow latents):
* ``sigmas(T)`` starts at the flow sigma of the first DDIM timestep (~0.94 for SD's betas, not 1)
  and ends at that of the final alpha (``alphas_cumprod[0]`` -> ~0.028 when ``set_alpha_to_one``
  is False, as in SD's config; 0 otherwise). The end does not depend on ``T``.
* ``init_latents`` is the flow image of the pipeline's start ``x_T = eps`` at ``sigmas(T)[0]``.
* ``decode`` takes final latents (at ``sigmas(T)[-1]``), maps them back to DDPM space and decodes
  them as the pipeline does; ``decode(..., sigma=s)`` decodes latents of another noise level.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import Tensor

from flowalign.types import Conditioning

from .base import AdapterBase
from .common import PromptEmbeddingCache, merged_lora_copy, on_device, set_attention_backend
from .ddpm_flow import DDIMFlowSchedule, alpha_bar_from_sigma, flow_velocity, from_ddpm, to_ddpm

# DDPO-form quantities (Black et al. 2023 work in DDPM space): ``adapter.alphas_cumprod`` and these
# pure conversions between flow latents and DDPM latents.
__all__ = ["StableDiffusionAdapter", "alpha_bar_from_sigma", "check_pretrained_dir", "from_ddpm",
           "to_ddpm"]


def check_pretrained_dir(path: str) -> None:
    """Raise ``FileNotFoundError`` unless ``path`` is a diffusers pipeline folder or looks like a hub id."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"{path!r} has no model_index.json: expected a diffusers pipeline folder (save_pretrained layout)")
    elif os.path.exists(path) or path.count("/") != 1 or path.startswith((".", "/")):
        raise FileNotFoundError(f"pretrained model not found: {path!r} is neither a pipeline folder nor a hub id")


class StableDiffusionAdapter(AdapterBase):
    """Pipeline adapter for SD 1.x / 2.x (``StableDiffusionPipeline`` checkpoints).

    Args:
        pipe: a ``StableDiffusionPipeline`` whose components the adapter uses (not copied).
        timestep_spacing: DDIM spacing, see :class:`DDIMFlowSchedule` (default "trailing").
        resolution: image side in pixels; default ``unet.sample_size * vae_scale_factor``.
        clip_skip: CLIP layers skipped by the prompt encoder (as the pipeline's ``clip_skip``).
        attention_backend: diffusers attention backend of the UNet (None = SDPA).
        offload_idle: keep the VAE / text encoder(s) on the CPU except while they run.
        embedding_cache_dir: on-disk prompt-embedding cache (None = off).
    """

    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' SD LoRA recipe, as DDPO
    pipeline_class_name = "StableDiffusionPipeline"
    load_kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False, "feature_extractor": None}

    def __init__(self, pipe: Any, *, timestep_spacing: str | None = "trailing", resolution: int | None = None,
                 clip_skip: int | None = None, attention_backend: str | None = None, offload_idle: bool = False,
                 embedding_cache_dir: str | None = None, name_or_path: str = ""):
        self.pipe = pipe
        self.unet = self.denoiser = pipe.unet
        self.vae = pipe.vae.requires_grad_(False).eval()
        self.text_encoders = [m.requires_grad_(False).eval() for m in self._text_encoder_modules()]
        self.schedule = DDIMFlowSchedule(pipe.scheduler.config, timestep_spacing)
        self.alphas_cumprod = self.schedule.alphas_cumprod  # [N] alpha_bar_t, for DDPO-form steps
        self.clip_skip = clip_skip
        self.offload_idle = bool(offload_idle)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(resolution if resolution is not None else self.unet.config.sample_size * factor)
        if self.resolution <= 0 or self.resolution % factor:
            raise ValueError(f"resolution={self.resolution} must be a positive multiple of the VAE factor {factor}")
        self.latent_shape = (self.unet.config.in_channels, self.resolution // factor, self.resolution // factor)
        set_attention_backend(self.unet, attention_backend)
        max_len = self.pipe.tokenizer.model_max_length
        self.cache = PromptEmbeddingCache(
            embedding_cache_dir, f"{type(self).__name__}|{name_or_path}|{max_len}|clip_skip={clip_skip}")
        if self.offload_idle:
            for m in (self.vae, *self.text_encoders):
                m.to("cpu")

    def _text_encoder_modules(self) -> list[torch.nn.Module]:
        return [self.pipe.text_encoder]

    # -- loading / saving ---------------------------------------------------------------------
    @classmethod
    def _pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        variant: str | None = None, **options: Any) -> "StableDiffusionAdapter":
        """Load a diffusers pipeline folder or hub id (safety checker / feature extractor skipped)."""
        check_pretrained_dir(path)
        pipe = cls._pipeline_class().from_pretrained(path, dtype=dtype, variant=variant, **cls.load_kwargs)
        # with offload_idle only the UNet goes to the accelerator (the others never visit it at once)
        (pipe.unet if options.get("offload_idle") else pipe).to(device)
        return cls(pipe, name_or_path=os.path.abspath(path) if os.path.isdir(path) else path, **options)

    def save_pretrained(self, directory: str) -> None:
        """Save the pipeline layout with the current UNet (LoRA merged into a copy, if any)."""
        unet = merged_lora_copy(self.unet) if self.has_lora() else self.unet
        pipe = copy.copy(self.pipe)
        pipe.register_modules(unet=unet)
        pipe.save_pretrained(directory)

    def save_lora_weights(self, directory: str) -> None:
        """Write the UNet LoRA in diffusers' format, loadable with
        ``<Pipeline>.from_pretrained(base).load_lora_weights(directory)``."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if not self.has_lora():
            raise RuntimeError("save_lora_weights: the UNet has no LoRA adapter (model.lora_rank is 0)")
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        peft_config = self.unet.peft_config["default"].to_dict()
        self._pipeline_class().save_lora_weights(directory, unet_lora_layers=layers,
                                                 unet_lora_adapter_metadata=peft_config, safe_serialization=True)

    # -- protocol -------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "StableDiffusionAdapter":
        self.unet.to(device)
        if not self.offload_idle:
            for m in (self.vae, *self.text_encoders):
                m.to(device)
        return self

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [B, L, D]}`` via ``StableDiffusionPipeline.encode_prompt``."""
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False, clip_skip=self.clip_skip)
        return {"prompt_embeds": embeds}

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        with on_device(self.text_encoders[0], self.device, self.offload_idle):
            for m in self.text_encoders[1:]:
                m.to(self.device)
            try:
                out = self.cache.get_or_compute(list(prompts), self._encode_batch)
            finally:
                if self.offload_idle:
                    for m in self.text_encoders[1:]:
                        m.to("cpu")
        return {k: v.to(device=self.device, dtype=self.dtype) for k, v in out.items()}

    def encode(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Conditioning:
        """Encode ``B`` prompts; with ``negative_prompts`` also the CFG negatives (same keys)."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(negative_prompts)} negative_prompts")
        negative = None if negative_prompts is None else self._encode_negative(list(negative_prompts))
        return Conditioning(self._encode(list(prompts)), negative)

    def _encode_negative(self, negative_prompts: list[str]) -> dict[str, Tensor]:
        return self._encode(negative_prompts)

    def init_latents(self, n: int, generator: torch.Generator | None = None, num_steps: int | None = None) -> Tensor:
        """``[n, *latent_shape]`` flow latents at ``sigmas(num_steps)[0]``: the pipeline's start
        ``x_T = eps`` mapped by :func:`from_ddpm`. ``num_steps`` is only needed with "leading" spacing."""
        if num_steps is None:
            if not self.schedule.first_sigma_is_fixed():
                raise ValueError("init_latents: with timestep_spacing='leading' the first noise level depends on the "
                                 "step count; pass num_steps=T or use timestep_spacing='trailing'")
            num_steps = 1
        gen_device = generator.device if generator is not None else "cpu"
        eps = torch.randn((n, *self.latent_shape), generator=generator, device=gen_device)
        alpha_bar = alpha_bar_from_sigma(self.sigmas(num_steps)[0])
        return from_ddpm(eps, alpha_bar).to(self.device)

    def sigmas(self, num_steps: int) -> Tensor:
        """``[T + 1]`` fp32 flow sigmas of the DDIM schedule (see :class:`DDIMFlowSchedule`)."""
        return self.schedule.sigmas(num_steps)

    def _unet_kwargs(self, tensors: dict[str, Tensor], batch: int) -> dict[str, Any]:
        return {}

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """Flow x_t -> DDPM latent and timestep, run the UNet, convert its output to ``v = eps - x0``."""
        alpha_bar = alpha_bar_from_sigma(sigma)
        x_ddpm = to_ddpm(x_t, sigma).to(x_t.dtype)
        t = self.schedule.unet_timesteps(sigma).to(device=x_t.device, dtype=torch.float32)
        out = self._forward_module(x_ddpm, t, encoder_hidden_states=tensors["prompt_embeds"],
                                   **self._unet_kwargs(tensors, x_t.shape[0])).sample
        return flow_velocity(out, x_ddpm, alpha_bar, self.schedule.prediction_type)

    @torch.no_grad()
    def decode(self, latents: Tensor, sigma: float | None = None) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] from flow latents at ``sigma`` (default: the schedule's end)."""
        x = to_ddpm(latents.float(), self.schedule.final_sigma if sigma is None else sigma)
        cfg = self.vae.config
        with on_device(self.vae, self.device, self.offload_idle):
            if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
                mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(x)
                std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(x)
                x = x * std / cfg.scaling_factor + mean
            else:
                x = x / cfg.scaling_factor
            upcast = self.vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)  # as the pipelines do
            vae = self.vae.float() if upcast else self.vae
            try:
                image = vae.decode(x.to(device=vae.device, dtype=vae.dtype)).sample
            finally:
                if upcast:
                    self.vae.to(torch.float16)
        return (image.float() / 2 + 0.5).clamp(0, 1).to(self.device)
