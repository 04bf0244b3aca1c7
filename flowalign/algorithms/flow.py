"""The hooks of the image / video loops (``rl`` and ``awm`` recipes) and their GRPO defaults.

An image algorithm subclasses :class:`FlowAlgorithm` and overrides what it changes:

* **rollout shape** -- :meth:`~FlowAlgorithm.rollout_spec` (a :class:`~flowalign.rollout.BranchSpec`:
  a flat group, a shared-prefix tree, an SDE window, a single branch step), usually through
  :meth:`~FlowAlgorithm.sde_window` or :meth:`~FlowAlgorithm.splits`;
* **advantage estimator** -- :meth:`~FlowAlgorithm.targets`: the scored rollout -> per-edge
  advantages, the trained edges, loss weights (:class:`EdgeTargets`); it may spend model
  evaluations through the :class:`RolloutContext` (DenseGRPO's ODE look-aheads);
* **update** -- :meth:`~FlowAlgorithm.edge_loss`: the ``rl`` recipe's loss of a micro-batch of
  edges from their new and old log-probs (PPO-clip; Pref-GRPO normalises the ratio);
* **state** -- :meth:`~FlowAlgorithm.state_dict` / :meth:`~FlowAlgorithm.load_state_dict`: what
  a checkpoint keeps (DenseGRPO's calibrated noise levels);
* **trained module / initial noise** -- :meth:`~FlowAlgorithm.prepare_module` (freeze or attach parts of
  the trained module before its optimizer is built) and :meth:`~FlowAlgorithm.initial_latents` with
  :attr:`~FlowAlgorithm.shapes_initial_noise` (FIND's policy over ``x_T``; off by default);
* **checks** -- :meth:`~FlowAlgorithm.check`: validation of the config, naming the key.

The loss is PPO-clip on the trained edges' log-probs (``rl``, through :meth:`~FlowAlgorithm.edge_loss`)
or advantage-weighted flow matching on the sampled finals (``awm``). Data moves only through arguments and return values.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from flowalign.advantages import edge_advantages, group_advantages
from flowalign.algorithms.registry import Algorithm
from flowalign.errors import ConfigError
from flowalign.losses import ppo_clip_loss
from flowalign.rollout import BranchSpec, integrate_ode, lookahead_sigmas
from flowalign.types import Conditioning, RolloutTree

__all__ = ["EdgeTargets", "FlowAlgorithm", "RolloutContext", "ScoredRollout", "lookahead_values", "num_trained_steps"]


def num_trained_steps(sampling: Any, window_size: int | None = None) -> int:
    """How many of the SDE steps are trained: the first ``int(#SDE steps x timestep_fraction)``, at
    least 1 (Flow-GRPO's ``timestep_fraction``). ``window_size`` is the number of SDE steps (default:
    ``sampling.sde_window``'s, or every step).

    The rounding is the references' truncation, computed as they do (the same float product, so a
    value copied from a reference config trains the same count): yifan123/flow_grpo @ ac4c86e
    ``scripts/train_sd3.py`` l. 345 ``int(config.sample.num_steps * config.train.timestep_fraction)``
    (also ``train_flux.py`` @ 74db691; TempFlow-GRPO ``train_sd3_pr.py`` @ e66824e; DanceGRPO @ 15cc71d
    ``train_grpo_flux.py`` l. 570). E.g. 10 x 0.6 = 6, 10 x 0.99 -> 9, 6 x 0.99 -> 5. The references
    would train nothing below one step; we train one."""
    if window_size is None:
        start, end = sampling.sde_window if sampling.sde_window is not None else (0, sampling.num_steps)
        window_size = end - start
    return max(1, int(window_size * sampling.timestep_fraction))


@dataclass
class EdgeTargets:
    """What the update trains on one rollout tree, and what computing it cost.

    Attributes:
        advantages: ``[E]`` float32 advantage of every edge (0 where untrained).
        trainable: ``[E]`` bool, the edges that get a policy-gradient term (after pruning).
        weights: optional ``[E]`` non-negative loss weights (``ppo_clip_loss`` divides by their sum).
        loss_scale: a factor on the whole iteration's policy loss (TempFlow's noise-aware weight of
            the iteration's single branch step).
        nfe: model evaluations spent computing the targets (look-aheads), added to ``rollout/nfe``.
        metrics: scalars to log (e.g. DenseGRPO's calibrated noise levels).
    """

    advantages: Tensor
    trainable: Tensor
    weights: Tensor | None = None
    loss_scale: float = 1.0
    nfe: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ScoredRollout:
    """The rewards of one iteration's rollout, on this rank and gathered from every rank.

    Attributes:
        scores: ``[L]`` float32 weighted reward of this rank's leaves (CPU).
        valid: ``[L]`` bool, False where a reward could not score the sample.
        components: reward name -> ``[L]`` its own score of this rank's leaves (CPU).
        weights: reward name -> its weight in ``scores``.
        all_scores, all_groups, all_valid: ``[world * L]`` the same gathered from every rank, in
            rank order (groups span ranks; CPU).
        rank, world: this process and the number of processes.
        gather: ``[L] -> [world * L]`` gathers a per-leaf tensor from every rank (CPU).
    """

    scores: Tensor
    valid: Tensor
    components: dict[str, Tensor]
    weights: dict[str, float]
    all_scores: Tensor
    all_groups: Tensor
    all_valid: Tensor
    rank: int
    world: int
    gather: Callable[[Tensor], Tensor]

    def local(self, all_values: Tensor) -> Tensor:
        """This rank's slice ``[L]`` of a gathered ``[world * L]`` tensor."""
        return all_values.view(self.world, -1)[self.rank]


@dataclass
class RolloutContext:
    """What an estimator may use to spend model evaluations on the rollout's nodes.

    Attributes:
        adapter: the pipeline adapter (``predict``, ``decode``) in eval mode.
        cond: the conditioning of the iteration's prompts (indexed by ``tree.prompt_idx``).
        guidance_scale: classifier-free guidance scale of the rollout.
        autocast: a zero-argument factory of the mixed-precision context.
        score: ``(media [N, ...], prompt_idx list[int]) -> [N]`` float32 rewards on CPU (the
            training reward, checked finite).
    """

    adapter: Any
    cond: Conditioning
    guidance_scale: float
    autocast: Callable[[], AbstractContextManager]
    score: Callable[[Tensor, list[int]], Tensor]


@torch.no_grad()
def lookahead_values(tree: RolloutTree, ctx: RolloutContext, steps: int) -> tuple[Tensor, int]:
    """Score the ODE look-ahead from every node before each step (DenseGRPO, Deng et al. 2026,
    arXiv:2601.20218, Eqs. 8-9; with ``steps=1`` VGPO's one-step projection).

    The first step of each look-ahead reuses the velocity the rollout computed at that ``x_t``
    (same weights, same point), so a one-step projection costs no model evaluation.

    Args:
        tree: a rollout that kept its velocities (``keeps_velocities``) or not.
        ctx: the model, conditioning and reward.
        steps: ODE steps from a node to its clean image (0 = all remaining steps).

    Returns:
        ``([E] float32 reward of the look-ahead from each edge's x_t, model evaluations spent)``.
    """
    values = torch.zeros(tree.num_edges, dtype=torch.float32)
    nfe = 0
    for depth in range(len(tree.sigmas) - 1):
        edges = (tree.step == depth).nonzero().squeeze(1)
        sigmas = lookahead_sigmas(tree.sigmas, depth, steps)
        with ctx.autocast():
            x0 = integrate_ode(ctx.adapter, ctx.cond[tree.prompt_idx[edges]], tree.x_t[edges], sigmas,
                               guidance_scale=ctx.guidance_scale,
                               first_velocity=tree.velocity[edges] if tree.velocity is not None else None)
            media = ctx.adapter.decode(x0)
        values[edges.cpu()] = ctx.score(media, tree.prompt_idx[edges].tolist())
        nfe += len(edges) * (len(sigmas) - 1 - (tree.velocity is not None))
    return values, nfe


class FlowAlgorithm(Algorithm):
    """An image / video algorithm; the defaults are Flow-GRPO / DanceGRPO (Liu et al. 2025,
    arXiv:2505.05470; Xue et al. 2025, arXiv:2505.07818): a flat group per prompt sampled with the
    SDE in ``sampling.sde_window``, the first ``timestep_fraction`` of those steps trained, and
    group-relative advantages over groups gathered from every rank.

    Class attributes (besides :class:`~flowalign.algorithms.registry.Algorithm`'s):
        advantage: how advantages are computed, in words for ``flowalign ls algorithms``.
        loss: the loss the recipe trains (``ppo_clip`` or ``awm``; in the ``awm`` loop any other name
            makes the recipe call :meth:`matching_update`).
        needs_reference: the loop keeps the frozen reference policy (``adapter.disable_adapter()``) even
            with ``algorithm.kl_beta: 0`` under full fine-tuning (DPO's losses compare against it).
        policy_copy: the ``awm`` loop keeps a copy of the policy (``recipe.kl_ema``, an EMA started at the
            policy and checkpointed with the run) for :meth:`matching_update`.
        shapes_initial_noise: the loops draw each sample's standard-normal initial noise themselves and pass
            it through :meth:`initial_latents` (FIND's noise policy); ``False`` leaves the rollout's own draw.
        deterministic_rollouts: every rollout step is an ODE step, whatever ``sampling.noise_level`` (DGPO,
            FIND); the run's header says so.
        keeps_velocities: the rollout keeps each step's velocity (look-ahead estimators reuse it).
        keeps_means: the rollout keeps each step's transition mean (``RolloutTree.mean_old``, passed
            to :meth:`edge_loss`); a property where it depends on the config.
        shard_by: how a rollout is split over processes (:class:`~flowalign.rollout.Shard`):
            ``"group"``, every rank samples ``group_size / world`` of every prompt's group (the
            estimator gathers what it needs); ``"prompt"``, whole groups (trees) per rank, for
            estimators and rewards that need a whole group in one place.
        std_estimator, std_eps: the std of the reference's advantage normalisation (``population``
            or ``unbiased``) and the constant added to it, used where ``algorithm.std_estimator`` /
            ``algorithm.std_eps`` are null (:meth:`group_std`; docs/FIDELITY.md). Flow-GRPO's
            ``np.std`` + 1e-4 by default.
    """

    recipe = "rl"
    advantage = "group"
    loss = "ppo_clip"
    keeps_velocities = False
    keeps_means = False
    shard_by = "group"
    policy_copy = False
    needs_reference = False
    shapes_initial_noise = False
    deterministic_rollouts = False
    std_estimator = "population"
    std_eps = 1e-4

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        #: per-step SDE noise level a_t of the next rollouts
        self.noise_level_schedule = [cfg.sampling.noise_level] * cfg.sampling.num_steps

    # ------------------------------------------------------------------------------------------
    # rollout shape
    # ------------------------------------------------------------------------------------------
    def sde_window(self, iteration: int) -> tuple[int, int]:
        """``[start, end)`` steps sampled with the SDE (ODE elsewhere)."""
        s = self.cfg.sampling
        return tuple(s.sde_window) if s.sde_window is not None else (0, s.num_steps)

    def splits(self) -> tuple[tuple[int, int], ...]:
        """``(step, k)``: after ``step`` every node spawns ``k`` children (none: a flat group)."""
        return ()

    def split_noise_level(self, step: int) -> float:
        return self.noise_level_schedule[step]

    def rollout_spec(self, iteration: int, world: int) -> BranchSpec:
        """What iteration ``iteration`` samples for each prompt on one rank, each prompt's group being
        split over ``world`` ranks (``Shard.group_split``: 1 when groups are whole on a rank)."""
        s = self.cfg.sampling
        T, per_rank = s.num_steps, s.group_size // world
        levels = self.noise_level_schedule
        start, end = self.sde_window(iteration)
        noise = [levels[t] if start <= t < end else 0.0 for t in range(T)]
        splits = self.splits()
        for step, _ in splits:
            noise[step] = self.split_noise_level(step)
        trained, subset = tuple(range(start, start + num_trained_steps(s, end - start))), None
        if s.train_steps == "random_subset":
            # DanceGRPO (XueZeyue/DanceGRPO @ 15cc71d, fastvideo/train_grpo_flux.py l. 511-519 `[:, :-1]`,
            # l. 551-561 per-sample randperm, l. 570 `int(len(timesteps) * timestep_fraction)`): the last SDE
            # step is never trained; each sample trains its own random int((n - 1) x timestep_fraction) of the others.
            if splits or end - start < 2:
                why = f"splits at {[step for step, _ in splits]}" if splits else f"{end - start} SDE step(s)"
                raise ConfigError(f"sampling.train_steps: random_subset draws the trained steps per sample among all SDE steps "
                                  f"but the last, which needs a flat group of >= 2 SDE steps; algorithm {self.name!r} has {why}")
            trained, subset = tuple(range(start, end - 1)), num_trained_steps(s, end - start - 1)
        return BranchSpec(T, noise, samples_per_prompt=per_rank // math.prod(k for _, k in splits), splits=splits,
                          sampler=s.sampler, train_steps=trained, guidance_scale=s.guidance_scale,
                          cps_log_prob=s.cps_log_prob, shared_noise=s.init_same_noise, train_subset=subset,
                          final_sample=s.final_sample)

    # ------------------------------------------------------------------------------------------
    # advantages
    # ------------------------------------------------------------------------------------------
    def group_std(self) -> tuple[bool, float]:
        """``(unbiased, eps)`` of the advantage normalisation: ``algorithm.std_estimator`` /
        ``algorithm.std_eps``, or this algorithm's reference where they are null."""
        a = self.cfg.algorithm
        estimator = a.std_estimator if a.std_estimator is not None else self.std_estimator
        return estimator == "unbiased", float(a.std_eps if a.std_eps is not None else self.std_eps)

    def leaf_advantages(self, scored: ScoredRollout) -> Tensor:
        """``[world * L]`` advantages of every rank's leaves: group-relative (GRPO, Shao et al. 2024,
        DeepSeekMath §4.1.2) over the gathered groups."""
        a = self.cfg.algorithm
        unbiased, eps = self.group_std()
        return group_advantages(scored.all_scores, scored.all_groups, std_mode=a.std_mode, clip=a.adv_clip or None,
                                valid=scored.all_valid, eps=eps, unbiased=unbiased)

    def targets(self, tree: RolloutTree, scored: ScoredRollout, ctx: RolloutContext, iteration: int) -> EdgeTargets:
        """Per-edge targets of this rank's tree: each leaf's advantage spread onto its path's edges."""
        leaf_adv = scored.local(self.leaf_advantages(scored))
        return EdgeTargets(edge_advantages(leaf_adv, tree.leaf_edges, tree.num_edges), tree.trainable)

    # ------------------------------------------------------------------------------------------
    # update
    # ------------------------------------------------------------------------------------------
    def edge_loss(self, log_prob: Tensor, log_prob_old: Tensor, advantages: Tensor, *, weights: Tensor | None,
                  kl: Tensor | None, mean: Tensor, mean_old: Tensor | None, std: Tensor, delta: Tensor
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """The ``rl`` recipe's loss of a micro-batch of ``B`` edges: PPO-clip (Schulman et al. 2017,
        Eq. 7) on ``exp(log_prob - log_prob_old)`` plus ``algorithm.kl_beta`` x ``kl``.

        Args:
            log_prob, log_prob_old: ``[B]`` the stored transitions' log-densities under the current
                and the sampling policy.
            advantages: ``[B]`` per-edge advantages; weights: ``[B]`` loss weights or ``None``.
            kl: ``[B]`` per-edge KL to the reference, or ``None`` when ``kl_beta`` is 0.
            mean, mean_old: ``[B, *latent]`` transition means (``mean_old`` only when
                :attr:`keeps_means`); std: ``[B]`` transition std; delta: ``[B]`` sigma steps.

        Returns:
            ``(loss, metrics)``: a 0-dim loss and 0-dim tensor metrics (``ppo_clip_loss``'s).
        """
        a = self.cfg.algorithm
        return ppo_clip_loss(log_prob, log_prob_old, advantages, clip_range=a.clip_range, weights=weights, kl=kl,
                             kl_beta=a.kl_beta, check=False)

    def reference_policy(self, recipe: Any) -> AbstractContextManager:
        """Context in which ``recipe.adapter.predict`` runs the policy the ``rl`` recipe's KL term
        (``algorithm.kl_beta``) compares against: the frozen base by default (``adapter.disable_adapter()``);
        SAGE-GRPO's periodically refreshed anchor."""
        return recipe.adapter.disable_adapter()

    def trajectory_update(self, recipe: Any, tree: RolloutTree, cond: Any, targets: EdgeTargets, noise_levels: Tensor,
                          iteration: int) -> dict[str, float] | None:
        """The ``rl`` loop's whole update, for a loss that couples edges (D3PO's pairs): the metrics, or
        ``None`` (the default) for the recipe's per-edge update through :meth:`edge_loss`. ``recipe``
        lends its helpers (``_optimize``, ``_check_on_policy``, ``adapter``)."""
        return None

    def matching_update(self, recipe: Any, tree: RolloutTree, cond: Any, targets: EdgeTargets, iteration: int
                        ) -> dict[str, float]:
        """The ``awm`` loop's update for a ``loss`` other than ``awm``: ``train.steps_per_iter`` optimizer
        steps over this rank's sampled finals (``recipe`` lends its helpers: ``_optimize``, ``_rows``,
        ``kl_ema``); returns the metrics."""
        raise NotImplementedError(f"{type(self).__name__} (loss {self.loss!r}) runs in the awm loop "
                                  "but defines no matching_update")

    @staticmethod
    def require_all_scored(scored: ScoredRollout, what: str) -> Tensor:
        """This rank's leaf rewards, refusing any sample a reward marked invalid (``what`` names the setting)."""
        if not bool(scored.valid.all()):
            raise FloatingPointError(f"{what} needs every leaf scored, but the reward marked "
                                     f"{int((~scored.valid).sum())} samples invalid")
        return scored.scores

    # ------------------------------------------------------------------------------------------
    # the trained module and the initial noise (FIND)
    # ------------------------------------------------------------------------------------------
    def prepare_module(self, module: torch.nn.Module, adapter: Any) -> None:
        """Change the trained module in place before its optimizer is built (the loops train the parameters
        that require gradients; checkpoints, EMA and resume follow): FIND freezes the generator and attaches
        its noise policy. Default: nothing."""

    def initial_latents(self, noise: Tensor, cond: Conditioning) -> Tensor:
        """``[N, *latent]`` initial latents ``x_T`` from standard-normal ``noise [N, *latent]`` and the
        conditioning of each sample's prompt (``N`` rows); called only with :attr:`shapes_initial_noise`."""
        return noise

    # ------------------------------------------------------------------------------------------
    # state and checks
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON)."""
        return {"noise_level_schedule": list(self.noise_level_schedule)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise_level_schedule = list(state.get("noise_level_schedule", self.noise_level_schedule))

    @classmethod
    def trained_units(cls, cfg: Any) -> tuple[int, str]:
        """``(units per sample the update trains, their name)``: the steps_per_iter check's arithmetic."""
        s = cfg.sampling
        if s.train_steps == "random_subset":  # all SDE steps but the last are candidates (rollout_spec)
            start, end = s.sde_window if s.sde_window is not None else (0, s.num_steps)
            return num_trained_steps(s, max(1, end - start - 1)), "edges"
        return num_trained_steps(s), "edges"

