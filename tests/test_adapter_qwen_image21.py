"""Qwen-Image 2.1 adapter against the official ``QwenImage21Pipeline``, with tiny random components built in memory
(tests/qwen_image_components.py: a tiny Qwen3-VL, an offline image-only Qwen3-VL processor, a 2-block single-stream
transformer and a 16x VAE with 8 latent channels; sizes are ours, diffusers has no dummy components for 2.1)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline, QwenImage21Transformer2DModel

from flowalign.pipelines.qwen_image import qwen_image_sigmas
from flowalign.pipelines.qwen_image21 import (QwenImage21Adapter, encode_prompt_rows21, guided, length_groups,
                                              pack_latents21, target_img_mask, unpack_latents21)
from flowalign.rollout import BranchSpec, rollout, sample_ode
from tests.qwen_image_components import qwen3_vl_processor_loader, qwen_image_scheduler, tiny_qwen_image21_pipeline
from tests.tiny_components import (LORA_IMAGE_GRPO, add_random_lora, assert_same_gradients, denoiser_gradients,
                                   grpo_overrides)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prompts of different lengths (and negatives of other lengths): padding and per-length grouping are exercised.
PROMPTS = ["a red apple on a table", "a small dog"]
NEGATIVES = ["blurry", " "]
RES = 64  # pixels; VAE factor 16 -> latents [8, 4, 4] -> 16 tokens, 4 image slots


@pytest.fixture(scope="module", autouse=True)
def processor_loader():
    """Saved tiny pipelines reload their processor without torchvision (tests/qwen_image_components.py)."""
    with qwen3_vl_processor_loader():
        yield


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> QwenImage21Pipeline:
    return tiny_qwen_image21_pipeline(str(tmp_path_factory.mktemp("qwen21-tok")))


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, pipe) -> str:
    d = str(tmp_path_factory.mktemp("tiny-qwen-image21"))
    pipe.save_pretrained(d)
    return d


def adapter_for(pipe: QwenImage21Pipeline, **kw) -> QwenImage21Adapter:
    return QwenImage21Adapter(pipe, resolution=RES, **kw)


def call_pipe_each(pipe: QwenImage21Pipeline, x0: torch.Tensor, steps: int, output_type: str = "latent",
                   negatives: list[str] | None = None, **kw) -> torch.Tensor:
    """The pipeline called once per prompt (batch 1, no text padding: the adapter's semantics), stacked."""
    outs = []
    for i, prompt in enumerate(PROMPTS):
        extra = {"negative_prompt": negatives[i]} if negatives else {}
        outs.append(pipe(prompt, height=RES, width=RES, num_inference_steps=steps, latents=pack_latents21(x0[i:i + 1]),
                         output_type=output_type, **extra, **kw).images)
    return torch.cat(outs)


def _noise(adapter, n: int = 2, seed: int = 0) -> torch.Tensor:
    return adapter.init_latents(n, torch.Generator().manual_seed(seed))


# -- pure functions -------------------------------------------------------------------------------
def test_packing_slots_and_grouping_match_pipeline():
    x = torch.randn(2, 3, 6, 4)
    packed = pack_latents21(x)
    assert torch.equal(packed, QwenImage21Pipeline._pack_latents(x, 2, 3, 6, 4))
    # the pipeline unpacks to the VAE's [B, C, 1, h, w] (height, width in pixels: 16 x the latent grid)
    assert torch.equal(unpack_latents21(packed, 6, 4), QwenImage21Pipeline._unpack_latents(packed, 96, 64, 16)[:, :, 0])
    mask = target_img_mask(2, 3, 4, 4)  # 3 text slots + 16 / 4 image slots
    assert mask.tolist() == [[False] * 3 + [True] * 4] * 2
    with pytest.raises(ValueError, match="2x2"):
        target_img_mask(1, 3, 3, 3)
    # the transformer's own metadata reads our mask as 16 target tokens after 3 text tokens
    expanded = torch.repeat_interleave(mask[0], torch.where(mask[0], 4, 1))
    image_ids, target = QwenImage21Transformer2DModel.build_token_metadata(expanded, [(1, 4, 4)])
    assert image_ids.tolist() == [-1] * 3 + [0] * 16 and target.sum() == 16
    groups = length_groups(torch.tensor([5, 3, 5, 2]))
    assert [(n, idx.tolist()) for n, idx in groups] == [(2, [3]), (3, [1]), (5, [0, 2])]
    # CFG hand-worked: uncond 1, cond 3, s = 2 -> 1 + 2 (3 - 1) = 5
    assert guided(torch.tensor(3.0), torch.tensor(1.0), 2.0).item() == 5.0


def test_sigmas_match_scheduler():
    released, static = qwen_image_scheduler(), FlowMatchEulerDiscreteScheduler(shift=3.0)
    for sched in (released, static):
        for steps, mu in [(4, 0.49), (10, 0.6)]:
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            torch.testing.assert_close(qwen_image_sigmas(sched.config, steps, mu), sched.sigmas, atol=1e-6, rtol=0)


def test_prompt_rows_are_padding_free_and_match_batched_encoding(pipe):
    embeds, mask, image_pad = pipe.encode_prompt(PROMPTS, device="cpu")
    rows = encode_prompt_rows21(pipe, PROMPTS, torch.device("cpu"))
    lengths = [r.shape[0] for r in rows]
    assert mask is not None and lengths[0] > lengths[1] and mask.sum(1).tolist() == lengths  # padding is exercised
    assert not image_pad.any()  # text-to-image: no image slots in the prompt
    # the processor left-pads the short prompt; alone it has no padding: Qwen3-VL's encoding is the same
    single = encode_prompt_rows21(pipe, PROMPTS[1:], torch.device("cpu"))[0]
    torch.testing.assert_close(single, embeds[1, : lengths[1]], atol=1e-5, rtol=0)


# -- fidelity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_ode_rollout_reproduces_pipeline(pipe, cfg):
    adapter = adapter_for(pipe)
    x0 = _noise(adapter)
    cond = adapter.encode(PROMPTS, NEGATIVES if cfg > 1 else None)
    ours = sample_ode(adapter, cond, 4, latents=x0, guidance_scale=cfg)
    negatives = NEGATIVES if cfg > 1 else None
    ref = unpack_latents21(call_pipe_each(pipe, x0, 4, negatives=negatives, true_cfg_scale=cfg), *adapter.latent_shape[1:])
    assert ours.abs().max() > 0.1 and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    torch.testing.assert_close(adapter.sigmas(4), pipe.scheduler.sigmas, atol=1e-6, rtol=0)
    # the pipeline without its KV cache gives the same latents
    no_cache = unpack_latents21(call_pipe_each(pipe, x0, 4, negatives=negatives, true_cfg_scale=cfg, use_kv_cache=False),
                                *adapter.latent_shape[1:])
    torch.testing.assert_close(no_cache, ref, atol=1e-4, rtol=0)
    # a rollout with zero SDE noise is the same ODE, and a row's result does not depend on its batch-mates
    tree = rollout(adapter, cond[[1]], BranchSpec.flat(4, 2, 0.0, guidance_scale=cfg), prompts=PROMPTS[1:],
                   generator=torch.Generator(), initial_latents=torch.stack([x0[1], x0[1]]), decode=False)
    torch.testing.assert_close(tree.leaf_latents[0], ref[1], atol=1e-4, rtol=0)
    if cfg > 1:  # decoded images equal the pipeline's output_type="pt" (RGB of its RGBA)
        images = adapter.decode(ours)
        ref_images = call_pipe_each(pipe, x0, 4, output_type="pt", negatives=negatives, true_cfg_scale=cfg)
        assert ref_images.shape == (2, 4, RES, RES) and images.shape == (2, 3, RES, RES)
        assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
        torch.testing.assert_close(images, ref_images[:, :3], atol=1e-4, rtol=0)


def test_padded_pipeline_batch_moves_image_positions(pipe):
    """Why the adapter never pads: the pipeline's own padded 2-prompt batch differs from the short prompt alone
    (the image block's RoPE frame position is the padded text length)."""
    adapter = adapter_for(pipe)
    x0 = _noise(adapter)
    batched = pipe(PROMPTS, height=RES, width=RES, num_inference_steps=2, latents=pack_latents21(x0),
                   output_type="latent").images
    alone = call_pipe_each(pipe, x0, 2)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-4, rtol=0)  # the longest prompt has no padding
    assert (batched[1] - alone[1]).abs().max() > 1e-3


def test_loads_from_disk_caches_embeddings_and_checks_options(saved_dir, pipe, tmp_path):
    loaded = QwenImage21Adapter.from_pretrained(saved_dir, resolution=RES, embedding_cache_dir=str(tmp_path / "cache"))
    x0 = _noise(loaded)
    ours = sample_ode(loaded, loaded.encode(PROMPTS), 2, latents=x0)
    torch.testing.assert_close(ours, unpack_latents21(call_pipe_each(pipe, x0, 2), 4, 4), atol=1e-4, rtol=0)
    assert len(os.listdir(tmp_path / "cache")) == 2  # one unpadded entry per prompt
    cached = loaded.encode(PROMPTS[::-1])
    fresh = adapter_for(pipe).encode(PROMPTS[::-1])
    assert torch.equal(cached.tensors["prompt_mask"], fresh.tensors["prompt_mask"])
    torch.testing.assert_close(cached.tensors["prompt_embeds"], fresh.tensors["prompt_embeds"], atol=1e-6, rtol=0)
    assert loaded.latent_shape == (8, 4, 4)
    static = QwenImage21Adapter.from_pretrained(saved_dir, resolution=RES, shift=3.0)
    s = torch.linspace(1, 0, 5)
    torch.testing.assert_close(static.sigmas(4), 3 * s / (1 + 2 * s))
    with pytest.raises(ValueError, match="max_sequence_length"):
        QwenImage21Adapter.from_pretrained(saved_dir, max_sequence_length=512)
    with pytest.raises(ValueError, match="resolution=48"):
        QwenImage21Adapter.from_pretrained(saved_dir, resolution=48)
    with pytest.raises(ValueError, match="sample_sigmas"):
        QwenImage21Adapter(QwenImage21Pipeline(**pipe.components, sample_sigmas=[1.0, 0.5]), resolution=RES)


def test_lora_round_trips_into_official_pipeline(saved_dir, tmp_path):
    adapter = QwenImage21Adapter.from_pretrained(saved_dir, resolution=RES)
    x0 = _noise(adapter)
    cond = adapter.encode(PROMPTS)
    before = sample_ode(adapter, cond, 2, latents=x0)
    add_random_lora(adapter)
    lora_out = sample_ode(adapter, cond, 2, latents=x0)
    assert (lora_out - before).abs().max() > 1e-3  # the LoRA changes the policy
    adapter.save_lora_weights(str(tmp_path / "lora"))
    official = QwenImage21Pipeline.from_pretrained(saved_dir)
    official.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(lora_out, unpack_latents21(call_pipe_each(official, x0, 2), 4, 4), atol=1e-4, rtol=0)
    with adapter.disable_adapter():  # the reference policy is the base model
        torch.testing.assert_close(sample_ode(adapter, cond, 2, latents=x0), before, atol=1e-5, rtol=0)
    adapter.save_pretrained(str(tmp_path / "merged"))  # LoRA merged: the reloaded plain model is the LoRA policy
    merged = QwenImage21Adapter.from_pretrained(str(tmp_path / "merged"), resolution=RES)
    assert not merged.has_lora()
    torch.testing.assert_close(sample_ode(merged, merged.encode(PROMPTS), 2, latents=x0), lora_out, atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_same_gradients(saved_dir):
    grads = []
    for checkpointing in (False, True):
        adapter = QwenImage21Adapter.from_pretrained(saved_dir, resolution=RES)
        cond = adapter.encode(PROMPTS, NEGATIVES)
        grads.append(denoiser_gradients(adapter, _noise(adapter), torch.tensor([0.7, 0.3]), cond, checkpointing,
                                        guidance_scale=3.0))
    assert_same_gradients(*grads)


# -- recipe ---------------------------------------------------------------------------------------
def test_grpo_config_runs_two_iterations(saved_dir, prompt_files, tmp_path):
    """The shipped config with tiny overrides: real recipe, tiny saved components, CPU; the PickScore reward
    (a 1B CLIP) is swapped for JPEG compressibility."""
    import flowalign

    train, evaluation = prompt_files
    options = {"resolution": RES, "embedding_cache_dir": str(tmp_path / "cache")}
    overrides = grpo_overrides(saved_dir, str(tmp_path / "run"), train, evaluation, LORA_IMAGE_GRPO,
                               rewards=[{"_component_": "jpeg_compressibility", "weight": 1.0}],
                               **{"model.options": options, "sampling.sde_window": [0, 2]})
    summary = flowalign.train(os.path.join(REPO, "configs/grpo/qwen_image21_pickscore.yaml"), overrides)
    assert summary["iterations"] == 2 and np.isfinite(summary["after"]["eval/reward"])
    assert os.path.exists(tmp_path / "run" / "final" / "model_index.json")
    assert os.path.exists(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
