"""CLIP-family rewards (PickScore, CLIP score, LAION aesthetic, HPSv2/2.1): tiny random checkpoints
saved in the released layouts, loaded through the real code paths, checked against independent
computations (transformers' own processor / get_*_features, a from-scratch open_clip forward)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowalign.rewards._media import to_pil_images
from flowalign.rewards.aesthetic import AestheticMLP, LaionAesthetic
from flowalign.rewards.clip_models import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec, clip_pixel_values,
                                           load_clip_tokenizer, resolve_file, write_tiny_clip, write_tiny_tokenizer)
from flowalign.rewards.clip_score import ClipScore, clip_score_from_features
from flowalign.rewards.hps import HPSv2, HPSv21, openclip_to_transformers, transformers_to_openclip
from flowalign.rewards.pickscore import PickScore

PROMPTS = ["a photo of a cat", "abc", "A Very LONG prompt " * 30]


def _media(n: int = 3, h: int = 40, w: int = 52, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _features(output) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, transformers 5 a ModelOutput."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _reference_clip_features(model, directory, media, prompts):
    """Image / text features through transformers' own PIL processor and get_*_features,
    with PickScore's ``padding=True`` (pad to the longest prompt)."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pixels = CLIPImageProcessorPil.from_pretrained(directory)(to_pil_images(media), return_tensors="pt")["pixel_values"]
    enc = CLIPTokenizer.from_pretrained(directory)(prompts, padding=True, truncation=True, max_length=77,
                                                   return_tensors="pt")
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=pixels))
        txt = _features(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def tiny_rewards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("clip-rewards")
    return {cls.__name__: cls.tiny(str(root / cls.__name__)) for cls in (PickScore, ClipScore, LaionAesthetic, HPSv2, HPSv21)}


# ---------------------------------------------------------------- tokenizer and preprocessing

def test_tiny_tokenizer_has_full_vocab(tmp_path):
    n = write_tiny_tokenizer(str(tmp_path))
    tok = load_clip_tokenizer(str(tmp_path))
    assert n == len(tok) == 2 * 256 + 5 + 2
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, n - 2, n - 1)
    ids = tok(["abc"])["input_ids"][0]
    assert ids == [n - 2, tok.convert_tokens_to_ids("abc</w>"), n - 1]  # the merges apply


def test_empty_tokenizer_is_rejected(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    with pytest.raises(ValueError, match="only .* tokens"):
        load_clip_tokenizer(str(tmp_path))


@pytest.mark.parametrize("hw", [(40, 52), (300, 257), (224, 224), (17, 90)])
def test_pixel_values_match_transformers_clip_processor(hw):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    media = _media(2, *hw, seed=hw[0])
    ours = clip_pixel_values(media, ImageSpec())
    ref = CLIPImageProcessorPil()(to_pil_images(media), return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_default_spec_is_the_clip_processor_constants():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil()
    spec = ImageSpec()
    assert spec.mean == OPENAI_CLIP_MEAN == tuple(proc.image_mean)
    assert spec.std == OPENAI_CLIP_STD == tuple(proc.image_std)
    assert (spec.size, spec.crop_size) == (proc.size["shortest_edge"], proc.crop_size["height"]) == (224, 224)


def test_spec_reads_the_released_legacy_processor_config(tmp_path):
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json (old feature-extractor format, int sizes).
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "resample": 3, "size": 224}))
    assert ImageSpec.from_pretrained(str(tmp_path)) == ImageSpec()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 224, "crop_size": 224, "resample": 2}))
    with pytest.raises(ValueError, match="bicubic"):
        ImageSpec.from_pretrained(str(tmp_path))


def test_crop_rounding_hand_worked():
    # A 4-wide, 5-tall image whose pixel value is its row index; crop 2: excess 3 rows.
    rows = np.repeat(np.arange(5, dtype=np.uint8)[:, None], 4, axis=1)
    media = torch.from_numpy(np.stack([rows] * 3)).float()[None] / 255.0
    kw = dict(size=4, crop_size=2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    floor = clip_pixel_values(media, ImageSpec(**kw, crop_rounding="floor"))[0, 0] * 255
    rnd = clip_pixel_values(media, ImageSpec(**kw, crop_rounding="round"))[0, 0] * 255
    torch.testing.assert_close(floor, torch.tensor([[1.0, 1.0], [2.0, 2.0]]))  # 3 // 2 = 1
    torch.testing.assert_close(rnd, torch.tensor([[2.0, 2.0], [3.0, 3.0]]))  # round(1.5) = 2


def test_image_spec_validation():
    with pytest.raises(ValueError, match="crop_size"):
        ImageSpec(size=10, crop_size=20)
    with pytest.raises(ValueError, match="crop_rounding"):
        ImageSpec(crop_rounding="ceil")


# ---------------------------------------------------------------- PickScore / CLIP score

def test_pickscore_equals_formula_from_raw_model_outputs(tmp_path):
    d = str(tmp_path / "ps")
    model = write_tiny_clip(d, seed=7, hidden_act="gelu")
    reward = PickScore(path=d, processor_path=d)
    media = _media()
    out = reward(media, PROMPTS)
    img, txt = _reference_clip_features(model, d, media, PROMPTS)
    raw = model.logit_scale.exp() * (txt @ img.T).diag()  # PickScore README / Flow-GRPO pickscore_scorer.py
    torch.testing.assert_close(out.components["pickscore"], raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.scores, raw / 26, atol=1e-6, rtol=1e-5)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(np.exp(3.0))  # the saved temperature was used
    raw_reward = PickScore(path=d, processor_path=d, divisor=1)
    torch.testing.assert_close(raw_reward(media, PROMPTS).scores, raw, atol=1e-5, rtol=1e-5)


def test_pickscore_legacy_eos_config(tmp_path):
    """PickScore_v1's config.json predates transformers PR #24773 (text eos_token_id = 2: EOS found by
    argmax of the ids); the score must equal the one with the real EOS id."""
    d = str(tmp_path / "ps")
    write_tiny_clip(d, seed=7, hidden_act="gelu")
    media = _media(seed=2)
    expected = PickScore(path=d, processor_path=d)(media, PROMPTS).scores
    config = json.loads((tmp_path / "ps" / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2
    (tmp_path / "ps" / "config.json").write_text(json.dumps(config))
    legacy = PickScore(path=d, processor_path=d)
    assert legacy.features.model.config.text_config.eos_token_id == 2
    torch.testing.assert_close(legacy(media, PROMPTS).scores, expected, atol=1e-6, rtol=1e-5)


def test_clip_score_formula_hand_worked():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[0.6, 0.8], [-0.6, 0.8]])
    score, cos = clip_score_from_features(img, txt, scale=2.5, clamp=True)  # Hessel et al. Eq. 1
    torch.testing.assert_close(cos, torch.tensor([0.6, -0.6]))
    torch.testing.assert_close(score, torch.tensor([1.5, 0.0]))
    score, _ = clip_score_from_features(img, txt, scale=100.0, clamp=False)
    torch.testing.assert_close(score, torch.tensor([60.0, -60.0]))


def test_clip_score_equals_formula_from_raw_model_outputs(tmp_path):
    d = str(tmp_path / "cs")
    model = write_tiny_clip(d, seed=9)
    media = _media(seed=3)
    img, txt = _reference_clip_features(model, d, media, PROMPTS)
    cos = (img * txt).sum(-1)
    assert (cos < 0).any() and (cos > 0).any(), "seed should give both signs so the clamp is exercised"
    torch.testing.assert_close(ClipScore(path=d)(media, PROMPTS).scores, 100 * cos.clamp_min(0), atol=1e-4, rtol=1e-5)
    unclamped = ClipScore(path=d, scale=2.5, clamp=False)(media, PROMPTS)
    torch.testing.assert_close(unclamped.scores, 2.5 * cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unclamped.components["cosine"], cos, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- LAION aesthetic

class _ReleasedMLP(nn.Module):
    """improved-aesthetic-predictor simple_inference.py ``MLP`` (layers only), written independently."""

    def __init__(self, input_size):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def test_aesthetic_loads_released_head_layout_and_matches_reference(tmp_path):
    d = str(tmp_path / "clip")
    model = write_tiny_clip(d, seed=9)
    torch.manual_seed(10)
    head = _ReleasedMLP(model.config.projection_dim).eval()
    state = head.state_dict()
    assert sorted(state) == sorted(f"layers.{i}.{k}" for i in (0, 2, 4, 6, 7) for k in ("weight", "bias"))
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = LaionAesthetic(head_path=str(tmp_path), head_filename="sac+logos+ava1-l14-linearMSE.pth", clip_path=d)
    media = _media(seed=4)
    img, _ = _reference_clip_features(model, d, media, PROMPTS)
    with torch.no_grad():
        expected = head(img).squeeze(1)  # simple_inference.py: model(normalized(image_features))
    torch.testing.assert_close(reward(media, PROMPTS).scores, expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_rejects_wrong_head(tmp_path):
    d = str(tmp_path / "clip")
    write_tiny_clip(d, seed=9)
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="layers.0.weight"):
        LaionAesthetic(head_path=str(tmp_path / "bad.pth"), clip_path=d)
    torch.save(AestheticMLP(768).state_dict(), tmp_path / "l14.pth")  # ViT-L/14 head on a 16-d CLIP
    with pytest.raises(ValueError, match="768-d"):
        LaionAesthetic(head_path=str(tmp_path / "l14.pth"), clip_path=d)


def test_resolve_file(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"x")
    assert resolve_file(str(tmp_path / "w.pt"), "ignored") == str(tmp_path / "w.pt")
    assert resolve_file(str(tmp_path), "w.pt") == str(tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="other.pt"):
        resolve_file(str(tmp_path), "other.pt")
    with pytest.raises(FileNotFoundError, match="flowalign-test/no-such-repo"):
        resolve_file("flowalign-test/no-such-repo", "w.pt")  # HF_HUB_OFFLINE=1: fails fast


# ---------------------------------------------------------------- HPSv2: open_clip key map

def _oc_block(x, sd, p, heads, causal):
    """open_clip ResidualAttentionBlock (transformer.py): x + attn(ln_1(x)); x + mlp(ln_2(x)), nn.GELU."""
    width = x.shape[-1]
    mha = nn.MultiheadAttention(width, heads, batch_first=True)
    mha.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"], "in_proj_bias": sd[p + "attn.in_proj_bias"],
                         "out_proj.weight": sd[p + "attn.out_proj.weight"], "out_proj.bias": sd[p + "attn.out_proj.bias"]})
    h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    length = x.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1) if causal else None
    x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                 sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x + h


def _oc_encode_image(sd, pixels, heads, layers):
    """open_clip VisionTransformer.forward: conv1, [cls; patches] + pos, ln_pre, blocks, ln_post(cls) @ proj."""
    conv = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(layers):
        x = _oc_block(x, sd, f"visual.transformer.resblocks.{i}.", heads, causal=False)
    x = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return x @ sd["visual.proj"]


def _oc_encode_text(sd, ids, heads, layers):
    """open_clip CLIP.encode_text: tokens + pos, causal blocks, ln_final, x[eot = argmax id] @ text_projection."""
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    for i in range(layers):
        x = _oc_block(x, sd, f"transformer.resblocks.{i}.", heads, causal=True)
    x = F.layer_norm(x, x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


def test_inverse_key_map_hand_checked(tmp_path):
    model = write_tiny_clip(str(tmp_path / "m"), seed=11, hidden_act="gelu")
    hf = model.state_dict()
    oc = transformers_to_openclip(hf)
    block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias"]
    expected = {"visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight", "visual.ln_pre.weight",
                "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj",
                "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                "text_projection", "logit_scale"}
    expected |= {f"{t}transformer.resblocks.{i}.{k}" for t in ("visual.", "") for i in range(2) for k in block}
    assert set(oc) == expected
    q, k, v = (hf[f"vision_model.encoder.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(oc["visual.transformer.resblocks.0.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(oc["transformer.resblocks.1.attn.in_proj_bias"][32:64],
                       hf["text_model.encoder.layers.1.self_attn.k_proj.bias"])
    assert oc["visual.proj"].shape == (48, 16) and torch.equal(oc["visual.proj"], hf["visual_projection.weight"].T)
    assert torch.equal(oc["text_projection"], hf["text_projection.weight"].T)
    assert torch.equal(oc["positional_embedding"], hf["text_model.embeddings.position_embedding.weight"])
    assert torch.equal(oc["visual.conv1.weight"], hf["vision_model.embeddings.patch_embedding.weight"])
    assert torch.equal(oc["transformer.resblocks.1.mlp.c_fc.bias"], hf["text_model.encoder.layers.1.mlp.fc1.bias"])
    assert float(oc["logit_scale"]) == 3.0
    back = openclip_to_transformers(oc)
    assert set(back) == set(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


def test_key_map_prefixes_and_errors():
    sd = {"module.logit_scale": torch.tensor(1.0), "attn_mask": torch.zeros(2, 2)}
    assert set(openclip_to_transformers(sd)) == {"logit_scale"}
    with pytest.raises(ValueError, match="visual.attn_pool.query"):
        openclip_to_transformers({"visual.attn_pool.query": torch.zeros(1)})
    with pytest.raises(ValueError, match="resblocks.0.ls_1.gamma"):
        openclip_to_transformers({"transformer.resblocks.0.ls_1.gamma": torch.zeros(1)})


def test_hps_equals_open_clip_forward_on_the_checkpoint(tmp_path):
    reward = HPSv2.tiny(str(tmp_path))
    sd = torch.load(reward.file, weights_only=True)["state_dict"]  # open_clip layout, as released
    media, prompts = _media(3, 32, 35, seed=5), PROMPTS  # excess 3 columns: torchvision crops at 2, not 1
    pixels = clip_pixel_values(media, ImageSpec(32, 32, crop_rounding="round"))
    ids = reward.features.tokenizer(prompts, padding="max_length", truncation=True, max_length=77,
                                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = F.normalize(_oc_encode_image(sd, pixels, heads=4, layers=2), dim=-1)
        txt = F.normalize(_oc_encode_text(sd, ids, heads=4, layers=2), dim=-1)
    expected = (img @ txt.T).diag()  # hpsv2/img_score.py: diag(image_features @ text_features.T)
    torch.testing.assert_close(reward(media, prompts).scores, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(HPSv2(path=reward.file, processor_path=os.path.dirname(reward.file), vision_heads=4,
                                     text_heads=4)(media, prompts).scores, expected, atol=1e-5, rtol=1e-5)


def test_hps_rejects_wrong_heads(tmp_path):
    reward = HPSv2.tiny(str(tmp_path))
    with pytest.raises(ValueError, match="vision_heads=5"):
        HPSv2(path=reward.file, processor_path=os.path.dirname(reward.file), vision_heads=5, text_heads=4)


# ---------------------------------------------------------------- the reward contract, all five

@pytest.mark.parametrize("name", ["PickScore", "ClipScore", "LaionAesthetic", "HPSv2", "HPSv21"])
def test_contract_shapes_determinism_batch_invariance(tiny_rewards, name):
    reward = tiny_rewards[name]
    assert reward.modality == "image" and isinstance(reward.name, str)
    media = _media(3, 33, 47, seed=6)
    out = reward(media, PROMPTS)
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32 and out.scores.device == media.device
    assert torch.isfinite(out.scores).all()
    torch.testing.assert_close(reward(media, PROMPTS).scores, out.scores, atol=0, rtol=0)
    one_by_one = torch.cat([reward(media[i:i + 1], PROMPTS[i:i + 1]).scores for i in range(3)])
    torch.testing.assert_close(one_by_one, out.scores, atol=1e-6, rtol=1e-5)
    reward.features.batch_size = 2  # chunked forward passes give the same numbers
    try:
        torch.testing.assert_close(reward(media, PROMPTS).scores, out.scores, atol=1e-6, rtol=1e-5)
    finally:
        reward.features.batch_size = 16
    assert not any(p.requires_grad for p in reward.features.model.parameters())
    assert not reward.features.model.training


@pytest.mark.parametrize("name", ["PickScore", "ClipScore", "HPSv2"])
def test_bad_input_is_named(tiny_rewards, name):
    reward = tiny_rewards[name]
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(_media(), PROMPTS[:2])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        reward(_media() * 2 - 1, PROMPTS)
    with pytest.raises(ValueError, match="shape"):
        reward(_media()[0], PROMPTS[:1])


def test_constructor_arguments_are_checked(tmp_path):
    d = str(tmp_path / "m")
    write_tiny_clip(d)
    with pytest.raises(ValueError, match="divisor"):
        PickScore(path=d, processor_path=d, divisor=0)
    with pytest.raises(ValueError, match="scale"):
        ClipScore(path=d, scale=float("nan"))
    with pytest.raises(ValueError, match="dtype"):
        ClipScore(path=d, dtype="float33")
    with pytest.raises(ValueError, match="batch_size"):
        ClipScore(path=d, batch_size=0)


def test_built_by_dotted_path_from_a_config(tmp_path):
    from flowalign.rewards.registry import build_reward

    d = str(tmp_path / "m")
    write_tiny_clip(d)
    reward = build_reward({"_component_": "flowalign.rewards.pickscore:PickScore", "path": d, "processor_path": d,
                           "divisor": 1.0})
    assert isinstance(reward, PickScore) and reward.divisor == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [PickScore, ClipScore, LaionAesthetic, HPSv21])
def test_cuda_matches_cpu(tmp_path, cls):
    cpu = cls.tiny(str(tmp_path / "cpu"))
    gpu = cls.tiny(str(tmp_path / "gpu"), device="cuda")
    media = _media(seed=12)
    expected = cpu(media, PROMPTS).scores
    out = gpu(media.cuda(), PROMPTS).scores
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)
