"""Plumbing shared by the model-family adapters: an on-disk prompt-embedding cache, moving idle
modules off the accelerator, choosing diffusers' attention backend, checking ``model.options``,
and saving LoRA-trained denoisers (merged, or as diffusers LoRA files)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


class PromptEmbeddingCache:
    """Per-prompt encoder outputs cached on disk, one safetensors file per prompt.

    Args:
        directory: cache folder; ``None`` disables caching (every call computes).
        namespace: identifies the encoder (model path, max length, ...): two encoders with
            different namespaces never share entries.
    """

    def __init__(self, directory: str | None, namespace: str):
        self.directory = directory
        self.namespace = namespace
        if directory is not None:
            os.makedirs(directory, exist_ok=True)

    def _file(self, prompt: str) -> str:
        key = hashlib.sha256(f"{self.namespace}\0{prompt}".encode()).hexdigest()
        return os.path.join(self.directory, f"{key}.safetensors")

    def get_or_compute(self, prompts: list[str], compute: Callable[[list[str]], dict[str, Tensor]]) -> dict[str, Tensor]:
        """Tensors ``{name: [len(prompts), ...]}`` in the order of ``prompts``; missing prompts are
        encoded in one ``compute(missing)`` call and written atomically (temp file + rename)."""
        if self.directory is None:
            return compute(list(prompts))
        rows: dict[str, dict[str, Tensor]] = {}
        for prompt in dict.fromkeys(prompts):
            if os.path.exists(self._file(prompt)):
                rows[prompt] = load_file(self._file(prompt))
        missing = [p for p in dict.fromkeys(prompts) if p not in rows]
        if missing:
            computed = compute(missing)
            for i, prompt in enumerate(missing):
                row = {name: t[i].detach().to("cpu").contiguous().clone() for name, t in computed.items()}
                fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
                os.close(fd)
                save_file(row, tmp)
                os.replace(tmp, self._file(prompt))
                rows[prompt] = row
        names = rows[prompts[0]].keys()
        return {name: torch.stack([rows[p][name] for p in prompts]) for name in names}


@contextmanager
def on_device(module: nn.Module, device: torch.device | str, offload: bool) -> Iterator[nn.Module]:
    """Run a block with ``module`` on ``device``; with ``offload``, park it on the CPU afterwards
    (keeps VAEs and text encoders off the accelerator while the denoiser trains)."""
    module.to(device)
    try:
        yield module
    finally:
        if offload:
            module.to("cpu")


def decode_shifted_latents(vae: nn.Module, latents: Tensor, device: torch.device | str, offload: bool) -> Tensor:
    """``[B, C, h, w]`` diffusion-space latents -> ``[B, 3, H, W]`` images in [0, 1] through a VAE whose config has
    ``scaling_factor`` and ``shift_factor``: ``z = latents / scaling_factor + shift_factor`` (the inverse of the
    SD3 / FLUX / Z-Image pipelines' ``(z - shift_factor) * scaling_factor``), decoded, mapped from [-1, 1]."""
    with on_device(vae, device, offload):
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def set_attention_backend(module: nn.Module, backend: str | None) -> None:
    """Select diffusers' attention backend (e.g. ``"flash"``, ``"_native_cudnn"``, ``"xformers"``);
    ``None`` / ``"default"`` keeps PyTorch SDPA."""
    if backend in (None, "default"):
        return
    if not hasattr(module, "set_attention_backend"):
        raise ValueError(f"attention_backend={backend!r}: {type(module).__name__} cannot switch attention backends")
    try:
        module.set_attention_backend(backend)
    except (ValueError, RuntimeError, ImportError, KeyError) as err:
        raise ValueError(f"attention_backend={backend!r} is not available here: {err}") from err


def place_modules(denoiser: nn.Module, frozen: list[nn.Module], device: torch.device | str, offload: bool,
                  attention_backend: str | None) -> None:
    """Freeze the ``frozen`` modules (text encoders, VAE) in eval mode, parked on the CPU with ``offload``
    (``model.options.offload_idle``; :func:`on_device` brings them in per use) or else on ``device``; put the
    denoiser on ``device`` with diffusers' ``attention_backend`` (:func:`set_attention_backend`)."""
    for module in frozen:
        module.requires_grad_(False).eval()
        module.to("cpu" if offload else device)
    denoiser.to(device)
    set_attention_backend(denoiser, attention_backend)


def checked_resolution(resolution: int, multiple: int, why: str) -> int:
    """``resolution`` (pixels) as an int, or a ValueError naming it when it is not a positive multiple of
    ``multiple`` (``why`` says what makes the multiple, e.g. "VAE factor x 2x2 packing")."""
    if resolution <= 0 or resolution % multiple:
        raise ValueError(f"resolution={resolution} must be a positive multiple of {multiple} ({why})")
    return int(resolution)


def check_options(options: dict, allowed: tuple[str, ...], family: str) -> None:
    """Raise a ValueError naming the unknown ``model.options`` keys of an adapter."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"model.options: unknown option(s) {unknown} for the {family} adapter; allowed: {sorted(allowed)}")


def merged_lora_copy(module: nn.Module) -> nn.Module:
    """A copy of a peft-LoRA-wrapped diffusers model with the LoRA deltas merged into the base
    weights and the LoRA layers removed (what ``save_pretrained`` should write).

    Holds a second copy of the denoiser while saving; ``save_transformer_lora`` does not.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(module)
    for layer in merged.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
    merged.unload_lora()
    return merged


def save_transformer_lora(pipeline_cls: type, denoiser: nn.Module, directory: str) -> None:
    """Write a transformer denoiser's peft LoRA in the diffusers LoRA format
    (``pytorch_lora_weights.safetensors`` plus the adapter metadata, so a ``lora_alpha != r`` scale
    survives), readable by ``pipeline_cls.load_lora_weights(directory)``."""
    from peft.utils import get_peft_model_state_dict

    if not getattr(denoiser, "peft_config", None):
        raise RuntimeError("save_lora_weights: the denoiser has no LoRA adapter (train with model.lora_rank > 0)")
    name = denoiser.active_adapters()[0]
    metadata = denoiser.peft_config[name].to_dict()
    if metadata.get("target_modules"):  # a set in peft's config: make the JSON metadata deterministic
        metadata["target_modules"] = sorted(metadata["target_modules"])
    pipeline_cls.save_lora_weights(
        directory,
        transformer_lora_layers=get_peft_model_state_dict(denoiser, adapter_name=name),
        transformer_lora_adapter_metadata=metadata,
    )


def model_name(path: str) -> str:
    """A stable name for ``model.pretrained``: the absolute path of a local folder, else the hub id as given
    (keys the prompt-embedding cache, so a relative path and its absolute form share entries)."""
    return os.path.abspath(path) if os.path.exists(path) else path


def load_diffusers_pipeline(pipeline_cls: type, path: str, dtype: torch.dtype, **load_kwargs):
    """``pipeline_cls.from_pretrained(path, torch_dtype=dtype, **load_kwargs)``, with a load failure re-raised
    as a FileNotFoundError naming ``model.pretrained``."""
    try:
        return pipeline_cls.from_pretrained(path, torch_dtype=dtype, **load_kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"model.pretrained={path!r}: cannot load a {pipeline_cls.__name__}: {err}") from err


class TransformerPipelineIO:
    """Loading and saving for an adapter whose whole diffusers pipeline is ``self.pipe`` and whose trainable
    denoiser ``self.denoiser`` is ``pipe.transformer`` (FLUX.1, FLUX.1 Kontext, SD3, Z-Image, Qwen-Image).

    Subclasses set ``pipeline_cls`` (the diffusers pipeline class), ``options`` (the accepted ``model.options``)
    and ``family`` (the adapter's registry name, for error messages), and take
    ``(pipe, *, device, cache_namespace, **options)`` in ``__init__``.
    """

    pipeline_cls: type
    options: tuple[str, ...]
    family: str

    @classmethod
    def _load_kwargs(cls, options: dict) -> dict:
        """Extra ``pipeline_cls.from_pretrained`` keyword arguments chosen by ``options`` (none by default)."""
        return {}

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        **options):
        """Load a diffusers checkpoint of ``pipeline_cls`` (local folder in pipeline layout, or hub id);
        ``options`` are ``model.options`` (the names in ``cls.options``, see the class docstring)."""
        check_options(options, cls.options, cls.family)
        pipe = load_diffusers_pipeline(cls.pipeline_cls, path, dtype, **cls._load_kwargs(options))
        return cls(pipe, device=device, cache_namespace=model_name(path), **options)

    def save_pretrained(self, directory: str) -> None:
        """Save the pipeline (LoRA merged into a copy of the transformer) so ``from_pretrained`` reloads it."""
        transformer = merged_lora_copy(self.denoiser) if self.has_lora() else self.denoiser
        self.pipeline_cls(**{**self.pipe.components, "transformer": transformer}).save_pretrained(directory)

    def save_lora_weights(self, directory: str) -> None:
        """The LoRA alone, in the format ``pipeline_cls.load_lora_weights`` reads."""
        save_transformer_lora(self.pipeline_cls, self.denoiser, directory)


SETTINGS_FILE = "flowalign_adapter.json"  # adapter options saved beside a video pipeline folder


def saved_options(path: str, options: dict, layout: str) -> dict:
    """``options`` over the defaults a flowalign run saved in ``path/flowalign_adapter.json`` (if any).

    Raises FileNotFoundError when ``path`` is a folder without ``model_index.json``; ``layout`` names the
    expected pipeline layout in that message.
    """
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"model.pretrained={path!r} has no model_index.json (expected the {layout} layout)")
    settings_file = os.path.join(path, SETTINGS_FILE)
    if os.path.exists(settings_file):
        with open(settings_file) as f:
            options = {**json.load(f), **options}
    return options


def save_options(directory: str, settings: dict) -> None:
    """Write the adapter options ``saved_options`` reads back into ``directory/flowalign_adapter.json``."""
    with open(os.path.join(directory, SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=2)
