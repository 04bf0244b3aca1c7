"""Tests of flowalign/estimators/tree.py (BranchGRPO and TempFlow-GRPO estimators).

A 16-leaf BranchGRPO tree is built by hand as flat tensors (1 root, k=2 splits at all 4 depths),
with node values, advantages and pruned edge sets written out; every estimator is also checked
against a plain Python loop and run on real trees sampled by ``flowalign.rollout.rollout``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch

from flowalign.advantages import edge_advantages
from flowalign.estimators import (
    branch_step_advantages,
    branch_step_edge_advantages,
    depth_prune,
    depthwise_advantages,
    edge_group_ids,
    fuse_node_rewards,
    noise_aware_weights,
    width_prune,
)

# -- the hand-built 16-leaf tree ------------------------------------------------------------------------
# Edge ids in the engine's order: step 0 -> edges 0,1 (roots); step 1 -> 2..5; step 2 -> 6..13;
# step 3 -> 14..29. Child j of step t (t>0) has parent (first id of step t-1) + j // 2.
# Leaf l's path: [l // 8, 2 + l // 4, 6 + l // 2, 14 + l].
FIRST = [0, 2, 6, 14]
PARENT = torch.tensor([-1, -1] + [FIRST[t - 1] + j // 2 for t in (1, 2, 3) for j in range(2 ** (t + 1))])
STEP = torch.tensor([t for t in range(4) for _ in range(2 ** (t + 1))])
LEAF_EDGES = torch.tensor([[l // 8, 2 + l // 4, 6 + l // 2, 14 + l] for l in range(16)])
R = torch.tensor([1.0, 3, 0, 2, 5, 5, 4, 8, 2, 2, 6, 0, 9, 7, 1, 1])
E = 30


def parts(**extra):
    return {"parent": PARENT, "step": STEP, "leaf_edges": LEAF_EDGES, **extra}


def loop_descendants(leaf_edges, num_edges):
    """Plain-Python: descendant leaves of every edge."""
    desc = [[] for _ in range(num_edges)]
    for l, row in enumerate(leaf_edges.tolist()):
        for e in row:
            desc[e].append(l)
    return desc


def loop_fuse(leaf_edges, r, num_edges, logp=None, temperature=1.0):
    desc = loop_descendants(leaf_edges, num_edges)
    out = []
    for e in range(num_edges):
        if logp is None:
            out.append(sum(float(r[l]) for l in desc[e]) / len(desc[e]))
        else:
            s = [sum(float(logp[x]) for x in leaf_edges[l].tolist()) / temperature for l in desc[e]]
            m = max(s)
            w = [math.exp(v - m) for v in s]
            out.append(sum(wi * float(r[l]) for wi, l in zip(w, desc[e])) / sum(w))
    return torch.tensor(out, dtype=torch.float64)


def loop_depthwise(values, step, tree, eps):
    out = []
    for e in range(len(values)):
        grp = [float(values[j]) for j in range(len(values)) if step[j] == step[e] and tree[j] == tree[e]]
        mu = sum(grp) / len(grp)
        sd = math.sqrt(sum((g - mu) ** 2 for g in grp) / len(grp))
        out.append(0.0 if max(grp) == min(grp) else (float(values[e]) - mu) / (sd + eps))
    return torch.tensor(out, dtype=torch.float64)


def test_hand_tree_is_consistent():
    assert PARENT.shape == STEP.shape == (E,)
    # column t of leaf_edges is a step-t edge and consecutive columns are parent -> child
    assert torch.equal(STEP[LEAF_EDGES], torch.arange(4).expand(16, 4))
    assert torch.equal(PARENT[LEAF_EDGES[:, 1:]], LEAF_EDGES[:, :-1])


# -- BranchGRPO: fusion ------------------------------------------------------------------------------
def test_fuse_mean_hand_worked():
    v = fuse_node_rewards(parts(), R, mode="mean")
    expected = torch.tensor(
        [3.5, 3.5]  # step 0: mean of leaves 0-7 and 8-15
        + [1.5, 5.5, 2.5, 4.5]  # step 1: quads
        + [2, 1, 5, 6, 2, 3, 8, 1]  # step 2: pairs
        + R.tolist()  # step 3: the leaves themselves
    )
    assert torch.allclose(v, expected, atol=0, rtol=0)
    assert v.dtype == torch.float32
    # Independent: the plain loop, and the library's edge_advantages (mean of leaves under an edge).
    assert torch.allclose(v.double(), loop_fuse(LEAF_EDGES, R, E), atol=1e-6)
    assert torch.allclose(v, edge_advantages(R, LEAF_EDGES, E), atol=1e-6)


def test_fuse_path_logprob_softmax_hand_worked():
    # flowalign's earlier whole-path softmax, kept as fusion="path_logprob_softmax" (the reference's
    # bottom-up form is "logprob_softmax": tests/test_fidelity_branch.py).
    # Path log-probs: ln 3 on the step-3 edges of even leaves, 0 elsewhere, so within a pair the
    # even leaf weighs 3/4 and the odd one 1/4; over a quad (even, odd, even, odd) -> 3/8, 1/8, 3/8, 1/8.
    logp = torch.zeros(E)
    logp[14 + torch.arange(0, 16, 2)] = math.log(3.0)
    v = fuse_node_rewards(parts(log_prob_old=logp), R, mode="path_logprob_softmax")
    step2 = [0.75 * R[2 * j] + 0.25 * R[2 * j + 1] for j in range(8)]
    assert torch.allclose(v[6:14], torch.tensor([1.5, 0.5, 5.0, 5.0, 2.0, 4.5, 8.5, 1.0]))
    assert torch.allclose(v[6:14], torch.stack(step2))
    assert torch.allclose(v[2], torch.tensor((3 * 1 + 1 * 3 + 3 * 0 + 1 * 2) / 8.0))  # = 1.0
    assert torch.allclose(v[14:], R)  # a leaf's own value is its reward
    assert torch.allclose(v.double(), loop_fuse(LEAF_EDGES, R, E, logp), atol=1e-6)
    # temperature 2: the even leaf's weight is sqrt(3) / (sqrt(3) + 1)
    v2 = fuse_node_rewards(parts(log_prob_old=logp), R, mode="path_logprob_softmax", temperature=2.0)
    w = math.sqrt(3) / (math.sqrt(3) + 1)
    assert torch.allclose(v2[6], torch.tensor(w * 1 + (1 - w) * 3))
    assert torch.allclose(v2.double(), loop_fuse(LEAF_EDGES, R, E, logp, 2.0), atol=1e-6)
    # Equal path log-probs -> uniform weights -> the mean fusion.
    same = fuse_node_rewards(parts(log_prob_old=torch.full((E,), -2.0)), R, mode="path_logprob_softmax")
    assert torch.allclose(same, fuse_node_rewards(parts(), R))


def test_fuse_logprob_shared_prefix_cancels():
    # A constant added to an ancestor edge's log-prob shifts every descendant path equally: no change.
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(E, generator=g)
    base = fuse_node_rewards(parts(log_prob_old=logp), R, mode="path_logprob_softmax")
    shifted = logp.clone()
    shifted[0] += 50.0  # edge 0 is on the path of every leaf under itself: cancels everywhere
    shifted[3] -= 7.0  # edge 3 is shared by all leaves of the nodes under it: only its ancestor 0 moves
    out = fuse_node_rewards(parts(log_prob_old=shifted), R, mode="path_logprob_softmax")
    assert torch.allclose(out[1:], base[1:], atol=1e-6)
    assert not torch.allclose(out[0], base[0])
    # ...but changing a leaf edge's log-prob does change its ancestors' values.
    moved = logp.clone()
    moved[14] += 3.0
    assert not torch.allclose(fuse_node_rewards(parts(log_prob_old=moved), R, mode="path_logprob_softmax")[6], base[6])
    # Extreme log-probs stay finite (per-node max subtraction).
    big = fuse_node_rewards(parts(log_prob_old=logp * 1e4), R, mode="path_logprob_softmax")
    assert torch.isfinite(big).all()


def test_fuse_errors():
    with pytest.raises(ValueError, match="mode"):
        fuse_node_rewards(parts(), R, mode="max")
    with pytest.raises(ValueError, match="log_prob_old"):
        fuse_node_rewards(parts(), R, mode="logprob_softmax")
    with pytest.raises(ValueError, match="temperature"):
        fuse_node_rewards(parts(log_prob_old=torch.zeros(E)), R, mode="logprob_softmax", temperature=0.0)
    with pytest.raises(ValueError, match="leaf_rewards"):
        fuse_node_rewards(parts(), R[:15])
    with pytest.raises(FloatingPointError, match="leaf_rewards"):
        fuse_node_rewards(parts(), torch.full((16,), float("nan")))
    with pytest.raises(ValueError, match="leaf_edges"):
        fuse_node_rewards(parts(leaf_edges=LEAF_EDGES + 100), R)
    # an edge on no leaf's path has no value
    with pytest.raises(ValueError, match="no leaf's path"):
        fuse_node_rewards({"step": torch.cat([STEP, torch.tensor([3])]), "leaf_edges": LEAF_EDGES}, R)
    with pytest.raises(TypeError, match="tree_or_parts"):
        fuse_node_rewards([PARENT, STEP], R)


# -- BranchGRPO: depth-wise advantages ---------------------------------------------------------------
def test_depthwise_hand_worked():
    v = fuse_node_rewards(parts(), R)
    a = depthwise_advantages(v, STEP, torch.zeros(E, dtype=torch.long), eps=0.0)
    expected = torch.tensor(
        [0.0, 0.0]  # step 0: both nodes 3.5 -> zero spread -> exactly 0
        + [x / math.sqrt(2.5) for x in (-2, 2, -1, 1)]  # step 1: mean 3.5, var 10/4
        + [x / math.sqrt(5.75) for x in (-1.5, -2.5, 1.5, 2.5, -1.5, -0.5, 4.5, -2.5)]  # var 46/8
        + [x / math.sqrt(7.75) for x in (-2.5, -0.5, -3.5, -1.5, 1.5, 1.5, 0.5, 4.5,
                                         -1.5, -1.5, 2.5, -3.5, 5.5, 3.5, -2.5, -2.5)]  # var 124/16
    )
    assert torch.allclose(a, expected, atol=1e-6)
    assert torch.equal(a[:2], torch.zeros(2))
    assert torch.allclose(a.double(), loop_depthwise(v, STEP, [0] * E, 0.0), atol=1e-6)
    # Default eps 1e-4 against the loop, and two trees normalised separately.
    tid = torch.tensor([0] * 15 + [1] * 15)  # arbitrary split of the edges into two "trees"
    a2 = depthwise_advantages(v, STEP, tid)
    assert torch.allclose(a2.double(), loop_depthwise(v, STEP, tid.tolist(), 1e-4), atol=1e-6)


def test_depthwise_errors():
    v = torch.zeros(E)
    with pytest.raises(ValueError, match="step"):
        depthwise_advantages(v, STEP[:5], torch.zeros(E, dtype=torch.long))
    with pytest.raises(TypeError, match="tree_id"):
        depthwise_advantages(v, STEP, torch.zeros(E))
    with pytest.raises(ValueError, match="node_values"):
        depthwise_advantages(v[:, None], STEP, STEP)
    assert torch.equal(depthwise_advantages(torch.ones(E), STEP, STEP), torch.zeros(E))


# -- BranchGRPO: pruning -------------------------------------------------------------------------------
def test_width_prune_best_worst_hand_worked():
    keep = width_prune(parts(), R, mode="best_worst", num_keep=1)
    # best leaf 12 (r=9): edges 1, 5, 12, 26; worst r=0 is a tie of leaves 2 and 11 -> the worst side
    # takes the higher id, leaf 11: edges 1, 4, 11, 25.
    assert keep.nonzero()[:, 0].tolist() == [1, 4, 5, 11, 12, 25, 26]
    # Only trained edges are cut: an untrainable step 0 (ODE) stays untrainable.
    trainable = STEP > 0
    keep2 = width_prune(parts(trainable=trainable), R, mode="best_worst", num_keep=1)
    assert keep2.nonzero()[:, 0].tolist() == [4, 5, 11, 12, 25, 26]
    assert not bool((keep2 & ~trainable).any())
    # num_keep=2 adds leaf 7 (r=8) and leaf 2 (r=0) -> union of four paths, checked by a loop.
    keep3 = width_prune(parts(), R, mode="best_worst", num_keep=2)
    expect = sorted({e for l in (12, 7, 2, 11) for e in LEAF_EDGES[l].tolist()})
    assert keep3.nonzero()[:, 0].tolist() == expect
    # Per group: two groups of 8 leaves, best+worst of each.
    keep4 = width_prune(parts(leaf_group=torch.tensor([0] * 8 + [1] * 8)), R, mode="best_worst", num_keep=1)
    # group 0: best leaf 7 (r=8), worst leaf 2 (r=0); group 1: best leaf 12, worst leaf 11
    expect = sorted({e for l in (7, 2, 12, 11) for e in LEAF_EDGES[l].tolist()})
    assert keep4.nonzero()[:, 0].tolist() == expect


def test_width_prune_fraction_hand_worked():
    v = fuse_node_rewards(parts(), R)
    a = depthwise_advantages(v, STEP, torch.zeros(E, dtype=torch.long), eps=0.0)
    keep = width_prune(parts(), mode="fraction", keep_fraction=0.5, advantages=a)
    # Per sibling pair keep the child with the larger |A| (ties -> lower id):
    # step 0: 0,0 tie -> 0; step 1: (2,3) tie -> 2, (4,5) tie -> 4;
    # step 2 |dev|: (1.5,2.5)->7, (1.5,2.5)->9, (1.5,0.5)->10, (4.5,2.5)->12;
    # step 3 |dev|: (2.5,.5)->14, (3.5,1.5)->16, tie->18, (.5,4.5)->21, tie->22, (2.5,3.5)->25,
    #               (5.5,3.5)->26, tie->28.
    assert keep.nonzero()[:, 0].tolist() == [0, 2, 4, 7, 9, 10, 12, 14, 16, 18, 21, 22, 25, 26, 28]
    # keep_fraction 1 keeps everything trainable; a non-branching chain is never cut.
    assert bool(width_prune(parts(), mode="fraction", keep_fraction=1.0, advantages=a).all())
    chain = {"parent": torch.tensor([-1, 0, 1]), "step": torch.tensor([0, 1, 2]),
             "leaf_edges": torch.tensor([[0, 1, 2]])}
    assert bool(width_prune(chain, mode="fraction", keep_fraction=0.1, advantages=torch.zeros(3)).all())


def test_width_prune_errors():
    with pytest.raises(ValueError, match="mode"):
        width_prune(parts(), R, mode="random")
    with pytest.raises(ValueError, match="leaf_rewards"):
        width_prune(parts(), None, mode="best_worst")
    with pytest.raises(ValueError, match="num_keep"):
        width_prune(parts(), R, mode="best_worst", num_keep=0)
    with pytest.raises(ValueError, match="advantages"):
        width_prune(parts(), mode="fraction")
    with pytest.raises(ValueError, match="keep_fraction"):
        width_prune(parts(), mode="fraction", keep_fraction=0.0, advantages=torch.zeros(E))
    with pytest.raises(ValueError, match="trainable"):
        width_prune(parts(trainable=torch.ones(E)), R)


def test_depth_prune_sliding_window():
    # window 1 over 4 depths: iteration i prunes depth i mod 4
    for it, d in [(0, 0), (1, 1), (3, 3), (4, 0), (9, 1)]:
        keep = depth_prune(STEP, it, 1, num_steps=4)
        assert torch.equal(keep, STEP != d), (it, d)
    # window 2: 3 positions {0,1}, {1,2}, {2,3}; iteration 2 prunes depths 2 and 3, iteration 3 wraps
    assert torch.equal(depth_prune(STEP, 2, 2, num_steps=4), STEP < 2)
    assert torch.equal(depth_prune(STEP, 3, 2, num_steps=4), STEP >= 2)
    # stride 2, start 1: iteration 1 -> d = 3 % 3 = 0
    assert torch.equal(depth_prune(STEP, 1, 2, num_steps=4, stride=2, start=1), STEP >= 2)
    # window 0 prunes nothing; untrainable edges stay untrainable
    tr = STEP != 1
    assert torch.equal(depth_prune(STEP, 5, 0, num_steps=4, trainable=tr), tr)
    assert torch.equal(depth_prune(STEP, 0, 1, num_steps=4, trainable=tr), (STEP >= 2))
    # Loop check of the window rule
    for it in range(7):
        d = (it * 1) % 3
        expect = torch.tensor([not (d <= s < d + 2) for s in STEP.tolist()])
        assert torch.equal(depth_prune(STEP, it, 2, num_steps=4), expect)
    with pytest.raises(ValueError, match="window"):
        depth_prune(STEP, 0, 4, num_steps=4)
    with pytest.raises(ValueError, match="iteration"):
        depth_prune(STEP, -1, 1, num_steps=4)
    with pytest.raises(ValueError, match="step"):
        depth_prune(STEP + 1, 0, 1, num_steps=4)


# -- TempFlow-GRPO ----------------------------------------------------------------------------------------
def test_branch_step_advantages_hand_worked():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0, 8.0, 5.0, 7.0])
    k = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 0])
    g = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1])
    a = branch_step_advantages(r, k, g, eps=0.0)
    s = math.sqrt(32 / 3)  # step 2: mean 4, var (16 + 0 + 16) / 3
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0, -4 / s, 0.0, 4 / s, -1.0, 1.0])
    assert torch.allclose(a, expected, atol=1e-6)
    # independent loop over (group, step)
    loop = loop_depthwise(r, k.tolist(), g.tolist(), 1e-4)
    assert torch.allclose(branch_step_advantages(r, k, g).double(), loop, atol=1e-6)
    with pytest.raises(ValueError, match="branch_step"):
        branch_step_advantages(r, k[:3], g)


def test_noise_aware_weights_hand_worked():
    std = torch.tensor([0.0, 0.4, 0.2, 0.2, 0.0])
    w = noise_aware_weights(std)
    # mean over the 3 stochastic edges is 0.8/3 -> weights std * 3 / 0.8
    assert torch.allclose(w, torch.tensor([0.0, 1.5, 0.75, 0.75, 0.0]))
    assert torch.allclose(w[std > 0].mean(), torch.tensor(1.0))
    # an explicit mask (e.g. after pruning)
    w2 = noise_aware_weights(std, mask=torch.tensor([False, True, True, False, False]))
    assert torch.allclose(w2, torch.tensor([0.0, 4 / 3, 2 / 3, 0.0, 0.0]))
    assert torch.equal(noise_aware_weights(torch.zeros(4)), torch.zeros(4))  # never NaN
    with pytest.raises(ValueError, match="noise_std"):
        noise_aware_weights(torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="mask"):
        noise_aware_weights(std, mask=torch.ones(5))


# -- real trees from the rollout engine ---------------------------------------------------------------------
def _roll(toy, spec, seed=0):
    from flowalign.rollout import rollout

    adapter, cond = toy
    return rollout(adapter, cond, spec, prompts=["the digit one", "a handwritten seven"],
                   generator=torch.Generator().manual_seed(seed), group_ids=torch.tensor([5, 9]), decode=False)


def test_branchgrpo_on_real_rollout_tree(toy):
    from flowalign.rollout import BranchSpec

    spec = BranchSpec(num_steps=4, noise_levels=(0.7,) * 4, splits=((0, 2), (2, 2)), train_steps=(1, 2, 3))
    tree = _roll(toy, spec)
    E, L = tree.num_edges, tree.num_leaves
    assert L == 8
    r = tree.leaf_latents.flatten(1).mean(1)  # a real per-leaf score
    groups = edge_group_ids(tree)
    assert torch.equal(groups, torch.tensor([5, 9])[tree.prompt_idx])
    for mode in ("mean", "path_logprob_softmax"):
        v = fuse_node_rewards(tree, r, mode=mode)
        logp = tree.log_prob_old if mode != "mean" else None
        assert torch.allclose(v.double(), loop_fuse(tree.leaf_edges, r, E, logp), atol=1e-5), mode
        assert torch.allclose(v[tree.leaf_edges[:, -1]], r)
        # a non-branching step (1, 3) leads to a node with the same leaves as its parent's node
        chain = (tree.step == 1) | (tree.step == 3)
        assert torch.allclose(v[chain], v[tree.parent[chain]])
        a = depthwise_advantages(v, tree.step, groups)
        assert torch.allclose(a.double(), loop_depthwise(v, tree.step.tolist(), groups.tolist(), 1e-4), atol=1e-5)
        assert torch.isfinite(a).all()
    keep = width_prune(tree, r, mode="best_worst", num_keep=1)
    assert not bool((keep & ~tree.trainable).any())
    assert bool((keep[tree.step == 0] == False).all())  # step 0 not in train_steps  # noqa: E712
    # per prompt 2 leaves are kept (best + worst of 4): their last edges are exactly 4 in total
    assert int(keep[tree.step == 3].sum()) == 4
    keep_f = width_prune(tree, mode="fraction", keep_fraction=0.5, advantages=a, tree_id=groups)
    assert int(keep_f[tree.step == 2].sum()) == int((tree.step == 2).sum()) // 2
    assert bool(keep_f[tree.step == 1].all())  # non-branching step: never cut
    keep_d = depth_prune(tree.step, 1, 1, num_steps=4, trainable=tree.trainable)
    assert torch.equal(keep_d, tree.trainable & (tree.step != 1))


def test_tempflow_on_real_rollout_tree(toy):
    from flowalign.rollout import BranchSpec

    # ODE trunk, K=3 SDE children at step 1, ODE finish.
    spec = BranchSpec(num_steps=4, noise_levels=(0.0, 0.8, 0.0, 0.0), splits=((1, 3),))
    tree = _roll(toy, spec)
    r = tree.leaf_latents.flatten(1).std(1)
    adv = branch_step_edge_advantages(tree, r)
    assert torch.equal(adv[tree.step != 1], torch.zeros(int((tree.step != 1).sum())))
    branch_edges = tree.leaf_edges[:, 1]
    expect = branch_step_advantages(r, torch.ones(6, dtype=torch.long), tree.leaf_group)
    assert torch.allclose(adv[branch_edges], expect)
    assert torch.allclose(expect.double(), loop_depthwise(r, [1] * 6, tree.leaf_group.tolist(), 1e-4), atol=1e-5)
    # A leaf with two stochastic edges is rejected, naming the leaf.
    flat = _roll(toy, BranchSpec.flat(3, 2, 0.7))
    with pytest.raises(ValueError, match="leaf 0 has 3 stochastic edges"):
        branch_step_edge_advantages(flat, torch.zeros(flat.num_leaves))


def test_noise_aware_weights_on_real_tree(toy):
    from flowalign.rollout import BranchSpec

    a = 0.7
    tree = _roll(toy, BranchSpec.flat(5, 2, a))
    w = noise_aware_weights(tree.noise_std)
    assert torch.allclose(w.mean(), torch.tensor(1.0), atol=1e-6)
    # Independent: Flow-GRPO std_t * sqrt(delta) with std_t = a sqrt(sigma / (1 - sigma)) on steps
    # with sigma < 1, computed from the schedule; weights must be proportional to it.
    s, sn = tree.sigmas[tree.step].double(), tree.sigmas[tree.step + 1].double()
    inner = s < 1
    ref = a * torch.sqrt(s[inner] / (1 - s[inner])) * torch.sqrt(s[inner] - sn[inner])
    ratio = w[inner].double() / ref
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    # early (noisier) steps weigh more than the last one
    assert float(w[tree.step == 0].mean()) > float(w[tree.step == 4].mean())
