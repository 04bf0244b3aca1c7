"""Advantage Weighted Matching (AWM, Xue et al. 2025, arXiv:2509.25050).

GRPO's rollouts and group-relative advantages, but the update is the pretraining flow-matching
loss on each sampled final, re-noised at several times, weighted by its advantage (the ``awm``
recipe, :mod:`flowalign.recipes.awm`). No sampler log-probs are used, so the sampler is free.

The defaults of :class:`AWMConfig` are the reference implementation's
(scxue/advantage_weighted_matching @ be51372, ``advantage_weighted_matching/config/dgx_awm.py``,
the GenEval / OCR / PickScore SD3.5-M configs, and ``scripts/train_sd3_awm.py``):
a PPO-style ratio clipped at 1 over the flow-matching log-likelihood, ``ghuber`` time weighting
with p = 0.25, 6 training times per sample stratified over the sampling grid without its first
step and its last 10% (``time_type='discrete_wo_init'``, ``timestep_fraction=0.9``), a velocity
KL to an EMA copy of the policy (weight 1, decay ``min(0.3, 0.001·step)``) beside the KL to the
reference, and advantages rescaled to ``[-advantage_max, advantage_max]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm, RolloutContext, ScoredRollout
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.losses.awm import WEIGHTINGS
from flowalign.types import RolloutTree

#: how the training times of a sample are drawn (train_sd3_awm.py lines 1138-1207, ``config.time_type``)
TIME_SAMPLINGS = ("discrete_wo_init", "discrete", "uniform", "logit_normal")


@dataclass
class AWMConfig:
    objective: str = _f("ratio", "Policy term: ratio = the reference's PPO-style ratio exp(log p - log p_old) of the flow-matching "
                                 "log-likelihood log p = -w(t, mse), clipped at clip_range (train_sd3_awm.py loss_type exp_first); "
                                 "weighted = A x w(t, mse) (the paper's objective; the same gradient at ratio 1).",
                        choices=("ratio", "weighted"))
    clip_range: float = _f(1.0, "Ratio clip epsilon of objective=ratio (the reference's train.clip_range = 1; "
                                "algorithm.clip_range is the rl recipe's and unused by awm).", gt=0)
    weighting: str = _f("ghuber", "Time weighting w(t, mse) of the flow-matching log-likelihood: uniform (mse) | t (t x mse) | "
                                  "t**2 | huber (t x sqrt(mse)) | ghuber (t x mse^p / p) (train_sd3_awm.py compute_log_prob_awm).",
                        choices=WEIGHTINGS)
    ghuber_power: float = _f(0.25, "p of the ghuber weighting (the reference's ghuber_power).", gt=0, le=1)
    train_timesteps: int = _f(6, "Training times per sampled final per iteration, each with fresh noise "
                                 "(the reference's train.train_timesteps).", ge=1)
    time_sampling: str = _f("discrete_wo_init", "How the training times are drawn, stratified into train_timesteps bins: "
                                                "discrete_wo_init = the rollout's own sigma grid, steps 1 .. int(num_steps x "
                                                "timestep_fraction) (the reference's GenEval / OCR time_type) | discrete = the same "
                                                "from step 0 (PickScore) | uniform = U(0.2, 1) shifted by time_shift | logit_normal "
                                                "= sigmoid(N(0, 1)) shifted by time_shift, at least 0.01.",
                            choices=TIME_SAMPLINGS)
    timestep_fraction: float = _f(0.9, "time_sampling discrete*: the fraction of the rollout's steps drawn from "
                                       "(the reference's train.timestep_fraction).", gt=0, le=1)
    time_shift: float = _f(3.0, "time_sampling uniform / logit_normal: t -> s t / (1 + (s - 1) t) (the reference's time_shift).", gt=0)
    ema_kl_beta: float = _f(1.0, "Weight of the velocity KL to an EMA copy of the policy (the reference's ema_beta = 1); 0 disables it.",
                            ge=0)
    ema_kl_decay: float = _f(0.3, "Decay of that EMA copy, updated once per iteration (the reference's kl_ema_decay; "
                                  "its evaluation EMA, decay 0.99, is train.ema_decay).", ge=0, lt=1)
    ema_kl_decay_type: str = _f("linear", "linear: decay min(ema_kl_decay, ema_kl_ramp x optimizer steps so far) | constant: "
                                          "ema_kl_decay (the reference's kl_ema_decay_type).", choices=("linear", "constant"))
    ema_kl_ramp: float = _f(0.001, "Slope of the linear EMA-copy decay per optimizer step (0.001 in the reference).", gt=0)
    advantage_max: float | None = _f(1.0, "Rescale the clipped advantages from [-adv_clip, adv_clip] to "
                                          "[-advantage_max, advantage_max] (the reference's advantage_max); null keeps them.", gt=0)


@register_algorithm
class AWM(FlowAlgorithm):
    name = "awm"
    summary = "advantage-weighted flow matching on the sampled finals (ratio-clipped, time-weighted), velocity KLs"
    paper = "Xue et al. 2025, Advantage Weighted Matching, arXiv:2509.25050"
    recipe = "awm"
    loss = "awm"
    Config = AWMConfig
    config_file = "configs/awm/quickstart.yaml"

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        o = cfg.algorithm.awm
        if o.advantage_max is not None:
            _require(cfg.algorithm.adv_clip > 0, "algorithm.awm.advantage_max",
                     "rescales advantages from [-adv_clip, adv_clip], so algorithm.adv_clip must be > 0 (or set advantage_max: null)")
        if o.time_sampling.startswith("discrete"):
            first = 1 if o.time_sampling == "discrete_wo_init" else 0
            last = int(cfg.sampling.num_steps * o.timestep_fraction)
            _require(last > first, "algorithm.awm.timestep_fraction",
                     f"time_sampling {o.time_sampling} draws steps [{first}, int(num_steps x timestep_fraction) = {last}): "
                     "empty; raise timestep_fraction or sampling.num_steps")

    def targets(self, tree: RolloutTree, scored: ScoredRollout, ctx: RolloutContext, iteration: int) -> EdgeTargets:
        """Group-relative advantages (clipped to ``adv_clip``), rescaled by ``advantage_max / adv_clip``
        (train_sd3_awm.py lines 1293-1299: ``clamp(A, ±adv_clip_max) / adv_clip_max · advantage_max``)."""
        targets = super().targets(tree, scored, ctx, iteration)
        if self.opts.advantage_max is not None:
            targets.advantages = targets.advantages * (self.opts.advantage_max / self.cfg.algorithm.adv_clip)
        return targets

    @classmethod
    def trained_units(cls, cfg: Any) -> tuple[int, str]:
        return 1, "samples"  # each sampled final once per iteration (at train_timesteps times)
