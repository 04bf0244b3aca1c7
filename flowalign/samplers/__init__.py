"""Samplers: single ODE / SDE / DDIM steps with Gaussian transition log-probabilities."""

from flowalign.samplers.steps import (CPS_LOG_PROBS, SDE_KINDS, StepOutput, cps_flow_grpo_log_prob, ddim_step,
                                      gaussian_log_prob, ode_step, sde_step)

__all__ = ["CPS_LOG_PROBS", "SDE_KINDS", "StepOutput", "cps_flow_grpo_log_prob", "ddim_step", "gaussian_log_prob", "ode_step",
           "sde_step"]
