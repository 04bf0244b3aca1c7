"""Model-family adapters (importable as ``flowalign.pipelines``).

``ADAPTERS`` maps a family name to the dotted path of its adapter class; classes import lazily
so that ``import flowalign.pipelines`` stays cheap.
"""

from __future__ import annotations

import importlib

ADAPTERS: dict[str, str] = {
    "toy": "flowalign.pipelines.toy:ToyAdapter",
    "sd": "flowalign.pipelines.sd:StableDiffusionAdapter",
    "sdxl": "flowalign.pipelines.sdxl:StableDiffusionXLAdapter",
    "sd3": "flowalign.pipelines.sd3:StableDiffusion3Adapter",
    "flux": "flowalign.pipelines.flux:FluxAdapter",
    "qwen_image": "flowalign.pipelines.qwen_image:QwenImageAdapter",
    "qwen_image21": "flowalign.pipelines.qwen_image21:QwenImage21Adapter",
    "qwen_image_edit": "flowalign.pipelines.qwen_image_edit:QwenImageEditAdapter",
    "qwen_image_edit_plus": "flowalign.pipelines.qwen_image_edit:QwenImageEditPlusAdapter",
    "flux_kontext": "flowalign.pipelines.flux_kontext:FluxKontextAdapter",
    "flux2": "flowalign.pipelines.flux2:Flux2Adapter",
    "z_image": "flowalign.pipelines.z_image:ZImageAdapter",
    "wan": "flowalign.pipelines.wan:WanAdapter",
    "wan_i2v": "flowalign.pipelines.wan_i2v:WanImageToVideoAdapter",
    "hunyuan_video15": "flowalign.pipelines.hunyuan_video15:HunyuanVideo15Adapter",
    "ltx2": "flowalign.pipelines.ltx2:LTX2Adapter",
}


def load_adapter_class(name: str):
    """Resolve a registered family name or a ``package.module:Class`` / ``package.module.Class`` path."""
    path = ADAPTERS.get(name, name)
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"unknown pipeline adapter {name!r}; registered: {sorted(ADAPTERS)} (or give 'package.module:Class')")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import pipeline adapter {name!r} ({path}): {err}") from err
