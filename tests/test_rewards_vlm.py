"""Tests of ImageReward (BLIP key map), the groupwise wrappers, the GenEval-style checks and the
pairwise VLM judge (a tiny random LLaVA, and an OpenAI-compatible server on 127.0.0.1).

Every model is a tiny random checkpoint saved in its original layout and loaded through the real
loading path; nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flowalign.rewards._media import to_pil_images, to_uint8
from flowalign.rewards.base import RewardOutput
from flowalign.rewards.geneval import (COLORS, Detection, GenEvalReward, evaluate_requirements, nms,
                                       relative_position)
from flowalign.rewards.groupwise import GroupwiseRank, PairwiseAsPointwise, group_ids, win_rates
from flowalign.rewards.image_reward import (CLIP_MEAN, CLIP_STD, REWARD_MEAN, REWARD_STD,
                                            ImageReward, hf_to_original_key, original_to_hf_key,
                                            preprocess_images)
from flowalign.rewards.vlm_judge import DEFAULT_EDIT_QUESTION, VLMJudge, parse_choice

PROMPTS = ["a red dog", "two cats", "the blue car", "a photo of a cat"]


def _images(n: int, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# ImageReward

@pytest.fixture(scope="module")
def image_reward(tmp_path_factory) -> ImageReward:
    return ImageReward.tiny(str(tmp_path_factory.mktemp("image-reward")))


def test_image_reward_key_map_hand_examples():
    assert original_to_hf_key("blip.visual_encoder.cls_token") == ("vision", "embeddings.class_embedding")
    assert original_to_hf_key("blip.visual_encoder.pos_embed") == ("vision", "embeddings.position_embedding")
    assert original_to_hf_key("blip.visual_encoder.patch_embed.proj.weight") == ("vision", "embeddings.patch_embedding.weight")
    assert original_to_hf_key("blip.visual_encoder.blocks.11.attn.proj.bias") == ("vision", "encoder.layers.11.self_attn.projection.bias")
    assert original_to_hf_key("blip.visual_encoder.blocks.0.norm2.weight") == ("vision", "encoder.layers.0.layer_norm2.weight")
    assert original_to_hf_key("blip.visual_encoder.norm.bias") == ("vision", "post_layernorm.bias")
    assert original_to_hf_key("blip.text_encoder.encoder.layer.3.crossattention.self.key.weight") == (
        "text", "encoder.layer.3.crossattention.self.key.weight")
    assert original_to_hf_key("mlp.layers.7.bias") == ("mlp", "layers.7.bias")
    for unused in ("blip.vision_proj.weight", "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"):
        assert original_to_hf_key(unused) is None
    with pytest.raises(KeyError, match="blocks.0.attn.weird"):
        original_to_hf_key("blip.visual_encoder.blocks.0.attn.weird.weight")
    assert hf_to_original_key("vision", "encoder.layers.2.self_attn.qkv.weight") == "blip.visual_encoder.blocks.2.attn.qkv.weight"


def test_image_reward_checkpoint_layout_round_trips(image_reward, tmp_path_factory):
    saved = torch.load(image_reward.checkpoint, weights_only=True)
    assert any(k.startswith("blip.visual_encoder.blocks.") for k in saved)  # the released layout, not transformers'
    ours = image_reward.original_state_dict()
    assert set(ours) == {k for k in saved if original_to_hf_key(k) is not None}
    for key, value in ours.items():
        assert torch.equal(value, saved[key]), key


def _manual_blip_vit(state: dict, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """BLIP ``vit.py`` VisionTransformer forward written from the released keys (timm block layout)."""
    p = {k[len("blip.visual_encoder."):]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
    x = F.conv2d(pixels, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=p["patch_embed.proj.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), x], 1) + p["pos_embed"]
    b, n, c = x.shape
    blocks = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("blocks."))
    for i in range(blocks):
        q = lambda name: p[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (c,), q("norm1.weight"), q("norm1.bias"), eps=1e-6)
        qkv = F.linear(h, q("attn.qkv.weight"), q("attn.qkv.bias")).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1)) * (c // heads) ** -0.5
        h = (att.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, c)
        x = x + F.linear(h, q("attn.proj.weight"), q("attn.proj.bias"))
        h = F.layer_norm(x, (c,), q("norm2.weight"), q("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, q("mlp.fc1.weight"), q("mlp.fc1.bias"))), q("mlp.fc2.weight"), q("mlp.fc2.bias"))
    return F.layer_norm(x, (c,), p["norm.weight"], p["norm.bias"], eps=1e-6)


def test_image_reward_matches_manual_blip_forward(image_reward):
    """Vision tower and MLP recomputed by hand from the saved released-layout checkpoint."""
    state = torch.load(image_reward.checkpoint, weights_only=True)
    media = _images(3)
    pixels = preprocess_images(to_pil_images(media))
    embeds = _manual_blip_vit(state, pixels, heads=2)
    torch.testing.assert_close(image_reward.vision(pixel_values=pixels).last_hidden_state, embeds, rtol=1e-4, atol=1e-5)
    prompts = PROMPTS[:3]
    tok = image_reward.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok.input_ids.shape == (3, 35)
    feat = image_reward.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=embeds,
                             encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
    for idx in (0, 2, 4, 6, 7):  # ImageReward.py MLP: Linear layers only, no activations
        feat = F.linear(feat, state[f"mlp.layers.{idx}.weight"], state[f"mlp.layers.{idx}.bias"])
    expected = (feat.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    out = image_reward(media, prompts)
    torch.testing.assert_close(out.scores, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.components["raw"], feat.squeeze(-1), rtol=1e-4, atol=1e-5)
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)


def test_image_reward_contract_and_prompt_sensitivity(image_reward):
    media = _images(4)
    out = image_reward(media, PROMPTS)
    assert out.scores.shape == (4,) and out.scores.dtype == torch.float32 and torch.isfinite(out.scores).all()
    assert torch.equal(out.scores, image_reward(media, PROMPTS).scores)
    singles = torch.cat([image_reward(media[i:i + 1], PROMPTS[i:i + 1]).scores for i in range(4)])
    torch.testing.assert_close(singles, out.scores, rtol=1e-4, atol=1e-5)
    same_image = image_reward(media[:1].expand(4, -1, -1, -1).contiguous(), PROMPTS).scores
    assert same_image.unique().numel() > 1  # the prompt reaches the score
    assert len(image_reward.tokenizer) == image_reward.text.config.vocab_size
    assert image_reward.tokenizer.tokenize("a red dog") == ["a", "red", "dog"]


def test_image_reward_preprocessing_matches_torchvision_arithmetic():
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    expected = (torch.from_numpy(np.array(square)).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(preprocess_images([square])[0], expected)
    wide = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))  # W=300, H=200
    # Resize(224): shorter side 200 -> 224, longer int(224 * 300 / 200) = 336; CenterCrop: left round(112/2) = 56
    hand = wide.resize((336, 224), Image.Resampling.BICUBIC).crop((56, 0, 280, 224))
    expected = (torch.from_numpy(np.array(hand)).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(preprocess_images([wide])[0], expected)


def test_image_reward_bad_inputs(image_reward, tmp_path):
    with pytest.raises(FileNotFoundError, match="'ImageReward.pt' not found in directory"):
        ImageReward(str(tmp_path))
    from transformers import BertTokenizer

    small = tmp_path / "tok"
    BertTokenizer(vocab={"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}).save_pretrained(str(small))
    with pytest.raises(ValueError, match="tokens but the checkpoint"):
        ImageReward(image_reward.checkpoint, tokenizer=str(small))
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        image_reward(_images(2), PROMPTS[:3])


# ---------------------------------------------------------------------------------------------
# Groupwise ranking and pairwise win rates

def test_win_rates_hand_worked_and_equal_average_rank():
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0])
    torch.testing.assert_close(win_rates(scores, torch.zeros(4, dtype=torch.long)), torch.tensor([1.0, 0.0, 0.5, 0.5]))
    from scipy.stats import rankdata

    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 5, (24,), generator=g).float()  # many ties
    groups = torch.arange(24) % 3  # interleaved groups of 8
    out = win_rates(s, groups)
    for k in range(3):
        m = groups == k
        expected = (rankdata(s[m].numpy(), method="average") - 1) / (m.sum().item() - 1)
        torch.testing.assert_close(out[m], torch.tensor(expected, dtype=torch.float32))


def test_group_ids_sources_and_errors():
    assert group_ids(4, 2, None).tolist() == [0, 0, 1, 1]
    meta = [{"group": "x"}, {"group": "y"}, {"group": "x"}]
    assert group_ids(3, None, meta).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match=r"missing for samples \[1\]"):
        group_ids(2, None, [{"group": 0}, {}])
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        group_ids(4, 3, None)
    with pytest.raises(ValueError, match="give group_size"):
        group_ids(4, None, None)


def _brightness(media, prompts, metadata=None):
    return media.mean(dim=(1, 2, 3))


def test_groupwise_rank_wraps_a_pointwise_reward():
    media = _images(6, 8, 8)
    reward = GroupwiseRank(_brightness, group_size=3)
    assert reward.modality == "image"
    out = reward(media, ["p"] * 6)
    b = media.mean(dim=(1, 2, 3))
    for lo in (0, 3):
        order = b[lo:lo + 3].argsort().argsort().float() / 2  # no ties: rank / (G - 1)
        torch.testing.assert_close(out.scores[lo:lo + 3], order)
    assert torch.equal(out.components[reward.reward.name], b)

    class Flaky:
        name, modality = "flaky", "image"

        def __call__(self, media, prompts, metadata=None):
            return RewardOutput(scores=torch.tensor([5.0, 1.0, 9.0, 2.0]), valid=torch.tensor([True, True, False, True]))

    out = GroupwiseRank(Flaky(), group_size=4)(media[:4], ["p"] * 4)
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.0, 0.5, 0.5]))  # invalid 9.0 is left out
    assert out.valid.tolist() == [True, True, False, True]


class BrightnessJudge:
    """P(a ≻ b) = sigmoid(50 · (mean_a − mean_b)); counts its calls."""

    name, modality = "bright", "image"

    def __init__(self):
        self.pairs = 0

    def compare(self, a, b, prompts, metadata=None):
        self.pairs += len(prompts)
        return torch.sigmoid(50 * (a.mean(dim=(1, 2, 3)) - b.mean(dim=(1, 2, 3))))


def test_pairwise_as_pointwise_hard_equals_rank_of_the_pointwise_score():
    media = _images(8, 8, 8)
    judge = BrightnessJudge()
    out = PairwiseAsPointwise(judge, group_size=4, batch_size=5)(media, ["p"] * 8)
    assert judge.pairs == 2 * 6  # all C(4, 2) pairs per group, none across groups
    expected = win_rates(media.mean(dim=(1, 2, 3)), torch.arange(8) // 4)
    torch.testing.assert_close(out.scores, expected)


def test_pairwise_prob_mode_failures_and_position_bias():
    media = _images(3, 8, 8)

    class Fixed:
        name, modality = "fixed", "image"

        def compare(self, a, b, prompts, metadata=None):
            # pairs arrive as (0,1), (0,2), (1,2); the (0,2) judgement failed
            return RewardOutput(scores=torch.tensor([0.8, 0.3, 0.6]), valid=torch.tensor([True, False, True]))

    out = PairwiseAsPointwise(Fixed(), group_size=3, decision="prob")(media, ["p"] * 3)
    # sample 0: 0.8 + 0.5 (failure); sample 1: 0.2 + 0.6; sample 2: 0.5 + 0.4; each over G - 1 = 2
    torch.testing.assert_close(out.scores, torch.tensor([0.65, 0.4, 0.45]))
    torch.testing.assert_close(out.components["failed_frac"], torch.tensor([0.5, 0.0, 0.5]))
    hard = PairwiseAsPointwise(Fixed(), group_size=3)(media, ["p"] * 3)
    torch.testing.assert_close(hard.scores, torch.tensor([0.75, 0.5, 0.25]))  # 1+0.5, 0+1, 0.5+0

    class AlwaysA:
        name, modality = "biased", "image"

        def compare(self, a, b, prompts, metadata=None):
            return torch.full((len(prompts),), 0.9)

    biased = PairwiseAsPointwise(AlwaysA(), group_size=3)(media, ["p"] * 3).scores
    assert biased.tolist() == [1.0, 0.5, 0.0]  # the first-shown image always wins
    fair = PairwiseAsPointwise(AlwaysA(), group_size=3, symmetric=True)(media, ["p"] * 3).scores
    assert fair.tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(TypeError, match="has no compare"):
        PairwiseAsPointwise(_brightness)
    with pytest.raises(ValueError, match="decision must be"):
        PairwiseAsPointwise(AlwaysA(), decision="soft")


# ---------------------------------------------------------------------------------------------
# GenEval-style checks

def _det(x0, y0, x1, y1, color=None, score=0.9):
    return Detection((x0, y0, x1, y1), score, color)


def test_relative_position_hand_worked():
    a, b = _det(0, 40, 20, 60), _det(60, 40, 80, 60)  # centres (10, 50) and (70, 50), widths 20
    assert relative_position(a, b) == {"left of"}  # offset -60, shrunk by 0.1 * 40 = 4: dx = -56 / 60
    assert relative_position(b, a) == {"right of"}
    top, bottom = _det(40, 0, 60, 10), _det(40, 80, 60, 100)
    assert relative_position(top, bottom) == {"above"} and relative_position(bottom, top) == {"below"}
    assert relative_position(_det(0, 0, 100, 100), _det(1, 1, 99, 101)) == set()  # overlap within the margin
    diag = relative_position(_det(0, 0, 10, 10), _det(90, 90, 100, 100))
    assert diag == {"left of", "above"}  # dx = dy = -(80 - 2) / (80·√2) = -0.69


def test_nms_hand_worked():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]  # IoU(0, 1) = 81 / 119 = 0.68
    assert nms(boxes, scores, 0.7).tolist() == [1, 2, 0]


def test_evaluate_requirements_follows_geneval():
    objs = {"dog": [_det(0, 0, 10, 10, "blue"), _det(50, 0, 60, 10, "red"), _det(80, 0, 90, 10, "blue")],
            "cat": [_det(100, 0, 110, 10, "red")]}
    counting = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
    assert evaluate_requirements(objs, counting) == {"count": (1, 1), "color": (0, 0), "position": (0, 0), "exclude": (0, 1)}
    colors = {"tag": "colors", "include": [{"class": "dog", "count": 2, "color": "blue"}, {"class": "cat", "count": 1, "color": "red"}]}
    # the first two dogs (by score order) are blue and red: only one blue -> colour fails
    assert evaluate_requirements(objs, colors)["color"] == (1, 2)
    position = {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    assert evaluate_requirements(objs, position)["position"] == (1, 1)
    position["include"][1]["position"] = ["right of", 0]
    assert evaluate_requirements(objs, position)["position"] == (0, 1)
    missing = {"tag": "two_object", "include": [{"class": "bird", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    assert evaluate_requirements(objs, missing) == {"count": (1, 2), "color": (0, 0), "position": (0, 1), "exclude": (0, 0)}


@pytest.fixture(scope="module")
def geneval(tmp_path_factory) -> GenEvalReward:
    return GenEvalReward.tiny(str(tmp_path_factory.mktemp("owlv2")), threshold=0.5, counting_threshold=0.5, nms_iou=1.0)


META = [
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]},
    {"tag": "color_attr", "include": [{"class": "cat", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}]},
    {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]},
    {"tag": "single_object", "include": [{"class": "car", "count": 1}]},
]


def test_geneval_detections_match_transformers_post_processing(geneval):
    """Single-query detections (no NMS) == Owlv2 processor's post_process_object_detection."""
    media = _images(2, 48, 64)
    meta = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]}] * 2
    ours = geneval.detect(media, meta)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(geneval.path)
    inputs = proc(text=[["a photo of a dog"]] * 2, images=to_pil_images(media), return_tensors="pt")
    with torch.no_grad():
        outputs = geneval.model(**inputs)
    ref = proc.image_processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(64, 64)] * 2)
    for mine, theirs in zip(ours, ref):
        order = theirs["scores"].argsort(descending=True)
        assert len(mine["dog"]) == len(order) > 0
        torch.testing.assert_close(torch.tensor([d.score for d in mine["dog"]]), theirs["scores"][order])
        torch.testing.assert_close(torch.tensor([d.box for d in mine["dog"]]), theirs["boxes"][order])


def test_geneval_reward_scores_fraction_of_requirements(geneval, monkeypatch):
    media = _images(4, 48, 64)
    out = geneval(media, ["p"] * 4, META)
    assert out.scores.shape == (4,) and out.scores.dtype == torch.float32
    assert set(out.components) == {"count", "color", "position", "exclude", "strict"}
    singles = torch.cat([geneval(media[i:i + 1], ["p"], META[i:i + 1]).scores for i in range(4)])
    torch.testing.assert_close(singles, out.scores)
    # with the detector replaced by fixed detections the score is the hand-counted fraction
    objs = {"dog": [_det(0, 0, 10, 10, "blue"), _det(50, 0, 60, 10, "red")], "cat": [_det(30, 0, 40, 10, "red")], "car": []}
    monkeypatch.setattr(geneval, "detect", lambda media, metadata: [objs] * len(metadata))
    out = geneval(media, ["p"] * 4, META)
    # counting: count ok, exclude ok -> 1; colours: cat red ok, first dog blue ok -> 1 (+ 2 counts);
    # position: dog at x=5 left of cat at x=35 -> 1; car missing -> 0
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert out.components["strict"].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_geneval_metadata_errors(geneval):
    with pytest.raises(ValueError, match="needs metadata"):
        geneval(_images(2), ["a", "b"])
    with pytest.raises(ValueError, match=r"metadata\[1\] must be a GenEval JSONL record"):
        geneval(_images(2), ["a", "b"], [META[0], {"tag": "counting"}])
    with pytest.raises(ValueError, match="colour 'teal'"):
        geneval(_images(1), ["a"], [{"tag": "c", "include": [{"class": "dog", "count": 1, "color": "teal"}]}])
    assert "red" in COLORS and len(COLORS) == 10


# ---------------------------------------------------------------------------------------------
# Pairwise VLM judge: local tiny LLaVA

@pytest.fixture(scope="module")
def local_judge(tmp_path_factory) -> VLMJudge:
    return VLMJudge.tiny(str(tmp_path_factory.mktemp("llava")), batch_size=3)


def test_local_judge_reads_the_a_b_logits(local_judge):
    a, b = _images(4, 32, 40, seed=1), _images(4, 32, 40, seed=2)
    out = local_judge.compare(a, b, PROMPTS)
    assert out.scores.shape == (4,) and out.valid.all() and ((out.scores > 0) & (out.scores < 1)).all()
    singles = torch.cat([local_judge.compare(a[i:i + 1], b[i:i + 1], PROMPTS[i:i + 1]).scores for i in range(4)])
    torch.testing.assert_close(singles, out.scores, rtol=1e-4, atol=1e-5)
    # independent: the prompt written out by hand (not via the chat template), full-vocabulary softmax
    proc = local_judge.processor
    text = ("<s>user\nImage A:<image>Image B:<image>" + local_judge.question.format(prompt=PROMPTS[1]) + "</s>\n<s>assistant\n")
    inputs = proc(text=[text], images=to_pil_images(torch.stack([a[1], b[1]])), return_tensors="pt")
    with torch.no_grad():
        logp = local_judge.model(**inputs).logits[0, -1].log_softmax(-1)
    ia, ib = proc.tokenizer.convert_tokens_to_ids(["A", "B"])
    expected = logp[ia].exp() / (logp[ia].exp() + logp[ib].exp())
    torch.testing.assert_close(out.scores[1], expected, rtol=1e-4, atol=1e-5)


def _write_sources(tmp_path, n: int, seed: int) -> list[str]:
    """``n`` random 24 x 36 RGB PNG source images; their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        path = tmp_path / f"source_{seed}_{k}.png"
        Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def edit_judge(local_judge) -> VLMJudge:
    """The same tiny LLaVA as ``local_judge``, as an editing judge (source image shown first)."""
    return VLMJudge(path=local_judge.model.name_or_path, batch_size=3, use_source=True)


def test_edit_judge_message_shows_the_source_first(edit_judge):
    content = edit_judge._messages("make it red", 1)[0]["content"]
    assert [c.get("text", c["type"]) for c in content[:6]] == ["Source image:", "image", "Image A:", "image", "Image B:", "image"]
    assert content[6]["text"] == DEFAULT_EDIT_QUESTION.format(prompt="make it red") and "Instruction: make it red" in content[6]["text"]
    labels = [c["text"] for c in edit_judge._messages("p", 2)[0]["content"] if c["type"] == "text"][:4]
    assert labels == ["Source image 1:", "Source image 2:", "Image A:", "Image B:"]


def test_edit_judge_pixels_carry_the_source(edit_judge, tmp_path):
    a, b = _images(3, 32, 40, seed=1), _images(3, 32, 40, seed=2)
    src1, src2 = _write_sources(tmp_path, 1, seed=10), _write_sources(tmp_path, 1, seed=11)
    meta = [{"image": src1[0]}, {"image": src1}, {"image": src2[0]}]
    out = edit_judge.compare(a, b, PROMPTS[:3], meta)
    assert out.valid.all() and ((out.scores > 0) & (out.scores < 1)).all()
    # independent: the prompt written out by hand, the pixels [source, A, B], full-vocabulary softmax
    proc = edit_judge.processor
    text = ("<s>user\nSource image:<image>Image A:<image>Image B:<image>"
            + DEFAULT_EDIT_QUESTION.format(prompt=PROMPTS[2]) + "</s>\n<s>assistant\n")
    source = Image.open(src2[0]).convert("RGB")
    inputs = proc(text=[text], images=[source, *to_pil_images(torch.stack([a[2], b[2]]))], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 3
    with torch.no_grad():
        logp = edit_judge.model(**inputs).logits[0, -1].log_softmax(-1)
    ia, ib = proc.tokenizer.convert_tokens_to_ids(["A", "B"])
    torch.testing.assert_close(out.scores[2], logp[ia].exp() / (logp[ia].exp() + logp[ib].exp()), rtol=1e-4, atol=1e-5)
    # a path and a one-element list are the same source; another source changes the verdict on the same pair
    as_list = edit_judge.compare(a[:1], b[:1], PROMPTS[:1], [{"image": src1}]).scores
    torch.testing.assert_close(as_list, out.scores[:1], rtol=1e-4, atol=1e-5)
    same_pair = edit_judge.compare(a[:1].expand(2, -1, -1, -1), b[:1].expand(2, -1, -1, -1), PROMPTS[:1] * 2,
                                   [{"image": src1[0]}, {"image": src2[0]}]).scores
    assert (same_pair[0] - same_pair[1]).abs() > 1e-4


def test_edit_judge_batches_rows_with_different_source_counts(edit_judge, tmp_path):
    a, b = _images(4, 32, 40, seed=3), _images(4, 32, 40, seed=4)
    two, one = _write_sources(tmp_path, 2, seed=12), _write_sources(tmp_path, 1, seed=13)
    meta = [{"image": two}, {"image": one[0]}, {"image": two}, {"image": one}]
    out = edit_judge.compare(a, b, PROMPTS, meta)  # batch_size 3: rows of 4 and 3 images in one forward
    singles = torch.cat([edit_judge.compare(a[i:i + 1], b[i:i + 1], PROMPTS[i:i + 1], meta[i:i + 1]).scores for i in range(4)])
    torch.testing.assert_close(singles, out.scores, rtol=1e-4, atol=1e-5)
    first_only = edit_judge.compare(a[:1], b[:1], PROMPTS[:1], [{"image": two[0]}]).scores
    assert (first_only - out.scores[0]).abs() > 1e-4  # the second source image reaches the verdict


def test_edit_judge_needs_the_source_path(edit_judge, tmp_path):
    a = _images(2, 16, 16)
    source = _write_sources(tmp_path, 1, seed=14)[0]
    with pytest.raises(ValueError, match=r'sample 1 has no source image: its prompt record needs "image"'):
        edit_judge.compare(a, a, PROMPTS[:2], [{"image": source}, {"prompt": "p"}])
    with pytest.raises(ValueError, match=r"vlm_judge: sample 1: source image not found: 'missing.png'"):
        edit_judge.compare(a, a, PROMPTS[:2], [{"image": source}, {"image": ["missing.png"]}])
    with pytest.raises(ValueError, match="needs one metadata record"):
        edit_judge.compare(a, a, PROMPTS[:2])
    with pytest.raises(ValueError, match="use_source must be true or false"):
        VLMJudge(base_url="http://127.0.0.1:1/v1", model="m", use_source="yes")


def test_judge_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one of path"):
        VLMJudge()
    with pytest.raises(ValueError, match="needs model="):
        VLMJudge(base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="must contain"):
        VLMJudge(base_url="http://127.0.0.1:1/v1", model="m", question="which?")


def test_parse_choice():
    assert parse_choice("A") == 1.0 and parse_choice("B.") == 0.0 and parse_choice("**B**") == 0.0
    assert parse_choice("Image A is better") == 1.0 and parse_choice(" b ") is None
    assert parse_choice("neither") is None and parse_choice("AB") is None and parse_choice(None) is None


# ---------------------------------------------------------------------------------------------
# Pairwise VLM judge: OpenAI-compatible endpoint on 127.0.0.1

class _ChatServer:
    """Speaks POST /v1/chat/completions; answers A if image A is brighter. ``mode`` injects faults."""

    def __init__(self):
        self.mode, self.requests, self.headers = "ok", [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if server.mode == "fail_once" and len(server.requests) % 2 == 1:
                    return self._send(500, {"error": "busy"})
                if server.mode == "bad_request":
                    return self._send(400, {"error": "bad"})
                if server.mode == "slow":
                    time.sleep(1.0)
                urls = [c["image_url"]["url"] for c in body["messages"][0]["content"] if c["type"] == "image_url"]
                means = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1])))).mean() for u in urls]
                # the last two images are A and B (an editing judge shows its source image(s) first)
                answer = "I cannot tell" if server.mode == "garbage" else ("A" if means[-2] > means[-1] else "B")
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]})

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def chat_server():
    server = _ChatServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_endpoint_judge_protocol(chat_server, monkeypatch):
    chat_server.mode, chat_server.requests, chat_server.headers = "ok", [], []
    monkeypatch.setenv("FLOWALIGN_TEST_KEY", "sk-test")
    judge = VLMJudge(base_url=chat_server.url, model="judge-1", api_key_env="FLOWALIGN_TEST_KEY", timeout=5)
    a, b = _images(4, 16, 24, seed=3), _images(4, 16, 24, seed=4)
    out = judge.compare(a, b, PROMPTS)
    expected = (a.mean(dim=(1, 2, 3)) > b.mean(dim=(1, 2, 3))).float()
    assert out.valid.all() and torch.equal(out.scores, expected)
    request = chat_server.requests[0]
    assert request["model"] == "judge-1" and request["messages"][0]["role"] == "user"
    assert chat_server.headers[0]["Authorization"] == "Bearer sk-test"
    urls = [c["image_url"]["url"] for c in request["messages"][0]["content"] if c["type"] == "image_url"]
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    texts = " ".join(c["text"] for c in request["messages"][0]["content"] if c["type"] == "text")
    assert any(p in texts for p in PROMPTS) and "Answer A or B" in texts
    first = next(r for r in chat_server.requests if f"Prompt: {PROMPTS[0]}\n" in json.dumps(r["messages"]).replace("\\n", "\n"))
    urls = [c["image_url"]["url"] for c in first["messages"][0]["content"] if c["type"] == "image_url"]
    decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1])))) for u in urls]
    assert np.array_equal(decoded[0], to_uint8(a[:1])[0]) and np.array_equal(decoded[1], to_uint8(b[:1])[0])  # lossless, in order


def test_endpoint_judge_retries_and_failures(chat_server):
    a, b = _images(2, 8, 8, seed=5), _images(2, 8, 8, seed=6)
    chat_server.mode, chat_server.requests = "fail_once", []
    out = VLMJudge(base_url=chat_server.url, model="m", retries=1, max_workers=1).compare(a, b, PROMPTS[:2])
    assert out.valid.all() and len(chat_server.requests) == 4  # each pair: a 500, then the answer
    for mode, extra in (("garbage", {}), ("bad_request", {"retries": 3}), ("slow", {"timeout": 0.2, "retries": 0})):
        chat_server.mode, chat_server.requests = mode, []
        out = VLMJudge(base_url=chat_server.url, model="m", max_workers=1, **extra).compare(a, b, PROMPTS[:2])
        assert out.scores.tolist() == [0.5, 0.5] and not out.valid.any(), mode
        if mode == "bad_request":
            assert len(chat_server.requests) == 2  # a 4xx is not retried
    out = VLMJudge(base_url="http://127.0.0.1:9/v1", model="m", retries=0, timeout=1).compare(a, b, PROMPTS[:2])
    assert not out.valid.any()  # nothing listening


def test_endpoint_judge_as_groupwise_win_rate(chat_server):
    chat_server.mode = "ok"
    media = _images(6, 8, 8, seed=7)
    reward = PairwiseAsPointwise(VLMJudge(base_url=chat_server.url, model="m"), group_size=3)
    out = reward(media, ["p"] * 6)
    torch.testing.assert_close(out.scores, win_rates(media.mean(dim=(1, 2, 3)), torch.arange(6) // 3))
    assert reward.name == "vlm_judge_winrate" and out.valid.all()


def test_endpoint_edit_judge_sends_the_source_through_the_win_rate(chat_server, tmp_path):
    """``PairwiseAsPointwise`` hands each pair its group's metadata; the request shows [source, A, B]."""
    chat_server.mode, chat_server.requests = "ok", []
    sources = _write_sources(tmp_path, 2, seed=20)
    media = _images(4, 8, 8, seed=9)
    meta = [{"image": sources[0]}] * 2 + [{"image": sources[1]}] * 2
    judge = VLMJudge(base_url=chat_server.url, model="m", use_source=True, max_workers=1)
    out = PairwiseAsPointwise(judge, group_size=2)(media, ["make it red"] * 4, meta)
    torch.testing.assert_close(out.scores, win_rates(media.mean(dim=(1, 2, 3)), torch.arange(4) // 2))
    assert len(chat_server.requests) == 2
    for request, source in zip(chat_server.requests, sources):
        content = request["messages"][0]["content"]
        assert [c["text"] for c in content if c["type"] == "text"][:3] == ["Source image:", "Image A:", "Image B:"]
        urls = [c["image_url"]["url"] for c in content if c["type"] == "image_url"]
        first = np.asarray(Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1]))))
        assert len(urls) == 3 and np.array_equal(first, np.asarray(Image.open(source).convert("RGB")))
        assert "Instruction: make it red" in content[-1]["text"]


def test_wrappers_build_from_config_style_specs(chat_server):
    """As a YAML config names them: the inner reward / judge as a {_component_: ...} spec."""
    chat_server.mode = "ok"
    rank = GroupwiseRank({"_component_": "jpeg_compressibility"}, group_size=2)
    assert rank.name == "jpeg_compressibility_rank"
    media = _images(4, 16, 16, seed=8)
    kb = rank(media, ["p"] * 4).components["jpeg_compressibility"]
    torch.testing.assert_close(rank(media, ["p"] * 4).scores, win_rates(kb, torch.arange(4) // 2))
    judge_spec = {"_component_": "flowalign.rewards.vlm_judge:VLMJudge", "base_url": chat_server.url, "model": "m"}
    winrate = PairwiseAsPointwise(judge=judge_spec, group_size=2)
    assert isinstance(winrate.judge, VLMJudge)
    with pytest.raises(ValueError, match="needs '_component_'"):
        PairwiseAsPointwise(judge={"base_url": chat_server.url})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [ImageReward, GenEvalReward])
def test_rewards_on_cuda_match_cpu(cls, tmp_path):
    media = _images(2, 32, 32)
    meta = META[:2]
    cpu, gpu = cls.tiny(str(tmp_path / "cpu")), cls.tiny(str(tmp_path / "gpu"), device="cuda")
    want = cpu(media, PROMPTS[:2], meta)
    got = gpu(media.cuda(), PROMPTS[:2], meta)
    assert got.scores.device.type == "cuda"
    torch.testing.assert_close(got.scores.cpu(), want.scores, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_local_judge_on_cuda_matches_cpu(local_judge, tmp_path):
    gpu = VLMJudge.tiny(str(tmp_path), device="cuda")
    a, b = _images(2, 32, 32, seed=1), _images(2, 32, 32, seed=2)
    torch.testing.assert_close(gpu.compare(a.cuda(), b.cuda(), PROMPTS[:2]).scores.cpu(),
                               local_judge.compare(a, b, PROMPTS[:2]).scores, rtol=1e-3, atol=1e-3)
