"""World-size invariance of the image / video algorithms (docs/ARCHITECTURE.md, "Several processes").

One training iteration of every ``rl`` / ``awm`` algorithm, from the same seed, with 1 and with 2
processes (gloo on CPU): the 2-process run samples exactly the 1-process run's samples (each rank
its share, found by value), gives every sample the same per-step advantages, and takes the same
optimizer step (weights within float tolerance). The update is compared with one optimizer step
per iteration over all of a rank's edges: gradients averaged over ranks then equal the
one-process mean.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from flowalign.rollout import Shard
from tests.conftest import REPO, free_port, join_processes

#: algorithm -> (config, its own overrides); every run also gets TINY
CASES = {
    "grpo": ("configs/quickstart.yaml", {}),
    "grpo_dance_options": ("configs/quickstart.yaml", {"sampling.sampler": "dance", "sampling.noise_level": 0.3,
                                                       "sampling.train_steps": "random_subset", "sampling.init_same_noise": True,
                                                       "sampling.final_sample": "predicted_x0"}),
    "branch_grpo": ("configs/branch_grpo/quickstart.yaml", {"algorithm.branch_grpo.norm_scope": "group"}),
    "tempflow_grpo": ("configs/tempflow_grpo/quickstart.yaml", {}),
    "dense_grpo": ("configs/dense_grpo/quickstart.yaml", {}),
    "vgpo": ("configs/vgpo/quickstart.yaml", {}),
    "mix_grpo": ("configs/mix_grpo/quickstart.yaml", {}),
    "pref_grpo": ("configs/pref_grpo/quickstart.yaml", {}),
    "multi_reward": ("configs/multi_reward/quickstart.yaml", {}),
    "awm": ("configs/awm/quickstart.yaml", {}),
    # a groupwise reward (group_diversity) scores a sample against its whole group: groups placed whole per rank
    "grpo_group_diversity": ("configs/quickstart_diverse.yaml", {}),
}
TINY = {"data.prompts_per_iter": 2, "sampling.num_steps": 6, "eval.num_steps": 6, "train.steps_per_iter": 1,
        "train.micro_batch_size": 4096, "num_threads": 1, "logging.progress": False}


def _overrides(name: str, out_dir: str) -> dict:
    path, own = CASES[name]
    extra = {}
    if name == "branch_grpo":
        extra = {"algorithm.branch_grpo.splits": [[1, 2], [3, 2], [4, 2]]}
    if name == "tempflow_grpo":
        extra = {"algorithm.tempflow_grpo.branch_steps": [2]}
    return {**TINY, **extra, **own, "output_dir": os.path.join(out_dir, name)}


def _run_one(name: str, out_dir: str, rank: int) -> None:
    """One iteration of ``name``; saves this rank's leaves, per-path advantages and updated weights."""
    from flowalign.api import recipe_class
    from flowalign.config import load_config

    path, _ = CASES[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(os.path.join(REPO, path), _overrides(name, out_dir), world_size=world)
    recipe = recipe_class(cfg)(cfg)
    recipe.setup(for_training=False)
    seen = {}
    targets_fn = recipe.algorithm.targets

    def spy(tree, scored, ctx, iteration):
        out = targets_fn(tree, scored, ctx, iteration)
        seen.update(leaves=tree.leaf_latents.detach().cpu().clone(),
                    path_advantages=out.advantages[tree.leaf_edges].detach().cpu().clone(),
                    path_trained=out.trainable[tree.leaf_edges].detach().cpu().clone())
        return out

    recipe.algorithm.targets = spy
    trainable = lambda: {n: p.detach().cpu().clone() for n, p in recipe.module.named_parameters() if p.requires_grad}  # noqa: E731
    seen["before"] = trainable()
    recipe.train_iteration(0)
    seen["weights"] = trainable()
    torch.save(seen, os.path.join(out_dir, f"{name}.world{world}.rank{rank}.pt"))
    recipe.cleanup()


def _worker(rank: int, world: int, port: int, out_dir: str, names: list[str]) -> None:
    join_processes(rank, world, port)
    for name in names:
        _run_one(name, out_dir, rank)


def test_shard_rows_hand_worked():
    """2 prompts x 4 samples drawn as rows 0..7 (prompt-major). By group, rank 1 of 2 holds samples
    2, 3 of each prompt; by prompt, it holds prompt 1 whole; one process holds everything."""
    rows = torch.arange(8)
    assert Shard(1, 2, "group").local_rows(rows, num_prompts=2).tolist() == [2, 3, 6, 7]
    assert Shard(0, 2, "group").local_rows(rows, num_prompts=2).tolist() == [0, 1, 4, 5]
    assert Shard(1, 2, "prompt").local_rows(rows, num_prompts=1).tolist() == [4, 5, 6, 7]
    assert Shard().local_rows(rows, num_prompts=2).tolist() == rows.tolist()
    assert Shard(1, 2, "prompt").prompt_slice(4) == slice(2, 4) and Shard(1, 2, "group").prompt_slice(4) == slice(0, 4)
    with pytest.raises(ValueError, match="rank"):
        Shard(2, 2)


def test_groupwise_rewards_place_whole_groups_and_name_the_key():
    """A reward that needs whole groups turns group placement into prompt placement under several
    processes, and refuses a prompt count the ranks cannot split, naming data.prompts_per_iter."""
    from types import SimpleNamespace

    from flowalign.config import ConfigError
    from flowalign.recipes.rl import RLRecipe

    whole = SimpleNamespace(needs_whole_groups=True)
    recipe = SimpleNamespace(reward_fn=SimpleNamespace(rewards={"group_diversity": whole}), world=2,
                             algorithm=SimpleNamespace(shard_by="group"),
                             cfg=SimpleNamespace(data=SimpleNamespace(prompts_per_iter=4)))
    assert RLRecipe._shard_by(recipe) == "prompt"
    recipe.cfg.data.prompts_per_iter = 3
    with pytest.raises(ConfigError, match="data.prompts_per_iter"):
        RLRecipe._shard_by(recipe)
    recipe.world = 1
    assert RLRecipe._shard_by(recipe) == "group"


def _match_rows(local: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """Index into ``whole [N, ...]`` of the nearest row to each row of ``local [n, ...]``, checked
    equal within float tolerance (a batch of another size runs the model's kernels in another order:
    ~1e-6, against distances between distinct samples of order 1)."""
    dist = torch.cdist(local.flatten(1).double(), whole.flatten(1).double())
    nearest = dist.min(1)
    assert float(nearest.values.max()) < 1e-4, f"a 2-process sample is not among the 1-process ones ({nearest.values.max():.3g})"
    return nearest.indices


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world_size"))
    names = list(CASES)
    mp.spawn(_worker, args=(1, free_port(), out, names), nprocs=1, join=True)
    mp.spawn(_worker, args=(2, free_port(), out, names), nprocs=2, join=True)
    return out


@pytest.mark.slow  # ~2 min on the loaded 2-core machine: three interpreters, ten algorithms
@pytest.mark.parametrize("name", list(CASES))
def test_one_and_two_processes_sample_score_and_step_alike(runs, name):
    one = torch.load(os.path.join(runs, f"{name}.world1.rank0.pt"))
    two = [torch.load(os.path.join(runs, f"{name}.world2.rank{r}.pt")) for r in (0, 1)]
    found = torch.cat([_match_rows(part["leaves"], one["leaves"]) for part in two])
    # every sample of the one-process run is sampled exactly once by one of the ranks
    assert sorted(found.tolist()) == list(range(len(one["leaves"])))
    for part, idx in zip(two, found.split([len(p["leaves"]) for p in two])):
        assert torch.equal(part["path_trained"], one["path_trained"][idx])
        torch.testing.assert_close(part["path_advantages"], one["path_advantages"][idx], rtol=0, atol=1e-5)
    # the same update: the ranks agree with each other exactly and with one process within float
    # tolerance (Adam's first step is ~lr x sign(g): an element whose gradient is ~0 may move by a
    # part of lr either way, so the updates are compared as a whole)
    for key in one["weights"]:
        assert torch.equal(two[0]["weights"][key], two[1]["weights"][key]), key
    step_one = torch.cat([(one["weights"][k] - one["before"][k]).flatten() for k in one["weights"]])
    step_two = torch.cat([(two[0]["weights"][k] - one["before"][k]).flatten() for k in one["weights"]])
    assert float(step_one.norm()) > 0, "the iteration changed no weight"
    assert float((step_two - step_one).norm() / step_one.norm()) < 1e-3
