"""Tests for flowalign.advantages and flowalign.guards against hand-worked numbers and an
independent numpy loop implementation."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from flowalign.advantages import (
    edge_advantages,
    group_advantages,
)
from flowalign.guards import assert_finite


# ----------------------------------------------------------------------------- reference (numpy)
def numpy_group_advantages(rewards, group_ids, std_mode="group", clip=None, eps=1e-4, valid=None):
    """Independent per-group loop in numpy, written like Flow-GRPO's PerPromptStatTracker."""
    rewards = np.asarray(rewards, dtype=np.float64)
    group_ids = np.asarray(group_ids)
    valid = np.ones(len(rewards), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    out = np.zeros(len(rewards), dtype=np.float64)
    global_std = np.std(rewards[valid]) if valid.any() else 0.0
    for g in np.unique(group_ids):
        members = (group_ids == g) & valid
        r = rewards[members]
        if len(r) < 2 or np.all(r == r[0]):
            continue  # zero-variance / single-member group: advantage 0
        if std_mode == "group":
            denom = np.std(r) + eps
        elif std_mode == "global":
            denom = global_std + eps
        else:
            denom = 1.0
        out[members] = (r - np.mean(r)) / denom
    if clip is not None:
        out = np.clip(out, -clip, clip)
    return out


# Hand-worked example:
#   group 10: rewards 1, 2, 3  -> mean 2, population std sqrt(2/3) = 0.8164965809
#             A = (-1, 0, 1) / 0.8165965809 = (-1.2245948898, 0, 1.2245948898)
#   group 3:  rewards 5, 5     -> zero variance -> (0, 0)
#   group 7:  reward 4         -> single member -> 0
#   group -2: rewards 0, 8     -> mean 4, std 4 -> A = (-4, 4) / 4.0001 = (-0.9999750006, 0.9999750006)
REWARDS = [1.0, 2.0, 3.0, 5.0, 5.0, 4.0, 0.0, 8.0]
GROUPS = [10, 10, 10, 3, 3, 7, -2, -2]
EXPECTED_GROUP = [-1.2245948898, 0.0, 1.2245948898, 0.0, 0.0, 0.0, -0.9999750006, 0.9999750006]
# Global std over all 8 rewards: mean 3.5, variance 46/8 = 5.75, std 2.3979157617; denominator 2.3980157617:
#   group 10: (-1, 0, 1) / 2.3980157617 = (-0.4170114375, 0, 0.4170114375)
#   group -2: (-4, 4) / 2.3980157617   = (-1.6680457501, 1.6680457501)
EXPECTED_GLOBAL = [-0.4170114375, 0.0, 0.4170114375, 0.0, 0.0, 0.0, -1.6680457501, 1.6680457501]
# std_mode="none": plain centering.
EXPECTED_NONE = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -4.0, 4.0]


def _t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def test_hand_worked_group_std():
    adv = group_advantages(_t(REWARDS), _t(GROUPS, torch.long))
    assert adv.dtype == torch.float32 and adv.shape == (8,)
    torch.testing.assert_close(adv, _t(EXPECTED_GROUP), atol=1e-6, rtol=0)


def test_hand_worked_global_std_differs_from_group_std():
    adv = group_advantages(_t(REWARDS), _t(GROUPS, torch.long), std_mode="global")
    torch.testing.assert_close(adv, _t(EXPECTED_GLOBAL), atol=1e-6, rtol=0)
    assert not torch.allclose(adv, _t(EXPECTED_GROUP), atol=1e-3)


def test_hand_worked_std_none():
    adv = group_advantages(_t(REWARDS), _t(GROUPS, torch.long), std_mode="none")
    torch.testing.assert_close(adv, _t(EXPECTED_NONE), atol=1e-6, rtol=0)


def test_clip():
    adv = group_advantages(_t(REWARDS), _t(GROUPS, torch.long), clip=1.0)
    expected = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -0.9999750006, 0.9999750006]
    torch.testing.assert_close(adv, _t(expected), atol=1e-6, rtol=0)
    adv = group_advantages(_t(REWARDS), _t(GROUPS, torch.long), std_mode="none", clip=2.5)
    torch.testing.assert_close(adv, _t([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -2.5, 2.5]), atol=1e-6, rtol=0)


def test_group_ids_are_labels_not_positions():
    # Same groups with other, non-contiguous labels and shuffled order give the same advantages.
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    relabel = {10: 123456789, 3: -50, 7: 0, -2: 42}
    ids = torch.tensor([relabel[g] for g in GROUPS])[perm]
    adv = group_advantages(_t(REWARDS)[perm], ids)
    torch.testing.assert_close(adv, _t(EXPECTED_GROUP)[perm], atol=1e-6, rtol=0)


def test_zero_variance_and_single_member_groups_are_exactly_zero():
    # 0.1 is not representable; a naive mean of seven copies is a rounding error away from 0.1.
    r = torch.full((7,), 0.1, dtype=torch.float64)
    naive = (r - r.mean()) / (r.std(unbiased=False) + 0.0)
    assert not torch.all(naive == 0)  # the naive formula gives NaN or noise here
    for mode in ("group", "global", "none"):
        for eps in (1e-4, 0.0):
            adv = group_advantages(r, torch.zeros(7, dtype=torch.long), std_mode=mode, eps=eps)
            assert torch.equal(adv, torch.zeros(7)), (mode, eps, adv)
            single = group_advantages(torch.tensor([3.7, -1.0]), torch.tensor([0, 1]), std_mode=mode, eps=eps)
            assert torch.equal(single, torch.zeros(2)), (mode, eps, single)


def test_invalid_samples_excluded_from_stats_and_get_zero():
    rewards = _t(REWARDS)
    rewards[2] = float("nan")  # a reward that could not score: never read
    valid = torch.ones(8, dtype=torch.bool)
    valid[2] = False
    adv = group_advantages(rewards, _t(GROUPS, torch.long), valid=valid)
    # group 10 without index 2: rewards 1, 2 -> mean 1.5, std 0.5 -> (-0.5, 0.5) / 0.5001
    expected = [-0.9998000400, 0.9998000400, 0.0, 0.0, 0.0, 0.0, -0.9999750006, 0.9999750006]
    torch.testing.assert_close(adv, _t(expected), atol=1e-6, rtol=0)
    # The global std also ignores invalid samples.
    adv_g = group_advantages(rewards, _t(GROUPS, torch.long), valid=valid, std_mode="global")
    ref = numpy_group_advantages(np.nan_to_num(np.array(REWARDS)), GROUPS, "global", valid=valid.numpy())
    torch.testing.assert_close(adv_g, torch.from_numpy(ref).float(), atol=1e-6, rtol=0)
    # An all-invalid group and an all-invalid batch give zeros.
    none_valid = group_advantages(rewards, _t(GROUPS, torch.long), valid=torch.zeros(8, dtype=torch.bool))
    assert torch.equal(none_valid, torch.zeros(8))


def test_nan_reward_raises_naming_rewards():
    rewards = _t(REWARDS)
    rewards[5] = float("nan")
    with pytest.raises(FloatingPointError, match=r"rewards.*\[5\]"):
        group_advantages(rewards, _t(GROUPS, torch.long))
    rewards[5] = float("inf")
    with pytest.raises(FloatingPointError, match="rewards"):
        group_advantages(rewards, _t(GROUPS, torch.long), std_mode="none")


@pytest.mark.parametrize("std_mode", ["group", "global", "none"])
@pytest.mark.parametrize("clip", [None, 1.3])
def test_matches_numpy_loop(std_mode, clip):
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        ids = torch.randint(-5, 9, (n,), generator=gen) * 7  # sparse, negative, unsorted labels
        # Rounded rewards make ties (and zero-variance groups) common.
        rewards = torch.round(torch.randn(n, generator=gen, dtype=torch.float64) * 3) / 2
        valid = torch.rand(n, generator=gen) > 0.2
        use_valid = trial % 2 == 0
        adv = group_advantages(rewards, ids, std_mode=std_mode, clip=clip, valid=valid if use_valid else None)
        ref = numpy_group_advantages(
            rewards.numpy(), ids.numpy(), std_mode, clip=clip, valid=valid.numpy() if use_valid else None
        )
        assert torch.isfinite(adv).all()
        torch.testing.assert_close(adv, torch.from_numpy(ref).float(), atol=1e-5, rtol=1e-5)


def test_matches_flow_grpo_tracker_semantics_on_ragged_groups():
    # Flow-GRPO keys groups by prompt string; equal prompts -> one group (ids 0/1/2 here).
    prompts = ["a", "b", "a", "c", "b", "a"]
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    ids = torch.tensor([{"a": 0, "b": 1, "c": 2}[p] for p in prompts])
    adv = group_advantages(torch.tensor(rewards), ids)
    # a: 1, 3, 6 -> mean 10/3, std sqrt(((7/3)^2 + (1/3)^2 + (8/3)^2)/3) = sqrt(114/27)
    std_a = math.sqrt(114 / 27) + 1e-4
    # b: 2, 5 -> mean 3.5, std 1.5; c: single -> 0
    expected = [(1 - 10 / 3) / std_a, -1.5 / 1.5001, (3 - 10 / 3) / std_a, 0.0, 1.5 / 1.5001, (6 - 10 / 3) / std_a]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)


def test_integer_rewards_and_empty_batch():
    adv = group_advantages(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1]), std_mode="none")
    torch.testing.assert_close(adv, _t([-0.5, 0.5, 0.5, -0.5]))
    empty = group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_bad_inputs_name_the_argument():
    r, g = _t(REWARDS), _t(GROUPS, torch.long)
    with pytest.raises(ValueError, match="std_mode"):
        group_advantages(r, g, std_mode="batch")
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(r, g[:3])
    with pytest.raises(TypeError, match="group_ids"):
        group_advantages(r, g.float())
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(r[None], g)
    with pytest.raises(ValueError, match="clip"):
        group_advantages(r, g, clip=0.0)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(r, g, eps=-1.0)
    with pytest.raises(TypeError, match="valid"):
        group_advantages(r, g, valid=torch.ones(8))
    with pytest.raises(ValueError, match="valid"):
        group_advantages(r, g, valid=torch.ones(3, dtype=torch.bool))


# ----------------------------------------------------------------------------- edge advantages
def _tree():
    """A BranchGRPO-style tree for prompt A and a flat group for prompt B (T = 3 steps).

    Prompt A:            e0 (step 0)
                        /           \\
                  e1 (step 1)      e2 (step 1)
                  /       \\            |
             e3 (2)     e4 (2)       e5 (2)
             leaf 0     leaf 1       leaf 2
    Prompt B (flat): leaf 3 = e6 -> e7 -> e8, leaf 4 = e9 -> e10 -> e11.
    Edge 12 is on no path.
    """
    leaf_edges = torch.tensor([[0, 1, 3], [0, 1, 4], [0, 2, 5], [6, 7, 8], [9, 10, 11]])
    leaf_adv = torch.tensor([1.0, -2.0, 4.0, 0.5, -0.5])
    return leaf_adv, leaf_edges, 13


def test_edge_advantages_hand_built_tree():
    leaf_adv, leaf_edges, num_edges = _tree()
    out = edge_advantages(leaf_adv, leaf_edges, num_edges)
    expected = torch.tensor(
        [
            (1.0 - 2.0 + 4.0) / 3,  # e0: shared by all three leaves of prompt A
            (1.0 - 2.0) / 2,  # e1: leaves 0, 1
            4.0,  # e2: leaf 2 only
            1.0, -2.0, 4.0,  # e3, e4, e5: one leaf each
            0.5, 0.5, 0.5,  # flat group: each edge carries its leaf's advantage
            -0.5, -0.5, -0.5,
            0.0,  # e12: on no path
        ]
    )
    assert out.dtype == torch.float32 and out.shape == (13,)
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)


def test_edge_advantages_matches_python_loop_with_padding():
    gen = torch.Generator().manual_seed(1)
    leaf_adv, leaf_edges, num_edges = _tree()
    leaf_edges = torch.cat([leaf_edges, torch.tensor([[-1, 2, 12]])])  # a padded, shorter path
    leaf_adv = torch.cat([leaf_adv, torch.randn(1, generator=gen)])
    out = edge_advantages(leaf_adv, leaf_edges, num_edges)
    for e in range(num_edges):
        on = [l for l in range(leaf_edges.shape[0]) if e in leaf_edges[l].tolist()]
        ref = sum(float(leaf_adv[l]) for l in on) / len(on) if on else 0.0
        assert abs(float(out[e]) - ref) < 1e-6, (e, float(out[e]), ref)


def test_edge_advantages_bad_inputs():
    leaf_adv, leaf_edges, num_edges = _tree()
    with pytest.raises(ValueError, match="num_edges"):
        edge_advantages(leaf_adv, leaf_edges, -1)
    with pytest.raises(ValueError, match="outside"):
        edge_advantages(leaf_adv, leaf_edges, 11)
    with pytest.raises(ValueError, match="more than once"):
        edge_advantages(leaf_adv, torch.tensor([[0, 1, 1], [0, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]), 13)
    with pytest.raises(ValueError, match="leaf_edges"):
        edge_advantages(leaf_adv, leaf_edges[:2], num_edges)
    with pytest.raises(FloatingPointError, match="leaf_advantages"):
        edge_advantages(torch.tensor([1.0, float("nan"), 0.0, 0.0, 0.0]), leaf_edges, num_edges)


# ----------------------------------------------------------------------------- guard
def test_assert_finite():
    t = torch.tensor([1.0, 2.0])
    assert assert_finite(t, "x") is t
    ints = torch.tensor([1, 2])
    assert assert_finite(ints, "ids") is ints
    with pytest.raises(FloatingPointError, match=r"^rewards contains NaN/Inf at indices \[1, 3\]: values \[nan, -inf\]"):
        assert_finite(torch.tensor([0.0, float("nan"), 1.0, float("-inf")]), "rewards")
    with pytest.raises(FloatingPointError, match=r"latents contains NaN/Inf at indices \[\(1, 0\)\]"):
        assert_finite(torch.tensor([[0.0, 1.0], [float("inf"), 2.0]]), "latents")
    with pytest.raises(FloatingPointError, match=r"loss contains NaN/Inf at indices \[\(\)\]"):
        assert_finite(torch.tensor(float("nan")), "loss")
    many = torch.full((100,), float("nan"))
    with pytest.raises(FloatingPointError, match=r"\[0, 1, 2, 3, 4\].*first 5 shown.*100 of 100"):
        assert_finite(many, "grads")
    # Autograd passes through an unchanged tensor.
    x = torch.ones(3, requires_grad=True)
    assert_finite(x * 2, "y").sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    rewards = torch.round(torch.randn(64, generator=gen) * 3) / 2
    ids = torch.randint(0, 10, (64,), generator=gen)
    valid = torch.rand(64, generator=gen) > 0.1
    for mode in ("group", "global", "none"):
        cpu = group_advantages(rewards, ids, std_mode=mode, valid=valid, clip=2.0)
        gpu = group_advantages(rewards.cuda(), ids.cuda(), std_mode=mode, valid=valid.cuda(), clip=2.0)
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu)
    leaf_adv, leaf_edges, num_edges = _tree()
    torch.testing.assert_close(
        edge_advantages(leaf_adv.cuda(), leaf_edges.cuda(), num_edges).cpu(),
        edge_advantages(leaf_adv, leaf_edges, num_edges),
    )


def test_joint_ids_one_id_per_combination():
    from flowalign.advantages import joint_ids

    group = torch.tensor([7, 7, 3, 3, 7])
    step = torch.tensor([0, 1, 0, 0, 1])
    ids = joint_ids(group, step)
    # same id exactly when both group and step agree: pairs (7,0) (7,1) (3,0) (3,0) (7,1)
    same = ids[:, None] == ids[None, :]
    expected = (group[:, None] == group[None, :]) & (step[:, None] == step[None, :])
    assert torch.equal(same, expected) and len(set(ids.tolist())) == 3
    with pytest.raises(ValueError, match="joint_ids"):
        joint_ids(group, step[:3])


# --------------------------------------------------------------------------------------------
# std estimator: population (Flow-GRPO np.std + 1e-4) vs unbiased (DanceGRPO & co. torch.std + 1e-8)
# --------------------------------------------------------------------------------------------
def test_unbiased_and_population_std_against_numpy():
    r = np.array([1.0, 2.0, 4.0, 0.5, 3.0, 7.0, -1.0])
    g = np.array([0, 0, 0, 1, 1, 1, 2])  # group 2 has one member
    for unbiased, eps in ((False, 1e-4), (True, 1e-8)):
        adv = group_advantages(torch.tensor(r), torch.tensor(g), unbiased=unbiased, eps=eps).numpy()
        expected = np.zeros_like(r)
        for k in (0, 1):
            m = g == k
            expected[m] = (r[m] - r[m].mean()) / (np.std(r[m], ddof=int(unbiased)) + eps)
        np.testing.assert_allclose(adv, expected, rtol=1e-6)
        assert adv[6] == 0.0  # a group with one valid member gets 0
    # hand example: [1, 2, 4] mean 7/3, population var 14/9, unbiased var 7/3
    a_pop = group_advantages(torch.tensor([1.0, 2.0, 4.0]), torch.zeros(3, dtype=torch.long), eps=0.0)
    a_unb = group_advantages(torch.tensor([1.0, 2.0, 4.0]), torch.zeros(3, dtype=torch.long), eps=0.0, unbiased=True)
    assert a_pop[2].item() == pytest.approx((4 - 7 / 3) / math.sqrt(14 / 9), rel=1e-6)
    assert a_unb[2].item() == pytest.approx((4 - 7 / 3) / math.sqrt(7 / 3), rel=1e-6)


def test_unbiased_global_std_and_invalid_members():
    r = torch.tensor([1.0, 2.0, float("nan"), 5.0])
    valid = torch.tensor([True, True, False, True])
    adv = group_advantages(r, torch.tensor([0, 0, 0, 1]), std_mode="global", eps=1e-8, unbiased=True, valid=valid)
    x = np.array([1.0, 2.0, 5.0])
    expected = np.array([(1 - 2.5) / (np.std(x, ddof=1) + 1e-8), 0.0, 0.0, (5 - 5.0) / (np.std(x, ddof=1) + 1e-8)])
    # group 1 has one member: 0; group 0's valid members [1, 2] against their own mean 1.5
    expected[0] = (1 - 1.5) / (np.std(x, ddof=1) + 1e-8)
    expected[1] = (2 - 1.5) / (np.std(x, ddof=1) + 1e-8)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6)
    with pytest.raises(TypeError, match="unbiased"):
        group_advantages(r, torch.zeros(4, dtype=torch.long), unbiased=1, valid=valid)
