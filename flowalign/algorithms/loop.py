"""LOOP: leave-one-out PPO for diffusion / flow models (Gupta et al. 2025, arXiv:2503.00897).

``k = sampling.group_size`` SDE samples per prompt; each sample's advantage is its reward minus the
mean reward of the *other* ``k - 1`` samples of its prompt (the REINFORCE leave-one-out baseline,
:func:`flowalign.advantages.leave_one_out_advantages`), with no std normalisation; that advantage is
spread onto every trained denoising step of the sample's trajectory and trained with the PPO clipped
importance-sampling loss (the inherited :meth:`FlowAlgorithm.edge_loss`, Schulman et al. 2017 Eq. 7)
over several optimizer steps on the same samples (``train.steps_per_iter``). The paper's objective
(§4, "LOOP"):

    L(θ) = E_c E_{x^1..x^k ~ π_old(·|c)} [ 1/k Σ_i Σ_t min(ρ_t^i A^i, clip(ρ_t^i, 1-ε, 1+ε) A^i) ],
    A^i = r(x_0^i, c) - 1/(k-1) Σ_{j≠i} r(x_0^j, c),   ρ_t^i = π_θ(x_{t-1}^i | x_t^i, c) / π_old(x_{t-1}^i | x_t^i, c).

No public code (the authors' page lists none; searched 2026-12): implemented from the paper. Ours
(docs/FIDELITY.md, "LOOP"): the per-step policy is this project's flow SDE (``sampling.sampler``), not
the paper's DDPM on SD 1.5; the trained steps are the shared ``timestep_fraction`` ones; a sample a
reward could not score is left out of its group's baseline and gets advantage 0; the shared
``algorithm.adv_clip`` still applies when non-zero (the quickstart sets 0: LOOP does not clip advantages);
the sum over steps is a mean over the trained edges here (a constant scale);
``algorithm.std_mode`` / ``std_estimator`` / ``std_eps`` do not apply and are refused when set. ``k >= 2`` is the shared
``sampling.group_size`` check.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from flowalign.advantages import leave_one_out_advantages
from flowalign.algorithms.flow import FlowAlgorithm, ScoredRollout
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require


@register_algorithm
class LOOP(FlowAlgorithm):
    name = "loop"
    summary = "k samples per prompt, leave-one-out (RLOO) baseline without std, PPO-clip on every trained SDE step"
    paper = "Gupta et al. 2025, LOOP (leave-one-out PPO), arXiv:2503.00897"
    advantage = "leave_one_out"
    config_file = "configs/loop/quickstart.yaml"

    def leaf_advantages(self, scored: ScoredRollout) -> Tensor:
        """``[world * L]`` leave-one-out advantages over the groups gathered from every rank
        (arXiv:2503.00897 §4, A^i = r^i - mean_{j≠i} r^j), clamped to ``±algorithm.adv_clip`` when
        that is non-zero (ours)."""
        adv = leave_one_out_advantages(scored.all_scores, scored.all_groups, valid=scored.all_valid)
        clip = self.cfg.algorithm.adv_clip
        return adv.clamp(-clip, clip) if clip else adv

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        """Refuse the std-normalisation keys of the group-relative algorithms: LOOP divides by no std."""
        a = cfg.algorithm
        for key, value, unset in (("std_mode", a.std_mode, "group"), ("std_estimator", a.std_estimator, None),
                                  ("std_eps", a.std_eps, None)):
            _require(value == unset, f"algorithm.{key}",
                     f"loop's leave-one-out advantage is not divided by a std (arXiv:2503.00897 §4); "
                     f"leave it at {'null' if unset is None else unset}, got {value!r}")
