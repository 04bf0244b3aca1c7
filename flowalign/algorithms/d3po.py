"""D3PO: DPO on the denoising MDP with online preference pairs (Yang et al., CVPR 2024, arXiv:2311.13231).

Each iteration samples a flat group per prompt with the rl loop's SDE; the group's preference pair is
built by :class:`PreferencePairs` (``algorithm.d3po.pair_source``): ``best_worst``, the sample with the
highest reward vs the one with the lowest, or ``judge``, the same on the win rates of the pairwise judge
that ``pref_grpo`` trains on (a ``pairwise_winrate`` reward). A tie gives no pair. At every trained step
``t`` the preferred transition ``w`` and the dispreferred one ``l`` (the same step of the two
trajectories) form one unit of D3PO's loss (:func:`flowalign.losses.dpo.d3po_loss`):
``−log σ(β log clip(πθ/π_ref)(w) − β log clip(πθ/π_ref)(l))`` with the per-step SDE log-probs and the
frozen reference (the base model: LoRA disabled, or the copy kept for full fine-tuning).

Reference code: yk7333/d3po @ 40d3175, ``scripts/rm/train_d3po.py`` and ``config/base.py``:

* the loss on the clipped ratio of the policy to the frozen reference ``ref = deepcopy(unet)`` (lines 124,
  595-599), ``β = 0.1`` (``train.beta``), ``ε = 0.1`` (``train.eps``), classifier-free guidance in the
  update (``train.cfg``; here ``sampling.guidance_scale``), every step trained (``timestep_fraction = 1``);
* a pair's two trajectories start from one initial noise (lines 333-342: ``latents = latents1[:, 0]``):
  ``sampling.init_same_noise: true`` in the quickstart, which shares it over the whole group;
* the reference compares two samples per prompt by reward (``compare``, lines 183-198). Ours: a group of
  ``G`` samples per prompt and its best vs worst (the online setting of the issue); the units of one
  iteration are shuffled over ``train.steps_per_iter`` optimizer steps (the reference steps once per
  sample batch after accumulating over its timesteps).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flowalign.advantages import edge_advantages
from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm, RolloutContext, ScoredRollout, num_trained_steps
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.losses.dpo import d3po_loss, preference_pairs
from flowalign.samplers import sde_step
from flowalign.training.rng import stream_generator
from flowalign.types import Conditioning, RolloutTree

__all__ = ["D3PO", "D3POConfig", "PairTargets", "PreferencePairs", "PAIR_SOURCES", "JUDGE_REWARDS"]

#: where a group's preference pair comes from
PAIR_SOURCES = ("best_worst", "judge")
#: the rewards that wrap a pairwise judge into win rates (pref_grpo's)
JUDGE_REWARDS = ("pairwise_winrate",)
#: the component :class:`flowalign.rewards.groupwise.PairwiseAsPointwise` always reports; it marks a judge's reward
_JUDGE_MARKER = "failed_frac"


@dataclass
class PairTargets(EdgeTargets):
    """:class:`EdgeTargets` plus the iteration's preference pairs.

    Attributes:
        pairs: ``[K, 2]`` long ``(preferred, dispreferred)`` leaf ids of this rank's tree.
    """

    pairs: Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))


def pair_values(scored: ScoredRollout, source: str) -> Tensor:
    """``[L]`` the values this rank's leaves are ranked by: the weighted reward (``best_worst``) or the
    unweighted win rates of the one pairwise-judge reward (``judge``; found by its ``<name>/failed_frac``
    component, which :class:`~flowalign.rewards.groupwise.PairwiseAsPointwise` always reports)."""
    if source == "best_worst":
        return scored.scores
    if source != "judge":
        raise ValueError(f"pair_source must be one of {' | '.join(PAIR_SOURCES)}, got {source!r}")
    judges = [name for name in scored.weights if f"{name}/{_JUDGE_MARKER}" in scored.components]
    if len(judges) != 1:
        raise ValueError(f"pair_source judge ranks each group by one pairwise judge's win rates, but the rewards "
                         f"{sorted(scored.weights)} hold {len(judges)} ({judges}): use exactly one reward with "
                         f"_component_: {JUDGE_REWARDS[0]}")
    return scored.components[judges[0]].float()


def check_pair_source(cfg: Any, name: str) -> None:
    """``algorithm.<name>.pair_source`` is known, and ``judge`` has exactly one ``pairwise_winrate`` reward."""
    source = getattr(cfg.algorithm, name).pair_source
    _require(source in PAIR_SOURCES, f"algorithm.{name}.pair_source",
             f"must be one of {' | '.join(PAIR_SOURCES)}, got {source!r}")
    if source == "judge":
        names = [spec.get("_component_") for spec in cfg.rewards if isinstance(spec, dict)]
        _require(sum(n in JUDGE_REWARDS for n in names) == 1, "rewards",
                 f"algorithm.{name}.pair_source judge takes its pairs from a pairwise judge: give exactly one reward "
                 f"with _component_: {JUDGE_REWARDS[0]} (and its judge), got {names}")


class PreferencePairs:
    """The estimator both DPO methods share: each group's preference pair, as :class:`PairTargets`.

    ``advantages`` are +1 on the preferred sample's edges and −1 on the dispreferred one's (what the
    update trains toward and away from; logged as ``train/advantage_abs_mean``), ``trainable`` the
    rollout's trained edges of paired samples; the pairs ride along. Groups are whole on one rank
    (``shard_by = "prompt"``)."""

    shard_by = "prompt"
    needs_reference = True

    def targets(self, tree: RolloutTree, scored: ScoredRollout, ctx: RolloutContext, iteration: int) -> PairTargets:
        """This rank's pairs (whole groups) from ``pair_source``; metrics ``train/pairs`` and ``train/tied_groups``
        (groups without a pair: all values equal, or fewer than two valid samples)."""
        values = pair_values(scored, self.opts.pair_source)
        pairs = preference_pairs(values, tree.leaf_group.cpu(), scored.valid)
        leaf_adv = torch.zeros(tree.num_leaves, dtype=torch.float32)
        leaf_adv[pairs[:, 0]] = 1.0
        leaf_adv[pairs[:, 1]] = -1.0
        adv = edge_advantages(leaf_adv, tree.leaf_edges.cpu(), tree.num_edges)
        trainable = tree.trainable.cpu() & (adv != 0)
        groups = len(set(tree.leaf_group.tolist()))
        return PairTargets(adv, trainable, pairs=pairs, metrics={"train/pairs": float(len(pairs)),
                                                                 "train/tied_groups": float(groups - len(pairs))})


def pair_units(tree: RolloutTree, pairs: Tensor, trainable: Tensor) -> tuple[Tensor, Tensor]:
    """``([U], [U])`` long edge ids ``(e_w, e_l)`` of every (pair, step) unit: the two trajectories'
    transitions at one step, both trained (the reference trains step ``j`` of both samples together)."""
    if len(pairs) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    paths = tree.leaf_edges.cpu().long()
    ew, el = paths[pairs[:, 0]].reshape(-1), paths[pairs[:, 1]].reshape(-1)
    ok = (ew >= 0) & (el >= 0)
    ew, el = ew[ok], el[ok]
    step = tree.step.cpu()
    if not torch.equal(step[ew], step[el]):
        raise ValueError("d3po: the paired trajectories' paths do not step alike (a flat group is needed)")
    keep = trainable.cpu()[ew] & trainable.cpu()[el]
    return ew[keep], el[keep]


@dataclass
class D3POConfig:
    beta: float = _f(0.1, "DPO temperature β of −log σ(β log r_w − β log r_l) (the reference's train.beta = 0.1).", gt=0)
    ratio_clip: float = _f(0.1, "ε: the ratio πθ/π_ref of each transition is clipped to [1 − ε, 1 + ε] (the reference's "
                                "train.eps = 0.1); a clipped ratio passes no gradient.", gt=0, lt=1)
    pair_source: str = _f("best_worst", "Each group's preference pair: best_worst = highest vs lowest reward | judge = highest "
                                        "vs lowest win rate of the pairwise judge (a pairwise_winrate reward, as pref_grpo). "
                                        "A tie gives no pair.", choices=PAIR_SOURCES)


@register_algorithm
class D3PO(PreferencePairs, FlowAlgorithm):
    name = "d3po"
    summary = "DPO on the denoising MDP: per-step log-prob ratios to the reference of a group's best vs worst sample"
    paper = "Yang et al. 2024, D3PO, CVPR 2024, arXiv:2311.13231"
    advantage = "preference pair per group (best vs worst, or a pairwise judge)"
    loss = "d3po"
    Config = D3POConfig
    config_file = "configs/d3po/quickstart.yaml"

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        check_pair_source(cfg, cls.name)
        _require(cfg.algorithm.kl_beta == 0, "algorithm.kl_beta",
                 "d3po's β (algorithm.d3po.beta) is its KL strength to the reference; set algorithm.kl_beta: 0")
        _require(cfg.sampling.train_steps != "random_subset", "sampling.train_steps",
                 "d3po trains the same steps of both trajectories of a pair; random_subset draws them per sample")
        units = cfg.data.prompts_per_iter // world_size * num_trained_steps(cfg.sampling)
        _require(units >= cfg.train.steps_per_iter, "train.steps_per_iter",
                 f"{cfg.train.steps_per_iter} optimizer steps but at most {units} (pair, step) units per rank per iteration "
                 "(one pair per prompt: prompts_per_iter / world_size x trained steps)")

    def trajectory_update(self, recipe: Any, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets,
                          noise_levels: Tensor, iteration: int) -> dict[str, float]:
        """``train.steps_per_iter`` optimizer steps of :func:`d3po_loss` over this rank's (pair, step)
        units, shuffled; the first micro-batch checks that the rollout's log-probs are recomputed exactly."""
        if not isinstance(targets, PairTargets):
            raise TypeError(f"d3po's update needs the PairTargets of its own estimator, got {type(targets).__name__}")
        ew, el = pair_units(tree, targets.pairs, targets.trainable)
        metrics = {"train/units": float(len(ew))}
        if len(ew) < self.cfg.train.steps_per_iter:  # every group tied: nothing to prefer (ours: skip the update)
            return {**metrics, "train/skipped_update": 1.0}
        order = torch.randperm(len(ew), generator=stream_generator(self.cfg.seed, "shuffle", iteration, recipe.rank))
        device = tree.step.device
        ew, el = ew[order].to(device), el[order].to(device)
        units = torch.arange(len(ew), device=device)
        return {**metrics, **recipe._optimize(units, lambda mb: self._unit_loss(recipe, tree, cond, noise_levels, ew[mb], el[mb]),
                                              iteration, check_first=recipe._check_on_policy)}

    def _unit_loss(self, recipe: Any, tree: RolloutTree, cond: Conditioning, noise_levels: Tensor, ew: Tensor, el: Tensor
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        """D3PO's loss of ``B`` units: the ``2B`` transitions' log-probs under the policy and the reference."""
        edges = torch.cat([ew, el])
        log_p = edge_log_probs(recipe, tree, cond, noise_levels, edges, reference=False)
        with torch.no_grad():
            log_ref = edge_log_probs(recipe, tree, cond, noise_levels, edges, reference=True)
        b = len(ew)
        loss, metrics = d3po_loss(log_p[:b], log_ref[:b], log_p[b:], log_ref[b:], beta=self.opts.beta,
                                  ratio_clip=self.opts.ratio_clip, check=False)
        # invariant 2 (docs/ARCHITECTURE.md): before any step the recomputed log-probs are the rollout's
        metrics["ratio_max_dev"] = (log_p.detach() - tree.log_prob_old[edges].float()).exp().sub(1).abs().max()
        return loss, metrics


def edge_log_probs(recipe: Any, tree: RolloutTree, cond: Conditioning, noise_levels: Tensor, edges: Tensor, *,
                   reference: bool) -> Tensor:
    """``[N]`` log-densities of the stored transitions ``edges [N]`` under the trained policy, or the frozen
    reference (``adapter.disable_adapter()``), computed as the rl recipe's update does (``RLRecipe._edge_loss``:
    the rollout's sampler, noise levels and guidance)."""
    cfg = recipe.cfg
    step = tree.step[edges]
    sigma, sigma_next = tree.sigmas[step], tree.sigmas[step + 1]
    x_t = tree.x_t[edges].to(recipe.adapter.dtype)
    context = recipe.adapter.disable_adapter() if reference else nullcontext()
    with context, recipe.accelerator.autocast():
        v = recipe.adapter.predict(x_t, sigma, cond[tree.prompt_idx[edges]], cfg.sampling.guidance_scale)
    out = sde_step(v.float(), sigma, sigma_next, tree.x_t[edges], kind=cfg.sampling.sampler, noise_level=noise_levels[step],
                   prev_sample=tree.x_next[edges], cps_log_prob=cfg.sampling.cps_log_prob, check=False)
    return out.log_prob
