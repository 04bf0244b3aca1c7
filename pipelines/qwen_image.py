"""Qwen-Image adapter on top of diffusers' ``QwenImagePipeline`` components.

The denoiser is ``QwenImageTransformer2DModel``: an MMDiT over 2x2-packed latent patches (FLUX.1's packing,
``QwenImagePipeline._pack_latents``) with a 3-axis "scaled" RoPE built from ``img_shapes`` (frame, rows,
cols of the packed grid) and text positions following the image ones. It is conditioned on the last hidden
state of Qwen2.5-VL over the prompt in Qwen-Image's chat template, with the template's first 34 tokens
dropped (``QwenImagePipeline._get_qwen_prompt_embeds``) and an attention mask over the padded text tokens
(``encoder_hidden_states_mask``). The model output is the flow velocity ``v = eps - x0`` at timestep
``sigma`` (the pipeline calls it with ``timestep / 1000``), so no conversion is needed.

**Latent layout.** ``latent_shape = (C, h, w)`` is the *unpacked* VAE latent without its frame axis (C = 16,
h = H/8 for the released model); packing into ``[h/2 * w/2, 4C]`` tokens happens inside the model call and is
a pure permutation. ``QwenImagePipeline(output_type="latent")`` returns the packed form:
:func:`~flowalign.pipelines.flux.unpack_latents` converts it. The VAE (``AutoencoderKLQwenImage``, a video VAE)
sees ``[B, C, 1, h, w]`` and its latents are normalised per channel: ``z_model = (z_vae - mean) / std``.

**Prompts.** Encoder outputs are cached per prompt (unpadded) and padded to the longest prompt of a batch
with a boolean mask; padded text tokens are masked out of the joint attention, so the image tokens see
exactly what the pipeline's per-batch padding gives them.

**True CFG** (``QwenImagePipeline(true_cfg_scale=s, negative_prompt=...)``): ``predict`` with a negative
conditioning and ``guidance_scale = s > 1`` computes ``v = v_neg + s (v_pos - v_neg)`` and rescales every
packed token to the norm of the conditional prediction, ``v * ||v_pos|| / ||v||`` (:func:`renormalized_cfg`).

**Schedule**: ``sigmas = linspace(1, 1/T, T)`` through the scheduler's exponential time shift with the
resolution-dependent ``mu`` (:func:`~flowalign.pipelines.flux.calculate_mu` for ``h/2 * w/2`` tokens; the
released scheduler config: ``base_shift`` 0.5 at 256 tokens, ``max_shift`` 0.9 at 8192), then stretched so
that the last non-zero sigma is ``shift_terminal`` (0.02) (:func:`qwen_image_sigmas`). The ``shift`` option
replaces it by the static SD3 shift on ``linspace(1, 0, T + 1)``.
"""

from __future__ import annotations

import torch
from diffusers import QwenImagePipeline
from torch import Tensor

from flowalign.types import Conditioning

from .base import AdapterBase, sigma_batch, static_shift_sigmas
from .common import PromptEmbeddingCache, TransformerPipelineIO, checked_resolution, on_device, place_modules
from .flux import calculate_mu, pack_latents, unpack_latents
from .flux2 import shifted_sigmas

QWEN_IMAGE_OPTIONS = ("resolution", "shift", "max_sequence_length", "attention_backend", "offload_idle",
                      "embedding_cache_dir")
# Scheduler options whose sigma conversions flowalign does not reproduce.
UNSUPPORTED_SCHEDULER_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")

__all__ = ["QwenImageAdapter", "QWEN_IMAGE_OPTIONS", "img_shapes", "pack_latents", "unpack_latents", "pad_embeddings",
           "pad_to", "renormalized_cfg", "stretch_to_terminal", "qwen_image_sigmas", "to_vae_latents", "from_vae_latents",
           "encode_prompt_rows"]


# -- pure conversions -----------------------------------------------------------------------------
def img_shapes(batch: int, rows: int, cols: int) -> list[list[tuple[int, int, int]]]:
    """The transformer's RoPE layout argument for ``batch`` single images of ``rows x cols`` packed tokens:
    ``[[(1, rows, cols)]] * batch`` (``QwenImagePipeline.__call__``: ``(1, h // vae // 2, w // vae // 2)``)."""
    return [[(1, rows, cols)]] * batch


def stretch_to_terminal(sigmas: Tensor, terminal: float) -> Tensor:
    """Stretch a descending schedule so that its last value is ``terminal`` keeping ``sigma_0 = 1``
    (``FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal``, from LTX-Video's rf.py):
    ``sigma' = 1 - (1 - sigma) (1 - terminal) / (1 - sigma_last)``."""
    one_minus = 1.0 - sigmas
    return 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))


def qwen_image_sigmas(scheduler_config, num_steps: int, mu: float) -> Tensor:
    """``[T + 1]`` fp32 schedule of ``QwenImagePipeline``: ``set_timesteps(sigmas=linspace(1, 1/T, T), mu=mu)``
    (exponential time shift ``e^mu / (e^mu + (1/s - 1))`` with dynamic shifting, else the static SD3 shift of
    Esser et al. 2024 Eq. 23 with the scheduler's ``shift``; then :func:`stretch_to_terminal` when
    ``shift_terminal`` is set) followed by the terminal 0."""
    sigmas = shifted_sigmas(scheduler_config, num_steps, mu, UNSUPPORTED_SCHEDULER_FLAGS, "the qwen_image adapter")
    if scheduler_config.get("shift_terminal"):
        sigmas = stretch_to_terminal(sigmas, float(scheduler_config["shift_terminal"]))
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()


def pad_embeddings(rows: list[Tensor], length: int | None = None) -> tuple[Tensor, Tensor]:
    """``n`` unpadded prompt encodings ``[L_i, D]`` -> zero-padded ``[n, L, D]`` and their ``[n, L]`` bool mask
    (valid tokens first, as ``QwenImagePipeline._get_qwen_prompt_embeds`` pads); ``L = max L_i`` unless given."""
    length = max(r.shape[0] for r in rows) if length is None else length
    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = True
    return embeds, mask


def pad_to(tensors: dict[str, Tensor], length: int) -> dict[str, Tensor]:
    """Zero-pad ``{"prompt_embeds": [n, L, D], "prompt_mask": [n, L]}`` along the text axis to ``length``; other
    entries (e.g. an editing adapter's image latents) pass through unchanged."""
    extra = length - tensors["prompt_embeds"].shape[1]
    if extra == 0:
        return tensors
    embeds, mask = tensors["prompt_embeds"], tensors["prompt_mask"]
    return {**tensors, "prompt_embeds": torch.cat([embeds, embeds.new_zeros(embeds.shape[0], extra, embeds.shape[2])], dim=1),
            "prompt_mask": torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)}


def renormalized_cfg(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Qwen-Image's true CFG on packed tokens ``[B, N, 4C]`` (``QwenImagePipeline.__call__``): the guided
    ``v = v_uncond + s (v_cond - v_uncond)`` (Ho & Salimans 2022, Eq. 6) rescaled per token to the norm of the
    conditional prediction, ``v * ||v_cond|| / ||v||`` (norms over the last axis)."""
    combined = v_uncond + scale * (v_cond - v_uncond)
    return combined * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


def to_vae_latents(latents: Tensor, latents_mean: list[float], latents_std: list[float]) -> Tensor:
    """Model latents ``[B, C, h, w]`` -> the VAE's ``[B, C, 1, h, w]``: ``z * std + mean`` per channel
    (``QwenImagePipeline.__call__``: ``latents / (1 / std) + mean`` before ``vae.decode``)."""
    mean = torch.tensor(latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
    return latents.unsqueeze(2) / inv_std + mean


def from_vae_latents(z: Tensor, latents_mean: list[float], latents_std: list[float]) -> Tensor:
    """Inverse of :func:`to_vae_latents`: VAE latents ``[B, C, 1, h, w]`` -> model latents ``[B, C, h, w]``,
    ``(z - mean) / std`` per channel (how the Qwen-Image edit / img2img pipelines normalise encoded images)."""
    mean = torch.tensor(latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
    return ((z - mean) / std).squeeze(2)


def encode_prompt_rows(pipe: QwenImagePipeline, prompts: list[str], device: torch.device,
                       max_sequence_length: int) -> list[Tensor]:
    """One unpadded ``[L_i, D]`` Qwen2.5-VL encoding per prompt, from the pipeline's own ``encode_prompt``
    (chat template, last hidden state, the template's prefix tokens dropped, cut to ``max_sequence_length``)."""
    embeds, mask = pipe.encode_prompt(prompt=list(prompts), device=device, max_sequence_length=max_sequence_length)
    if mask is None:  # encode_prompt drops an all-ones mask
        return list(embeds.unbind(0))
    return [e[m.bool()] for e, m in zip(embeds, mask)]


class QwenImageAdapter(TransformerPipelineIO, AdapterBase):
    """Qwen-Image (text-to-image) pipeline adapter.

    Args:
        pipe: a ``QwenImagePipeline`` (its components are used, never its ``__call__``).
        device: where the transformer (and, unless ``offload_idle``, the text encoder and VAE) live.
        resolution: image side in pixels (multiple of 2 x the VAE factor, 16 for the released VAE); default 1024
            (the pipeline's ``default_sample_size * vae_scale_factor``).
        shift: static SD3-style shift on ``linspace(1, 0, T+1)``; None = the pipeline's schedule.
        max_sequence_length: Qwen2.5-VL tokens kept after the template prefix (the pipeline's default 512, at most 1024).
        attention_backend, offload_idle, embedding_cache_dir, cache_namespace: as for FLUX.1.
    """

    # Flow-GRPO's Qwen-Image LoRA targets (verl examples/flowgrpo_trainer/run_flowgrpo.sh, the Flow-GRPO port):
    # the joint attention projections and the MLPs of both streams.
    lora_target_modules = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                           "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                           "txt_mlp.net.0.proj", "txt_mlp.net.2"]
    # The diffusers pipeline whose components the adapter loads and saves (subclasses for other Qwen-Image
    # pipelines, e.g. editing, replace it).
    pipeline_cls: type = QwenImagePipeline

    def __init__(self, pipe: QwenImagePipeline, *, device: str | torch.device = "cpu", resolution: int = 1024,
                 shift: float | None = None, max_sequence_length: int = 512, attention_backend: str | None = None,
                 offload_idle: bool = False, embedding_cache_dir: str | None = None, cache_namespace: str = "in-memory"):
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.offload = bool(offload_idle)
        if not 0 < int(max_sequence_length) <= 1024:
            raise ValueError(f"max_sequence_length={max_sequence_length} must be in 1..1024 (QwenImagePipeline's limit)")
        self.max_sequence_length = int(max_sequence_length)
        place_modules(self.denoiser, [pipe.text_encoder, self.vae], device, self.offload, attention_backend)

        multiple = pipe.vae_scale_factor * 2
        self.resolution = checked_resolution(resolution, multiple, "VAE factor x 2x2 packing")
        side = 2 * (self.resolution // multiple)
        self.latent_shape = (self.denoiser.config.in_channels // 4, side, side)

        self.shift = None if shift is None else float(shift)
        self.scheduler_config = dict(pipe.scheduler.config)
        c = self.scheduler_config
        self.mu = calculate_mu((side // 2) ** 2, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        if self.shift is None:
            qwen_image_sigmas(c, 1, self.mu)  # reject unsupported scheduler options now, not at the first rollout
        self.cache = PromptEmbeddingCache(embedding_cache_dir, f"qwen_image|{cache_namespace}|len={self.max_sequence_length}")

    # -- loading / saving: from_pretrained, save_pretrained, save_lora_weights from TransformerPipelineIO --
    options: tuple[str, ...] = QWEN_IMAGE_OPTIONS
    family = "qwen_image"

    # -- protocol -------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [n, L, D], "prompt_mask": [n, L] bool}``: each prompt's Qwen2.5-VL encoding (cached
        unpadded, one entry per prompt), zero-padded to the longest of the batch."""
        def compute(batch: list[str]) -> dict[str, Tensor]:  # one prompt per call: cache rows keep their own length
            with on_device(self.pipe.text_encoder, self.device, self.offload):
                (row,) = encode_prompt_rows(self.pipe, batch, self.device, self.max_sequence_length)
            return {"prompt_embeds": row.unsqueeze(0)}

        rows = {p: self.cache.get_or_compute([p], compute)["prompt_embeds"][0] for p in dict.fromkeys(prompts)}
        embeds, mask = pad_embeddings([rows[p].to(self.device, self.dtype) for p in prompts])
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's schedule (:func:`qwen_image_sigmas` with this resolution's ``mu``), or with the
        ``shift`` option the static shift of Esser et al. 2024 Eq. 23 on ``linspace(1, 0, T+1)``."""
        if self.shift is not None:
            return static_shift_sigmas(num_steps, self.shift)
        return qwen_image_sigmas(self.scheduler_config, num_steps, self.mu)

    def _packed_velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """Packed velocity ``[B, h/2 * w/2, 4C]`` at unpacked ``x_t [B, C, h, w]``, ``sigma [B]``."""
        _, h, w = self.latent_shape
        mask = tensors["prompt_mask"]
        return self._forward_module(
            hidden_states=pack_latents(x_t.to(self.dtype)),
            timestep=(sigma * 1000.0).to(self.dtype) / 1000.0,  # the pipeline's timestep / 1000, in the latents' dtype
            encoder_hidden_states=tensors["prompt_embeds"],
            # the pipeline passes None when no token is padding (encode_prompt); masks slow some attention backends
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=img_shapes(x_t.shape[0], h // 2, w // 2),
            return_dict=False,
        )[0]

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        return unpack_latents(self._packed_velocity(x_t, sigma, tensors), *self.latent_shape[1:])

    def predict(self, x_t: Tensor, sigma: Tensor | float, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """Velocity ``[B, C, h, w]``; with ``guidance_scale > 1`` and a negative conditioning, Qwen-Image's
        norm-preserving true CFG (:func:`renormalized_cfg`) with both halves in one batched call (the
        unconditional half detached: Flow-GRPO trains through the conditional branch)."""
        sigma = sigma_batch(sigma, x_t.shape[0], x_t.device)
        if guidance_scale == 1.0 or cond.negative is None:
            return self._velocity(x_t, sigma, cond.tensors)
        length = max(cond.tensors["prompt_embeds"].shape[1], cond.negative["prompt_embeds"].shape[1])
        neg, pos = pad_to(cond.negative, length), pad_to(cond.tensors, length)
        both = {k: torch.cat([neg[k], pos[k]]) for k in pos}
        v_uncond, v_cond = self._packed_velocity(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), both).chunk(2)
        return unpack_latents(renormalized_cfg(v_cond, v_uncond.detach(), guidance_scale), *self.latent_shape[1:])

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """``[B, C, h, w]`` latents -> ``[B, 3, H, W]`` images in [0, 1]: un-normalised with the VAE's
        ``latents_mean`` / ``latents_std`` (:func:`to_vae_latents`), decoded, frame axis dropped."""
        cfg = self.vae.config
        with on_device(self.vae, self.device, self.offload):
            z = to_vae_latents(latents.to(self.vae.device, self.vae.dtype), cfg.latents_mean, cfg.latents_std)
            image = self.vae.decode(z, return_dict=False)[0][:, :, 0]  # [B, 3, 1, H, W] -> [B, 3, H, W] in [-1, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1).to(latents.device)
