"""Z-Image adapter on top of diffusers' ``ZImagePipeline`` components.

The denoiser is ``ZImageTransformer2DModel`` (a single-stream DiT over 2x2 latent patches with 3-axis RoPE),
conditioned on the second-to-last hidden state of a Qwen3 text encoder, *without padding*: the pipeline
passes one ``[L_i, D]`` tensor per prompt (``ZImagePipeline._encode_prompt`` keeps the attention-masked
tokens only) and the latents as a list of ``[C, 1, h, w]`` tensors. Conditionings in flowalign are batched,
so ``encode`` keeps the padded ``[n, L, D]`` hidden states plus the ``[n, L]`` boolean mask, and
``_velocity`` un-pads them into the list form.

**Conventions converted in** ``_velocity`` (both from ``ZImagePipeline.__call__``):

- time runs the other way: the transformer is called with ``t = (1000 - 1000 sigma) / 1000 = 1 - sigma``;
- it predicts ``-v``: the pipeline negates the output (``noise_pred = -noise_pred``) before the Euler step,
  so ``v = eps - x0 = -transformer(...)``.

**CFG.** ``ZImagePipeline`` writes guidance as ``pos + s (pos - neg)`` (enabled for ``s > 0``), which is
flowalign's ``neg + g (pos - neg)`` with ``g = 1 + s``: ``sampling.guidance_scale`` = the pipeline's
``guidance_scale`` + 1 (Z-Image base's recommended 4.0 -> 5.0; Z-Image-Turbo runs without CFG, 1.0). The
pipeline's ``cfg_normalization`` / ``cfg_truncation`` extras (off by default) are not reproduced.

Schedule: ``sigmas = linspace(1, 1/T, T)`` with ``mu`` of FLUX.1's ``calculate_shift`` for
``h/2 * w/2`` tokens, through the scheduler's shift (dynamic or static; :func:`flow_match_sigmas`).
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline
from torch import Tensor

from .base import AdapterBase, static_shift_sigmas
from .common import (PromptEmbeddingCache, TransformerPipelineIO, checked_resolution, decode_shifted_latents, on_device,
                     place_modules)
from .flux import calculate_mu
from .flux2 import flow_match_sigmas

Z_IMAGE_OPTIONS = ("resolution", "shift", "max_sequence_length", "attention_backend", "offload_idle", "embedding_cache_dir")


# -- pure conversions -----------------------------------------------------------------------------
def model_timestep(sigma: Tensor) -> Tensor:
    """The transformer's time input ``(1000 - t) / 1000`` with ``t = 1000 sigma`` in fp32, computed as
    ``ZImagePipeline.__call__`` does (``timestep = (1000 - timestep) / 1000``): ``1 - sigma`` up to rounding."""
    t = sigma.float() * 1000.0
    return (1000.0 - t) / 1000.0


def unpad(embeds: Tensor, mask: Tensor) -> list[Tensor]:
    """``[n, L, D]`` padded hidden states and their ``[n, L]`` bool mask -> ``n`` tensors ``[L_i, D]`` of the
    attended tokens (``ZImagePipeline._encode_prompt``'s ``prompt_embeds[i][prompt_masks[i]]``)."""
    return [e[m] for e, m in zip(embeds, mask.bool())]


def guidance_scale_from_pipeline(pipeline_scale: float) -> float:
    """flowalign's CFG scale for ``ZImagePipeline(guidance_scale=s)``: ``pos + s (pos - neg) = neg + (1 + s)(pos - neg)``."""
    return 1.0 + float(pipeline_scale)


class ZImageAdapter(TransformerPipelineIO, AdapterBase):
    """Z-Image (Turbo / base) pipeline adapter.

    Args:
        pipe: a ``ZImagePipeline`` (components only, never its ``__call__``).
        device: where the transformer (and, unless ``offload_idle``, the text encoder and VAE) live.
        resolution: image side in pixels (multiple of 2 x the VAE factor, 16 for the released VAE); default 1024.
        shift: static SD3-style shift on ``linspace(1, 0, T+1)``; None = the pipeline's schedule.
        max_sequence_length: Qwen3 tokens (the pipeline's default 512).
        attention_backend, offload_idle, embedding_cache_dir, cache_namespace: as for FLUX.1.
    """

    # diffusers' Z-Image DreamBooth-LoRA targets (train_dreambooth_lora_z_image.py): the attention projections.
    lora_target_modules = ["to_k", "to_q", "to_v", "to_out.0"]

    def __init__(self, pipe: ZImagePipeline, *, device: str | torch.device = "cpu", resolution: int = 1024,
                 shift: float | None = None, max_sequence_length: int = 512, attention_backend: str | None = None,
                 offload_idle: bool = False, embedding_cache_dir: str | None = None, cache_namespace: str = "in-memory"):
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.offload = bool(offload_idle)
        self.max_sequence_length = int(max_sequence_length)
        place_modules(self.denoiser, [pipe.text_encoder, self.vae], device, self.offload, attention_backend)

        multiple = pipe.vae_scale_factor * 2
        self.resolution = checked_resolution(resolution, multiple, "VAE factor x 2x2 patches")
        side = 2 * (self.resolution // multiple)
        self.latent_shape = (self.denoiser.in_channels, side, side)
        self.shift = None if shift is None else float(shift)
        self.scheduler_config = dict(pipe.scheduler.config)
        c = self.scheduler_config
        self.mu = calculate_mu((side // 2) ** 2, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        if self.shift is None:
            flow_match_sigmas(c, 1, self.mu)  # reject unsupported scheduler options now
        self.cache = PromptEmbeddingCache(embedding_cache_dir, f"z_image|{cache_namespace}|len={self.max_sequence_length}")

    # -- loading / saving: from_pretrained, save_pretrained, save_lora_weights from TransformerPipelineIO --
    pipeline_cls: type = ZImagePipeline
    options: tuple[str, ...] = Z_IMAGE_OPTIONS
    family = "z_image"

    # -- protocol -------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [n, L, D], "prompt_mask": [n, L] bool}``: the pipeline's Qwen3 hidden states
        (``encode_prompt``), zero-padded to ``max_sequence_length`` with their attention mask."""
        def compute(batch: list[str]) -> dict[str, Tensor]:
            with on_device(self.pipe.text_encoder, self.device, self.offload):
                # encode_prompt rewrites its prompt list in place (chat template): hand it a copy
                rows, _ = self.pipe.encode_prompt(prompt=list(batch), device=self.device, do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_sequence_length)
            dim = rows[0].shape[-1]
            embeds = torch.zeros(len(rows), self.max_sequence_length, dim, dtype=rows[0].dtype, device=rows[0].device)
            mask = torch.zeros(len(rows), self.max_sequence_length, dtype=torch.bool, device=rows[0].device)
            for i, row in enumerate(rows):  # kept tokens first; unpad() returns exactly `row` again
                embeds[i, : len(row)] = row
                mask[i, : len(row)] = True
            return {"prompt_embeds": embeds, "prompt_mask": mask}

        out = self.cache.get_or_compute(list(prompts), compute)
        return {"prompt_embeds": out["prompt_embeds"].to(self.device, self.dtype),
                "prompt_mask": out["prompt_mask"].to(self.device, torch.bool)}

    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's schedule (:func:`flow_match_sigmas` with this resolution's ``mu``), or with the
        ``shift`` option the static shift of Esser et al. 2024 Eq. 23 on ``linspace(1, 0, T+1)``."""
        if self.shift is not None:
            return static_shift_sigmas(num_steps, self.shift)
        return flow_match_sigmas(self.scheduler_config, num_steps, self.mu)

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """``x_t [B, C, h, w]``, ``sigma [B]`` -> velocity ``[B, C, h, w]``."""
        x = x_t.to(self.dtype).unsqueeze(2)  # [B, C, 1, h, w]: one frame
        out = self._forward_module(list(x.unbind(0)), model_timestep(sigma),
                                   unpad(tensors["prompt_embeds"], tensors["prompt_mask"]), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the transformer predicts -v (ZImagePipeline: noise_pred = -noise_pred)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """``[B, C, h, w]`` latents -> ``[B, 3, H, W]`` images in [0, 1] (VAE scaling + shift)."""
        return decode_shifted_latents(self.vae, latents, self.device, self.offload)
