"""GDPO (Rojas et al. 2025, arXiv:2510.08554, §4): a sequence-level ratio of ELBO estimates with the
semi-deterministic estimator (Gauss-Legendre quadrature in the masking time ``t``, random masks at
each node) and sequence-level advantages.

The defaults follow the authors' code (KevinRojas1499/GDPO @ 1918683, docs/FIDELITY.md "GDPO"):

* masks at node ``t_i``: exactly ``floor(t_i * Lg)`` completion positions, a uniform subset
  (``gdpo/likelihood_estimators.py`` L222-236), weighted ``1/t_i`` (L297) -- ``node_masks``;
* the ELBO sums over every completion-window position, EOS fill included (L298-301: the estimator
  sees the whole ``logits_to_keep`` window, ``completion_mask`` is never applied) -- ``elbo_tokens``;
* the ratio is ``exp((ELBO - ELBO_old) / Lg)`` (``gdpo/gdpo_trainer.py`` L120, "Divide by sequence
  length") -- ``ratio_length_norm``;
* advantages are ``r - mean_group(r)``, not divided by the std (``gdpo_trainer.py`` L477-479; the
  std is only logged) -- ``scale_by_std``;
* 3 nodes (``countdown_base.sbatch``: ``ESTIMATOR=gauss-3``; ``gdpo_config.py``'s default is
  gauss-2), mu = 12 inner steps (``NUM_ITER=12``), clip epsilon 0.5 (``train.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from flowalign.advantages import group_advantages
from flowalign.algorithms.dllm import DLLMAlgorithm, DLLMRollouts, over_ranks
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_fields import _f
from flowalign.dllm.algorithms import LogProbEstimator, RolloutBatch
from flowalign.training.rng import Generator

NODE_MASKS = ("exact", "bernoulli")
ELBO_TOKENS = ("window", "trained")


@dataclass
class GDPOConfig:
    node_masks: str = _f("exact", "Masks at each quadrature node t_i: exact (floor(t_i * Lg) positions, a uniform subset; the "
                         "GDPO reference) | bernoulli (each position with probability t_i).", choices=NODE_MASKS)
    elbo_tokens: str = _f("window", "Tokens summed into the sequence ELBO: window (every completion position, EOS fill "
                          "included; the reference) | trained (up to and including the first EOS).", choices=ELBO_TOKENS)
    ratio_length_norm: bool = _f(True, "Divide the sequence log-ratio by the completion length Lg: ratio = "
                                 "exp((ELBO - ELBO_old) / Lg) (the reference); false: exp(ELBO - ELBO_old).")
    scale_by_std: bool = _f(False, "Divide advantages by the group std (algorithm.std_mode); false: r - group mean "
                            "only (the reference).")


class GDPOEstimator(LogProbEstimator):
    """:class:`~flowalign.dllm.algorithms.LogProbEstimator` with GDPO's reference forms for the
    sequence unit: ``node_masks`` for the semi-deterministic draws, the ELBO summed over
    ``elbo_tokens``, divided by ``Lg`` when ``length_norm`` (so the ratio of two estimates is
    ``exp((ELBO - ELBO_old) / Lg)``, ``gdpo_trainer.py`` L120). Other estimators are unchanged."""

    def __init__(self, name: str, *, node_masks: str = "exact", elbo_tokens: str = "window",
                 length_norm: bool = True, **kwargs: Any):
        super().__init__(name, **kwargs)
        self.node_masks, self.elbo_tokens, self.length_norm = node_masks, elbo_tokens, length_norm

    def draw(self, batch: RolloutBatch, generator: Generator) -> Any:
        if self.name != "elbo_semi_deterministic":
            return super().draw(batch, generator)
        from flowalign.dllm import logprob as lp

        N, L = batch.sequences.shape
        return lp.draw_semi_deterministic_masks(N, L - batch.prompt_length, self.num_mc, self.masks_per_t, generator,
                                                device=batch.sequences.device, mask_count=self.node_masks)

    def __call__(self, logits_fn: Any, batch: RolloutBatch, draws: Any) -> Tensor:
        if self.unit != "sequence":
            return super().__call__(logits_fn, batch, draws)
        from flowalign.dllm import logprob as lp

        per_token = lp.masked_logprob(self.guided(logits_fn, batch), batch.sequences, batch.attention_mask,
                                      batch.prompt_length, self.mask_id, draws)  # [N, Lg]
        if self.elbo_tokens == "trained":
            per_token = per_token * batch.trained.to(per_token.dtype)
        value = per_token.sum(dim=1, keepdim=True)  # [N, 1]
        # reference gdpo_trainer.py L120: coef_1 = exp((logps - old_logps) / completion_ids.shape[-1])
        return value / per_token.shape[1] if self.length_norm else value


@register_algorithm
class GDPO(DLLMAlgorithm):
    name = "gdpo"
    summary = "sequence-level ratio of semi-deterministic (quadrature in t) ELBO estimates"
    paper = "Rojas et al. 2025, GDPO, arXiv:2510.08554"
    Config = GDPOConfig
    config_file = "configs/dllm/gdpo_addition.yaml"
    estimator = "elbo_semi_deterministic"
    inner_steps = 12  # reference countdown_base.sbatch NUM_ITER=12
    advantage = "group, mean-centred (no std)"

    def build_estimator(self, name: str, **kwargs: Any) -> LogProbEstimator:
        o = self.opts
        return GDPOEstimator(name, node_masks=o.node_masks, elbo_tokens=o.elbo_tokens,
                             length_norm=o.ratio_length_norm, **kwargs)

    def advantages(self, recipe: Any, rollouts: DLLMRollouts) -> tuple[Tensor, dict[str, float]]:
        """Group-relative advantages; ``r - mean_group(r)`` unless ``algorithm.gdpo.scale_by_std``
        (reference ``gdpo_trainer.py`` L477-479)."""
        a = self.cfg.algorithm
        std_mode = a.std_mode if self.opts.scale_by_std else "none"
        return over_ranks(recipe, rollouts, rollouts.rewards, std_mode,
                          lambda r, g: group_advantages(r, g, std_mode=std_mode, clip=a.adv_clip or None)), {}
