"""The tree, dense, value, window, preference and multi-reward presets of the RL recipe:
pure pieces against hand-worked values, and every shipped algorithm config for 2 iterations on the
shipped quickstart model (the real adapter, rewards and judge)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from flowalign.config import ConfigError, load_config
from flowalign.estimators.dense import dense_step_advantages, vgpo_advantages
from flowalign.algorithms.dense_grpo import dense_targets, lookahead_table
from flowalign.algorithms.vgpo import VGPOConfig, vgpo_targets
from flowalign.estimators.tree import noise_aware_weights
from flowalign.rollout import integrate_ode, lookahead_sigmas
from flowalign.rollout.schedules import mix_window
from flowalign.training.metrics import read_metrics
from tests.conftest import REPO

ALGORITHM_CONFIGS = ["branch_grpo", "tempflow_grpo", "dense_grpo", "vgpo", "mix_grpo", "pref_grpo", "multi_reward", "loop"]
#: image / video algorithms whose two-iteration run lives in a test file of their own
OWN_TEST_FILES = {"grpo": "test_recipe.py", "awm": "test_awm.py", "diffusion_nft": "test_diffusion_nft.py",
                  "sage_grpo": "test_algo_sage_grpo.py", "find": "test_algo_find_gdro.py", "gdro": "test_algo_find_gdro.py",
                  "d3po": "test_algo_dpo.py", "diffusion_dpo": "test_algo_dpo.py", "grpo_guard": "test_algo_guard_dgpo.py",
                  "dgpo": "test_algo_guard_dgpo.py", "mix_grpo_flash": "test_algo_mix_grpo_flash.py"}


# ------------------------------------------------------------------------------------------------
# MixGRPO window schedules
# ------------------------------------------------------------------------------------------------
def test_progressive_window_hand_example():
    # T = 6, w = 3: starts 0..3, 2 iterations each, then roll back. Default geometry (MixGRPO's,
    # window_end="reference"): windows cut at T - 2 = 4 -> [0,3) [1,4) [2,4) [3,4); "full": [2,5) [3,6)
    starts = [mix_window(i, 6, strategy="progressive", size=3, shift_every=2)[0] for i in range(10)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
    assert [mix_window(i, 6, strategy="progressive", size=3, shift_every=2, window_end="full")[0] for i in range(10)] == starts
    assert mix_window(5, 6, strategy="progressive", size=3, shift_every=2) == (2, 4)
    assert mix_window(5, 6, strategy="progressive", size=3, shift_every=2, window_end="full") == (2, 5)
    stay = [mix_window(i, 6, strategy="progressive", size=3, shift_every=2, roll_back=False)[0] for i in range(10)]
    assert stay == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    # stride 2: the reference's cursor 4 = T - 2 has an empty window and is skipped; "full" goes to 4
    assert [mix_window(i, 6, strategy="progressive", size=2, shift_every=1, stride=2)[0] for i in range(4)] == [0, 2, 0, 2]
    assert [mix_window(i, 6, strategy="progressive", size=2, shift_every=1, stride=2, window_end="full")[0]
            for i in range(4)] == [0, 2, 4, 0]


def test_decay_windows_spend_fewer_iterations_on_later_positions():
    # geometry "full", decay from shift_every (max_shift_every=None): linear decay from 4 (start 0) to 1
    # (last start 3): intervals 4, 3, 2, 1 (the reference geometry: tests/test_fidelity_mix_window.py)
    starts = [mix_window(i, 5, strategy="decay", size=2, shift_every=4, min_shift_every=1, window_end="full",
                         max_shift_every=None)[0] for i in range(11)]
    assert starts == [0] * 4 + [1] * 3 + [2] * 2 + [3] + [0]
    # exponential, MixGRPO's ceil (grpo_states.py line 83): ceil(8 exp(-1 * max(0, s - 1))) = 8, 8, 3, 2
    starts = [mix_window(i, 4, strategy="exp_decay", size=1, shift_every=8, min_shift_every=1, decay_rate=1.0,
                         decay_start=1, window_end="full")[0] for i in range(21)]
    expected = [math.ceil(8 * math.exp(-max(0, s - 1))) for s in range(4)]
    assert expected == [8, 8, 3, 2] and starts == [0] * 8 + [1] * 8 + [2] * 3 + [3] * 2
    # the former rounding, still offered: round(...) = 8, 8, 3, 1
    starts = [mix_window(i, 4, strategy="exp_decay", size=1, shift_every=8, min_shift_every=1, decay_rate=1.0,
                         decay_start=1, rounding="round", window_end="full")[0] for i in range(20)]
    assert starts == [0] * 8 + [1] * 8 + [2] * 3 + [3]


def test_random_window_is_reproducible_and_in_range():
    draw = lambda seed, end="reference": mix_window(0, 10, strategy="random", size=4, window_end=end,  # noqa: E731
                                                    generator=torch.Generator().manual_seed(seed))
    assert draw(3) == draw(3)
    # MixGRPO: rng.integers(0, max_timesteps - group_size + 1) with max_timesteps = T - 2 = 8 -> starts 0..4
    assert {draw(s)[0] for s in range(60)} == set(range(5)) and all(e - s == 4 for s, e in map(draw, range(20)))
    assert {draw(s, "full")[0] for s in range(60)} == set(range(7))
    with pytest.raises(ValueError, match="window size"):
        mix_window(0, 3, strategy="progressive", size=4)
    with pytest.raises(ValueError, match="unknown window strategy"):
        mix_window(0, 3, strategy="none", size=1)


# ------------------------------------------------------------------------------------------------
# look-ahead schedule and ODE integration
# ------------------------------------------------------------------------------------------------
def test_lookahead_sigmas_hand_example():
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert torch.equal(lookahead_sigmas(sigmas, 2), torch.tensor([0.6, 0.4, 0.2, 0.0]))
    assert torch.equal(lookahead_sigmas(sigmas, 2, 1), torch.tensor([0.6, 0.0]))
    assert torch.equal(lookahead_sigmas(sigmas, 0, 2), torch.tensor([1.0, 0.6, 0.0]))  # indices 0, 2.5->2 (half to even), 5
    assert torch.equal(lookahead_sigmas(sigmas, 4, 3), torch.tensor([0.2, 0.0]))


def test_one_step_projection_and_full_ode_match_the_adapter(tiny_model_dir):
    from flowalign.pipelines.toy import ToyAdapter
    from flowalign.rollout import sample_ode

    adapter = ToyAdapter.from_pretrained(tiny_model_dir)
    cond = adapter.encode(["a handwritten one", "the digit three"])
    x = adapter.init_latents(2, torch.Generator().manual_seed(0))
    sigmas = adapter.sigmas(4)
    with torch.no_grad():
        v = adapter.predict(x, sigmas[0].expand(2), cond, 1.0)
        projected = integrate_ode(adapter, cond, x, lookahead_sigmas(sigmas, 0, 1))
        assert torch.allclose(projected, x - sigmas[0] * v.float(), atol=1e-6)  # x̂0 = x_t − σ_t v
        assert torch.equal(integrate_ode(adapter, cond, x, sigmas), sample_ode(adapter, cond, 4, latents=x))


def test_rollout_velocities_are_the_first_lookahead_step(tiny_model_dir):
    """The velocity a rollout stores per edge is the model's at that edge's x_t, so a look-ahead
    that reuses it ends where a recomputed one does (one model evaluation fewer per edge)."""
    from flowalign.pipelines.toy import ToyAdapter
    from flowalign.rollout import BranchSpec, rollout

    adapter = ToyAdapter.from_pretrained(tiny_model_dir)
    prompts = ["a handwritten one", "the digit three"]
    cond = adapter.encode(prompts)
    spec = BranchSpec(num_steps=4, noise_levels=(0.7,) * 4, samples_per_prompt=1, splits=((1, 2),))
    tree = rollout(adapter, cond, spec, prompts=prompts, generator=torch.Generator().manual_seed(0),
                   keep_velocities=True, decode=False)
    assert tree.velocity.shape == tree.x_t.shape
    with torch.no_grad():
        v = adapter.predict(tree.x_t, tree.sigmas[tree.step], cond[tree.prompt_idx], 1.0).float()
        assert torch.allclose(tree.velocity, v, atol=1e-5)
        edges = (tree.step == 1).nonzero().squeeze(1)
        sig = lookahead_sigmas(tree.sigmas, 1)
        recomputed = integrate_ode(adapter, cond[tree.prompt_idx[edges]], tree.x_t[edges], sig)
        reused = integrate_ode(adapter, cond[tree.prompt_idx[edges]], tree.x_t[edges], sig,
                               first_velocity=tree.velocity[edges])
    assert torch.allclose(reused, recomputed, atol=1e-5)
    with pytest.raises(ValueError, match="first_velocity has shape"):
        integrate_ode(adapter, cond, tree.x_t[:2], sig, first_velocity=tree.velocity[:1])


# ------------------------------------------------------------------------------------------------
# presets on a hand-built flat tree (2 leaves, 2 steps, one group)
# ------------------------------------------------------------------------------------------------
def _flat_tree():
    from flowalign.types import RolloutTree

    E, L = 4, 2
    z = torch.zeros(E, 1)
    return RolloutTree(
        prompt_idx=torch.zeros(E, dtype=torch.long), parent=torch.tensor([-1, -1, 0, 1]), step=torch.tensor([0, 0, 1, 1]),
        x_t=z, x_next=z, log_prob_old=torch.zeros(E), noise_std=torch.ones(E), trainable=torch.ones(E, dtype=torch.bool),
        leaf_prompt_idx=torch.zeros(L, dtype=torch.long), leaf_group=torch.zeros(L, dtype=torch.long),
        leaf_edges=torch.tensor([[0, 2], [1, 3]]), leaf_latents=torch.zeros(L, 1), prompts=["p"],
        sigmas=torch.tensor([1.0, 0.5, 0.0]), nfe=4,
    )


LOOKAHEAD = torch.tensor([0.2, 0.4, 0.5, 0.3])  # R(ODE from x_t) of each edge
VGPO_OPTIONS = VGPOConfig(discount=0.5, value_anchor=0.5, anchor_steps=None)


def test_dense_preset_hand_example():
    tree, rewards = _flat_tree(), torch.tensor([0.9, 0.1])
    table = lookahead_table(LOOKAHEAD, tree, rewards)
    assert torch.allclose(table, torch.tensor([[0.2, 0.5, 0.9], [0.4, 0.3, 0.1]]))
    # gains: leaf 0 (+0.3, +0.4), leaf 1 (-0.1, -0.2); per step ± (population std = half the gap)
    targets = dense_targets(table, tree, adv_clip=5.0)
    eps = 1e-4
    a0, a1 = 0.2 / (0.2 + eps), 0.3 / (0.3 + eps)
    assert torch.allclose(targets.advantages, torch.tensor([a0, -a0, a1, -a1]), atol=1e-6)
    assert torch.equal(targets.advantages[tree.leaf_edges], dense_step_advantages(table, tree.leaf_group, clip=5.0))


def test_vgpo_preset_maps_the_estimator_onto_edges():
    tree, rewards = _flat_tree(), torch.tensor([0.9, 0.1])
    table = lookahead_table(LOOKAHEAD, tree, rewards)
    targets = vgpo_targets(table, tree, rewards, VGPO_OPTIONS, adv_clip=5.0)
    expected = vgpo_advantages(lookahead_table(LOOKAHEAD, tree, rewards)[:, :-1], rewards, tree.leaf_group, gamma=0.5, alpha=0.5)
    assert torch.allclose(targets.advantages[tree.leaf_edges], expected.clamp(-5, 5))
    # equal rewards and look-aheads: the group signal collapses, the value anchor does not
    flat_rewards = torch.tensor([0.6, 0.6])
    flat = vgpo_targets(lookahead_table(torch.full((4,), 0.6), tree, flat_rewards), tree, flat_rewards, VGPO_OPTIONS, adv_clip=5.0)
    assert bool((flat.advantages > 0).all())
    with pytest.raises(ValueError, match="lookahead"):
        lookahead_table(torch.zeros(3), tree, rewards)


def test_digit_pairwise_judge_is_bradley_terry_on_the_classifier():
    from flowalign.rewards.digits import DigitClassifierReward, DigitPairwiseJudge

    path = os.path.join(REPO, "assets", "quickstart", "digit-classifier")
    judge, classifier = DigitPairwiseJudge(path, temperature=0.1), DigitClassifierReward(path)
    media = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["the digit one"] * 2
    p = judge.compare(media[:2], media[2:], prompts)
    s = classifier(media, prompts * 2).scores
    assert torch.allclose(p, torch.sigmoid((s[:2] - s[2:]) / 0.1), atol=1e-6)
    assert torch.allclose(judge.compare(media[:2], media[:2], prompts), torch.full((2,), 0.5))


# ------------------------------------------------------------------------------------------------
# config validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, key", [
    (["algorithm.name=nope"], "algorithm.name"),
    (["algorithm.name=branch_grpo", "algorithm.branch_grpo.splits=[[2,3]]"], "sampling.group_size"),
    (["algorithm.name=branch_grpo", "algorithm.branch_grpo.splits=[[12,2]]"], "algorithm.branch_grpo.splits[0]"),
    (["algorithm.tempflow_grpo.branch_steps=[1]"], "algorithm.tempflow_grpo.branch_steps"),
    (["algorithm.name=tempflow_grpo", "algorithm.tempflow_grpo.branch_steps=[]"], "algorithm.tempflow_grpo.branch_steps"),
    (["algorithm.name=mix_grpo", "sampling.sde_window=[0,4]"], "sampling.sde_window"),
    (["algorithm.name=mix_grpo", "algorithm.mix_grpo.strategy=sideways"], "algorithm.mix_grpo.strategy"),
    (["algorithm.dense_grpo.calibrate_noise=true"], "algorithm.dense_grpo.calibrate_noise"),
    (["algorithm.name=branch_grpo", "algorithm.branch_grpo.prune=some"], "algorithm.branch_grpo.prune"),
    (["algorithm.name=multi_reward"], "rewards"),
    (["algorithm.name=pref_grpo"], "rewards"),
    # flowalign 0.1 spellings name the key and where it moved
    (["algorithm.advantage=dense"], "algorithm.advantage"),
    (["sampling.splits=[[2,2]]"], "sampling.splits"),
    (["sampling.window.strategy=progressive"], "sampling.window.strategy"),
    (["algorithm.reward_normalization=decoupled"], "algorithm.reward_normalization"),
])
def test_preset_errors_name_the_key(monkeypatch, overrides, key):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=f"^{key.replace('[', '[[]')}:"):
        load_config("configs/quickstart.yaml", overrides)


# ------------------------------------------------------------------------------------------------
# every shipped algorithm: 2 iterations on the quickstart model
# ------------------------------------------------------------------------------------------------
def _train(name: str, tmp_path, extra: dict | None = None):
    import flowalign

    overrides = {"train.iterations": 2, "data.prompts_per_iter": 2, "output_dir": str(tmp_path / name),
                 "eval.samples_per_prompt": 1, "eval.every": 0, "logging.progress": False, "logging.tensorboard": False,
                 "train.checkpoint_every": 0, **(extra or {})}
    summary = flowalign.train(os.path.join(REPO, "configs", name, "quickstart.yaml"), overrides)
    return summary, [r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("name", ALGORITHM_CONFIGS)
def test_every_algorithm_runs_two_iterations_on_policy(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    summary, records = _train(name, tmp_path)
    assert len(records) == 2 and summary["after"]["eval/reward"] >= 0
    cfg = load_config(os.path.join(REPO, "configs", name, "quickstart.yaml"))
    flat_nfe = 2 * cfg.sampling.group_size * cfg.sampling.num_steps
    for r in records:
        assert r["train/ratio_first_step_dev"] < 1e-5  # on-policy at the first inner step
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/grad_norm", "train/reward_mean"))
    nfe = [r["rollout/nfe"] for r in records]
    trained = [r["rollout/trained_edges"] for r in records]
    if name == "branch_grpo":  # 2 trees x (1+1+1+2+2+4+4+8+8+8); best/worst paths of steps 0-5: 2 x (6 + 6 - 2)
        assert nfe == [78.0, 78.0] and trained == [20.0, 20.0]
    elif name == "tempflow_grpo":  # branch at step k = 0, then 1: k + 1 trunk evaluations + 8 children x (9 - k)
        assert nfe == [2 * (1 + 72), 2 * (2 + 64)] and trained == [16.0, 16.0]
    elif name == "dense_grpo":  # 16 samples x (10 steps + look-aheads of 10..1 steps, the first reused: 55 - 10)
        assert nfe == [16 * (10 + 45)] * 2
        levels = [[r[f"rollout/noise_level_{t}"] for t in range(10)] for r in records]
        assert all(abs(abs(a - 0.7) - 0.01) < 1e-6 for a in levels[0])  # every psi(t) moved by epsilon_2
    elif name == "vgpo":  # one-step projections reuse the rollout's velocities: no extra evaluation
        assert nfe == [flat_nfe] * 2
    elif name == "mix_grpo":  # window of 4 steps: 16 samples x 4 trained edges
        assert nfe == [flat_nfe] * 2 and trained == [64.0, 64.0]
    else:
        assert nfe == [flat_nfe] * 2 and trained == [96.0, 96.0]


def test_tempflow_noise_aware_weights_scale_the_loss(tmp_path, monkeypatch):
    """The iteration's loss is scaled by its branch step's std·√Δ relative to the schedule's mean over steps
    0..T-2 (TempFlow-GRPO's 2.25 = 1 / that mean; tests/test_fidelity_multi_tempflow.py)."""
    from flowalign.recipes.rl import RLRecipe

    monkeypatch.chdir(REPO)
    cfg = load_config("configs/tempflow_grpo/quickstart.yaml", {"output_dir": str(tmp_path / "t"), "logging.progress": False})
    recipe = RLRecipe(cfg)
    recipe.setup()
    try:
        sigmas = recipe.adapter.sigmas(10)
        sig, nxt = sigmas[:9], sigmas[1:10]
        stds = 0.7 * torch.sqrt(sig / (1 - torch.where(sig == 1, sigmas[1], sig))) * torch.sqrt(sig - nxt)  # Flow-GRPO std
        expected = noise_aware_weights(stds)[:6]  # normalised over every branchable step 0..8, branch_steps 0..5 trained
        from flowalign.rollout import rollout

        weights = []
        for it in range(6):
            spec = recipe.algorithm.rollout_spec(it, recipe.world)
            tree = rollout(recipe.adapter, recipe.adapter.encode(["the digit one"]), spec, prompts=["the digit one"],
                           generator=torch.Generator().manual_seed(it), decode=False)
            weights.append(recipe.algorithm.branch_step_weight(tree))
        assert torch.allclose(torch.tensor(weights), expected, rtol=1e-4)
        assert weights[0] > weights[-1]  # early, noisy steps weigh more
    finally:
        recipe.cleanup()


@pytest.mark.slow
def test_dense_calibration_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    _, straight = _train("dense_grpo", tmp_path / "a", {"sampling.num_steps": 4, "eval.num_steps": 4, "algorithm.dense_grpo.calibration_rate": 0.05})
    _train("dense_grpo", tmp_path / "b", {"sampling.num_steps": 4, "eval.num_steps": 4, "algorithm.dense_grpo.calibration_rate": 0.05,
                                          "train.iterations": 1, "train.checkpoint_every": 1})
    _, resumed = _train("dense_grpo", tmp_path / "b", {"sampling.num_steps": 4, "eval.num_steps": 4,
                                                      "algorithm.dense_grpo.calibration_rate": 0.05, "train.checkpoint_every": 1})
    keys = [f"rollout/noise_level_{t}" for t in range(4)] + ["train/reward_mean", "train/loss"]
    assert [straight[1][k] for k in keys] == pytest.approx([resumed[-1][k] for k in keys], abs=1e-6)


def test_moved_keys_name_their_new_place(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"^sampling\.splits: this key moved to algorithm\.branch_grpo\.splits"):
        load_config("configs/quickstart.yaml", ["sampling.splits=[[2,2]]"])
    with pytest.raises(ConfigError, match=r"^algorithm\.advantage: this key moved to algorithm\.name \(.*branch -> branch_grpo"):
        load_config({"algorithm": {"advantage": "branch"}}, check_files=False)


def test_fields_of_another_algorithm_are_refused(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"^algorithm\.vgpo\.discount: only used by algorithm\.name=vgpo, but the run's algorithm is 'grpo'"):
        load_config("configs/quickstart.yaml", ["algorithm.vgpo.discount=0.5"])


def test_every_registered_image_algorithm_has_a_shipped_config(monkeypatch):
    from flowalign.algorithms import ALGORITHMS

    monkeypatch.chdir(REPO)
    image = {name: cls for name, cls in ALGORITHMS.items() if cls.recipe != "dllm"}
    assert set(image) == {*OWN_TEST_FILES, *ALGORITHM_CONFIGS}
    assert all(os.path.isfile(os.path.join(REPO, "tests", f)) for f in OWN_TEST_FILES.values())
    for name, cls in image.items():
        cfg = load_config(cls.config_file)
        assert cfg.algorithm.name == name and cfg.recipe == cls.recipe


# ------------------------------------------------------------------------------------------------
# the on-policy check's tolerance (algorithm.ratio_tolerance: null = by device and precision)
# ------------------------------------------------------------------------------------------------
def test_ratio_tolerance_default_depends_on_device_and_precision(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from flowalign.guards import resolve_ratio_tolerance
    from flowalign.recipes.base import Recipe

    assert resolve_ratio_tolerance(None, "cpu", torch.float32) == 1e-5
    assert resolve_ratio_tolerance(None, "cpu", torch.float64) == 1e-5
    assert resolve_ratio_tolerance(None, "cuda", torch.float32) == 1e-4  # cuBLAS / TF32 kernels differ by batch shape
    assert resolve_ratio_tolerance(None, "mps", torch.float32) == 1e-4
    for device in ("cpu", "cuda"):
        assert resolve_ratio_tolerance(None, device, torch.bfloat16) == resolve_ratio_tolerance(None, device, torch.float16) == 1e-2
        assert resolve_ratio_tolerance(3e-6, device, torch.bfloat16) == 3e-6  # a number is used as given
    # what a recipe passes: the model's dtype, overridden by FSDP2's param_dtype, overridden by autocast
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/quickstart.yaml", {"output_dir": str(tmp_path)})
    assert cfg.algorithm.ratio_tolerance is None
    recipe = Recipe(cfg)
    recipe.accelerator = SimpleNamespace(device=torch.device("cuda"))
    assert recipe.compute_dtype() == torch.float32 and recipe.ratio_tolerance() == 1e-4
    recipe.fsdp = SimpleNamespace(param_dtype=torch.bfloat16)
    assert recipe.compute_dtype() == torch.bfloat16 and recipe.ratio_tolerance() == 1e-2
    recipe.fsdp = None
    cfg.train.mixed_precision = "fp16"
    assert recipe.compute_dtype() == torch.float16
    cfg.train.mixed_precision, cfg.model.dtype = "no", "bfloat16"
    assert recipe.compute_dtype() == torch.bfloat16
    recipe.accelerator = SimpleNamespace(device=torch.device("cpu"))
    cfg.model.dtype = "float32"
    assert recipe.ratio_tolerance() == 1e-5
    cfg.algorithm.ratio_tolerance = 2e-5
    assert recipe.ratio_tolerance() == 2e-5
    with pytest.raises(ConfigError, match="algorithm.ratio_tolerance"):
        load_config("configs/quickstart.yaml", {"algorithm.ratio_tolerance": 0})
