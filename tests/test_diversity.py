"""Diversity and reward-hacking signals: hand-checked values, the scripted hacking signature, and
their place in every recipe's evaluation and summary."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import flowalign
from flowalign.diversity import (
    HackingMonitor,
    distinct_fraction,
    embedding_source,
    group_diversity,
    pairwise_cosine_distance,
    relative_improvement,
)


def test_identical_samples_have_zero_diversity():
    same = torch.tensor([[1.0, 2.0, 3.0]]).repeat(4, 1)
    assert pairwise_cosine_distance(same).item() == 0.0
    zeros = torch.zeros(3, 5)  # cosine undefined, but identical: 0
    assert pairwise_cosine_distance(zeros).item() == 0.0
    assert distinct_fraction(["a", "a", "a"]) == 0.0


def test_known_spread_gives_its_value():
    # e1, e2, -e1: distances 1 - cos = 1 (e1,e2), 2 (e1,-e1), 1 (e2,-e1) -> mean 4/3
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert pairwise_cosine_distance(f).item() == pytest.approx(4 / 3)
    # scale does not matter; 60 degrees apart: 1 - cos(60) = 0.5
    g = torch.tensor([[2.0, 0.0], [0.5, 0.5 * math.sqrt(3)]])
    assert pairwise_cosine_distance(g).item() == pytest.approx(0.5, abs=1e-6)
    # a zero vector and a non-zero one: distance 1
    assert pairwise_cosine_distance(torch.tensor([[0.0, 0.0], [1.0, 0.0]])).item() == pytest.approx(1.0)
    # per group, then the mean over groups (a single-sample group is skipped)
    features = torch.cat([f, torch.tensor([[1.0, 1.0]]).repeat(2, 1), torch.tensor([[5.0, 5.0]])])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    assert group_diversity(features, groups).item() == pytest.approx((4 / 3 + 0.0) / 2)
    assert distinct_fraction(["12", "13", "12", "14", "15"]) == pytest.approx(3 / 4)
    assert distinct_fraction(["x"]) == 0.0


def test_relative_improvement():
    assert relative_improvement(0.5, 1.0) == pytest.approx(1.0)
    assert relative_improvement(-2.0, -1.0) == pytest.approx(0.5)
    assert relative_improvement(0.0, 0.1) == pytest.approx(10.0)  # floor 0.01


def test_hacking_warning_fires_once_when_reward_rises_and_judge_falls(capsys):
    monitor = HackingMonitor("eval/reward", ["eval/judge/j"], window=3)
    script = [(0.50, 0.50), (0.60, 0.60), (0.70, 0.55), (0.80, 0.50), (0.90, 0.45), (0.95, 0.40)]
    fired = []
    for step, (reward, judge) in enumerate(script):
        gaps, warnings = monitor.update(step * 10, {"eval/reward": reward, "eval/judge/j": judge})
        fired.append(bool(warnings))
        assert gaps["eval/gap/j"] == pytest.approx((reward - 0.5) / 0.5 - (judge - 0.5) / 0.5)
    # rises 0.6 -> 0.7 -> 0.8 while the judge falls 0.6 -> 0.55 -> 0.5: first at the 4th evaluation, then never again
    assert fired == [False, False, False, True, False, False]
    err = capsys.readouterr().err
    assert err.count("possible reward hacking") == 1 and "judge j fell" in err


def test_no_warning_while_the_judge_agrees():
    monitor = HackingMonitor("eval/reward", ["eval/judge/j"])
    for step, value in enumerate([0.5, 0.6, 0.7, 0.8, 0.9]):
        assert monitor.update(step, {"eval/reward": value, "eval/judge/j": value - 0.01})[1] == []


def test_digit_classifier_embedding_is_its_penultimate_layer(tmp_path):
    from flowalign.rewards.digits import DigitClassifierReward

    reward = DigitClassifierReward.tiny(str(tmp_path))
    media = torch.rand(5, 3, 16, 16)
    emb = reward.embed(media)
    assert emb.shape == (5, 64) and bool((emb >= 0).all())  # after the hidden ReLU
    assert embedding_source({"judge": object(), "digit_classifier": reward}) == ("digit_classifier", reward)
    assert embedding_source({"judge": object()}) is None


def test_every_evaluation_reports_diversity_and_gap(tiny_config):
    tiny_config["rewards"] = [{"_component_": "digit_classifier", "path": "assets/quickstart/digit-classifier", "weight": 1.0}]
    tiny_config["eval"].update(every=1, judges=[{"_component_": "jpeg_compressibility"}])
    summary = flowalign.train(tiny_config)
    for when in ("before", "after"):
        assert 0.0 <= summary[when]["eval/diversity"] <= 2.0
    assert "eval/gap/jpeg_compressibility" in summary["after"]
    assert "diversity" in summary["table"]
    saved = json.load(open(os.path.join(tiny_config["output_dir"], "summary.json")))
    assert saved["after"]["eval/diversity"] == summary["after"]["eval/diversity"]


def test_distance_to_group_by_hand():
    from flowalign.diversity import distance_to_group

    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 3.0]])
    groups = torch.tensor([0, 0, 0, 1])
    # e1: (1 + 2) / 2; e2: (1 + 1) / 2; -e1: (2 + 1) / 2; alone: 0
    assert distance_to_group(f, groups).tolist() == pytest.approx([1.5, 1.0, 1.5, 0.0])
    assert distance_to_group(f[:3], groups[:3]).mean().item() == pytest.approx(pairwise_cosine_distance(f[:3]).item())


def test_group_diversity_reward_scores_distance_to_siblings(tmp_path):
    from flowalign.rewards.digits import DigitClassifierReward
    from flowalign.rewards.groupwise import GroupDiversity
    from flowalign.rewards.registry import build_reward

    media = torch.zeros(4, 3, 2, 2)
    media[0, :, 0, 0] = 1.0  # samples 0 and 1 light the same pixel, sample 2 another one
    media[1, :, 0, 0] = 1.0
    media[2, :, 1, 1] = 1.0
    media[3, :, 1, 1] = 1.0  # alone in group 1
    meta = [{"group": g} for g in (7, 7, 7, 8)]
    out = build_reward({"_component_": "group_diversity"})(media, ["p"] * 4, meta)
    assert out.scores.tolist() == pytest.approx([0.5, 0.5, 1.0, 0.0])  # (0 + 1) / 2, (0 + 1) / 2, (1 + 1) / 2
    path = str(tmp_path / "cnn")
    DigitClassifierReward.tiny(path)
    embedded = GroupDiversity(features={"_component_": "digit_classifier", "path": path})
    images = torch.rand(6, 3, 16, 16)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    from flowalign.diversity import distance_to_group

    expected = distance_to_group(embedded.embedder.embed(images), groups)
    got = embedded(images, ["p"] * 6, [{"group": int(g)} for g in groups]).scores
    assert torch.allclose(got, expected)
    with pytest.raises(ValueError, match="no embed"):
        GroupDiversity(features={"_component_": "jpeg_compressibility"})


class _Scripted:
    """A reward or judge whose score moves by ``step`` at every call (all samples alike)."""

    modality = "image"

    def __init__(self, name: str, start: float, step: float):
        self.name, self.value, self.step = name, start, step

    def __call__(self, media, prompts, metadata=None):
        from flowalign.rewards import RewardOutput

        self.value += self.step
        return RewardOutput(scores=torch.full((media.shape[0],), self.value))


def test_recipe_warns_once_when_reward_rises_and_judge_falls(tiny_config, capsys):
    tiny_config["train"]["iterations"] = 4
    tiny_config["eval"]["every"] = 1
    summary = flowalign.train(tiny_config, rewards=_Scripted("rising", 0.5, 0.01),
                              judges={"falling": _Scripted("falling", 0.9, -0.05)})
    err = capsys.readouterr().err
    assert err.count("possible reward hacking") == 1 and "judge falling fell" in err
    assert summary["after"]["eval/gap/falling"] > 0


def test_dllm_summary_reports_completion_diversity(tmp_path):
    summary = flowalign.train("configs/dllm/quickstart.yaml", {
        "output_dir": str(tmp_path / "d"), "train.iterations": 1, "eval.max_examples": 16, "eval.diversity_prompts": 8,
        "logging.progress": False, "logging.tensorboard": False})
    for when in ("before", "after"):
        assert 0.0 <= summary[when]["eval/diversity"] <= 1.0
