"""MDPO (He et al. 2025, arXiv:2508.13148, §3): denoising as a Markov decision process. Every
denoising step is trained with its own advantage from the rewards of the intermediate answers,
normalised within its (prompt group, step) cell (:func:`flowalign.dllm.algorithms.mdpo_step_advantages`).

The defaults follow the authors' code (autonomousvision/mdpo @ e6ae439, docs/FIDELITY.md "MDPO"):

* the intermediate answer of step ``s`` is the decode's own draw at that step: the state before it
  with every masked position filled by the sampled ``x0`` (``src/mdlm_generation_utils.py`` L101-102,
  ``intermediate_results``; flowalign's ``Trajectory.predictions``) -- ``step_prediction``;
* a step's score is the reward change it made plus the mean reward of the later answers (the
  trainer's "adv-v4", ``src/open_r1/mdpo/mdpo_trainer.py`` L849-851) -- ``step_score``;
  normalised per (group, step) by the unbiased std + 1e-4 (L856-858) -- ``unbiased_std``;
* only ``sample_train_steps = 16`` steps per rollout are trained, those with the largest
  ``|advantage|`` (L922, ``mdpo_config.py``) -- ``train_steps``;
* what a trained step trains: the log-prob of the step's draw ``x0`` at every position masked before
  it, given the state before it, one clipped ratio per token, each token weighted by its sampling
  confidence and ``Lg / #masked`` (``compute_loss`` L1487-1545;
  :class:`flowalign.dllm.algorithms.MDPOMaskedTokenEstimator`) -- ``step_objective``
  (``committed``: the exact log-prob of the tokens the step committed, one ratio per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from flowalign.algorithms.dllm import DLLMAlgorithm, DLLMRollouts, over_ranks, require_trajectory_estimator
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_fields import _f
from flowalign.config_checks import _require
from flowalign.dllm.algorithms import (
    MDPO_STEP_OBJECTIVES,
    MDPO_STEP_SCORES,
    LogProbEstimator,
    MDPOMaskedTokenEstimator,
    mdpo_masked_token_weights,
    mdpo_step_advantages,
    mdpo_train_steps,
    predicted_completions,
)

STEP_PREDICTIONS = ("sampled", "greedy_after")


@dataclass
class MDPOConfig:
    step_prediction: str = _f("sampled", "The intermediate answer scored at step s: sampled (the state before step s with "
                              "its masked positions filled by the decode's own draw x0; the reference, no extra "
                              "forwards) | greedy_after (the state after step s, masked positions filled by the "
                              "model's argmax; one forward per step).", choices=STEP_PREDICTIONS)
    step_score: str = _f("change_plus_future", "What is normalised into a step's advantage: change_plus_future "
                         "(r_s - r_{s-1} + mean of the later steps' rewards; the reference's adv-v4) | reward (r_s).",
                         choices=MDPO_STEP_SCORES)
    unbiased_std: bool = _f(True, "Normalise by the unbiased (ddof 1) std of the (group, step) cell, as the reference's "
                            "torch.std; false: the population std.")
    train_steps: int = _f(16, "Denoising steps trained per rollout, those with the largest |advantage| (the reference's "
                          "sample_train_steps = 16 of 128); 0 = every step.", ge=0)
    step_objective: str = _f("masked_tokens", "What a trained step trains: masked_tokens (the reference: log p of the "
                             "step's draw x0 at every position masked before the step, one clipped ratio per token, "
                             "weighted by its sampling confidence x Lg / #masked^2) | committed (the exact log-prob of "
                             "the tokens the step committed, one ratio per step; algorithm.loss_normalization applies).",
                             choices=MDPO_STEP_OBJECTIVES)


@register_algorithm
class MDPO(DLLMAlgorithm):
    name = "mdpo"
    summary = "per-step objective on the intermediate answers (every masked position), advantages per step from their rewards"
    paper = "He et al. 2025, MDPO, arXiv:2508.13148"
    Config = MDPOConfig
    config_file = "configs/dllm/mdpo_addition.yaml"
    estimator = "trajectory"  # both step objectives re-run the model on the recorded states
    inner_steps = 1  # the reference trains each batch once (num_iterations = 1, mdpo_config.py)
    advantage = "group per denoising step, from the intermediate answers' rewards"

    @property
    def record_predictions(self) -> bool:  # type: ignore[override]
        """The decode keeps its intermediate answers when they are scored or trained."""
        return self.opts.step_prediction == "sampled" or self.opts.step_objective == "masked_tokens"

    def build_estimator(self, name: str, **kwargs: Any) -> LogProbEstimator:
        """``step_objective: masked_tokens``: :class:`~flowalign.dllm.algorithms.MDPOMaskedTokenEstimator`
        (units = (step, position)); ``committed``: the plain ``trajectory`` estimator (units = steps)."""
        if self.opts.step_objective == "masked_tokens":
            return MDPOMaskedTokenEstimator(name, **kwargs)
        return super().build_estimator(name, **kwargs)

    def unit_weights(self, estimator: Any, batch: Any, log_prob_old: Tensor) -> Tensor:
        """``masked_tokens``: the reference's confidence x ``Lg / #masked^2`` weights
        (:func:`~flowalign.dllm.algorithms.mdpo_masked_token_weights`, the confidences from the old
        log-probs); ``committed``: the default step weights."""
        if self.opts.step_objective == "masked_tokens":
            return mdpo_masked_token_weights(log_prob_old, batch.trajectory)
        return super().unit_weights(estimator, batch, log_prob_old)

    def advantages(self, recipe: Any, rollouts: DLLMRollouts) -> tuple[Tensor, dict[str, float]]:
        """``[N, S]`` per-step advantages from the task reward of each step's intermediate answer
        (``algorithm.mdpo.step_prediction``; ``[N, S, Lg]``), scored (``step_score``) and made
        group-relative within each (prompt group, step) cell. Logs the mean reward of the first
        and last steps' answers (``train/step_reward_first``, ``train/step_reward_last``)."""
        a, o = self.cfg.algorithm, self.opts
        if o.step_prediction == "sampled":
            predicted = rollouts.trajectory.predictions  # [N, S, Lg]: the draws made while decoding
            if predicted is None:
                raise RuntimeError("algorithm.mdpo.step_prediction='sampled' needs the decode's recorded predictions")
        else:
            predicted = predicted_completions(recipe.logits_fn, rollouts.trajectory, recipe.mask_id)
        N, S, Lg = predicted.shape
        examples = [ex for ex in rollouts.examples for _ in range(S)]
        step_rewards = recipe.score(predicted.reshape(N * S, Lg), examples).reshape(N, S)
        advantages = over_ranks(recipe, rollouts, step_rewards, a.std_mode, lambda r, g: mdpo_step_advantages(
            r, g, std_mode=a.std_mode, clip=a.adv_clip or None, form=o.step_score, unbiased=o.unbiased_std))
        if o.step_objective == "masked_tokens":  # every (step, position) unit carries its step's advantage (L945)
            advantages = advantages.repeat_interleave(Lg, dim=1)  # [N, S * Lg]
        return advantages, {"train/step_reward_first": recipe.mean(step_rewards[:, 0]),
                            "train/step_reward_last": recipe.mean(step_rewards[:, -1])}

    def loss_weights(self, weights: Tensor, advantages: Tensor) -> Tensor:
        """Only the ``train_steps`` steps of each row with the largest ``|advantage|`` are trained,
        ``committed``: each with weight 1 (the reference's per-step micro-batches weigh equally;
        L922-945); ``masked_tokens``: their tokens keep their weights, the other steps' are 0."""
        k = self.opts.train_steps
        if k == 0:
            return weights
        if self.opts.step_objective == "masked_tokens":
            N, S = weights.shape[0], int(self.cfg.sampling.steps)
            w3, a3 = weights.reshape(N, S, -1), advantages.reshape(N, S, -1)
            chosen = mdpo_train_steps(a3[:, :, 0], w3.sum(dim=-1), k)  # a step's units share its advantage
            return (w3 * chosen.unsqueeze(-1).to(weights.dtype)).reshape(N, -1)
        return mdpo_train_steps(advantages, weights, k).to(weights.dtype)

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        require_trajectory_estimator(cfg)
        a = cfg.algorithm
        if a.mdpo.step_objective == "masked_tokens":
            _require(a.loss_normalization in (None, "sequence"), "algorithm.loss_normalization",
                     "algorithm.mdpo.step_objective='masked_tokens' weighs its units as the MDPO reference does "
                     f"(confidence x Lg / #masked^2); loss_normalization must be left null, got {a.loss_normalization!r}")
