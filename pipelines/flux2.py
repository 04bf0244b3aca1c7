"""FLUX.2 [dev] and FLUX.2 [klein] adapter on top of diffusers' ``Flux2Pipeline`` / ``Flux2KleinPipeline`` components.

The denoiser is ``Flux2Transformer2DModel``: an MMDiT over packed latent tokens with 4-axis RoPE position
ids ``(t, h, w, l)`` (image tokens ``(0, row, col, 0)``, text tokens ``(0, 0, 0, index)``). The text
encoder differs by variant and is picked from the loaded pipeline class:

- ``Flux2Pipeline`` ([dev]): Mistral-Small-3 (``Mistral3ForConditionalGeneration``), hidden states of layers
  (10, 20, 30) stacked; the transformer is guidance-distilled: the guidance strength is an *input*
  (``guidance``, the pipeline's ``guidance_scale`` default 4.0) and the pipeline has no true CFG.
- ``Flux2KleinPipeline`` ([klein]): Qwen3 (``Qwen3ForCausalLM``), layers (9, 18, 27); no guidance embedding;
  true classifier-free guidance against the empty prompt (``sampling.guidance_scale > 1`` with negative
  prompts ``""``), unless the checkpoint is step-distilled (``is_distilled``), where CFG is off.

**Latent layout.** The VAE (``AutoencoderKLFlux2``) latent ``[C, h, w]`` is *patchified* into
``[4C, h/2, w/2]`` (2x2 patches, channel-major) and normalised by the VAE's BatchNorm running statistics
(``pipeline_flux2.Flux2Pipeline._encode_vae_image``); the diffusion runs in that space.
``latent_shape = (4C, h/2, w/2)`` is this patchified, normalised latent, exactly the ``latents`` argument the
pipelines accept. Packing into ``[h/2 * w/2, 4C]`` tokens (a plain flatten, unlike FLUX.1's 2x2 packing)
happens inside ``_velocity``. ``Flux2Pipeline(output_type="latent")`` returns the packed tokens
(:func:`unpack_latents` converts them); ``Flux2KleinPipeline(output_type="latent")`` returns the
de-normalised, unpatchified VAE latents (:func:`to_vae_latents` converts ours to those).

Schedule: both pipelines pass ``sigmas = linspace(1, 1/T, T)`` and ``mu = compute_empirical_mu(seq_len, T)``
to ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (:func:`flow_match_sigmas`). The ``shift`` option
replaces it by the static SD3 shift on ``linspace(1, 0, T + 1)``.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline, Flux2Pipeline
from torch import Tensor

from flowalign.types import Conditioning

from .base import AdapterBase, shift_sigmas, static_shift_sigmas
from .common import (PromptEmbeddingCache, check_options, checked_resolution, merged_lora_copy, model_name, on_device,
                     place_modules, save_transformer_lora)
from .flux import time_shift

FLUX2_OPTIONS = ("resolution", "shift", "guidance", "max_sequence_length", "text_encoder_out_layers",
                 "attention_backend", "offload_idle", "embedding_cache_dir")
# The pipelines' default ``text_encoder_out_layers`` (Flux2Pipeline.__call__, Flux2KleinPipeline.__call__).
DEFAULT_OUT_LAYERS = {Flux2Pipeline: (10, 20, 30), Flux2KleinPipeline: (9, 18, 27)}
# Scheduler options no flowalign schedule reproduces.
UNSUPPORTED_SCHEDULER_FLAGS = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                               "invert_sigmas", "use_flow_sigmas")


# -- pure conversions -----------------------------------------------------------------------------
def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's schedule shift ``mu`` (diffusers ``pipeline_flux2.compute_empirical_mu``, fitted by BFL):
    linear in the token count above 4300 tokens; below, linear in the number of steps between the two
    fitted lines ``m_10`` (10 steps) and ``m_200`` (200 steps)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m_200)
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + (m_200 - 200.0 * slope))


def shifted_sigmas(scheduler_config, num_steps: int, mu: float | None, unsupported: tuple[str, ...],
                   who: str = "flowalign") -> Tensor:
    """``[T]`` fp64 sigmas of ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/T, T), mu=mu)``
    before any terminal stretch: the exponential time shift ``e^mu / (e^mu + (1/s - 1))`` with dynamic shifting,
    else the static SD3 shift (Esser et al. 2024, Eq. 23) with the scheduler's ``shift``. Raises a ValueError
    naming the first set option of ``unsupported`` (``who``: what does not support it, for the message)."""
    for flag in unsupported:
        if scheduler_config.get(flag):
            raise ValueError(f"scheduler option {flag}={scheduler_config.get(flag)!r} is not supported by {who}")
    # the scheduler converts the given sigmas to float32 before shifting (np.array(sigmas).astype(np.float32))
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).float().double()
    if scheduler_config.get("use_dynamic_shifting"):
        if scheduler_config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"scheduler time_shift_type={scheduler_config.get('time_shift_type')!r}: "
                             f"{who} supports 'exponential' only")
        return time_shift(mu, base)
    return shift_sigmas(base, float(scheduler_config.get("shift", 1.0)))


def flow_match_sigmas(scheduler_config, num_steps: int, mu: float | None) -> Tensor:
    """``[T + 1]`` fp32 schedule of ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/T, T), mu=mu)``
    (:func:`shifted_sigmas`, no ``shift_terminal``) followed by the terminal 0."""
    shifted = shifted_sigmas(scheduler_config, num_steps, mu, UNSUPPORTED_SCHEDULER_FLAGS)
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)]).float()


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, h * w, C]`` row-major tokens (``Flux2Pipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`: ``[B, h * w, C]`` -> ``[B, C, h, w]`` (the row-major order of
    :func:`latent_ids`, which ``Flux2Pipeline._unpack_latents_with_ids`` scatters by)."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def patchify(latents: Tensor) -> Tensor:
    """VAE latents ``[B, C, h, w]`` -> ``[B, 4C, h/2, w/2]``, channel-major 2x2 patches
    (``Flux2Pipeline._patchify_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: Tensor) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, 4C, h/2, w/2]`` -> ``[B, C, h, w]`` (``_unpatchify_latents``)."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def latent_ids(rows: int, cols: int, device: torch.device | str = "cpu") -> Tensor:
    """4-axis RoPE ids ``[rows * cols, 4]`` of the image tokens: ``(0, row, col, 0)`` row-major
    (``Flux2Pipeline._prepare_latent_ids``)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    zeros = torch.zeros_like(r)
    return torch.stack([zeros, r, c, zeros], dim=-1).reshape(rows * cols, 4).to(device)


def text_ids(length: int, device: torch.device | str = "cpu") -> Tensor:
    """4-axis RoPE ids ``[length, 4]`` of the text tokens: ``(0, 0, 0, index)`` (``Flux2Pipeline._prepare_text_ids``)."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


def batch_norm_stats(vae) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` ``[1, 4C, 1, 1]`` of the FLUX.2 VAE's latent BatchNorm (running statistics, eps
    from the VAE config), the normalisation of ``Flux2Pipeline._encode_vae_image``."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


def to_vae_latents(latents: Tensor, vae) -> Tensor:
    """Diffusion-space ``[B, 4C, h/2, w/2]`` -> the VAE's ``[B, C, h, w]`` latents: undo the BatchNorm
    normalisation, then :func:`unpatchify` (the decode path of ``Flux2Pipeline.__call__``)."""
    mean, std = batch_norm_stats(vae)
    return unpatchify(latents * std.to(latents) + mean.to(latents))


class Flux2Adapter(AdapterBase):
    """FLUX.2 [dev] / [klein] pipeline adapter.

    Args:
        pipe: a ``Flux2Pipeline`` or ``Flux2KleinPipeline`` (components only, never its ``__call__``).
        device: where the transformer (and, unless ``offload_idle``, the text encoder and VAE) live.
        resolution: image side in pixels (multiple of 2 x the VAE factor, 16 for the released VAE); default 1024.
        shift: static SD3-style shift on ``linspace(1, 0, T+1)``; None = the pipeline's schedule.
        guidance: the distilled-guidance input of [dev] (default 4.0, the pipeline's default); must be
            None for [klein] (no guidance embedding).
        max_sequence_length: text tokens (the pipelines' default 512).
        text_encoder_out_layers: hidden-state layers stacked into the prompt embedding; None = the
            pipeline's default ((10, 20, 30) for [dev], (9, 18, 27) for [klein]).
        attention_backend, offload_idle, embedding_cache_dir, cache_namespace: as for FLUX.1.
    """

    def __init__(self, pipe: Flux2Pipeline | Flux2KleinPipeline, *, device: str | torch.device = "cpu",
                 resolution: int = 1024, shift: float | None = None, guidance: float | None = None,
                 max_sequence_length: int = 512, text_encoder_out_layers: list[int] | tuple[int, ...] | None = None,
                 attention_backend: str | None = None, offload_idle: bool = False, embedding_cache_dir: str | None = None,
                 cache_namespace: str = "in-memory"):
        if not isinstance(pipe, (Flux2Pipeline, Flux2KleinPipeline)):
            raise TypeError(f"Flux2Adapter needs a Flux2Pipeline or Flux2KleinPipeline, got {type(pipe).__name__}")
        self.pipe = pipe
        self.klein = isinstance(pipe, Flux2KleinPipeline)
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.offload = bool(offload_idle)
        self.max_sequence_length = int(max_sequence_length)
        layers = DEFAULT_OUT_LAYERS[Flux2KleinPipeline if self.klein else Flux2Pipeline]
        self.out_layers = tuple(int(i) for i in (text_encoder_out_layers or layers))
        place_modules(self.denoiser, [pipe.text_encoder, self.vae], device, self.offload, attention_backend)

        if self.denoiser.config.guidance_embeds:
            self.guidance = 4.0 if guidance is None else float(guidance)
        elif guidance is not None:
            raise ValueError(f"guidance={guidance}: this FLUX.2 transformer has no guidance embedding ([klein]); "
                             "leave model.options.guidance unset and use sampling.guidance_scale for CFG")
        else:
            self.guidance = None
        # Klein "is_distilled" checkpoints ignore CFG (Flux2KleinPipeline.do_classifier_free_guidance); the
        # guidance-distilled [dev] pipeline has no CFG at all.
        self.cfg_allowed = self.klein and not pipe.config.get("is_distilled", False)

        multiple = pipe.vae_scale_factor * 2
        self.resolution = checked_resolution(resolution, multiple, "VAE factor x 2x2 patches")
        side = self.resolution // multiple
        self.latent_shape = (self.denoiser.config.in_channels, side, side)
        self.shift = None if shift is None else float(shift)
        self.scheduler_config = dict(pipe.scheduler.config)
        if self.shift is None:
            flow_match_sigmas(self.scheduler_config, 1, 0.0)  # reject unsupported scheduler options now
        # diffusers' FLUX.2 DreamBooth-LoRA targets (train_dreambooth_lora_flux2*.py): the attention projections
        # of the double blocks, the fused QKV+MLP input and the output projection of the single blocks.
        self.lora_target_modules = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj"] + [
            f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(self.denoiser.single_transformer_blocks))]
        self.cache = PromptEmbeddingCache(
            embedding_cache_dir,
            f"flux2|{type(pipe).__name__}|{cache_namespace}|len={self.max_sequence_length}|layers={self.out_layers}")

    # -- loading / saving -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        **options) -> "Flux2Adapter":
        """Load a diffusers FLUX.2 [dev] or [klein] checkpoint (local pipeline folder or hub id); the
        variant (and so the text encoder) follows the checkpoint's ``model_index.json``.

        ``options`` are ``model.options``: resolution, shift, guidance, max_sequence_length,
        text_encoder_out_layers, attention_backend, offload_idle, embedding_cache_dir.
        """
        check_options(options, FLUX2_OPTIONS, "flux2")
        try:
            pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"model.pretrained={path!r}: cannot load a FLUX.2 pipeline: {err}") from err
        if not isinstance(pipe, (Flux2Pipeline, Flux2KleinPipeline)):
            raise ValueError(f"model.pretrained={path!r} is a {type(pipe).__name__}, not a Flux2Pipeline / Flux2KleinPipeline")
        return cls(pipe, device=device, cache_namespace=model_name(path), **options)

    def save_pretrained(self, directory: str) -> None:
        """Save the pipeline (LoRA merged into a copy of the transformer) so ``from_pretrained`` reloads it."""
        transformer = merged_lora_copy(self.denoiser) if self.has_lora() else self.denoiser
        components = {**self.pipe.components, "transformer": transformer}
        extra = {"is_distilled": self.pipe.config.get("is_distilled", False)} if self.klein else {}
        type(self.pipe)(**components, **extra).save_pretrained(directory)

    def save_lora_weights(self, directory: str) -> None:
        """The LoRA alone, in the format ``Flux2Pipeline`` / ``Flux2KleinPipeline.load_lora_weights`` reads."""
        save_transformer_lora(type(self.pipe), self.denoiser, directory)

    # -- protocol -------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [n, L, len(layers) * D_text]}`` from the pipeline's ``encode_prompt``."""
        def compute(batch: list[str]) -> dict[str, Tensor]:
            with on_device(self.pipe.text_encoder, self.device, self.offload):
                embeds, _ = self.pipe.encode_prompt(prompt=list(batch), device=self.device,
                                                    max_sequence_length=self.max_sequence_length,
                                                    text_encoder_out_layers=self.out_layers)
            return {"prompt_embeds": embeds}

        out = self.cache.get_or_compute(list(prompts), compute)
        return {k: v.to(self.device, self.dtype) for k, v in out.items()}

    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's schedule (:func:`flow_match_sigmas` with ``compute_empirical_mu(h/2 * w/2, T)``), or
        with the ``shift`` option the static shift of Esser et al. 2024 Eq. 23 on ``linspace(1, 0, T+1)``."""
        if self.shift is not None:
            return static_shift_sigmas(num_steps, self.shift)
        _, h, w = self.latent_shape
        return flow_match_sigmas(self.scheduler_config, num_steps, compute_empirical_mu(h * w, num_steps))

    def predict(self, x_t: Tensor, sigma: Tensor | float, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """As :meth:`AdapterBase.predict`; true CFG only where the pipeline has it ([klein], not step-distilled)."""
        if guidance_scale != 1.0 and cond.negative is not None and not self.cfg_allowed:
            variant = "FLUX.2 [dev] is guidance-distilled (set model.options.guidance)" if not self.klein else \
                "this FLUX.2 [klein] checkpoint is step-distilled (is_distilled)"
            raise ValueError(f"sampling.guidance_scale={guidance_scale}: {variant}; true CFG is not available")
        return super().predict(x_t, sigma, cond, guidance_scale)

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """``x_t [B, 4C, h/2, w/2]``, ``sigma [B]`` -> velocity ``[B, 4C, h/2, w/2]`` (the transformer predicts
        ``v = eps - x0`` directly: ``Flux2Pipeline.__call__`` feeds its output to the Euler step unchanged)."""
        _, h, w = self.latent_shape
        n = x_t.shape[0]
        embeds = tensors["prompt_embeds"]
        guidance = None if self.guidance is None else torch.full((n,), self.guidance, device=x_t.device, dtype=torch.float32)
        x = x_t.to(self.dtype)
        out = self._forward_module(
            hidden_states=pack_latents(x),
            timestep=(sigma * 1000.0).to(x.dtype) / 1000.0,  # the pipeline's t / 1000, t = 1000 sigma in the latents' dtype
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=text_ids(embeds.shape[1], x.device),
            img_ids=latent_ids(h, w, x.device),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Diffusion-space ``[B, 4C, h/2, w/2]`` latents -> ``[B, 3, H, W]`` images in [0, 1]."""
        with on_device(self.vae, self.device, self.offload):
            z = to_vae_latents(latents.to(self.vae.device, self.vae.dtype), self.vae)
            image = self.vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
