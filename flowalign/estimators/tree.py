"""Tree estimators: BranchGRPO and TempFlow-GRPO (pure tensor functions, no training loop).

BranchGRPO (Li et al. 2025, "BranchGRPO: Stable and Efficient GRPO with Structured Branching in
Diffusion Models", arXiv:2509.06040, §3 "reward fusion and depth-wise advantage", "pruning"):

* :func:`fuse_node_rewards` -- the value of every node (the node an edge leads to) fused from the
  rewards of its descendant leaves: uniform mean, or a softmax of the leaves' path log-probs.
* :func:`depthwise_advantages` -- node values normalised per (tree, depth); each parent->child
  edge is trained with the child's advantage (trees from :func:`edge_root_ids`, one per initial
  noise as in the reference, or :func:`edge_group_ids`, one per prompt group).
* :func:`width_prune` / :func:`depth_prune` -- which TRAINED edges keep their gradient; pruning
  never changes what was sampled and never makes an untrainable edge trainable.

TempFlow-GRPO (He et al. 2025, "TempFlow-GRPO: When Timing Matters for GRPO in Flow Models",
arXiv:2508.04324, §3 "trajectory branching" and "noise-aware weighting"):

* :func:`branch_step_advantages` -- process rewards: an ODE trunk with ``K`` SDE children at a branch
  step, each finished by ODE; the child's final reward is the reward of its branch step, and the
  advantage is group-normalised among the children of the same (group, branch step).
* :func:`noise_aware_weights` -- per-edge loss weights proportional to the transition std
  ``std_t * sqrt(delta)`` (``RolloutTree.noise_std``), normalised to mean 1.

Tree inputs are either a :class:`~flowalign.types.RolloutTree` or a mapping of flat tensors with
the same names (``parent [E]``, ``step [E]``, ``leaf_edges [L, T]``, and where needed
``log_prob_old [E]``, ``noise_std [E]``, ``trainable [E]``, ``leaf_group [L]``), so a test (or
another engine) can build a tree by hand. Statistics are in float64; results are float32.
"""

from __future__ import annotations

import math
from typing import Mapping, Union

import torch
from torch import Tensor

from flowalign.advantages import group_advantages, joint_ids
from flowalign.guards import assert_finite
from flowalign.types import RolloutTree

__all__ = [
    "DEPTH_PRUNE_MODES",
    "FUSION_MODES",
    "NORM_SCOPES",
    "WIDTH_PRUNE_MODES",
    "branch_step_advantages",
    "branch_step_edge_advantages",
    "depth_prune",
    "depthwise_advantages",
    "edge_group_ids",
    "edge_root_ids",
    "fuse_node_rewards",
    "noise_aware_weights",
    "width_prune",
]

TreeLike = Union[RolloutTree, Mapping[str, Tensor]]
FUSION_MODES: tuple[str, ...] = ("mean", "logprob_softmax", "path_logprob_softmax")
DEPTH_PRUNE_MODES: tuple[str, ...] = ("slide_stop", "wrap")
NORM_SCOPES: tuple[str, ...] = ("root", "group")
WIDTH_PRUNE_MODES: tuple[str, ...] = ("fraction", "best_worst")


# -- input helpers ----------------------------------------------------------------------------------
def _get(tree: TreeLike, name: str, required: bool = True) -> Tensor | None:
    if isinstance(tree, RolloutTree):
        value = getattr(tree, name, None)
    elif isinstance(tree, Mapping):
        value = tree.get(name)
    else:
        raise TypeError(f"tree_or_parts must be a RolloutTree or a mapping of tensors, got {type(tree).__name__}")
    if value is None and required:
        raise ValueError(f"tree_or_parts has no {name!r}, which this estimator needs")
    if value is not None and not isinstance(value, Tensor):
        raise TypeError(f"tree_or_parts[{name!r}] must be a torch.Tensor, got {type(value).__name__}")
    return value


def _int_vector(t: Tensor, name: str, n: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = "[E]" if n is None else f"[{n}]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t.long()


def _float_vector(t: Tensor, name: str, n: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be a real float tensor, got dtype {t.dtype}")
    out = t.detach().to(torch.float64)
    assert_finite(out, name)
    return out


def _bool_vector(t: Tensor | None, name: str, n: int, device: torch.device) -> Tensor:
    if t is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if not isinstance(t, Tensor) or t.dtype != torch.bool or t.shape != (n,):
        desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a bool tensor of shape [{n}], got {desc}")
    return t.to(device)


def _membership(tree: TreeLike, num_leaves: int | None = None) -> tuple[Tensor, Tensor, int]:
    """(leaf id, edge id) pairs of "edge lies on leaf's path", both ``[K]``, and ``E``.

    Validates ``leaf_edges [L, T]`` (``-1`` = padding) against ``step [E]``, and that every edge lies
    on some leaf's path (a node with no descendant leaf has no value).
    """
    step = _int_vector(_get(tree, "step"), "step")
    E = step.shape[0]
    leaf_edges = _get(tree, "leaf_edges")
    if leaf_edges.dim() != 2:
        raise ValueError(f"leaf_edges must have shape [L, T], got {tuple(leaf_edges.shape)}")
    if leaf_edges.dtype == torch.bool or leaf_edges.is_floating_point() or leaf_edges.is_complex():
        raise TypeError(f"leaf_edges must be an integer tensor, got dtype {leaf_edges.dtype}")
    if num_leaves is not None and leaf_edges.shape[0] != num_leaves:
        raise ValueError(f"leaf_edges has {leaf_edges.shape[0]} rows but leaf_rewards has {num_leaves} entries")
    leaf_edges = leaf_edges.long().to(step.device)
    if leaf_edges.numel() and (int(leaf_edges.min()) < -1 or int(leaf_edges.max()) >= E):
        raise ValueError(
            f"leaf_edges holds ids in [{int(leaf_edges.min())}, {int(leaf_edges.max())}], outside [0, E={E}) (-1 = padding)"
        )
    on = leaf_edges >= 0
    leaf_ids = torch.arange(leaf_edges.shape[0], device=step.device)[:, None].expand_as(leaf_edges)[on]
    edge_ids = leaf_edges[on]
    covered = torch.zeros(E, dtype=torch.bool, device=step.device)
    covered[edge_ids] = True
    if not bool(covered.all()):
        bad = (~covered).nonzero()[:, 0][:5].tolist()
        raise ValueError(f"edges {bad} lie on no leaf's path (leaf_edges): their nodes have no descendant leaf")
    return leaf_ids, edge_ids, E


# -- BranchGRPO ---------------------------------------------------------------------------------------
def edge_group_ids(tree_or_parts: TreeLike) -> Tensor:
    """``[E]`` long: the group id (``leaf_group``) of the leaves under each edge.

    The per-edge ``tree_id`` for :func:`depthwise_advantages` / :func:`width_prune` on a
    :class:`RolloutTree`: groups are global (a prompt's index in the global batch).

    Raises:
        ValueError: the leaves under one edge belong to different groups.
    """
    leaf_ids, edge_ids, E = _membership(tree_or_parts)
    group = _int_vector(_get(tree_or_parts, "leaf_group"), "leaf_group").to(edge_ids.device)
    g = group[leaf_ids]
    lo = torch.full((E,), torch.iinfo(torch.long).max, device=g.device).scatter_reduce_(0, edge_ids, g, "amin")
    hi = torch.full((E,), torch.iinfo(torch.long).min, device=g.device).scatter_reduce_(0, edge_ids, g, "amax")
    if bool((lo != hi).any()):
        e = int((lo != hi).nonzero()[0, 0])
        raise ValueError(f"edge {e} has leaves of different leaf_group ids under it ({int(lo[e])} and {int(hi[e])})")
    return lo


def fuse_node_rewards(
    tree_or_parts: TreeLike,
    leaf_rewards: Tensor,
    mode: str = "mean",
    temperature: float = 1.0,
) -> Tensor:
    """Value of the node each edge leads to, fused from the rewards of its descendant leaves.

    BranchGRPO reward fusion (Li et al. 2025, §3, "reward fusion"), for the node ``n`` reached by
    edge ``e``:

    * ``"mean"`` -- the uniform mean of the rewards of its descendant leaves ``L(n)``. The
      reference's default (``--tree_prob_weighted`` off): Fredreic1849/BranchGRPO @ 19fbb9f,
      ``fastvideo/train_branchgrpo_flux.py`` lines 642-649.
    * ``"logprob_softmax"`` -- the reference's probability-weighted fusion (``--tree_prob_weighted``,
      same file lines 614-640), bottom-up: a leaf's value is its reward; a node with one child takes
      its child's value; a node with children ``C(n)`` takes
      ``r̄_n = sum_{c in C(n)} softmax_{c in C(n)}(log p(n->c) / temperature) r̄_c``, a softmax over
      the log-probs of its own child EDGES only (the reference fixes ``alpha = 1``, i.e.
      ``temperature = 1``). Edges of non-branching steps never enter a weight.
    * ``"path_logprob_softmax"`` -- flowalign's earlier form: one softmax over whole node-to-leaf
      paths, ``w_l = softmax_{l in L(n)}(log p(path_l) / temperature)`` with
      ``log p(path_l) = sum_t log_prob_old[leaf_edges[l, t]]`` (the root->n prefix cancels). It
      differs from ``"logprob_softmax"`` below a node with more than one level of splits, and
      whenever non-branching edges carry different log-probs.

    Log-probs are ``log_prob_old`` (the repo's, like the reference's, means over latent dims).

    Args:
        tree_or_parts: a RolloutTree or mapping with ``step [E]``, ``leaf_edges [L, T]``; the
            softmax modes also need ``log_prob_old [E]``, and ``"logprob_softmax"`` ``parent [E]``.
        leaf_rewards: ``[L]`` finite float rewards.
        mode: one of :data:`FUSION_MODES`.
        temperature: softmax temperature (> 0); ignored for ``"mean"``.

    Returns:
        ``[E]`` float32 node values (a leaf's own edge gets the leaf's reward).
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"mode must be one of {list(FUSION_MODES)}, got {mode!r}")
    if not isinstance(leaf_rewards, Tensor):
        raise TypeError(f"leaf_rewards must be a torch.Tensor, got {type(leaf_rewards).__name__}")
    L = leaf_rewards.shape[0] if leaf_rewards.dim() == 1 else -1
    leaf_ids, edge_ids, E = _membership(tree_or_parts, L if L >= 0 else None)
    r = _float_vector(leaf_rewards, "leaf_rewards", _get(tree_or_parts, "leaf_edges").shape[0]).to(edge_ids.device)
    f64 = dict(dtype=torch.float64, device=edge_ids.device)

    if mode == "mean":
        w = torch.ones(leaf_ids.shape[0], **f64)
    else:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        logp = _float_vector(_get(tree_or_parts, "log_prob_old"), "log_prob_old", E).to(edge_ids.device)
        if mode == "logprob_softmax":
            return _fuse_bottom_up(tree_or_parts, r, logp, leaf_ids, edge_ids, float(temperature))
        path_logp = torch.zeros(r.shape[0], **f64).index_add_(0, leaf_ids, logp[edge_ids])  # [L]
        s = path_logp[leaf_ids] / float(temperature)  # [K] score of leaf under each ancestor edge
        # Segment softmax over the leaves of each node, stabilised by the per-node max.
        smax = torch.full((E,), -math.inf, **f64).scatter_reduce_(0, edge_ids, s, "amax")
        w = torch.exp(s - smax[edge_ids])
    num = torch.zeros(E, **f64).index_add_(0, edge_ids, w * r[leaf_ids])
    den = torch.zeros(E, **f64).index_add_(0, edge_ids, w)
    return (num / den).to(torch.float32)


def _parent_vector(tree: TreeLike, step: Tensor) -> Tensor:
    """``[E]`` long parent edge ids (-1 = root) on ``step``'s device, checked: ids in ``[-1, E)`` and
    every edge deeper than its parent."""
    E = step.shape[0]
    parent = _int_vector(_get(tree, "parent"), "parent", E).to(step.device)
    if E and (int(parent.min()) < -1 or int(parent.max()) >= E):
        raise ValueError(f"parent holds ids in [{int(parent.min())}, {int(parent.max())}], outside [0, E={E}) (-1 = root)")
    has_parent = parent >= 0
    if bool((step[parent[has_parent]] >= step[has_parent]).any()):
        raise ValueError("every edge's step must be larger than its parent edge's step")
    return parent


def _fuse_bottom_up(tree: TreeLike, r: Tensor, logp: Tensor, leaf_ids: Tensor, edge_ids: Tensor,
                    temperature: float) -> Tensor:
    """``fuse_node_rewards(mode="logprob_softmax")``: per-node softmax over child-edge log-probs,
    from the deepest nodes up (BranchGRPO @ 19fbb9f, ``train_branchgrpo_flux.py`` lines 616-640)."""
    device = edge_ids.device
    E = logp.shape[0]
    step = _int_vector(_get(tree, "step"), "step", E).to(device)
    parent = _parent_vector(tree, step)
    has_parent = parent >= 0
    # The edge producing each leaf is the deepest edge on its path; leaves are exactly the childless nodes.
    L = r.shape[0]
    deepest = torch.full((L,), -1, dtype=torch.long, device=device).scatter_reduce_(0, leaf_ids, step[edge_ids], "amax")
    own = edge_ids[step[edge_ids] == deepest[leaf_ids]]
    own_leaf = leaf_ids[step[edge_ids] == deepest[leaf_ids]]
    n_children = torch.zeros(E, dtype=torch.long, device=device).index_add_(
        0, parent[has_parent], torch.ones_like(parent[has_parent]))
    is_leaf_edge = torch.zeros(E, dtype=torch.bool, device=device)
    is_leaf_edge[own] = True
    if own.unique().numel() != L or bool((is_leaf_edge != (n_children == 0)).any()):
        raise ValueError("leaf_edges and parent disagree: every leaf must end in its own childless edge")
    value = torch.zeros(E, dtype=torch.float64, device=device)
    value[own] = r[own_leaf]
    # Children of the parents at step t have larger steps, so their values are final when step t is reached.
    child_ids = has_parent.nonzero()[:, 0]
    for t in torch.unique(step[parent[child_ids]]).flip(0).tolist():
        c = child_ids[step[parent[child_ids]] == t]
        p = parent[c]
        s = logp[c] / temperature
        smax = torch.full((E,), -math.inf, dtype=torch.float64, device=device).scatter_reduce_(0, p, s, "amax")
        w = torch.exp(s - smax[p])  # a single child weighs exp(0) = 1: its value passes up unchanged
        num = torch.zeros(E, dtype=torch.float64, device=device).index_add_(0, p, w * value[c])
        den = torch.zeros(E, dtype=torch.float64, device=device).index_add_(0, p, w)
        at = torch.unique(p)
        value[at] = num[at] / den[at]
    return value.to(torch.float32)


def edge_root_ids(tree_or_parts: TreeLike, root_fanout: int = 1) -> Tensor:
    """``[E]`` long: the id of the rollout tree (initial noise, the reference's root node) each edge grows from.

    The edges leaving initial noises (``parent = -1``) are taken in id order, ``root_fanout``
    consecutive ones per initial noise: the rollout engine's layout (a node's children are
    consecutive), with ``root_fanout`` the branching factor of step 0 (1 when step 0 does not
    split). Every other edge inherits its parent's root. When ``x_t`` is present, the root edges
    said to share a noise are checked to start from the same latent.

    Raises:
        ValueError: the number of root edges is not a multiple of ``root_fanout``, or root edges
            grouped together start from different latents.
    """
    if isinstance(root_fanout, bool) or not isinstance(root_fanout, int) or root_fanout < 1:
        raise ValueError(f"root_fanout must be an integer >= 1, got {root_fanout!r}")
    step = _int_vector(_get(tree_or_parts, "step"), "step")
    E, device = step.shape[0], step.device
    parent = _parent_vector(tree_or_parts, step)
    roots = (parent < 0).nonzero()[:, 0]
    if roots.numel() % root_fanout:
        raise ValueError(f"{roots.numel()} root edges (parent -1) are not a multiple of root_fanout={root_fanout}")
    root_of_root_edge = torch.full((E,), -1, dtype=torch.long, device=device)
    root_of_root_edge[roots] = torch.arange(roots.numel(), device=device) // root_fanout
    x_t = _get(tree_or_parts, "x_t", required=False)
    if x_t is not None and root_fanout > 1 and roots.numel():
        x0 = x_t[roots].reshape(roots.numel() // root_fanout, root_fanout, -1)
        if not bool((x0 == x0[:, :1]).all()):
            raise ValueError(f"root edges grouped by root_fanout={root_fanout} start from different latents x_t: "
                             "the branching factor of step 0 does not match the tree")
    # Walk every edge up to the root level, one gather per depth.
    anc = torch.arange(E, device=device)
    while True:
        up = parent[anc]
        if not bool((up >= 0).any()):
            break
        anc = torch.where(up >= 0, up, anc)
    return root_of_root_edge[anc]


def depthwise_advantages(
    node_values: Tensor,
    step: Tensor,
    tree_id: Tensor,
    *,
    eps: float = 1e-4,
    clip: float | None = None,
    valid: Tensor | None = None,
    unbiased: bool = False,
    std_floor: float = 0.0,
) -> Tensor:
    """Depth-wise normalised advantages ``A_e = (v_e - mu_{tree,d}) / (sigma_{tree,d} + eps)``.

    BranchGRPO depth-wise advantage (Li et al. 2025, §3): node values are standardised among the
    nodes of the same tree at the same depth ``d = step[e]`` (population std unless
    ``unbiased``); the edge parent->child is trained with the child's advantage, i.e. ``A_e`` is the advantage of the
    node ``e`` leads to. Implemented as :func:`flowalign.advantages.group_advantages` with one group
    per (tree, depth) pair; a (tree, depth) whose values all coincide (e.g. a depth above the
    first split, which has a single node) gets exactly 0.

    The reference (Fredreic1849/BranchGRPO @ 19fbb9f, ``fastvideo/train_branchgrpo_flux.py`` lines
    663-680, ``compute_hierarchical_advantages_by_depth``) normalises each root's tree separately
    (``tree_id`` from :func:`edge_root_ids`), gives a depth with one node 0, gives a depth whose
    unbiased std is below 1e-6 all zeros (``std_floor=1e-6``), and otherwise divides by
    ``torch.std() + 1e-8`` (``unbiased=True, eps=1e-8``).

    Args:
        node_values: ``[E]`` float, e.g. :func:`fuse_node_rewards`.
        step: ``[E]`` long depth (sigma-schedule step) of each edge.
        tree_id: ``[E]`` long tree / group id of each edge (:func:`edge_root_ids` or
            :func:`edge_group_ids`).
        eps, clip, valid, unbiased: as in ``group_advantages``.
        std_floor: a (tree, depth) cell whose std (the same estimator, over its valid members) is
            below this gets advantage 0 (>= 0; 0 keeps only the exact zero-spread rule).

    Returns:
        ``[E]`` float32.
    """
    if not isinstance(node_values, Tensor) or node_values.dim() != 1:
        shape = tuple(node_values.shape) if isinstance(node_values, Tensor) else type(node_values).__name__
        raise ValueError(f"node_values must be a 1-D [E] tensor, got {shape}")
    if isinstance(std_floor, bool) or not isinstance(std_floor, (int, float)) or not (
            math.isfinite(std_floor) and std_floor >= 0):
        raise ValueError(f"std_floor must be a finite number >= 0, got {std_floor!r}")
    E = node_values.shape[0]
    step = _int_vector(step, "step", E).to(node_values.device)
    tree_id = _int_vector(tree_id, "tree_id", E).to(node_values.device)
    if E == 0:
        return torch.zeros(0, dtype=torch.float32, device=node_values.device)
    cell = joint_ids(tree_id, step)
    adv = group_advantages(node_values, cell, std_mode="group", clip=clip, eps=eps, valid=valid, unbiased=unbiased)
    if std_floor > 0:
        # The reference's `if std_reward < 1e-6: advantages = 0` (train_branchgrpo_flux.py line 675).
        w = _bool_vector(valid, "valid", E, node_values.device).to(torch.float64)
        v = torch.where(w > 0, node_values.detach().to(torch.float64), torch.zeros_like(w))
        C = int(cell.max()) + 1
        count = torch.zeros(C, dtype=torch.float64, device=v.device).index_add_(0, cell, w)
        mean = torch.zeros_like(count).index_add_(0, cell, v) / count.clamp_min(1.0)
        sq = torch.zeros_like(count).index_add_(0, cell, ((v - mean[cell]) * w) ** 2)
        std = (sq / (count - (1.0 if unbiased else 0.0)).clamp_min(1.0)).sqrt()
        adv = torch.where(std[cell] < std_floor, torch.zeros_like(adv), adv)
    return adv


def width_prune(
    tree_or_parts: TreeLike,
    leaf_rewards: Tensor | None = None,
    *,
    mode: str = "best_worst",
    keep_fraction: float = 0.5,
    num_keep: int = 1,
    advantages: Tensor | None = None,
    tree_id: Tensor | None = None,
) -> Tensor:
    """Width pruning (BranchGRPO, Li et al. 2025, §3 "pruning"): which trainable edges keep their gradient.

    * ``mode="best_worst"``: per tree, keep the paths of the ``num_keep`` best and ``num_keep`` worst
      leaves by reward (ties ordered by leaf id: the best side takes lower ids first, the worst side
      higher ids); every other edge is cut. Needs ``leaf_rewards [L]``
      and, for more than one tree, ``leaf_group [L]`` in ``tree_or_parts``.
    * ``mode="fraction"``: per branch (the sibling edges leaving one node: same ``parent``; root
      edges of one ``tree_id`` are siblings), keep ``ceil(keep_fraction * k)`` of the ``k`` children,
      those with the largest ``|advantages|`` (the strongest learning signals; ties -> lower edge
      id). Non-branching edges (``k = 1``) are always kept. Needs ``advantages [E]`` (e.g.
      :func:`depthwise_advantages`) and ``tree_id [E]`` when root edges of several trees are present.

    Only TRAINED edges are cut: the result is ``trainable & kept`` (``trainable`` from
    ``tree_or_parts``, all-True when absent). What was sampled is unchanged.

    Returns:
        ``[E]`` bool mask of edges to train.
    """
    if mode not in WIDTH_PRUNE_MODES:
        raise ValueError(f"mode must be one of {list(WIDTH_PRUNE_MODES)}, got {mode!r}")
    step = _int_vector(_get(tree_or_parts, "step"), "step")
    E, device = step.shape[0], step.device
    trainable = _bool_vector(_get(tree_or_parts, "trainable", required=False), "trainable", E, device)

    if mode == "best_worst":
        if isinstance(num_keep, bool) or not isinstance(num_keep, int) or num_keep < 1:
            raise ValueError(f"num_keep must be an integer >= 1, got {num_keep!r}")
        if leaf_rewards is None:
            raise ValueError("leaf_rewards is required for width_prune mode='best_worst'")
        leaf_ids, edge_ids, _ = _membership(tree_or_parts, leaf_rewards.shape[0] if leaf_rewards.dim() == 1 else None)
        r = _float_vector(leaf_rewards, "leaf_rewards", leaf_rewards.shape[0]).to(device)
        L = r.shape[0]
        lg = _get(tree_or_parts, "leaf_group", required=False)
        group = torch.zeros(L, dtype=torch.long, device=device) if lg is None else _int_vector(lg, "leaf_group", L).to(device)
        # Rank within group, best first: sort by (group, -reward, leaf id) with two stable sorts.
        ids = torch.arange(L, device=device)
        order = torch.sort(-r, stable=True).indices
        order = order[torch.sort(group[order], stable=True).indices]
        g_sorted = group[order]
        _, counts = torch.unique_consecutive(g_sorted, return_counts=True)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rank = torch.empty(L, dtype=torch.long, device=device)
        rank[order] = ids - starts  # 0 = best in its group
        size = torch.repeat_interleave(counts, counts)
        size_of = torch.empty(L, dtype=torch.long, device=device)
        size_of[order] = size
        # The worst side takes the last positions of the same total order.
        keep_leaf = (rank < num_keep) | (rank >= size_of - num_keep)
        kept = torch.zeros(E, dtype=torch.bool, device=device)
        kept[edge_ids[keep_leaf[leaf_ids]]] = True
        return trainable & kept

    # mode == "fraction"
    if not (isinstance(keep_fraction, (int, float)) and not isinstance(keep_fraction, bool)
            and 0 < keep_fraction <= 1):
        raise ValueError(f"keep_fraction must be a number in (0, 1], got {keep_fraction!r}")
    if advantages is None:
        raise ValueError("advantages is required for width_prune mode='fraction'")
    dev = _float_vector(advantages, "advantages", E).to(device).abs()
    parent = _int_vector(_get(tree_or_parts, "parent"), "parent", E).to(device)
    tid = torch.zeros(E, dtype=torch.long, device=device) if tree_id is None else _int_vector(tree_id, "tree_id", E).to(device)
    # Sibling key: the parent edge; root edges (parent -1) are grouped by tree id.
    is_root = parent < 0
    key_pair = torch.stack([torch.where(is_root, tid, parent), is_root.long()], dim=1)
    _, sib = torch.unique(key_pair, dim=0, return_inverse=True)  # [E]
    S = int(sib.max()) + 1 if E else 0
    k = torch.zeros(S, dtype=torch.long, device=device).index_add_(0, sib, torch.ones_like(sib))
    # Rank children within a sibling set by |advantage| (desc), ties -> lower edge id.
    ids = torch.arange(E, device=device)
    order = torch.sort(-dev, stable=True).indices
    order = order[torch.sort(sib[order], stable=True).indices]
    s_sorted = sib[order]
    _, counts = torch.unique_consecutive(s_sorted, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.empty(E, dtype=torch.long, device=device)
    rank[order] = ids - starts
    quota = torch.ceil(k.to(torch.float64) * float(keep_fraction) - 1e-9).long()  # [S]
    return trainable & (rank < quota[sib])


def depth_prune(
    step: Tensor,
    iteration: int,
    window: int,
    *,
    num_steps: int,
    mode: str = "wrap",
    stride: int = 1,
    start: int | None = None,
    stop: int = 0,
    interval: int = 1,
    trainable: Tensor | None = None,
) -> Tensor:
    """Sliding depth pruning (BranchGRPO, Li et al. 2025, §3 "pruning"): cut a window of depths.

    Edges whose ``step`` lies in the window ``[d, d + window)`` lose their gradient; the result is
    ``trainable & ~in_window``. Where the window sits at ``iteration`` (0-based):

    * ``mode="slide_stop"`` (the reference: Fredreic1849/BranchGRPO @ 19fbb9f,
      ``fastvideo/train_branchgrpo_flux.py`` lines 1278-1294): the window starts at ``start``
      (default ``num_steps - window``, the deepest position) and moves one depth toward the
      shallow end every ``interval`` iterations, then stays once its first depth reaches ``stop``:
      ``d = start - min((iteration + 1) // interval, max(0, start - stop))``. The reference's
      ``shift = current_step // interval`` counts training steps from 1, hence ``iteration + 1``;
      its depths are child depths, ``depth = step + 1``.
    * ``mode="wrap"`` (flowalign's earlier form): ``d = (start + iteration * stride) mod
      (num_steps - window + 1)`` (``start`` default 0): the window moves ``stride`` depths deeper per
      iteration and wraps to depth 0 after the last full position.

    Args:
        step: ``[E]`` long depth of each edge.
        iteration: training iteration (>= 0).
        window: number of pruned depths (``0 <= window < num_steps``; 0 prunes nothing).
        num_steps: ``T``, the number of depths.
        mode: ``"slide_stop"`` or ``"wrap"``.
        stride: ``"wrap"``: depths moved per iteration (>= 0).
        start: first pruned depth at iteration 0 (``0 <= start <= num_steps - window``).
        stop: ``"slide_stop"``: the shallowest first depth the window slides to (>= 0).
        interval: ``"slide_stop"``: iterations per one-depth move (>= 1).
        trainable: optional ``[E]`` bool (default all True).

    Returns:
        ``[E]`` bool mask of edges to train.
    """
    if mode not in DEPTH_PRUNE_MODES:
        raise ValueError(f"mode must be one of {list(DEPTH_PRUNE_MODES)}, got {mode!r}")
    for name, val, lo in (("iteration", iteration, 0), ("window", window, 0), ("num_steps", num_steps, 1),
                          ("stride", stride, 0), ("stop", stop, 0), ("interval", interval, 1)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
    if window >= num_steps:
        raise ValueError(f"window={window} must be < num_steps={num_steps}: it would prune every depth")
    if start is None:
        start = num_steps - window if mode == "slide_stop" else 0
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= num_steps - window:
        raise ValueError(f"start must be an integer in [0, num_steps - window = {num_steps - window}], got {start!r}")
    step = _int_vector(step, "step")
    E = step.shape[0]
    if E and (int(step.min()) < 0 or int(step.max()) >= num_steps):
        raise ValueError(f"step holds depths in [{int(step.min())}, {int(step.max())}], outside [0, num_steps={num_steps})")
    trainable = _bool_vector(trainable, "trainable", E, step.device)
    if window == 0:
        return trainable
    if mode == "slide_stop":
        d = start - min((iteration + 1) // interval, max(0, start - stop))
    else:
        d = (start + iteration * stride) % (num_steps - window + 1)
    in_window = (step >= d) & (step < d + window)
    return trainable & ~in_window


# -- TempFlow-GRPO ------------------------------------------------------------------------------------
def branch_step_advantages(
    rewards: Tensor,
    branch_step: Tensor,
    group_ids: Tensor,
    *,
    eps: float = 1e-4,
    clip: float | None = None,
) -> Tensor:
    """TempFlow-GRPO process-reward advantages (He et al. 2025, §3 "trajectory branching").

    Sample ``i`` follows the ODE trunk to branch step ``k``, takes ONE SDE step there and finishes by
    ODE, so its final reward ``r_i`` is the process reward of step ``k``. The advantage is
    standardised among the samples of the same group (prompt / seed group) branched at the same
    step: ``A_i = (r_i - mean_{g,k}) / (std_{g,k} + eps)`` (population std; zero spread -> 0).

    Args:
        rewards: ``[N]`` final rewards of the branched samples.
        branch_step: ``[N]`` long step of each sample's SDE transition.
        group_ids: ``[N]`` long group id (prompt / seed group).

    Returns:
        ``[N]`` float32; the caller trains sample ``i``'s branch-step edge with ``A_i``.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D [N] tensor, got {shape}")
    N = rewards.shape[0]
    branch_step = _int_vector(branch_step, "branch_step", N).to(rewards.device)
    group_ids = _int_vector(group_ids, "group_ids", N).to(rewards.device)
    if N == 0:
        return torch.zeros(0, dtype=torch.float32, device=rewards.device)
    return group_advantages(rewards, joint_ids(group_ids, branch_step), std_mode="group", clip=clip, eps=eps)


def branch_step_edge_advantages(
    tree_or_parts: TreeLike,
    leaf_rewards: Tensor,
    *,
    eps: float = 1e-4,
    clip: float | None = None,
) -> Tensor:
    """TempFlow-GRPO advantages on the edges of a branched rollout tree.

    Each leaf's path must hold exactly one stochastic edge (``noise_std > 0``: its branch step);
    that edge gets :func:`branch_step_advantages` of the leaf (groups from ``leaf_group``,
    default one group), every other edge (the ODE trunk and ODE finish) gets 0.

    Returns:
        ``[E]`` float32.

    Raises:
        ValueError: a leaf's path holds zero or several stochastic edges (names the leaf).
    """
    if not isinstance(leaf_rewards, Tensor) or leaf_rewards.dim() != 1:
        raise ValueError("leaf_rewards must be a 1-D [L] tensor")
    leaf_ids, edge_ids, E = _membership(tree_or_parts, leaf_rewards.shape[0])
    device = edge_ids.device
    std = _float_vector(_get(tree_or_parts, "noise_std"), "noise_std", E).to(device)
    step = _int_vector(_get(tree_or_parts, "step"), "step", E).to(device)
    L = leaf_rewards.shape[0]
    stoch = std[edge_ids] > 0  # [K]
    n_stoch = torch.zeros(L, dtype=torch.long, device=device).index_add_(0, leaf_ids, stoch.long())
    if bool((n_stoch != 1).any()):
        l = int((n_stoch != 1).nonzero()[0, 0])
        raise ValueError(
            f"leaf {l} has {int(n_stoch[l])} stochastic edges (noise_std > 0) on its path; TempFlow branching "
            "needs exactly one (an ODE trunk, one SDE branch step, an ODE finish)"
        )
    leaf_branch_edge = torch.empty(L, dtype=torch.long, device=device)
    leaf_branch_edge[leaf_ids[stoch]] = edge_ids[stoch]
    lg = _get(tree_or_parts, "leaf_group", required=False)
    group = torch.zeros(L, dtype=torch.long, device=device) if lg is None else _int_vector(lg, "leaf_group", L).to(device)
    adv = branch_step_advantages(leaf_rewards.to(device), step[leaf_branch_edge], group, eps=eps, clip=clip)
    out = torch.zeros(E, dtype=torch.float32, device=device)
    out[leaf_branch_edge] = adv  # an SDE edge with no later split leads to exactly one leaf
    return out


def noise_aware_weights(noise_std: Tensor, mask: Tensor | None = None) -> Tensor:
    """TempFlow-GRPO noise-aware step weights (He et al. 2025, §3 "noise-aware weighting").

    The policy-gradient term of the edge at step ``t`` is scaled by its exploration noise
    ``std_t * sqrt(delta_t)`` -- exactly ``RolloutTree.noise_std`` (the transition std of
    ``sde_step``) -- normalised so the mean weight over the weighted edges is 1::

        w_e = noise_std_e / mean_{e' in mask} noise_std_e'

    Args:
        noise_std: ``[E]`` finite, >= 0 transition stds.
        mask: optional ``[E]`` bool, the edges that are trained (default: ``noise_std > 0``).

    Returns:
        ``[E]`` float32; 0 outside ``mask``; all 0 (never NaN) when every masked std is 0.
    """
    if not isinstance(noise_std, Tensor) or noise_std.dim() != 1:
        shape = tuple(noise_std.shape) if isinstance(noise_std, Tensor) else type(noise_std).__name__
        raise ValueError(f"noise_std must be a 1-D [E] tensor, got {shape}")
    E = noise_std.shape[0]
    s = _float_vector(noise_std, "noise_std", E)
    if bool((s < 0).any()):
        raise ValueError(f"noise_std must be >= 0, got min {float(s.min())}")
    m = (s > 0) if mask is None else _bool_vector(mask, "mask", E, s.device)
    s = torch.where(m, s, torch.zeros_like(s))
    total = s.sum()
    n = m.sum()
    if float(total) == 0.0:
        return torch.zeros(E, dtype=torch.float32, device=s.device)
    return (s * n / total).to(torch.float32)
