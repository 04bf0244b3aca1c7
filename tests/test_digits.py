"""Tests of the digits quickstart: data helpers, the CNN reward, the SVM judge and the shipped models."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from flowalign.data.digits import (EVAL_TEMPLATES, TRAIN_TEMPLATES, corrupt_labels, digit_derangement, digit_prompts,
                                   format_prompt, load_digit_images, parse_digit, split_indices)
from flowalign.pipelines.toy import DIGIT_VOCAB, ToyAdapter
from flowalign.rewards.base import Reward
from flowalign.rewards.digits import DigitClassifierNet, DigitClassifierReward, DigitJudge

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "assets" / "quickstart"


def to_media(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` in [-1, 1] -> ``[B, 3, H, W]`` in [0, 1]."""
    return ((images + 1) / 2).repeat(1, 3, 1, 1)


@pytest.fixture(scope="module")
def data():
    return load_digit_images(16)


@pytest.fixture(scope="module")
def judge():
    return DigitJudge()


# -- data -----------------------------------------------------------------------------------------
def test_load_digit_images_shapes_and_ranges(data):
    images, labels = data
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.dtype == torch.long and labels.shape == (1797,)
    assert torch.equal(labels.unique(), torch.arange(10))
    raw = load_digits()
    # size 8 is the original data, only rescaled from 0..16 to [-1, 1]
    eight, _ = load_digit_images(8)
    torch.testing.assert_close(eight[:, 0], torch.as_tensor(raw.images, dtype=torch.float32) / 8 - 1)
    # bilinear x2 upsampling (half-pixel centres, edge clamped), as a separable 16x8 matrix by hand
    up = np.zeros((16, 8))
    for i in range(16):
        c = max((i + 0.5) / 2 - 0.5, 0.0)
        i0 = int(np.floor(c))
        up[i, i0] += 1 - (c - i0)
        up[i, min(i0 + 1, 7)] += c - i0
    expected = np.einsum("ia,nab,jb->nij", up, raw.images / 8 - 1, up)
    np.testing.assert_allclose(images[:, 0].numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="size"):
        load_digit_images(0)


def test_split_indices_partition():
    train, test = split_indices(1797, 0.2, seed=0)
    assert len(test) == 359 and len(train) == 1438
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(1797))
    assert torch.equal(split_indices(1797, 0.2, seed=0)[1], test)
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(10, 1.5)


@pytest.mark.parametrize("scheme", ["derangement", "uniform"])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.4, 1.0])
def test_corrupt_labels_changes_exactly_the_fraction(data, scheme, fraction):
    labels = data[1]
    flawed = corrupt_labels(labels, fraction, seed=3, scheme=scheme)
    changed = flawed != labels
    assert int(changed.sum()) == round(fraction * len(labels))
    assert flawed.dtype == torch.long and flawed.min() >= 0 and flawed.max() <= 9
    assert torch.equal(corrupt_labels(labels, fraction, seed=3, scheme=scheme), flawed)  # seeded
    assert torch.equal(labels, data[1])  # input untouched


def test_corrupt_labels_schemes(data):
    labels = data[1]
    pi = digit_derangement(5)
    assert sorted(pi.tolist()) == list(range(10)) and bool((pi != torch.arange(10)).all())
    flawed = corrupt_labels(labels, 0.5, seed=5, scheme="derangement")
    changed = flawed != labels
    assert torch.equal(flawed[changed], pi[labels[changed]])  # one fixed confusion per digit
    uniform = corrupt_labels(labels, 0.5, seed=5, scheme="uniform")
    changed = uniform != labels
    sevens = changed & (labels == 7)
    assert len(uniform[sevens].unique()) == 9  # every wrong digit appears, never the true one
    assert not torch.equal(corrupt_labels(labels, 0.5, seed=6, scheme="uniform"), uniform)


def test_corrupt_labels_bad_input(data):
    with pytest.raises(ValueError, match="fraction"):
        corrupt_labels(data[1], 1.2, seed=0)
    with pytest.raises(ValueError, match="labels"):
        corrupt_labels(data[1].float(), 0.1, seed=0)
    with pytest.raises(ValueError, match="labels"):
        corrupt_labels(torch.tensor([1, 12]), 0.1, seed=0)
    with pytest.raises(ValueError, match="scheme"):
        corrupt_labels(data[1], 0.1, seed=0, scheme="shuffle")


def test_prompts_round_trip_through_parse_digit():
    train, evals = digit_prompts(TRAIN_TEMPLATES), digit_prompts(EVAL_TEMPLATES)
    assert len(train) == 10 * len(TRAIN_TEMPLATES) and len(evals) == 10 * len(EVAL_TEMPLATES)
    assert not set(train) & set(evals)
    for i, prompt in enumerate(train + evals):
        assert parse_digit(prompt) == i % 10
        words = re.findall(r"[a-z0-9]+", prompt)
        assert len(words) <= 6 and all(w in DIGIT_VOCAB for w in words), prompt
    assert "the number 7" in evals and "a handwritten seven" in train
    assert digit_prompts(["the digit {w}"], [3, 1]) == ["the digit three", "the digit one"]


def test_parse_digit():
    assert parse_digit("A Handwritten SEVEN") == 7
    assert parse_digit("the number 0") == 0
    assert parse_digit("seven, i.e. 7") == 7
    with pytest.raises(ValueError, match="'a cat'"):
        parse_digit("a cat")
    with pytest.raises(ValueError, match="ambiguous"):
        parse_digit("one or 2")
    with pytest.raises(ValueError, match="multi-digit"):
        parse_digit("the number 12")
    with pytest.raises(ValueError, match="digit"):
        format_prompt("the digit {w}", 10)


# -- the CNN reward ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf")
    DigitClassifierNet(channels=(4, 8), hidden=16).save_pretrained(str(path))
    return DigitClassifierReward(str(path))


def test_reward_loads_and_scores(tiny_reward, data):
    assert isinstance(tiny_reward, Reward) and tiny_reward.name == "digit_classifier"
    images, labels = data[0][:8], data[1][:8]
    prompts = [format_prompt("the digit {w}", int(d)) for d in labels]
    out = tiny_reward(to_media(images), prompts)
    assert out.scores.shape == (8,) and ((out.scores >= 0) & (out.scores <= 1)).all()
    # independent computation: the same net on [-1, 1] pixels, softmax, take the target column
    expected = tiny_reward.net(images).softmax(1)[torch.arange(8), labels]
    torch.testing.assert_close(out.scores, expected, atol=1e-6, rtol=1e-5)
    acc = tiny_reward.net(images).argmax(1) == labels
    assert torch.equal(out.components["accuracy"], acc.float())
    # deterministic and batch-size invariant
    torch.testing.assert_close(tiny_reward(to_media(images), prompts).scores, out.scores, atol=0, rtol=0)
    torch.testing.assert_close(tiny_reward(to_media(images[:3]), prompts[:3]).scores, out.scores[:3], atol=1e-6, rtol=1e-5)


def test_reward_metadata_resize_and_errors(tiny_reward, data, tmp_path):
    images = data[0][:4]
    media = to_media(images)
    by_meta = tiny_reward(media, ["a cat"] * 4, [{"digit": d} for d in (1, 2, 3, 4)])
    by_prompt = tiny_reward(media, ["one", "two", "three", "four"])
    torch.testing.assert_close(by_meta.scores, by_prompt.scores)
    # 32x32 media are area-downsampled to the net's 16x16 input
    big = F.interpolate(media, scale_factor=2, mode="nearest")
    torch.testing.assert_close(tiny_reward(big, ["one"] * 4).scores, tiny_reward(media, ["one"] * 4).scores)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        DigitClassifierReward(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="media"):
        tiny_reward(media[:, 0], ["one"] * 4)
    with pytest.raises(ValueError, match="media"):
        tiny_reward(media.tolist(), ["one"] * 4)
    with pytest.raises(ValueError, match="prompts"):
        tiny_reward(media, ["one"] * 3)
    with pytest.raises(ValueError, match=r"metadata\[0\]\['digit'\]"):
        tiny_reward(media, ["one"] * 4, [{"digit": 11}] + [{}] * 3)
    with pytest.raises(ValueError, match="NaN"):
        tiny_reward(media * float("nan"), ["one"] * 4)


def test_shipped_classifier_on_held_out_digits(data):
    reward = DigitClassifierReward(str(QUICKSTART / "digit-classifier"))
    _, test = split_indices(1797, 0.2, seed=0)  # the split make_quickstart.py held out
    images, labels = data[0][test], data[1][test]
    out = reward(to_media(images), [str(int(d)) for d in labels])
    assert out.components["accuracy"].mean() >= 0.90


# -- the judge --------------------------------------------------------------------------------------
def test_judge_features_are_load_digits_format(judge):
    raw = load_digits()
    media = torch.as_tensor(raw.images[:5], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 16
    torch.testing.assert_close(judge.features(media), torch.as_tensor(raw.data[:5], dtype=torch.float64))


def test_judge_accuracy_and_disagreement(judge, data):
    images, labels = data
    assert isinstance(judge, Reward) and judge.name == "digit_judge"
    right = judge(to_media(images), [str(int(d)) for d in labels])
    assert right.scores.shape == (1797,) and ((right.scores >= 0) & (right.scores <= 1)).all()
    assert right.components["accuracy"].mean() >= 0.95
    wrong = judge(to_media(images), [str(int(d)) for d in labels], [{"digit": int(d + 1) % 10} for d in labels])
    assert wrong.components["accuracy"].mean() <= 0.02 and wrong.scores.mean() < 0.05
    # batch-size invariant
    torch.testing.assert_close(judge(to_media(images[:3]), ["1"] * 3).scores, judge(to_media(images[:6]), ["1"] * 6).scores[:3])


# -- the shipped flow model -------------------------------------------------------------------------
@torch.no_grad()
def euler_ode(adapter: ToyAdapter, prompts: list[str], seed: int, steps: int = 10) -> torch.Tensor:
    """Deterministic Euler on sigma = linspace(1, 0, steps + 1): x <- x + (sigma_next - sigma) v."""
    cond = adapter.encode(prompts)
    x = adapter.init_latents(len(prompts), torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1, 0, steps + 1)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * adapter.predict(x, s, cond)
    return adapter.decode(x)


def test_shipped_flow_model_leaves_room_for_alignment(judge):
    adapter = ToyAdapter.from_pretrained(str(QUICKSTART / "digits-flow"))
    torch.testing.assert_close(adapter.sigmas(10), torch.linspace(1, 0, 11))
    prompts = [p for p in digit_prompts(EVAL_TEMPLATES) for _ in range(4)]
    media = euler_ode(adapter, prompts, seed=123)
    out = judge(media, prompts)
    accuracy = out.components["accuracy"].mean().item()
    assert 0.30 <= accuracy <= 0.85, accuracy
    # failures are wrong digits, not mush: the judge is confident on most samples
    probs = torch.as_tensor(judge.svm.predict_proba(judge.features(media).numpy()))
    assert (probs.max(1).values > 0.5).float().mean() >= 0.7


def test_shipped_prompt_files():
    for name, templates in (("digits_train.txt", TRAIN_TEMPLATES), ("digits_eval.txt", EVAL_TEMPLATES)):
        lines = (ROOT / "assets" / "prompts" / name).read_text().splitlines()
        assert lines == digit_prompts(templates)


# -- the build script's sampler ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_quickstart", ROOT / "assets" / "make_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_quickstart_sampler_ode_matches_hand_euler(script):
    from flowalign.pipelines.toy import build_toy_adapter

    adapter = build_toy_adapter(0)
    prompts = ["the digit one", "the number 2"]
    ode = script.sample(adapter, prompts, seed=0, steps=4)
    torch.testing.assert_close(ode, euler_ode(adapter, prompts, seed=0, steps=4))
    assert (script.sample(adapter, prompts, seed=0, steps=4, sde_a=0.7) - ode).abs().max() > 1e-2


def test_flow_grpo_sde_step_matches_reference_form(script):
    """The reference code writes the mean as x (1 + std^2 dt / 2s) + v (1 + std^2 (1 - s) / 2s) dt."""
    gen = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(5, 1, 4, 4, generator=gen) for _ in range(3))
    for s, s_next in ((1.0, 0.9), (0.6, 0.5), (0.1, 0.0)):
        std = 0.7 * math.sqrt(s / (1 - (0.9 if s == 1.0 else s)))
        dt = s_next - s
        mean = x * (1 + std ** 2 / (2 * s) * dt) + v * (1 + std ** 2 * (1 - s) / (2 * s)) * dt
        out = script.euler_step(x, v, s, s_next, 0.7, 0.9, noise)
        torch.testing.assert_close(out, mean + std * math.sqrt(-dt) * noise)
        torch.testing.assert_close(script.euler_step(x, v, s, s_next, 0.0, 0.9, noise), x + dt * v)


@pytest.mark.parametrize("sde_a", [0.0, 0.7])
def test_sampler_steps_recover_a_gaussian_marginal(script, sde_a):
    """Independent check: for 1-D data x0 ~ N(mu, c^2) the exact velocity E[eps - x0 | x_t] is
    known in closed form; integrating from sigma = 1 must return N(mu, c^2) for the ODE and,
    being marginal-preserving, for the Flow-GRPO SDE."""
    mu, c, n, steps = 1.5, 0.5, 40000, 200
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        var = (1 - s) ** 2 * c ** 2 + s ** 2  # Var[x_t]; x_t = (1 - s) x0 + s eps
        centred = x - (1 - s) * mu
        v = s / var * centred - (mu + (1 - s) * c ** 2 / var * centred)  # E[eps | x_t] - E[x0 | x_t]
        x = script.euler_step(x, v, s, s_next, sde_a, sigmas[1], torch.randn(n, generator=gen, dtype=torch.float64))
    assert abs(x.mean().item() - mu) < 0.02 and abs(x.std().item() - c) < 0.02
