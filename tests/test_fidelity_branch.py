"""BranchGRPO against its reference code (issue 13, item 4): Fredreic1849/BranchGRPO @ 19fbb9f,
``fastvideo/train_branchgrpo_flux.py``.

* fusion: ``logprob_softmax`` is the reference's bottom-up per-node softmax over child-edge
  log-probs (lines 614-640), checked on a hand-worked tree and against a recursive Python walk of
  real rollout trees; ``path_logprob_softmax`` is flowalign's earlier whole-path form;
* normalisation per root (lines 1148-1180) with the 1e-6 std floor and unbiased std + 1e-8
  (lines 663-680), against a Python transcription of that rule on real trees;
* depth pruning that slides toward shallower depths and stops (lines 1278-1294), against the
  reference's depth arithmetic, and through the real RL recipe.
"""

from __future__ import annotations

import math
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from flowalign.algorithms.branch_grpo import BranchGRPOConfig, branch_targets
from flowalign.estimators.tree import depth_prune, depthwise_advantages, edge_root_ids, fuse_node_rewards
from tests.test_estimators_tree import _roll as roll

# -- a hand tree where the two softmax forms differ -----------------------------------------------
# e0 (step 0, chain) -> split at step 1 into e1, e2 -> chains e3 (of e1), e4 (of e2) at step 2 ->
# split at step 3: e3 -> leaves e5, e6; e4 -> leaves e7, e8.
PARENT = torch.tensor([-1, 0, 0, 1, 2, 3, 3, 4, 4])
STEP = torch.tensor([0, 1, 1, 2, 2, 3, 3, 3, 3])
LEAF_EDGES = torch.tensor([[0, 1, 3, 5], [0, 1, 3, 6], [0, 2, 4, 7], [0, 2, 4, 8]])
LOGP = torch.tensor([0.0, math.log(2), 0.0, 0.0, math.log(4), math.log(3), 0.0, 0.0, 0.0])
R = torch.tensor([1.0, 0.0, 0.0, 1.0])


def hand():
    return {"parent": PARENT, "step": STEP, "leaf_edges": LEAF_EDGES, "log_prob_old": LOGP}


def test_bottom_up_fusion_hand_worked():
    v = fuse_node_rewards(hand(), R, mode="logprob_softmax")
    # e3's children: weights 3/4, 1/4 -> 0.75; e4's: 1/2, 1/2 -> 0.5. The chains e1, e2 pass them up
    # (e4's own log-prob ln 4 is never used). e0: softmax(ln 2, 0) = (2/3, 1/3) -> 2/3.
    expected = torch.tensor([2 / 3, 0.75, 0.5, 0.75, 0.5, 1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(v, expected, atol=1e-7)
    # The earlier whole-path softmax: path weights 2*3, 2*1, 4*1, 4*1 -> e0 = (6 + 4) / 16.
    p = fuse_node_rewards(hand(), R, mode="path_logprob_softmax")
    assert abs(float(p[0]) - 10 / 16) < 1e-7 and abs(float(v[0]) - float(p[0])) > 0.04
    # temperature 2: e3 weighs sqrt(3) : 1; e0 weighs sqrt(2) : 1.
    v2 = fuse_node_rewards(hand(), R, mode="logprob_softmax", temperature=2.0)
    w3, w0 = math.sqrt(3) / (math.sqrt(3) + 1), math.sqrt(2) / (math.sqrt(2) + 1)
    assert abs(float(v2[3]) - w3) < 1e-6 and abs(float(v2[0]) - (w0 * w3 + (1 - w0) * 0.5)) < 1e-6
    # leaves and parent must agree
    with pytest.raises(ValueError, match="parent"):
        fuse_node_rewards({**hand(), "parent": torch.tensor([-1, 0, 0, 1, 2, 3, 3, 4, 5])}, R, mode="logprob_softmax")


def recursive_fuse(parent, logp, leaf_edges, r, temperature=1.0):
    """The reference's rule as a recursive walk of child lists (one softmax per node)."""
    children = {e: [c for c in range(len(parent)) if parent[c] == e] for e in range(len(parent))}
    leaf_of = {row[-1]: l for l, row in enumerate(leaf_edges)}

    def value(e):
        if not children[e]:
            return float(r[leaf_of[e]])
        cs = children[e]
        if len(cs) == 1:
            return value(cs[0])
        s = np.array([logp[c] / temperature for c in cs])
        w = np.exp(s - s.max())
        return float(np.sum(w / w.sum() * np.array([value(c) for c in cs])))

    return torch.tensor([value(e) for e in range(len(parent))], dtype=torch.float64)


@pytest.mark.parametrize("splits", [((0, 2), (2, 2)), ((1, 2), (2, 3))])
def test_bottom_up_fusion_on_real_trees(toy, splits):
    from flowalign.rollout import BranchSpec

    tree = roll(toy, BranchSpec(num_steps=4, noise_levels=(0.7,) * 4, samples_per_prompt=2, splits=splits))
    r = tree.leaf_latents.flatten(1).mean(1)
    logp = (tree.log_prob_old * 20).tolist()  # spread the weights so the forms differ visibly
    parts = {"parent": tree.parent, "step": tree.step, "leaf_edges": tree.leaf_edges,
             "log_prob_old": torch.tensor(logp)}
    for temp in (1.0, 0.5):
        v = fuse_node_rewards(parts, r, mode="logprob_softmax", temperature=temp)
        ref = recursive_fuse(tree.parent.tolist(), logp, tree.leaf_edges.tolist(), r.tolist(), temp)
        assert torch.allclose(v.double(), ref, atol=1e-5)
    assert not torch.allclose(v, fuse_node_rewards(parts, r, mode="path_logprob_softmax", temperature=0.5), atol=1e-4)


# -- per-root normalisation with the reference's std rule ------------------------------------------------
def reference_advantages(tree, values):
    """The reference's per-root, per-depth rule: one node -> 0; torch.std (ddof 1) < 1e-6 -> 0;
    else (v - mean) / (std + 1e-8). Roots found by walking parents and keying the initial latent."""
    parent, step = tree.parent.tolist(), tree.step.tolist()
    root_key = []
    for e in range(len(parent)):
        a = e
        while parent[a] >= 0:
            a = parent[a]
        root_key.append((int(tree.prompt_idx[a]), tuple(tree.x_t[a].flatten().tolist())))
    out = [0.0] * len(parent)
    for key in set(root_key):
        for d in set(step):
            cell = [e for e in range(len(parent)) if root_key[e] == key and step[e] == d]
            vals = [float(values[e]) for e in cell]
            if len(vals) <= 1:
                continue
            sd = statistics.stdev(vals)
            if sd < 1e-6:
                continue
            mu = statistics.fmean(vals)
            for e, x in zip(cell, vals):
                out[e] = (x - mu) / (sd + 1e-8)
    return torch.tensor(out, dtype=torch.float64)


def test_edge_root_ids_and_per_root_advantages(toy):
    from flowalign.rollout import BranchSpec

    for splits in (((0, 2), (2, 2)), ((1, 2), (3, 2))):
        tree = roll(toy, BranchSpec(num_steps=4, noise_levels=(0.7,) * 4, samples_per_prompt=2, splits=splits))
        fanout = dict(splits).get(0, 1)
        roots = edge_root_ids(tree, root_fanout=fanout)
        assert int(roots.max()) + 1 == 4  # 2 prompts x 2 initial noises
        # independent: the initial latent each edge's path starts from
        for e in range(tree.num_edges):
            a = e
            while int(tree.parent[a]) >= 0:
                a = int(tree.parent[a])
            same = [f for f in range(tree.num_edges) if int(roots[f]) == int(roots[e])]
            assert all(torch.equal(tree.x_t[a], tree.x_t[g]) for g in same if int(tree.parent[g]) < 0)
        r = tree.leaf_latents.flatten(1).mean(1) * 100
        opts = BranchGRPOConfig(splits=[list(s) for s in splits], fusion="logprob_softmax")
        out = branch_targets(tree, r, opts, 0.0, 0, std_eps=1e-8, unbiased=True)
        values = fuse_node_rewards(tree, r, mode="logprob_softmax")
        expected = reference_advantages(tree, values)
        assert torch.allclose(out.advantages.double(), expected, atol=1e-4)
        # per group (the earlier scope) pools the two roots of a prompt: different advantages
        grouped = branch_targets(tree, r, BranchGRPOConfig(splits=opts.splits, fusion="logprob_softmax",
                                                           norm_scope="group"), 0.0, 0, std_eps=1e-8, unbiased=True)
        assert not torch.allclose(grouped.advantages, out.advantages, atol=1e-3)
    with pytest.raises(ValueError, match="root_fanout"):
        edge_root_ids(tree, root_fanout=3)


def test_std_floor_against_numpy():
    vals = torch.tensor([1.0, 1.0 + 1e-7, 2.0, 4.0, 3.0], dtype=torch.float64)
    step = torch.tensor([0, 0, 1, 1, 1])
    tid = torch.zeros(5, dtype=torch.long)
    a = depthwise_advantages(vals, step, tid, eps=1e-8, unbiased=True, std_floor=1e-6)
    x = np.array([2.0, 4.0, 3.0])
    assert np.std(np.array([1.0, 1.0 + 1e-7]), ddof=1) < 1e-6  # depth 0 is below the floor -> 0
    assert torch.equal(a[:2], torch.zeros(2))
    assert np.allclose(a[2:].numpy(), (x - x.mean()) / (np.std(x, ddof=1) + 1e-8), atol=1e-6)
    # floor 0 (the earlier rule): the tiny spread is standardised to about +-0.7
    b = depthwise_advantages(vals, step, tid, eps=1e-8, unbiased=True, std_floor=0.0)
    y = np.array([1.0, 1.0 + 1e-7])
    assert np.allclose(b[:2].numpy(), (y - y.mean()) / (np.std(y, ddof=1) + 1e-8), atol=1e-3)
    assert abs(float(b[0])) > 0.5
    with pytest.raises(ValueError, match="std_floor"):
        depthwise_advantages(vals, step, tid, std_floor=-1.0)


# -- depth pruning that slides toward shallower depths and stops -----------------------------------------
def reference_pruned_steps(current_step, base_depths, interval, stop_depth):
    """REF lines 1287-1294 in the reference's child depths; returned as edge steps (depth - 1)."""
    shift = min(max(0, current_step // interval), max(0, base_depths[0] - stop_depth))
    return {d - shift - 1 for d in base_depths}


def test_slide_stop_against_reference_arithmetic():
    step = torch.arange(10)
    for window, start, stop, interval in ((2, 6, 3, 2), (3, 7, 5, 1), (1, 4, 4, 3), (2, 8, 0, 30)):
        seen = []
        for it in range(0, 40):
            keep = depth_prune(step, it, window, num_steps=10, mode="slide_stop", start=start, stop=stop, interval=interval)
            pruned = set((~keep).nonzero()[:, 0].tolist())
            base = [start + 1 + j for j in range(window)]  # the reference's --depth_pruning child depths
            assert pruned == reference_pruned_steps(it + 1, base, interval, stop + 1), (window, start, stop, interval, it)
            seen.append(min(pruned))
        assert seen == sorted(seen, reverse=True) and seen[-1] == max(stop, start - 40 // interval)  # never wraps
    # hand-worked: window 2 from step 6, stop 3, one move per 2 iterations: 6, 5, 5, 4, 4, 3, 3, 3, ...
    firsts = [int((~depth_prune(step, it, 2, num_steps=10, mode="slide_stop", start=6, stop=3, interval=2))
                  .nonzero()[0, 0]) for it in range(9)]
    assert firsts == [6, 5, 5, 4, 4, 3, 3, 3, 3]
    # the earlier mode wraps back to 0
    wraps = [int((~depth_prune(step, it, 2, num_steps=10, mode="wrap")).nonzero()[0, 0]) for it in range(10)]
    assert wraps == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]
    # default start is the deepest window
    assert set((~depth_prune(step, 0, 2, num_steps=10, mode="slide_stop", stop=8)).nonzero()[:, 0].tolist()) == {8, 9}
    with pytest.raises(ValueError, match="mode"):
        depth_prune(step, 0, 2, num_steps=10, mode="slide")
    with pytest.raises(ValueError, match="start"):
        depth_prune(step, 0, 2, num_steps=10, mode="slide_stop", start=9)


@pytest.mark.slow
@pytest.mark.parametrize("mode, trained", [("slide_stop", [16.0, 20.0]), ("wrap", [24.0, 22.0])])
def test_depth_prune_modes_through_the_recipe(mode, trained, tmp_path, monkeypatch):
    """2 iterations of configs/branch_grpo/quickstart.yaml, width pruning off: per tree the trained
    steps 0-5 hold 1, 1, 2, 2, 4, 4 edges (28 for 2 prompts). slide_stop from step 4, stop 2: iteration
    0 prunes steps 3, 4 (28 - 12), iteration 1 steps 2, 3 (28 - 8); wrap prunes 0, 1 then 1, 2."""
    import flowalign
    from flowalign.training.metrics import read_metrics
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    overrides = {"train.iterations": 2, "data.prompts_per_iter": 2, "output_dir": str(tmp_path / mode),
                 "eval.samples_per_prompt": 1, "eval.every": 0, "logging.progress": False, "logging.tensorboard": False,
                 "train.checkpoint_every": 0, "train.steps_per_iter": 1, "algorithm.branch_grpo.prune": "none",
                 "algorithm.branch_grpo.depth_prune_window": 2, "algorithm.branch_grpo.depth_prune_mode": mode,
                 "algorithm.branch_grpo.depth_prune_start": 4 if mode == "slide_stop" else 0,
                 "algorithm.branch_grpo.depth_prune_stop": 2}
    summary = flowalign.train(os.path.join(REPO, "configs", "branch_grpo", "quickstart.yaml"), overrides)
    records = [r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r]
    assert [r["rollout/trained_edges"] for r in records] == trained
