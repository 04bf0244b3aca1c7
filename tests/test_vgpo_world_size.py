"""VGPO normalises whole groups under several processes: each rank holds part of every prompt's
group, so its advantages come from the look-ahead tables and rewards gathered from every rank
(as DenseGRPO's, docs/FIDELITY.md); with one process nothing changes."""

from __future__ import annotations

import os

import torch

from flowalign.algorithms.vgpo import VGPO, vgpo_targets
from flowalign.config import load_config
from flowalign.estimators.dense import vgpo_advantages
from tests.conftest import REPO
from tests.test_fidelity_dense_mix import GROUPS, TABLE, T, _flat_tree, _scored

VGPO_CONFIG = os.path.join(REPO, "configs", "vgpo", "quickstart.yaml")


def _vgpo() -> VGPO:
    return VGPO(load_config(VGPO_CONFIG, {"sampling.num_steps": T, "eval.num_steps": T}))


def test_two_ranks_get_the_whole_group_advantages():
    """Rank r holds rows 4r..4r+3 (two members of each of the two groups). With the gathered table
    both ranks' advantages are the rows of one computation on the whole table; a rank normalising
    only its own half would get other values."""
    algo = _vgpo()
    o, clip = algo.opts, algo.cfg.algorithm.adv_clip
    whole = vgpo_advantages(TABLE[:, :-1], TABLE[:, -1], GROUPS, gamma=o.discount, alpha=o.value_anchor,
                            anchor_steps=o.anchor_steps).clamp(-clip, clip)
    halves = TABLE.view(2, 4, T + 1)
    for rank in (0, 1):
        tree = _flat_tree(4, T, GROUPS[rank * 4:(rank + 1) * 4])
        scored = _scored(rank, 2, lambda t: torch.cat([halves[0], halves[1]]))  # what acc.gather returns
        targets = vgpo_targets(scored.gather(halves[rank]), tree, scored.all_scores, o, clip, scored)
        torch.testing.assert_close(targets.advantages[tree.leaf_edges], whole[rank * 4:(rank + 1) * 4])
        alone = vgpo_targets(halves[rank], tree, halves[rank][:, -1], o, clip)  # the former per-rank form
        assert not torch.allclose(alone.advantages[tree.leaf_edges], whole[rank * 4:(rank + 1) * 4])


def test_one_process_is_unchanged():
    algo = _vgpo()
    o, clip = algo.opts, algo.cfg.algorithm.adv_clip
    tree = _flat_tree(8, T, GROUPS)
    scored = _scored(0, 1, lambda t: t)
    gathered = vgpo_targets(scored.gather(TABLE), tree, scored.all_scores, o, clip, scored)
    local = vgpo_targets(TABLE, tree, TABLE[:, -1], o, clip)
    assert torch.equal(gathered.advantages, local.advantages)
