"""FLUX.1 Kontext [dev] (image editing) adapter on top of diffusers' ``FluxKontextPipeline`` components.

Kontext is a FLUX.1 transformer trained to edit: the source image is VAE-encoded, packed like the noisy
latents and appended to the image sequence with its own RoPE ids ``(1, row, col)`` (the noisy tokens keep
``(0, row, col)``); the velocity is read from the noisy tokens only (``pipeline_flux_kontext.py``,
``prepare_latents`` and the denoising loop's ``noise_pred[:, : latents.size(1)]``). Text conditioning,
distilled guidance, schedule (``mu`` from the number of *noisy* tokens), LoRA targets and decoding are
FLUX.1's (:class:`flowalign.pipelines.flux.FluxAdapter`).

**Source-image preprocessing (deterministic).** ``FluxKontextPipeline`` by default snaps the source to
the preferred Kontext resolution of nearest aspect ratio (``_auto_resize=True``) and generates at
``max_area`` pixels. Training needs one fixed latent size per run, so here every source image is resized
to the training resolution ``resolution x resolution`` (bilinear with antialiasing, skipped when it
already has that size), then normalised to [-1, 1] by the pipeline's ``image_processor.preprocess`` and
encoded with the VAE's mode (``retrieve_latents(..., sample_mode="argmax")``). This equals the pipeline
called with ``_auto_resize=False``, ``height = width = max_area ** 0.5 = resolution`` and the resized
source image (the pipeline's own resize is then the identity), which the tests check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FluxKontextPipeline
from torch import Tensor

from .common import on_device
from .flux import FLUX_OPTIONS, FluxAdapter, latent_image_ids, pack_latents, unpack_latents


def kontext_image_ids(rows: int, cols: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """RoPE ids ``[rows * cols, 3]`` of the packed source-image tokens: ``(1, row, col)`` row-major
    (``FluxKontextPipeline.prepare_latents``: "image ids are the same as latent ids with the first
    dimension set to 1 instead of 0")."""
    ids = latent_image_ids(rows, cols, device, dtype)
    ids[:, 0] = 1
    return ids


def resize_source(image: Tensor, size: int) -> Tensor:
    """``[3, H, W]`` in [0, 1] -> ``[3, size, size]``: bilinear with antialiasing (identity at that size)."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1 Kontext adapter: one source image per prompt (``source_images = 1``).

    Args: as :class:`FluxAdapter` (``pipe`` is a ``FluxKontextPipeline``); ``resolution`` is also the
    size the source images are resized to (module docstring).
    """

    source_images = 1

    # -- loading / saving: from_pretrained, save_pretrained, save_lora_weights from TransformerPipelineIO --
    pipeline_cls: type = FluxKontextPipeline
    options: tuple[str, ...] = FLUX_OPTIONS
    family = "flux_kontext"

    # -- source images --------------------------------------------------------------------------
    @torch.no_grad()
    def _image_condition(self, images: list[list[Tensor]]) -> dict[str, Tensor]:
        """``{"image_latents": [B, (h/2)(w/2), 4C]}``: each prompt's source image resized to the
        resolution, normalised (``image_processor.preprocess``), VAE-encoded with the posterior mode and
        scaled ``(z - shift_factor) * scaling_factor`` (``FluxKontextPipeline._encode_vae_image``), packed."""
        pixels = torch.stack([resize_source(per_prompt[0], self.resolution) for per_prompt in images])
        pixels = self.pipe.image_processor.preprocess(pixels, self.resolution, self.resolution)
        with on_device(self.vae, self.device, self.offload):
            posterior = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
            z = (posterior.mode() - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return {"image_latents": pack_latents(z.to(self.device, self.dtype))}

    # -- prediction -----------------------------------------------------------------------------
    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """Velocity of the noisy tokens: the transformer sees ``[noisy tokens | source tokens]`` with ids
        ``[(0, r, c) | (1, r, c)]`` and its output is cut back to the noisy tokens (pipeline loop)."""
        _, h, w = self.latent_shape
        n = x_t.shape[0]
        noisy = pack_latents(x_t)
        embeds = tensors["prompt_embeds"]
        guidance = None if self.guidance is None else torch.full((n,), self.guidance, device=x_t.device, dtype=torch.float32)
        ids = torch.cat([latent_image_ids(h // 2, w // 2, x_t.device, x_t.dtype),
                         kontext_image_ids(h // 2, w // 2, x_t.device, x_t.dtype)])  # the source has the output's size
        out = self._forward_module(
            hidden_states=torch.cat([noisy, tensors["image_latents"].to(noisy.dtype)], dim=1),
            timestep=(sigma * 1000.0).to(x_t.dtype) / 1000.0,  # the pipeline's timestep / 1000, in the latents' dtype
            guidance=guidance,
            pooled_projections=tensors["pooled"],
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=ids,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, : noisy.shape[1]], h, w)
