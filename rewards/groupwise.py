"""Groupwise rewards: rank samples against the other samples of their prompt's group.

GRPO-style training already compares the G samples of one prompt; a groupwise reward makes the
comparison the reward itself, which removes the pointwise reward's scale (the point of Pref-GRPO,
Wang et al. 2025, "Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable Text-to-Image
Reinforcement Learning": a pairwise judge compares every pair in a group and each sample's reward is
its win rate ``(1 / (G - 1)) Σ_{j≠i} 1[x_i ≻ x_j]``; a tie counts one half).

* :class:`GroupwiseRank` wraps a pointwise reward: ``score_i = rank_i / (G - 1)`` with tied ranks
  averaged, which is exactly the win rate of ``i`` against its group with ties counted ½.
* :class:`GroupDiversity` scores each sample by its mean distance to the rest of its group (a
  diversity bonus to add to a task reward).
* :class:`PairwiseAsPointwise` wraps a pairwise judge (``compare(media_a, media_b, prompts) -> P(a ≻ b)``)
  into per-sample win rates over all pairs of a group; failed comparisons count ½, as in Pref-GRPO.
  A judge may also give verdicts per dimension (:data:`DIMENSIONS_PROTOCOL`); the wrapper then
  reports each dimension's win rate as a component, which ``pref_grpo`` blends with the overall one.

Groups come from ``metadata[i][group_key]`` (any hashable id) or, without it, from consecutive
chunks of ``group_size`` samples (the recipe's layout: prompt-major, G samples per prompt).
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch
from torch import Tensor

from .base import RewardOutput, as_reward_output

__all__ = ["group_ids", "win_rates", "GroupwiseRank", "PairwiseAsPointwise", "GroupDiversity", "OVERALL",
           "DIM_PREFIX", "DIM_COUNT_PREFIX", "judge_dimensions"]

#: component names of a dimensioned judge's win rates (see :class:`PairwiseAsPointwise`)
OVERALL, DIM_PREFIX, DIM_COUNT_PREFIX = "overall", "dim/", "dim_n/"

DIMENSIONS_PROTOCOL = """\
Optional per-dimension protocol of a pairwise judge (Pref-GRPO's UnifiedReward-Flex categories,
CodeGoat24/Pref-GRPO @ 3e787f6, fastvideo/rewards/unifiedreward_flex.py lines 110-169): the judge has
``dimensions``, a non-empty tuple of distinct names, and ``compare_dimensions(media_a, media_b, prompts)``
returning ``(overall, per_dim)``: ``overall`` what ``compare`` returns (P(a ≻ b) [P], a tensor or a
RewardOutput whose ``valid`` marks failures) and ``per_dim`` a [P, D] float tensor, P(a ≻ b) in each
dimension (½ a tie, NaN no verdict in that dimension). A judge without ``dimensions`` is asked ``compare`` only."""


def group_ids(batch: int, group_size: int | None, metadata: Sequence[dict[str, Any]] | None,
              group_key: str = "group") -> Tensor:
    """Group index per sample ``[B]`` (long, 0..n_groups-1, in order of first appearance).

    ``metadata[i][group_key]`` wins when every sample has it; otherwise consecutive chunks of
    ``group_size``. Raises ValueError naming the problem when neither defines the groups.
    """
    if metadata is not None and len(metadata) != batch:
        raise ValueError(f"groupwise reward: got {len(metadata)} metadata entries for {batch} samples")
    has_key = [isinstance(m, dict) and group_key in m for m in metadata] if metadata is not None else [False]
    if all(has_key):
        seen: dict[Hashable, int] = {}
        return torch.tensor([seen.setdefault(m[group_key], len(seen)) for m in metadata], dtype=torch.long)
    if any(has_key):
        missing = [i for i, h in enumerate(has_key) if not h]
        raise ValueError(f"groupwise reward: metadata[i][{group_key!r}] is missing for samples {missing[:8]}")
    if group_size is None:
        raise ValueError(f"groupwise reward: give group_size or metadata[i][{group_key!r}] to define the groups")
    if batch % group_size != 0:
        raise ValueError(f"groupwise reward: batch of {batch} is not a multiple of group_size={group_size}")
    return torch.arange(batch) // group_size


def win_rates(scores: Tensor, groups: Tensor, valid: Tensor | None = None) -> Tensor:
    """Win rate of each sample against the valid members of its group, ties counted ½.

    ``w_i = (#{j: s_j < s_i} + ½ #{j ≠ i: s_j = s_i}) / (m - 1)`` over valid ``j`` in ``i``'s group
    (``m`` valid members) = (average 0-based rank) / (m - 1). Samples alone (m = 1) or invalid get 0.5.

    Args: scores ``[B]``, groups ``[B]`` long, valid ``[B]`` bool or None. Returns ``[B]`` float32.
    """
    s = scores.detach().float().cpu()
    g = groups.cpu()
    v = torch.ones_like(g, dtype=torch.bool) if valid is None else valid.cpu().bool()
    same = (g[:, None] == g[None, :]) & v[:, None] & v[None, :]
    same.fill_diagonal_(False)
    wins = ((s[None, :] < s[:, None]) & same).sum(1) + 0.5 * ((s[None, :] == s[:, None]) & same).sum(1)
    others = same.sum(1)
    out = torch.where(others > 0, wins / others.clamp(min=1), torch.full_like(s, 0.5))
    return torch.where(v, out, torch.full_like(s, 0.5))


def judge_dimensions(judge: Any) -> tuple[str, ...]:
    """The dimension names of a pairwise judge (:data:`DIMENSIONS_PROTOCOL`); ``()`` for a judge without."""
    dims = getattr(judge, "dimensions", None)
    if not dims:
        return ()
    if isinstance(dims, str) or not all(isinstance(d, str) and d and "/" not in d for d in dims) \
            or len(set(dims)) != len(dims):
        raise ValueError(f"judge {type(judge).__name__}: dimensions must be distinct non-empty names without '/', "
                         f"got {dims!r}")
    if not callable(getattr(judge, "compare_dimensions", None)):
        raise TypeError(f"judge {type(judge).__name__} declares dimensions {tuple(dims)} but has no "
                        "compare_dimensions(media_a, media_b, prompts) -> (overall, per_dim [P, D])")
    return tuple(dims)


def _check_group_size(group_size: int | None) -> None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"groupwise reward: group_size must be a positive int or None, got {group_size!r}")


def _build_judge(spec: Any) -> Any:
    """A judge object, or one built from a name/path string or ``{"_component_": ..., **kwargs}`` dict."""
    from .registry import COMPONENT_KEY, _plain, resolve_reward_class

    spec = _plain(spec)
    if isinstance(spec, str):
        return resolve_reward_class(spec)()
    if isinstance(spec, dict):
        params = dict(spec)
        if COMPONENT_KEY not in params:
            raise ValueError(f"PairwiseAsPointwise: judge spec needs {COMPONENT_KEY!r}, got keys {sorted(params)}")
        return resolve_reward_class(params.pop(COMPONENT_KEY))(**params)
    return spec


class GroupwiseRank:
    """Rank a pointwise reward within each group: ``score_i = rank_i / (G - 1)`` (ties averaged).

    ``components`` keep the inner reward's scores (``"<inner>"``) and components (``"<inner>/<c>"``);
    samples the inner reward marks invalid are left out of the ranking (score 0.5, valid False).
    """

    #: scores depend on the whole group: a run split over processes keeps each group on one rank
    needs_whole_groups = True

    def __init__(self, reward: Any, group_size: int | None = None, group_key: str = "group") -> None:
        from .registry import build_reward

        _check_group_size(group_size)
        self.reward = build_reward(reward)
        self.group_size, self.group_key = group_size, group_key
        self.name = f"{self.reward.name}_rank"
        self.modality = self.reward.modality

    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """``media`` ``[B, ...]``; returns win rates ``[B]`` in [0, 1]."""
        groups = group_ids(len(prompts), self.group_size, metadata, self.group_key)
        inner = as_reward_output(self.reward(media, prompts, metadata))
        scores = win_rates(inner.scores, groups, inner.valid).to(inner.scores.device)
        components = {self.reward.name: inner.scores, **{f"{self.reward.name}/{k}": c for k, c in inner.components.items()}}
        return RewardOutput(scores=scores, components=components, valid=inner.valid)


class PairwiseAsPointwise:
    """Turn a pairwise judge into per-sample win rates over all pairs of each group (Pref-GRPO).

    Args:
        judge: object with ``name``, ``modality`` and ``compare(media_a, media_b, prompts)`` returning
            ``P(a ≻ b)`` ``[P]`` (a tensor, or a RewardOutput whose ``valid`` marks failures).
        group_size / group_key: how groups are formed (see :func:`group_ids`).
        decision: ``"hard"`` (Pref-GRPO: a win is ``p > ½``, ``p = ½`` a tie) or ``"prob"`` (expected win ``p``).
        symmetric: also judge ``(b, a)`` and average ``p`` with ``1 − p(b, a)`` (cancels position bias).
        batch_size: pairs per ``compare`` call (None: all at once).

    A judge with dimensions (:data:`DIMENSIONS_PROTOCOL`) adds the components ``overall`` (the overall
    win rate, equal to ``scores``), ``dim/<name>`` (the win rate in each dimension, ½ where the sample
    has no verdict in it) and ``dim_n/<name>`` (how many of its pairs had a verdict in it), by the same
    ``decision`` and ``symmetric`` rules (:func:`flowalign.estimators.preference.dimension_win_rates`).
    ``scores`` stay the overall win rates: ``pref_grpo`` blends in the dimensions
    (``algorithm.pref_grpo.overall_weight`` / ``dim_weight`` / ``dimension_weights`` / ``blend_on``).
    """

    needs_whole_groups = True  # see GroupwiseRank

    def __init__(self, judge: Any, group_size: int | None = None, group_key: str = "group", decision: str = "hard",
                 symmetric: bool = False, batch_size: int | None = None) -> None:
        _check_group_size(group_size)
        judge = _build_judge(judge)
        if not callable(getattr(judge, "compare", None)):
            raise TypeError(f"PairwiseAsPointwise: judge {type(judge).__name__} has no compare(media_a, media_b, prompts)")
        if decision not in ("hard", "prob"):
            raise ValueError(f"PairwiseAsPointwise: decision must be 'hard' or 'prob', got {decision!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"PairwiseAsPointwise: batch_size must be a positive int or None, got {batch_size!r}")
        self.judge, self.group_size, self.group_key = judge, group_size, group_key
        self.decision, self.symmetric, self.batch_size = decision, symmetric, batch_size
        self.name = f"{getattr(judge, 'name', type(judge).__name__)}_winrate"
        self.modality = getattr(judge, "modality", "image")
        self.dimensions = judge_dimensions(judge)

    def _judge(self, media: Tensor, a: Tensor, b: Tensor, prompts: Sequence[str],
               metadata: Sequence[dict[str, Any]] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(p [P], ok [P], dims [P, D])`` for pairs ``(a[k], b[k])``, chunked by ``batch_size``
        (``D = 0`` for a judge without dimensions; NaN: no verdict in that dimension). A judge with
        ``needs_metadata = True`` (the editing VLM judge) also gets ``metadata=`` of sample ``a[k]``
        (both samples of a pair share a prompt group, hence its record)."""
        pass_meta = bool(getattr(self.judge, "needs_metadata", False))
        step = self.batch_size or max(len(a), 1)
        n_dims = len(self.dimensions)
        ps, oks = [torch.zeros(0)], [torch.zeros(0, dtype=torch.bool)]  # no pairs (groups of one): empty results
        dims = [torch.zeros(0, n_dims)]
        for k in range(0, len(a), step):
            ia, ib = a[k:k + step], b[k:k + step]
            args = (media[ia.to(media.device)], media[ib.to(media.device)], [prompts[i] for i in ia.tolist()])
            if n_dims:
                overall, per_dim = self.judge.compare_dimensions(*args)
                d = torch.as_tensor(per_dim).detach().float().cpu()
                if d.shape != (len(ia), n_dims):
                    raise ValueError(f"judge {self.name}: compare_dimensions returned per-dimension verdicts of shape "
                                     f"{tuple(d.shape)} for {len(ia)} pairs and dimensions {self.dimensions}")
                d = torch.where(torch.isfinite(d) & (d >= 0) & (d <= 1), d, torch.full_like(d, float("nan")))
                dims.append(d)
            elif pass_meta:
                overall = self.judge.compare(*args, metadata=None if metadata is None else [metadata[i] for i in ia.tolist()])
            else:
                overall = self.judge.compare(*args)
            out = as_reward_output(overall)
            p = out.scores.detach().float().cpu()
            if p.shape != ia.shape:
                raise ValueError(f"judge {self.name}: compare returned shape {tuple(p.shape)} for {len(ia)} pairs")
            ok = torch.isfinite(p) & (p >= 0) & (p <= 1)
            if out.valid is not None:
                ok &= out.valid.cpu().bool()
            ps.append(torch.where(ok, p, torch.full_like(p, 0.5)))
            oks.append(ok)
        return torch.cat(ps), torch.cat(oks), torch.cat(dims)

    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """Win rate ``[B]`` of each sample against the rest of its group; components ``failed_frac``."""
        batch = len(prompts)
        if media.shape[0] != batch:
            raise ValueError(f"{self.name}: got {batch} prompts for {media.shape[0]} samples")
        groups = group_ids(batch, self.group_size, metadata, self.group_key)
        a, b = torch.triu_indices(batch, batch, offset=1)
        keep = groups[a] == groups[b]
        a, b = a[keep], b[keep]
        p, ok, dims = self._judge(media, a, b, prompts, metadata)
        if self.symmetric:
            p_rev, ok_rev, dims_rev = self._judge(media, b, a, prompts, metadata)
            both = ok & ok_rev
            p = torch.where(both, (p + 1 - p_rev) / 2, torch.where(ok_rev, 1 - p_rev, p))
            ok = ok | ok_rev
            # per dimension the same: the mean of the orders that gave a verdict (NaN if neither did)
            dims = torch.stack([dims, 1 - dims_rev]).nanmean(0)
        w = p if self.decision == "prob" else (p > 0.5).float() + 0.5 * (p == 0.5).float()
        w = torch.where(ok, w, torch.full_like(w, 0.5))  # Pref-GRPO: ties / failures count ½
        wins = torch.zeros(batch).index_add_(0, a, w).index_add_(0, b, 1 - w)
        count = torch.zeros(batch).index_add_(0, a, torch.ones_like(w)).index_add_(0, b, torch.ones_like(w))
        failed = torch.zeros(batch).index_add_(0, a, (~ok).float()).index_add_(0, b, (~ok).float())
        scores = torch.where(count > 0, wins / count.clamp(min=1), torch.full((batch,), 0.5))
        failed_frac = torch.where(count > 0, failed / count.clamp(min=1), torch.zeros(batch))
        valid = (count == 0) | (failed < count)  # invalid only if every comparison of the sample failed
        dev = media.device
        components = {"failed_frac": failed_frac.to(dev)}
        if self.dimensions:
            from flowalign.estimators.preference import dimension_win_rates

            rates, counts = dimension_win_rates(a, b, dims, batch, decision=self.decision)
            components[OVERALL] = scores.to(dev)
            for k, name in enumerate(self.dimensions):
                components[DIM_PREFIX + name] = rates[:, k].to(dev)
                components[DIM_COUNT_PREFIX + name] = counts[:, k].to(dev)
        return RewardOutput(scores=scores.to(dev), components=components, valid=valid.to(dev))


class GroupDiversity:
    """Reward a sample for standing apart from the other samples of its group: ``score_i`` = its mean
    cosine distance to them (:func:`flowalign.diversity.distance_to_group`, in [0, 2]; 0 when all
    samples of the group are alike). Added with a small weight to a task reward it makes the
    group-relative advantage prefer, among equally good samples, the ones unlike their siblings:
    the diversity knob of ``configs/quickstart_diverse.yaml`` (our choice of bonus; DiverseGRPO-style
    group-level diversity terms are related).

    Args:
        features: where distances are measured: ``None`` (default) the pixels; or a reward (object,
            name or ``{_component_: ..., **kwargs}``) with ``embed(media) -> [B, D]``.
        group_size / group_key: how groups are found (see :func:`group_ids`).
    """

    name = "group_diversity"
    modality = "image"
    needs_whole_groups = True  # see GroupwiseRank

    def __init__(self, features: Any = None, group_size: int | None = None, group_key: str = "group") -> None:
        _check_group_size(group_size)
        self.embedder = _build_judge(features) if features is not None else None
        if self.embedder is not None and not callable(getattr(self.embedder, "embed", None)):
            raise ValueError(f"GroupDiversity: features={type(self.embedder).__name__} has no embed(media) method")
        self.group_size, self.group_key = group_size, group_key

    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """``media`` ``[B, ...]`` in [0, 1]; returns ``[B]`` mean distances to the rest of each group."""
        from flowalign.diversity import distance_to_group

        groups = group_ids(len(prompts), self.group_size, metadata, self.group_key)
        features = self.embedder.embed(media) if self.embedder is not None else media.flatten(1)
        return RewardOutput(scores=distance_to_group(features.float(), groups.to(features.device)).to(media.device))
