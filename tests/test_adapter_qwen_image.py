"""Qwen-Image adapter against the official ``QwenImagePipeline``, with tiny random components built in memory
(tests/qwen_image_components.py: diffusers' ``get_dummy_components()`` with an offline tokenizer)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

from flowalign.pipelines.qwen_image import (QwenImageAdapter, encode_prompt_rows, from_vae_latents, img_shapes, pack_latents,
                                            pad_embeddings, pad_to, qwen_image_sigmas, renormalized_cfg, stretch_to_terminal,
                                            to_vae_latents, unpack_latents)
from flowalign.rollout import BranchSpec, rollout, sample_ode
from tests.tiny_components import (LORA_IMAGE_GRPO, add_random_lora, assert_same_gradients, denoiser_gradients,
                                   grpo_overrides)
from tests.qwen_image_components import LATENTS_MEAN, LATENTS_STD, qwen_image_scheduler, tiny_qwen_image_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prompts of different lengths (and negatives of other lengths) so that the text padding mask matters.
PROMPTS = ["a red apple on a table", "a small dog"]
NEGATIVES = ["blurry", " "]
RES = 32  # pixels; the tiny VAE has spatial factor 4 -> latents [4, 8, 8] -> 16 packed tokens
MAX_LEN = 256  # the byte-level tokenizer gives ~100 template tokens + the prompt: no truncation


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> QwenImagePipeline:
    return tiny_qwen_image_pipeline(str(tmp_path_factory.mktemp("qwen-tok")))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, pipe) -> str:
    d = str(tmp_path_factory.mktemp("tiny-qwen-image"))
    pipe.save_pretrained(d)
    return d


def adapter_for(pipe: QwenImagePipeline, **kw) -> QwenImageAdapter:
    return QwenImageAdapter(pipe, resolution=RES, max_sequence_length=MAX_LEN, **kw)


def call_pipe(pipe: QwenImagePipeline, x0: torch.Tensor, steps: int, output_type: str = "latent", **kw):
    return pipe(PROMPTS, height=RES, width=RES, num_inference_steps=steps, latents=pack_latents(x0), output_type=output_type,
                max_sequence_length=MAX_LEN, **kw).images


def _noise(adapter, n: int = 2, seed: int = 0) -> torch.Tensor:
    return adapter.init_latents(n, torch.Generator().manual_seed(seed))


# -- pure functions -------------------------------------------------------------------------------
def test_packing_and_rope_layout_match_pipeline():
    x = torch.randn(2, 3, 6, 4)
    packed = pack_latents(x)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(x, 2, 3, 6, 4))
    # the pipeline unpacks to the VAE's [B, C, 1, h, w] (vae_scale_factor 1: pixel size = latent size)
    assert torch.equal(unpack_latents(packed, 6, 4), QwenImagePipeline._unpack_latents(packed, 6, 4, 1)[:, :, 0])
    assert img_shapes(2, 3, 2) == [[(1, 3, 2)], [(1, 3, 2)]]


def test_sigmas_match_scheduler_and_hand_worked_terminal_stretch():
    # hand-worked: [1, 0.5] -> 1 - sigma = [0, 0.5]; scale 0.5 / 0.9; stretched = [1, 1 - 0.9] = [1, 0.1]
    torch.testing.assert_close(stretch_to_terminal(torch.tensor([1.0, 0.5]), 0.1), torch.tensor([1.0, 0.1]))
    released = qwen_image_scheduler()
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for sched in (released, static):
        for steps, mu in [(4, 0.49), (10, 0.52), (50, 0.9)]:
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            ours = qwen_image_sigmas(sched.config, steps, mu)
            torch.testing.assert_close(ours, sched.sigmas, atol=1e-6, rtol=0)
    assert qwen_image_sigmas(released.config, 10, 0.6)[-2].item() == pytest.approx(0.02)  # shift_terminal
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        qwen_image_sigmas({**released.config, "use_karras_sigmas": True}, 4, 0.5)


def test_renormalized_cfg_hand_worked_and_padding():
    # v_uncond 0, v_cond (3, 4), s = 2: guided (6, 8) rescaled to |v_cond| = 5 -> (3, 4)
    v = renormalized_cfg(torch.tensor([[[3.0, 4.0]]]), torch.zeros(1, 1, 2), 2.0)
    torch.testing.assert_close(v, torch.tensor([[[3.0, 4.0]]]))
    # v_uncond (1, 0), v_cond (0, 1), s = 2: guided (-1, 2), |.| = sqrt 5, rescaled to norm 1
    v = renormalized_cfg(torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]]), 2.0)
    torch.testing.assert_close(v, torch.tensor([[[-1.0, 2.0]]]) / 5 ** 0.5)
    embeds, mask = pad_embeddings([torch.ones(3, 2), 2 * torch.ones(1, 2)])
    assert embeds.shape == (2, 3, 2) and mask.tolist() == [[True] * 3, [True, False, False]]
    assert embeds[1, 1:].abs().sum() == 0 and embeds[1, 0].tolist() == [2.0, 2.0]
    z = to_vae_latents(torch.zeros(1, 4, 2, 2), LATENTS_MEAN, LATENTS_STD)
    assert z.shape == (1, 4, 1, 2, 2) and z[0, :, 0, 0, 0].tolist() == pytest.approx(LATENTS_MEAN)
    z = to_vae_latents(torch.ones(1, 4, 2, 2), LATENTS_MEAN, LATENTS_STD)
    assert z[0, :, 0, 1, 1].tolist() == pytest.approx([m + s for m, s in zip(LATENTS_MEAN, LATENTS_STD)])
    x = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(from_vae_latents(to_vae_latents(x, LATENTS_MEAN, LATENTS_STD), LATENTS_MEAN, LATENTS_STD), x)
    padded = pad_to({"prompt_embeds": embeds, "prompt_mask": mask, "image_latents": x}, 5)
    assert padded["prompt_embeds"].shape == (2, 5, 2) and padded["prompt_mask"][:, 3:].sum() == 0
    assert padded["image_latents"] is x  # other entries pass through
    assert torch.equal(padded["prompt_embeds"][:, :3], embeds) and torch.equal(padded["prompt_mask"][:, :3], mask)


def test_prompt_rows_are_the_pipelines_masked_encodings(pipe):
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=MAX_LEN)
    rows = encode_prompt_rows(pipe, PROMPTS, torch.device("cpu"), MAX_LEN)
    lengths = [r.shape[0] for r in rows]
    assert mask is not None and lengths[0] > lengths[1] and mask.sum(1).tolist() == lengths  # padding is exercised
    single = encode_prompt_rows(pipe, PROMPTS[1:], torch.device("cpu"), MAX_LEN)[0]  # alone: no padding at all
    torch.testing.assert_close(single, embeds[1, : lengths[1]], atol=1e-5, rtol=0)


# -- fidelity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_ode_rollout_reproduces_pipeline(pipe, cfg):
    adapter = adapter_for(pipe)
    x0 = _noise(adapter)
    cond = adapter.encode(PROMPTS, NEGATIVES if cfg > 1 else None)
    ours = sample_ode(adapter, cond, 4, latents=x0, guidance_scale=cfg)
    extra = {"negative_prompt": NEGATIVES, "true_cfg_scale": cfg} if cfg > 1 else {"true_cfg_scale": 1.0}
    ref = unpack_latents(call_pipe(pipe, x0, 4, **extra), *adapter.latent_shape[1:])
    assert ours.abs().max() > 0.1 and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    torch.testing.assert_close(adapter.sigmas(4), pipe.scheduler.sigmas, atol=1e-6, rtol=0)
    # a rollout with zero SDE noise is the same ODE
    tree = rollout(adapter, cond[[1]], BranchSpec.flat(4, 2, 0.0, guidance_scale=cfg), prompts=PROMPTS[1:],
                   generator=torch.Generator(), initial_latents=torch.stack([x0[1], x0[1]]), decode=False)
    torch.testing.assert_close(tree.leaf_latents[0], ref[1], atol=1e-4, rtol=0)
    if cfg > 1:  # decoded images equal the pipeline's output_type="pt"
        images = adapter.decode(ours)
        ref_images = call_pipe(pipe, x0, 4, output_type="pt", **extra)
        assert images.shape == (2, 3, RES, RES) and 0 <= images.min() and images.max() <= 1
        torch.testing.assert_close(images, ref_images, atol=1e-4, rtol=0)


def test_loads_from_disk_caches_embeddings_and_checks_options(qwen_dir, pipe, tmp_path):
    loaded = QwenImageAdapter.from_pretrained(qwen_dir, resolution=RES, max_sequence_length=MAX_LEN,
                                              embedding_cache_dir=str(tmp_path / "cache"))
    x0 = _noise(loaded)
    ours = sample_ode(loaded, loaded.encode(PROMPTS), 2, latents=x0)
    ref = unpack_latents(call_pipe(pipe, x0, 2, true_cfg_scale=1.0), *loaded.latent_shape[1:])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert len(os.listdir(tmp_path / "cache")) == 2  # one unpadded entry per prompt
    cached = loaded.encode(PROMPTS[::-1])  # read back from the cache, re-padded in the new order
    fresh = adapter_for(pipe).encode(PROMPTS[::-1])
    assert torch.equal(cached.tensors["prompt_mask"], fresh.tensors["prompt_mask"])
    torch.testing.assert_close(cached.tensors["prompt_embeds"], fresh.tensors["prompt_embeds"], atol=1e-6, rtol=0)
    assert loaded.latent_shape == (4, 8, 8)
    static = QwenImageAdapter.from_pretrained(qwen_dir, resolution=RES, shift=3.0)
    s = torch.linspace(1, 0, 5)
    torch.testing.assert_close(static.sigmas(4), 3 * s / (1 + 2 * s))
    with pytest.raises(ValueError, match="guidance"):
        QwenImageAdapter.from_pretrained(qwen_dir, guidance=3.5)
    with pytest.raises(ValueError, match="resolution=20"):
        QwenImageAdapter.from_pretrained(qwen_dir, resolution=20)
    with pytest.raises(ValueError, match="max_sequence_length=2000"):
        QwenImageAdapter.from_pretrained(qwen_dir, max_sequence_length=2000)
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        QwenImageAdapter.from_pretrained(str(tmp_path / "missing"))


def test_lora_round_trips_into_official_pipeline(qwen_dir, tmp_path):
    adapter = QwenImageAdapter.from_pretrained(qwen_dir, resolution=RES, max_sequence_length=MAX_LEN)
    x0 = _noise(adapter)
    cond = adapter.encode(PROMPTS)
    before = sample_ode(adapter, cond, 2, latents=x0)
    add_random_lora(adapter)
    lora_out = sample_ode(adapter, cond, 2, latents=x0)
    assert (lora_out - before).abs().max() > 1e-3  # the LoRA changes the policy
    adapter.save_lora_weights(str(tmp_path / "lora"))
    official = QwenImagePipeline.from_pretrained(qwen_dir)
    official.load_lora_weights(str(tmp_path / "lora"))
    ref = unpack_latents(call_pipe(official, x0, 2, true_cfg_scale=1.0), *adapter.latent_shape[1:])
    torch.testing.assert_close(lora_out, ref, atol=1e-4, rtol=0)
    with adapter.disable_adapter():  # the reference policy is the base model
        torch.testing.assert_close(sample_ode(adapter, cond, 2, latents=x0), before, atol=1e-5, rtol=0)
    # save_pretrained merges the LoRA: the reloaded plain model reproduces the LoRA policy
    adapter.save_pretrained(str(tmp_path / "merged"))
    merged = QwenImageAdapter.from_pretrained(str(tmp_path / "merged"), resolution=RES, max_sequence_length=MAX_LEN)
    assert not merged.has_lora()
    torch.testing.assert_close(sample_ode(merged, merged.encode(PROMPTS), 2, latents=x0), lora_out, atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_same_gradients(qwen_dir):
    grads = []
    for checkpointing in (False, True):
        adapter = QwenImageAdapter.from_pretrained(qwen_dir, resolution=RES, max_sequence_length=MAX_LEN)
        cond = adapter.encode(PROMPTS, NEGATIVES)
        grads.append(denoiser_gradients(adapter, _noise(adapter), torch.tensor([0.7, 0.3]), cond, checkpointing,
                                        guidance_scale=3.0))
    assert_same_gradients(*grads)


# -- recipe ---------------------------------------------------------------------------------------
def test_grpo_config_runs_two_iterations(qwen_dir, prompt_files, tmp_path):
    """The shipped config with tiny overrides: real recipe, tiny saved components, CPU; the PickScore reward
    (a 1B CLIP) is swapped for JPEG compressibility."""
    import flowalign

    train, evaluation = prompt_files
    options = {"resolution": RES, "max_sequence_length": MAX_LEN, "embedding_cache_dir": str(tmp_path / "cache")}
    overrides = grpo_overrides(qwen_dir, str(tmp_path / "run"), train, evaluation, LORA_IMAGE_GRPO,
                               rewards=[{"_component_": "jpeg_compressibility", "weight": 1.0}],
                               **{"model.options": options, "sampling.sde_window": [0, 2]})
    summary = flowalign.train(os.path.join(REPO, "configs/grpo/qwen_image_pickscore.yaml"), overrides)
    assert summary["iterations"] == 2 and np.isfinite(summary["after"]["eval/reward"])
    assert os.path.exists(tmp_path / "run" / "final" / "model_index.json")
    assert os.path.exists(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
