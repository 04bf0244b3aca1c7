"""Issue 13, item 11 (last part): Pref-GRPO's blend of the overall and the per-dimension verdicts.

Reference: CodeGoat24/Pref-GRPO @ 3e787f6, fastvideo/rewards/unifiedreward_flex.py lines 121-238 (win
rates, dimension mean, blend on rewards) and fastvideo/rewards/dispatcher.py lines 628-702 (blend on
advantages, weighted sum, batch standardisation under --apply_gdpo); script values OVERALL_WEIGHT=0.3,
DIM_WEIGHT=0.7, CATEGORY_WEIGHTS=1.0,0.7,0.7 (scripts/full_train/ur_flex_prefgrpo_flux.sh lines 13-15).
"""

from __future__ import annotations

import math
import os
import random
from collections import defaultdict

import pytest
import torch

import flowalign
from flowalign.algorithms.flow import FlowAlgorithm, ScoredRollout
from flowalign.estimators.preference import blend_advantages, blend_win_rates, dimension_win_rates, standardize
from flowalign.rewards.groupwise import PairwiseAsPointwise
from flowalign.training.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")
DIMS = ("alignment", "quality", "style")


class TableJudge:
    """A judge that reads its verdicts from a table keyed by the samples' ids (media[i] is filled with id i):
    ``table[(i, j)] = (overall winner, {dimension: winner})`` with winner 1 (first), 2 (second) or None (tie /
    unreadable), a dimension left out of the dict having no verdict -- the reference's response format."""

    name = "table"
    modality = "image"
    dimensions = DIMS

    def __init__(self, table):
        self.table = table

    @staticmethod
    def _p(winner):
        return {1: 1.0, 2: 0.0, None: 0.5}[winner]

    def compare(self, media_a, media_b, prompts):
        return self.compare_dimensions(media_a, media_b, prompts)[0]

    def compare_dimensions(self, media_a, media_b, prompts):
        ids = zip(media_a[:, 0, 0, 0].round().long().tolist(), media_b[:, 0, 0, 0].round().long().tolist())
        overall, dims = [], []
        for i, j in ids:
            winner, cats = self.table[(i, j)]
            overall.append(self._p(winner))
            dims.append([self._p(cats[d]) if d in cats else NAN for d in DIMS])
        return torch.tensor(overall), torch.tensor(dims)


def _media(n):
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()


def test_blend_matches_a_hand_worked_example():
    """Three samples, pairs (0,1), (0,2), (1,2); overall: 0 beats 1, 0 ties 2, 2 beats 1.
    Dimension a: 1 beats 0, no verdict on (0,2), 1 beats 2; dimension b: 0 beats 1, (0,2) a tie, none on (1,2).
    By hand: overall = [1.5/2, 0/2, 1.5/2] = [.75, 0, .75]; a = [0/1, 2/2, 0/1]; b = [1.5/2, 0/1, .5/1];
    with weights (1.0, 0.7): dim_mean = [.525/1.7, 1/1.7, .35/1.7] = [.308824, .588235, .205882];
    blend 0.3 / 0.7: [.225 + .216176, 0 + .411765, .225 + .144118] = [.441176, .411765, .369118]."""
    first, second = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    verdicts = torch.tensor([[0.0, 1.0], [NAN, 0.5], [1.0, NAN]])
    rates, counts = dimension_win_rates(first, second, verdicts, 3)
    torch.testing.assert_close(rates, torch.tensor([[0.0, 0.75], [1.0, 0.0], [0.0, 0.5]]))
    torch.testing.assert_close(counts, torch.tensor([[1.0, 2.0], [2.0, 1.0], [1.0, 1.0]]))
    blended, dim_mean, has = blend_win_rates(torch.tensor([0.75, 0.0, 0.75]), rates, counts,
                                             dimension_weights=[1.0, 0.7, 0.7], overall_weight=0.3, dim_weight=0.7)
    torch.testing.assert_close(dim_mean, torch.tensor([0.308824, 0.588235, 0.205882]), atol=1e-6, rtol=0)
    torch.testing.assert_close(blended, torch.tensor([0.441176, 0.411765, 0.369118]), atol=1e-6, rtol=0)
    assert has.tolist() == [True, True, True]


def test_blend_on_advantages_matches_a_hand_worked_example(tiny_config):
    """Same pairs, but no dimension verdict on (0,2) nor (1,2): sample 2 has none (dim_mean 0, overall alone).
    dim a = [0, 1, -], b = [1, 0, -] -> dim_mean = [.7/1.7, 1/1.7, 0] = [.411765, .588235, 0].
    Unbiased group std: overall [.75, 0, .75] -> A_o = [.57735, -1.1547, .57735];
    dim_mean -> mean .333333, std .301859 -> A_d = [.25983, .84445, -1.10428];
    blend 0.3/0.7 = [.355086, .244705, A_o = .57735]; batch standardised (mean .392380, std .169431):
    [-.22011, -.87159, 1.09170]."""
    algo = _algorithm(tiny_config)
    table = {(0, 1): (1, {"alignment": 2, "quality": 1}), (0, 2): (None, {}), (1, 2): (2, {})}
    scored = _scored(PairwiseAsPointwise(TableJudge(table)), _media(3), {"table_winrate": 1.0})
    got = algo.leaf_advantages(scored)
    torch.testing.assert_close(got, torch.tensor([-0.22011, -0.87159, 1.09170]), atol=2e-4, rtol=0)
    # blend_on: rewards -- blended win rates [.3*.75 + .7*.411765, .7*.588235, .75] = [.513235, .411765, .75]
    algo.opts.blend_on = "rewards"
    r = torch.tensor([0.513235, 0.411765, 0.75])
    torch.testing.assert_close(algo.leaf_advantages(scored), (r - r.mean()) / (r.std() + 1e-8), atol=1e-4, rtol=0)


# -- an independent enumeration in the reference's form -------------------------------------------------------
def _reference_rates(num_items, responses, overall_weight, dim_weight, category_weights):
    """The reference's counting loop (unifiedreward_flex.py lines 130-236) over JSON-like responses, written
    again with dicts: winner 1 / 2 / None, categories listed by name, without the 3-decimal rounding."""
    wins, seen = defaultdict(lambda: defaultdict(float)), defaultdict(lambda: defaultdict(int))
    order = []
    for i, j, winner, cats in responses:
        for key, win in [("overall", winner)] + list(cats):
            if key != "overall" and key not in order:
                order.append(key)
            seen[key][i] += 1
            seen[key][j] += 1
            if win == 1:
                wins[key][i] += 1
            elif win == 2:
                wins[key][j] += 1
            else:
                wins[key][i] += 0.5
                wins[key][j] += 0.5
    overall = [wins["overall"][k] / max(seen["overall"][k], 1) for k in range(num_items)]
    weights = (list(category_weights) + [1.0] * len(order))[:len(order)]
    blended, dim_mean, has = [], [], []
    for k in range(num_items):
        rates = [(wins[d][k] / seen[d][k], w) for d, w in zip(order, weights) if seen[d][k] > 0]
        has.append(bool(rates))
        mean = sum(r * w for r, w in rates) / sum(w for _, w in rates) if rates else 0.0
        dim_mean.append(mean)
        blended.append((overall_weight * overall[k] + dim_weight * mean) / (overall_weight + dim_weight)
                       if dim_weight > 0 and rates else overall[k])
    return overall, blended, dim_mean, has


def _reference_advantages(rewards_by_name, reward_weights, flex_parts, group_size, overall_weight, dim_weight):
    """dispatcher.py lines 628-702 with --use_group --apply_gdpo: per-group (r - mean) / (std + 1e-8) per reward,
    the judge's the blend of its overall and dim_mean advantages (overall where it has no dimension verdict),
    the weighted sum standardised over the batch with torch's unbiased std + 1e-8."""
    def adv(r):
        out = torch.zeros_like(r)
        for s in range(0, len(r), group_size):
            g = r[s:s + group_size]
            out[s:s + group_size] = (g - g.mean()) / (g.std() + 1e-8)
        return out

    total = torch.zeros(len(next(iter(rewards_by_name.values()))), dtype=torch.float64)
    for name, w in reward_weights.items():
        if name in flex_parts:
            overall, dim_mean, mask = flex_parts[name]
            a_o, a_d = adv(overall), adv(dim_mean)
            a = torch.where(mask, (overall_weight * a_o + dim_weight * a_d) / (overall_weight + dim_weight), a_o)
        else:
            a = adv(rewards_by_name[name])
        total = total + w * a
    return (total - total.mean()) / (total.std() + 1e-8)


def _random_table(rng, ids):
    table, responses = {}, []
    for a_pos, i in enumerate(ids):
        for j in ids[a_pos + 1:]:
            winner = rng.choice([1, 2, None])
            # the first pair names every category (so the reference's first-seen order is DIMS); later pairs may
            # leave some out, as UnifiedReward-Flex does
            names = list(DIMS) if not responses else [d for d in DIMS if rng.random() < 0.6]
            cats = {d: rng.choice([1, 2, 1, 2, None]) for d in names}
            table[(i, j)] = (winner, cats)
            responses.append((i, j, winner, [(d, cats[d]) for d in DIMS if d in cats]))
    return table, responses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_win_rates_and_blend_match_an_enumeration_in_the_reference_form(seed):
    rng = random.Random(seed)
    num = 6
    table, responses = _random_table(rng, list(range(num)))
    if seed == 2:  # a sample with no dimension verdict at all
        for key, (winner, cats) in list(table.items()):
            if 5 in key:
                table[key] = (winner, {})
        responses = [(i, j, w, [] if 5 in (i, j) else c) for i, j, w, c in responses]
    out = PairwiseAsPointwise(TableJudge(table), group_size=num)(_media(num), ["p"] * num)
    overall, blended, dim_mean, has = _reference_rates(num, responses, 0.3, 0.7, [1.0, 0.7, 0.7])
    torch.testing.assert_close(out.scores.double(), torch.tensor(overall, dtype=torch.float64))
    rates = torch.stack([out.components[f"dim/{d}"] for d in DIMS], 1)
    counts = torch.stack([out.components[f"dim_n/{d}"] for d in DIMS], 1)
    got = blend_win_rates(out.components["overall"], rates, counts, dimension_weights=[1.0, 0.7, 0.7],
                          overall_weight=0.3, dim_weight=0.7)
    torch.testing.assert_close(got[0].double(), torch.tensor(blended, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1].double(), torch.tensor(dim_mean, dtype=torch.float64), atol=1e-6, rtol=0)
    assert got[2].tolist() == has
    assert (seed != 2) or has[5] is False


def _algorithm(tiny_config, **opts):
    from flowalign.algorithms.registry import ALGORITHMS

    _pref(tiny_config, **opts)
    return ALGORITHMS["pref_grpo"](flowalign.load_config(tiny_config))


def _pref(tiny_config, judge=None, **opts):
    judge = judge or {"_component_": "flowalign.rewards.digits:DigitAspectJudge",
                      "path": os.path.join(REPO, "assets", "quickstart", "digit-classifier")}
    tiny_config["rewards"] = [{"_component_": "pairwise_winrate", "judge": judge}]
    tiny_config["algorithm"] = {"name": "pref_grpo", "clip_range": 0.2, "adv_clip": 5.0, "pref_grpo": dict(opts)}
    tiny_config["train"].update(iterations=1, steps_per_iter=1)
    return tiny_config


def _scored(reward, media, weights, extra=None, group_size=None):
    """A ScoredRollout of one rank from the reward components as the recipe builds them (WeightedSum naming)."""
    n = media.shape[0]
    meta = [{"group": k // (group_size or n)} for k in range(n)]
    comps = {}
    for name, r in [(next(iter(weights)), reward)] + list((extra or {}).items()):
        out = r(media, ["p"] * n, meta)
        comps[name] = out.scores
        comps.update({f"{name}/{k}": v for k, v in out.components.items()})
    scores = sum(w * comps[k] for k, w in weights.items())
    groups = torch.tensor([m["group"] for m in meta])
    valid = torch.ones(n, dtype=torch.bool)
    return ScoredRollout(scores=scores, valid=valid, components=comps, weights=dict(weights), all_scores=scores,
                         all_groups=groups, all_valid=valid, rank=0, world=1, gather=lambda t: t)


class Brightness:
    name, modality = "bright", "image"

    def __call__(self, media, prompts, metadata=None):
        from flowalign.rewards.base import RewardOutput

        return RewardOutput(scores=media.float().mean(dim=(1, 2, 3)) ** 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_blend_on_advantages_with_a_second_reward_matches_the_reference_form(tiny_config, seed):
    """Two groups of 4, the judge at weight 0.7 and a pointwise reward at 0.3 (the Flux script's
    reward_spec {"unifiedreward_flex": 0.7, "clip": 0.3})."""
    rng = random.Random(seed)
    table = {}
    responses = []
    for g in range(2):
        t, r = _random_table(rng, list(range(4 * g, 4 * g + 4)))
        table.update(t)
        responses.append(r)
    algo = _algorithm(tiny_config)
    weights = {"table_winrate": 0.7, "bright": 0.3}
    scored = _scored(PairwiseAsPointwise(TableJudge(table)), _media(8), weights, {"bright": Brightness()}, group_size=4)
    got = algo.leaf_advantages(scored)
    parts = [_reference_rates(4, [(i - 4 * g, j - 4 * g, w, c) for i, j, w, c in responses[g]], 0.3, 0.7,
                              [1.0, 0.7, 0.7]) for g in range(2)]
    overall = torch.tensor([x for p in parts for x in p[0]], dtype=torch.float64)
    dim_mean = torch.tensor([x for p in parts for x in p[2]], dtype=torch.float64)
    mask = torch.tensor([x for p in parts for x in p[3]])
    bright = (torch.arange(8, dtype=torch.float64)) ** 2
    ref = _reference_advantages({"table_winrate": overall, "bright": bright}, weights,
                                {"table_winrate": (overall, dim_mean, mask)}, 4, 0.3, 0.7)
    torch.testing.assert_close(got.double(), ref.clamp(-5, 5), atol=1e-5, rtol=0)


def test_a_judge_without_dimensions_trains_as_before(tiny_config):
    from tests.test_fidelity_flow_pref import MeanBrightnessJudge

    algo = _algorithm(tiny_config)
    media = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    scored = _scored(PairwiseAsPointwise(MeanBrightnessJudge()), media, {"brightness_winrate": 1.0}, group_size=4)
    assert set(scored.components) == {"brightness_winrate", "brightness_winrate/failed_frac"}
    assert torch.equal(algo.leaf_advantages(scored), FlowAlgorithm.leaf_advantages(algo, scored))


def test_helpers_edge_cases():
    # dim_weight 0: the overall verdict alone (unifiedreward_flex.py line 230; dispatcher.py line 667)
    o, d, m = torch.tensor([0.2, 0.8]), torch.tensor([0.9, 0.1]), torch.tensor([True, True])
    assert torch.equal(blend_advantages(o, d, m, overall_weight=0.3, dim_weight=0.0), o)
    rates, counts = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    # weights that sum to 0 over a sample's dimensions: the plain mean (unifiedreward_flex.py lines 203-209)
    assert blend_win_rates(torch.tensor([0.5]), rates, counts, dimension_weights=[0.0, 0.0], overall_weight=1,
                           dim_weight=1)[1].item() == pytest.approx(0.5)
    # a shorter weight list is padded with 1.0: (1*0.2 + 1*1 + 1*0) / 3
    three = blend_win_rates(torch.tensor([0.5]), torch.tensor([[0.2, 1.0, 0.0]]), torch.ones(1, 3),
                            dimension_weights=[1.0], overall_weight=1, dim_weight=1)[1]
    assert three.item() == pytest.approx(0.4)
    x = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(standardize(x), (x - x.mean()) / (x.std() + 1e-8))
    with pytest.raises(ValueError, match="overall_weight and dim_weight"):
        blend_win_rates(torch.tensor([0.5]), rates, counts, dimension_weights=[], overall_weight=0, dim_weight=0)


def test_digit_aspect_judge_dimensions_are_what_they_say():
    from flowalign.rewards.digits import DigitAspectJudge, DigitPairwiseJudge

    path = os.path.join(REPO, "assets", "quickstart", "digit-classifier")
    judge = DigitAspectJudge(path)
    blur = torch.full((1, 3, 16, 16), 0.5)
    stroke = torch.zeros(1, 3, 16, 16)
    stroke[..., 4:12, 7:9] = 1.0  # a centred black-and-white bar
    off = torch.zeros(1, 3, 16, 16)
    off[..., 0:4, 0:2] = 1.0  # the same kind of bar in a corner
    s = judge.aspect_scores(torch.cat([blur, stroke, off]), ["a one"] * 3)
    assert s[0, 1] == 0 and s[1, 1] == 1 and s[2, 1] == 1  # sharpness: grey blur 0, pure strokes 1
    assert s[1, 2] == pytest.approx(1.0) and s[2, 2] < 0.5  # centering
    overall, dims = judge.compare_dimensions(stroke, off, ["a one"])
    assert dims.shape == (1, 3) and dims[0, 1] == 0.5 and dims[0, 2] > 0.5
    torch.testing.assert_close(overall, DigitPairwiseJudge(path).compare(stroke, off, ["a one"]))


def test_blend_through_the_rl_recipe(tiny_config, monkeypatch):
    """The dimensioned toy judge through the real rl recipe with the reference's defaults: the reward carries the
    dimension win rates, PrefGRPO blends them on the advantages, the run trains on finite losses."""
    import flowalign.algorithms.pref_grpo as pref_grpo

    calls = []

    def spy(*args, **kwargs):
        out = blend_advantages(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(pref_grpo, "blend_advantages", spy)
    cfg = _pref(tiny_config)
    flowalign.train(cfg)
    assert calls and calls[0][0] == {"overall_weight": 0.3, "dim_weight": 0.7}
    assert calls[0][1].shape == (8,)
    rec = read_metrics(os.path.join(cfg["output_dir"], "metrics.jsonl"))
    train = [r for r in rec if "train/loss" in r]
    assert train and all(math.isfinite(r["train/loss"]) for r in train)
    assert any(k.endswith("/dim/sharpness") for r in train for k in r)


def test_blend_keys_errors(tiny_config):
    from flowalign.algorithms.pref_grpo import PrefGRPOConfig
    from flowalign.config import ConfigError

    c = PrefGRPOConfig()
    assert (c.overall_weight, c.dim_weight, c.dimension_weights, c.blend_on) == (0.3, 0.7, [1.0, 0.7, 0.7], "advantages")
    for key, bad in [("blend_on", "both"), ("overall_weight", -1.0), ("dimension_weights", [1.0, -0.5])]:
        cfg = _pref(dict(tiny_config, train=dict(tiny_config["train"])), **{key: bad})
        with pytest.raises(ConfigError, match=f"algorithm.pref_grpo.{key}"):
            flowalign.load_config(cfg)
    cfg = _pref(dict(tiny_config, train=dict(tiny_config["train"])), overall_weight=0.0, dim_weight=0.0)
    with pytest.raises(ConfigError, match="algorithm.pref_grpo"):
        flowalign.load_config(cfg)
