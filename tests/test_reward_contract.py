"""The contract every registered reward keeps (issue: reward zoo): scores are a [B] float32 tensor
on the media's device, finite, deterministic, and independent of how the batch is split.

Rewards with weights are built through their ``tiny(directory)`` classmethod, which saves a random
checkpoint in the original layout and loads it back through the real loading path; rewards without
weights are built with no arguments. Rewards whose optional dependency is missing are skipped with
the reason."""

from __future__ import annotations

import os

import pytest
import torch

from flowalign.rewards.base import RewardOutput
from flowalign.rewards.registry import BUILTIN_REWARDS, resolve_reward_class
from tests.conftest import REPO

# Prompts every reward can parse: a digit word (digit rewards) inside quotes (OCR).
PROMPTS = ['a handwritten "seven"', 'the digit "one"', 'a picture of the number "three"', 'a handwritten "zero"']
NO_CONTRACT = {
    "videoalign": "a remote client: covered by tests/test_remote_reward.py on loopback",
    "groupwise_rank": "groupwise by design (not batch-split invariant): tests/test_rewards_vlm.py",
    "pairwise_winrate": "groupwise by design (not batch-split invariant): tests/test_rewards_vlm.py",
    "group_diversity": "groupwise by design (not batch-split invariant): tests/test_diversity.py",
}
# Rewards that read per-prompt metadata get one record per prompt (GenEval's JSONL format).
CONTRACT_METADATA = {
    "geneval": [
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
        {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]},
        {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
        {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}]},
    ],
    # editing rewards compare with the record's source image (the shipped example images)
    "source_ssim": [{"image": os.path.join(REPO, "assets", "editing", f"digit_{d}.png")} for d in (3, 1, 5, 3)],
}


def _build(name: str, tmp_path):
    try:
        cls = resolve_reward_class(name)
    except ImportError as err:
        pytest.skip(f"{name}: optional dependency missing ({err})")
    try:
        return cls.tiny(str(tmp_path)) if hasattr(cls, "tiny") else cls()
    except (ImportError, OSError, EnvironmentError) as err:
        pytest.skip(f"{name}: cannot build here ({err})")


def _media(modality: str, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if modality == "video":
        return torch.rand(batch, 3, 3, 32, 32, generator=g)
    return torch.rand(batch, 3, 32, 32, generator=g)


@pytest.mark.parametrize("name", sorted(n for n in BUILTIN_REWARDS if n not in NO_CONTRACT))
def test_reward_contract(name, tmp_path):
    reward = _build(name, tmp_path)
    info = BUILTIN_REWARDS[name]
    assert reward.modality == info.modality, f"{name}: modality {reward.modality!r} != registry's {info.modality!r}"
    media, prompts = _media(info.modality, len(PROMPTS)), PROMPTS
    meta = CONTRACT_METADATA.get(name)
    out = reward(media, prompts, meta)
    assert isinstance(out, RewardOutput), f"{name} must return a RewardOutput"
    assert out.scores.shape == (len(PROMPTS),) and out.scores.dtype == torch.float32
    assert out.scores.device == media.device
    assert torch.isfinite(out.scores).all()
    again = reward(media, prompts, meta)
    assert torch.equal(out.scores, again.scores), f"{name} is not deterministic"
    singles = torch.cat([reward(media[i : i + 1], prompts[i : i + 1], None if meta is None else meta[i : i + 1]).scores
                         for i in range(len(PROMPTS))])
    torch.testing.assert_close(singles, out.scores, rtol=1e-4, atol=1e-5, msg=f"{name} depends on batch composition")
    for comp_name, comp in out.components.items():
        assert comp.shape == out.scores.shape, f"{name}: component {comp_name} has shape {tuple(comp.shape)}"
