"""The pipeline-adapter protocol every model family implements (docs/ARCHITECTURE.md, "Pipeline adapters").

An adapter wraps real diffusers components and exposes the five operations the samplers, the
rollout engine and the recipes need. Everything it returns is in the *flow convention*:
``x_t = (1 - sigma) * x0 + sigma * eps`` and the model output is the velocity ``v = eps - x0``,
with sigma running from 1 (noise) to 0 (data). Epsilon / v-prediction UNets convert here, so
samplers see one convention.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from flowalign.types import Conditioning


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Resolution-dependent timestep shift of SD3 (Esser et al. 2024, "Scaling Rectified Flow
    Transformers", Eq. 23): ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``.

    Matches ``FlowMatchEulerDiscreteScheduler(shift=...)``; shift 1 is the identity.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def static_shift_sigmas(num_steps: int, shift: float) -> Tensor:
    """``[num_steps + 1]`` fp32 schedule: :func:`shift_sigmas` on ``linspace(1, 0, T + 1)`` computed in
    float64 (the ``shift`` option of the FLUX-style adapters, DanceGRPO's static shift)."""
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


@runtime_checkable
class PipelineAdapter(Protocol):
    """What flowalign needs from a model family.

    Attributes:
        latent_shape: per-sample latent shape, e.g. ``(C, H, W)`` or ``(C, F, H, W)``.
        lora_target_modules: module-name patterns peft should wrap with LoRA.
        device, dtype: where the adapter's modules live.
        modality: ``"image"`` or ``"video"``, what ``decode`` returns.
    """

    latent_shape: tuple[int, ...]
    modality: str
    lora_target_modules: list[str]
    device: torch.device
    dtype: torch.dtype

    def encode(self, prompts: list[str], negative_prompts: list[str] | None = None,
               images: list[list[Tensor]] | None = None) -> Conditioning:
        """Encode ``B`` prompts (and their negatives, when CFG is used) into a Conditioning; editing
        adapters (``source_images != 0``) also take each prompt's source images ``[3, H, W]`` in [0, 1]."""
        ...

    def init_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Initial noise ``[n, *latent_shape]`` (sigma = 1), drawn from ``generator``."""
        ...

    def sigmas(self, num_steps: int) -> Tensor:
        """The ``[num_steps + 1]`` fp32 schedule, descending within [0, 1] (flow models: 1 -> 0 with the
        model's shift; DDPM-based adapters such as SD/SDXL: their DDIM schedule's flow sigmas)."""
        ...

    def predict(self, x_t: Tensor, sigma: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """Velocity ``[B, *latent_shape]`` at ``x_t [B, *latent_shape]``, ``sigma [B]``.

        With ``guidance_scale > 1`` and ``cond.negative`` set, applies classifier-free guidance
        ``v = v_neg + s * (v_pos - v_neg)`` (Ho & Salimans 2022), evaluating both halves in one
        batched call.
        """
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Media in [0, 1]: ``[B, 3, H, W]`` images or ``[B, F, 3, H, W]`` video."""
        ...

    def trainable_module(self) -> nn.Module:
        """The module the policy update trains (the denoiser), LoRA-wrapped or not."""
        ...

    def set_trainable_module(self, module: nn.Module) -> None:
        """Replace the denoiser, e.g. by its peft- or accelerate-wrapped version."""
        ...

    def disable_adapter(self) -> AbstractContextManager:
        """Context in which ``predict`` runs the reference policy (base weights, LoRA off)."""
        ...

    def save_pretrained(self, directory: str) -> None:
        """Save the (merged, if LoRA) components so ``from_pretrained(directory)`` reloads them."""
        ...


def guided(v_cond: Tensor, v_uncond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6) in velocity space:
    ``v = v_uncond + s * (v_cond - v_uncond)``."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def sigma_batch(sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Broadcast a float or ``[B]`` sigma to a ``[batch]`` fp32 tensor on ``device``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    return sigma.expand(batch) if sigma.ndim == 0 else sigma


class AdapterBase:
    """Shared plumbing for adapters: the trainable denoiser (possibly wrapped by accelerate /
    DDP), the reference policy for KL, and classifier-free guidance batching.

    Subclasses set ``self.denoiser`` (the unwrapped module) in ``__init__`` and implement
    ``_velocity(x_t, sigma[B], tensors) -> v`` for one conditioning half.
    """

    denoiser: nn.Module
    _wrapped: nn.Module | None = None
    _reference: nn.Module | None = None
    #: source images per prompt: 0 = text-only, 1 = exactly one (FLUX.1 Kontext, Qwen-Image-Edit),
    #: -1 = one or more (Qwen-Image-Edit-Plus). Non-zero adapters need ``encode(..., images=)``.
    source_images: int = 0

    @property
    def modality(self) -> str:
        """``"video"`` for ``[C, F, h, w]`` latents, else ``"image"``: what ``decode`` returns and so what a
        plain reward function is wrapped as. Adapters with another latent layout (LTX-2's flat joint
        latent) set it themselves."""
        return "video" if len(self.latent_shape) == 4 else "image"

    @property
    def device(self) -> torch.device:
        """Where the denoiser (and so ``predict``) runs."""
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's weights dtype (the model is called in it; step math stays fp32)."""
        return self.denoiser.dtype

    # -- trainable module -------------------------------------------------------------------
    def trainable_module(self) -> nn.Module:
        return self.denoiser

    def set_trainable_module(self, module: nn.Module) -> None:
        """Route ``predict`` through ``module`` (e.g. the DDP wrapper returned by
        ``accelerator.prepare``); ``trainable_module()`` keeps returning the unwrapped one."""
        self._wrapped = module

    @property
    def _forward_module(self) -> nn.Module:
        return self._wrapped if self._wrapped is not None else self.denoiser

    # -- reference policy -------------------------------------------------------------------
    def keep_reference_copy(self) -> None:
        """For full fine-tuning with a KL term: keep a frozen copy of the current weights as the
        reference policy. With LoRA this is unnecessary (``disable_adapter`` turns LoRA off)."""
        import copy

        self._reference = copy.deepcopy(self.denoiser).requires_grad_(False).eval()

    @property
    def reference_copy(self) -> nn.Module | None:
        """The frozen reference copy of :meth:`keep_reference_copy` (``None`` without one)."""
        return self._reference

    def has_lora(self) -> bool:
        return bool(getattr(self.denoiser, "peft_config", None))

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run ``predict`` with the reference policy: LoRA disabled, or the frozen reference copy."""
        if self.has_lora():
            self.denoiser.disable_adapters()
            try:
                yield
            finally:
                self.denoiser.enable_adapters()
        elif self._reference is not None:
            saved = self._wrapped
            self._wrapped = self._reference
            try:
                yield
            finally:
                self._wrapped = saved
        else:
            raise RuntimeError(
                "No reference policy: train with LoRA (model.lora_rank > 0) or call keep_reference_copy() "
                "before training when a KL term is used with full fine-tuning."
            )

    # -- prompts and noise ---------------------------------------------------------------------
    def _embed(self, prompts: list[str]) -> dict[str, Tensor]:
        """Encoder outputs for ``prompts``, each ``[len(prompts), ...]`` on the adapter's device."""
        raise NotImplementedError

    def _image_condition(self, images: list[list[Tensor]]) -> dict[str, Tensor]:
        """Editing adapters: the tensors that depend on the source images alone (e.g. packed VAE latents
        ``"image_latents": [B, N, D]``), shared by the prompt and the negative half."""
        raise NotImplementedError

    def _embed_with_images(self, prompts: list[str], images: list[list[Tensor]]) -> dict[str, Tensor]:
        """Editing adapters: the prompt embeddings; a text encoder that also sees the source images
        (Qwen2.5-VL) overrides this, a text-only one keeps :meth:`_embed`."""
        return self._embed(prompts)

    def _check_images(self, prompts: list[str], images: list[list[Tensor]] | None) -> None:
        """``images`` is required iff ``source_images != 0``: one list per prompt, each with the right count
        of ``[3, H, W]`` tensors."""
        name = type(self).__name__
        if self.source_images == 0:
            if images is not None:
                raise ValueError(f"{name} is a text-to-media adapter: it takes no source images (images=...)")
            return
        if images is None:
            raise ValueError(f"{name} edits source images: encode(prompts, images=[[image, ...] per prompt]) is required")
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} source-image lists")
        for i, per_prompt in enumerate(images):
            if self.source_images == 1 and len(per_prompt) != 1:
                raise ValueError(f"{name} edits exactly one source image per prompt; prompt {i} has {len(per_prompt)}")
            if not per_prompt:
                raise ValueError(f"{name}: prompt {i} has no source image")
            for image in per_prompt:
                if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
                    raise ValueError(f"{name}: prompt {i}'s source images must be [3, H, W] tensors in [0, 1], got "
                                     f"{getattr(image, 'shape', type(image).__name__)}")

    def encode(self, prompts: list[str], negative_prompts: list[str] | None = None,
               images: list[list[Tensor]] | None = None) -> Conditioning:
        """Encode ``B`` prompts; with ``negative_prompts`` also the negative half used by CFG.

        Editing adapters (``source_images != 0``) take ``images``: per prompt a list of ``[3, H, W]``
        source images in [0, 1]; their condition (:meth:`_image_condition`) joins both halves, so row
        slicing and CFG batching treat it like any prompt tensor."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(negative_prompts)} negative_prompts")
        self._check_images(prompts, images)
        if images is None:
            negative = self._embed(list(negative_prompts)) if negative_prompts is not None else None
            return Conditioning(self._embed(list(prompts)), negative)
        shared = self._image_condition(images)
        negative = None
        if negative_prompts is not None:
            negative = {**self._embed_with_images(list(negative_prompts), images), **shared}
        return Conditioning({**self._embed_with_images(list(prompts), images), **shared}, negative)

    def init_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Standard-normal ``[n, *latent_shape]`` fp32 noise, drawn on the generator's device (so a CPU
        generator gives the same noise on every device) and moved to the adapter's."""
        gen_device = generator.device if generator is not None else "cpu"
        return torch.randn((n, *self.latent_shape), generator=generator, device=gen_device).to(self.device)

    # -- prediction -------------------------------------------------------------------------
    def _velocity(self, x_t: Tensor, sigma: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def predict(self, x_t: Tensor, sigma: Tensor | float, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        sigma = sigma_batch(sigma, x_t.shape[0], x_t.device)
        if guidance_scale == 1.0 or cond.negative is None:
            return self._velocity(x_t, sigma, cond.tensors)
        both = {k: torch.cat([cond.negative[k], cond.tensors[k]]) for k in cond.tensors}
        v = self._velocity(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), both)
        v_uncond, v_cond = v.chunk(2)
        # Flow-GRPO trains through the conditional branch only; the unconditional one is detached.
        return guided(v_cond, v_uncond.detach(), guidance_scale)
