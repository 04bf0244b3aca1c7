"""LTX2Adapter: fidelity to diffusers' LTX2Pipeline for BOTH latent streams (video and audio, with and without CFG,
separate audio guidance scale), decoded video and audio, loading through from_pretrained, LoRA interop with
LTX2Pipeline.load_lora_weights, and the configs/grpo/ltx2_jpeg.yaml recipe on tiny components (diffusers'
tests/pipelines/ltx2 ``get_dummy_components`` sizes; Gemma-3 and its tokenizer built in memory; CPU, random weights)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from flowalign.rollout import BranchSpec, rollout, sample_ode
from tests.conftest import REPO
from tests.tiny_components import VIDEO_GRPO, add_random_lora, assert_same_gradients, denoiser_gradients, grpo_overrides

diffusers = pytest.importorskip("diffusers")
from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       LTX2Pipeline, LTX2VideoTransformer3DModel)
from diffusers.pipelines.ltx2 import LTX2TextConnectors  # noqa: E402
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GemmaTokenizerFast  # noqa: E402

from flowalign.pipelines.ltx2 import (LTX2Adapter, audio_latent_frames, join_flat, ltx2_mu, ltx2_sigmas,  # noqa: E402
                                      split_flat)

WORDS = "a an the red blue green cat dog bird car boat runs flies over through field city ocean forest at night sunset".split()
SIZE = dict(height=32, width=32, num_frames=5, frame_rate=25.0, max_sequence_length=12)
PROMPTS = ["a red cat runs through the field", "a boat at sunset"]
# LTX-2's released scheduler settings (dynamic exponential shift + terminal stretch), so the mu path is exercised
SCHEDULER = dict(use_dynamic_shifting=True, shift_terminal=0.1, base_image_seq_len=1024, max_image_seq_len=4096,
                 base_shift=0.95, max_shift=2.05)
PLAIN_GUIDANCE = dict(stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0, audio_stg_scale=0.0,
                      audio_modality_scale=1.0, audio_guidance_rescale=0.0)  # the terms the adapter does not use


# -- tiny components ------------------------------------------------------------------------------
def gemma_tokenizer() -> GemmaTokenizerFast:
    """A word-level ``tokenizers`` tokenizer wrapped as GemmaTokenizerFast, built in memory."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return GemmaTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def tiny_pipeline() -> LTX2Pipeline:
    tok = gemma_tokenizer()
    torch.manual_seed(0)
    text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4, max_position_embeddings=64),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                           patch_size=14), mm_tokens_per_image=4)).eval()
    torch.manual_seed(0)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=32, rope_double_precision=False, rope_type="split")
    torch.manual_seed(0)
    connectors = LTX2TextConnectors(
        caption_channels=32, text_proj_in_factor=3, video_connector_num_attention_heads=4, video_connector_attention_head_dim=8,
        video_connector_num_layers=1, video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1, audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32, rope_theta=10000.0, rope_double_precision=False, causal_temporal_positioning=False,
        rope_type="split")
    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False)
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    torch.manual_seed(0)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8)
    torch.manual_seed(0)
    vocoder = LTX2Vocoder(in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4],
                          upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
                          leaky_relu_negative_slope=0.1, output_sampling_rate=16000)
    with torch.no_grad():  # non-trivial latent statistics, so (de)normalisation of both streams is exercised
        torch.manual_seed(5)
        for v in (vae, audio_vae):
            v.latents_mean.copy_(torch.randn_like(v.latents_mean) * 0.1)
            v.latents_std.copy_(torch.rand_like(v.latents_std) + 0.5)
    pipe = LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, audio_vae=audio_vae,
                        text_encoder=text_encoder, tokenizer=tok, connectors=connectors, transformer=transformer, vocoder=vocoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe: LTX2Pipeline, adapter: LTX2Adapter, flat: torch.Tensor, steps: int, guidance: float = 1.0,
                 audio_guidance: float | None = None, output_type: str = "latent"):
    """The official pipeline from the adapter's initial noise: packed video tokens as they are, packed audio tokens
    un-normalised (``prepare_audio_latents`` normalises the audio latents it is given)."""
    video, audio = split_flat(flat, (adapter.video_tokens, adapter.video_dim), (adapter.audio_frames, adapter.audio_dim))
    audio = audio * pipe.audio_vae.latents_std + pipe.audio_vae.latents_mean
    return pipe(PROMPTS[:flat.shape[0]], latents=video.clone(), audio_latents=audio.clone(), num_inference_steps=steps,
                guidance_scale=guidance, audio_guidance_scale=audio_guidance or guidance, output_type=output_type,
                **PLAIN_GUIDANCE, **SIZE)


@pytest.fixture(scope="module")
def pipe() -> LTX2Pipeline:
    return tiny_pipeline()


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, pipe) -> str:
    path = str(tmp_path_factory.mktemp("tiny-ltx2"))
    pipe.save_pretrained(path)
    return path


# -- pure pieces ---------------------------------------------------------------------------------
def test_sigmas_are_the_pipeline_schedule():
    # independent: mu linear in the token count; exponential shift e^mu / (e^mu + 1/s - 1); stretch so the last
    # non-zero sigma is shift_terminal: 1 - (1 - s) / ((1 - s_last) / (1 - terminal)); then 0
    T, tokens = 5, 2000
    mu = 0.95 + (2.05 - 0.95) * (tokens - 1024) / (4096 - 1024)
    assert ltx2_mu(tokens, FlowMatchEulerDiscreteScheduler(**SCHEDULER).config) == pytest.approx(mu)
    base = torch.linspace(1.0, 1.0 / T, T, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.1))
    expected = torch.cat([stretched.float(), torch.zeros(1)])
    torch.testing.assert_close(ltx2_sigmas(T, FlowMatchEulerDiscreteScheduler(**SCHEDULER), tokens), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_steps"):
        ltx2_sigmas(0, FlowMatchEulerDiscreteScheduler(**SCHEDULER), tokens)


def test_audio_length_and_flat_layout(pipe):
    # LTX-2: 121 frames at 24 fps, 16 kHz audio, hop 160, 4x temporal compression -> round(5.0417 s x 25) = 126
    assert audio_latent_frames(121, 24.0, 16000, 160, 4) == 126
    adapter = LTX2Adapter(pipe, **SIZE)
    # 5 frames, 32 px (LTX2Pipeline needs multiples of 32), VAE 2x spatial / 2x temporal -> 3 x 16 x 16 video tokens
    # of 4 channels; 5 / 25 s -> round(0.2 x 16000 / 160 / 4) = 5 audio tokens of 2 channels x 2 mel bins
    assert (adapter.video_tokens, adapter.audio_frames) == (768, 5)
    assert adapter.latent_shape == (768 * 4 + 5 * 4,)
    video, audio = torch.randn(2, 768, 4), torch.randn(2, 5, 4)
    v, a = split_flat(join_flat(video, audio), (768, 4), (5, 4))
    assert torch.equal(v, video) and torch.equal(a, audio)
    flat = torch.randn(2, *adapter.latent_shape)
    torch.testing.assert_close(adapter.join_latents(*adapter.split_latents(flat)), flat, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_frames=8"):
        LTX2Adapter(pipe, **{**SIZE, "num_frames": 8})
    with pytest.raises(ValueError, match="width=15"):
        LTX2Adapter(pipe, **{**SIZE, "width": 15})


# -- fidelity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance,audio_guidance", [(1.0, None), (3.0, None), (3.0, 5.0)],
                         ids=["no-cfg", "cfg", "cfg-separate-audio-scale"])
def test_ode_rollout_reproduces_pipeline_for_both_streams(pipe, guidance, audio_guidance):
    adapter = LTX2Adapter(pipe, audio_guidance_scale=audio_guidance, **SIZE)
    steps = 2
    latents = adapter.init_latents(2, torch.Generator().manual_seed(0))
    cond = adapter.encode(PROMPTS, ["", ""] if guidance > 1 else None)
    ours = sample_ode(adapter, cond, steps, latents=latents, guidance_scale=guidance)
    ref = run_pipeline(pipe, adapter, latents, steps, guidance, audio_guidance)
    video, audio = adapter.split_latents(ours)
    torch.testing.assert_close(video, ref.frames, atol=1e-4, rtol=0)
    torch.testing.assert_close(audio, ref.audio, atol=1e-4, rtol=0)
    if guidance > 1 and audio_guidance is None:  # zero-noise rollout: the same transitions through the SDE sampler
        spec = BranchSpec.flat(steps, 1, 0.0, sampler="flow_grpo", guidance_scale=guidance)
        tree = rollout(adapter, cond, spec, prompts=PROMPTS, generator=torch.Generator().manual_seed(0), decode=False,
                       initial_latents=latents)
        torch.testing.assert_close(tree.leaf_latents, ours, atol=1e-4, rtol=0)
    if audio_guidance is not None:  # the audio scale really acts on the audio stream only
        same = sample_ode(LTX2Adapter(pipe, **SIZE), cond, steps, latents=latents, guidance_scale=guidance)
        assert (adapter.split_latents(same)[1] - audio).abs().max() > 1e-3


def test_decode_matches_pipeline_video_and_audio(pipe):
    adapter = LTX2Adapter(pipe, **SIZE)
    latents = adapter.init_latents(1, torch.Generator().manual_seed(1))
    final = sample_ode(adapter, adapter.encode(PROMPTS[:1]), 2, latents=latents)
    ref = run_pipeline(pipe, adapter, latents, 2, output_type="pt")
    video = adapter.decode(final)
    assert video.shape == (1, SIZE["num_frames"], 3, SIZE["height"], SIZE["width"])
    torch.testing.assert_close(video, ref.frames.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(adapter.decode_audio(final), ref.audio.float(), atol=1e-4, rtol=0)


def test_encode_and_option_errors(pipe, saved_dir):
    adapter = LTX2Adapter(pipe, **SIZE)
    t = adapter.encode(PROMPTS).tensors
    assert t["video_context"].shape[:2] == (2, SIZE["max_sequence_length"]) and t["context_mask"].shape == (2, 12)
    with pytest.raises(ValueError, match="negative_prompts"):
        adapter.encode(PROMPTS, [""])
    with pytest.raises(ValueError, match="unknown option.*'shift'"):
        LTX2Adapter.from_pretrained(saved_dir, shift=3.0)


# -- loading ---------------------------------------------------------------------------------------
def test_from_pretrained_round_trip_and_embedding_cache(saved_dir, tmp_path):
    ref_pipe = LTX2Pipeline.from_pretrained(saved_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    cache = str(tmp_path / "cache")
    adapter = LTX2Adapter.from_pretrained(saved_dir, embedding_cache_dir=cache, **SIZE)
    latents = adapter.init_latents(2, torch.Generator().manual_seed(2))
    cond = adapter.encode(PROMPTS, ["", ""])
    ours = sample_ode(adapter, cond, 2, latents=latents, guidance_scale=3.0)
    ref = run_pipeline(ref_pipe, adapter, latents, 2, 3.0)
    torch.testing.assert_close(adapter.split_latents(ours)[0], ref.frames, atol=1e-4, rtol=0)
    assert len(os.listdir(cache)) == 3  # two prompts + the empty negative
    again = adapter.encode(PROMPTS, ["", ""])  # now served from disk
    for k, v in cond.tensors.items():
        assert torch.equal(again.tensors[k], v)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        LTX2Adapter.from_pretrained(str(tmp_path))


# -- LoRA interop ----------------------------------------------------------------------------------
def test_lora_round_trips_into_official_pipeline(saved_dir, tmp_path):
    adapter = LTX2Adapter.from_pretrained(saved_dir, **SIZE)
    add_random_lora(adapter, seed=3)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in adapter.trainable_module().named_parameters() if ".lora_A" in n}
    assert any("audio_ff" in n for n in wrapped) and any("audio_to_video_attn" in n for n in wrapped)
    latents = adapter.init_latents(2, torch.Generator().manual_seed(4))
    ours = sample_ode(adapter, adapter.encode(PROMPTS), 2, latents=latents)
    with torch.no_grad(), adapter.disable_adapter():
        base = sample_ode(adapter, adapter.encode(PROMPTS), 2, latents=latents)
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the policy
    adapter.save_lora_weights(str(tmp_path / "lora"))
    ref_pipe = LTX2Pipeline.from_pretrained(saved_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.load_lora_weights(str(tmp_path / "lora"))
    ref = run_pipeline(ref_pipe, adapter, latents, 2)
    video, audio = adapter.split_latents(ours)
    torch.testing.assert_close(ref.frames, video, atol=1e-4, rtol=0)
    torch.testing.assert_close(ref.audio, audio, atol=1e-4, rtol=0)
    adapter.save_pretrained(str(tmp_path / "merged"))
    merged = LTX2Adapter.from_pretrained(str(tmp_path / "merged"))  # video size from flowalign_adapter.json
    assert merged.latent_shape == adapter.latent_shape
    torch.testing.assert_close(sample_ode(merged, merged.encode(PROMPTS), 2, latents=latents), ours, atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_same_gradients():
    adapter = LTX2Adapter(tiny_pipeline(), **SIZE)
    add_random_lora(adapter, seed=3)
    x = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = adapter.encode(PROMPTS)
    assert_same_gradients(*(denoiser_gradients(adapter, x, torch.tensor([0.8, 0.4]), cond, c) for c in (False, True)))


# -- recipe ----------------------------------------------------------------------------------------
def test_grpo_config_runs_two_iterations(saved_dir, tmp_path, prompt_files):
    """16 x 16 px here (the adapter only needs the VAE factor; LTX2Pipeline's own check wants multiples of 32)."""
    import flowalign

    calls = []

    def mean_frame_brightness(media, prompts, metadata=None):
        assert media.ndim == 5 and media.shape[1:] == (SIZE["num_frames"], 3, 16, 16)
        calls.append(len(prompts))
        return media.mean(dim=(1, 2, 3, 4))

    train, evaluation = prompt_files
    overrides = grpo_overrides(saved_dir, str(tmp_path / "run"), train, evaluation, VIDEO_GRPO,  # bf16 is slow on CPU
                               **{"model.options": {**SIZE, "height": 16, "width": 16}, "model.dtype": "float32",
                                  "train.mixed_precision": "no"})
    # a plain function: the recipe wraps it as a reward of the adapter's modality ("video", though the latent is flat)
    summary = flowalign.train(os.path.join(REPO, "configs/grpo/ltx2_jpeg.yaml"), overrides, rewards=mean_frame_brightness)
    assert os.path.exists(summary["video_grid"][0])
    assert summary["iterations"] == 2 and sum(calls) >= 2 * 2
    assert os.path.exists(os.path.join(tmp_path, "run", "final", "model_index.json"))
