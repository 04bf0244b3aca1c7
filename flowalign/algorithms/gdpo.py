"""GDPO (Rojas et al. 2025, arXiv:2510.08554, §4): a sequence-level ratio
``exp(ELBO_theta - ELBO_old)`` with the semi-deterministic ELBO estimator (Gauss-Legendre quadrature
in the masking time ``t``, random masks at each node) and sequence-level advantages.
"""

from __future__ import annotations

from flowalign.algorithms.dllm import DLLMAlgorithm
from flowalign.algorithms.registry import register_algorithm


@register_algorithm
class GDPO(DLLMAlgorithm):
    name = "gdpo"
    summary = "sequence-level ratio of semi-deterministic (quadrature in t) ELBO estimates"
    paper = "Rojas et al. 2025, GDPO, arXiv:2510.08554"
    config_file = "configs/dllm/gdpo_addition.yaml"
    estimator = "elbo_semi_deterministic"
    inner_steps = 2
