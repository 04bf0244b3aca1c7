"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (2509 / 2511, multi-image) adapters on diffusers' components.

Both are Qwen-Image (:mod:`flowalign.pipelines.qwen_image`: MMDiT over 2x2-packed latents, Qwen2.5-VL prompt
encoder, true CFG with norm rescaling, exponential dynamic shift) conditioned on source images twice:

* **VL prompt encoding.** Qwen2.5-VL sees the source image(s) with the prompt: the pipelines' ``encode_prompt``
  with ``image=`` runs the ``processor`` (``Qwen2VLProcessor``) on the edit chat template (one
  ``<|vision_start|><|image_pad|><|vision_end|>`` block; Edit-Plus: ``"Picture i: ..."`` per image) and keeps the
  last hidden state after the template's first 64 tokens (``prompt_template_encode_start_idx``). The edit
  pipelines never truncate it (no ``max_sequence_length`` option here).
* **Condition latents.** Each source image is VAE-encoded with the posterior mode, normalised per channel
  ``(z - mean) / std`` (``QwenImageEditPipeline._encode_vae_image``), packed like the noisy latents and appended
  to the image sequence; ``img_shapes`` lists the noisy grid then each source grid, ``[(1, h/2, w/2), (1, h_1/2,
  w_1/2), ...]`` (``__call__``), and the velocity is read from the noisy tokens only
  (``noise_pred[:, : latents.size(1)]``); true CFG is applied to those tokens.

**Source-image preprocessing (deterministic, the pipelines' own).** A source tensor ``[3, H, W]`` in [0, 1] is
turned into an 8-bit RGB PIL image (exact for images read from 8-bit files, which is what
:func:`flowalign.data.images.load_source_images` gives) and then treated exactly as the pipeline treats a PIL
input, with the pipeline's ``image_processor`` (Lanczos resize, normalisation to [-1, 1]):

* Qwen-Image-Edit (``QwenImageEditPipeline.__call__``): ``(w, h) = calculate_dimensions(1024 * 1024, W / H)``
  (area-preserving, sides rounded to 32 px, :func:`condition_size`); the image is resized to ``h x w``; that
  resized image is both the VL input and the VAE input.
* Qwen-Image-Edit-Plus (``QwenImageEditPlusPipeline.__call__``): per image, the VL input is the image resized to
  ``calculate_dimensions(CONDITION_IMAGE_SIZE = 384 * 384, W / H)``, the VAE input the original image
  preprocessed at ``calculate_dimensions(VAE_IMAGE_SIZE = 1024 * 1024, W / H)``.

The options ``condition_area`` (VAE, default ``1024 * 1024``) and ``vl_area`` (Edit-Plus VL input, default
``384 * 384``) replace those areas (smaller areas cut the condition sequence for training at low resolution);
at the defaults the adapter equals the official pipeline called with the same PIL images and
``height = width = resolution`` (the generated image is square at the training ``resolution``; the pipelines'
default output size is the condition size). The transformer applies one RoPE layout to the whole batch, so all
prompts of one ``encode`` call must give the same condition grids (same number of source images and the same
rounded sizes); a mixed batch is refused with an error naming the prompts.

The Qwen2.5-VL input goes through the pipeline's ``processor``, a transformers ``Qwen2VLProcessor`` (with
torchvision installed its image processor is the fast torchvision one; the PIL one can differ slightly).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from PIL import Image
from torch import Tensor

from .common import PromptEmbeddingCache, on_device
from .qwen_image import QWEN_IMAGE_OPTIONS, QwenImageAdapter, from_vae_latents, pack_latents, pad_embeddings

# The pipelines' fixed areas (pixels): VAE condition image (both pipelines), VL input of Edit-Plus.
VAE_CONDITION_AREA = 1024 * 1024
VL_CONDITION_AREA = 384 * 384
QWEN_IMAGE_EDIT_OPTIONS = tuple(o for o in QWEN_IMAGE_OPTIONS if o != "max_sequence_length") + ("condition_area",)
QWEN_IMAGE_EDIT_PLUS_OPTIONS = QWEN_IMAGE_EDIT_OPTIONS + ("vl_area",)

__all__ = ["QwenImageEditAdapter", "QwenImageEditPlusAdapter", "condition_size", "to_pil", "image_digest",
           "QWEN_IMAGE_EDIT_OPTIONS", "QWEN_IMAGE_EDIT_PLUS_OPTIONS", "VAE_CONDITION_AREA", "VL_CONDITION_AREA"]


# -- pure conversions -----------------------------------------------------------------------------
def condition_size(area: int, width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` of about ``area`` pixels with the aspect ratio ``width / height``, each side rounded
    to a multiple of 32 (``calculate_dimensions`` of pipeline_qwenimage_edit(_plus).py:
    ``w = sqrt(area * r)``, ``h = w / r``, ``round(x / 32) * 32``)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return round(w / 32) * 32, round(h / 32) * 32


def to_pil(image: Tensor) -> Image.Image:
    """``[3, H, W]`` RGB in [0, 1] -> 8-bit PIL image (``round(255 x)``; exact for 8-bit sources)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"source images must be [3, H, W] tensors in [0, 1], got {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def image_digest(images: list[Image.Image]) -> str:
    """SHA-256 over the sizes and pixels of ``images``: the embedding-cache key part of a prompt's sources."""
    h = hashlib.sha256()
    for image in images:
        h.update(f"{image.size}".encode())
        h.update(image.tobytes())
    return h.hexdigest()


class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image-Edit: exactly one source image per prompt (``source_images = 1``).

    Args: as :class:`~flowalign.pipelines.qwen_image.QwenImageAdapter` (``pipe`` a ``QwenImageEditPipeline``),
    without ``max_sequence_length`` (the edit pipelines do not truncate), plus
        condition_area: pixel area the source image is resized to for the VAE condition (and, for Qwen-Image-Edit,
            the VL input): the pipelines' ``1024 * 1024`` by default (module docstring).
    """

    source_images = 1
    pipeline_cls: type = QwenImageEditPipeline
    options: tuple[str, ...] = QWEN_IMAGE_EDIT_OPTIONS
    family = "qwen_image_edit"

    def __init__(self, pipe: QwenImageEditPipeline, *, condition_area: int = VAE_CONDITION_AREA,
                 embedding_cache_dir: str | None = None, cache_namespace: str = "in-memory", **kwargs):
        super().__init__(pipe, **kwargs)
        self.condition_area = self._area("condition_area", condition_area)
        self.cache = PromptEmbeddingCache(embedding_cache_dir, f"{self.family}|{cache_namespace}|{self._cache_tag()}")

    @staticmethod
    def _area(name: str, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 32 * 32:
            raise ValueError(f"model.options.{name}={value!r} must be an integer pixel area >= 1024 (32 x 32)")
        return value

    def _cache_tag(self) -> str:
        return f"area={self.condition_area}"

    # -- source images --------------------------------------------------------------------------
    def _prepare(self, sources: list[Tensor]) -> tuple[list[Image.Image], list[Tensor]]:
        """One prompt's sources -> (VL input images, VAE inputs ``[1, 3, h_i, w_i]`` in [-1, 1]).

        Qwen-Image-Edit (``QwenImageEditPipeline.__call__``, step 3): resize to ``condition_size(area, W, H)``;
        the resized image feeds both the VL encoder and the VAE."""
        processor = self.pipe.image_processor
        image = to_pil(sources[0])
        w, h = condition_size(self.condition_area, *image.size)
        resized = processor.resize(image, h, w)
        return [resized], [processor.preprocess(resized, h, w)]

    @torch.no_grad()
    def _image_condition(self, images: list[list[Tensor]]) -> dict[str, Tensor]:
        """``{"image_latents": [B, N_c, 4C], "image_shapes": [B, K, 3] int64}``: each prompt's K source images
        VAE-encoded (posterior mode), normalised ``(z - mean) / std`` (``_encode_vae_image``), packed and
        concatenated along the sequence; ``image_shapes`` the RoPE grid ``(1, h_i/2, w_i/2)`` of each."""
        cfg = self.vae.config
        rows, shapes = [], []
        with on_device(self.vae, self.device, self.offload):
            for sources in images:
                packed, grids = [], []
                for pixels in self._prepare(sources)[1]:
                    posterior = self.vae.encode(pixels.unsqueeze(2).to(self.vae.device, self.vae.dtype)).latent_dist
                    z = from_vae_latents(posterior.mode(), cfg.latents_mean, cfg.latents_std)  # [1, C, h_i, w_i]
                    packed.append(pack_latents(z.to(self.device, self.dtype)))
                    grids.append((1, z.shape[-2] // 2, z.shape[-1] // 2))
                rows.append(torch.cat(packed, dim=1))
                shapes.append(grids)
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"{type(self).__name__}: the source images of one batch must give the same condition grids "
                             f"(number of images and sizes after resizing to condition_area={self.condition_area}); got "
                             f"{shapes}: use one aspect ratio per batch")
        return {"image_latents": torch.cat(rows), "image_shapes": torch.tensor(shapes, dtype=torch.long, device=self.device)}

    @torch.no_grad()
    def _embed_with_images(self, prompts: list[str], images: list[list[Tensor]]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [n, L, D], "prompt_mask": [n, L] bool}``: Qwen2.5-VL over each prompt with its own
        source images (the pipeline's ``encode_prompt(prompt, image=...)``), cached per (prompt, images)
        unpadded and zero-padded to the longest of the batch."""
        vl_inputs, keys = {}, []
        for prompt, sources in zip(prompts, images):
            vl_images = self._prepare(sources)[0]
            keys.append(f"{prompt}\0{image_digest(vl_images)}")
            vl_inputs[keys[-1]] = (prompt, vl_images)

        def compute(batch: list[str]) -> dict[str, Tensor]:  # one prompt per call: cache rows keep their own length
            (key,) = batch
            prompt, vl_images = vl_inputs[key]
            with on_device(self.pipe.text_encoder, self.device, self.offload):
                embeds, mask = self.pipe.encode_prompt(prompt=[prompt], image=self._vl_argument(vl_images), device=self.device)
            row = embeds[0] if mask is None else embeds[0][mask[0].bool()]  # encode_prompt drops an all-ones mask
            return {"prompt_embeds": row.unsqueeze(0)}

        rows = {key: self.cache.get_or_compute([key], compute)["prompt_embeds"][0] for key in vl_inputs}
        embeds, mask = pad_embeddings([rows[key].to(self.device, self.dtype) for key in keys])
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    @staticmethod
    def _vl_argument(vl_images: list[Image.Image]) -> Image.Image | list[Image.Image]:
        """The ``image=`` the pipeline hands ``encode_prompt``: Qwen-Image-Edit one PIL image."""
        return vl_images[0]

    # -- prediction -----------------------------------------------------------------------------
    def _packed_velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        """Packed velocity ``[B, h/2 * w/2, 4C]`` of the noisy tokens: the transformer sees
        ``[noisy tokens | condition tokens]`` with ``img_shapes = [(1, h/2, w/2), *source grids]`` and its
        output is cut back to the noisy tokens (the edit pipelines' loop)."""
        _, h, w = self.latent_shape
        noisy = pack_latents(x_t.to(self.dtype))
        mask = tensors["prompt_mask"]
        layout = [[(1, h // 2, w // 2), *(tuple(g) for g in row)] for row in tensors["image_shapes"].tolist()]
        out = self._forward_module(
            hidden_states=torch.cat([noisy, tensors["image_latents"].to(noisy.dtype)], dim=1),
            timestep=(sigma * 1000.0).to(self.dtype) / 1000.0,  # the pipeline's timestep / 1000, in the latents' dtype
            encoder_hidden_states=tensors["prompt_embeds"],
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # as encode_prompt: None without padding
            img_shapes=layout,
            return_dict=False,
        )[0]
        return out[:, : noisy.shape[1]]


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Qwen-Image-Edit-Plus (``QwenImageEditPlusPipeline``, Qwen-Image-Edit-2509 / 2511): one or more source
    images per prompt (``source_images = -1``).

    Args: as :class:`QwenImageEditAdapter`, plus
        vl_area: pixel area of the VL encoder's copy of each source image (the pipeline's
            ``CONDITION_IMAGE_SIZE = 384 * 384`` by default).
    """

    source_images = -1
    pipeline_cls: type = QwenImageEditPlusPipeline
    options = QWEN_IMAGE_EDIT_PLUS_OPTIONS
    family = "qwen_image_edit_plus"

    def __init__(self, pipe: QwenImageEditPlusPipeline, *, vl_area: int = VL_CONDITION_AREA, **kwargs):
        self.vl_area = self._area("vl_area", vl_area)
        super().__init__(pipe, **kwargs)

    def _cache_tag(self) -> str:
        return f"area={self.condition_area}|vl={self.vl_area}"

    def _prepare(self, sources: list[Tensor]) -> tuple[list[Image.Image], list[Tensor]]:
        """Per source (``QwenImageEditPlusPipeline.__call__``, step 3): the VL input resized to
        ``condition_size(vl_area, W, H)``; the VAE input the original preprocessed at
        ``condition_size(condition_area, W, H)``."""
        processor = self.pipe.image_processor
        vl_images, vae_inputs = [], []
        for source in sources:
            image = to_pil(source)
            cw, ch = condition_size(self.vl_area, *image.size)
            vw, vh = condition_size(self.condition_area, *image.size)
            vl_images.append(processor.resize(image, ch, cw))
            vae_inputs.append(processor.preprocess(image, vh, vw))
        return vl_images, vae_inputs

    @staticmethod
    def _vl_argument(vl_images: list[Image.Image]) -> list[Image.Image]:
        """Edit-Plus passes the list of resized images ("Picture 1: ...", "Picture 2: ...")."""
        return vl_images
