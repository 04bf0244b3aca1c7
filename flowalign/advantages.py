"""Advantage estimators (docs/ARCHITECTURE.md, "Advantages and losses").

Pure tensor functions; the algorithms (:mod:`flowalign.algorithms`) compose them.

* :func:`group_advantages` -- the group-relative advantage of GRPO / Flow-GRPO / DanceGRPO: each
  sample's reward minus its group's (prompt's) mean, divided by a std.
* :func:`leave_one_out_advantages` -- the REINFORCE leave-one-out (RLOO) advantage of LOOP: each
  sample's reward minus the mean of the other rewards of its group, not divided by a std.
* :func:`edge_advantages` -- spreads per-leaf advantages onto the edges of a :class:`RolloutTree`:
  an edge gets the mean advantage of the leaves below it.

Statistics are accumulated in float64 (groups are small, the cost is nil) and returned in float32.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

from flowalign.guards import assert_finite

__all__ = [
    "STD_MODES",
    "edge_advantages",
    "group_advantages",
    "joint_ids",
    "leave_one_out_advantages",
]

STD_MODES: tuple[str, ...] = ("group", "global", "none")


def _check_index_vector(t: Tensor, name: str, n: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one entry per reward), got {tuple(t.shape)}")


def _check_group_rewards(rewards: Tensor, group_ids: Tensor) -> None:
    """``rewards [N]`` real and ``group_ids [N]`` integer, or a TypeError / ValueError naming the argument."""
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise TypeError(f"rewards must be a real float or integer tensor, got dtype {rewards.dtype}")
    _check_index_vector(group_ids, "group_ids", rewards.shape[0])
    if group_ids.dtype == torch.bool or group_ids.is_floating_point() or group_ids.is_complex():
        raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")


def _valid_mask(valid: Tensor | None, n: int, device: torch.device) -> Tensor:
    """``valid [n]`` bool on ``device`` (all True when ``None``), checked."""
    if valid is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    _check_index_vector(valid, "valid", n)
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got dtype {valid.dtype}")
    return valid.to(device)


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std_mode: str = "group",
    clip: float | None = None,
    eps: float = 1e-4,
    valid: Tensor | None = None,
    unbiased: bool = False,
) -> Tensor:
    """Group-relative advantages ``A_i = (r_i - mean_g) / (std + eps)``.

    GRPO's outcome-supervision advantage (Shao et al. 2024, DeepSeekMath §4.1.2, used in the
    GRPO objective Eq. 3) as adopted by Flow-GRPO (Liu et al. 2025, arXiv:2505.05470, §4.1; the
    reference implementation is ``flow_grpo/stat_tracking.py``: population ``np.std``, eps 1e-4,
    ``global_std`` option) and DanceGRPO (Xue et al. 2025). DanceGRPO, MixGRPO, Pref-GRPO and
    BranchGRPO divide by the *unbiased* ``torch.Tensor.std()`` + 1e-8 instead (``unbiased=True,
    eps=1e-8``; docs/FIDELITY.md).

    Args:
        rewards: ``[N]`` real scores (any float or integer dtype).
        group_ids: ``[N]`` integer group id per sample (a prompt's index in the global batch). Ids
            need not be contiguous, sorted or non-negative.
        std_mode: ``"group"`` -- divide by the group's population std (Flow-GRPO default);
            ``"global"`` -- divide by the population std of all valid rewards in the batch
            (Flow-GRPO ``global_std``); ``"none"`` -- mean-centering only (``std + eps`` := 1).
        clip: if given, clamp advantages to ``[-clip, clip]`` (Flow-GRPO ``adv_clip_max = 5``).
        eps: added to the std (>= 0).
        valid: optional ``[N]`` bool; ``False`` samples are left out of every statistic and get
            advantage 0. Their rewards are never read, so they may be NaN.
        unbiased: divide by the unbiased std (ddof 1, ``torch.std``'s default) instead of the
            population std (ddof 0, ``np.std``'s) in ``"group"`` and ``"global"`` modes; a group
            with one valid member gets 0 either way.

    Returns:
        ``[N]`` float32 advantages on ``rewards.device``. A group whose valid rewards are all equal
        (including a group with one valid member) gets exactly 0, never NaN.

    Raises:
        FloatingPointError: a valid reward is NaN/Inf (message names ``rewards``).
        ValueError / TypeError: bad shapes, dtypes, ``std_mode``, ``clip`` or ``eps``.
    """
    _check_group_rewards(rewards, group_ids)
    n = rewards.shape[0]
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode must be one of {list(STD_MODES)}, got {std_mode!r}")
    if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a positive finite number or None, got {clip!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    ddof = 1.0 if unbiased else 0.0
    valid = _valid_mask(valid, n, rewards.device)

    # Invalid entries are never read (a reward that could not score may be NaN); valid ones must be finite.
    r = rewards.detach().to(torch.float64).masked_fill(~valid, 0.0)
    assert_finite(r, "rewards")

    _, inv = torch.unique(group_ids.to(rewards.device), return_inverse=True)  # [N] in 0..G-1
    num_groups = int(inv.max()) + 1 if n > 0 else 0
    w = valid.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inv, w)
    total = torch.zeros_like(count).index_add_(0, inv, r)
    mean = total / count.clamp_min(1.0)  # [G]; 0 for groups with no valid member
    centered = (r - mean[inv]) * w  # [N]; 0 where invalid

    if std_mode == "group":
        # Population variance (ddof=0) by two passes, as np.std in Flow-GRPO's stat tracker; ddof=1
        # (unbiased) as torch.std in DanceGRPO & co. A one-member group has no spread: 0 below.
        var = torch.zeros_like(count).index_add_(0, inv, centered**2) / (count - ddof).clamp_min(1.0)
        denom = var.sqrt()[inv] + eps  # [N]
    elif std_mode == "global":
        n_valid = w.sum().clamp_min(1.0)
        global_mean = r.sum() / n_valid
        global_std = ((((r - global_mean) * w) ** 2).sum() / (n_valid - ddof).clamp_min(1.0)).sqrt()
        denom = (global_std + eps).expand(n)
    else:
        denom = torch.ones(n, dtype=torch.float64, device=r.device)

    # A group whose valid rewards all coincide has zero spread: its advantage is exactly 0
    # (r - mean can be a rounding error away from 0, and std + eps can be 0 when eps == 0).
    big = torch.finfo(torch.float64).max
    r_hi = r.masked_fill(~valid, -big)
    r_lo = r.masked_fill(~valid, big)
    gmax = torch.full_like(count, -big).scatter_reduce_(0, inv, r_hi, reduce="amax")
    gmin = torch.full_like(count, big).scatter_reduce_(0, inv, r_lo, reduce="amin")
    spread = (gmax > gmin)[inv] & valid  # [N]

    safe_denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    adv = torch.where(spread, centered / safe_denom, torch.zeros_like(centered))
    if clip is not None:
        adv = adv.clamp(-float(clip), float(clip))
    return adv.to(torch.float32)


def leave_one_out_advantages(rewards: Tensor, group_ids: Tensor, *, valid: Tensor | None = None) -> Tensor:
    """Leave-one-out advantages ``A_i = r_i - 1/(k_g - 1) * sum_{j in g, j != i} r_j``.

    The REINFORCE leave-one-out baseline (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline
    for free!"; Ahmadian et al. 2024, RLOO, arXiv:2402.14740, Eq. 7) that LOOP (Gupta et al. 2025,
    arXiv:2503.00897, §4) puts into the PPO-clip objective: ``k_g`` samples of one prompt, each judged
    against the mean of the other ``k_g - 1``. No std division (the baseline keeps the estimator
    unbiased; a std would rescale it per prompt). Equivalently ``A_i = k_g / (k_g - 1) * (r_i - mean_g)``.

    Args:
        rewards: ``[N]`` real scores (any float or integer dtype).
        group_ids: ``[N]`` integer group id per sample (a prompt's index in the global batch).
        valid: optional ``[N]`` bool; ``False`` samples are left out of every baseline (``k_g`` counts
            the valid members) and get advantage 0; their rewards are never read (may be NaN).

    Returns:
        ``[N]`` float32 advantages on ``rewards.device``. A sample whose group has a single valid
        member has no baseline and gets 0 (ours: no leave-one-out mean exists).

    Raises:
        FloatingPointError: a valid reward is NaN/Inf (message names ``rewards``).
        ValueError / TypeError: bad shapes or dtypes.
    """
    _check_group_rewards(rewards, group_ids)
    n = rewards.shape[0]
    valid = _valid_mask(valid, n, rewards.device)
    r = rewards.detach().to(torch.float64).masked_fill(~valid, 0.0)
    assert_finite(r, "rewards")
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=rewards.device)
    _, inv = torch.unique(group_ids.to(rewards.device), return_inverse=True)  # [N] in 0..G-1
    w = valid.to(torch.float64)
    count = torch.zeros(int(inv.max()) + 1, dtype=torch.float64, device=r.device).index_add_(0, inv, w)  # [G] k_g
    total = torch.zeros_like(count).index_add_(0, inv, r)  # [G] sum of the valid rewards
    others = count[inv] - 1.0  # [N] k_g - 1
    baseline = (total[inv] - r) / others.clamp_min(1.0)  # [N] mean of the other valid rewards
    adv = torch.where(valid & (others > 0), r - baseline, torch.zeros_like(r))
    return adv.to(torch.float32)


def joint_ids(*ids: Tensor) -> Tensor:
    """One integer id per distinct combination of the given ``[N]`` id vectors, e.g. the
    (group, timestep) cells that dense and tree estimators normalise within: ``[N]`` long."""
    if not ids or any(t.shape != ids[0].shape or t.dim() != 1 for t in ids):
        raise ValueError(f"joint_ids needs 1-D id vectors of one shape, got {[tuple(t.shape) for t in ids]}")
    return torch.unique(torch.stack([t.long() for t in ids], dim=1), dim=0, return_inverse=True)[1]


def edge_advantages(leaf_advantages: Tensor, leaf_edges: Tensor, num_edges: int) -> Tensor:
    """Per-edge advantages: each edge gets the mean advantage of the leaves whose path contains it.

    For a flat group (each edge on exactly one leaf's path) that is the leaf's own advantage; for a
    tree with shared prefixes (BranchGRPO-style) a shared edge gets the mean over its descendant
    leaves -- the Monte-Carlo estimate of the advantage of the subtree under it.

    Args:
        leaf_advantages: ``[L]`` float per-leaf advantages.
        leaf_edges: ``[L, T]`` integer edge ids on each leaf's path (``RolloutTree.leaf_edges``).
            ``-1`` entries are padding and are ignored. An id may appear at most once per row.
        num_edges: ``E``, the number of edges in the tree (ids must lie in ``[0, E)``).

    Returns:
        ``[E]`` float32; edges on no leaf's path get 0.

    Raises:
        ValueError / TypeError: bad shapes or dtypes, ids out of range, an edge repeated on a path.
        FloatingPointError: ``leaf_advantages`` holds NaN/Inf.
    """
    if not isinstance(leaf_advantages, Tensor) or not isinstance(leaf_edges, Tensor):
        raise TypeError("leaf_advantages and leaf_edges must be torch.Tensors")
    if leaf_advantages.dim() != 1:
        raise ValueError(f"leaf_advantages must be 1-D [L], got shape {tuple(leaf_advantages.shape)}")
    if leaf_edges.dim() != 2 or leaf_edges.shape[0] != leaf_advantages.shape[0]:
        raise ValueError(
            f"leaf_edges must have shape [L, T] with L = {leaf_advantages.shape[0]} "
            f"(len(leaf_advantages)), got {tuple(leaf_edges.shape)}"
        )
    if leaf_edges.dtype == torch.bool or leaf_edges.is_floating_point() or leaf_edges.is_complex():
        raise TypeError(f"leaf_edges must be an integer tensor, got dtype {leaf_edges.dtype}")
    if isinstance(num_edges, bool) or not isinstance(num_edges, int) or num_edges < 0:
        raise ValueError(f"num_edges must be a non-negative int, got {num_edges!r}")
    assert_finite(leaf_advantages, "leaf_advantages")
    device = leaf_advantages.device
    edges = leaf_edges.to(device=device, dtype=torch.long)
    if edges.numel() > 0:
        lo, hi = int(edges.min()), int(edges.max())
        if lo < -1 or hi >= num_edges:
            raise ValueError(
                f"leaf_edges holds ids in [{lo}, {hi}], outside [0, num_edges={num_edges}) (-1 = padding)"
            )
        srt = edges.sort(dim=1).values
        repeated = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(repeated.any()):
            leaf = int(repeated.any(dim=1).nonzero()[0, 0])
            raise ValueError(f"leaf_edges row {leaf} lists an edge more than once: {leaf_edges[leaf].tolist()}")

    on_path = edges >= 0  # [L, T]
    ids = edges[on_path]  # [K]
    vals = leaf_advantages.detach().to(torch.float64)[:, None].expand_as(edges)[on_path]  # [K]
    sums = torch.zeros(num_edges, dtype=torch.float64, device=device).scatter_add_(0, ids, vals)
    counts = torch.zeros(num_edges, dtype=torch.float64, device=device).scatter_add_(0, ids, torch.ones_like(vals))
    out = torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.zeros_like(sums))
    return out.to(torch.float32)

