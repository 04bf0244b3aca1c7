"""Stable Diffusion XL adapter: the SD adapter plus SDXL's two text encoders, pooled text embeddings
and micro-conditioning ``add_time_ids`` (Podell et al. 2023, "SDXL", Sec. 2.2:
``(original_size, crops_coords_top_left, target_size)``).

Everything else (DDIM schedule as flow sigmas, epsilon / v -> velocity, decoding) is inherited from
:class:`flowalign.pipelines.sd.StableDiffusionAdapter`. Prompt encoding reuses
``StableDiffusionXLPipeline.encode_prompt`` (penultimate CLIP layers of both encoders concatenated,
pooled projection of the second). ``tests/test_adapter_sd.py`` checks that ``sample_ode`` on this
adapter reproduces ``StableDiffusionXLPipeline`` with a ``DDIMScheduler``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .sd import StableDiffusionAdapter

__all__ = ["StableDiffusionXLAdapter"]


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """Pipeline adapter for SDXL (``StableDiffusionXLPipeline`` checkpoints).

    Args (beyond :class:`StableDiffusionAdapter`'s):
        original_size, target_size: ``(height, width)`` micro-conditioning; default
            ``(resolution, resolution)``, the pipeline's default.
        crops_coords_top_left: crop micro-conditioning, default ``(0, 0)``.

    Negative prompts: an empty negative prompt gives all-zero embeddings when the checkpoint sets
    ``force_zeros_for_empty_prompt`` (SDXL base does), which is what ``StableDiffusionXLPipeline``
    does when called without a negative prompt; non-empty ones are encoded like prompts.
    """

    pipeline_class_name = "StableDiffusionXLPipeline"
    load_kwargs: dict[str, Any] = {"feature_extractor": None, "image_encoder": None}

    def __init__(self, pipe: Any, *, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 **options: Any):
        super().__init__(pipe, **options)
        size = (self.resolution, self.resolution)
        original, target = tuple(original_size or size), tuple(target_size or size)
        for name, value in (("original_size", original), ("crops_coords_top_left", tuple(crops_coords_top_left)),
                            ("target_size", target)):
            if len(value) != 2:
                raise ValueError(f"{name} must be a (height, width) pair, got {value!r}")
        te2 = pipe.text_encoder_2
        projection_dim = te2.config.projection_dim if te2 is not None else None
        # [1, 6]; raises a ValueError naming the sizes if the UNet's add-embedding does not match.
        self.add_time_ids: Tensor = pipe._get_add_time_ids(original, tuple(crops_coords_top_left), target,
                                                           dtype=torch.float32, text_encoder_projection_dim=projection_dim)

    def _text_encoder_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2) if m is not None]

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [B, L, D1 + D2], "pooled_prompt_embeds": [B, P]}``."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False, clip_skip=self.clip_skip)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _encode_negative(self, negative_prompts: list[str]) -> dict[str, Tensor]:
        if not getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            return self._encode(negative_prompts)
        n, length = len(negative_prompts), self.pipe.tokenizer_2.model_max_length
        width = sum(m.config.hidden_size for m in self.text_encoders)
        out = {"prompt_embeds": torch.zeros(n, length, width, device=self.device, dtype=self.dtype),
               "pooled_prompt_embeds": torch.zeros(n, self.pipe.text_encoder_2.config.projection_dim,
                                                   device=self.device, dtype=self.dtype)}
        rows = [i for i, p in enumerate(negative_prompts) if p]
        if rows:
            encoded = self._encode([negative_prompts[i] for i in rows])
            for k in out:
                out[k][rows] = encoded[k]
        return out

    def _unet_kwargs(self, tensors: dict[str, Tensor], batch: int) -> dict[str, Any]:
        pooled = tensors["pooled_prompt_embeds"]
        time_ids = self.add_time_ids.to(device=pooled.device, dtype=pooled.dtype).expand(batch, -1)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
