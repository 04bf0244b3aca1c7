"""The accelerate launch configs shipped in ``configs/accelerate/`` (docs/SCALING.md).

Each file is read by accelerate's own loader and by its launcher's argument validation (the code
``accelerate launch --config_file`` runs before it starts any process), and the resulting launch
settings are checked against what the file's name and header promise. ``cpu_2proc.yaml``, the one
config a machine without GPUs can run, is launched for real for one tiny quickstart iteration.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "accelerate")


@dataclass(frozen=True)
class Expected:
    """What one shipped config must make the launcher do."""

    launcher: str  # "multi_gpu" (torchrun, DDP) or "fsdp" (torchrun + FSDP env)
    num_processes: int
    num_machines: int = 1
    reshard_after_forward: bool | None = None  # FSDP2 only


EXPECTED = {
    "cpu_2proc.yaml": Expected("multi_gpu", 2),
    "single_node_8gpu.yaml": Expected("multi_gpu", 8),
    "fsdp_1x8.yaml": Expected("fsdp", 8, reshard_after_forward=True),
    "fsdp_2x8.yaml": Expected("fsdp", 16, num_machines=2, reshard_after_forward=True),
    "zero2_like_fsdp_1x8.yaml": Expected("fsdp", 8, reshard_after_forward=False),
    "zero3_like_fsdp_1x8.yaml": Expected("fsdp", 8, reshard_after_forward=True),
}


def _launch_args(path: str):
    """The launcher's view of ``accelerate launch --config_file path -m flowalign train x.yaml``:
    ``(args, env)`` after accelerate's own validation, with the environment it gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", path, "-m", "flowalign", "train", "x.yaml"])
    args, _defaults, _ = _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


def test_every_shipped_config_is_listed():
    shipped = {os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))}
    assert shipped == set(EXPECTED), "add new configs to EXPECTED (and docs/SCALING.md)"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_launches_as_named(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    path = os.path.join(CONFIG_DIR, name)
    want = EXPECTED[name]
    cfg = load_config_from_file(path)  # raises on keys accelerate does not know
    assert isinstance(cfg, ClusterConfig)
    assert cfg.num_processes == want.num_processes and cfg.num_machines == want.num_machines
    # use_cpu: true would make accelerate start ONE process (its simple launcher); flowalign picks the CPU itself
    assert cfg.use_cpu is False and cfg.mixed_precision == "no"
    args, env = _launch_args(path)
    assert not args.cpu and args.num_processes == want.num_processes and args.num_machines == want.num_machines
    if want.launcher == "multi_gpu":
        assert cfg.distributed_type == DistributedType.MULTI_GPU and args.multi_gpu and not args.use_fsdp
        assert "ACCELERATE_USE_FSDP" not in env
    else:
        assert cfg.distributed_type == DistributedType.FSDP and args.use_fsdp
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        assert env["FSDP_RESHARD_AFTER_FORWARD"] == str(want.reshard_after_forward).lower()
        assert env["FSDP_OFFLOAD_PARAMS"] == "false"
    header = open(path).read().split("\ncompute_environment:")[0]
    assert f"--config_file configs/accelerate/{name}" in header, "the header must show the launch command"
    assert "Tested:" in header, "the header must say where the config was tested"
    if "zero" in name:
        assert "DeepSpeed itself is NOT supported" in header


def test_two_node_config_leaves_the_addresses_to_the_user():
    from accelerate.commands.config.config_args import load_config_from_file

    path = os.path.join(CONFIG_DIR, "fsdp_2x8.yaml")
    cfg = load_config_from_file(path)
    assert cfg.machine_rank == 0 and cfg.main_process_ip == "SET-ME-node0-ip"
    text = open(path).read()
    assert "YOU MUST SET" in text and "--machine_rank 1" in text and "--main_process_ip" in text
    # the command-line flags the header tells users to pass override the file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", path, "--machine_rank", "1", "--main_process_ip", "10.0.0.7",
                                               "-m", "flowalign", "train", "x.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.machine_rank == 1 and args.main_process_ip == "10.0.0.7" and args.num_machines == 2


@pytest.mark.slow
def test_cpu_2proc_config_runs_a_quickstart_iteration(tmp_path):
    """The real launch: ``accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m flowalign
    train configs/quickstart.yaml`` with tiny overrides (those of tests/test_recipe.py's 2-process test)."""
    out_dir = tmp_path / "run"
    overrides = [f"output_dir={out_dir}", "train.iterations=1", "data.prompts_per_iter=2", "sampling.group_size=4",
                 "sampling.num_steps=3", "train.checkpoint_every=0", "eval.every=0", "eval.samples_per_prompt=2",
                 "eval.num_steps=3", "logging.progress=false", "logging.tensorboard=false"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIG_DIR, "cpu_2proc.yaml"),
           "-m", "flowalign", "train", os.path.join(REPO, "configs", "quickstart.yaml"), *overrides]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "num_processes=2" in log, "the run did not see two processes"
    summary = json.load(open(out_dir / "summary.json"))
    assert summary["iterations"] == 1
    assert os.path.exists(out_dir / "final" / "unet" / "config.json")
