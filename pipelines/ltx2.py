"""LTX-2 text-to-audio+video adapter (``LTX2VideoTransformer3DModel`` + ``AutoencoderKLLTX2Video`` +
``AutoencoderKLLTX2Audio`` + vocoder + Gemma-3 text encoder with ``LTX2TextConnectors``), on ``LTX2Pipeline`` components.

LTX-2 (Lightricks' joint audio-video foundation model) denoises a video latent and an audio
latent *together*: one transformer call returns a velocity for each stream, and ``LTX2Pipeline`` steps both with the
same flow-matching Euler schedule (a copy of the scheduler for audio). The transformer output is the velocity
``v = eps - x0`` at ``x_t = (1 - sigma) x0 + sigma eps`` (the pipeline's ``convert_velocity_to_x0`` is
``x0 = x_t - sigma v``), timestep ``1000 sigma``; no conversion is needed.

**Latent layout.** The SDE and its log-probability must cover every latent the sampler steps, so the adapter's latent
is both streams flattened and concatenated: ``latent_shape = (N,)`` with ``N = S_v * C_v + L_a * C_a M``, where
``[S_v, C_v]`` are the pipeline's packed, *normalised* video tokens (``_pack_latents`` after ``_normalize_latents``)
and ``[L_a, C_a M]`` its packed, normalised audio tokens. The flow steps are elementwise, so stepping the
concatenation is exactly stepping both streams. :meth:`LTX2Adapter.split_latents` returns the pipeline's
``output_type="latent"`` pair (denormalised video ``[B, C, F, h, w]`` and audio ``[B, C, L, M]``).

**Guidance.** ``LTX2Pipeline`` guides in x0 space with a delta form, ``x0 = x0_c + (s - 1)(x0_c - x0_u)``; since
``x0 = x_t - sigma v`` is affine in ``v`` this equals CFG in velocity space, ``v = v_u + s (v_c - v_u)`` (Ho &
Salimans 2022, Eq. 6). Video and audio have separate scales (``audio_guidance_scale`` option). The pipeline's other
guidance terms (spatio-temporal guidance, modality isolation, guidance rescale) need extra transformer passes per step
and are not used here: the pipeline reproduces the adapter with ``stg_scale=0, modality_scale=1, guidance_rescale=0``.

**Schedule.** ``sigmas = linspace(1, 1/T, T)`` with the resolution-dependent ``mu = calculate_shift(S_v, ...)``
(``pipeline_ltx2.calculate_shift``: linear in the number of video tokens) given to the scheduler, which applies its
exponential time shift (and ``shift_terminal`` stretch when configured) and appends 0.

``decode`` returns the video frames (rewards see video); :meth:`LTX2Adapter.decode_audio` decodes the waveform
(audio VAE + vocoder, cheap next to the video VAE) for callers that want it.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack

import numpy as np
import torch
from diffusers import LTX2Pipeline
from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift
from diffusers.pipelines.ltx2.utils import conditioning_frame_rate
from torch import Tensor

from .base import AdapterBase, guided, sigma_batch
from .common import (PromptEmbeddingCache, check_options, merged_lora_copy, model_name, on_device, save_options,
                     save_transformer_lora, saved_options, set_attention_backend)
from flowalign.types import Conditioning

LTX2_OPTIONS = ("height", "width", "num_frames", "frame_rate", "max_sequence_length", "audio_guidance_scale",
                "attention_backend", "offload_idle", "embedding_cache_dir")


# -- pure conversions -------------------------------------------------------------------------------
def ltx2_mu(video_tokens: int, scheduler_config: dict) -> float:
    """``mu`` of ``LTX2Pipeline`` step 5: ``calculate_shift(S_v, base_image_seq_len, max_image_seq_len, base_shift,
    max_shift)`` with the pipeline's fallbacks 1024 / 4096 / 0.95 / 2.05 for keys the scheduler config lacks."""
    return calculate_shift(video_tokens, scheduler_config.get("base_image_seq_len", 1024),
                           scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.95),
                           scheduler_config.get("max_shift", 2.05))


def ltx2_sigmas(num_steps: int, scheduler, video_tokens: int) -> Tensor:
    """``[num_steps + 1]`` fp32 schedule of ``LTX2Pipeline``: ``linspace(1, 1/T, T)`` and :func:`ltx2_mu` given to
    (a copy of) the pipeline's ``FlowMatchEulerDiscreteScheduler.set_timesteps``, terminal 0 appended by it."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps),
                            mu=ltx2_mu(video_tokens, scheduler.config))
    return scheduler.sigmas.to(torch.float32).clone()


def audio_latent_frames(num_frames: int, frame_rate: float, sample_rate: int, hop_length: int, temporal: int) -> int:
    """Audio latent length of ``LTX2Pipeline`` step 4: ``round(num_frames / frame_rate * sample_rate / hop / temporal)``
    (the clip's duration in audio-latent frames)."""
    return round(num_frames / frame_rate * (sample_rate / hop_length / float(temporal)))


def split_flat(flat: Tensor, video: tuple[int, int], audio: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``[B, N]`` -> packed video ``[B, *video]`` and packed audio ``[B, *audio]`` tokens (first the video block)."""
    n_video = video[0] * video[1]
    return flat[:, :n_video].reshape(-1, *video), flat[:, n_video:].reshape(-1, *audio)


def join_flat(video: Tensor, audio: Tensor) -> Tensor:
    """Inverse of :func:`split_flat`: ``[B, S_v, C_v]`` and ``[B, L_a, D_a]`` -> ``[B, S_v C_v + L_a D_a]``."""
    return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)


class LTX2Adapter(AdapterBase):
    """Pipeline adapter for LTX-2 text-to-(audio+)video.

    Args:
        pipe: an ``LTX2Pipeline`` (text encoder, connectors, transformer, both VAEs and the vocoder are used; its
            scheduler gives the shift settings).
        height, width, num_frames, frame_rate: video size and playback rate (LTX-2: 512 x 768 x 121 at 24 fps; the
            frame rate sets the audio length and the RoPE time positions).
        max_sequence_length: Gemma tokens per prompt (1024 as in ``LTX2Pipeline``).
        audio_guidance_scale: CFG scale of the audio stream; ``None`` uses ``sampling.guidance_scale`` for both.
        attention_backend, offload_idle, embedding_cache_dir: see ``pipelines/common.py``.
    """

    # attention projections of every attention (video / audio self, text cross, audio<->video cross) and both MLPs
    modality = "video"  # decode returns frames; the flat joint latent does not say so by its shape
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj",
                           "audio_ff.net.2"]

    def __init__(self, pipe: LTX2Pipeline, height: int = 512, width: int = 768, num_frames: int = 121,
                 frame_rate: float = 24.0, max_sequence_length: int = 1024, audio_guidance_scale: float | None = None,
                 attention_backend: str | None = None, offload_idle: bool = False, embedding_cache_dir: str | None = None,
                 name: str = "ltx2"):
        if pipe.transformer is None:
            raise ValueError("LTX2Adapter: the pipeline has no 'transformer'")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.idle_modules = [m.requires_grad_(False).eval() for m in
                             (pipe.text_encoder, pipe.connectors, pipe.vae, pipe.audio_vae, pipe.vocoder)]
        set_attention_backend(self.denoiser, attention_backend)
        self.height, self.width, self.num_frames = int(height), int(width), int(num_frames)
        self.frame_rate, self.max_sequence_length = float(frame_rate), int(max_sequence_length)
        self.audio_guidance_scale = None if audio_guidance_scale is None else float(audio_guidance_scale)
        self.offload_idle = bool(offload_idle)
        self._set_geometry()
        self.cache = PromptEmbeddingCache(embedding_cache_dir, f"ltx2|{name}|{self.max_sequence_length}")

    def _set_geometry(self) -> None:
        """Latent sizes of both streams (``LTX2Pipeline`` steps 4), checked for exact divisibility."""
        pipe, cfg = self.pipe, self.denoiser.config
        temporal, spatial = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
        if self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise ValueError(f"num_frames={self.num_frames}: must be 1 + a multiple of {temporal} (the VAE's temporal compression)")
        for key, size in (("height", self.height), ("width", self.width)):
            if size <= 0 or size % (spatial * cfg.patch_size):
                raise ValueError(f"{key}={size}: must be a positive multiple of {spatial * cfg.patch_size} (VAE factor x patch size)")
        self.video_frames = (self.num_frames - 1) // temporal + 1
        self.video_h, self.video_w = self.height // spatial, self.width // spatial
        if self.video_frames % cfg.patch_size_t:
            raise ValueError(f"num_frames={self.num_frames}: {self.video_frames} latent frames are not a multiple of "
                             f"patch_size_t={cfg.patch_size_t}")
        self.video_tokens = (self.video_frames // cfg.patch_size_t) * (self.video_h // cfg.patch_size) * (self.video_w // cfg.patch_size)
        self.video_dim = cfg.in_channels  # packed feature size (C * p_t * p * p for the released patch 1)
        acfg = pipe.audio_vae.config
        self.audio_frames = audio_latent_frames(self.num_frames, self.frame_rate, pipe.audio_sampling_rate,
                                                pipe.audio_hop_length, pipe.audio_vae_temporal_compression_ratio)
        if self.audio_frames < 1:
            raise ValueError(f"num_frames={self.num_frames} at frame_rate={self.frame_rate}: the clip has no audio latent frame")
        self.audio_mel = acfg.mel_bins // pipe.audio_vae_mel_compression_ratio
        self.audio_dim = acfg.latent_channels * self.audio_mel
        if self.audio_dim != cfg.audio_in_channels:
            raise ValueError(f"LTX2Adapter: audio VAE gives {self.audio_dim} features per audio token but the transformer's "
                             f"audio_in_channels is {cfg.audio_in_channels}")
        self.latent_shape = (self.video_tokens * self.video_dim + self.audio_frames * self.audio_dim,)

    # -- loading / saving -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        **options) -> "LTX2Adapter":
        """Load an ``LTX2Pipeline`` folder / hub id. ``options`` (``model.options``): height, width, num_frames,
        frame_rate, max_sequence_length, audio_guidance_scale, attention_backend, offload_idle, embedding_cache_dir;
        defaults come from ``flowalign_adapter.json`` when a flowalign run saved ``path``."""
        check_options(options, LTX2_OPTIONS, "ltx2")
        options = saved_options(path, options, "LTX2Pipeline")
        pipe = LTX2Pipeline.from_pretrained(path, torch_dtype=dtype)
        return cls(pipe, name=model_name(path), **options).to(device)

    def save_pretrained(self, directory: str) -> None:
        """``LTX2Pipeline.save_pretrained`` layout (LoRA merged into a copy of the transformer) plus
        ``flowalign_adapter.json`` with the video size, frame rate, text length and audio guidance scale."""
        transformer = merged_lora_copy(self.denoiser) if self.has_lora() else self.denoiser
        LTX2Pipeline(**{**self.pipe.components, "transformer": transformer}).save_pretrained(directory)
        save_options(directory, {"height": self.height, "width": self.width, "num_frames": self.num_frames,
                                 "frame_rate": self.frame_rate, "max_sequence_length": self.max_sequence_length,
                                 "audio_guidance_scale": self.audio_guidance_scale})

    def save_lora_weights(self, directory: str) -> None:
        """The transformer LoRA in the diffusers format ``LTX2Pipeline.load_lora_weights(directory)`` reads."""
        save_transformer_lora(LTX2Pipeline, self.denoiser, directory)

    def to(self, device: str | torch.device) -> "LTX2Adapter":
        self.denoiser.to(device)
        for module in self.idle_modules:
            module.to("cpu" if self.offload_idle else device)
        return self

    # -- text -----------------------------------------------------------------------------------
    def _encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Gemma hidden states of every layer (``LTX2Pipeline._get_gemma_prompt_embeds``) through the connectors:
        video context ``[n, L, D_v]``, audio context ``[n, L, D_a]`` and their mask ``[n, L]`` (float)."""
        pipe = self.pipe
        with ExitStack() as stack:
            for module in (pipe.text_encoder, pipe.connectors):
                stack.enter_context(on_device(module, self.device, self.offload_idle))
            embeds, mask = pipe._get_gemma_prompt_embeds(prompts, max_sequence_length=self.max_sequence_length,
                                                         device=self.device)
            video, audio, mask = pipe.connectors(embeds, mask, padding_side=getattr(pipe.tokenizer, "padding_side", "left"))
        return {"video_context": video, "audio_context": audio, "context_mask": mask.float()}

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, Tensor]:
        """The tensors of :meth:`_encode_text` through the on-disk cache, on the denoiser's device and dtype."""
        out = self.cache.get_or_compute(list(prompts), self._encode_text)
        return {k: v.to(self.device, self.dtype) for k, v in out.items()}

    # -- schedule and velocity ---------------------------------------------------------------------
    def sigmas(self, num_steps: int) -> Tensor:
        return ltx2_sigmas(num_steps, self.pipe.scheduler, self.video_tokens)

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """Flat velocity ``[B, N]``: split into packed video / audio tokens, one joint transformer call with the
        pipeline's positions (``rope.prepare_video_coords`` at the conditioning frame rate,
        ``audio_rope.prepare_audio_coords``) and ``timestep = sigma = 1000 sigma``, outputs joined back."""
        n = x_t.shape[0]
        video, audio = split_flat(x_t, (self.video_tokens, self.video_dim), (self.audio_frames, self.audio_dim))
        model = self.denoiser
        fps = conditioning_frame_rate(self.frame_rate, 1.0)  # motion_speed 1 (real time)
        video_coords = model.rope.prepare_video_coords(n, self.video_frames, self.video_h, self.video_w, x_t.device, fps=fps)
        audio_coords = model.audio_rope.prepare_audio_coords(n, self.audio_frames, x_t.device)
        timestep = sigma.to(torch.float32) * 1000.0  # diffusers' flow convention t = 1000 sigma
        v_video, v_audio = self._forward_module(
            hidden_states=video.to(self.dtype), audio_hidden_states=audio.to(self.dtype),
            encoder_hidden_states=tensors["video_context"], audio_encoder_hidden_states=tensors["audio_context"],
            timestep=timestep, sigma=timestep,  # LTX2Pipeline passes the same t as `sigma` (LTX-2.3 conditioning)
            encoder_attention_mask=tensors["context_mask"], audio_encoder_attention_mask=tensors["context_mask"],
            num_frames=self.video_frames, height=self.video_h, width=self.video_w, fps=fps,
            audio_num_frames=self.audio_frames, video_coords=video_coords, audio_coords=audio_coords,
            isolate_modalities=False, spatio_temporal_guidance_blocks=None, perturbation_mask=None,
            use_cross_timestep=True, return_dict=False)
        return join_flat(v_video.float(), v_audio.float())  # the pipeline steps the float() predictions

    def guidance_scales(self, guidance_scale: float, like: Tensor) -> Tensor:
        """``[N]`` per-element CFG scale: ``guidance_scale`` on the video block, ``audio_guidance_scale`` (or the same
        scale) on the audio block (``LTX2Pipeline``'s separate ``guidance_scale`` / ``audio_guidance_scale``)."""
        audio = guidance_scale if self.audio_guidance_scale is None else self.audio_guidance_scale
        scales = torch.full(like.shape[1:], float(guidance_scale), device=like.device, dtype=like.dtype)
        scales[self.video_tokens * self.video_dim:] = audio
        return scales

    def predict(self, x_t: Tensor, sigma: Tensor | float, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """As ``AdapterBase.predict`` with per-stream guidance scales: CFG runs when either scale differs from 1
        (``LTX2Pipeline.do_classifier_free_guidance``); the unconditional branch is detached (Flow-GRPO)."""
        audio = guidance_scale if self.audio_guidance_scale is None else self.audio_guidance_scale
        sigma = sigma_batch(sigma, x_t.shape[0], x_t.device)
        if (guidance_scale == 1.0 and audio == 1.0) or cond.negative is None:
            return self._velocity(x_t, sigma, cond.tensors)
        both = {k: torch.cat([cond.negative[k], cond.tensors[k]]) for k in cond.tensors}
        v_uncond, v_cond = self._velocity(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), both).chunk(2)
        return guided(v_cond, v_uncond.detach(), self.guidance_scales(guidance_scale, v_cond))

    # -- decoding -----------------------------------------------------------------------------------
    def split_latents(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Flat ``[B, N]`` -> the pipeline's ``output_type="latent"`` pair: video ``[B, C, F, h, w]`` (unpacked, then
        ``_denormalize_latents`` with the VAE's mean / std / scaling factor) and audio ``[B, C_a, L_a, M]``
        (``_denormalize_audio_latents`` on the packed tokens, then ``_unpack_audio_latents``)."""
        pipe, vae, audio_vae, cfg = self.pipe, self.pipe.vae, self.pipe.audio_vae, self.denoiser.config
        video, audio = split_flat(latents, (self.video_tokens, self.video_dim), (self.audio_frames, self.audio_dim))
        video = pipe._unpack_latents(video, self.video_frames // cfg.patch_size_t, self.video_h // cfg.patch_size,
                                     self.video_w // cfg.patch_size, cfg.patch_size, cfg.patch_size_t)
        video = pipe._denormalize_latents(video, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        audio = pipe._denormalize_audio_latents(audio, audio_vae.latents_mean, audio_vae.latents_std)
        return video, pipe._unpack_audio_latents(audio, self.audio_frames, num_mel_bins=self.audio_mel)

    def join_latents(self, video: Tensor, audio: Tensor) -> Tensor:
        """Inverse of :meth:`split_latents`: pipeline-space video ``[B, C, F, h, w]`` and audio ``[B, C_a, L_a, M]``
        -> flat ``[B, N]`` (``_normalize_latents`` + ``_pack_latents``; ``_pack_audio_latents`` +
        ``_normalize_audio_latents``, the pipeline's ``prepare_latents`` / ``prepare_audio_latents``)."""
        pipe, vae, audio_vae, cfg = self.pipe, self.pipe.vae, self.pipe.audio_vae, self.denoiser.config
        video = pipe._normalize_latents(video, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        video = pipe._pack_latents(video, cfg.patch_size, cfg.patch_size_t)
        audio = pipe._normalize_audio_latents(pipe._pack_audio_latents(audio), audio_vae.latents_mean, audio_vae.latents_std)
        return join_flat(video, audio)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Flat ``[B, N]`` -> video ``[B, F, 3, H, W]`` in [0, 1] (VAE decode at ``decode_timestep`` 0 with noise scale
        0 when the VAE is timestep-conditioned, the pipeline's defaults; then ``x / 2 + 0.5`` clamped as
        ``VideoProcessor.postprocess_video``). The audio stream is not decoded here (:meth:`decode_audio`)."""
        video, _ = self.split_latents(latents)
        vae = self.pipe.vae
        with on_device(vae, self.device, self.offload_idle):
            z = video.to(vae.device, vae.dtype)
            timestep = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype) if vae.config.timestep_conditioning else None
            frames = vae.decode(z, timestep, return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
        return (frames.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).to(latents.device)

    @torch.no_grad()
    def decode_audio(self, latents: Tensor) -> Tensor:
        """Flat ``[B, N]`` -> waveform ``[B, channels, samples]`` at ``vocoder.config.output_sampling_rate``: audio VAE
        decode to a mel spectrogram, then the vocoder (the end of ``LTX2Pipeline.__call__``)."""
        _, audio = self.split_latents(latents)
        audio_vae, vocoder = self.pipe.audio_vae, self.pipe.vocoder
        with on_device(audio_vae, self.device, self.offload_idle), on_device(vocoder, self.device, self.offload_idle):
            mel = audio_vae.decode(audio.to(audio_vae.device, audio_vae.dtype), return_dict=False)[0]
            return vocoder(mel).float().to(latents.device)
