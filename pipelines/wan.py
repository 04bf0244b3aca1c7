"""Wan 2.1 / 2.2 text-to-video adapter (``WanTransformer3DModel`` + ``AutoencoderKLWan`` + UMT5).

Loads a diffusers ``WanPipeline`` folder (``model_index.json`` layout, local path or hub id) and
exposes it in flowalign's flow convention. Wan is trained with rectified flow (Wan team 2025,
"Wan: Open and Advanced Large-Scale Video Generative Models", Sec. 3.1), so the transformer output
already is the velocity ``v = eps - x0`` at ``x_t = (1 - sigma) x0 + sigma eps``, timestep
``1000 sigma`` -- exactly what ``WanPipeline`` feeds ``FlowMatchEulerDiscreteScheduler``.

Wan 2.2 A14B carries two experts: ``transformer`` denoises while ``1000 sigma >= 1000 *
boundary_ratio`` (high noise), ``transformer_2`` below. Both are loaded when present; the one named
by ``trainable_expert`` is trained (LoRA), the other stays frozen.

Wan 2.2 TI2V-5B, text-to-video (``expand_timesteps=True`` in ``model_index.json``): one 48-channel
transformer on the Wan 2.2 VAE (48 latent channels, 16x spatial compression, the VAE's own 2x2 patchify
inside ``encode`` / ``decode``). ``WanPipeline`` then gives the transformer one timestep per latent token,
``(mask[0][0][:, ::2, ::2] * t).flatten()`` with ``mask = ones`` (every token at ``1000 sigma``), which
:meth:`WanAdapter._expert_call` reproduces. Its image-to-video mode is refused by
:class:`~flowalign.pipelines.wan_i2v.WanImageToVideoAdapter` (see there).

Video latents are ``[B, C, F_lat, H/s, W/s]`` with ``F_lat = (num_frames - 1) / 4 + 1`` and ``s`` the VAE's
``scale_factor_spatial`` (8 for Wan 2.1 / 2.2 A14B, 16 for the Wan 2.2 VAE).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from torch import Tensor, nn


from .base import AdapterBase
from .common import (PromptEmbeddingCache, merged_lora_copy, on_device, save_options, save_transformer_lora, saved_options,
                     set_attention_backend)


def zero_padding(embeds: Tensor, mask: Tensor) -> Tensor:
    """Zero the encoder states at padded positions (``WanPipeline._get_t5_prompt_embeds`` keeps
    only the first ``sum(mask)`` tokens and pads with zeros). ``embeds [B, L, D]``, ``mask [B, L]``."""
    lengths = mask.gt(0).sum(dim=1)
    keep = torch.arange(embeds.shape[1], device=embeds.device)[None, :] < lengths.to(embeds.device)[:, None]
    return embeds * keep[..., None].to(embeds.dtype)


def flow_euler_sigmas(num_steps: int, shift: float) -> Tensor:
    """The ``[num_steps + 1]`` schedule of ``FlowMatchEulerDiscreteScheduler(shift=shift)`` (SD3 shift,
    Esser et al. 2024 Eq. 23, applied by the scheduler), which is the sampler ``WanPipeline`` uses here."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.to(torch.float32).clone()


def video_latent_shape(channels: int, num_frames: int, height: int, width: int, temporal: int, spatial: int,
                       patch: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """``(C, F_lat, H_lat, W_lat)`` for a ``num_frames x height x width`` video, checking divisibility."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames={num_frames}: must be 1 + a multiple of {temporal} (the VAE's temporal factor)")
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % (spatial * patch[1]):
            raise ValueError(f"{name}={size}: must be a positive multiple of {spatial * patch[1]} (VAE factor x patch size)")
    return channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial


class WanAdapter(AdapterBase):
    """Pipeline adapter for Wan text-to-video.

    Args:
        pipe: a ``WanPipeline`` (its tokenizer, text encoder, VAE, transformer(s) are used; its
            scheduler is only kept for ``save_pretrained``).
        height, width, num_frames: video size in pixels / frames (Wan 2.1 480p: 480 x 832 x 81).
        shift: flow shift of the sigma schedule; ``None`` reads the scheduler's ``flow_shift`` /
            ``shift`` (Wan 2.1 uses 3.0 at 480p and 5.0 at 720p).
        max_sequence_length: UMT5 tokens per prompt (512 as in ``WanPipeline``).
        trainable_expert: ``"high"`` (``transformer``) or ``"low"`` (``transformer_2``, Wan 2.2).
        attention_backend, offload_idle, embedding_cache_dir: see ``pipelines/common.py``.
    """

    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]

    def __init__(self, pipe: WanPipeline, height: int = 480, width: int = 832, num_frames: int = 81,
                 shift: float | None = None, max_sequence_length: int = 512, trainable_expert: str = "high",
                 attention_backend: str | None = None, offload_idle: bool = False,
                 embedding_cache_dir: str | None = None, name: str = "wan"):
        self.pipe = pipe
        self.transformer, self.transformer_2 = pipe.transformer, getattr(pipe, "transformer_2", None)
        self.text_encoder = pipe.text_encoder.requires_grad_(False).eval()
        self.vae = pipe.vae.requires_grad_(False).eval()
        self.tokenizer = pipe.tokenizer
        self.boundary_ratio = pipe.config.get("boundary_ratio")
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))
        if self.transformer is None:
            raise ValueError("WanAdapter: the pipeline has no 'transformer' (text-to-video needs it)")
        if self.transformer_2 is not None and self.boundary_ratio is None:
            raise ValueError("WanAdapter: the pipeline has 'transformer_2' but no 'boundary_ratio' in model_index.json")
        if trainable_expert not in ("high", "low") or (trainable_expert == "low" and self.transformer_2 is None):
            raise ValueError(f"trainable_expert={trainable_expert!r}: use 'high', or 'low' for a pipeline with transformer_2")
        self.trainable_expert = trainable_expert
        self.denoiser = self.transformer if trainable_expert == "high" else self.transformer_2
        for expert in (self.transformer, self.transformer_2):
            if expert is not None:
                set_attention_backend(expert, attention_backend)
                if expert is not self.denoiser:
                    expert.requires_grad_(False).eval()
        if shift is None:
            sched = pipe.scheduler.config
            shift = sched.get("flow_shift") or sched.get("shift") or 5.0
        self.shift = float(shift)
        self.height, self.width, self.num_frames = int(height), int(width), int(num_frames)
        self.max_sequence_length = int(max_sequence_length)
        self.offload_idle = bool(offload_idle)
        vae_cfg = self.vae.config
        self.latent_shape = video_latent_shape(self.transformer.config.in_channels, self.num_frames, self.height, self.width,
                                               vae_cfg.scale_factor_temporal, vae_cfg.scale_factor_spatial,
                                               tuple(self.transformer.config.patch_size))
        self.cache = PromptEmbeddingCache(embedding_cache_dir, f"wan|{name}|{self.max_sequence_length}")

    # -- loading / saving -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        **options) -> "WanAdapter":
        """Load a ``WanPipeline`` folder / hub id; ``options`` are the constructor's keyword arguments
        (defaults from ``flowalign_adapter.json`` in ``path`` when a flowalign run saved it)."""
        options = saved_options(path, options, "WanPipeline.save_pretrained")
        pipe = WanPipeline.from_pretrained(path, torch_dtype=dtype)
        adapter = cls(pipe, name=path, **options)
        return adapter.to(device)

    def save_pretrained(self, directory: str) -> None:
        """``WanPipeline.save_pretrained`` layout (LoRA merged into a copy of the trained expert)
        plus ``flowalign_adapter.json`` with the video size, shift and expert choice."""
        experts = self._experts_to_save()
        pipe = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                           scheduler=self.pipe.scheduler, boundary_ratio=self.boundary_ratio,
                           expand_timesteps=self.expand_timesteps, **experts)
        pipe.save_pretrained(directory)
        save_options(directory, {"height": self.height, "width": self.width, "num_frames": self.num_frames,
                                 "shift": self.shift, "max_sequence_length": self.max_sequence_length,
                                 "trainable_expert": self.trainable_expert})

    def _experts_to_save(self) -> dict[str, nn.Module]:
        """``transformer`` / ``transformer_2`` as saved: the trained expert with its LoRA merged into a copy."""
        denoiser = merged_lora_copy(self.denoiser) if self.has_lora() else self.denoiser
        experts = {"transformer": self.transformer, "transformer_2": self.transformer_2}
        experts["transformer" if self.trainable_expert == "high" else "transformer_2"] = denoiser
        return experts

    def save_lora_weights(self, directory: str) -> None:
        """The trained expert's LoRA in the diffusers format: ``WanPipeline.load_lora_weights(directory)``
        reproduces it (add ``load_into_transformer_2=True`` when ``trainable_expert == "low"``)."""
        save_transformer_lora(WanPipeline, self.denoiser, directory)

    # -- protocol -------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "WanAdapter":
        for expert in (self.transformer, self.transformer_2):
            if expert is not None:
                expert.to(device)
        idle = "cpu" if self.offload_idle else device
        self.text_encoder.to(idle)
        self.vae.to(idle)
        return self

    def _encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """UMT5 states ``[n, max_sequence_length, D]``, padding zeroed (as ``WanPipeline``)."""
        tokens = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        with on_device(self.text_encoder, self.device, self.offload_idle):
            states = self.text_encoder(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)).last_hidden_state
        return {"prompt_embeds": zero_padding(states, tokens.attention_mask)}

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [n, L, D]}`` through the on-disk cache (see :meth:`_encode_text`)."""
        return {k: v.to(self.device, self.dtype) for k, v in self.cache.get_or_compute(prompts, self._encode_text).items()}

    def sigmas(self, num_steps: int) -> Tensor:
        return flow_euler_sigmas(num_steps, self.shift)

    def _expert_call(self, module: nn.Module, x_t: Tensor, timestep: Tensor, embeds: Tensor) -> Tensor:
        if self.expand_timesteps:  # Wan 2.2 TI2V: one timestep per latent token (patch 1x2x2), as WanPipeline
            p = self.transformer.config.patch_size
            tokens = x_t.shape[2] // p[0] * (x_t.shape[3] // p[1]) * (x_t.shape[4] // p[2])
            timestep = timestep[:, None].expand(-1, tokens)
        return module(hidden_states=x_t.to(self.dtype), timestep=timestep, encoder_hidden_states=embeds.to(self.dtype),
                      return_dict=False)[0]

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        timestep = sigma.to(torch.float32) * 1000.0  # diffusers' flow convention: t = 1000 sigma
        embeds = tensors["prompt_embeds"]
        if self.transformer_2 is None:
            return self._expert_call(self._forward_module, x_t, timestep, embeds)
        trained = self._forward_module
        high_module = trained if self.trainable_expert == "high" else self.transformer
        low_module = trained if self.trainable_expert == "low" else self.transformer_2
        high = timestep >= self.boundary_ratio * 1000.0  # WanPipeline: t >= boundary_ratio * num_train_timesteps
        parts, order = [], []
        for module, rows in ((high_module, high.nonzero().squeeze(1)), (low_module, (~high).nonzero().squeeze(1))):
            if len(rows):
                parts.append(self._expert_call(module, x_t[rows], timestep[rows], embeds[rows]))
                order.append(rows)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """``[B, F, 3, H, W]`` in [0, 1]: un-normalise with the VAE's latents_mean / latents_std and
        decode, as ``WanPipeline`` does for ``output_type != "latent"``."""
        cfg = self.vae.config
        with on_device(self.vae, self.device, self.offload_idle):
            z = latents.to(self.vae.device, self.vae.dtype)
            mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            video = self.vae.decode(z / inv_std + mean, return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).to(latents.device)
