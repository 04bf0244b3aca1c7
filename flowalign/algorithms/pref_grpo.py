"""Pref-GRPO (Wang et al. 2025, arXiv:2508.20751, §3): GRPO whose reward is each sample's win rate
against the rest of its group under a pairwise preference judge, which resists reward hacking by
absolute-score inflation.

The win rates come from a groupwise reward (``pairwise_winrate``, :mod:`flowalign.rewards.groupwise`)
that sees the whole group; the advantages are GRPO's.

Reference: CodeGoat24/Pref-GRPO @ ``3e787f6``. Its ratio normalisation (``--rationorm``, on in every
shipped script through ``scripts/_common_finetune.sh`` line 31) is ``algorithm.pref_grpo.ratio_norm``
(:func:`flowalign.losses.ppo.ratio_norm_log_ratio`, in :meth:`PrefGRPO.edge_loss`).

A judge that also gives verdicts per dimension (UnifiedReward-Flex's categories;
:data:`flowalign.rewards.groupwise.DIMENSIONS_PROTOCOL`) has its dimension win rates averaged with
``dimension_weights`` and blended with the overall win rate, ``(w_o · overall + w_d · dim_mean) /
(w_o + w_d)``, on the group advantages (``blend_on: advantages``, the reference's ``--apply_gdpo``) or
on the win rates (``blend_on: rewards``) -- :meth:`PrefGRPO.leaf_advantages`. A judge without
dimensions trains as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowalign.algorithms.flow import FlowAlgorithm
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require, _require_gaussian_log_probs
from flowalign.advantages import group_advantages
from flowalign.algorithms.flow import ScoredRollout
from flowalign.config_fields import _f
from flowalign.estimators.preference import BLEND_ON, blend_advantages, blend_win_rates, standardize
from flowalign.losses.ppo import ratio_norm_log_ratio, step_weighted_ppo_clip_loss

#: rewards that turn a pairwise judge into per-sample win rates within the group
WIN_RATE_REWARDS = ("pairwise_winrate",)


@dataclass
class PrefGRPOConfig:
    ratio_norm: bool = _f(True, "Pref-GRPO's ratio normalisation (--rationorm, on in the reference's scripts): the "
                                "log-ratio plus mean((mu - mu_old)^2) / (2 s^2), times the transition std s, and each "
                                "step's policy loss divided by its sigma step (fastvideo/train_flux.py lines 729-756). "
                                "false: the plain PPO ratio.")
    # The blend of a dimensioned judge's verdicts; defaults: the reference's scripts
    # (scripts/full_train/ur_flex_prefgrpo_flux.sh lines 13-15, scripts/_common_finetune.sh line 34).
    overall_weight: float = _f(0.3, "weight w_o of the overall win rate in (w_o * overall + w_d * dim_mean) / (w_o + "
                                    "w_d) (Pref-GRPO's OVERALL_WEIGHT, 0.3 in its scripts; unifiedreward_flex.py "
                                    "lines 226-236). Used only with a judge that has dimensions.", ge=0)
    dim_weight: float = _f(0.7, "weight w_d of the weighted mean of the dimension win rates (Pref-GRPO's DIM_WEIGHT, "
                                "0.7 in its scripts); 0: the overall verdict alone. Used only with a judge that has "
                                "dimensions.", ge=0)
    dimension_weights: list[float] = _f(factory=lambda: [1.0, 0.7, 0.7], ge=0,
                                        help="weights of the judge's dimensions, in its order, in dim_mean (Pref-GRPO's "
                                             "CATEGORY_WEIGHTS, 1.0,0.7,0.7 in its Flux scripts): a longer list is cut, "
                                             "a shorter one padded with 1.0 (unifiedreward_flex.py lines 185-211)")
    blend_on: str = _f("advantages", "where a dimensioned judge's overall and dimension verdicts are blended: "
                                     "'advantages' (Pref-GRPO's --apply_gdpo, on in its scripts: the blend of the two "
                                     "group advantages, summed with the other rewards' weighted group advantages and "
                                     "standardised over the batch; dispatcher.py lines 643-702) or 'rewards' (the "
                                     "blended win rate is the reward).", choices=BLEND_ON)


@register_algorithm
class PrefGRPO(FlowAlgorithm):
    name = "pref_grpo"
    summary = "rewards are win rates of a pairwise preference judge within the group, then GRPO"
    paper = "Wang et al. 2025, Pref-GRPO, arXiv:2508.20751"
    config_file = "configs/pref_grpo/quickstart.yaml"
    shard_by = "prompt"  # the pairwise judge compares every pair of a group: the whole group on one rank
    Config = PrefGRPOConfig
    # the reference normalises with torch's unbiased std + 1e-8 (docs/FIDELITY.md, "Group std")
    std_estimator = "unbiased"
    std_eps = 1e-8

    def leaf_advantages(self, scored: ScoredRollout) -> Tensor:
        """GRPO's advantages; with a judge that has dimensions (reward components ``<reward>/overall``,
        ``<reward>/dim/<name>``, ``<reward>/dim_n/<name>`` from :class:`flowalign.rewards.groupwise.PairwiseAsPointwise`),
        Pref-GRPO's blend of its overall and dimension verdicts (CodeGoat24/Pref-GRPO @ 3e787f6):

        * ``blend_on: rewards`` -- the reward is the blended win rate (``unifiedreward_flex.py`` lines
          183-236, :func:`flowalign.estimators.preference.blend_win_rates`), the weighted sum of the
          rewards goes through GRPO's group normalisation as before;
        * ``blend_on: advantages`` (``--apply_gdpo``, ``dispatcher.py`` lines 628-702) -- each reward is
          group-normalised on its own (unbiased std + 1e-8, lines 628-639); the judge's is the blend of
          its overall and ``dim_mean`` advantages, the overall alone for a sample without a dimension
          verdict (lines 656-667); the weighted sum (line 697) is standardised over the whole batch
          with the unbiased std + 1e-8 (lines 698-702); then ``adv_clip``.
        """
        dimensioned = _dimensioned_rewards(scored)
        if not dimensioned:
            return super().leaf_advantages(scored)
        a, o = self.cfg.algorithm, self.opts
        unbiased, eps = self.group_std()
        blends = {}
        for name, (overall, rates, counts) in dimensioned.items():
            blends[name] = blend_win_rates(scored.gather(overall), scored.gather(rates), scored.gather(counts),
                                           dimension_weights=list(o.dimension_weights),
                                           overall_weight=o.overall_weight, dim_weight=o.dim_weight)
        valid, groups = scored.all_valid, scored.all_groups

        def norm(values: Tensor) -> Tensor:
            return group_advantages(values, groups, std_mode=a.std_mode, valid=valid, eps=eps, unbiased=unbiased)

        if o.blend_on == "rewards":
            total = sum(w * (blends[k][0] if k in blends else scored.gather(scored.components[k]))
                        for k, w in scored.weights.items())
            return group_advantages(total, groups, std_mode=a.std_mode, clip=a.adv_clip or None, valid=valid,
                                    eps=eps, unbiased=unbiased)
        total = torch.zeros(valid.shape[0], dtype=torch.float32)
        for k, w in scored.weights.items():
            if k in blends:
                _, dim_mean, has_dim = blends[k]
                adv = blend_advantages(norm(scored.gather(dimensioned[k][0])), norm(dim_mean), has_dim,
                                       overall_weight=o.overall_weight, dim_weight=o.dim_weight)
            else:
                adv = norm(scored.gather(scored.components[k]))
            total = total + w * adv
        adv = standardize(total, valid, unbiased=True, eps=1e-8)
        return adv.clamp(-a.adv_clip, a.adv_clip) if a.adv_clip else adv

    @property
    def keeps_means(self) -> bool:
        """The ratio normalisation needs the rollout's transition means ``mu_old``."""
        return bool(self.opts.ratio_norm)

    def edge_loss(self, log_prob: Tensor, log_prob_old: Tensor, advantages: Tensor, *, weights: Tensor | None,
                  kl: Tensor | None, mean: Tensor, mean_old: Tensor | None, std: Tensor, delta: Tensor
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """With ``ratio_norm``, Pref-GRPO's rationorm update (CodeGoat24/Pref-GRPO @ 3e787f6,
        ``fastvideo/train_flux.py`` lines 729-802): PPO-clip on the normalised log-ratio
        (:func:`flowalign.losses.ppo.ratio_norm_log_ratio`), each edge's clipped term divided by its
        sigma step ``delta`` (line 756), plus ``kl_beta`` x the KL, which is not divided (line 802).
        Both are means over the edges (weighted by ``weights`` if any). Without it, GRPO's loss."""
        if not self.opts.ratio_norm:
            return super().edge_loss(log_prob, log_prob_old, advantages, weights=weights, kl=kl, mean=mean,
                                     mean_old=mean_old, std=std, delta=delta)
        a = self.cfg.algorithm
        log_ratio = ratio_norm_log_ratio(log_prob, log_prob_old, mean, mean_old, std)
        return step_weighted_ppo_clip_loss(log_ratio, advantages, 1.0 / delta.detach().float(), clip_range=a.clip_range,
                                           weights=weights, kl=kl, kl_beta=a.kl_beta)

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        opts = cfg.algorithm.pref_grpo
        _require(isinstance(opts.ratio_norm, bool), "algorithm.pref_grpo.ratio_norm",
                 f"algorithm.pref_grpo.ratio_norm must be true or false, got {opts.ratio_norm!r}")
        if opts.ratio_norm:
            _require_gaussian_log_probs(cfg, "algorithm.pref_grpo.ratio_norm")
        for key in ("overall_weight", "dim_weight"):
            value = getattr(opts, key)
            _require(not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 0,
                     f"algorithm.pref_grpo.{key}", f"algorithm.pref_grpo.{key} must be a number >= 0, got {value!r}")
        _require(opts.overall_weight + opts.dim_weight > 0, "algorithm.pref_grpo.dim_weight",
                 "algorithm.pref_grpo.overall_weight + dim_weight must be > 0 (both are 0)")
        weights = list(opts.dimension_weights) if opts.dimension_weights is not None else None
        _require(weights is not None and all(not isinstance(w, bool) and isinstance(w, (int, float)) and w >= 0
                                             for w in weights),
                 "algorithm.pref_grpo.dimension_weights",
                 f"algorithm.pref_grpo.dimension_weights must be a list of numbers >= 0, got {opts.dimension_weights!r}")
        _require(opts.blend_on in BLEND_ON, "algorithm.pref_grpo.blend_on",
                 f"algorithm.pref_grpo.blend_on must be one of {list(BLEND_ON)}, got {opts.blend_on!r}")
        names = [spec.get("_component_") for spec in cfg.rewards if isinstance(spec, dict)]
        _require(any(n in WIN_RATE_REWARDS for n in names), "rewards",
                 f"pref_grpo trains on pairwise win rates: add a reward with _component_: {WIN_RATE_REWARDS[0]} "
                 f"(and a judge), got {names}")


def _dimensioned_rewards(scored: ScoredRollout) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Reward name -> ``(overall [L], dim rates [L, D], dim counts [L, D])`` (this rank's leaves) for
    every reward whose judge gave per-dimension verdicts (components of
    :class:`flowalign.rewards.groupwise.PairwiseAsPointwise`), in the judge's dimension order."""
    from flowalign.rewards.groupwise import DIM_COUNT_PREFIX, DIM_PREFIX, OVERALL

    found = {}
    for name in scored.weights:
        overall = scored.components.get(f"{name}/{OVERALL}")
        prefix = f"{name}/{DIM_PREFIX}"
        dims = [k[len(prefix):] for k in scored.components if k.startswith(prefix)]
        if overall is None or not dims:
            continue
        rates = torch.stack([scored.components[prefix + d] for d in dims], dim=1).float()
        counts = torch.stack([scored.components[f"{name}/{DIM_COUNT_PREFIX}{d}"] for d in dims], dim=1).float()
        found[name] = (overall.float(), rates, counts)
    return found
