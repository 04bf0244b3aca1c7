"""Qwen-Image 2.1 adapter on top of diffusers' ``QwenImage21Pipeline`` components.

The denoiser is ``QwenImage21Transformer2DModel``: a *single-stream*, block-causal transformer over one joint
sequence ``[text tokens, target-image tokens]`` (text causal, the image block bidirectional and seeing all text).
Latents are consumed unpatched (``patch_size`` 1): ``QwenImage21Pipeline._pack_latents`` is a plain spatial
flatten ``[B, C, h, w] -> [B, h*w, C]`` (:func:`pack_latents21`). The transformer is told where the image sits by
``img_mask`` ``[B, L + h*w/4]``: the text positions (False for text-to-image) followed by one True slot per 2x2
group of latent tokens (``append_target_slots`` in ``QwenImage21Pipeline.__call__``; :func:`target_img_mask`). The
conditioning is Qwen3-VL's last hidden state *before* its final norm (the pipeline hooks ``norm`` away), over the
prompt in the pipeline's chat template with the system-message tokens dropped. The model output is the velocity
``v = eps - x0`` at ``sigma`` (the pipeline calls it with ``timestep / 1000`` and steps with the Euler scheduler),
so no conversion is needed.

**Text length changes the image's RoPE positions.** ``QwenImage21Rope`` puts the image block at frame position
``L`` = the number of text slots *including padding* (transformer_qwenimage21.py ``QwenImage21Rope.forward``), so
a padded batch (the pipeline's ``_get_qwen_prompt_embeds`` right-pads to the batch's longest prompt) gives a
prompt a different velocity than the same prompt alone. The adapter makes every sample batch-independent: it
keeps each prompt's unpadded length and runs one transformer call per distinct text length, without padding
(:meth:`QwenImage21Adapter._packed_velocity`), i.e. each sample follows ``QwenImage21Pipeline(prompt=p)`` called
for that prompt alone. Rollout and the training recompute therefore agree whatever the micro-batching. The
Qwen3-VL encodings themselves do not depend on the processor's left padding (Qwen3-VL derives positions from the
attention mask; tests check a padded batch against single encodings), so the per-prompt embedding cache is exact.

**KV cache.** The pipeline caches text keys/values after step 0 (valid because ``causal_condition`` modulates text
from ``t = 0``); the adapter recomputes the full sequence each call: the same values in exact arithmetic, tested
to 1e-4 against the cached pipeline.

**CFG** (``QwenImage21Pipeline(true_cfg_scale=s, negative_prompt=...)``): plain ``v = v_neg + s (v_pos - v_neg)``
(no norm rescaling in 2.1), the negative branch detached as for Qwen-Image.

**Schedule**: as Qwen-Image's (:func:`~flowalign.pipelines.qwen_image.qwen_image_sigmas`): ``linspace(1, 1/T, T)``
through the scheduler's shift with ``mu`` from ``h*w`` latent tokens (``calculate_shift(latents.shape[1], ...)``).
A pipeline whose config sets ``sample_sigmas`` is rejected (those fix the step count; flowalign picks it).

**Decoding**: ``AutoencoderKLQwenImage21`` is a 64-channel, 16x video VAE with per-channel latent statistics
(``z * std + mean`` before ``decode``) whose decoder emits RGBA; :meth:`decode` returns the RGB channels.
"""

from __future__ import annotations

import torch
from diffusers import QwenImage21Pipeline
from torch import Tensor

from flowalign.types import Conditioning

from .base import AdapterBase, sigma_batch, static_shift_sigmas
from .common import PromptEmbeddingCache, TransformerPipelineIO, checked_resolution, on_device, place_modules
from .flux import calculate_mu
from .qwen_image import pad_embeddings, pad_to, qwen_image_sigmas, to_vae_latents

QWEN_IMAGE21_OPTIONS = ("resolution", "shift", "attention_backend", "offload_idle", "embedding_cache_dir")
SLOTS_PER_TOKEN = 4  # each Qwen3-VL image slot stands for 2x2 latent tokens (_IMG_TOKENS_PER_SLOT)

__all__ = ["QwenImage21Adapter", "QWEN_IMAGE21_OPTIONS", "pack_latents21", "unpack_latents21", "target_img_mask",
           "guided", "encode_prompt_rows21", "length_groups"]


# -- pure conversions -----------------------------------------------------------------------------
def pack_latents21(latents: Tensor) -> Tensor:
    """``[B, C, h, w] -> [B, h*w, C]``, row-major tokens (``QwenImage21Pipeline._pack_latents``: no 2x2 patching)."""
    return latents.flatten(2).transpose(1, 2)


def unpack_latents21(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents21`: ``[B, h*w, C] -> [B, C, h, w]``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def target_img_mask(batch: int, text_len: int, h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
    """``img_mask`` ``[B, text_len + h*w/4]`` bool for text-to-image: False on the text slots, one True slot per
    2x2 latent tokens (``QwenImage21Pipeline.__call__``: ``append_target_slots``, ``latents.shape[1] // 4`` ones)."""
    if (h * w) % SLOTS_PER_TOKEN:
        raise ValueError(f"latent grid {h}x{w} is not a whole number of 2x2 image slots")
    mask = torch.zeros(batch, text_len + h * w // SLOTS_PER_TOKEN, dtype=torch.bool, device=device)
    mask[:, text_len:] = True
    return mask


def guided(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``v_uncond + s (v_cond - v_uncond)`` (Ho & Salimans 2022, Eq. 6;
    ``QwenImage21Pipeline.__call__``: ``neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)``)."""
    return v_uncond + scale * (v_cond - v_uncond)


def length_groups(lengths: Tensor) -> list[tuple[int, Tensor]]:
    """``[(L, indices)]``: the rows of a batch grouped by their text length ``lengths [B]`` (ascending ``L``)."""
    return [(int(n), (lengths == n).nonzero(as_tuple=True)[0]) for n in torch.unique(lengths)]


def encode_prompt_rows21(pipe: QwenImage21Pipeline, prompts: list[str], device: torch.device) -> list[Tensor]:
    """One unpadded ``[L_i, D]`` Qwen3-VL encoding per prompt from the pipeline's own ``encode_prompt`` (chat
    template, hidden state before the final norm, system tokens dropped); its right padding is removed."""
    embeds, mask, _ = pipe.encode_prompt(prompt=list(prompts), device=device)
    if mask is None:  # encode_prompt drops an all-ones mask
        return list(embeds.unbind(0))
    return [e[m.bool()] for e, m in zip(embeds, mask)]


class QwenImage21Adapter(TransformerPipelineIO, AdapterBase):
    """Qwen-Image 2.1 (text-to-image) pipeline adapter.

    Args:
        pipe: a ``QwenImage21Pipeline`` (its components are used, never its ``__call__``).
        device: where the transformer (and, unless ``offload_idle``, the text encoder and VAE) live.
        resolution: image side in pixels, a multiple of 32 (VAE factor 16 x 2x2 image slots); default 1024 (the
            pipeline's ``output_resolution``).
        shift: static SD3-style shift on ``linspace(1, 0, T+1)``; None = the pipeline's schedule.
        attention_backend, offload_idle, embedding_cache_dir, cache_namespace: as for FLUX.1.
    """

    # The attention projections and the SwiGLU MLP of every single-stream block (the transformer's _tp_plan lists
    # the same Linears); ours: no published Flow-GRPO recipe for 2.1.
    lora_target_modules = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj", "img_mlp.gate_layer",
                           "img_mlp.out"]
    pipeline_cls: type = QwenImage21Pipeline
    options: tuple[str, ...] = QWEN_IMAGE21_OPTIONS
    family = "qwen_image21"

    def __init__(self, pipe: QwenImage21Pipeline, *, device: str | torch.device = "cpu", resolution: int = 1024,
                 shift: float | None = None, attention_backend: str | None = None, offload_idle: bool = False,
                 embedding_cache_dir: str | None = None, cache_namespace: str = "in-memory"):
        if pipe.config.get("sample_sigmas") is not None:
            raise ValueError("the pipeline config sets sample_sigmas (a fixed step count); the qwen_image21 adapter "
                             "uses linspace(1, 1/T, T) for sampling.num_steps = T: remove sample_sigmas from "
                             "model_index.json or set model.options.shift")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.offload = bool(offload_idle)
        place_modules(self.denoiser, [pipe.text_encoder, self.vae], device, self.offload, attention_backend)

        multiple = pipe.vae_scale_factor * 2
        self.resolution = checked_resolution(resolution, multiple, "VAE factor x 2x2 image slots")
        side = self.resolution // pipe.vae_scale_factor
        self.latent_shape = (self.denoiser.config.in_channels, side, side)

        self.shift = None if shift is None else float(shift)
        self.scheduler_config = dict(pipe.scheduler.config)
        c = self.scheduler_config
        # QwenImage21Pipeline.__call__: calculate_shift(latents.shape[1] = h*w unpatched tokens, ...)
        self.mu = calculate_mu(side * side, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        if self.shift is None:
            qwen_image_sigmas(c, 1, self.mu)  # reject unsupported scheduler options now, not at the first rollout
        self.cache = PromptEmbeddingCache(embedding_cache_dir, f"qwen_image21|{cache_namespace}")

    # -- protocol -------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [n, L, D], "prompt_mask": [n, L] bool}``: each prompt's Qwen3-VL encoding (cached
        unpadded, one entry per prompt) zero-padded to the longest of the batch; the mask keeps each row's length
        for :meth:`_packed_velocity`, which never feeds the padding to the transformer."""
        def compute(batch: list[str]) -> dict[str, Tensor]:
            with on_device(self.pipe.text_encoder, self.device, self.offload):
                (row,) = encode_prompt_rows21(self.pipe, batch, self.device)
            return {"prompt_embeds": row.unsqueeze(0)}

        rows = {p: self.cache.get_or_compute([p], compute)["prompt_embeds"][0] for p in dict.fromkeys(prompts)}
        embeds, mask = pad_embeddings([rows[p].to(self.device, self.dtype) for p in prompts])
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's schedule (``qwen_image_sigmas`` with this resolution's ``mu``), or with the ``shift``
        option the static shift of Esser et al. 2024 Eq. 23 on ``linspace(1, 0, T+1)``."""
        if self.shift is not None:
            return static_shift_sigmas(num_steps, self.shift)
        return qwen_image_sigmas(self.scheduler_config, num_steps, self.mu)

    def _call_transformer(self, tokens: Tensor, sigma: Tensor, embeds: Tensor) -> Tensor:
        """One unpadded transformer call: ``tokens [b, h*w, C]``, ``sigma [b]``, ``embeds [b, L, D]`` (all rows
        of length ``L``) -> velocity tokens ``[b, h*w, C]``."""
        _, h, w = self.latent_shape
        b, length = embeds.shape[:2]
        out = self._forward_module(
            hidden_states=tokens,
            timestep=(sigma * 1000.0).to(self.dtype) / 1000.0,  # the pipeline's t.to(latents.dtype) / 1000
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=None,  # unpadded: the pipeline passes None for an all-valid mask
            img_shapes=[[(1, h, w)]] * b,
            img_mask=target_img_mask(b, length, h, w, tokens.device),
            return_dict=False,
        )[0]
        return out[:, -h * w:]  # the pipeline keeps noise_pred[:, -latents.size(1):]

    def _packed_velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """Velocity tokens ``[B, h*w, C]`` at ``x_t [B, C, h, w]``, ``sigma [B]``: one call per text length, each
        row with its own unpadded prompt (module docstring: padding would move the image's RoPE positions)."""
        tokens = pack_latents21(x_t.to(self.dtype))
        out = tokens.new_empty(tokens.shape)
        lengths = tensors["prompt_mask"].sum(1)
        for length, rows in length_groups(lengths):
            out[rows] = self._call_transformer(tokens[rows], sigma[rows], tensors["prompt_embeds"][rows, :length])
        return out

    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        return unpack_latents21(self._packed_velocity(x_t, sigma, tensors), *self.latent_shape[1:])

    def predict(self, x_t: Tensor, sigma: Tensor | float, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """Velocity ``[B, C, h, w]``; with ``guidance_scale > 1`` and a negative conditioning, CFG
        (:func:`guided`) with both halves in one grouped pass (the unconditional half detached)."""
        sigma = sigma_batch(sigma, x_t.shape[0], x_t.device)
        if guidance_scale == 1.0 or cond.negative is None:
            return self._velocity(x_t, sigma, cond.tensors)
        length = max(cond.tensors["prompt_embeds"].shape[1], cond.negative["prompt_embeds"].shape[1])
        neg, pos = pad_to(cond.negative, length), pad_to(cond.tensors, length)
        both = {k: torch.cat([neg[k], pos[k]]) for k in ("prompt_embeds", "prompt_mask")}
        v_uncond, v_cond = self._velocity(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), both).chunk(2)
        return guided(v_cond, v_uncond.detach(), guidance_scale)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """``[B, C, h, w]`` latents -> ``[B, 3, 16h, 16w]`` RGB images in [0, 1]: un-normalised with the VAE's
        ``latents_mean`` / ``latents_std`` (``to_vae_latents``), decoded (RGBA), frame axis and alpha dropped
        (``QwenImage21Pipeline.__call__`` then ``VaeImageProcessor.postprocess``: ``x / 2 + 0.5`` clamped)."""
        cfg = self.vae.config
        with on_device(self.vae, self.device, self.offload):
            z = to_vae_latents(latents.to(self.vae.device, self.vae.dtype), cfg.latents_mean, cfg.latents_std)
            image = self.vae.decode(z, return_dict=False)[0][:, :3, 0]  # [B, 4, 1, H, W] -> RGB [B, 3, H, W]
        return (image.float() / 2 + 0.5).clamp(0, 1).to(latents.device)
