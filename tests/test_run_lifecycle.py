"""A run you can trust: what train / eval / the Python API do with a run directory, stop signals,
CPU threads and the CLI's short errors. Each test reproduces a defect seen on a fresh clone."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import flowalign
from flowalign.cli import main
from flowalign.errors import RunDirError, TrainingInterrupted
from flowalign.training.accel import configure_threads
from flowalign.training.metrics import read_metrics
from flowalign.training.rundir import changed_settings, check_run_dir, run_settings
from tests.conftest import REPO


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _write_yaml(tmp_path, cfg: dict) -> str:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _train_steps(run_dir: str) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "train/reward_mean" in r]


def _assert_same_run(run_a: str, run_b: str) -> None:
    """Bit-identical final weights and identical metrics (timings aside) of two runs."""
    weights = [load_file(os.path.join(run, "final", "unet", "diffusion_pytorch_model.safetensors")) for run in (run_a, run_b)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    untimed = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(run)] for run in (run_a, run_b)]
    assert untimed[0] == untimed[1]


def _no_model_load(monkeypatch):
    """Fail the test if any adapter loads a model (the run-directory checks come first)."""
    from flowalign.pipelines.toy import ToyAdapter

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ToyAdapter, "from_pretrained", classmethod(refuse))


# --------------------------------------------------------------------------------- eval (defect 1)


def test_eval_neither_reads_nor_writes_the_run_directory(tiny_config, tiny_model_dir, tmp_path, capsys):
    summary = flowalign.train(tiny_config)
    run = tiny_config["output_dir"]
    files = ["config.yaml", "metrics.jsonl", "summary.json", "run.json"]
    before = {f: _digest(os.path.join(run, f)) for f in files}
    path = _write_yaml(tmp_path, tiny_config)
    out = tmp_path / "scores.json"
    capsys.readouterr()
    assert main(["eval", path, f"model.pretrained={tiny_model_dir}", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    # the base model's score, not the trained run's (which eval used to resume)
    assert scores["eval/reward"] == pytest.approx(summary["before"]["eval/reward"], abs=1e-6)
    assert scores["eval/reward"] != pytest.approx(summary["after"]["eval/reward"], abs=1e-9)
    assert {f: _digest(os.path.join(run, f)) for f in files} == before
    assert json.loads(capsys.readouterr().out) == scores


# ---------------------------------------------------------------- resuming a run (defects 2 and 3)


def test_changed_setting_is_refused_before_any_model_loads(tiny_config, tmp_path, monkeypatch, capsys):
    flowalign.train(tiny_config)
    run = tiny_config["output_dir"]
    config_yaml = _digest(os.path.join(run, "config.yaml"))
    path = _write_yaml(tmp_path, tiny_config)
    _no_model_load(monkeypatch)
    rc = main(["train", path, "train.iterations=4", "sampling.noise_level=0.5", "algorithm.clip_range=0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "sampling.noise_level: 0.7 in the run -> 0.5 now" in err and "algorithm.clip_range" in err
    assert "train.iterations" not in err.split("Changed:")[1]  # may change: continues the run
    assert "output_dir=" in err and "train.resume=never" in err
    assert _digest(os.path.join(run, "config.yaml")) == config_yaml


def test_raising_iterations_continues_a_finished_run(tiny_config, tmp_path):
    flowalign.train(tiny_config)
    run = tiny_config["output_dir"]
    assert _train_steps(run) == [1, 2]
    path = _write_yaml(tmp_path, tiny_config)
    assert main(["train", path, "train.iterations=3"]) == 0
    assert _train_steps(run) == [1, 2, 3]
    summary = json.loads(open(os.path.join(run, "summary.json")).read())
    assert summary["iterations"] == 3


def test_finished_run_is_reported_not_retrained(tiny_config, tmp_path, monkeypatch, capsys):
    first = flowalign.train(tiny_config)
    metrics = _digest(os.path.join(tiny_config["output_dir"], "metrics.jsonl"))
    _no_model_load(monkeypatch)
    capsys.readouterr()
    assert main(["train", _write_yaml(tmp_path, tiny_config)]) == 0
    out = capsys.readouterr().out
    assert "already finished 2/2 iterations: nothing to train" in out and "held-out metric" in out
    assert _digest(os.path.join(tiny_config["output_dir"], "metrics.jsonl")) == metrics
    again = flowalign.train(tiny_config)
    assert again["after"] == first["after"]


def test_iterations_below_the_checkpoint_are_refused(tiny_config, monkeypatch):
    flowalign.train(tiny_config)
    _no_model_load(monkeypatch)
    with pytest.raises(RunDirError, match="past train.iterations=1"):
        flowalign.train(tiny_config, {"train.iterations": 1})


def brightness(media, prompts, metadata=None):
    return media.mean(dim=(1, 2, 3))


def test_python_api_without_output_dir_never_reuses_a_run(tiny_config, tmp_path, monkeypatch, capsys):
    config_file = _write_yaml(tmp_path, tiny_config)  # output_dir comes from the file, not from the caller
    first = flowalign.train(config_file)
    second = flowalign.train(config_file, {"train.iterations": 1}, rewards=brightness)
    run = tiny_config["output_dir"]
    assert first["output_dir"] == run and second["output_dir"] == run + "-2"
    assert "holds another run: writing to" in capsys.readouterr().out
    assert _train_steps(run) == [1, 2] and _train_steps(run + "-2") == [1]
    assert json.loads(open(os.path.join(run, "summary.json")).read())["after"] == first["after"]
    # an explicit output_dir continues that run, and the Python reward is part of its settings
    _no_model_load(monkeypatch)
    with pytest.raises(RunDirError, match="python:tests.test_run_lifecycle.brightness"):
        flowalign.train(config_file, output_dir=run, rewards=brightness)


def test_resume_never_starts_over_and_removes_the_old_run(tiny_config, tmp_path, capsys):
    flowalign.train(tiny_config)
    run = tiny_config["output_dir"]
    keep = os.path.join(run, "notes.txt")
    open(keep, "w").write("mine")
    flowalign.train(tiny_config, {"train.resume": "never", "train.iterations": 1, "sampling.noise_level": 0.5})
    assert "removed the previous run's checkpoints" in capsys.readouterr().out
    assert _train_steps(run) == [1]
    assert os.listdir(os.path.join(run, "checkpoints")) and open(keep).read() == "mine"
    assert json.load(open(os.path.join(run, "run.json")))["settings"]["sampling.noise_level"] == 0.5


def test_run_settings_ignore_only_continuable_keys(tiny_config):
    from flowalign.config import load_config

    base = run_settings(load_config(tiny_config))
    changed = copy.deepcopy(tiny_config)
    changed["train"].update(iterations=9, checkpoint_every=3)
    changed["eval"]["every"] = 5
    changed["logging"]["progress"] = True
    changed["output_dir"] = "elsewhere"
    assert changed_settings(base, run_settings(load_config(changed))) == []
    changed["train"]["optimizer"] = {"lr": 0.5}
    changed["eval"]["samples_per_prompt"] = 4
    keys = [k for k, _, _ in changed_settings(base, run_settings(load_config(changed)))]
    assert keys == ["eval.samples_per_prompt", "train.optimizer.lr"]


def test_all_checkpoints_broken_is_refused_not_restarted(tiny_config, monkeypatch):
    from flowalign.errors import CheckpointError

    tiny_config["train"]["checkpoint_every"] = 1
    flowalign.train(tiny_config)
    run = tiny_config["output_dir"]
    ckpts = os.path.join(run, "checkpoints")
    for name in os.listdir(ckpts):
        if name.startswith("step-"):
            os.remove(os.path.join(ckpts, name, "state.json"))
    metrics = _digest(os.path.join(run, "metrics.jsonl"))
    _no_model_load(monkeypatch)
    with pytest.raises(CheckpointError, match="step-000002"):
        flowalign.train(tiny_config, {"train.iterations": 3})
    assert _digest(os.path.join(run, "metrics.jsonl")) == metrics


# ------------------------------------------------------------------------------- signals (defect 5)


class _SignalOnCall:
    """Mean brightness; sends ``signum`` to this process on the n-th call (mid-iteration)."""

    name, modality = "brightness", "image"

    def __init__(self, signum: int, on_call: int):
        self.calls, self.signum, self.on_call = 0, signum, on_call

    def __call__(self, media, prompts, metadata=None):
        self.calls += 1
        if self.calls == self.on_call:
            os.kill(os.getpid(), self.signum)
        return media.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_iteration_checkpoints_and_resumes_exactly(tiny_config, tmp_path, signum, code):
    tiny_config["train"].update(iterations=4, checkpoint_every=0)
    straight = dict(tiny_config, output_dir=str(tmp_path / "straight"))
    flowalign.train(straight, rewards=_SignalOnCall(signum, on_call=0))

    stopped = dict(tiny_config, output_dir=str(tmp_path / "stopped"))
    reward = _SignalOnCall(signum, on_call=3)  # call 1 is the before-evaluation, 3 is iteration 2
    with pytest.raises(TrainingInterrupted, match="stopped at iteration 2/4") as info:
        flowalign.train(stopped, rewards=reward)
    assert info.value.exit_code == code
    assert os.path.isdir(os.path.join(stopped["output_dir"], "checkpoints", "step-000002"))
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # handlers restored
    flowalign.train(stopped, rewards=_SignalOnCall(signum, on_call=0))
    _assert_same_run(straight["output_dir"], stopped["output_dir"])


def test_sigterm_from_outside_exits_143_with_one_line(tiny_config, tmp_path):
    tiny_config["train"].update(iterations=500)
    path = _write_yaml(tmp_path, tiny_config)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "flowalign", "train", path], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(tiny_config["output_dir"], "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(_train_steps(tiny_config["output_dir"])) >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "stopped at iteration" in err and "Run the same command again" in err
    step = _train_steps(tiny_config["output_dir"])[-1]
    assert os.path.isdir(os.path.join(tiny_config["output_dir"], "checkpoints", f"step-{step:06d}"))


# -------------------------------------------------------------------------------- threads (defect 8)


def test_configure_threads(monkeypatch):
    old = torch.get_num_threads()
    try:
        assert configure_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert configure_threads(0) == 4 and torch.get_num_threads() == 4  # 8 cores shared by 2 processes
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
        assert configure_threads(0) == 1
    finally:
        torch.set_num_threads(old)


def test_every_recipe_sets_its_threads(tiny_config):
    old = torch.get_num_threads()
    try:
        flowalign.train(tiny_config, {"num_threads": 1, "train.iterations": 1})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------ CLI (defect 9)


def test_cli_version_and_listings(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"flowalign {flowalign.__version__}"
    assert main(["ls", "advantages"]) == 0
    out = capsys.readouterr().out
    for name, advantage in (("grpo", "group"), ("branch_grpo", "branch"), ("tempflow_grpo", "branch step"),
                            ("dense_grpo", "dense"), ("vgpo", "value-anchored"), ("multi_reward", "decoupled")):
        assert re.search(rf"\n{name} +rl +{advantage}", out), (name, out)
    assert main(["ls", "algorithms"]) == 0
    out = capsys.readouterr().out
    names = ("grpo", "branch_grpo", "tempflow_grpo", "dense_grpo", "vgpo", "mix_grpo", "awm", "pref_grpo",
             "multi_reward", "diffusion_nft", "loop", "sage_grpo", "d3po", "diffusion_dpo", "grpo_guard", "dgpo", "find",
             "gdro", "mix_grpo_flash", "diffu_grpo", "coupled_grpo", "gdpo", "mdpo", "cj_grpo", "igpo", "just_grpo", "co_grpo",
             "token_commitment")
    for name in names:
        assert f"\n{name} " in out, name
    assert len(out.strip().splitlines()) == 2 + len(names) and "arXiv:2509.06040" in out  # header, rule, a row each
    assert main(["ls", "losses"]) == 0 and "ppo_clip" in capsys.readouterr().out
    assert main(["ls", "samplers"]) == 0 and "flow_grpo" in capsys.readouterr().out


def test_cli_works_outside_the_repository(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    ls = subprocess.run([sys.executable, "-m", "flowalign", "ls", "configs"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ls.returncode == 0 and "quickstart.yaml" in ls.stdout
    validate = subprocess.run([sys.executable, "-m", "flowalign", "validate", "configs/quickstart.yaml"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
    assert validate.returncode == 0, validate.stderr


def test_model_load_failure_is_one_line(tiny_config, tmp_path, capsys):
    path = _write_yaml(tmp_path, tiny_config)
    assert main(["eval", path, "model.pretrained=runs/nope"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert err.startswith("flowalign: model error: model.pretrained: cannot load 'runs/nope'") and "--debug" in err
    with pytest.raises(Exception, match="runs/nope"):
        main(["--debug", "eval", path, "model.pretrained=runs/nope"])


def test_check_run_dir_on_an_empty_directory(tiny_config, tmp_path):
    from flowalign.config import load_config

    cfg = load_config(tiny_config)
    assert check_run_dir(cfg).action == "start"


# ------------------------------------------------------------------------- SIGKILL at random points


def test_sigkill_at_random_points_then_resume_is_bit_identical(tiny_config, tmp_path):
    import random

    tiny_config["train"].update(iterations=6, checkpoint_every=1)
    straight = dict(tiny_config, output_dir=str(tmp_path / "straight"))
    flowalign.train(straight)
    killed = dict(tiny_config, output_dir=str(tmp_path / "killed"))
    path = _write_yaml(tmp_path, killed)
    rng = random.Random(0)
    kills = 0
    for target in (2, 4):  # kill somewhere after iteration `target` was logged: mid-iteration, mid-checkpoint, ...
        proc = subprocess.Popen([sys.executable, "-m", "flowalign", "train", path], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(os.path.join(killed["output_dir"], "metrics.jsonl")) and \
                    len(_train_steps(killed["output_dir"])) >= target:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.communicate(timeout=60)
    assert kills >= 1
    assert main(["train", path]) == 0
    _assert_same_run(straight["output_dir"], killed["output_dir"])
