"""Co-GRPO (Zhou et al. 2025, "Co-GRPO: Co-Optimized Group Relative Policy Optimization for Masked
Diffusion Model", arXiv:2512.22288, §3): masked-diffusion generation as ONE Markov decision process
whose agent acts both with the model (the tokens) and with the inference schedule, optimised with
trajectory-level GRPO under a shared reward, without backpropagating through the decode.

Here (masked diffusion LM) the schedule's action at step ``s`` is the choice of the ``k_s``
positions to commit, drawn by the learned head of :mod:`flowalign.dllm.unmasking_policy`
(Plackett-Luce over the current block's masked positions, scored from the model's confidences), and
the model's action the tokens committed there; their joint per-step probability factorises exactly
(the features do not depend on the drawn tokens), so each step's GRPO ratio is that of
``log PL(o | x_s) + sum_{i in o} log p_theta(x0_i | x_s)`` and one optimizer trains both the model
and the head (:class:`~flowalign.algorithms.token_commitment.CommitmentEstimator`).

What is ours (docs/FIDELITY.md "Co-GRPO"): the paper is on image MDMs (MaskGIT-style) with per-step
schedule parameters (sampling temperature, re-mask ratio); the schedule action on the language model
is the commitment choice above (the number per step stays the decode's schedule), and the two
policies share one clipped ratio per step and one learning rate. The aMUSEd image model is not
wired in.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowalign.algorithms.registry import register_algorithm
from flowalign.algorithms.token_commitment import CommitmentAlgorithm
from flowalign.config_fields import _f

__all__ = ["CoGRPO", "CoGRPOConfig"]


@dataclass
class CoGRPOConfig:
    hidden: int = _f(32, "Hidden width of the schedule (commitment) head's MLP (flowalign.dllm.unmasking_policy.UnmaskingPolicy).",
                     ge=1)
    confidence_scale: float = _f(4.0, "Initial weight a of log p_max in the schedule head's score u = a log p_max + "
                                      "MLP(features): the untrained schedule is the low-confidence heuristic as a "
                                      "Plackett-Luce draw at temperature 1/a (0: uniformly random remasking).", ge=0)
    policy_lr_scale: float = _f(1.0, "The commitment head's learning rate is train.optimizer.lr times this (its own optimizer "
                                     "parameter group; the model's stays at train.optimizer.lr).", gt=0)


@register_algorithm
class CoGRPO(CommitmentAlgorithm):
    name = "co_grpo"
    summary = "joint GRPO of the dLLM and a learned unmasking schedule: per-step ratio of token + commitment log-probs"
    paper = "Zhou et al. 2025, Co-GRPO, arXiv:2512.22288"
    Config = CoGRPOConfig
    config_file = "configs/dllm/co_grpo_addition.yaml"
    advantage = "group, on per-step joint (token + commitment) log-probs"

    def train_model(self) -> bool:
        return True
