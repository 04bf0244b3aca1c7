"""Preference and multi-reward estimators: Pref-GRPO win rates and multi-reward normalisation.

Pref-GRPO (Wang et al. 2025, "Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable
Text-to-Image Reinforcement Learning", arXiv:2508.20751, §3 "Pref-GRPO"): a pairwise judge compares every
pair of the ``G`` samples of one prompt; sample ``i``'s reward is its win rate
``w_i = 1/(G-1) Σ_{j≠i} 1[x_i ≻ x_j]``, a tie counting ½. Those win rates then go through the usual
GRPO group normalisation.

* :func:`dimension_win_rates`, :func:`blend_win_rates`, :func:`blend_advantages` -- Pref-GRPO's
  per-dimension protocol (CodeGoat24/Pref-GRPO @ 3e787f6, ``fastvideo/rewards/unifiedreward_flex.py``
  lines 121-238, ``fastvideo/rewards/dispatcher.py`` lines 643-666): besides its overall verdict the
  judge gives a verdict per dimension (UnifiedReward-Flex: up to 3 categories); each dimension has its
  own win rate, the dimensions' win rates are averaged with weights, and the overall and the
  dimension mean are blended, on the win rates or on their group advantages.
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
    "BLEND_ON",
    "DECISIONS",
    "blend_advantages",
    "blend_win_rates",
    "decoupled_normalization",
    "dimension_weight_list",
    "dimension_win_rates",
    "standardize",
    "sum_then_normalize",
    "win_rate_rewards",
]

DECISIONS: tuple[str, ...] = ("hard", "prob")
#: where Pref-GRPO blends the overall and the per-dimension verdicts: on the group advantages
#: (``--apply_gdpo``, dispatcher.py lines 647-666) or on the win rates (unifiedreward_flex.py lines 226-236)
BLEND_ON: tuple[str, ...] = ("advantages", "rewards")


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


def dimension_win_rates(first: Tensor, second: Tensor, verdicts: Tensor, num_items: int, *,
                        decision: str = "hard") -> tuple[Tensor, Tensor]:
    """Per-dimension win rates of ``num_items`` samples from pairwise verdicts (Pref-GRPO's categories).

    Reference: CodeGoat24/Pref-GRPO @ 3e787f6, ``fastvideo/rewards/unifiedreward_flex.py`` lines
    158-169 and 217-224: for each pair and each category the judge named, both samples' comparison
    count grows by one and the winner scores 1 (a tie or an unreadable winner ½ each); a pair for which
    the judge gave no verdict in a category does not count in that category.

    Args:
        first, second: ``[P]`` long indices of each pair's two samples (each unordered pair once).
        verdicts: ``[P, D]`` float, ``P(first ≻ second)`` in each dimension; ``½`` is a tie, NaN means
            no verdict in that dimension (the pair is left out of it).
        num_items: ``N``, the number of samples.
        decision: ``"hard"`` (a win is ``p > ½``, ``p = ½`` a tie; the reference's categorical winners)
            or ``"prob"`` (the expected win ``p``).

    Returns:
        ``(rates [N, D], counts [N, D])`` float32: ``rates = wins / counts`` (½ where ``counts`` is 0)
        and the number of pairs with a verdict in each dimension.
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {list(DECISIONS)}, got {decision!r}")
    if verdicts.dim() != 2 or verdicts.shape[0] != first.shape[0] or second.shape != first.shape:
        raise ValueError(f"verdicts must be [P, D] with P = len(first) = len(second), got {tuple(verdicts.shape)} "
                         f"for {first.shape[0]} / {second.shape[0]} pairs")
    v = verdicts.detach().to(torch.float64).cpu()
    seen = ~torch.isnan(v)
    bad = seen & ((v < 0) | (v > 1))
    if bool(bad.any()):
        raise ValueError(f"verdicts must be probabilities in [0, 1] or NaN (no verdict), got {float(v[bad][0])}")
    p = torch.where(seen, v, torch.zeros_like(v))
    win = p if decision == "prob" else (p > 0.5).to(torch.float64) + 0.5 * (p == 0.5).to(torch.float64)
    win = torch.where(seen, win, torch.zeros_like(win))
    counted = seen.to(torch.float64)
    dims = v.shape[1]
    a, b = first.long().cpu(), second.long().cpu()
    wins = torch.zeros(num_items, dims, dtype=torch.float64).index_add_(0, a, win).index_add_(0, b, counted - win)
    counts = torch.zeros(num_items, dims, dtype=torch.float64).index_add_(0, a, counted).index_add_(0, b, counted)
    rates = torch.where(counts > 0, wins / counts.clamp_min(1.0), torch.full_like(wins, 0.5))
    return rates.to(torch.float32), counts.to(torch.float32)


def dimension_weight_list(weights: list[float] | tuple[float, ...], num_dims: int) -> list[float]:
    """The weights of ``num_dims`` dimensions from a configured list, as the reference does
    (``unifiedreward_flex.py`` lines 185-191): a longer list is cut to ``num_dims``, a shorter one is
    padded with 1.0, none gives all 1.0."""
    weights = [float(w) for w in (weights or [])]
    return (weights + [1.0] * num_dims)[:num_dims]


def blend_win_rates(overall: Tensor, dim_rates: Tensor, dim_counts: Tensor, *, dimension_weights: list[float],
                    overall_weight: float, dim_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """Pref-GRPO's blend of the overall win rate and the weighted mean of the dimension win rates.

    Reference: CodeGoat24/Pref-GRPO @ 3e787f6, ``fastvideo/rewards/unifiedreward_flex.py``:

    * lines 192-211: ``dim_mean_i = Σ_d c_d r_id / Σ_d c_d`` over the dimensions in which sample ``i``
      has at least one verdict (``c``: the dimension weights, ``CATEGORY_WEIGHTS``; the plain mean if
      those weights sum to 0); a sample with no dimension verdict gets ``dim_mean = 0`` and
      ``has_dim = False``;
    * lines 226-236: ``r_i = (w_o · overall_i + w_d · dim_mean_i) / (w_o + w_d)`` where ``w_d > 0`` and
      ``has_dim_i``, else ``r_i = overall_i`` (``OVERALL_WEIGHT`` / ``DIM_WEIGHT``).

    The reference rounds the win rates to 3 decimals (lines 172-176, 207); this does not.

    Args:
        overall: ``[N]`` overall win rates.
        dim_rates, dim_counts: ``[N, D]`` from :func:`dimension_win_rates`.
        dimension_weights: the configured list (:func:`dimension_weight_list` fits it to ``D``).
        overall_weight, dim_weight: ``w_o, w_d >= 0`` with ``w_o + w_d > 0``.

    Returns:
        ``(blended [N], dim_mean [N], has_dim [N] bool)``, float32.
    """
    if not (overall_weight >= 0 and dim_weight >= 0 and overall_weight + dim_weight > 0):
        raise ValueError(f"overall_weight and dim_weight must be >= 0 with a positive sum, got {overall_weight!r}, "
                         f"{dim_weight!r}")
    if dim_rates.shape != dim_counts.shape or dim_rates.dim() != 2 or dim_rates.shape[0] != overall.shape[0]:
        raise ValueError(f"dim_rates / dim_counts must be [N, D] with N = {overall.shape[0]}, got "
                         f"{tuple(dim_rates.shape)} / {tuple(dim_counts.shape)}")
    c = torch.tensor(dimension_weight_list(dimension_weights, dim_rates.shape[1]), dtype=torch.float64)
    if bool((c < 0).any()):
        raise ValueError(f"dimension weights must be >= 0, got {c.tolist()}")
    present = dim_counts.detach().cpu() > 0  # [N, D]
    r = dim_rates.detach().cpu().to(torch.float64).masked_fill(~present, 0.0)
    cw = c[None, :] * present
    has_dim = present.any(dim=1)
    weighted = (cw * r).sum(1) / cw.sum(1).clamp_min(1e-300)
    plain = r.sum(1) / present.sum(1).clamp_min(1)
    dim_mean = torch.where(cw.sum(1) > 0, weighted, plain)
    dim_mean = torch.where(has_dim, dim_mean, torch.zeros_like(dim_mean))
    o = overall.detach().cpu().to(torch.float64)
    mixed = (overall_weight * o + dim_weight * dim_mean) / (overall_weight + dim_weight)
    blended = torch.where(has_dim, mixed, o) if dim_weight > 0 else o
    dev = overall.device
    return blended.to(torch.float32).to(dev), dim_mean.to(torch.float32).to(dev), has_dim.to(dev)


def blend_advantages(overall_adv: Tensor, dim_adv: Tensor, has_dim: Tensor, *, overall_weight: float,
                     dim_weight: float) -> Tensor:
    """Pref-GRPO's blend on advantages (``--apply_gdpo``; CodeGoat24/Pref-GRPO @ 3e787f6,
    ``fastvideo/rewards/dispatcher.py`` lines 656-667): ``A = (w_o A_overall + w_d A_dim) / (w_o + w_d)``
    where ``has_dim``, else ``A_overall`` (all of it when ``w_d = 0``). ``A_overall`` / ``A_dim`` are the
    group advantages of the overall win rates and of :func:`blend_win_rates`' ``dim_mean`` (its zeros
    for samples without a dimension verdict included, as in the reference)."""
    if not (overall_weight >= 0 and dim_weight >= 0 and overall_weight + dim_weight > 0):
        raise ValueError(f"overall_weight and dim_weight must be >= 0 with a positive sum, got {overall_weight!r}, "
                         f"{dim_weight!r}")
    if dim_weight <= 0:
        return overall_adv
    mixed = (overall_weight * overall_adv + dim_weight * dim_adv) / (overall_weight + dim_weight)
    return torch.where(has_dim.to(torch.bool).to(mixed.device), mixed, overall_adv)


def standardize(values: Tensor, valid: Tensor | None = None, *, unbiased: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / (std + eps)`` over the valid entries of a whole batch; invalid entries get 0.

    Pref-GRPO standardises the summed advantages over the gathered batch with ``--apply_gdpo``
    (CodeGoat24/Pref-GRPO @ 3e787f6, ``fastvideo/rewards/dispatcher.py`` lines 698-702: torch's
    unbiased ``std()`` + 1e-8)."""
    x = values.detach().to(torch.float64)
    ok = torch.ones_like(x, dtype=torch.bool) if valid is None else valid.to(torch.bool).to(x.device)
    n = int(ok.sum())
    if n == 0:
        return torch.zeros_like(values, dtype=torch.float32)
    sel = x[ok]
    mean = sel.mean()
    std = sel.std(unbiased=unbiased) if n > 1 or not unbiased else torch.zeros((), dtype=torch.float64)
    # all equal: 0 (the reference's (x - mean) / 1e-8 would blow up any rounding residue)
    out = torch.where(ok & (std > 0), (x - mean) / (std + eps), torch.zeros_like(x))
    return out.to(torch.float32)


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
    unbiased: bool = False,
) -> Tensor:
    """Default multi-reward advantage: ``A = norm_g(Σ_k w_k r_k)`` (GRPO Eq. 3 on the weighted sum).

    Args:
        rewards: name -> ``[N]`` raw scores (same ``N`` for all).
        weights: name -> weight (same keys as ``rewards``), or None for all 1.
        group_ids: ``[N]`` integer group ids.
        std_mode, eps, unbiased: as :func:`flowalign.advantages.group_advantages`.

    Returns:
        ``[N]`` float32.
    """
    _, stacked, w = _stack_rewards(rewards, weights)
    total = (w[:, None] * stacked).sum(dim=0)  # [N]
    return group_advantages(total, group_ids, std_mode=std_mode, eps=eps, unbiased=unbiased)


def decoupled_normalization(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float] | None,
    group_ids: Tensor,
    *,
    std_mode: str = "group",
    eps: float = 1e-4,
    renormalize: bool = False,
    unbiased: bool = False,
) -> Tensor:
    """Decoupled multi-reward advantage: ``A = Σ_k w_k norm_g(r_k)`` (GDPO, arXiv:2601.05242, method section).

    Each reward is group-normalised on its own (:func:`flowalign.advantages.group_advantages`), then
    the normalised advantages are combined with the weights. With ``renormalize=True`` the combined
    advantage is standardised once more over the whole batch (``(A - mean) / (std + eps)``, GDPO's
    batch-wise normalisation that keeps the scale independent of the number of rewards).

    GDPO's reference (NVlabs/GDPO @ b080e63, ``trl-GDPO/trl-0.18.0-gdpo/trl/trainer/grpo_trainer.py``
    l. 1232-1248) divides by ``torch.std`` -- the unbiased std (ddof 1) -- plus 1e-4 in BOTH stages:
    ``unbiased=True, eps=1e-4`` here (``multi_reward``'s default, docs/FIDELITY.md). With
    ``unbiased=False`` both stages use the population std (ddof 0).

    Args:
        rewards: name -> ``[N]`` raw scores.
        weights: name -> weight (same keys as ``rewards``), or None for all 1.
        group_ids: ``[N]`` integer group ids.
        std_mode, eps, unbiased: as :func:`flowalign.advantages.group_advantages` (applied per
            reward); ``eps`` and ``unbiased`` also apply to the batch standardisation.
        renormalize: batch-standardise the weighted sum.

    Returns:
        ``[N]`` float32.
    """
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode must be one of {list(STD_MODES)}, got {std_mode!r}")
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    _, stacked, w = _stack_rewards(rewards, weights)
    # Stage 1 (GDPO grpo_trainer.py l. 1232-1238): (r_k - mean_g) / (std_g + eps) per reward.
    per_reward = torch.stack(
        [group_advantages(row, group_ids, std_mode=std_mode, eps=eps, unbiased=unbiased).to(torch.float64)
         for row in stacked]
    )  # [K, N]; K (number of reward models) is small, the loop is over rewards, not samples
    combined = (w[:, None] * per_reward).sum(dim=0)  # [N]; GDPO l. 1242 (weighted nansum)
    if renormalize and combined.numel() > 0:
        # Stage 2 (GDPO l. 1245-1248): (A - mean) / (std + eps) over the batch; torch.std of one
        # element is NaN, so a batch of one (or zero spread) gets 0 here.
        std = combined.std(unbiased=unbiased) if (combined.numel() > 1 or not unbiased) else combined.new_zeros(())
        centered = combined - combined.mean()
        combined = torch.where(std > 0, centered / (std + eps), torch.zeros_like(combined))
    return combined.to(torch.float32)
