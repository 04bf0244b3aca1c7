"""Rollout: one engine samples every tree (flat groups, shared-prefix branches, ODE/SDE windows).

``BranchSpec`` describes the tree; ``rollout`` samples it into a ``RolloutTree``; ``sample_ode``
is the deterministic Euler sampler used for evaluation.
"""

from flowalign.rollout.engine import rollout, sample_ode
from flowalign.rollout.spec import BranchSpec

__all__ = ["BranchSpec", "rollout", "sample_ode"]
