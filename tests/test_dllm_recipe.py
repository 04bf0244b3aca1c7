"""The dLLM RL recipe end to end on the shipped quickstart model: every dLLM algorithm runs 2
iterations through ``flowalign.train`` with its shipped config (first inner-step ratio exactly 1
where the method has a ratio), resume reproduces a straight run, IGPO hints land only in all-wrong
groups, bad configs (and IGPO's settings in their old place, or under another algorithm) give
errors naming the key, and every shipped dLLM config validates."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

import flowalign
from flowalign.config import ConfigError, load_config
from flowalign.algorithms import algorithm_names
from tests.conftest import REPO

QUICKSTART = os.path.join(REPO, "assets", "dllm_quickstart")
DLLM_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "dllm", "*.yaml")))


def tiny_overrides(tmp_path, **extra) -> dict:
    """A 2-iteration run: 2 prompts x 4 rollouts, 8 held-out examples, no TensorBoard."""
    return {
        "output_dir": str(tmp_path / "run"), "device": "cpu",
        "model.pretrained": os.path.join(QUICKSTART, "model"),
        "task.train": os.path.join(QUICKSTART, "train.jsonl"), "task.eval": os.path.join(QUICKSTART, "eval.jsonl"),
        "sampling.prompts_per_iter": 2, "sampling.group_size": 4,
        "train.iterations": 2, "train.resume": "never", "eval.every": 0, "eval.max_examples": 8,
        "logging.progress": False, "logging.tensorboard": False, **extra,
    }


def digit_credit(completion: str, example) -> float:
    """Partial credit: the share of answer positions whose digit is right. Unlike the exact-match
    task reward it almost always spreads within a group of 4, so 2-iteration runs do update."""
    answer = example.answer
    return sum(a == b for a, b in zip(completion, answer)) / len(answer)


def records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name", sorted(algorithm_names(("dllm",))))
def test_every_algorithm_runs_two_iterations_on_the_quickstart_model(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    torch.manual_seed(0)
    summary = flowalign.train(f"configs/dllm/{name}_addition.yaml", tiny_overrides(tmp_path), rewards=digit_credit)
    run = summary["output_dir"]
    train_records = [r for r in records(run) if "train/reward_mean" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    updated = [r for r in train_records if "train/ratio_first_step_dev" in r]
    assert updated, f"{name}: no iteration updated the policy (no reward signal in the tiny run)"
    for r in updated:
        assert r["train/ratio_first_step_dev"] < 1e-5, f"{name}: first inner step ratio deviates from 1"
        assert r["cost/sequence_forwards"] > 0 and r["time/iteration_s"] > 0
    for key in ("eval/accuracy", "eval/reward"):
        assert 0.0 <= summary["after"][key] <= 1.0 and 0.0 <= summary["before"][key] <= 1.0
    for item in ("summary.json", "accuracy_curve.png", "config.yaml", "final", "checkpoints"):
        assert os.path.exists(os.path.join(run, item)), item
    assert "held-out metric" in summary["table"]


def test_resume_reproduces_a_straight_run(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg_path = "configs/dllm/diffu_grpo_addition.yaml"  # random prompt masks: the most stateful estimator
    straight = tiny_overrides(tmp_path / "a", **{"train.iterations": 3})
    flowalign.train(cfg_path, straight, rewards=digit_credit)
    first = tiny_overrides(tmp_path / "b", **{"train.iterations": 2, "train.resume": "auto"})
    flowalign.train(cfg_path, first, rewards=digit_credit)  # stops (and checkpoints) at iteration 2
    flowalign.train(cfg_path, {**first, "train.iterations": 3}, rewards=digit_credit)  # resumes from it
    from safetensors.torch import load_file

    a = load_file(os.path.join(tmp_path / "a" / "run", "final", "model.safetensors"))
    b = load_file(os.path.join(tmp_path / "b" / "run", "final", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    key = "train/reward_mean"
    ra = [r[key] for r in records(str(tmp_path / "a" / "run")) if key in r]
    rb = [r[key] for r in records(str(tmp_path / "b" / "run")) if key in r]
    assert ra == rb and len(ra) == 3


def test_igpo_hints_only_all_wrong_groups_and_keep_the_reference_prefix(tmp_path, monkeypatch):
    from flowalign.algorithms.dllm import DLLMRollouts
    from flowalign.dllm.config import DLLMConfig
    from flowalign.recipes.dllm_rl import DLLMRecipe

    monkeypatch.chdir(REPO)
    # replacement=all, hint tokens never trained: every re-decode replaces its original (the
    # correct-only default is tested in tests/test_fidelity_igpo.py)
    cfg = load_config({"recipe": "dllm", "algorithm": {"name": "igpo", "igpo": {
        "hinted_rollouts": 0.5, "replacement": "all", "hint_entropy_top": 0.0}}},
        {k: v for k, v in tiny_overrides(tmp_path).items()})
    assert isinstance(cfg, DLLMConfig)
    recipe = DLLMRecipe(cfg)
    recipe.setup()
    try:
        examples = recipe.train_examples[:2]
        G, Lg = 4, cfg.sampling.gen_length
        ids, am = recipe.model.pad_prompts(recipe.model.encode([ex.prompt for ex in examples]))
        ids, am = ids.repeat_interleave(G, 0), am.repeat_interleave(G, 0)
        P = ids.shape[1]
        sequences = torch.cat([ids, torch.full((2 * G, Lg), recipe.eos_id)], dim=1)
        rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # group 0 all wrong, group 1 has a hit
        group_ids = torch.arange(2).repeat_interleave(G)
        rollout_examples = [ex for ex in examples for _ in range(G)]
        rollouts = DLLMRollouts(ids, am, None, sequences, rewards, torch.zeros(2 * G, Lg, dtype=torch.bool), group_ids,
                                rollout_examples)
        hinted, metrics = recipe.algorithm.augment_rollouts(recipe, 0, rollouts)
        new_seq, new_rewards, fixed = hinted.sequences, hinted.rewards, hinted.fixed
        assert metrics["igpo/all_wrong_groups"] == 1 and metrics["igpo/hinted_groups"] == 1
        assert fixed[:2].any(dim=1).all() and not fixed[2:].any(), "hints go to the first half of group 0 only"
        assert torch.equal(new_seq[2:], sequences[2:]) and torch.equal(new_rewards[2:], rewards[2:])
        ref = recipe.model.encode([examples[0].reference])[0]
        for row in range(2):
            h = int(fixed[row].sum())
            assert 1 <= h < Lg and fixed[row, :h].all()
            assert new_seq[row, P:P + h].tolist() == ref[:h]
            assert recipe.model.decode(new_seq[row:row + 1, P:])[0].startswith(examples[0].reference[:h])
        assert torch.equal(new_seq[:, :P], sequences[:, :P]), "prompts are untouched"
    finally:
        recipe.cleanup()


def test_kl_to_the_lora_reference_runs_and_is_logged(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    summary = flowalign.train("configs/dllm/diffu_grpo_addition.yaml", tiny_overrides(
        tmp_path, **{"model.lora_rank": 4, "algorithm.kl_beta": 0.1, "algorithm.inner_steps": 2,
                     "train.iterations": 1}), rewards=digit_credit)
    recs = [r for r in records(summary["output_dir"]) if "train/kl" in r]
    assert recs and recs[0]["train/kl"] >= 0.0 and recs[0]["train/ratio_first_step_dev"] < 1e-5
    assert os.path.exists(os.path.join(summary["output_dir"], "final", "adapter_config.json"))


@pytest.mark.parametrize("override, key", [
    ({"algorithm.nam": "gdpo"}, "algorithm.nam"),
    ({"algorithm.name": "gdpoo"}, "algorithm.name"),
    ({"algorithm.estimator": "two_step"}, "algorithm.estimator"),
    ({"sampling.block_length": 2}, "sampling.block_length"),
    ({"sampling.steps": 7}, "sampling.steps"),
    ({"sampling.temperature": 0.0}, "sampling.temperature"),
    ({"sampling.group_size": 1}, "sampling.group_size"),
    ({"task.name": "chess"}, "task.name"),
    ({"task.train": "nowhere/train.jsonl"}, "task.train"),
    ({"model.pretrained": "./no_model_here"}, "model.pretrained"),
    ({"algorithm.name": "just_grpo", "sampling.order": "diffusion"}, "sampling.order"),
    ({"algorithm.name": "mdpo", "algorithm.estimator": "one_step"}, "algorithm.estimator"),
    ({"task.kwargs": {"timeout": 3}}, "task.kwargs"),
    ({"train.optimizer.lr": 0.0}, "train.optimizer.lr"),
])
def test_bad_config_values_name_their_key(override, key, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as err:
        load_config("configs/dllm/quickstart.yaml", override)
    assert str(err.value).startswith(f"{key}:"), str(err.value)


def test_igpo_settings_in_their_old_place_name_the_key_and_where_it_moved(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as err:
        load_config("configs/dllm/igpo_addition.yaml", ["algorithm.hint_fraction=[0.2,0.5]"])
    assert str(err.value).startswith("algorithm.hint_fraction:"), str(err.value)
    assert "algorithm.igpo.hint_fraction" in str(err.value)
    cfg = load_config("configs/dllm/igpo_addition.yaml", ["algorithm.igpo.hint_fraction=[0.2,0.5]"])
    assert cfg.algorithm.igpo.hint_fraction == [0.2, 0.5]


def test_igpo_settings_under_another_algorithm_name_their_key(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as err:
        load_config("configs/dllm/quickstart.yaml", ["algorithm.name=diffu_grpo", "algorithm.igpo.hinted_rollouts=0.3"])
    assert str(err.value).startswith("algorithm.igpo.hinted_rollouts:"), str(err.value)
    with pytest.raises(ConfigError, match=r"^algorithm\.igpo\.hint_fraction: must be \[min, max\]"):
        load_config("configs/dllm/igpo_addition.yaml", ["algorithm.igpo.hint_fraction=[0.6,0.2]"])


def test_batch_arithmetic_is_checked_against_the_number_of_processes(monkeypatch):
    monkeypatch.chdir(REPO)
    load_config("configs/dllm/quickstart.yaml", world_size=2)
    with pytest.raises(ConfigError, match=r"^sampling\.prompts_per_iter: .*divisible by the number of processes \(3\)"):
        load_config("configs/dllm/quickstart.yaml", world_size=3)


@pytest.mark.parametrize("path", DLLM_CONFIGS, ids=os.path.basename)
def test_shipped_dllm_configs_validate(path, monkeypatch):
    monkeypatch.chdir(REPO)
    with open(path) as f:
        text = f.read()
    assert text.startswith("#") and "Launch:" in text and "Batch arithmetic" in text
    quickstart_task = "assets/dllm_quickstart" in text
    cfg = load_config(path, check_files=quickstart_task)  # GPU configs name hub models and local data to fetch
    assert cfg.recipe == "dllm"
    load_config(path, check_files=False, world_size=2)
    b = cfg.global_batch()
    assert b["rollouts"] == cfg.sampling.prompts_per_iter * cfg.sampling.group_size


def test_on_policy_check_refuses_a_ratio_away_from_one(tmp_path, monkeypatch):
    from flowalign.recipes.dllm_rl import DLLMRecipe

    monkeypatch.chdir(REPO)
    recipe = DLLMRecipe(load_config("configs/dllm/quickstart.yaml", tiny_overrides(tmp_path)))
    recipe._check_on_policy(0.0)
    with pytest.raises(RuntimeError, match="ratio_tolerance"):
        recipe._check_on_policy(1e-3)


def test_on_policy_check_runs_before_the_first_optimizer_step_and_once_per_update(tmp_path, monkeypatch):
    """The first inner step's max |ratio - 1| reaches the check with that step's single transfer
    (Recipe.optimizer_step), before the weights change: a refusal leaves them untouched."""
    from flowalign.recipes.dllm_rl import DLLMRecipe

    monkeypatch.chdir(REPO)
    cfg = load_config("configs/dllm/quickstart.yaml", tiny_overrides(tmp_path, **{"sampling.prompts_per_iter": 4,
                                                                          "algorithm.inner_steps": 4}))
    recipe = DLLMRecipe(cfg, rewards=digit_credit)
    recipe.setup()
    try:
        def refuse(dev: float) -> None:
            raise RuntimeError("refused")

        recipe._check_on_policy = refuse
        before = {k: v.clone() for k, v in recipe.model.state_dict().items()}
        with pytest.raises(RuntimeError, match="refused"):
            recipe.train_iteration(0)
        assert all(torch.equal(before[k], v) for k, v in recipe.model.state_dict().items()), "weights changed"
        recipe.optimizer.zero_grad(set_to_none=True)  # the refused step's gradients

        seen, steps = [], []
        optimizer_step = recipe.optimizer_step
        recipe.optimizer_step = lambda *a, **k: steps.append(1) or optimizer_step(*a, **k)
        recipe._check_on_policy = seen.append
        metrics = recipe.train_iteration(0)
        assert len(steps) == recipe.cfg.algorithm.inner_steps == 4 and seen == [metrics["train/ratio_first_step_dev"]]
        assert metrics["train/ratio_first_step_dev"] < 1e-5
    finally:
        recipe.cleanup()


def test_two_process_run_keeps_ranks_in_lockstep_when_one_has_no_rows(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU), one prompt per rank: in some
    iterations rank 0's group has no reward spread (no rows to train) while rank 1's has; both ranks
    must still take the same optimizer step (gradients summed by hand, not by DDP's per-forward
    reducer), so the run finishes, on-policy at every first inner step."""
    import subprocess
    import sys

    out_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flowalign", "train",
           os.path.join(REPO, "configs", "dllm", "quickstart.yaml"), f"output_dir={out_dir}", "train.iterations=4",
           "sampling.prompts_per_iter=2", "eval.max_examples=20", "eval.every=0", "logging.progress=false",
           # without a KL term a group with no reward spread has no row to train (d1's beta 0.04 trains every row)
           "algorithm.kl_beta=0",
           "logging.tensorboard=false"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "num_processes=2" in out.stdout + out.stderr, "the run did not see two processes"
    assert json.load(open(out_dir / "summary.json"))["iterations"] == 4
    steps = [r for r in records(str(out_dir)) if "train/ratio_first_step_dev" in r]
    assert steps and all(r["train/ratio_first_step_dev"] <= 1e-6 for r in steps)
    # the case this guards: rank 0 trained nothing while the update was not skipped (rank 1 had rows)
    assert any(r["train/trained_rows"] == 0 for r in steps), [r["train/trained_rows"] for r in steps]
