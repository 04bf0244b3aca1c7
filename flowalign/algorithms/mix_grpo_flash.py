"""MixGRPO-Flash (Li et al. 2025, arXiv:2507.21802, §3.4 "MixGRPO-Flash"): MixGRPO whose ODE steps after
the SDE window are run by a higher-order solver on a compressed schedule, so a rollout costs fewer NFEs.

Reference: Tencent-Hunyuan/MixGRPO @ e5cdd6a, ``fastvideo/utils/sampling_utils.py`` l. 29-50 and 112-146
(``dpm_apply_strategy == "post"``): steps up to the window's last step ``l`` are sampled as in MixGRPO (Euler ODE
before the window, SDE inside it), the ``T - l - 1`` steps after it are replaced by ``n - 1`` steps of
DPM-Solver++(2M) (``dpm_algorithm_type dpmsolver++``, ``dpm_solver_order 2``, ``dpm_solver_type midpoint``) on
``linspace(t_{l+1}, 0, n)``, ``n = int(max((T - l) * dpm_post_compress_ratio, 1))``, the first post step using the
window's last data prediction as its history and the final step into ``sigma = 0`` first order. The scripts
``scripts/finetune/finetune_flux_grpo_MixGRPO_Flash.sh`` (``dpm_post_compress_ratio 0.4``, ``prog_overlap_step 1``)
and ``..._Flash*.sh`` (``0.2``, ``--prog_overlap --prog_overlap_step 0``: the window's cursor never moves,
``fastvideo/utils/grpo_states.py`` l. 91-92, so the window stays at ``[0, size)``; here ``shift_every >=
train.iterations``) are the paper's Flash and Flash*. The window, advantages and loss are MixGRPO's
(:mod:`flowalign.algorithms.mix_grpo`); the SDE window steps and their log-probs are unchanged (the tail is
deterministic and untrained).

The math: :mod:`flowalign.samplers.dpm_solver`; the rollout runs it through ``BranchSpec.schedule`` and
``BranchSpec.ode_solver``. Ours: at least one tail step (``n >= 2``); the tail's sigmas taken from the
adapter's own schedule on a finer grid (no shift parameter).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from flowalign.algorithms.mix_grpo import MixGRPO, MixGRPOConfig
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require, _require_choice
from flowalign.config_fields import _f
from flowalign.rollout.spec import BranchSpec
from flowalign.samplers.dpm_solver import ODE_SOLVERS, flash_tail_grid


@dataclass
class MixGRPOFlashConfig(MixGRPOConfig):
    solver: str = _f("dpm_solver++_2m", "ODE solver of the steps after the SDE window: dpm_solver++_2m (MixGRPO-Flash's "
                                        "DPM-Solver++ 2nd order, midpoint) | euler (compression only).", choices=ODE_SOLVERS)
    compress_ratio: float = _f(0.4, "The T - l - 1 ODE steps after the window's last step l become "
                                    "max(int((T - l) * ratio), 2) - 1 (MixGRPO --dpm_post_compress_ratio: 0.4 Flash, "
                                    "0.2 Flash*).", gt=0, le=1)


@register_algorithm
class MixGRPOFlash(MixGRPO):
    name = "mix_grpo_flash"
    summary = ("MixGRPO with the ODE steps after the SDE window compressed and run by DPM-Solver++(2M): "
               "fewer NFEs per rollout")
    paper = "Li et al. 2025, MixGRPO (MixGRPO-Flash), arXiv:2507.21802"
    Config = MixGRPOFlashConfig
    config_file = "configs/mix_grpo_flash/quickstart.yaml"

    def rollout_spec(self, iteration: int, world: int) -> BranchSpec:
        """MixGRPO's spec cut after the window's last step ``l``: the ``l + n`` steps of
        :func:`~flowalign.samplers.dpm_solver.flash_tail_grid`, the tail run by ``solver``."""
        spec = super().rollout_spec(iteration, world)
        _, end = self.sde_window(iteration)
        schedule = flash_tail_grid(spec.num_steps, end - 1, self.opts.compress_ratio)
        steps = len(schedule) - 1
        return dataclasses.replace(spec, num_steps=steps, noise_levels=spec.noise_levels[:steps], schedule=schedule,
                                   ode_solver=self.opts.solver)

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        super().check(cfg, world_size)
        w = cls.options(cfg)
        # sampling_utils.py l. 32: "post strategy is only supported for progressive sampling"
        _require(w.strategy == "progressive", f"algorithm.{cls.name}.strategy",
                 f"the ODE tail follows a window that moves forward; only 'progressive' is supported, got {w.strategy!r}")
        _require_choice(w.solver, ODE_SOLVERS, f"algorithm.{cls.name}.solver", "solver")
        _require(0 < w.compress_ratio <= 1, f"algorithm.{cls.name}.compress_ratio", f"must be in (0, 1], got {w.compress_ratio}")
        _require(cfg.sampling.final_sample == "sde", "sampling.final_sample",
                 f"{cls.name} ends on its ODE tail; final_sample 'predicted_x0' would reward the tail's last x0 prediction")
