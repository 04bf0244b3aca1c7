"""SD3 and FLUX.1 adapters against the official diffusers pipelines, with tiny random components
built in memory (diffusers' ``get_dummy_components()`` style; tokenizers built offline)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

from flowalign.pipelines.flux import (FluxAdapter, calculate_mu, flux_sigmas, latent_image_ids, pack_latents,
                                      unpack_latents)
from flowalign.pipelines.sd3 import StableDiffusion3Adapter
from flowalign.rollout import BranchSpec, rollout, sample_ode
from tests.tiny_components import (LORA_IMAGE_GRPO, add_random_lora, assert_same_gradients, byte_level_alphabet,
                                   denoiser_gradients, grpo_overrides, write_bpe_files)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red apple on a table", "a small dog"]
RES = 16  # pixels; the tiny VAEs have scale factor 1


# -- tiny components ------------------------------------------------------------------------------
def clip_tokenizer(directory: str) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer (every byte a token, a few merges), written and read offline."""
    chars = byte_level_alphabet()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    vocab_file, merges_file = write_bpe_files(directory, vocab, ["a p", "ap p", "r e", "d o", "o g</w>"])
    tok = CLIPTokenizer(vocab_file, merges_file, model_max_length=77)
    assert len(tok) == len(vocab)  # transformers 5 can silently build an empty vocabulary
    return tok


def t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer from an in-memory vocabulary (letters and a few words)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581" + c, -2.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [("\u2581" + w, -1.0) for w in ("a", "red", "apple", "dog", "small", "on", "table", "cat")]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    assert len(tok) == len(pieces)
    return tok


def clip_config(vocab: int) -> CLIPTextConfig:
    return CLIPTextConfig(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_size=16,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab,
                          hidden_act="gelu", projection_dim=16, max_position_embeddings=77)


def t5_encoder(vocab: int, d_model: int = 32) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0))


def tiny_vae(latent_channels: int) -> AutoencoderKL:
    return AutoencoderKL(sample_size=RES, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def tiny_sd3_pipeline(tmp: str) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    tok = clip_tokenizer(os.path.join(tmp, "clip-tok"))
    t5_tok = t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=RES, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                                        pooled_projection_dim=32, out_channels=4)
    cfg = clip_config(len(tok))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(4),
        text_encoder=CLIPTextModelWithProjection(cfg), tokenizer=tok, text_encoder_2=CLIPTextModelWithProjection(cfg),
        tokenizer_2=tok, text_encoder_3=t5_encoder(len(t5_tok)), tokenizer_3=t5_tok)


def tiny_flux_pipeline(tmp: str, guidance_embeds: bool = True) -> FluxPipeline:
    torch.manual_seed(0)
    tok = clip_tokenizer(os.path.join(tmp, "clip-tok"))
    t5_tok = t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)
    # FLUX.1-dev's scheduler config (dynamic shifting); schnell uses a static shift of 1.
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096)
                 if guidance_embeds else FlowMatchEulerDiscreteScheduler(shift=1.0))
    return FluxPipeline(scheduler=scheduler, vae=tiny_vae(1), text_encoder=CLIPTextModel(clip_config(len(tok))),
                        tokenizer=tok, text_encoder_2=t5_encoder(len(t5_tok)), tokenizer_2=t5_tok, transformer=transformer)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("tiny-sd3"))
    tiny_sd3_pipeline(d + "-tok").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("tiny-flux"))
    tiny_flux_pipeline(d + "-tok").save_pretrained(d)
    return d


def _noise(adapter, n: int = 2, seed: int = 0) -> torch.Tensor:
    return adapter.init_latents(n, torch.Generator().manual_seed(seed))


# -- pure functions -------------------------------------------------------------------------------
def test_pack_unpack_and_ids_match_flux_pipeline():
    x = torch.randn(2, 3, 6, 4)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 3, 6, 4))
    assert torch.equal(unpack_latents(packed, 6, 4), x)
    assert torch.equal(unpack_latents(packed, 6, 4), FluxPipeline._unpack_latents(packed, 6, 4, vae_scale_factor=1))
    assert torch.equal(latent_image_ids(3, 2), FluxPipeline._prepare_latent_image_ids(1, 3, 2, "cpu", torch.float32))
    assert latent_image_ids(3, 2)[3].tolist() == [0.0, 1.0, 1.0]  # hand-worked: token 3 = row 1, col 1


def test_calculate_mu_hand_worked_and_flux_sigmas_match_scheduler():
    assert calculate_mu(256) == pytest.approx(0.5) and calculate_mu(4096) == pytest.approx(1.15)
    assert calculate_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)  # 512 px FLUX: 32x32 tokens
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    for steps, seq in [(4, 64), (28, 4096), (10, 1024)]:
        mu = calculate_mu(seq)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        torch.testing.assert_close(flux_sigmas(steps, mu), sched.sigmas, atol=1e-6, rtol=0)


# -- SD3 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 4.5])
@pytest.mark.parametrize("use_t5", [True, False])
def test_sd3_ode_rollout_reproduces_pipeline(tmp_path, guidance, use_t5):
    pipe = tiny_sd3_pipeline(str(tmp_path))
    adapter = StableDiffusion3Adapter(pipe, resolution=RES, use_t5=use_t5)
    x0 = _noise(adapter)
    cond = adapter.encode(PROMPTS, [""] * 2 if guidance > 1 else None)
    ours = sample_ode(adapter, cond, 4, latents=x0, guidance_scale=guidance)
    ref_pipe = pipe if use_t5 else StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    ref = ref_pipe(PROMPTS, height=RES, width=RES, num_inference_steps=4, guidance_scale=guidance, latents=x0.clone(),
                   output_type="latent").images
    assert ours.abs().max() > 0.1 and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    # rollout with zero noise is the same ODE
    tree = rollout(adapter, cond[[0]], BranchSpec.flat(4, 2, 0.0, guidance_scale=guidance), prompts=PROMPTS[:1],
                   generator=torch.Generator(), initial_latents=torch.stack([x0[0], x0[0]]), decode=False)
    torch.testing.assert_close(tree.leaf_latents[0], ref[0], atol=1e-4, rtol=0)


def test_sd3_decode_matches_pipeline_images(tmp_path):
    pipe = tiny_sd3_pipeline(str(tmp_path))
    adapter = StableDiffusion3Adapter(pipe, resolution=RES)
    x0 = _noise(adapter)
    images = adapter.decode(sample_ode(adapter, adapter.encode(PROMPTS), 3, latents=x0))
    ref = pipe(PROMPTS, height=RES, width=RES, num_inference_steps=3, guidance_scale=1.0, latents=x0.clone(),
               output_type="pt").images
    assert images.shape == (2, 3, RES, RES) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, ref, atol=1e-4, rtol=0)


def test_sd3_sigmas_are_the_schedulers_with_shift(tmp_path):
    adapter = StableDiffusion3Adapter(tiny_sd3_pipeline(str(tmp_path)), resolution=RES)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(10)
    assert torch.equal(adapter.sigmas(10), ref.sigmas) and adapter.sigmas(10)[-1] == 0
    # hand-worked: 3 steps = shift(linspace(1, t_min, 3)), t_min = shift(1/1000) the scheduler's smallest sigma
    shift = lambda t: 3 * t / (1 + 2 * t)  # noqa: E731
    t_min = shift(1e-3)
    expected = [1.0, shift((1 + t_min) / 2), shift(t_min), 0.0]
    assert adapter.sigmas(3).tolist() == pytest.approx(expected, abs=1e-6)


def test_sd3_loads_from_disk_and_matches_in_memory(sd3_dir, tmp_path):
    loaded = StableDiffusion3Adapter.from_pretrained(sd3_dir, resolution=RES, embedding_cache_dir=str(tmp_path / "cache"))
    ref_pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    x0 = _noise(loaded)
    ours = sample_ode(loaded, loaded.encode(PROMPTS), 3, latents=x0)
    ref = ref_pipe(PROMPTS, height=RES, width=RES, num_inference_steps=3, guidance_scale=1.0, latents=x0.clone(),
                   output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    cached = loaded.encode(PROMPTS)  # second call: read back from the embedding cache
    assert len(os.listdir(tmp_path / "cache")) == 2
    torch.testing.assert_close(cached.tensors["prompt_embeds"], loaded.encode(PROMPTS).tensors["prompt_embeds"])
    no_t5 = StableDiffusion3Adapter.from_pretrained(sd3_dir, resolution=RES, use_t5=False)
    assert no_t5.pipe.text_encoder_3 is None
    with pytest.raises(ValueError, match="resolutoin"):
        StableDiffusion3Adapter.from_pretrained(sd3_dir, resolutoin=RES)
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        StableDiffusion3Adapter.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="resolution=15"):
        StableDiffusion3Adapter.from_pretrained(sd3_dir, resolution=15)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_round_trips_into_official_pipeline(family, sd3_dir, flux_dir, tmp_path):
    base, adapter_cls, pipe_cls = {"sd3": (sd3_dir, StableDiffusion3Adapter, StableDiffusion3Pipeline),
                                   "flux": (flux_dir, FluxAdapter, FluxPipeline)}[family]
    adapter = adapter_cls.from_pretrained(base, resolution=RES)
    x0 = _noise(adapter)
    cond = adapter.encode(PROMPTS)
    before = sample_ode(adapter, cond, 2, latents=x0)
    add_random_lora(adapter)
    lora_out = sample_ode(adapter, cond, 2, latents=x0)
    assert (lora_out - before).abs().max() > 1e-3  # the LoRA changes the policy
    adapter.save_lora_weights(str(tmp_path / "lora"))
    official = pipe_cls.from_pretrained(base)
    official.load_lora_weights(str(tmp_path / "lora"))
    kwargs = {"guidance_scale": 1.0} if family == "sd3" else {"guidance_scale": 3.5}
    ref = official(PROMPTS, height=RES, width=RES, num_inference_steps=2, output_type="latent",
                   latents=x0.clone() if family == "sd3" else pack_latents(x0), **kwargs).images
    if family == "flux":
        ref = unpack_latents(ref, *adapter.latent_shape[1:])
    torch.testing.assert_close(lora_out, ref, atol=1e-4, rtol=0)
    with adapter.disable_adapter():  # the reference policy is the base model
        torch.testing.assert_close(sample_ode(adapter, cond, 2, latents=x0), before, atol=1e-5, rtol=0)
    # save_pretrained merges the LoRA: the reloaded plain model reproduces the LoRA policy
    adapter.save_pretrained(str(tmp_path / "merged"))
    merged = adapter_cls.from_pretrained(str(tmp_path / "merged"), resolution=RES)
    assert not merged.has_lora()
    torch.testing.assert_close(sample_ode(merged, merged.encode(PROMPTS), 2, latents=x0), lora_out, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_gradient_checkpointing_gives_same_gradients(family, tmp_path):
    make = {"sd3": lambda: StableDiffusion3Adapter(tiny_sd3_pipeline(str(tmp_path)), resolution=RES),
            "flux": lambda: FluxAdapter(tiny_flux_pipeline(str(tmp_path)), resolution=RES)}[family]
    grads = []
    for checkpointing in (False, True):
        adapter = make()
        grads.append(denoiser_gradients(adapter, _noise(adapter), torch.tensor([0.7, 0.3]), adapter.encode(PROMPTS),
                                        checkpointing))
    assert_same_gradients(*grads)


# -- FLUX -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dev", [True, False])
def test_flux_ode_rollout_reproduces_pipeline(tmp_path, dev):
    pipe = tiny_flux_pipeline(str(tmp_path), guidance_embeds=dev)
    adapter = FluxAdapter(pipe, resolution=RES, guidance=2.5 if dev else None)
    x0 = _noise(adapter)
    ours = sample_ode(adapter, adapter.encode(PROMPTS), 4, latents=x0)
    out = pipe(PROMPTS, height=RES, width=RES, num_inference_steps=4, guidance_scale=2.5, latents=pack_latents(x0),
               output_type="latent").images
    ref = unpack_latents(out, *adapter.latent_shape[1:])
    assert ours.abs().max() > 0.1 and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    torch.testing.assert_close(adapter.sigmas(4), pipe.scheduler.sigmas, atol=1e-6, rtol=0)
    images = adapter.decode(ours)
    ref_images = pipe(PROMPTS, height=RES, width=RES, num_inference_steps=4, guidance_scale=2.5,
                      latents=pack_latents(x0), output_type="pt").images
    torch.testing.assert_close(images, ref_images, atol=1e-4, rtol=0)


def test_flux_true_cfg_matches_pipeline(tmp_path):
    pipe = tiny_flux_pipeline(str(tmp_path))
    adapter = FluxAdapter(pipe, resolution=RES)
    x0 = _noise(adapter)
    ours = sample_ode(adapter, adapter.encode(PROMPTS, ["blurry", "blurry"]), 3, latents=x0, guidance_scale=2.0)
    out = pipe(PROMPTS, negative_prompt=["blurry"] * 2, true_cfg_scale=2.0, height=RES, width=RES, num_inference_steps=3,
               guidance_scale=3.5, latents=pack_latents(x0), output_type="latent").images
    torch.testing.assert_close(ours, unpack_latents(out, *adapter.latent_shape[1:]), atol=1e-4, rtol=0)


def test_flux_options_and_static_shift(flux_dir, tmp_path):
    adapter = FluxAdapter.from_pretrained(flux_dir, resolution=RES, shift=3.0)
    s = torch.linspace(1, 0, 5)
    torch.testing.assert_close(adapter.sigmas(4), 3 * s / (1 + 2 * s))  # DanceGRPO's sd3_time_shift
    assert adapter.latent_shape == (1, RES, RES) and adapter.guidance == 3.5
    with pytest.raises(ValueError, match="guidance=3.5"):
        FluxAdapter(tiny_flux_pipeline(str(tmp_path), guidance_embeds=False), resolution=RES, guidance=3.5)
    with pytest.raises(ValueError, match="resolution=17"):
        FluxAdapter.from_pretrained(flux_dir, resolution=17)
    with pytest.raises(ValueError, match="use_t5"):
        FluxAdapter.from_pretrained(flux_dir, use_t5=False)


# -- recipes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,family", [("sd35_jpeg.yaml", "sd3"), ("flux_jpeg.yaml", "flux")])
def test_grpo_config_runs_two_iterations(config, family, sd3_dir, flux_dir, prompt_files, tmp_path):
    """The shipped config with the _tiny override: real recipe, tiny saved components, CPU."""
    import flowalign

    train, evaluation = prompt_files
    options = {"resolution": RES, "max_sequence_length": 16, "embedding_cache_dir": str(tmp_path / "cache")}
    overrides = grpo_overrides({"sd3": sd3_dir, "flux": flux_dir}[family], str(tmp_path / "run"), train, evaluation,
                               LORA_IMAGE_GRPO, **{"model.options": options})
    summary = flowalign.train(os.path.join(REPO, "configs/grpo", config), overrides)
    assert summary["iterations"] == 2 and np.isfinite(summary["after"]["eval/reward"])
    assert os.path.exists(tmp_path / "run" / "final" / "model_index.json")
    assert os.path.exists(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
