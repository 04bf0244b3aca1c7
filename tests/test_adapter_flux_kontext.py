"""FLUX.1 Kontext adapter against the official ``FluxKontextPipeline``, with the tiny random FLUX components of
tests/test_adapter_sd3_flux.py and the same source images on both sides."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from flowalign.pipelines.flux import pack_latents, unpack_latents
from flowalign.pipelines.flux_kontext import FluxKontextAdapter, kontext_image_ids, resize_source
from flowalign.rollout import sample_ode
from tests.test_adapter_sd3_flux import RES, tiny_flux_pipeline
from tests.tiny_components import (LORA_IMAGE_GRPO, add_random_lora, assert_same_gradients, denoiser_gradients,
                                   grpo_overrides)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red apple on a table", "a small dog"]


def tiny_kontext_pipeline(tmp: str) -> FluxKontextPipeline:
    """FLUX.1-dev's tiny components (guidance embedding, dynamic shift) in a FluxKontextPipeline."""
    return FluxKontextPipeline(**tiny_flux_pipeline(tmp).components)


def _sources(size: tuple[int, int] = (RES, RES), seed: int = 3) -> list[torch.Tensor]:
    """Two smooth random RGB images ``[3, H, W]`` in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 3, 4, 4, generator=gen)
    return list(torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False))


def _noise(adapter, n: int = 2, seed: int = 0) -> torch.Tensor:
    return adapter.init_latents(n, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("tiny-kontext"))
    tiny_kontext_pipeline(d + "-tok").save_pretrained(d)
    return d


def _official(pipe: FluxKontextPipeline, sources: list[torch.Tensor], x0: torch.Tensor, adapter, steps: int,
              output_type: str = "latent", **kwargs) -> torch.Tensor:
    """The pipeline on the adapter's deterministic preprocessing path (module docstring of flux_kontext)."""
    image = torch.stack([resize_source(s, RES) for s in sources])
    out = pipe(image=image, prompt=PROMPTS, height=RES, width=RES, max_area=RES * RES, _auto_resize=False,
               num_inference_steps=steps, latents=pack_latents(x0), output_type=output_type, **kwargs).images
    return unpack_latents(out, *adapter.latent_shape[1:]) if output_type == "latent" else out


# -- pure functions -------------------------------------------------------------------------------
def test_kontext_ids_and_resize_match_pipeline(tmp_path):
    pipe = tiny_kontext_pipeline(str(tmp_path))
    image = pipe.image_processor.preprocess(torch.stack(_sources()), RES, RES)
    _, image_latents, latent_ids, image_ids = pipe.prepare_latents(image, 2, 1, RES, RES, torch.float32, "cpu", None)
    assert torch.equal(kontext_image_ids(RES // 2, RES // 2), image_ids)
    assert kontext_image_ids(3, 2)[3].tolist() == [1.0, 1.0, 1.0]  # hand-worked: token 3 = row 1, col 1, source axis 1
    adapter = FluxKontextAdapter(pipe, resolution=RES)
    torch.testing.assert_close(adapter.encode(PROMPTS, images=[[s] for s in _sources()]).tensors["image_latents"],
                               image_latents, atol=1e-6, rtol=0)
    src = _sources()[0]
    assert resize_source(src, RES) is src  # already at the resolution: untouched
    assert resize_source(torch.full((3, 24, 40), 0.25), RES).shape == (3, RES, RES)
    torch.testing.assert_close(resize_source(torch.full((3, 24, 40), 0.25), RES), torch.full((3, RES, RES), 0.25))


# -- fidelity ---------------------------------------------------------------------------------------
def test_kontext_ode_rollout_and_decode_reproduce_pipeline(tmp_path):
    pipe = tiny_kontext_pipeline(str(tmp_path))
    adapter = FluxKontextAdapter(pipe, resolution=RES, guidance=2.5)
    sources, x0 = _sources(), _noise(adapter)
    ours = sample_ode(adapter, adapter.encode(PROMPTS, images=[[s] for s in sources]), 4, latents=x0)
    ref = _official(pipe, sources, x0, adapter, 4, guidance_scale=2.5)
    assert ours.abs().max() > 0.1 and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    torch.testing.assert_close(adapter.sigmas(4), pipe.scheduler.sigmas, atol=1e-6, rtol=0)
    torch.testing.assert_close(adapter.decode(ours), _official(pipe, sources, x0, adapter, 4, "pt", guidance_scale=2.5),
                               atol=1e-4, rtol=0)
    # the source image matters: another source changes the edit
    other = sample_ode(adapter, adapter.encode(PROMPTS, images=[[s] for s in _sources(seed=9)]), 4, latents=x0)
    assert (other - ours).abs().max() > 1e-3


def test_kontext_true_cfg_with_resized_sources_matches_pipeline(tmp_path):
    pipe = tiny_kontext_pipeline(str(tmp_path))
    adapter = FluxKontextAdapter(pipe, resolution=RES)
    sources, x0 = _sources(size=(24, 20)), _noise(adapter)
    cond = adapter.encode(PROMPTS, ["blurry", "blurry"], images=[[s] for s in sources])
    torch.testing.assert_close(cond.negative["image_latents"], cond.tensors["image_latents"])
    ours = sample_ode(adapter, cond, 3, latents=x0, guidance_scale=2.0)
    ref = _official(pipe, sources, x0, adapter, 3, negative_prompt=["blurry"] * 2, true_cfg_scale=2.0, guidance_scale=3.5)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_kontext_lora_round_trips_into_official_pipeline(kontext_dir, tmp_path):
    adapter = FluxKontextAdapter.from_pretrained(kontext_dir, resolution=RES)
    sources, x0 = _sources(), _noise(adapter)
    cond = adapter.encode(PROMPTS, images=[[s] for s in sources])
    before = sample_ode(adapter, cond, 2, latents=x0)
    add_random_lora(adapter)
    lora_out = sample_ode(adapter, cond, 2, latents=x0)
    assert (lora_out - before).abs().max() > 1e-3
    adapter.save_lora_weights(str(tmp_path / "lora"))
    official = FluxKontextPipeline.from_pretrained(kontext_dir)
    official.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(lora_out, _official(official, sources, x0, adapter, 2, guidance_scale=3.5), atol=1e-4, rtol=0)
    adapter.save_pretrained(str(tmp_path / "merged"))
    merged = FluxKontextAdapter.from_pretrained(str(tmp_path / "merged"), resolution=RES)
    assert not merged.has_lora()
    torch.testing.assert_close(sample_ode(merged, merged.encode(PROMPTS, images=[[s] for s in sources]), 2, latents=x0),
                               lora_out, atol=1e-4, rtol=0)


def test_kontext_gradient_checkpointing_gives_same_gradients(tmp_path):
    grads = []
    for checkpointing in (False, True):
        adapter = FluxKontextAdapter(tiny_kontext_pipeline(str(tmp_path)), resolution=RES)
        cond = adapter.encode(PROMPTS, images=[[s] for s in _sources()])
        grads.append(denoiser_gradients(adapter, _noise(adapter), torch.tensor([0.7, 0.3]), cond, checkpointing))
    assert_same_gradients(*grads)


def test_kontext_options_and_image_arguments(kontext_dir):
    adapter = FluxKontextAdapter.from_pretrained(kontext_dir, resolution=RES)
    assert adapter.source_images == 1 and adapter.guidance == 3.5
    with pytest.raises(ValueError, match="images=.*required"):
        adapter.encode(PROMPTS)
    with pytest.raises(ValueError, match="exactly one source image per prompt; prompt 1 has 2"):
        adapter.encode(PROMPTS, images=[[_sources()[0]], _sources()])
    with pytest.raises(ValueError, match="2 prompts but 1 source-image lists"):
        adapter.encode(PROMPTS, images=[[_sources()[0]]])
    with pytest.raises(ValueError, match="use_t5"):
        FluxKontextAdapter.from_pretrained(kontext_dir, use_t5=False)


# -- recipe ---------------------------------------------------------------------------------------
def _edit_prompt_files(folder) -> tuple[str, str]:
    """JSONL prompt files whose records name PNG source images relative to the file's folder."""
    os.makedirs(folder / "img", exist_ok=True)
    for i, src in enumerate(_sources(size=(20, 20))):
        Image.fromarray((src.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / "img" / f"{i}.png")
    train, evaluation = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps({"prompt": p, "image": f"img/{i}.png"}) + "\n" for i, p in enumerate(PROMPTS)))
    evaluation.write_text(json.dumps({"prompt": "make it blue", "image": "img/1.png"}) + "\n")
    return str(train), str(evaluation)


@pytest.mark.slow
def test_kontext_grpo_config_runs_two_iterations(kontext_dir, tmp_path):
    """The shipped config with tiny overrides: real recipe, tiny saved components, CPU, source images from JSONL."""
    import flowalign

    train, evaluation = _edit_prompt_files(tmp_path)
    options = {"resolution": RES, "max_sequence_length": 16, "embedding_cache_dir": str(tmp_path / "cache")}
    overrides = grpo_overrides(kontext_dir, str(tmp_path / "run"), train, evaluation, LORA_IMAGE_GRPO,
                               # the shipped CLIP score needs hub weights: the preservation reward alone here
                               rewards=[{"_component_": "source_ssim", "weight": 1.0}],
                               **{"model.options": options, "eval.samples_per_prompt": 2, "eval.grid_prompts": 1})
    summary = flowalign.train(os.path.join(REPO, "configs/grpo/flux_kontext_ssim.yaml"), overrides)
    assert summary["iterations"] == 2 and np.isfinite(summary["after"]["eval/reward"])
    assert -1 <= summary["after"]["eval/reward"] <= 1  # an SSIM against the source images
    assert os.path.exists(tmp_path / "run" / "final" / "model_index.json")
    assert os.path.exists(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
