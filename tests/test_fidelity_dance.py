"""DanceGRPO's sampling options (XueZeyue/DanceGRPO @ 15cc71d, fastvideo/train_grpo_flux.py):
shared initial noise per group, a random per-sample subset of trained steps without the last step,
the last step's predicted x0 as the rewarded image. Each against an independent computation, then
all of them through the real ``rl`` recipe (docs/FIDELITY.md, "DanceGRPO sampling")."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools

import pytest
import torch

import flowalign
from flowalign.config import ConfigError, load_config
from flowalign.pipelines.toy import build_toy_adapter
from flowalign.rollout import BranchSpec, rollout
from flowalign.rollout.engine import _trained_subsets
from flowalign.training.metrics import read_metrics
from flowalign.training.rng import stream_generator
from tests.conftest import REPO

PROMPTS = ["the digit one", "a handwritten seven"]


@pytest.fixture(scope="module")
def adapter():
    torch.set_num_threads(1)
    return build_toy_adapter(seed=0, shift=3.0)


@pytest.fixture(scope="module")
def cond(adapter):
    return adapter.encode(PROMPTS)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# (b) --init_same_noise
# ------------------------------------------------------------------------------------------------
def test_shared_noise_leaves_of_a_group_start_from_identical_latents(adapter, cond):
    G, T = 3, 4
    spec = BranchSpec.flat(T, G, 0.3, sampler="dance", shared_noise=True)
    tree = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(1), init_generator=gen(7), decode=False)
    start = tree.x_t[tree.step == 0]  # [P*G], prompt-major
    # independent: the P noises the init generator draws, each repeated for the G members of its group
    expected = adapter.init_latents(len(PROMPTS), gen(7))
    for p in range(len(PROMPTS)):
        for g in range(G):
            assert torch.equal(start[p * G + g], expected[p].float())
    assert not torch.equal(start[0], start[G])  # two groups, two noises
    # the group members part at the first SDE step (each its own SDE noise)
    first = tree.x_next[tree.step == 0]
    assert all(not torch.equal(first[i], first[j]) for i, j in itertools.combinations(range(G), 2))
    # the default draws G independent noises from the same source
    plain = rollout(adapter, cond, BranchSpec.flat(T, G, 0.3, sampler="dance"), prompts=PROMPTS, generator=gen(1),
                    init_generator=gen(7), decode=False)
    plain_start = plain.x_t[plain.step == 0]
    assert torch.equal(plain_start, adapter.init_latents(len(PROMPTS) * G, gen(7)).float())
    assert not torch.equal(plain_start[0], plain_start[1])


# ------------------------------------------------------------------------------------------------
# (a) per-sample random subset of the steps, the last one never trained
# ------------------------------------------------------------------------------------------------
def test_random_subset_count_range_and_reproducibility(adapter, cond):
    G, T, k = 4, 6, 3
    spec = BranchSpec.flat(T, G, 0.3, sampler="dance", train_steps=range(T - 1), train_subset=k)
    tree = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(1), train_generator=gen(5), decode=False)
    per_leaf = tree.trainable[tree.leaf_edges]  # [L, T]: which steps each sample trains
    assert per_leaf.sum(1).tolist() == [k] * (len(PROMPTS) * G)  # int((T-1) x f) per sample
    assert not per_leaf[:, T - 1].any()  # the last step is never trained
    assert len({tuple(row.tolist()) for row in per_leaf}) > 1  # drawn per sample, not one set for all
    assert int(tree.trainable.sum()) == len(PROMPTS) * G * k
    # the same stream gives the same subsets; the sampling itself does not depend on them
    again = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(1), train_generator=gen(5), decode=False)
    other = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(1), train_generator=gen(6), decode=False)
    assert torch.equal(again.trainable, tree.trainable) and not torch.equal(other.trainable, tree.trainable)
    assert torch.equal(other.x_next, tree.x_next)
    with pytest.raises(TypeError, match="train_generator"):
        rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(1), decode=False)


def test_random_subset_is_uniform_over_k_subsets():
    """DanceGRPO's per-sample randperm then first k: every step in with probability k/n, every pair with
    k(k-1)/(n(n-1)) (hypergeometric), here for its FLUX script: n = 15 candidate steps, k = int(15 x 0.6) = 9."""
    T, k, n_samples = 16, 9, 6000
    spec = BranchSpec.flat(T, 1, 0.3, sampler="dance", train_steps=range(T - 1), train_subset=k)
    mask = _trained_subsets(spec, n_samples, gen(0), torch.device("cpu")).float()
    assert mask.sum(1).eq(k).all() and not mask[:, T - 1].any()
    single = mask[:, : T - 1].mean(0)
    pair = (mask[:, 0] * mask[:, 14]).mean()
    assert torch.allclose(single, torch.full_like(single, 9 / 15), atol=0.025)  # 4.6 binomial std at n = 6000
    assert abs(float(pair) - 9 * 8 / (15 * 14)) < 0.025


def test_rollout_spec_maps_the_options():
    cfg = load_config(os.path.join(REPO, "configs", "grpo", "flux_jpeg.yaml"))
    from flowalign.algorithms import get_algorithm

    spec = get_algorithm("grpo")(cfg).rollout_spec(0, 1)
    # DanceGRPO's finetune_flux_grpo.sh: 16 steps, fraction 0.6 -> int(15 x 0.6) = 9 of steps 0..14 per sample
    assert spec.train_steps == tuple(range(15)) and spec.train_subset == 9
    assert spec.shared_noise and spec.final_sample == "predicted_x0" and spec.sampler == "dance"
    plain = load_config(os.path.join(REPO, "configs", "quickstart.yaml"))
    spec = get_algorithm("grpo")(plain).rollout_spec(0, 1)
    assert spec.train_steps == tuple(range(6)) and spec.train_subset is None  # Flow-GRPO: the first int(10 x 0.6)
    assert not spec.shared_noise and spec.final_sample == "sde"


def test_random_subset_refuses_trees_and_bad_values_name_the_key(monkeypatch):
    monkeypatch.chdir(REPO)
    from flowalign.algorithms import get_algorithm

    with pytest.raises(ConfigError, match="^sampling.train_steps: random_subset"):  # refused when loaded
        load_config("configs/branch_grpo/quickstart.yaml", ["sampling.train_steps=random_subset"])
    # a window of one SDE step has no step but the last to draw from (MixGRPO's shortest windows)
    cfg = load_config("configs/quickstart.yaml", ["sampling.train_steps=random_subset", "sampling.sde_window=[0,1]"])
    with pytest.raises(ConfigError, match="^sampling.train_steps: random_subset"):
        get_algorithm("grpo")(cfg).rollout_spec(0, 1)
    for key, value in (("sampling.train_steps", "last"), ("sampling.final_sample", "x0")):
        with pytest.raises(ConfigError, match=f"^{key}:"):
            load_config("configs/quickstart.yaml", [f"{key}={value}"])


# ------------------------------------------------------------------------------------------------
# (c) the rewarded image is the last step's x0 prediction
# ------------------------------------------------------------------------------------------------
def test_predicted_x0_is_x_minus_sigma_v_at_the_last_step(adapter, cond):
    G, T = 2, 4
    spec = BranchSpec.flat(T, G, 0.3, sampler="dance", final_sample="predicted_x0")
    tree = rollout(adapter, cond, spec, prompts=PROMPTS, generator=gen(3), decode=True)
    sde = rollout(adapter, cond, BranchSpec.flat(T, G, 0.3, sampler="dance"), prompts=PROMPTS, generator=gen(3), decode=False)
    last = tree.leaf_edges[:, -1]
    x, sigma = tree.x_t[last], tree.sigmas[T - 1]
    # independent: one more model call at the last step's input, then the closed form x - sigma v
    v = adapter.predict(x, sigma.expand(len(x)), cond[tree.prompt_idx[last]], 1.0).float()
    assert torch.allclose(tree.leaf_latents, x - sigma * v, atol=1e-6, rtol=0)
    assert torch.equal(tree.media, adapter.decode(tree.leaf_latents))
    # the edges (the last SDE sample included) are those of the plain rollout; only the leaves differ
    assert torch.equal(tree.x_next, sde.x_next) and torch.equal(tree.log_prob_old, sde.log_prob_old)
    assert torch.equal(sde.leaf_latents, sde.x_next[last]) and not torch.allclose(tree.leaf_latents, sde.leaf_latents)


# ------------------------------------------------------------------------------------------------
# all of them through the rl recipe
# ------------------------------------------------------------------------------------------------
def test_dance_options_through_the_recipe_stay_on_policy(tiny_config, monkeypatch):
    import flowalign.recipes.rl as rl

    trees = []

    def recording_rollout(*args, **kwargs):
        tree = rollout(*args, **kwargs)
        trees.append((args[2], tree))
        return tree

    monkeypatch.setattr(rl, "rollout", recording_rollout)
    tiny_config["sampling"].update(num_steps=4, sampler="dance", noise_level=0.3, timestep_fraction=0.7,
                                   init_same_noise=True, train_steps="random_subset", final_sample="predicted_x0")
    tiny_config["algorithm"].update(clip_range=1e-4, std_estimator="unbiased", std_eps=1e-8)
    tiny_config["eval"].update(samples_per_prompt=1, num_steps=2)
    flowalign.train(tiny_config)
    records = [r for r in read_metrics(os.path.join(tiny_config["output_dir"], "metrics.jsonl")) if "train/loss" in r]
    assert len(records) == 2 and len(trees) == 2
    P, G, k = 2, 4, int(3 * 0.7)  # 2 of steps 0..2 per sample
    for iteration, ((spec, tree), r) in enumerate(zip(trees, records)):
        assert r["train/ratio_first_step_dev"] <= 1e-6
        assert r["rollout/trained_edges"] == P * G * k
        start = tree.x_t[tree.step == 0].view(P, G, -1)
        assert torch.equal(start, start[:, :1].expand_as(start))  # one noise per group
        # the subsets are those of the ("train_steps", iteration, rank) stream: a resumed run redraws them
        expected = _trained_subsets(spec, P * G, stream_generator(0, "train_steps", iteration, 0), torch.device("cpu"))
        assert torch.equal(tree.trainable[tree.leaf_edges], expected)
        assert not torch.allclose(tree.leaf_latents, tree.x_next[tree.leaf_edges[:, -1]])  # x0 rewarded, not the SDE sample


@pytest.mark.parametrize("config, override, key", [
    ("configs/tempflow_grpo/quickstart.yaml", "sampling.init_same_noise=true", "sampling.init_same_noise"),
    ("configs/tempflow_grpo/quickstart.yaml", "sampling.final_sample=predicted_x0", "sampling.final_sample"),
    ("configs/branch_grpo/quickstart.yaml", "sampling.train_steps=random_subset", "sampling.train_steps"),
])
def test_rollout_options_are_refused_where_the_algorithm_would_ignore_them(config, override, key):
    """TempFlow-GRPO builds its own rollouts and BranchGRPO samples trees: the DanceGRPO options are
    refused when the config is loaded, naming the key, instead of being ignored or failing later."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        flowalign.load_config(os.path.join(REPO, config), [override])
