"""Rollout: one engine samples every tree (flat groups, shared-prefix branches, ODE/SDE windows).

``BranchSpec`` describes the tree; ``rollout`` samples it into a ``RolloutTree``; ``sample_ode``
is the deterministic Euler sampler used for evaluation; ``integrate_ode`` / ``lookahead_sigmas``
give the ODE look-ahead of DenseGRPO and VGPO's one-step projections.
"""

from flowalign.rollout.engine import integrate_ode, lookahead_sigmas, rollout, sample_ode
from flowalign.rollout.spec import BranchSpec, Shard

__all__ = ["BranchSpec", "Shard", "integrate_ode", "lookahead_sigmas", "rollout", "sample_ode"]
