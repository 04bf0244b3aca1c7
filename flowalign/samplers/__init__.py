"""Samplers: single ODE / SDE / DDIM steps with Gaussian transition log-probabilities."""

from flowalign.samplers.steps import SDE_KINDS, StepOutput, ddim_step, gaussian_log_prob, ode_step, sde_step

__all__ = ["SDE_KINDS", "StepOutput", "ddim_step", "gaussian_log_prob", "ode_step", "sde_step"]
