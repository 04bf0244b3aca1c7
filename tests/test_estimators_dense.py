"""DenseGRPO, VGPO, Pref-GRPO win-rate and multi-reward estimators: hand-worked examples plus an
independent plain-Python computation for each."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from flowalign.rewards.groupwise import PairwiseAsPointwise

from flowalign.advantages import group_advantages
from flowalign.estimators.dense import (
    calibrate_noise,
    dense_step_advantages,
    discounted_returns,
    process_rewards,
    step_reward_gains,
    temporal_weights,
    vgpo_advantages,
)
from flowalign.estimators.preference import (
    decoupled_normalization,
    sum_then_normalize,
    win_rate_rewards,
)


# -- independent reference implementations (plain Python, no torch ops) ----------------------------
def _norm_groups(values: list[float], groups: list[int], eps: float) -> list[float]:
    """GRPO normalisation with the stdlib: (x - mean) / (pstdev + eps), 0 for a zero-spread group."""
    out = []
    for i, g in enumerate(groups):
        members = [values[j] for j in range(len(values)) if groups[j] == g]
        if max(members) == min(members):
            out.append(0.0)
        else:
            out.append((values[i] - statistics.fmean(members)) / (statistics.pstdev(members) + eps))
    return out


def _loop_dense(step_rewards: list[list[float]], groups: list[int], eps: float) -> list[list[float]]:
    num_steps = len(step_rewards[0]) - 1
    cols = []
    for t in range(num_steps):
        gains = [row[t + 1] - row[t] for row in step_rewards]
        cols.append(_norm_groups(gains, groups, eps))
    return [[cols[t][i] for t in range(num_steps)] for i in range(len(step_rewards))]


def _loop_vgpo(values, final, groups, gamma, alpha, eps, anchor_steps=None):
    """VGPO Eqs. 9-13 (App. B form) with explicit loops: instant reward = next projected value (the
    terminal reward for the last step), Q by a backward recursion, ω = Q / mean_t Q per row."""
    n, num_steps = len(values), len(values[0])
    r = [[values[i][t + 1] if t + 1 < num_steps else final[i] for t in range(num_steps)] for i in range(n)]
    q = [[0.0] * num_steps for _ in range(n)]
    for i in range(n):
        acc = 0.0
        for t in reversed(range(num_steps)):
            acc = r[i][t] + gamma * acc
            q[i][t] = acc
    w = []
    for i in range(n):
        m = statistics.fmean(q[i])
        w.append([x / m for x in q[i]] if m > 0 and min(q[i]) >= 0 else [1.0] * num_steps)
    out = [[0.0] * num_steps for _ in range(n)]
    for t in range(num_steps):
        rel = _norm_groups([q[i][t] for i in range(n)], groups, eps)
        anchor = alpha if anchor_steps is None or t < anchor_steps else 0.0
        for i in range(n):
            out[i][t] = w[i][t] * (rel[i] + anchor * q[i][t])
    return out


def _loop_calibration(psi: list[float], dense: list[list[float]], eps1: float, eps2: float) -> list[float]:
    """DenseGRPO Algorithm 1 lines 9-15 verbatim, in the paper's countdown indexing: timestep
    t = T..1 is this module's step T - t."""
    num_steps = len(psi)
    out = list(psi)
    for t in range(num_steps, 0, -1):
        k = num_steps - t
        col = [row[k] for row in dense]
        pos, neg = sum(x > 0 for x in col), sum(x < 0 for x in col)
        out[k] = out[k] + eps2 if abs(pos - neg) < eps1 else out[k] - eps2
    return out


# -- DenseGRPO -------------------------------------------------------------------------------------
STEP_REWARDS = torch.tensor(
    [
        [0.0, 0.5, 1.0],  # group 7
        [0.0, 0.1, 0.4],  # group 7
        [0.2, 0.2, 0.2],  # group 3
        [0.2, 0.6, 0.3],  # group 3
        [0.2, 0.8, 0.5],  # group 3
    ],
    dtype=torch.float64,
)
GROUPS = torch.tensor([7, 7, 3, 3, 3])


def test_step_reward_gains_hand_worked() -> None:
    gains = step_reward_gains(STEP_REWARDS)
    expected = torch.tensor([[0.5, 0.5], [0.1, 0.3], [0.0, 0.0], [0.4, -0.3], [0.6, -0.3]])
    torch.testing.assert_close(gains, expected, atol=1e-7, rtol=0)
    # Telescoping: the gains of a row add up to final minus initial look-ahead reward.
    torch.testing.assert_close(gains.sum(1), (STEP_REWARDS[:, -1] - STEP_REWARDS[:, 0]).float(), atol=1e-6, rtol=0)


def test_dense_step_advantages_hand_worked() -> None:
    adv = dense_step_advantages(STEP_REWARDS, GROUPS, eps=0.0)
    # group 7, t=0: gains (0.5, 0.1), mean 0.3, std 0.2 -> (+1, -1); t=1: (0.5, 0.3) -> (+1, -1).
    # group 3, t=0: gains (0, 0.4, 0.6), mean 1/3, pstdev sqrt(((1/3)^2 + (1/15)^2 + (4/15)^2)) = sqrt(14)/15
    #   -> (-(1/3), 1/15, 4/15) * 15/sqrt(14) = (-5, 1, 4)/sqrt(14);
    #   t=1: gains (0, -0.3, -0.3), mean -0.2, pstdev sqrt(0.02) -> (0.2, -0.1, -0.1)/sqrt(0.02).
    s14, s02 = math.sqrt(14.0), math.sqrt(0.02)
    expected = torch.tensor(
        [[1.0, 1.0], [-1.0, -1.0], [-5 / s14, 0.2 / s02], [1 / s14, -0.1 / s02], [4 / s14, -0.1 / s02]]
    )
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert adv.shape == (5, 2) and adv.dtype == torch.float32


def test_dense_step_advantages_match_python_loop_and_zero_spread() -> None:
    g = torch.Generator().manual_seed(0)
    step_rewards = torch.rand(12, 6, generator=g, dtype=torch.float64)
    step_rewards[4:8, 2:4] = 0.7  # group 1: identical look-ahead rewards -> zero gain at step 2
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    adv = dense_step_advantages(step_rewards, groups, eps=1e-4)
    ref = torch.tensor(_loop_dense(step_rewards.tolist(), groups.tolist(), 1e-4), dtype=torch.float32)
    torch.testing.assert_close(adv, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(adv[4:8, 2], torch.zeros(4))  # zero spread -> exactly 0, never NaN
    assert torch.isfinite(adv).all()


def test_dense_step_advantages_bad_input() -> None:
    with pytest.raises(ValueError, match="step_rewards"):
        dense_step_advantages(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        dense_step_advantages(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids"):
        dense_step_advantages(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(FloatingPointError, match="step_rewards"):
        dense_step_advantages(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, dtype=torch.long))


def test_densegrpo_paper_indexing_example() -> None:
    # Paper indexing (Eq. 7): T = 3, latent rewards R_3 (noise), R_2, R_1, R_0 = R(x_0);
    # ΔR_t = R_{t-1} - R_t.  Trajectory A: R_3..R_0 = 0.1, 0.4, 0.35, 0.9; B: 0.3, 0.2, 0.6, 0.6.
    # A: ΔR_3 = 0.3, ΔR_2 = -0.05, ΔR_1 = 0.55;  B: ΔR_3 = -0.1, ΔR_2 = 0.4, ΔR_1 = 0.
    lookahead = torch.tensor([[0.1, 0.4, 0.35, 0.9], [0.3, 0.2, 0.6, 0.6]], dtype=torch.float64)
    gains = step_reward_gains(lookahead)  # forward step k = T - t
    torch.testing.assert_close(gains, torch.tensor([[0.3, -0.05, 0.55], [-0.1, 0.4, 0.0]]), atol=1e-7, rtol=0)
    # Eq. 10 on a group of two: every timestep with different gains -> (+1, -1) or (-1, +1).
    adv = dense_step_advantages(lookahead, torch.tensor([0, 0]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]]), atol=1e-6, rtol=0)
    # A sparse (Flow-GRPO) advantage would give A +1 at every step; the dense one credits step k=1 to B.


def test_calibrate_noise_hand_worked() -> None:
    # Dense rewards of 6 trajectories at 4 steps (Algorithm 1, ε1 = 2, ε2 = 0.01 as in App. A).
    dense = torch.tensor(
        [
            [0.3, -0.2, 0.0, -0.1],
            [0.1, -0.4, 0.0, -0.3],
            [-0.2, -0.1, 0.0, -0.2],
            [-0.1, -0.3, 0.0, 0.2],
            [0.5, 0.2, 0.0, -0.1],
            [-0.3, -0.2, 0.0, 0.1],
        ]
    )
    # k=0: 3 up / 3 down, |0| < 2 -> +0.01; k=1: 1 up / 5 down, |-4| >= 2 -> -0.01;
    # k=2: no gain non-zero, |0| < 2 -> +0.01; k=3: 2 up / 4 down, |-2| is not < 2 -> -0.01.
    psi = torch.tensor([0.7, 0.7, 0.7, 0.7])
    new = calibrate_noise(psi, dense)
    torch.testing.assert_close(new, torch.tensor([0.71, 0.69, 0.71, 0.69]), atol=1e-6, rtol=0)
    # A wider margin ε1 = 3 makes k=3 balanced (|-2| < 3); bounds clamp; a larger step.
    new = calibrate_noise(torch.tensor([0.15, 0.15, 0.95, 0.15]), dense, rate=0.1, margin=3.0, bounds=(0.1, 1.0))
    torch.testing.assert_close(new, torch.tensor([0.25, 0.1, 1.0, 0.25]), atol=1e-6, rtol=0)
    # Signs of ΔR, not of group-centred advantages: all negative at every step -> every ψ decreases,
    # although each group-normalised column would be balanced.
    worse = -dense.abs() - 0.05
    torch.testing.assert_close(calibrate_noise(psi, worse), torch.full((4,), 0.69), atol=1e-6, rtol=0)
    centred = dense_step_advantages(torch.cat([torch.zeros(6, 1), worse.cumsum(1)], 1), torch.zeros(6, dtype=torch.long))
    assert (calibrate_noise(psi, centred) > psi).sum() >= 2  # why advantages must not be passed


def test_calibrate_noise_matches_algorithm_1_loop() -> None:
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(9, 10, generator=g).round()  # many exact zeros and ties
    psi = torch.rand(10, generator=g, dtype=torch.float64) + 0.5
    for eps1, eps2 in ((2.0, 0.01), (1.0, 0.05), (4.5, 0.2)):
        new = calibrate_noise(psi, dense, rate=eps2, margin=eps1)
        ref = _loop_calibration(psi.tolist(), dense.tolist(), eps1, eps2)
        torch.testing.assert_close(new, torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0)
    # Iterating drives an always-losing step down to the lower bound and keeps it there.
    losing = -torch.rand(8, 3, generator=g) - 0.1
    p = torch.tensor([0.5, 0.5, 0.5])
    for _ in range(100):
        p = calibrate_noise(p, losing, rate=0.01, bounds=(0.05, 2.0))
    torch.testing.assert_close(p, torch.full((3,), 0.05), atol=1e-6, rtol=0)


def test_calibrate_noise_bad_input() -> None:
    psi, dense = torch.ones(3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="dense_rewards"):
        calibrate_noise(psi, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="rate"):
        calibrate_noise(psi, dense, rate=0.0)
    with pytest.raises(ValueError, match="margin"):
        calibrate_noise(psi, dense, margin=0.0)
    with pytest.raises(ValueError, match="bounds"):
        calibrate_noise(psi, dense, bounds=(1.0, 0.5))
    with pytest.raises(FloatingPointError, match="dense_rewards"):
        calibrate_noise(psi, torch.tensor([[0.0, float("nan"), 0.0]]))


# -- VGPO ------------------------------------------------------------------------------------------
def test_vgpo_pieces_hand_worked() -> None:
    # Projections before each of T = 3 steps (column 0: from the noise, not read) and terminal reward.
    values = torch.tensor([[0.1, 0.2, 0.5], [0.3, 0.4, 0.6]])
    final = torch.tensor([1.0, 0.8])
    r = process_rewards(values, final)  # Eq. 9: value of the latent each step produces
    torch.testing.assert_close(r, torch.tensor([[0.2, 0.5, 1.0], [0.4, 0.6, 0.8]]), atol=1e-7, rtol=0)
    q = discounted_returns(r, 0.5)  # Eq. 10: Q_2 = r_2, Q_1 = r_1 + 0.5 Q_2, Q_0 = r_0 + 0.5 Q_1
    torch.testing.assert_close(q, torch.tensor([[0.7, 1.0, 1.0], [0.9, 1.0, 0.8]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(discounted_returns(r, 1.0), r.flip(1).cumsum(1).flip(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(discounted_returns(r, 0.0), r, atol=0, rtol=0)
    # Eq. 11: ω = Q / mean_t Q; row means 0.9 and 0.9.
    torch.testing.assert_close(temporal_weights(q), q / 0.9, atol=1e-6, rtol=0)
    # Fallback: a row with a negative value, or a zero mean, gets ω = 1.
    w = temporal_weights(torch.tensor([[1.0, -0.5, 2.0], [0.0, 0.0, 0.0], [3.0, 1.0, 2.0]]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.5, 0.5, 1.0]]))


def test_vgpo_advantages_hand_worked() -> None:
    values = torch.tensor([[0.1, 0.2, 0.5], [0.3, 0.4, 0.6]])
    final = torch.tensor([1.0, 0.8])
    adv = vgpo_advantages(values, final, torch.tensor([0, 0]), gamma=0.5, alpha=0.1, eps=0.0)
    # Q = [[0.7, 1.0, 1.0], [0.9, 1.0, 0.8]]; relative per step: t=0 (-1, +1), t=1 (0, 0), t=2 (+1, -1);
    # ω = Q / 0.9; A = ω (rel + 0.1 Q).
    q = torch.tensor([[0.7, 1.0, 1.0], [0.9, 1.0, 0.8]])
    rel = torch.tensor([[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]])
    torch.testing.assert_close(adv, q / 0.9 * (rel + 0.1 * q), atol=1e-6, rtol=0)
    # The anchor only on the first step (App. A.2 style) and no weights.
    adv = vgpo_advantages(values, final, torch.tensor([0, 0]), gamma=0.5, alpha=0.1, eps=0.0,
                          use_temporal_weights=False, anchor_steps=1)
    torch.testing.assert_close(adv, rel + 0.1 * q * torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)


def test_vgpo_signal_survives_collapsed_group() -> None:
    # Both members reach the same terminal reward along the same projected values.
    values = torch.tensor([[0.2, 0.5, 0.9], [0.2, 0.5, 0.9]])
    final = torch.tensor([1.0, 1.0])
    groups = torch.tensor([0, 0])
    assert torch.equal(group_advantages(final, groups), torch.zeros(2))  # sparse GRPO: no signal
    adv = vgpo_advantages(values, final, groups, gamma=1.0, alpha=0.5)
    assert (adv.abs() > 1e-3).all()
    # r = (0.5, 0.9, 1.0); Q = (2.4, 1.9, 1.0), mean 5.3 / 3; A = (3 Q / 5.3) * 0.5 Q.
    q = torch.tensor([2.4, 1.9, 1.0])
    torch.testing.assert_close(adv, (3 * q / 5.3 * 0.5 * q).expand(2, 3), atol=1e-6, rtol=0)
    # Without the absolute anchor the signal is gone, exactly.
    assert torch.equal(vgpo_advantages(values, final, groups, alpha=0.0), torch.zeros(2, 3))


def test_vgpo_matches_python_loop() -> None:
    g = torch.Generator().manual_seed(2)
    values = torch.rand(8, 5, generator=g)
    final = torch.rand(8, generator=g)
    final[4:] = 0.3  # group 1's terminal rewards collapse
    values[5, 2] = -2.0  # a negative projected value -> that row falls back to ω = 1
    groups = torch.tensor([5, 5, 5, 5, 9, 9, 9, 9])
    for anchor_steps in (None, 2):
        adv = vgpo_advantages(values, final, groups, gamma=0.9, alpha=0.2, eps=1e-4, anchor_steps=anchor_steps)
        ref = _loop_vgpo(values.double().tolist(), final.double().tolist(), groups.tolist(), 0.9, 0.2, 1e-4,
                         anchor_steps)
        torch.testing.assert_close(adv, torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_vgpo_bad_input() -> None:
    v, f, g = torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="final_rewards"):
        vgpo_advantages(v, torch.zeros(3), g)
    with pytest.raises(ValueError, match="gamma"):
        vgpo_advantages(v, f, g, gamma=1.5)
    with pytest.raises(ValueError, match="alpha"):
        vgpo_advantages(v, f, g, alpha=-1.0)
    with pytest.raises(ValueError, match="group_ids"):
        vgpo_advantages(v, f, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="anchor_steps"):
        vgpo_advantages(v, f, g, anchor_steps=-1)
    with pytest.raises(ValueError, match="returns"):
        temporal_weights(torch.zeros(3))


# -- Pref-GRPO -------------------------------------------------------------------------------------
class _ScriptedJudge:
    """Pairwise judge on 'media' that are scalar qualities: P(a > b) = sigmoid(q_a - q_b + bias);
    pairs listed in ``fail`` return NaN (a failed judgement)."""

    name, modality = "scripted", "image"

    def __init__(self, bias: float = 0.0, fail: set[tuple[float, float]] = frozenset(), sharp: float = 1.0):
        self.bias, self.fail, self.sharp = bias, set(fail), sharp

    def prob(self, qa: float, qb: float) -> float:
        if (qa, qb) in self.fail:
            return float("nan")
        if self.sharp == math.inf:
            return 1.0 if qa > qb else 0.0 if qa < qb else 0.5
        return 1.0 / (1.0 + math.exp(-(self.sharp * (qa - qb) + self.bias)))

    def compare(self, media_a, media_b, prompts):
        return torch.tensor([self.prob(float(a), float(b)) for a, b in zip(media_a.flatten(), media_b.flatten())])

    def matrix(self, q: list[float]) -> torch.Tensor:
        return torch.tensor([[self.prob(a, b) if i != j else float("nan") for j, b in enumerate(q)] for i, a in enumerate(q)])


def test_win_rate_rewards_hand_worked() -> None:
    q = [3.0, 1.0, 2.0, 2.0]
    judge = _ScriptedJudge(sharp=math.inf, fail={(3.0, 1.0), (1.0, 3.0)})  # pair (0, 1) fails both ways
    rates = win_rate_rewards(judge.matrix(q))
    # 0: fail ½, beats 2, beats 3 -> 2.5/3;  1: fail ½, loses, loses -> 0.5/3;
    # 2: loses to 0, beats 1, ties 3 -> 1.5/3;  3: same as 2.
    torch.testing.assert_close(rates, torch.tensor([2.5, 0.5, 1.5, 1.5]) / 3)
    assert math.isclose(float(rates.sum()), len(q) / 2, rel_tol=1e-6)  # win rates always sum to G/2


@pytest.mark.parametrize("decision", ["hard", "prob"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_win_rate_rewards_match_pairwise_as_pointwise(decision: str, symmetric: bool) -> None:
    q = [0.3, -1.2, 0.9, 0.3, 2.0]
    # position-biased judge; pair (2, 4) fails both ways, (1, 0) and (1, 3) one way only
    judge = _ScriptedJudge(bias=0.4, fail={(0.9, 2.0), (2.0, 0.9), (-1.2, 0.3)})
    pairwise = PairwiseAsPointwise(judge, group_size=len(q), decision=decision, symmetric=symmetric)
    out = pairwise(torch.tensor(q, dtype=torch.float64)[:, None], ["p"] * len(q))  # fp64: exact fail keys
    assert float(out.components["failed_frac"].max()) > 0  # the scripted failures really happened
    ref = out.scores
    rates = win_rate_rewards(judge.matrix(q), decision=decision, symmetric=symmetric)
    torch.testing.assert_close(rates, ref.float(), atol=1e-6, rtol=0)


def test_win_rate_rewards_batched_and_edge_cases() -> None:
    p = torch.tensor([[[float("nan"), 1.0], [0.0, float("nan")]], [[float("nan"), float("nan")], [float("nan"), float("nan")]]])
    torch.testing.assert_close(win_rate_rewards(p), torch.tensor([[1.0, 0.0], [0.5, 0.5]]))  # all failed -> ½
    torch.testing.assert_close(win_rate_rewards(torch.full((1, 1), float("nan"))), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="preferences"):
        win_rate_rewards(torch.tensor([[0.0, 1.5], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="preferences"):
        win_rate_rewards(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="decision"):
        win_rate_rewards(torch.zeros(2, 2), decision="soft")


# -- multi-reward ----------------------------------------------------------------------------------
def test_multi_reward_hand_worked_difference() -> None:
    # One group of two: sample 0 is better on "a" (1 vs 0), sample 1 on "b" (10 vs 0).
    rewards = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 10.0])}
    groups = torch.tensor([0, 0])
    # Sum first: (1, 10) -> b's scale decides: (-1, +1).
    torch.testing.assert_close(sum_then_normalize(rewards, None, groups, eps=0.0), torch.tensor([-1.0, 1.0]))
    # Decoupled: a -> (+1, -1), b -> (-1, +1); equal weights cancel: (0, 0).
    torch.testing.assert_close(decoupled_normalization(rewards, None, groups, eps=0.0), torch.tensor([0.0, 0.0]))
    # Weights 2 : 1 -> (2 - 1, -2 + 1) = (1, -1) decoupled, while the sum (2, 10) still says (-1, 1).
    w = {"a": 2.0, "b": 1.0}
    torch.testing.assert_close(decoupled_normalization(rewards, w, groups, eps=0.0), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(sum_then_normalize(rewards, w, groups, eps=0.0), torch.tensor([-1.0, 1.0]))


def test_multi_reward_match_python_loop() -> None:
    g = torch.Generator().manual_seed(3)
    rewards = {"clip": torch.rand(9, generator=g), "ocr": (torch.rand(9, generator=g) > 0.5).float() * 5}
    rewards["ocr"][6:] = 5.0  # group 2 collapses on ocr
    weights = {"clip": 0.7, "ocr": 0.3}
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    gl = groups.tolist()
    dec = decoupled_normalization(rewards, weights, groups, eps=1e-4)
    per = {k: _norm_groups(v.double().tolist(), gl, 1e-4) for k, v in rewards.items()}
    ref_dec = [sum(weights[k] * per[k][i] for k in rewards) for i in range(9)]
    torch.testing.assert_close(dec, torch.tensor(ref_dec, dtype=torch.float32), atol=1e-5, rtol=0)
    tot = [sum(weights[k] * float(rewards[k][i]) for k in rewards) for i in range(9)]
    ref_sum = _norm_groups(tot, gl, 1e-4)
    torch.testing.assert_close(sum_then_normalize(rewards, weights, groups), torch.tensor(ref_sum, dtype=torch.float32),
                               atol=1e-5, rtol=0)
    ren = decoupled_normalization(rewards, weights, groups, eps=0.0, renormalize=True)
    assert abs(float(ren.mean())) < 1e-6 and math.isclose(float(ren.std(unbiased=False)), 1.0, rel_tol=1e-5)


def test_multi_reward_bad_input() -> None:
    groups = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="weights"):
        decoupled_normalization({"a": torch.zeros(2)}, {"b": 1.0}, groups)
    with pytest.raises(ValueError, match="rewards\\['b'\\]"):
        sum_then_normalize({"a": torch.zeros(2), "b": torch.zeros(3)}, None, groups)
    with pytest.raises(ValueError, match="rewards"):
        decoupled_normalization({}, None, groups)
    with pytest.raises(FloatingPointError, match="rewards\\['a'\\]"):
        decoupled_normalization({"a": torch.tensor([0.0, float("nan")])}, None, groups)
    with pytest.raises(ValueError, match="weights\\['a'\\]"):
        sum_then_normalize({"a": torch.zeros(2)}, {"a": float("inf")}, groups)
