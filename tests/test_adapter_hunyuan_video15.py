"""HunyuanVideo15Adapter: fidelity to diffusers' HunyuanVideo15Pipeline (text-to-video, with and without CFG, glyph
prompts), loading through from_pretrained, LoRA interop with the official transformer's ``load_lora_adapter``, and the
configs/grpo/hunyuan_video15_jpeg.yaml recipe on tiny components (diffusers' tests/pipelines/hunyuan_video1_5
``get_dummy_components`` sizes; tokenizers built offline; all CPU, random weights)."""

from __future__ import annotations

import os

import pytest
import torch

from flowalign.pipelines.base import shift_sigmas
from flowalign.rollout import BranchSpec, rollout, sample_ode
from tests.conftest import REPO
from tests.tiny_components import (VIDEO_GRPO, add_random_lora, assert_same_gradients, denoiser_gradients,
                                   grpo_overrides, qwen2_bpe_tokenizer)

diffusers = pytest.importorskip("diffusers")
from diffusers import (AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel)
from diffusers.guiders import ClassifierFreeGuidance  # noqa: E402
from transformers import (ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, Qwen2Tokenizer,  # noqa: E402
                          T5Config, T5EncoderModel)

from flowalign.pipelines.hunyuan_video15 import (HunyuanVideo15Adapter, hunyuan_latent_shape,  # noqa: E402
                                                 hunyuan_video15_sigmas, t2v_transformer_input)

# The tiny byte-level tokenizer spells the system message in ~440 tokens (the real Qwen2.5 one in 108 = the crop),
# so the kept sequence must be long enough to reach the user prompt.
MAX_LEN, GLYPH_LEN = 360, 24
SIZE = dict(height=16, width=16, num_frames=5, max_sequence_length=MAX_LEN, glyph_max_length=GLYPH_LEN)
PROMPTS = ['a sign that says "open" in the rain', "a red cat runs through the field"]  # first one has a glyph text
QWEN_VL_CHAT_TEMPLATE = (  # the role / content layout of Qwen2.5-VL's template, text only
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# -- tiny components ------------------------------------------------------------------------------
def qwen_tokenizer(directory: str) -> Qwen2Tokenizer:
    """The byte-level Qwen2 tokenizer with a few GPT-2-style merges and Qwen2.5-VL's chat tokens / template."""
    return qwen2_bpe_tokenizer(directory, ["Ġ t", "Ġ a", "h e", "Ġt he", "Ġ s", "Ġ c", "Ġ o", "i n", "a n", "o n", "e r",
                                           "Ġ m", "Ġ d", "r e"], ["<|im_start|>", "<|im_end|>"], QWEN_VL_CHAT_TEMPLATE)


def tiny_pipeline(tmp: str, shift: float = 7.0, guidance_scale: float = 1.0) -> HunyuanVideo15Pipeline:
    """diffusers' dummy HunyuanVideo 1.5 components; the VAE gets a non-unit scaling factor so decode's
    un-scaling is exercised. The pipeline's text lengths are set to the adapter's (they are plain attributes)."""
    tok = qwen_tokenizer(os.path.join(tmp, "qwen-tok"))
    torch.manual_seed(0)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_refiner_layers=1,
        mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                                      layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
                                      downsample_match_channel=False, upsample_match_channel=False, scaling_factor=0.7)
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tok), rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        rope_theta=1000000.0))
    torch.manual_seed(0)
    tokenizer_2 = ByT5Tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4, relative_attention_num_buckets=8))
    pipe = HunyuanVideo15Pipeline(text_encoder=text_encoder.eval(), tokenizer=tok, transformer=transformer.eval(),
                                  vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                  text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2,
                                  guider=ClassifierFreeGuidance(guidance_scale=guidance_scale))
    return with_lengths(pipe)


def with_lengths(pipe: HunyuanVideo15Pipeline, guidance_scale: float | None = None) -> HunyuanVideo15Pipeline:
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = MAX_LEN, GLYPH_LEN
    if guidance_scale is not None:
        pipe.guider = ClassifierFreeGuidance(guidance_scale=guidance_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(pipe: HunyuanVideo15Pipeline, latents, steps, negative=None, output_type="latent"):
    return pipe(PROMPTS[:latents.shape[0]], negative_prompt=negative, height=SIZE["height"], width=SIZE["width"],
                num_frames=SIZE["num_frames"], num_inference_steps=steps, latents=latents.clone(),
                output_type=output_type).frames


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tiny-hunyuan15"))


@pytest.fixture(scope="module")
def pipe(tmp_dir) -> HunyuanVideo15Pipeline:
    return tiny_pipeline(tmp_dir)


@pytest.fixture(scope="module")
def saved_dir(tmp_dir, pipe) -> str:
    path = os.path.join(tmp_dir, "saved")
    pipe.save_pretrained(path)
    return path


# -- pure pieces ---------------------------------------------------------------------------------
def test_sigmas_are_the_pipeline_schedule():
    # independent: the pipeline gives the scheduler linspace(1, 0, T + 1)[:-1]; it shifts (Eq. 23) and appends 0
    T, shift = 6, 7.0
    expected = torch.cat([shift_sigmas(torch.linspace(1.0, 0.0, T + 1, dtype=torch.float64)[:-1], shift).float(),
                          torch.zeros(1)])
    config = FlowMatchEulerDiscreteScheduler(shift=5.0).config
    torch.testing.assert_close(hunyuan_video15_sigmas(T, config, shift), expected, atol=1e-6, rtol=0)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, T + 1)[:-1].numpy())
    torch.testing.assert_close(hunyuan_video15_sigmas(T, config, shift), scheduler.sigmas.float(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_steps"):
        hunyuan_video15_sigmas(0, config)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        hunyuan_video15_sigmas(4, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)


def test_latent_shape_and_errors():
    # 480p t2v: 121 frames, 480 x 848, VAE 4x temporal / 16x spatial, 32 latent channels
    assert hunyuan_latent_shape(32, 121, 480, 848, 4, 16, 1, 1) == (32, 31, 30, 53)
    with pytest.raises(ValueError, match="num_frames=120"):
        hunyuan_latent_shape(32, 120, 480, 848, 4, 16, 1, 1)
    with pytest.raises(ValueError, match="width=850"):
        hunyuan_latent_shape(32, 121, 480, 850, 4, 16, 1, 1)


def test_t2v_input_matches_pipeline_cond_latents_and_mask(pipe):
    x = torch.randn(2, 4, 3, 4, 4)
    cond, mask = pipe.prepare_cond_latents_and_mask(x, x.dtype, x.device)
    assert torch.equal(t2v_transformer_input(x), torch.cat([x, cond, mask], dim=1))


# -- fidelity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_ode_rollout_reproduces_pipeline(pipe, guidance):
    adapter = HunyuanVideo15Adapter(pipe, **SIZE)
    assert adapter.shift == 7.0 and adapter.latent_shape == (4, 3, 4, 4)
    with_lengths(pipe, guidance_scale=guidance)
    steps = 3
    latents = adapter.init_latents(2, torch.Generator().manual_seed(0))
    cond = adapter.encode(PROMPTS, ["", ""] if guidance > 1 else None)
    assert cond.tensors["glyph_mask"][0].sum() > 0 and cond.tensors["glyph_mask"][1].sum() == 0  # glyph path used
    ours = sample_ode(adapter, cond, steps, latents=latents, guidance_scale=guidance)
    ref = pipeline_latents(pipe, latents, steps)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    spec = BranchSpec.flat(steps, 1, 0.0, sampler="flow_grpo", guidance_scale=guidance)
    tree = rollout(adapter, cond, spec, prompts=PROMPTS, generator=torch.Generator().manual_seed(0), decode=False,
                   initial_latents=latents)
    torch.testing.assert_close(tree.leaf_latents, ref, atol=1e-4, rtol=0)
    if guidance > 1:  # CFG really changes the result
        plain = sample_ode(adapter, adapter.encode(PROMPTS), steps, latents=latents)
        assert (plain - ref).abs().max() > 1e-3
    with_lengths(pipe, guidance_scale=1.0)


def test_decode_matches_pipeline_video_output(pipe):
    adapter = HunyuanVideo15Adapter(pipe, **SIZE)
    latents = adapter.init_latents(1, torch.Generator().manual_seed(1))
    video = adapter.decode(sample_ode(adapter, adapter.encode(PROMPTS[:1]), 2, latents=latents))
    assert video.shape == (1, SIZE["num_frames"], 3, SIZE["height"], SIZE["width"])
    ref = pipeline_latents(pipe, latents, 2, output_type="pt")
    torch.testing.assert_close(video, ref.float(), atol=1e-4, rtol=0)
    # a batch decodes video by video (the pipeline's VAE cannot take B > 1, see HunyuanVideo15Adapter.decode)
    z = torch.randn(2, *adapter.latent_shape)
    torch.testing.assert_close(adapter.decode(z), torch.cat([adapter.decode(z[:1]), adapter.decode(z[1:])]), atol=0, rtol=0)


def test_encode_and_option_errors(pipe, saved_dir):
    adapter = HunyuanVideo15Adapter(pipe, **SIZE)
    t = adapter.encode(PROMPTS).tensors
    assert t["prompt_embeds"].shape == (2, MAX_LEN, 16) and t["glyph_embeds"].shape == (2, GLYPH_LEN, 32)
    with pytest.raises(ValueError, match="negative_prompts"):
        adapter.encode(PROMPTS, [""])
    with pytest.raises(ValueError, match="height=18"):
        HunyuanVideo15Adapter(pipe, **{**SIZE, "height": 18})
    with pytest.raises(ValueError, match="unknown option.*'guidance'"):
        HunyuanVideo15Adapter.from_pretrained(saved_dir, guidance=3.0)


# -- loading ---------------------------------------------------------------------------------------
def test_from_pretrained_round_trip_and_embedding_cache(saved_dir, tmp_path):
    ref_pipe = with_lengths(HunyuanVideo15Pipeline.from_pretrained(saved_dir), guidance_scale=3.0)
    cache = str(tmp_path / "cache")
    adapter = HunyuanVideo15Adapter.from_pretrained(saved_dir, embedding_cache_dir=cache, **SIZE)
    assert adapter.shift == 7.0  # read from the saved scheduler config
    latents = adapter.init_latents(2, torch.Generator().manual_seed(2))
    cond = adapter.encode(PROMPTS, ["", ""])
    ours = sample_ode(adapter, cond, 2, latents=latents, guidance_scale=3.0)
    torch.testing.assert_close(ours, pipeline_latents(ref_pipe, latents, 2), atol=1e-4, rtol=0)
    assert len(os.listdir(cache)) == 3  # two prompts + the empty negative
    again = adapter.encode(PROMPTS, ["", ""])  # now served from disk
    for k, v in cond.tensors.items():
        assert torch.equal(again.tensors[k], v)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        HunyuanVideo15Adapter.from_pretrained(str(tmp_path))


# -- LoRA interop ----------------------------------------------------------------------------------
def test_lora_round_trips_into_official_pipeline(saved_dir, tmp_path):
    adapter = HunyuanVideo15Adapter.from_pretrained(saved_dir, **SIZE)
    add_random_lora(adapter, seed=3)
    latents = adapter.init_latents(2, torch.Generator().manual_seed(4))
    ours = sample_ode(adapter, adapter.encode(PROMPTS), 2, latents=latents)
    with torch.no_grad(), adapter.disable_adapter():
        base = sample_ode(adapter, adapter.encode(PROMPTS), 2, latents=latents)
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the policy
    adapter.save_lora_weights(str(tmp_path / "lora"))
    ref_pipe = with_lengths(HunyuanVideo15Pipeline.from_pretrained(saved_dir))
    ref_pipe.transformer.load_lora_adapter(str(tmp_path / "lora"), prefix="transformer", use_safetensors=True)
    torch.testing.assert_close(pipeline_latents(ref_pipe, latents, 2), ours, atol=1e-4, rtol=0)
    # merged save_pretrained reloads the same policy, video size from flowalign_adapter.json
    adapter.save_pretrained(str(tmp_path / "merged"))
    merged = HunyuanVideo15Adapter.from_pretrained(str(tmp_path / "merged"))
    assert merged.latent_shape == adapter.latent_shape and merged.max_sequence_length == MAX_LEN
    again = sample_ode(merged, merged.encode(PROMPTS), 2, latents=latents)
    torch.testing.assert_close(again, ours, atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_same_gradients(tmp_dir):
    adapter = HunyuanVideo15Adapter(tiny_pipeline(os.path.join(tmp_dir, "gc")), **SIZE)
    add_random_lora(adapter, seed=3)
    x = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = adapter.encode(PROMPTS)
    assert_same_gradients(*(denoiser_gradients(adapter, x, torch.tensor([0.8, 0.4]), cond, c) for c in (False, True)))


# -- recipe ----------------------------------------------------------------------------------------
def test_grpo_config_runs_two_iterations(saved_dir, tmp_path, prompt_files):
    import flowalign

    calls = []

    def mean_frame_brightness(media, prompts, metadata=None):
        assert media.ndim == 5 and media.shape[1:] == (SIZE["num_frames"], 3, 16, 16)
        calls.append(len(prompts))
        return media.mean(dim=(1, 2, 3, 4))

    train, evaluation = prompt_files
    overrides = grpo_overrides(saved_dir, str(tmp_path / "run"), train, evaluation, VIDEO_GRPO,  # bf16 is slow on CPU
                               **{"model.options": dict(SIZE), "model.dtype": "float32", "train.mixed_precision": "no"})
    summary = flowalign.train(os.path.join(REPO, "configs/grpo/hunyuan_video15_jpeg.yaml"), overrides,
                              rewards=mean_frame_brightness)
    assert os.path.exists(summary["video_grid"][0])
    assert summary["iterations"] == 2 and sum(calls) >= 2 * 2
    assert os.path.exists(os.path.join(tmp_path, "run", "final", "model_index.json"))
