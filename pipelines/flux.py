"""FLUX.1 [dev] / [schnell] adapter on top of diffusers' ``FluxPipeline`` components.

The denoiser is ``FluxTransformer2DModel``: an MMDiT over 2x2-packed latent patches with 3-axis
RoPE position ids (image tokens ``(0, row, col)``, text tokens all zero), conditioned on the T5
sequence and the pooled CLIP-L output. FLUX.1-dev is guidance-distilled: the guidance strength is
an *input* (``guidance``, 3.5 by default) and there is no true classifier-free guidance
(``sampling.guidance_scale`` stays 1; with negative prompts and a scale > 1 ``predict`` does true
CFG as ``FluxPipeline(true_cfg_scale=...)``). FLUX.1-schnell has no guidance embedding.

**Latent layout.** ``latent_shape = (C, h, w)`` is the *unpacked* VAE latent (C = 16, h = H/8);
packing into ``[h/2 * w/2, 4C]`` tokens happens inside ``_velocity`` and is a pure permutation, so
the Euler / SDE steps of flowalign give the same result in either layout. ``FluxPipeline``
(``output_type="latent"``) returns the packed form: ``unpack_latents`` converts it.

Schedule: ``FluxPipeline`` passes ``sigmas = linspace(1, 1/T, T)`` and a resolution-dependent ``mu``
(:func:`calculate_mu`) to the scheduler's exponential time shift (:func:`time_shift`). The
``shift`` option replaces it by the static SD3 shift on ``linspace(1, 0, T + 1)`` as DanceGRPO does.
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import torch
from diffusers import FluxPipeline
from torch import Tensor


from .base import AdapterBase, static_shift_sigmas
from .common import (PromptEmbeddingCache, TransformerPipelineIO, checked_resolution, decode_shifted_latents, on_device,
                     place_modules)

FLUX_OPTIONS = ("resolution", "shift", "guidance", "max_sequence_length", "attention_backend", "offload_idle",
                "embedding_cache_dir")


# -- pure conversions -----------------------------------------------------------------------------
def calculate_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                 max_shift: float = 1.15) -> float:
    """Resolution-dependent shift parameter of FLUX.1 (diffusers ``pipeline_flux.calculate_shift``;
    SD3 paper, Esser et al. 2024, Sec. 5.3.2): ``mu`` is linear in the number of image tokens,
    ``base_shift`` at ``base_seq_len`` and ``max_shift`` at ``max_seq_len``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def time_shift(mu: float, sigmas: Tensor) -> Tensor:
    """Exponential time shift of FLUX.1 (``FlowMatchEulerDiscreteScheduler.time_shift``, exponential
    type): ``sigma' = e^mu / (e^mu + (1/sigma - 1))``; equals the SD3 shift with ``s = e^mu``."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def flux_sigmas(num_steps: int, mu: float) -> Tensor:
    """``[T + 1]`` fp32 schedule of ``FluxPipeline``: ``time_shift(mu, linspace(1, 1/T, T))`` then 0."""
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    return torch.cat([time_shift(mu, base), torch.zeros(1, dtype=torch.float64)]).float()


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, h/2 * w/2, 4C]``: each 2x2 patch becomes one token, channel-major
    inside the token (FLUX.1's patchification, ``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`: ``[B, h/2 * w/2, 4C]`` -> ``[B, C, h, w]`` (latent h, w)."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(rows: int, cols: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """RoPE position ids ``[rows * cols, 3]`` of the packed image tokens: ``(0, row, col)`` row-major."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    ids = torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(rows * cols, 3)
    return ids.to(device=device, dtype=dtype)


class FluxAdapter(TransformerPipelineIO, AdapterBase):
    """FLUX.1 pipeline adapter.

    Args:
        pipe: a ``FluxPipeline`` (its components are used, never its ``__call__``).
        device: where the transformer (and, unless ``offload_idle``, the encoders and VAE) live.
        resolution: image side in pixels (multiple of 16); default 512.
        shift: static SD3-style shift on ``linspace(1, 0, T+1)`` (DanceGRPO uses 3); None = the
            pipeline's schedule (dynamic ``mu`` for dev, the scheduler's shift for schnell).
        guidance: the distilled-guidance input; default 3.5 when the transformer has a guidance
            embedding (dev); must be None for schnell.
        max_sequence_length: T5 tokens (the pipeline's default 512).
        attention_backend, offload_idle, embedding_cache_dir, cache_namespace: as for SD3.
    """

    # diffusers' FLUX DreamBooth-LoRA targets: attention and MLPs of both streams (double blocks)
    # and the attention projections of the single blocks.
    lora_target_modules = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                           "ff_context.net.2"]

    def __init__(self, pipe: FluxPipeline, *, device: str | torch.device = "cpu", resolution: int = 512,
                 shift: float | None = None, guidance: float | None = None, max_sequence_length: int = 512,
                 attention_backend: str | None = None, offload_idle: bool = False, embedding_cache_dir: str | None = None,
                 cache_namespace: str = "in-memory"):
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.offload = bool(offload_idle)
        self.max_sequence_length = int(max_sequence_length)
        self.encoders = [pipe.text_encoder, pipe.text_encoder_2]
        place_modules(self.denoiser, self.encoders + [self.vae], device, self.offload, attention_backend)

        if self.denoiser.config.guidance_embeds:
            self.guidance = 3.5 if guidance is None else float(guidance)
        elif guidance is not None:
            raise ValueError(f"guidance={guidance}: this FLUX transformer has no guidance embedding (schnell); leave it unset")
        else:
            self.guidance = None

        multiple = pipe.vae_scale_factor * 2
        self.resolution = checked_resolution(resolution, multiple, "VAE factor x 2x2 packing")
        side = 2 * (self.resolution // multiple)
        self.latent_shape = (self.denoiser.config.in_channels // 4, side, side)

        c = pipe.scheduler.config
        for flag in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
            if c.get(flag):
                raise ValueError(f"scheduler option {flag}={c.get(flag)!r} is not supported by the FLUX adapter")
        if shift is None and not c.use_dynamic_shifting:
            shift = c.shift  # schnell: static shift (1.0)
        self.shift = None if shift is None else float(shift)
        self.mu = calculate_mu((side // 2) ** 2, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        self.cache = PromptEmbeddingCache(embedding_cache_dir, f"flux|{cache_namespace}|len={self.max_sequence_length}")

    # -- loading / saving: from_pretrained, save_pretrained, save_lora_weights from TransformerPipelineIO --
    pipeline_cls: type = FluxPipeline
    options: tuple[str, ...] = FLUX_OPTIONS
    family = "flux"

    # -- protocol -------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [n, L_t5, D], "pooled": [n, D_clip]}`` from the pipeline's encode_prompt."""
        def compute(batch: list[str]) -> dict[str, Tensor]:
            with ExitStack() as stack:
                for m in self.encoders:
                    stack.enter_context(on_device(m, self.device, self.offload))
                embeds, pooled, _ = self.pipe.encode_prompt(prompt=batch, prompt_2=None, device=self.device,
                                                            max_sequence_length=self.max_sequence_length)
            return {"prompt_embeds": embeds, "pooled": pooled}

        out = self.cache.get_or_compute(list(prompts), compute)
        return {k: v.to(self.device, self.dtype) for k, v in out.items()}

    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's schedule (:func:`flux_sigmas` with this resolution's ``mu``), or with the
        ``shift`` option the static shift of Esser et al. 2024 Eq. 23 on ``linspace(1, 0, T+1)``."""
        if self.shift is not None:
            return static_shift_sigmas(num_steps, self.shift)
        return flux_sigmas(num_steps, self.mu)

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        _, h, w = self.latent_shape
        n = x_t.shape[0]
        embeds = tensors["prompt_embeds"]
        guidance = None if self.guidance is None else torch.full((n,), self.guidance, device=x_t.device, dtype=torch.float32)
        out = self._forward_module(
            hidden_states=pack_latents(x_t),
            timestep=(sigma * 1000.0).to(x_t.dtype) / 1000.0,  # the pipeline's timestep / 1000, in the latents' dtype
            guidance=guidance,
            pooled_projections=tensors["pooled"],
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=latent_image_ids(h // 2, w // 2, x_t.device, x_t.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Unpacked ``[B, C, h, w]`` latents -> ``[B, 3, H, W]`` images in [0, 1] (VAE scaling + shift)."""
        return decode_shifted_latents(self.vae, latents, self.device, self.offload)
