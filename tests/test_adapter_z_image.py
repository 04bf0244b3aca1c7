"""Z-Image adapter against the official diffusers ``ZImagePipeline``, with tiny random components built in memory
(diffusers' ``tests/pipelines/z_image`` ``get_dummy_components()`` sizes; the Qwen tokenizer built offline)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Model

from flowalign.pipelines.z_image import ZImageAdapter, guidance_scale_from_pipeline, model_timestep, unpad
from flowalign.rollout import BranchSpec, rollout, sample_ode
from tests.tiny_components import (LORA_IMAGE_GRPO, add_random_lora, assert_same_gradients, denoiser_gradients,
                                   grpo_overrides, qwen3_config, qwen3_tokenizer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red apple on a table", "a small dog"]
RES = 16  # pixels; the tiny VAE has scale factor 1 -> latents [4, 16, 16] -> 64 tokens of 2x2 patches
MAX_LEN = 48


def tiny_z_image_pipeline(tmp: str, dynamic: bool = False) -> ZImagePipeline:
    torch.manual_seed(0)
    tok = qwen3_tokenizer(os.path.join(tmp, "qwen-tok"))
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                           n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                                           cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
                                           axes_lens=[256, 32, 32])
    with torch.no_grad():  # created with torch.empty (diffusers' test fixes them the same way)
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    vae = AutoencoderKL(sample_size=RES, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611, shift_factor=0.1159)
    # Z-Image-Turbo's scheduler: a static shift of 3; the dynamic variant exercises the pipeline's mu.
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True) if dynamic
                 else FlowMatchEulerDiscreteScheduler(shift=3.0))
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=Qwen3Model(qwen3_config(len(tok))), tokenizer=tok,
                          transformer=transformer)


def adapter_for(pipe: ZImagePipeline, **kw) -> ZImageAdapter:
    return ZImageAdapter(pipe, resolution=RES, max_sequence_length=MAX_LEN, **kw)


def call_pipe(pipe, x0: torch.Tensor, steps: int, output_type: str = "latent", **kw) -> torch.Tensor:
    return pipe(prompt=list(PROMPTS), height=RES, width=RES, num_inference_steps=steps, latents=x0.clone(),
                output_type=output_type, max_sequence_length=MAX_LEN, **kw).images


@pytest.fixture(scope="module")
def z_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("tiny-z-image"))
    tiny_z_image_pipeline(d + "-tok").save_pretrained(d)
    return d


def _noise(adapter, n: int = 2, seed: int = 0) -> torch.Tensor:
    return adapter.init_latents(n, torch.Generator().manual_seed(seed))


# -- pure functions -------------------------------------------------------------------------------
def test_conversions_hand_worked():
    torch.testing.assert_close(model_timestep(torch.tensor([1.0, 0.25, 0.0])), torch.tensor([0.0, 0.75, 1.0]))
    embeds, mask = torch.arange(12.0).view(2, 3, 2), torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    rows = unpad(embeds, mask)
    assert [r.tolist() for r in rows] == [[[0.0, 1.0], [2.0, 3.0]], [[6.0, 7.0]]]
    assert guidance_scale_from_pipeline(4.0) == 5.0
    # pos + s (pos - neg) == neg + (1 + s)(pos - neg)
    pos, neg, s = torch.randn(5), torch.randn(5), 3.0
    torch.testing.assert_close(neg + guidance_scale_from_pipeline(s) * (pos - neg), pos + s * (pos - neg))


@pytest.mark.parametrize("dynamic", [False, True])
def test_sigmas_match_scheduler(tmp_path, dynamic):
    pipe = tiny_z_image_pipeline(str(tmp_path), dynamic=dynamic)
    adapter = adapter_for(pipe)
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    for steps in (3, 8, 50):
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(64))
        torch.testing.assert_close(adapter.sigmas(steps), pipe.scheduler.sigmas, atol=1e-6, rtol=0)
    s = torch.linspace(1, 0, 5)
    torch.testing.assert_close(adapter_for(pipe, shift=2.0).sigmas(4), 2 * s / (1 + s))


# -- rollout fidelity -----------------------------------------------------------------------------
@pytest.mark.parametrize("pipeline_scale", [0.0, 3.0])
def test_ode_rollout_reproduces_pipeline(tmp_path, pipeline_scale):
    pipe = tiny_z_image_pipeline(str(tmp_path))
    adapter = adapter_for(pipe)
    x0 = _noise(adapter)
    scale = guidance_scale_from_pipeline(pipeline_scale)
    cond = adapter.encode(PROMPTS, ["blurry", ""] if pipeline_scale > 0 else None)
    ours = sample_ode(adapter, cond, 4, latents=x0, guidance_scale=scale)
    neg = {"negative_prompt": ["blurry", ""]} if pipeline_scale > 0 else {}
    ref = call_pipe(pipe, x0, 4, guidance_scale=pipeline_scale, **neg)
    assert ours.abs().max() > 0.1 and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    tree = rollout(adapter, cond[[1]], BranchSpec.flat(4, 2, 0.0, guidance_scale=scale), prompts=PROMPTS[1:],
                   generator=torch.Generator(), initial_latents=torch.stack([x0[1], x0[1]]), decode=False)
    torch.testing.assert_close(tree.leaf_latents[0], ref[1], atol=1e-4, rtol=0)  # zero-noise rollout = the same ODE
    if pipeline_scale == 0.0:
        images = adapter.decode(ours)
        assert images.shape == (2, 3, RES, RES) and 0 <= images.min() and images.max() <= 1
        torch.testing.assert_close(images, call_pipe(pipe, x0, 4, output_type="pt", guidance_scale=0.0), atol=1e-4, rtol=0)


def test_loads_from_disk_with_embedding_cache_and_options(z_dir, tmp_path):
    loaded = ZImageAdapter.from_pretrained(z_dir, resolution=RES, max_sequence_length=MAX_LEN,
                                           embedding_cache_dir=str(tmp_path / "cache"))
    ref_pipe = ZImagePipeline.from_pretrained(z_dir)
    x0 = _noise(loaded)
    ours = sample_ode(loaded, loaded.encode(PROMPTS), 3, latents=x0)
    torch.testing.assert_close(ours, call_pipe(ref_pipe, x0, 3, guidance_scale=0.0), atol=1e-4, rtol=0)
    assert len(os.listdir(tmp_path / "cache")) == 2
    cached = loaded.encode(PROMPTS).tensors  # read back from the cache: the pipeline's un-padded rows again
    ref_rows, _ = ref_pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=MAX_LEN)
    for row, ref in zip(unpad(cached["prompt_embeds"], cached["prompt_mask"]), ref_rows):
        torch.testing.assert_close(row, ref)
    assert loaded.latent_shape == (4, RES, RES)
    with pytest.raises(ValueError, match="guidance"):
        ZImageAdapter.from_pretrained(z_dir, guidance=3.5)
    with pytest.raises(ValueError, match="resolution=15"):
        ZImageAdapter.from_pretrained(z_dir, resolution=15)
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        ZImageAdapter.from_pretrained(str(tmp_path / "missing"))


def test_lora_round_trips_into_official_pipeline(z_dir, tmp_path):
    adapter = ZImageAdapter.from_pretrained(z_dir, resolution=RES, max_sequence_length=MAX_LEN)
    x0 = _noise(adapter)
    cond = adapter.encode(PROMPTS)
    before = sample_ode(adapter, cond, 2, latents=x0)
    add_random_lora(adapter)
    lora_out = sample_ode(adapter, cond, 2, latents=x0)
    assert (lora_out - before).abs().max() > 1e-3  # the LoRA changes the policy
    adapter.save_lora_weights(str(tmp_path / "lora"))
    official = ZImagePipeline.from_pretrained(z_dir)
    official.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(lora_out, call_pipe(official, x0, 2, guidance_scale=0.0), atol=1e-4, rtol=0)
    with adapter.disable_adapter():
        torch.testing.assert_close(sample_ode(adapter, cond, 2, latents=x0), before, atol=1e-5, rtol=0)
    adapter.save_pretrained(str(tmp_path / "merged"))
    merged = ZImageAdapter.from_pretrained(str(tmp_path / "merged"), resolution=RES, max_sequence_length=MAX_LEN)
    assert not merged.has_lora()
    torch.testing.assert_close(sample_ode(merged, merged.encode(PROMPTS), 2, latents=x0), lora_out, atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_same_gradients(tmp_path):
    grads = []
    for checkpointing in (False, True):
        adapter = adapter_for(tiny_z_image_pipeline(str(tmp_path)))
        grads.append(denoiser_gradients(adapter, _noise(adapter), torch.tensor([0.7, 0.3]), adapter.encode(PROMPTS),
                                        checkpointing))
    assert_same_gradients(*grads)


def test_grpo_config_runs_two_iterations(z_dir, prompt_files, tmp_path):
    """The shipped config with overrides: real recipe, tiny saved components, CPU."""
    import flowalign

    train, evaluation = prompt_files
    options = {"resolution": RES, "max_sequence_length": 32, "embedding_cache_dir": str(tmp_path / "cache")}
    # PickScore needs its hub weights: the reward is swapped for JPEG compressibility (offline, CPU)
    overrides = grpo_overrides(z_dir, str(tmp_path / "run"), train, evaluation, LORA_IMAGE_GRPO,
                               rewards=[{"_component_": "jpeg_compressibility", "weight": 1.0}],
                               **{"model.options": options, "sampling.sde_window": [1, 3]})
    summary = flowalign.train(os.path.join(REPO, "configs/grpo", "z_image_turbo_pickscore.yaml"), overrides)
    assert summary["iterations"] == 2 and np.isfinite(summary["after"]["eval/reward"])
    assert os.path.exists(tmp_path / "run" / "final" / "model_index.json")
    assert os.path.exists(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
