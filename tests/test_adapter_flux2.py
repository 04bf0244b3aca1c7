"""FLUX.2 [klein] (and [dev]) adapter against the official diffusers pipelines, with tiny random components
built in memory (diffusers' ``tests/pipelines/flux2`` ``get_dummy_components()`` sizes; tokenizers built offline)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline,
                       Flux2Transformer2DModel)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast, Qwen3ForCausalLM

from flowalign.pipelines.flux2 import (Flux2Adapter, compute_empirical_mu, flow_match_sigmas, latent_ids,
                                       pack_latents, patchify, text_ids, to_vae_latents, unpack_latents, unpatchify)
from flowalign.rollout import BranchSpec, rollout, sample_ode
from tests.tiny_components import (LORA_IMAGE_GRPO, add_random_lora, assert_same_gradients, byte_level_alphabet,
                                   denoiser_gradients, grpo_overrides, qwen3_config, qwen3_tokenizer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red apple on a table", "a small dog"]
RES = 16  # pixels; the tiny VAE has scale factor 1 -> VAE latents [1, 16, 16] -> diffusion latents [4, 8, 8]
OUT_LAYERS = (1, 2)  # the tiny Qwen3 has 2 layers: embeddings are 2 x 16 = 32 wide
MAX_LEN = 48
DEV_MAX_LEN = 224  # Flux2Pipeline prepends its 168-character system message (~170 byte-level tokens here)


# -- tiny components ------------------------------------------------------------------------------
# A minimal Mistral chat template for Flux2Pipeline.format_input's messages (content = a list of text parts).
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% for c in m['content'] %}"
    "{{ c['text'] }}{% endfor %}[/SYSTEM_PROMPT]{% else %}[INST]{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
    "[/INST]{% endif %}{% endfor %}")


def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Mistral's special tokens, built in memory. It stands in for the
    ``PixtralProcessor`` of FLUX.2 [dev] (which needs torchvision): ``Flux2Pipeline`` only calls its
    ``apply_chat_template(..., tokenize=True, return_dict=True)``, which both provide."""
    chars = byte_level_alphabet()
    specials = ["<unk>", "[IMG]", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    merges = [("a", "p"), ("ap", "p"), ("r", "e"), ("d", "o")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": specials[5:]})
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    assert len(tok) == len(vocab)
    return tok


def mistral3_encoder(vocab: int) -> Mistral3ForConditionalGeneration:
    """diffusers' dummy Mistral-3 text encoder (tests/pipelines/flux2), with 2 language layers."""
    text = {"model_type": "mistral", "vocab_size": vocab, "hidden_size": 16, "intermediate_size": 37,
            "max_position_embeddings": 512, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0, "sliding_window": None, "bos_token_id": 2,
            "eos_token_id": 3, "pad_token_id": 4}
    vision = {"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
              "intermediate_size": 37, "image_size": 30, "patch_size": 6, "num_channels": 3}
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision, bos_token_id=2,
                                                           eos_token_id=3, pad_token_id=4, image_seq_length=4,
                                                           vision_feature_layer=-1, image_token_index=1))


def tiny_flux2_vae() -> AutoencoderKLFlux2:
    """diffusers' dummy FLUX.2 VAE, with non-trivial BatchNorm statistics (so the normalisation is tested)."""
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                             latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.05]))
        vae.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5, 0.8]))
    return vae


def tiny_klein_pipeline(tmp: str, dynamic: bool = True, is_distilled: bool = False) -> Flux2KleinPipeline:
    torch.manual_seed(0)
    tok = qwen3_tokenizer(os.path.join(tmp, "qwen-tok"))
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False)
    # FLUX.2's released scheduler config: dynamic (exponential) shifting; diffusers' dummy uses the static default.
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
                 if dynamic else FlowMatchEulerDiscreteScheduler(shift=3.0))
    return Flux2KleinPipeline(scheduler=scheduler, vae=tiny_flux2_vae(), text_encoder=Qwen3ForCausalLM(qwen3_config(len(tok))),
                              tokenizer=tok, transformer=transformer, is_distilled=is_distilled)


def tiny_dev_pipeline() -> Flux2Pipeline:
    torch.manual_seed(0)
    tok = mistral_tokenizer()
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4])
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=tiny_flux2_vae(),
                         text_encoder=mistral3_encoder(len(tok)), tokenizer=tok, transformer=transformer)


def dev(pipe: Flux2Pipeline, **kw) -> Flux2Adapter:
    return Flux2Adapter(pipe, resolution=RES, text_encoder_out_layers=OUT_LAYERS, max_sequence_length=DEV_MAX_LEN, **kw)


def call_dev(pipe, x0: torch.Tensor, steps: int, output_type: str = "latent", **kw) -> torch.Tensor:
    return pipe(prompt=PROMPTS, height=RES, width=RES, num_inference_steps=steps, latents=x0.clone(),
                output_type=output_type, max_sequence_length=DEV_MAX_LEN, text_encoder_out_layers=OUT_LAYERS, **kw).images


def klein(pipe: Flux2KleinPipeline, **kw) -> Flux2Adapter:
    return Flux2Adapter(pipe, resolution=RES, text_encoder_out_layers=OUT_LAYERS, max_sequence_length=MAX_LEN, **kw)


def call_klein(pipe, x0: torch.Tensor, steps: int, output_type: str = "latent", **kw) -> torch.Tensor:
    return pipe(prompt=PROMPTS, height=RES, width=RES, num_inference_steps=steps, latents=x0.clone(),
                output_type=output_type, max_sequence_length=MAX_LEN, text_encoder_out_layers=OUT_LAYERS, **kw).images


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("tiny-flux2-klein"))
    tiny_klein_pipeline(d + "-tok").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("tiny-flux2-dev"))
    tiny_dev_pipeline().save_pretrained(d)
    return d


def _noise(adapter, n: int = 2, seed: int = 0) -> torch.Tensor:
    return adapter.init_latents(n, torch.Generator().manual_seed(seed))


# -- pure functions -------------------------------------------------------------------------------
def test_packing_patchify_and_ids_match_flux2_pipeline():
    x = torch.randn(2, 8, 6, 4)
    packed = pack_latents(x)
    assert torch.equal(packed, Flux2Pipeline._pack_latents(x))
    ids = Flux2Pipeline._prepare_latent_ids(x)
    assert torch.equal(latent_ids(6, 4), ids[0])
    assert torch.equal(unpack_latents(packed, 6, 4), x)
    assert torch.equal(unpack_latents(packed, 6, 4), Flux2Pipeline._unpack_latents_with_ids(packed, ids))
    assert latent_ids(6, 4)[5].tolist() == [0, 1, 1, 0]  # hand-worked: token 5 = row 1, col 1
    assert torch.equal(text_ids(7), Flux2Pipeline._prepare_text_ids(torch.zeros(2, 7, 3))[1])
    assert text_ids(3)[2].tolist() == [0, 0, 0, 2]
    z = torch.randn(2, 3, 6, 4)
    assert torch.equal(patchify(z), Flux2Pipeline._patchify_latents(z))
    assert torch.equal(unpatchify(patchify(z)), z)
    assert torch.equal(unpatchify(patchify(z)), Flux2Pipeline._unpatchify_latents(patchify(z)))
    assert patchify(z)[0, :4, 0, 0].tolist() == z[0, 0, :2, :2].flatten().tolist()  # channel 0's first 2x2 patch


def test_empirical_mu_and_schedule_match_scheduler():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as ref_mu

    for seq, steps in [(64, 4), (4096, 50), (4301, 28), (1024, 10)]:
        assert compute_empirical_mu(seq, steps) == pytest.approx(ref_mu(seq, steps), abs=1e-12)
    assert compute_empirical_mu(5000, 3) == pytest.approx(0.00016927 * 5000 + 0.45666666)  # hand-worked: linear regime
    for cfg in (dict(use_dynamic_shifting=True, time_shift_type="exponential"), dict(shift=3.0)):
        sched = FlowMatchEulerDiscreteScheduler(**cfg)
        for steps, seq in [(4, 64), (28, 4096), (50, 1024)]:
            mu = compute_empirical_mu(seq, steps)
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            torch.testing.assert_close(flow_match_sigmas(sched.config, steps, mu), sched.sigmas, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        flow_match_sigmas(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).config, 4, None)


# -- FLUX.2 [klein] -------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_klein_ode_rollout_reproduces_pipeline(tmp_path, guidance):
    pipe = tiny_klein_pipeline(str(tmp_path))
    adapter = klein(pipe)
    x0 = _noise(adapter)
    cond = adapter.encode(PROMPTS, [""] * 2 if guidance > 1 else None)
    ours = sample_ode(adapter, cond, 4, latents=x0, guidance_scale=guidance)
    ref = call_klein(pipe, x0, 4, guidance_scale=guidance)  # de-normalised, unpatchified VAE latents
    assert ref.shape == (2, 1, RES, RES)
    mine = to_vae_latents(ours, adapter.vae)
    assert ours.abs().max() > 0.1 and torch.allclose(mine, ref, atol=1e-4), (mine - ref).abs().max()
    torch.testing.assert_close(adapter.sigmas(4), pipe.scheduler.sigmas, atol=1e-6, rtol=0)
    # rollout with zero noise is the same ODE
    tree = rollout(adapter, cond[[0]], BranchSpec.flat(4, 2, 0.0, guidance_scale=guidance), prompts=PROMPTS[:1],
                   generator=torch.Generator(), initial_latents=torch.stack([x0[0], x0[0]]), decode=False)
    torch.testing.assert_close(to_vae_latents(tree.leaf_latents, adapter.vae)[0], ref[0], atol=1e-4, rtol=0)
    if guidance == 1.0:
        images = adapter.decode(ours)
        assert images.shape == (2, 3, RES, RES) and 0 <= images.min() and images.max() <= 1
        torch.testing.assert_close(images, call_klein(pipe, x0, 4, output_type="pt", guidance_scale=1.0), atol=1e-4, rtol=0)


def test_klein_static_scheduler_and_options(klein_dir, tmp_path):
    pipe = tiny_klein_pipeline(str(tmp_path), dynamic=False)
    adapter = klein(pipe)
    x0 = _noise(adapter)
    ours = sample_ode(adapter, adapter.encode(PROMPTS), 3, latents=x0)
    torch.testing.assert_close(to_vae_latents(ours, adapter.vae), call_klein(pipe, x0, 3, guidance_scale=1.0), atol=1e-4, rtol=0)
    s = torch.linspace(1, 0, 5)
    torch.testing.assert_close(klein(pipe, shift=3.0).sigmas(4), 3 * s / (1 + 2 * s))
    assert adapter.latent_shape == (4, RES // 2, RES // 2) and adapter.guidance is None and adapter.klein
    assert adapter.out_layers == OUT_LAYERS
    assert Flux2Adapter(pipe, resolution=RES).out_layers == (9, 18, 27)  # the pipeline's default
    with pytest.raises(ValueError, match="guidance=3.5"):
        klein(pipe, guidance=3.5)
    with pytest.raises(ValueError, match="resolution=17"):
        Flux2Adapter.from_pretrained(klein_dir, resolution=17)
    with pytest.raises(ValueError, match="resolutoin"):
        Flux2Adapter.from_pretrained(klein_dir, resolutoin=RES)
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        Flux2Adapter.from_pretrained(str(tmp_path / "missing"))
    distilled = klein(tiny_klein_pipeline(str(tmp_path), is_distilled=True))
    with pytest.raises(ValueError, match="step-distilled"):
        distilled.predict(x0, 0.5, distilled.encode(PROMPTS, ["", ""]), guidance_scale=3.0)
    distilled.save_pretrained(str(tmp_path / "distilled"))  # is_distilled survives the round trip
    reloaded = Flux2Adapter.from_pretrained(str(tmp_path / "distilled"), resolution=RES, text_encoder_out_layers=OUT_LAYERS)
    assert reloaded.pipe.config.is_distilled and not reloaded.cfg_allowed and adapter.cfg_allowed


def test_klein_loads_from_disk_with_embedding_cache(klein_dir, tmp_path):
    loaded = Flux2Adapter.from_pretrained(klein_dir, resolution=RES, text_encoder_out_layers=list(OUT_LAYERS),
                                          max_sequence_length=MAX_LEN, embedding_cache_dir=str(tmp_path / "cache"))
    ref_pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    x0 = _noise(loaded)
    ours = sample_ode(loaded, loaded.encode(PROMPTS), 3, latents=x0)
    torch.testing.assert_close(to_vae_latents(ours, loaded.vae), call_klein(ref_pipe, x0, 3, guidance_scale=1.0),
                               atol=1e-4, rtol=0)
    assert len(os.listdir(tmp_path / "cache")) == 2
    torch.testing.assert_close(loaded.encode(PROMPTS).tensors["prompt_embeds"],
                               ref_pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_LEN,
                                                      text_encoder_out_layers=OUT_LAYERS)[0])


# -- FLUX.2 [dev] ---------------------------------------------------------------------------------
def test_dev_ode_rollout_reproduces_pipeline(tmp_path):
    pipe = tiny_dev_pipeline()
    adapter = dev(pipe, guidance=2.5)
    assert not adapter.klein and adapter.guidance == 2.5 and dev(pipe).guidance == 4.0
    x0 = _noise(adapter)
    cond = adapter.encode(PROMPTS)
    assert not torch.equal(cond.tensors["prompt_embeds"][0], cond.tensors["prompt_embeds"][1])  # prompts not truncated away
    ours = sample_ode(adapter, cond, 4, latents=x0)
    out = call_dev(pipe, x0, 4, guidance_scale=2.5)  # packed tokens [B, h/2 * w/2, 4C]
    ref = unpack_latents(out, *adapter.latent_shape[1:])
    assert ours.abs().max() > 0.1 and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    other = call_dev(pipe, x0, 4, guidance_scale=5.0)
    assert (unpack_latents(other, *adapter.latent_shape[1:]) - ref).abs().max() > 1e-3  # the guidance input matters
    torch.testing.assert_close(adapter.sigmas(4), pipe.scheduler.sigmas, atol=1e-6, rtol=0)
    torch.testing.assert_close(adapter.decode(ours), call_dev(pipe, x0, 4, output_type="pt", guidance_scale=2.5),
                               atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="guidance-distilled"):
        adapter.predict(x0, 0.5, adapter.encode(PROMPTS, ["", ""]), guidance_scale=3.0)
    pipe.save_pretrained(str(tmp_path / "dev"))  # the variant follows model_index.json
    loaded = Flux2Adapter.from_pretrained(str(tmp_path / "dev"), resolution=RES, text_encoder_out_layers=OUT_LAYERS,
                                          max_sequence_length=DEV_MAX_LEN, guidance=2.5)
    assert isinstance(loaded.pipe, Flux2Pipeline)
    torch.testing.assert_close(sample_ode(loaded, loaded.encode(PROMPTS), 4, latents=x0), ref, atol=1e-4, rtol=0)


def test_klein_lora_round_trips_into_official_pipeline(klein_dir, tmp_path):
    adapter = Flux2Adapter.from_pretrained(klein_dir, resolution=RES, text_encoder_out_layers=OUT_LAYERS,
                                           max_sequence_length=MAX_LEN)
    x0 = _noise(adapter)
    cond = adapter.encode(PROMPTS)
    before = sample_ode(adapter, cond, 2, latents=x0)
    add_random_lora(adapter)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in adapter.denoiser.named_parameters() if ".lora_A" in n}
    assert any("single_transformer_blocks.0.attn.to_out" in n for n in wrapped) and any("to_qkv_mlp_proj" in n for n in wrapped)
    lora_out = sample_ode(adapter, cond, 2, latents=x0)
    assert (lora_out - before).abs().max() > 1e-3  # the LoRA changes the policy
    adapter.save_lora_weights(str(tmp_path / "lora"))
    official = Flux2KleinPipeline.from_pretrained(klein_dir)
    official.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(to_vae_latents(lora_out, adapter.vae), call_klein(official, x0, 2, guidance_scale=1.0),
                               atol=1e-4, rtol=0)
    with adapter.disable_adapter():  # the reference policy is the base model
        torch.testing.assert_close(sample_ode(adapter, cond, 2, latents=x0), before, atol=1e-5, rtol=0)
    adapter.save_pretrained(str(tmp_path / "merged"))  # LoRA merged: the reloaded plain model reproduces it
    merged = Flux2Adapter.from_pretrained(str(tmp_path / "merged"), resolution=RES, text_encoder_out_layers=OUT_LAYERS,
                                          max_sequence_length=MAX_LEN)
    assert not merged.has_lora() and merged.klein
    torch.testing.assert_close(sample_ode(merged, merged.encode(PROMPTS), 2, latents=x0), lora_out, atol=1e-4, rtol=0)


def test_klein_gradient_checkpointing_gives_same_gradients(tmp_path):
    grads = []
    for checkpointing in (False, True):
        adapter = klein(tiny_klein_pipeline(str(tmp_path)))
        grads.append(denoiser_gradients(adapter, _noise(adapter), torch.tensor([0.7, 0.3]), adapter.encode(PROMPTS),
                                        checkpointing))
    assert_same_gradients(*grads)


def test_dev_lora_round_trips_into_official_pipeline(dev_dir, tmp_path):
    """FLUX.2 [dev] (Mistral-3 encoder, guidance-distilled): our LoRA file loads into ``Flux2Pipeline``."""
    adapter = Flux2Adapter.from_pretrained(dev_dir, resolution=RES, text_encoder_out_layers=OUT_LAYERS,
                                           max_sequence_length=DEV_MAX_LEN, guidance=2.5)
    x0 = _noise(adapter)
    cond = adapter.encode(PROMPTS)
    before = sample_ode(adapter, cond, 2, latents=x0)
    add_random_lora(adapter)
    lora_out = sample_ode(adapter, cond, 2, latents=x0)
    assert (lora_out - before).abs().max() > 1e-3  # the LoRA changes the policy
    adapter.save_lora_weights(str(tmp_path / "lora"))
    official = Flux2Pipeline.from_pretrained(dev_dir)
    official.load_lora_weights(str(tmp_path / "lora"))
    ref = unpack_latents(call_dev(official, x0, 2, guidance_scale=2.5), *adapter.latent_shape[1:])
    torch.testing.assert_close(lora_out, ref, atol=1e-4, rtol=0)
    with adapter.disable_adapter():  # the reference policy is the base model
        torch.testing.assert_close(sample_ode(adapter, cond, 2, latents=x0), before, atol=1e-5, rtol=0)


def test_dev_gradient_checkpointing_gives_same_gradients():
    """[dev] passes the guidance embedding through the checkpointed blocks too."""
    grads = []
    for checkpointing in (False, True):
        adapter = dev(tiny_dev_pipeline(), guidance=2.5)
        assert adapter.guidance == 2.5
        grads.append(denoiser_gradients(adapter, _noise(adapter), torch.tensor([0.7, 0.3]), adapter.encode(PROMPTS),
                                        checkpointing))
    assert_same_gradients(*grads)


# -- recipes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["flux2_klein_pickscore.yaml", "flux2_dev_clip_pickscore.yaml"])
def test_grpo_config_runs_two_iterations(config, klein_dir, dev_dir, prompt_files, tmp_path):
    """The shipped config with overrides: real recipe, tiny saved components, CPU."""
    import flowalign

    is_dev = "dev" in config
    train, evaluation = prompt_files
    options = {"resolution": RES, "max_sequence_length": DEV_MAX_LEN if is_dev else 32,
               "text_encoder_out_layers": list(OUT_LAYERS), "embedding_cache_dir": str(tmp_path / "cache")}
    # PickScore / CLIP need hub weights: the rewards are swapped for JPEG compressibility (offline, CPU)
    rewards = [{"_component_": "jpeg_compressibility", "weight": 1.0}]
    if is_dev:  # multi_reward keeps two rewards
        rewards.append({"_component_": "jpeg_incompressibility", "weight": 0.5})
    overrides = grpo_overrides(dev_dir if is_dev else klein_dir, str(tmp_path / "run"), train, evaluation,
                               LORA_IMAGE_GRPO, rewards=rewards, **{"model.options": options, "sampling.sde_window": [1, 3]})
    summary = flowalign.train(os.path.join(REPO, "configs/grpo", config), overrides)
    assert summary["iterations"] == 2 and np.isfinite(summary["after"]["eval/reward"])
    assert os.path.exists(tmp_path / "run" / "final" / "model_index.json")
    assert os.path.exists(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
