"""WanImageToVideoAdapter: fidelity to diffusers' WanImageToVideoPipeline (Wan 2.1 I2V with a CLIP image
encoder; Wan 2.2 A14B-style two experts without one), loading, LoRA interop with the official
pipeline's load_lora_weights, and the configs/grpo/wan_i2v_jpeg.yaml recipe on tiny components
(all CPU, offline, random weights)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from flowalign.rollout import BranchSpec, rollout, sample_ode
from tests.conftest import REPO
from tests.tiny_components import VIDEO_GRPO, add_random_lora, assert_same_gradients, denoiser_gradients, grpo_overrides

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from flowalign.pipelines.wan_i2v import WanImageToVideoAdapter, first_frame_mask, to_pil  # noqa: E402
from tests.test_adapter_wan import SIZE, tiny_pipeline, tiny_transformer  # noqa: E402

PROMPTS = ["a red cat runs through the field", "a boat at sunset"]
NEG = ["blurry", "blurry"]


def tiny_i2v_transformer(seed: int, image_dim: int | None, **extra) -> WanTransformer3DModel:
    """diffusers' WanImageToVideoPipeline test transformer: 16 latent + 4 mask + 16 condition channels in."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim, **extra)


def tiny_i2v_pipeline(wan22: bool = False, shift: float = 3.0, expand_timesteps: bool = False) -> WanImageToVideoPipeline:
    """Wan 2.1 I2V (CLIP vision encoder, image_dim=4) or, with ``wan22``, Wan 2.2 A14B I2V (two experts,
    boundary 0.6, no image encoder); tokenizer / UMT5 / VAE from tests/test_adapter_wan.py."""
    t2v = tiny_pipeline()
    parts = dict(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                 scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), expand_timesteps=expand_timesteps)
    if wan22:
        return WanImageToVideoPipeline(transformer=tiny_i2v_transformer(0, None), transformer_2=tiny_i2v_transformer(1, None),
                                       boundary_ratio=0.6, **parts)
    torch.manual_seed(0)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=4, num_hidden_layers=2,
                                                             num_attention_heads=2, image_size=32, intermediate_size=16,
                                                             patch_size=4)).eval()
    return WanImageToVideoPipeline(transformer=tiny_i2v_transformer(0, 4), image_encoder=encoder,
                                   image_processor=CLIPImageProcessor(crop_size=32, size=32), **parts)


def source_image(seed: int, height: int = 20, width: int = 28) -> tuple[torch.Tensor, Image.Image]:
    """A random 8-bit RGB image (not the video size, so the resize is exercised) as the ``[3, H, W]``
    tensor in [0, 1] that flowalign.data.images.load_image gives, and as the PIL image itself."""
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255), Image.fromarray(array)


IMAGES = [source_image(0), source_image(1)]


def pipeline_latents(pipe, prompt, pil, latents, steps, guidance, negative=None, output_type="latent"):
    """The official pipeline on one prompt / image (it takes one image per call)."""
    return pipe(image=pil, prompt=prompt, negative_prompt=negative, height=SIZE["height"], width=SIZE["width"],
                num_frames=SIZE["num_frames"], num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                output_type=output_type, max_sequence_length=SIZE["max_sequence_length"]).frames


@pytest.fixture(autouse=True)
def _guarded_prompt_clean(monkeypatch):
    """diffusers 0.42's pipeline_wan_i2v.basic_clean calls ftfy.fix_text unconditionally (pipeline_wan guards it
    with is_ftfy_available); ftfy is not installed here, so the official I2V pipeline uses pipeline_wan's guarded
    prompt_clean -- the one the adapter uses, identical to the I2V one whenever ftfy is installed."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    monkeypatch.setattr(pipeline_wan_i2v, "prompt_clean", pipeline_wan.prompt_clean)


@pytest.fixture(scope="module")
def wan21() -> WanImageToVideoPipeline:
    return tiny_i2v_pipeline()


@pytest.fixture(scope="module")
def wan22() -> WanImageToVideoPipeline:
    return tiny_i2v_pipeline(wan22=True)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, wan21) -> str:
    path = str(tmp_path_factory.mktemp("tiny-wan-i2v"))
    wan21.save_pretrained(path)
    return path


# -- pure pieces ---------------------------------------------------------------------------------
def test_to_pil_inverts_8bit_loading():
    tensor, pil = IMAGES[0]
    assert np.array_equal(np.asarray(to_pil(tensor)), np.asarray(pil))


def test_first_frame_mask_hand_example():
    mask = first_frame_mask(4, 3, 2, 2)
    assert mask.shape == (1, 4, 3, 2, 2)
    assert mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()


def test_condition_matches_prepare_latents(wan21):
    """Our per-prompt condition rows equal WanImageToVideoPipeline.prepare_latents's condition for each image,
    and the CLIP embeddings its encode_image."""
    adapter = WanImageToVideoAdapter(wan21, **SIZE)
    cond = adapter.encode(PROMPTS, NEG, images=[[IMAGES[0][0]], [IMAGES[1][0]]])
    assert cond.tensors["condition"].shape == (2, 20, 2, 2, 2) and cond.tensors["image_embeds"].shape == (2, 65, 4)
    for key in ("condition", "image_embeds"):  # the negative half shares the image condition
        assert torch.equal(cond.negative[key], cond.tensors[key])
    for i, (_, pil) in enumerate(IMAGES):
        pixels = wan21.video_processor.preprocess(pil, height=16, width=16).to(torch.float32)
        _, ref = wan21.prepare_latents(pixels, 1, 16, 16, 16, SIZE["num_frames"], torch.float32, torch.device("cpu"),
                                       latents=torch.zeros(1, *adapter.latent_shape))
        torch.testing.assert_close(cond.tensors["condition"][i:i + 1], ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(cond.tensors["image_embeds"][i:i + 1], wan21.encode_image(pil, "cpu"), atol=1e-6, rtol=0)


# -- fidelity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("two_experts", [False, True], ids=["wan2.1-i2v-clip", "wan2.2-i2v-two-experts"])
@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_ode_rollout_reproduces_i2v_pipeline(wan21, wan22, two_experts, guidance):
    pipe = wan22 if two_experts else wan21
    adapter = WanImageToVideoAdapter(pipe, **SIZE)
    assert adapter.latent_shape == (16, 2, 2, 2) and adapter.uses_image_embeds is not two_experts
    steps, negative = 3, (NEG if guidance > 1 else None)
    latents = adapter.init_latents(2, torch.Generator().manual_seed(0))
    cond = adapter.encode(PROMPTS, negative, images=[[IMAGES[0][0]], [IMAGES[1][0]]])
    ours = sample_ode(adapter, cond, steps, latents=latents, guidance_scale=guidance)
    ref = torch.cat([pipeline_latents(pipe, PROMPTS[i], IMAGES[i][1], latents[i:i + 1], steps, guidance,
                                      negative=negative[i] if negative else None) for i in range(2)])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    # the rollout engine (zero noise) slices the condition rows and goes through the same transitions
    spec = BranchSpec.flat(steps, 1, 0.0, sampler="flow_grpo", guidance_scale=guidance)
    tree = rollout(adapter, cond, spec, prompts=PROMPTS, generator=torch.Generator().manual_seed(0), decode=False,
                   initial_latents=latents)
    torch.testing.assert_close(tree.leaf_latents, ref, atol=1e-4, rtol=0)
    if guidance > 1:  # the source image matters: swapping the two prompts' images changes the videos
        swapped = adapter.encode(PROMPTS, negative, images=[[IMAGES[1][0]], [IMAGES[0][0]]])
        assert (sample_ode(adapter, swapped, steps, latents=latents, guidance_scale=guidance) - ours).abs().max() > 1e-3


def test_two_expert_routing_is_per_sample_with_condition_rows(wan22):
    """A micro-batch mixing steps above and below the boundary (0.6) sends each row, with its own condition
    row, to its own expert: the low-noise row equals transformer_2 called directly on [x_t, condition]."""
    adapter = WanImageToVideoAdapter(wan22, **SIZE)
    x = torch.randn(2, *adapter.latent_shape)
    emb = adapter.encode(PROMPTS, images=[[IMAGES[0][0]], [IMAGES[1][0]]]).tensors
    sigma = torch.tensor([0.9, 0.3])
    mixed = adapter._velocity(x, sigma, emb)
    direct = [expert(hidden_states=torch.cat([x[i:i + 1], emb["condition"][i:i + 1]], dim=1), timestep=sigma[i:i + 1] * 1000,
                     encoder_hidden_states=emb["prompt_embeds"][i:i + 1], return_dict=False)[0]
              for i, expert in enumerate((wan22.transformer, wan22.transformer_2))]
    torch.testing.assert_close(mixed, torch.cat(direct), atol=1e-6, rtol=0)
    wrong = wan22.transformer(hidden_states=torch.cat([x[1:], emb["condition"][1:]], dim=1), timestep=sigma[1:] * 1000,
                              encoder_hidden_states=emb["prompt_embeds"][1:], return_dict=False)[0]
    assert (wrong - mixed[1:]).abs().max() > 1e-3  # the experts differ, so the routing is really tested


def test_decode_matches_pipeline_video_output(wan21):
    adapter = WanImageToVideoAdapter(wan21, **SIZE)
    latents = adapter.init_latents(1, torch.Generator().manual_seed(1))
    cond = adapter.encode(PROMPTS[:1], images=[[IMAGES[0][0]]])
    video = adapter.decode(sample_ode(adapter, cond, 2, latents=latents))
    assert video.shape == (1, SIZE["num_frames"], 3, SIZE["height"], SIZE["width"])
    ref = pipeline_latents(wan21, PROMPTS[0], IMAGES[0][1], latents, 2, 1.0, output_type="pt")
    torch.testing.assert_close(video, ref.float(), atol=1e-4, rtol=0)


def test_encode_needs_one_image_and_bad_pipelines_are_refused(wan21):
    adapter = WanImageToVideoAdapter(wan21, **SIZE)
    with pytest.raises(ValueError, match="images="):
        adapter.encode(PROMPTS)
    with pytest.raises(ValueError, match="exactly one source image"):
        adapter.encode(PROMPTS[:1], images=[[IMAGES[0][0], IMAGES[1][0]]])
    with pytest.raises(ValueError, match="expand_timesteps"):
        WanImageToVideoAdapter(tiny_i2v_pipeline(wan22=True, expand_timesteps=True), **SIZE)
    no_clip = WanImageToVideoPipeline(tokenizer=wan21.tokenizer, text_encoder=wan21.text_encoder, vae=wan21.vae,
                                      scheduler=wan21.scheduler, transformer=wan21.transformer)
    with pytest.raises(ValueError, match="image_encoder"):
        WanImageToVideoAdapter(no_clip, **SIZE)
    parts = dict(tokenizer=wan21.tokenizer, text_encoder=wan21.text_encoder, vae=wan21.vae, scheduler=wan21.scheduler)
    with pytest.raises(ValueError, match="in_channels=16"):  # a text-to-video transformer
        WanImageToVideoAdapter(WanImageToVideoPipeline(transformer=tiny_transformer(0), **parts), **SIZE)
    flf2v = tiny_i2v_transformer(0, 4, pos_embed_seq_len=2 * 65)
    with pytest.raises(ValueError, match="first-last-frame"):
        WanImageToVideoAdapter(WanImageToVideoPipeline(transformer=flf2v, image_encoder=wan21.image_encoder,
                                                       image_processor=wan21.image_processor, **parts), **SIZE)
    with pytest.raises(TypeError, match="WanImageToVideoPipeline"):
        WanImageToVideoAdapter(tiny_pipeline(), **SIZE)


# -- loading ---------------------------------------------------------------------------------------
def test_from_pretrained_round_trip(saved_dir, wan21, tmp_path):
    adapter = WanImageToVideoAdapter.from_pretrained(saved_dir, embedding_cache_dir=str(tmp_path / "cache"), **SIZE)
    assert adapter.shift == 3.0  # read from the saved scheduler config
    latents = adapter.init_latents(1, torch.Generator().manual_seed(2))
    ours = sample_ode(adapter, adapter.encode(PROMPTS[:1], [""], images=[[IMAGES[1][0]]]), 3, latents=latents,
                      guidance_scale=4.0)
    ref = pipeline_latents(WanImageToVideoPipeline.from_pretrained(saved_dir), PROMPTS[0], IMAGES[1][1], latents, 3, 4.0,
                           negative="")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['frames'\]"):
        WanImageToVideoAdapter.from_pretrained(saved_dir, frames=5)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        WanImageToVideoAdapter.from_pretrained(str(tmp_path))


# -- LoRA interop ----------------------------------------------------------------------------------
def test_lora_round_trips_into_official_pipeline(saved_dir, tmp_path):
    adapter = WanImageToVideoAdapter.from_pretrained(saved_dir, **SIZE)
    add_random_lora(adapter, seed=3)
    latents = adapter.init_latents(1, torch.Generator().manual_seed(4))
    cond = adapter.encode(PROMPTS[:1], [""], images=[[IMAGES[0][0]]])
    ours = sample_ode(adapter, cond, 3, latents=latents, guidance_scale=4.0)
    with adapter.disable_adapter():
        base = sample_ode(adapter, cond, 3, latents=latents, guidance_scale=4.0)
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the policy
    adapter.save_lora_weights(str(tmp_path / "lora"))
    pipe = WanImageToVideoPipeline.from_pretrained(saved_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    ref = pipeline_latents(pipe, PROMPTS[0], IMAGES[0][1], latents, 3, 4.0, negative="")
    torch.testing.assert_close(ref, ours, atol=1e-4, rtol=0)
    # merged save_pretrained reloads the same policy (video size from flowalign_adapter.json)
    adapter.save_pretrained(str(tmp_path / "merged"))
    merged = WanImageToVideoAdapter.from_pretrained(str(tmp_path / "merged"))
    again = sample_ode(merged, merged.encode(PROMPTS[:1], [""], images=[[IMAGES[0][0]]]), 3, latents=latents,
                       guidance_scale=4.0)
    torch.testing.assert_close(again, ours, atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_same_gradients():
    adapter = WanImageToVideoAdapter(tiny_i2v_pipeline(), **SIZE)  # its own copy: the LoRA stays out of the shared one
    add_random_lora(adapter, seed=3)
    x = torch.randn(2, *adapter.latent_shape, generator=torch.Generator().manual_seed(3))
    cond = adapter.encode(PROMPTS, images=[[IMAGES[0][0]], [IMAGES[1][0]]])
    assert_same_gradients(*(denoiser_gradients(adapter, x, torch.tensor([0.8, 0.4]), cond, c) for c in (False, True)))


# -- recipe ----------------------------------------------------------------------------------------
def _image_prompt_file(folder, name: str, prompts: list[str]) -> str:
    """A JSONL prompt file whose records name source images relative to the file's folder."""
    os.makedirs(folder / "frames", exist_ok=True)
    lines = []
    for i, prompt in enumerate(prompts):
        IMAGES[i % 2][1].save(folder / "frames" / f"{i % 2}.png")
        lines.append(json.dumps({"prompt": prompt, "image": f"frames/{i % 2}.png"}))
    (folder / name).write_text("\n".join(lines) + "\n")
    return str(folder / name)


def test_wan_i2v_config_runs_two_iterations(saved_dir, tmp_path):
    import flowalign

    seen = []

    def mean_frame_brightness(media, prompts, metadata=None):
        assert media.ndim == 5 and media.shape[1:] == (SIZE["num_frames"], 3, 16, 16)
        seen.extend(m["image"] for m in metadata)  # the rewards get the source image's path
        return media.mean(dim=(1, 2, 3, 4))

    train = _image_prompt_file(tmp_path, "train.jsonl", ["a cat runs", "a boat at sunset", "a bird flies"])
    evaluation = _image_prompt_file(tmp_path, "eval.jsonl", ["a dog runs"])
    overrides = grpo_overrides(saved_dir, str(tmp_path / "run"), train, evaluation, VIDEO_GRPO,
                               **{"model.options": dict(SIZE)})
    summary = flowalign.train(os.path.join(REPO, "configs/grpo/wan_i2v_jpeg.yaml"), overrides, rewards=mean_frame_brightness)
    assert summary["iterations"] == 2 and len(seen) >= 2 * 2
    assert all(os.path.isabs(p) and os.path.exists(p) for p in seen)
    assert os.path.exists(os.path.join(tmp_path, "run", "final", "model_index.json"))
