"""WanAdapter: fidelity to diffusers' WanPipeline (Wan 2.1 and the Wan 2.2 two-expert layout),
loading through from_pretrained, LoRA interop with WanPipeline.load_lora_weights, and the
configs/grpo/wan_jpeg.yaml recipe on tiny components (all CPU, offline, random weights)."""

from __future__ import annotations

import os

import pytest
import torch

from flowalign.pipelines.base import shift_sigmas
from flowalign.rollout import BranchSpec, rollout, sample_ode
from tests.conftest import REPO
from tests.tiny_components import VIDEO_GRPO, add_random_lora, assert_same_gradients, denoiser_gradients, grpo_overrides

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel  # noqa: E402
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel  # noqa: E402

from flowalign.pipelines.wan import WanAdapter, flow_euler_sigmas, video_latent_shape, zero_padding  # noqa: E402

WORDS = "a an the red blue green cat dog bird car boat runs flies over through field city ocean forest at night sunset".split()
SIZE = dict(height=16, width=16, num_frames=5, max_sequence_length=12)


def tiny_tokenizer() -> T5Tokenizer:
    """A T5 (unigram) tokenizer from an in-memory vocabulary: whole words plus single letters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(WORDS)] + [(c, -30.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    assert len(tok) == len(vocab)
    return tok


def tiny_transformer(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def tiny_pipeline(shift: float = 3.0, two_experts: bool = False) -> WanPipeline:
    """diffusers' own WanPipeline test components (get_dummy_components), text encoder = tiny UMT5."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8)).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    # random latent statistics so that decode's un-normalisation is exercised
    vae.register_to_config(latents_mean=torch.randn(16).mul(0.1).tolist(), latents_std=torch.rand(16).add(0.5).tolist())
    extra = dict(transformer_2=tiny_transformer(1), boundary_ratio=0.6) if two_experts else {}
    return WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tiny_transformer(0),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), **extra)


def pipeline_latents(pipe: WanPipeline, prompts, latents, steps, guidance, negative=None):
    return pipe(prompts, negative_prompt=negative, height=SIZE["height"], width=SIZE["width"], num_frames=SIZE["num_frames"],
                num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(), output_type="latent",
                max_sequence_length=SIZE["max_sequence_length"]).frames


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-wan"))
    tiny_pipeline().save_pretrained(path)
    return path


PROMPTS = ["a red cat runs through the field", "a boat at sunset"]


# -- pure pieces ---------------------------------------------------------------------------------
def test_flow_euler_sigmas_is_the_shifted_scheduler_schedule():
    # independent: diffusers' schedule is linspace(1, shift(1/1000), T) shifted again (Eq. 23), then 0
    T, shift = 7, 5.0
    base = torch.linspace(1.0, float(shift_sigmas(torch.tensor(1e-3), shift)), T)
    expected = torch.cat([shift_sigmas(base, shift), torch.zeros(1)])
    torch.testing.assert_close(flow_euler_sigmas(T, shift), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_steps"):
        flow_euler_sigmas(0, shift)


def test_zero_padding_matches_hand_example():
    embeds = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = torch.tensor([[[0.0, 1], [2, 3], [0, 0]], [[6, 7], [0, 0], [0, 0]]])
    assert torch.equal(zero_padding(embeds, mask), expected)


def test_video_latent_shape_and_errors():
    assert video_latent_shape(16, 81, 480, 832, 4, 8, (1, 2, 2)) == (16, 21, 60, 104)
    with pytest.raises(ValueError, match="num_frames=80"):
        video_latent_shape(16, 80, 480, 832, 4, 8, (1, 2, 2))
    with pytest.raises(ValueError, match="width=840"):
        video_latent_shape(16, 81, 480, 840, 4, 8, (1, 2, 2))


# -- fidelity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("two_experts", [False, True], ids=["wan2.1", "wan2.2-two-experts"])
def test_ode_rollout_reproduces_wan_pipeline(two_experts):
    pipe = tiny_pipeline(shift=3.0, two_experts=two_experts)
    adapter = WanAdapter(pipe, **SIZE)
    assert adapter.shift == 3.0 and adapter.latent_shape == (16, 2, 2, 2)
    steps, g = 4, 5.0
    latents = adapter.init_latents(2, torch.Generator().manual_seed(0))
    cond = adapter.encode(PROMPTS, ["blurry", "blurry"])
    ours = sample_ode(adapter, cond, steps, latents=latents, guidance_scale=g)
    ref = pipeline_latents(pipe, PROMPTS, latents, steps, g, negative=["blurry", "blurry"])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    # rollout with zero noise goes through the same transitions
    spec = BranchSpec.flat(steps, 1, 0.0, sampler="flow_grpo", guidance_scale=g)
    tree = rollout(adapter, cond, spec, prompts=PROMPTS, generator=torch.Generator().manual_seed(0), decode=False,
                   initial_latents=latents)
    torch.testing.assert_close(tree.leaf_latents, ref, atol=1e-4, rtol=0)
    if two_experts:  # the high-noise expert alone gives another result: the switch really happens
        adapter.transformer_2 = None
        assert (sample_ode(adapter, cond, steps, latents=latents, guidance_scale=g) - ref).abs().max() > 1e-3


def test_two_expert_routing_is_per_sample():
    """A micro-batch mixing steps above and below the boundary routes each row to its own expert."""
    adapter = WanAdapter(tiny_pipeline(two_experts=True), **SIZE)
    x = torch.randn(2, *adapter.latent_shape)
    emb = adapter.encode(PROMPTS).tensors
    sigma = torch.tensor([0.9, 0.3])
    mixed = adapter._velocity(x, sigma, emb)
    hi = adapter._velocity(x[:1], sigma[:1], {k: v[:1] for k, v in emb.items()})
    lo = adapter._velocity(x[1:], sigma[1:], {k: v[1:] for k, v in emb.items()})
    torch.testing.assert_close(mixed, torch.cat([hi, lo]), atol=1e-6, rtol=0)
    direct_lo = adapter.transformer_2(hidden_states=x[1:], timestep=sigma[1:] * 1000, encoder_hidden_states=emb["prompt_embeds"][1:],
                                      return_dict=False)[0]
    torch.testing.assert_close(lo, direct_lo, atol=1e-6, rtol=0)


def test_decode_matches_pipeline_video_output():
    pipe = tiny_pipeline()
    adapter = WanAdapter(pipe, **SIZE)
    latents = adapter.init_latents(1, torch.Generator().manual_seed(1))
    cond = adapter.encode(PROMPTS[:1])
    video = adapter.decode(sample_ode(adapter, cond, 2, latents=latents))
    assert video.shape == (1, SIZE["num_frames"], 3, SIZE["height"], SIZE["width"])
    ref = pipe(PROMPTS[0], height=16, width=16, num_frames=5, num_inference_steps=2, guidance_scale=1.0, latents=latents.clone(),
               output_type="pt", max_sequence_length=SIZE["max_sequence_length"]).frames
    torch.testing.assert_close(video, ref.float(), atol=1e-4, rtol=0)


def test_encode_negative_and_bad_input():
    adapter = WanAdapter(tiny_pipeline(), **SIZE)
    cond = adapter.encode(PROMPTS)
    assert cond.negative is None and cond.tensors["prompt_embeds"].shape == (2, SIZE["max_sequence_length"], 32)
    assert adapter.encode(PROMPTS, ["", ""]).negative["prompt_embeds"].shape == (2, 12, 32)
    with pytest.raises(ValueError, match="negative_prompts"):
        adapter.encode(PROMPTS, [""])
    with pytest.raises(ValueError, match="trainable_expert='low'"):
        WanAdapter(tiny_pipeline(), trainable_expert="low", **SIZE)
    with pytest.raises(ValueError, match="height=20"):
        WanAdapter(tiny_pipeline(), **{**SIZE, "height": 20})


# -- loading ---------------------------------------------------------------------------------------
def test_from_pretrained_round_trip_and_embedding_cache(saved_dir, tmp_path):
    pipe = WanPipeline.from_pretrained(saved_dir)
    cache = str(tmp_path / "cache")
    adapter = WanAdapter.from_pretrained(saved_dir, embedding_cache_dir=cache, **SIZE)
    assert adapter.shift == 3.0  # read from the saved scheduler config
    latents = adapter.init_latents(2, torch.Generator().manual_seed(2))
    cond = adapter.encode(PROMPTS, ["", ""])
    ours = sample_ode(adapter, cond, 3, latents=latents, guidance_scale=4.0)
    torch.testing.assert_close(ours, pipeline_latents(pipe, PROMPTS, latents, 3, 4.0), atol=1e-4, rtol=0)
    assert len(os.listdir(cache)) == 3  # two prompts + the empty negative
    again = adapter.encode(PROMPTS, ["", ""])  # now served from disk
    torch.testing.assert_close(again.tensors["prompt_embeds"], cond.tensors["prompt_embeds"], atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        WanAdapter.from_pretrained(str(tmp_path))


# -- LoRA interop ----------------------------------------------------------------------------------
def test_lora_saved_in_diffusers_format_reloads_in_wan_pipeline(saved_dir, tmp_path):
    adapter = WanAdapter.from_pretrained(saved_dir, **SIZE)
    add_random_lora(adapter, seed=3)
    latents = adapter.init_latents(2, torch.Generator().manual_seed(4))
    ours = sample_ode(adapter, adapter.encode(PROMPTS, ["", ""]), 3, latents=latents, guidance_scale=4.0)
    with torch.no_grad(), adapter.disable_adapter():
        base = sample_ode(adapter, adapter.encode(PROMPTS, ["", ""]), 3, latents=latents, guidance_scale=4.0)
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the policy
    adapter.save_lora_weights(str(tmp_path / "lora"))
    pipe = WanPipeline.from_pretrained(saved_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(pipeline_latents(pipe, PROMPTS, latents, 3, 4.0), ours, atol=1e-4, rtol=0)
    # merged save_pretrained reloads the same policy
    adapter.save_pretrained(str(tmp_path / "merged"))
    merged = WanAdapter.from_pretrained(str(tmp_path / "merged"))  # video size from flowalign_adapter.json
    again = sample_ode(merged, merged.encode(PROMPTS, ["", ""]), 3, latents=latents, guidance_scale=4.0)
    torch.testing.assert_close(again, ours, atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_same_gradients():
    adapter = WanAdapter(tiny_pipeline(), **SIZE)
    add_random_lora(adapter, seed=3)
    x = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = adapter.encode(PROMPTS)
    assert_same_gradients(*(denoiser_gradients(adapter, x, torch.tensor([0.8, 0.4]), cond, c) for c in (False, True)))


# -- Wan 2.2 TI2V-5B (expand_timesteps, 48-channel Wan 2.2 VAE), text-to-video ------------------------
TI2V_SIZE = dict(height=32, width=32, num_frames=5, max_sequence_length=12)  # VAE 16x spatial: latents [48, 2, 2, 2]


def tiny_ti2v_pipeline(shift: float = 5.0) -> WanPipeline:
    """diffusers' Wan 2.2 5B test components (tests/pipelines/wan/test_wan_22.py, ``Wan225BPipelineTesterConfig``):
    the residual, 2x2-patchified 48-channel VAE, a 48-channel transformer, ``expand_timesteps=True``; tiny UMT5."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8)).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                           latents_mean=torch.randn(48).mul(0.1).tolist(), latents_std=torch.rand(48).add(0.5).tolist(),
                           dim_mult=[1, 1, 1, 1], num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48,
                                        out_channels=48, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), expand_timesteps=True)


def ti2v_pipeline_output(pipe: WanPipeline, latents, steps, guidance, output_type="latent", negative=None):
    return pipe(PROMPTS, negative_prompt=negative, height=TI2V_SIZE["height"], width=TI2V_SIZE["width"],
                num_frames=TI2V_SIZE["num_frames"], num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                output_type=output_type, max_sequence_length=TI2V_SIZE["max_sequence_length"]).frames


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-wan22-ti2v"))
    tiny_ti2v_pipeline().save_pretrained(path)
    return path


def test_ti2v_per_token_timestep_matches_pipeline_mask():
    """WanPipeline (expand_timesteps): ``timestep = (mask[0][0][:, ::2, ::2] * t).flatten()`` with ``mask = ones`` of
    the latent's shape, one entry per 1x2x2 patch token; the adapter hands the transformer the same ``[B, tokens]``."""
    adapter = WanAdapter(tiny_ti2v_pipeline(), **TI2V_SIZE)
    assert adapter.expand_timesteps and adapter.latent_shape == (48, 2, 2, 2)
    seen = []
    hook = adapter.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    x = torch.randn(2, *adapter.latent_shape)
    adapter._velocity(x, torch.tensor([0.9, 0.25]), adapter.encode(PROMPTS).tensors)
    hook.remove()
    mask = torch.ones(2, *adapter.latent_shape)
    expected = torch.stack([(mask[0][0][:, ::2, ::2] * t).flatten() for t in (900.0, 250.0)])
    assert seen[0].shape == (2, 2 * 1 * 1) and torch.equal(seen[0], expected)


@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_ti2v_ode_rollout_reproduces_pipeline(guidance):
    pipe = tiny_ti2v_pipeline()
    adapter = WanAdapter(pipe, **TI2V_SIZE)
    assert adapter.shift == 5.0
    latents = adapter.init_latents(2, torch.Generator().manual_seed(0))
    negative = ["blurry", "blurry"] if guidance > 1 else None
    cond = adapter.encode(PROMPTS, negative)
    ours = sample_ode(adapter, cond, 3, latents=latents, guidance_scale=guidance)
    ref = ti2v_pipeline_output(pipe, latents, 3, guidance, negative=negative)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(adapter.sigmas(3), pipe.scheduler.sigmas, atol=1e-6, rtol=0)
    if guidance == 1.0:  # decoded by the Wan 2.2 VAE (un-normalised, un-patchified) as output_type="pt"
        video = adapter.decode(ours)
        assert video.shape == (2, TI2V_SIZE["num_frames"], 3, TI2V_SIZE["height"], TI2V_SIZE["width"])
        torch.testing.assert_close(video, ti2v_pipeline_output(pipe, latents, 3, 1.0, output_type="pt").float(),
                                   atol=1e-4, rtol=0)


def test_ti2v_lora_round_trip_and_save_keep_expand_timesteps(ti2v_dir, tmp_path):
    adapter = WanAdapter.from_pretrained(ti2v_dir, **TI2V_SIZE)
    assert adapter.expand_timesteps and adapter.shift == 5.0
    add_random_lora(adapter, seed=5)
    latents = adapter.init_latents(2, torch.Generator().manual_seed(6))
    ours = sample_ode(adapter, adapter.encode(PROMPTS), 2, latents=latents)
    with torch.no_grad(), adapter.disable_adapter():
        assert (sample_ode(adapter, adapter.encode(PROMPTS), 2, latents=latents) - ours).abs().max() > 1e-3
    adapter.save_lora_weights(str(tmp_path / "lora"))
    pipe = WanPipeline.from_pretrained(ti2v_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(ti2v_pipeline_output(pipe, latents, 2, 1.0), ours, atol=1e-4, rtol=0)
    adapter.save_pretrained(str(tmp_path / "merged"))
    merged = WanAdapter.from_pretrained(str(tmp_path / "merged"))
    assert merged.expand_timesteps and WanPipeline.from_pretrained(str(tmp_path / "merged")).config.expand_timesteps
    torch.testing.assert_close(sample_ode(merged, merged.encode(PROMPTS), 2, latents=latents), ours, atol=1e-4, rtol=0)


def test_wan22_ti2v_config_runs_two_iterations(ti2v_dir, tmp_path, prompt_files):
    import flowalign

    def mean_frame_brightness(media, prompts, metadata=None):
        assert media.shape[1:] == (TI2V_SIZE["num_frames"], 3, 32, 32)
        return media.mean(dim=(1, 2, 3, 4))

    train, evaluation = prompt_files
    overrides = grpo_overrides(ti2v_dir, str(tmp_path / "run"), train, evaluation, VIDEO_GRPO,
                               **{"model.options": dict(TI2V_SIZE)})
    summary = flowalign.train(os.path.join(REPO, "configs/grpo/wan22_ti2v_jpeg.yaml"), overrides, rewards=mean_frame_brightness)
    assert summary["iterations"] == 2
    assert os.path.exists(os.path.join(tmp_path, "run", "final", "model_index.json"))


# -- recipe ----------------------------------------------------------------------------------------
def test_wan_jpeg_config_runs_two_iterations(saved_dir, tmp_path, prompt_files):
    import flowalign

    calls = []

    def mean_frame_brightness(media, prompts, metadata=None):
        assert media.ndim == 5 and media.shape[1:] == (SIZE["num_frames"], 3, 16, 16)
        calls.append(len(prompts))
        return media.mean(dim=(1, 2, 3, 4))

    train, evaluation = prompt_files
    overrides = grpo_overrides(saved_dir, str(tmp_path / "run"), train, evaluation, VIDEO_GRPO,
                               **{"model.options": dict(SIZE)})
    # a plain function: the recipe gives it the adapter's modality (video)
    summary = flowalign.train(os.path.join(REPO, "configs/grpo/wan_jpeg.yaml"), overrides, rewards=mean_frame_brightness)
    assert os.path.exists(summary["video_grid"][0])
    assert summary["iterations"] == 2 and sum(calls) >= 2 * 2
    assert os.path.exists(os.path.join(tmp_path, "run", "final", "model_index.json"))
