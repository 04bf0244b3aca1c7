"""Learned token-commitment policy trained with GRPO ("The Path Matters: Learning a Token-Commitment
Policy for Diffusion Language Models", Sun et al. 2026, arXiv:2605.24697; the GRPO training of an
unmasking policy with the dLLM as the environment is Olausson et al. 2025, "Learning Unmasking
Policies for Diffusion Language Models", arXiv:2512.09106, §3).

A small head (:class:`flowalign.dllm.unmasking_policy.UnmaskingPolicy`) scores the masked positions
of the current block from the dLLM's confidences at every decoding step, and the ``k_s`` positions
committed at that step are a Plackett-Luce draw of those scores (exact log-prob,
:func:`flowalign.dllm.unmasking_policy.plackett_luce_log_prob`). GRPO trains the head on the
per-step commitment log-probs (one clipped ratio per step, group-relative advantages of the task
reward); the dLLM stays frozen (``algorithm.token_commitment.train_model: false``, the default) or
is trained jointly (``true``: each step's ratio is then that of the joint action, the committed
tokens' log-prob plus the commitment's, as :mod:`flowalign.algorithms.co_grpo`).

What is ours (docs/FIDELITY.md "Token commitment"): the paper's TraceLock controller learns from
self-supervised "future stability" labels, not from a reward; following the issue this method trains
the commitment policy with GRPO on the task reward instead (as Olausson et al.), with a Plackett-Luce
choice of a fixed number ``k_s`` of positions per step (theirs: a per-position Bernoulli that also
decides how many) and the features and score of :mod:`flowalign.dllm.unmasking_policy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from flowalign.algorithms.dllm import DLLMAlgorithm, require_trajectory_estimator
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.dllm.algorithms import LogProbEstimator, RolloutBatch, unit_weights
from flowalign.dllm.sampling import LogitsFn
from flowalign.dllm.unmasking_policy import CommitmentPolicy, UnmaskingPolicy

__all__ = ["CommitmentAlgorithm", "CommitmentEstimator", "TokenCommitment", "TokenCommitmentConfig"]


class CommitmentEstimator(LogProbEstimator):
    """The ``trajectory`` estimator of a decode whose positions a learned policy chose: per-step
    log-probs ``[N, S]`` of the commitment (:meth:`UnmaskingPolicy.trajectory_log_prob` of
    ``Trajectory.commit_records``), plus, with ``include_tokens``, the exact log-probs of the tokens
    committed at each step (:func:`flowalign.dllm.logprob.trajectory_logprob`): the step's joint
    action ``log PL(o | x_s) + sum_{i in o} log p_theta(x0_i | x_s)`` (module docstring of
    :mod:`flowalign.dllm.unmasking_policy`). Without ``include_tokens`` the model is never run.

    Args:
        name: ``"trajectory"``.
        policy: the commitment head.
        include_tokens: add the model's token log-probs (the model is trained too).
        **kwargs: :class:`~flowalign.dllm.algorithms.LogProbEstimator`'s.
    """

    def __init__(self, name: str, *, policy: UnmaskingPolicy, include_tokens: bool, **kwargs: Any):
        if name != "trajectory":
            raise ValueError(f"the commitment log-probs are per decoding step: estimator must be 'trajectory', got {name!r}")
        super().__init__(name, **kwargs)
        self.policy, self.include_tokens = policy, include_tokens

    def __call__(self, logits_fn: LogitsFn, batch: RolloutBatch, draws: Any) -> Tensor:
        records = getattr(batch.trajectory, "commit_records", None)
        if records is None:
            raise ValueError("the rollouts carry no commitment records: decode with the algorithm's commit_policy")
        commit = self.policy.trajectory_log_prob(records)  # [N, S]
        if not self.include_tokens:
            return commit
        return commit + super().__call__(logits_fn, batch, draws).to(commit.dtype)


@dataclass
class TokenCommitmentConfig:
    train_model: bool = _f(False, "Train the dLLM jointly with the commitment policy (each step's ratio is then that of the "
                                  "joint action: committed tokens plus commitment); false: the dLLM stays frozen and only "
                                  "the policy head is trained.")
    hidden: int = _f(32, "Hidden width of the commitment head's MLP (flowalign.dllm.unmasking_policy.UnmaskingPolicy).", ge=1)
    confidence_scale: float = _f(4.0, "Initial weight a of log p_max in the score u = a log p_max + MLP(features): the "
                                      "untrained policy is the low-confidence heuristic as a Plackett-Luce draw at "
                                      "temperature 1/a (0: uniformly random remasking).", ge=0)
    policy_lr_scale: float = _f(1.0, "The commitment head's learning rate is train.optimizer.lr times this (its own optimizer "
                                     "parameter group; the model's stays at train.optimizer.lr).", gt=0)


class CommitmentAlgorithm(DLLMAlgorithm):
    """What :class:`TokenCommitment` and :class:`~flowalign.algorithms.co_grpo.CoGRPO` share: the
    commitment head (built in :meth:`setup`, attached to the model as ``unmasking_policy`` so that
    checkpoints hold and resume its weights, written to ``best/`` and ``final/`` by
    :meth:`save_pretrained`), the Plackett-Luce decode, and GRPO on per-step log-probs of every step
    (each commits at least one token; the EOS fill's steps are choices of the policy too)."""

    estimator = "trajectory"
    inner_steps = 2
    clip_range = 0.2
    kl_beta = 0.0
    advantage = "group, on per-step commitment log-probs"
    policy: UnmaskingPolicy | None = None

    def train_model(self) -> bool:
        """Whether the dLLM is trained besides the head."""
        raise NotImplementedError

    def setup(self, recipe: Any) -> None:
        """Build the head on the model's device; freeze the dLLM unless it is trained."""
        o = self.opts
        self.policy = UnmaskingPolicy(hidden=o.hidden, confidence_scale=o.confidence_scale).to(recipe.model.device)
        recipe.model.add_module("unmasking_policy", self.policy)
        if not self.train_model():
            for p in recipe.model.trainable_parameters():
                p.requires_grad_(False)

    def trainable_parameters(self, recipe: Any) -> list:
        return list(recipe.model.trainable_parameters()) + list(self.policy.parameters())

    def param_groups(self, recipe: Any, params: list) -> list[dict[str, Any]]:
        """The model's parameters at ``train.optimizer.lr`` and the head's at ``lr x policy_lr_scale``."""
        head = {id(p) for p in self.policy.parameters()}
        model = [p for p in params if id(p) not in head]
        lr = float(self.cfg.train.optimizer.lr) * float(self.opts.policy_lr_scale)
        groups = [{"params": model}] if model else []
        return groups + [{"params": list(self.policy.parameters()), "lr": lr}]

    def commit_policy(self, recipe: Any, greedy: bool) -> CommitmentPolicy:
        return CommitmentPolicy(self.policy, greedy=greedy)

    def save_pretrained(self, path: str) -> None:
        self.policy.save(path)

    def build_estimator(self, name: str, **kwargs: Any) -> CommitmentEstimator:
        return CommitmentEstimator(name, policy=self.policy, include_tokens=self.train_model(), **kwargs)

    def unit_weights(self, estimator: Any, batch: Any, log_prob_old: Tensor) -> Tensor:
        """Every decoding step is a trained unit (``algorithm.loss_normalization`` applies)."""
        every = batch.trajectory.commit_step >= 0
        return unit_weights("step", every, batch.trajectory, self.cfg.algorithm.loss_normalization)

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        require_trajectory_estimator(cfg)
        a, s = cfg.algorithm, cfg.sampling
        _require(s.order == "diffusion", "sampling.order",
                 f"{a.name} chooses the positions of a diffusion decode; order must be 'diffusion', got {s.order!r}")
        _require(s.eos_early_rejection == 0, "sampling.eos_early_rejection",
                 f"{a.name}'s policy replaces the confidence rule that EOS early rejection rescales; set it to 0")
        _require(a.kl_beta == 0, "algorithm.kl_beta", f"{a.name} has no reference for the commitment policy; set kl_beta to 0")
        _require(not cfg.train.fsdp.enabled, "train.fsdp.enabled",
                 f"{a.name}'s commitment head is not sharded; run it without FSDP")


@register_algorithm
class TokenCommitment(CommitmentAlgorithm):
    name = "token_commitment"
    summary = "learned Plackett-Luce token-commitment policy on dLLM confidences, trained with GRPO (dLLM frozen or joint)"
    paper = "Sun et al. 2026, The Path Matters, arXiv:2605.24697"
    Config = TokenCommitmentConfig
    config_file = "configs/dllm/token_commitment_addition.yaml"

    def train_model(self) -> bool:
        return bool(self.opts.train_model)
