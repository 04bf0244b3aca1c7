"""CJ-GRPO (Yang et al. 2025, arXiv:2509.23924, §3.2): optimise the rollout's own trajectory (no
skipped steps: the exact per-step log-probs), decoded with EOS early rejection and an ascending step
size, so that few steps suffice.

The defaults follow the authors' code (yjyddq/EOSER-ASS-RL @ 5affb4e, docs/FIDELITY.md "CJ-GRPO"):

* ``floor(log2(gen_length))`` steps (``cj-grpo/cj_grpo_trainer_eoser_ass.py`` L349-350:
  ``S = int(log2(gen_length))``, ``assert S == steps``), step ``s`` committing ``2^s`` tokens and
  the last ``gen_length - 2^(S-1) + 1`` (``get_num_transfer_tokens_ass``, L531-561; 129 of 256);
* EOSER with ``eos_min_gamma = 0.01`` (``cj-grpo/slurm_scripts/train.yaml``), i.e.
  ``sampling.eos_early_rejection = 0.99``, the factor restarting in every block
  (``eval/generate.py`` ``eoser_generate``, L220-251);
* mu = 12 inner steps (``num_iterations: 12``; the run scripts use 8 for countdown and sudoku),
  KL beta 0.04, clip epsilon 0.5 (``train.yaml``);
* the loss (``compute_loss`` L109-138): one clipped ratio per committed token, each step's token
  losses summed over the batch and divided by their count, then the mean over the steps
  (``step_ratio: token``; :class:`flowalign.dllm.algorithms.CJTokenEstimator`,
  :func:`flowalign.dllm.algorithms.cj_step_token_weights`), at every committed position, the EOS fill
  included (``unmask_positions``, L487; ``train_after_eos: true``), scored at temperature 1
  (``_get_per_token_logps`` L584, no division by a temperature) -- which is the reference's rollout
  temperature (``train.yaml`` L73 ``temperature: 1.0``; no run script overrides it), so the default
  here scores at the rollout temperature (``logprob_temperature: null``): the same value at the
  reference's settings, and the sampling policy's log-probs at any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from flowalign.algorithms.dllm import DLLMAlgorithm, require_trajectory_estimator
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.dllm.algorithms import CJTokenEstimator, LogProbEstimator, cj_step_token_weights, unit_weights

STEP_RATIOS = ("token", "step")


@dataclass
class CJGRPOConfig:
    step_ratio: str = _f("token", "The importance ratio of a denoising step: token (the reference: one clipped ratio per "
                         "token committed at the step, each step's token losses divided by the batch's count of them, "
                         "then the mean over steps; cj_grpo_trainer_eoser_ass.py L109-138) | step (one ratio per step, "
                         "of the step's summed exact log-prob; algorithm.loss_normalization applies).",
                         choices=STEP_RATIOS)
    train_after_eos: bool = _f(True, "Train the tokens committed after the first EOS (the EOS fill) too, as the reference "
                               "(its loss uses every unmasked position, L487, never its completion_mask); false: only "
                               "the tokens up to and including the first EOS (step_ratio step: only the steps that "
                               "committed one of them).")
    logprob_temperature: float | None = _f(None, "Temperature of the trained log-probs; null = the rollout temperature "
                                           "(sampling.temperature, 1 when greedy): the sampling policy's log-probs. The "
                                           "reference scores at 1 (L584) and samples at 1 (train.yaml temperature: 1.0), "
                                           "so null equals it at its settings; a number scores at that temperature "
                                           "whatever the rollout's (the first inner step's ratio stays 1: the old and new "
                                           "log-probs are scored alike, but they are no longer the sampling policy's).",
                                           gt=0)


@register_algorithm
class CJGRPO(DLLMAlgorithm):
    name = "cj_grpo"
    summary = "exact per-step trajectory log-probs of few ascending-size steps with EOS early rejection"
    paper = "Yang et al. 2025, CJ-GRPO, arXiv:2509.23924"
    Config = CJGRPOConfig
    config_file = "configs/dllm/cj_grpo_addition.yaml"
    estimator = "trajectory"
    inner_steps = 12  # reference train.yaml num_iterations: 12
    clip_range = 0.5  # reference train.yaml epsilon: 0.5
    kl_beta = 0.04  # reference train.yaml beta: 0.04
    sampling = {"step_schedule": "ascending", "eos_early_rejection": 0.99, "eos_restart_per_block": True}
    steps_rule = "log2"

    def build_estimator(self, name: str, **kwargs: Any) -> LogProbEstimator:
        """``step_ratio: token``: :class:`~flowalign.dllm.algorithms.CJTokenEstimator` (units =
        (step, committed position)); ``step``: the plain ``trajectory`` estimator (units = steps).
        Both score at ``logprob_temperature`` (null: the rollout's, as given by the recipe)."""
        if self.opts.logprob_temperature is not None:
            kwargs["temperature"] = float(self.opts.logprob_temperature)
        if self.opts.step_ratio == "token":
            return CJTokenEstimator(name, **kwargs)
        return super().build_estimator(name, **kwargs)

    def unit_weights(self, estimator: Any, batch: Any, log_prob_old: Tensor) -> Tensor:
        """``token``: the reference's per-step token-count normalisation
        (:func:`~flowalign.dllm.algorithms.cj_step_token_weights`) over every committed position, or
        over ``batch.trained`` (up to the first EOS) with ``train_after_eos: false``; ``step``: the
        default step weights of ``algorithm.loss_normalization``, every step that committed a token
        with ``train_after_eos: true``."""
        o = self.opts
        if o.step_ratio == "token":
            return cj_step_token_weights(batch.trajectory, None if o.train_after_eos else batch.trained)
        if o.train_after_eos:
            trained = batch.trajectory.commit_step >= 0  # every committed position, the EOS fill included
            return unit_weights(estimator.unit, trained, batch.trajectory, self.cfg.algorithm.loss_normalization)
        return super().unit_weights(estimator, batch, log_prob_old)

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        require_trajectory_estimator(cfg)
        a = cfg.algorithm
        if a.cj_grpo.step_ratio == "token":
            _require(a.loss_normalization in (None, "sequence"), "algorithm.loss_normalization",
                     "algorithm.cj_grpo.step_ratio='token' normalises each step by its token count as the CJ-GRPO "
                     f"reference does; loss_normalization must be left null, got {a.loss_normalization!r}")
