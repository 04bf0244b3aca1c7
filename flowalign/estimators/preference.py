"""Preference and multi-reward estimators: Pref-GRPO win rates and multi-reward normalisation.

Pref-GRPO (Wang et al. 2025, "Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable
Text-to-Image Reinforcement Learning", arXiv:2508.20751, §3 "Pref-GRPO"): a pairwise judge compares every
pair of the ``G`` samples of one prompt; sample ``i``'s reward is its win rate
``w_i = 1/(G-1) Σ_{j≠i} 1[x_i ≻ x_j]``, a tie counting ½. Those win rates then go through the usual
GRPO group normalisation.

* :func:`win_rate_rewards` -- the same rule as :class:`flowalign.rewards.groupwise.PairwiseAsPointwise`
  (which calls the judge), but on a ready matrix of judge outputs ``P[i, j] = P(x_i ≻ x_j)``, so a
  trainer (or a test) that already has the judgements needs no media. ``rewards.groupwise.win_rates``
  ranks *scalar* scores, not a preference matrix, so it cannot be reused here.

Multi-reward (several reward models scored on the same samples):

* :func:`sum_then_normalize` -- the default: weighted sum of the raw rewards, then one group
  normalisation (Flow-GRPO's multi-reward setting; :class:`flowalign.rewards.weighted.WeightedSum`).
* :func:`decoupled_normalization` -- each reward is group-normalised on its own before the weighted
  sum (GDPO, Liu et al. 2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization for
  Multi-reward RL Optimization", arXiv:2601.05242): a reward with a large scale or spread can no
  longer drown the others, and distinct reward combinations keep distinct advantages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from flowalign.advantages import STD_MODES, group_advantages
from flowalign.guards import assert_finite

__all__ = [
    "DECISIONS",
    "decoupled_normalization",
    "sum_then_normalize",
    "win_rate_rewards",
]

DECISIONS: tuple[str, ...] = ("hard", "prob")


# -- Pref-GRPO --------------------------------------------------------------------------------------
def win_rate_rewards(preferences: Tensor, *, decision: str = "hard", symmetric: bool = True) -> Tensor:
    """Per-sample win rates from a matrix of pairwise judgements (Pref-GRPO, arXiv:2508.20751 §3).

    Each unordered pair ``{i, j}`` is combined into one probability ``c_ij = P(i ≻ j)``:
    with ``symmetric=True`` it is the mean of ``P[i, j]`` and ``1 - P[j, i]`` over the ones that did not
    fail (one failed: the other alone; both failed: the pair failed); with ``symmetric=False`` only the
    upper triangle is read (``c_ij = P[i, j]`` for ``i < j``). Then ``c_ji = 1 - c_ij`` and

    * ``decision="hard"`` (Pref-GRPO): a win scores ``1[c > ½] + ½·1[c = ½]``;
    * ``decision="prob"``: the expected win ``c``;

    a failed pair scores ½ for both sides. ``w_i`` is the mean score over ``j ≠ i``; a group of one
    gets ½. This is exactly what ``PairwiseAsPointwise(decision=..., symmetric=...)`` computes from
    the same judge outputs.

    Args:
        preferences: ``[..., G, G]`` float, ``P[..., i, j] = P(x_i ≻ x_j)`` in ``[0, 1]``; NaN marks a
            failed judgement. The diagonal is never read.
        decision: ``"hard"`` or ``"prob"``.
        symmetric: combine both orders of a pair (cancels the judge's position bias).

    Returns:
        ``[..., G]`` float32 win rates in ``[0, 1]``.

    Raises:
        ValueError: bad shape, ``decision``, or an off-diagonal entry that is neither NaN nor in ``[0, 1]``.
    """
    if not isinstance(preferences, Tensor):
        raise TypeError(f"preferences must be a torch.Tensor, got {type(preferences).__name__}")
    if preferences.dim() < 2 or preferences.shape[-1] != preferences.shape[-2]:
        raise ValueError(f"preferences must have shape [..., G, G], got {tuple(preferences.shape)}")
    if not preferences.is_floating_point():
        raise TypeError(f"preferences must be a float tensor (NaN marks failures), got dtype {preferences.dtype}")
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {list(DECISIONS)}, got {decision!r}")
    size = preferences.shape[-1]
    p = preferences.detach().to(torch.float64)
    off_diag = ~torch.eye(size, dtype=torch.bool, device=p.device)
    ok = ~torch.isnan(p)
    bad = ok & ((p < 0) | (p > 1) | torch.isinf(p)) & off_diag
    if bool(bad.any()):
        where = tuple(int(k) for k in bad.nonzero()[0].tolist())
        raise ValueError(
            f"preferences must hold probabilities in [0, 1] or NaN (failure); entry {where} is {float(p[where])}"
        )
    p_t = p.transpose(-1, -2)
    ok_t = ok.transpose(-1, -2)
    if symmetric:
        # c_ij from both orders: P[i, j] and 1 - P[j, i]; mean of the ones that did not fail.
        num = torch.where(ok, p, torch.zeros_like(p)) + torch.where(ok_t, 1.0 - p_t, torch.zeros_like(p))
        cnt = ok.to(torch.float64) + ok_t.to(torch.float64)
        pair_ok = cnt > 0
        c = num / cnt.clamp_min(1.0)
    else:
        # Upper triangle only (the judge is asked (i, j) for i < j); the lower half mirrors it.
        upper = torch.ones(size, size, dtype=torch.bool, device=p.device).triu(1)
        c = torch.where(upper, p, 1.0 - p_t)
        pair_ok = torch.where(upper, ok, ok_t)
    if decision == "hard":
        score = (c > 0.5).to(torch.float64) + 0.5 * (c == 0.5).to(torch.float64)
    else:
        score = c
    score = torch.where(pair_ok, score, torch.full_like(score, 0.5))  # Pref-GRPO: failures count ½
    score = score.masked_fill(~off_diag, 0.0)
    if size <= 1:
        return torch.full(preferences.shape[:-1], 0.5, dtype=torch.float32, device=preferences.device)
    return (score.sum(dim=-1) / (size - 1)).to(torch.float32)


# -- multi-reward -----------------------------------------------------------------------------------
def _stack_rewards(
    rewards: Mapping[str, Tensor], weights: Mapping[str, float] | None
) -> tuple[list[str], Tensor, Tensor]:
    """Validate and stack: names, ``[K, N]`` float64 rewards, ``[K]`` float64 weights."""
    if not isinstance(rewards, Mapping) or len(rewards) == 0:
        raise ValueError(f"rewards must be a non-empty mapping name -> [N] tensor, got {type(rewards).__name__}")
    names = list(rewards)
    n = None
    rows = []
    for name in names:
        r = rewards[name]
        if not isinstance(r, Tensor):
            raise TypeError(f"rewards[{name!r}] must be a torch.Tensor, got {type(r).__name__}")
        if r.dim() != 1 or r.dtype == torch.bool or r.is_complex():
            raise ValueError(f"rewards[{name!r}] must be a 1-D real tensor [N], got shape {tuple(r.shape)} dtype {r.dtype}")
        if n is None:
            n = r.shape[0]
        elif r.shape[0] != n:
            raise ValueError(f"rewards[{name!r}] has {r.shape[0]} entries, but rewards[{names[0]!r}] has {n}")
        rows.append(r.detach().to(device=rewards[names[0]].device, dtype=torch.float64))
    stacked = torch.stack(rows)  # [K, N]
    for name, row in zip(names, rows):
        assert_finite(row, f"rewards[{name!r}]")
    if weights is None:
        w = torch.ones(len(names), dtype=torch.float64)
    else:
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping name -> float or None, got {type(weights).__name__}")
        missing = [k for k in names if k not in weights]
        extra = [k for k in weights if k not in rewards]
        if missing or extra:
            raise ValueError(f"weights keys must match rewards keys: missing {missing}, unknown {extra}")
        vals = []
        for k in names:
            v = weights[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"weights[{k!r}] must be a finite number, got {v!r}")
            vals.append(float(v))
        w = torch.tensor(vals, dtype=torch.float64)
    return names, stacked, w.to(stacked.device)


def sum_then_normalize(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float] | None,
    group_ids: Tensor,
    *,
    std_mode: str = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Default multi-reward advantage: ``A = norm_g(Σ_k w_k r_k)`` (GRPO Eq. 3 on the weighted sum).

    Args:
        rewards: name -> ``[N]`` raw scores (same ``N`` for all).
        weights: name -> weight (same keys as ``rewards``), or None for all 1.
        group_ids: ``[N]`` integer group ids.
        std_mode, eps: as :func:`flowalign.advantages.group_advantages`.

    Returns:
        ``[N]`` float32.
    """
    _, stacked, w = _stack_rewards(rewards, weights)
    total = (w[:, None] * stacked).sum(dim=0)  # [N]
    return group_advantages(total, group_ids, std_mode=std_mode, eps=eps)


def decoupled_normalization(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float] | None,
    group_ids: Tensor,
    *,
    std_mode: str = "group",
    eps: float = 1e-4,
    renormalize: bool = False,
) -> Tensor:
    """Decoupled multi-reward advantage: ``A = Σ_k w_k norm_g(r_k)`` (GDPO, arXiv:2601.05242, method section).

    Each reward is group-normalised on its own (:func:`flowalign.advantages.group_advantages`), then
    the normalised advantages are combined with the weights. With ``renormalize=True`` the combined
    advantage is standardised once more over the whole batch (``(A - mean) / (std + eps)``, GDPO's
    batch-wise normalisation that keeps the scale independent of the number of rewards).

    Args:
        rewards: name -> ``[N]`` raw scores.
        weights: name -> weight (same keys as ``rewards``), or None for all 1.
        group_ids: ``[N]`` integer group ids.
        std_mode, eps: as :func:`flowalign.advantages.group_advantages` (applied per reward).
        renormalize: batch-standardise the weighted sum.

    Returns:
        ``[N]`` float32.
    """
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode must be one of {list(STD_MODES)}, got {std_mode!r}")
    _, stacked, w = _stack_rewards(rewards, weights)
    per_reward = torch.stack(
        [group_advantages(row, group_ids, std_mode=std_mode, eps=eps).to(torch.float64) for row in stacked]
    )  # [K, N]; K (number of reward models) is small, the loop is over rewards, not samples
    combined = (w[:, None] * per_reward).sum(dim=0)  # [N]
    if renormalize and combined.numel() > 0:
        std = combined.std(unbiased=False)
        centered = combined - combined.mean()
        combined = torch.where(std > 0, centered / (std + eps), torch.zeros_like(combined))
    return combined.to(torch.float32)
