"""Advantage estimators for tree, dense-reward, value and preference algorithms.

Pure tensor functions, one module per family, composed by the algorithms (:mod:`flowalign.algorithms`):

* :mod:`flowalign.estimators.tree` -- BranchGRPO (reward fusion, depth-wise advantages, width and
  depth pruning) and TempFlow-GRPO (branch-step process advantages, noise-aware weights).
* :mod:`flowalign.estimators.dense` -- DenseGRPO (step-wise reward gains, per-step advantages,
  psi(t) calibration) and VGPO (process values, discounted returns, temporal weights,
  value-anchored advantages).
* :mod:`flowalign.estimators.preference` -- Pref-GRPO win rates from a preference matrix;
  multi-reward sum-then-normalise vs decoupled normalisation.
"""

from flowalign.estimators.dense import (
    calibrate_noise,
    dense_step_advantages,
    discounted_returns,
    process_rewards,
    step_reward_gains,
    temporal_weights,
    vgpo_advantages,
)
from flowalign.estimators.preference import decoupled_normalization, sum_then_normalize, win_rate_rewards
from flowalign.estimators.tree import (
    branch_step_advantages,
    branch_step_edge_advantages,
    depth_prune,
    depthwise_advantages,
    edge_group_ids,
    fuse_node_rewards,
    noise_aware_weights,
    width_prune,
)

__all__ = [
    "calibrate_noise",
    "decoupled_normalization",
    "dense_step_advantages",
    "discounted_returns",
    "process_rewards",
    "step_reward_gains",
    "sum_then_normalize",
    "temporal_weights",
    "vgpo_advantages",
    "win_rate_rewards",
    "branch_step_advantages",
    "branch_step_edge_advantages",
    "depth_prune",
    "depthwise_advantages",
    "edge_group_ids",
    "fuse_node_rewards",
    "noise_aware_weights",
    "width_prune",
]
