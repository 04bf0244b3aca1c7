"""Shared fixtures: a tiny random quickstart-style model saved to disk, prompt files, and a
2-iteration config that runs the real recipe in seconds on CPU."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random-weight ToyAdapter saved with save_pretrained (loaded back through from_pretrained)."""
    from flowalign.pipelines.toy import build_toy_adapter

    path = str(tmp_path_factory.mktemp("tiny-toy"))
    build_toy_adapter(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("prompts")
    train, evaluation = d / "train.txt", d / "eval.txt"
    train.write_text("a handwritten one\na handwritten seven\nthe digit three\n")
    evaluation.write_text("a drawing of a one\nthe number 7\n")
    return str(train), str(evaluation)


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir, prompt_files) -> dict:
    """A config dict for a 2-iteration run (P=2 prompts x G=4 samples x 3 steps)."""
    train, evaluation = prompt_files
    return {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "model": {"_component_": "toy", "pretrained": tiny_model_dir},
        "rewards": [{"_component_": "jpeg_compressibility", "weight": 1.0}],
        "data": {"train_prompts": train, "prompts_per_iter": 2},
        "sampling": {"num_steps": 3, "group_size": 4, "noise_level": 0.7},
        "algorithm": {"clip_range": 0.2},
        "train": {"iterations": 2, "steps_per_iter": 2, "micro_batch_size": 8, "checkpoint_every": 0},
        "eval": {"prompts": evaluation, "samples_per_prompt": 2, "num_steps": 3, "every": 0, "grid_prompts": 2},
        "logging": {"progress": False},
    }


@pytest.fixture(scope="module")
def toy():
    """``(adapter, cond)``: the random toy flow adapter (seed 0, shift 3) and two encoded prompts, for
    rollout-tree tests (``tests/test_estimators_tree.py::_roll``)."""
    import torch

    from flowalign.pipelines.toy import build_toy_adapter

    torch.set_num_threads(1)
    adapter = build_toy_adapter(seed=0, shift=3.0)
    return adapter, adapter.encode(["the digit one", "a handwritten seven"])


# ---------------------------------------------------------------------------------------------
# several processes (gloo on CPU), for the world-size and FSDP tests
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_processes(rank: int, world: int, port: int) -> None:
    """In a spawned worker: offline, in the repository, and with ``world > 1`` what torchrun sets plus
    the gloo process group; one process runs without any of it, as ``flowalign train`` does."""
    import torch.distributed as dist

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.chdir(REPO)
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)


def train_preempted(recipe_cls: type, rank: int, out: str, train) -> None:
    """``train()`` (a 2-iteration run writing to ``out``) with rank 1 getting a SIGTERM at the end of the
    first iteration, as a scheduler's preemption would send it: every rank finishes the iteration,
    checkpoints and stops with exit code 143."""
    import signal
    from unittest import mock

    from flowalign.errors import TrainingInterrupted

    original = recipe_cls.train_iteration

    def signalled(self, iteration):
        metrics = original(self, iteration)
        if iteration == 0 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    with mock.patch.object(recipe_cls, "train_iteration", signalled), \
            pytest.raises(TrainingInterrupted, match="stopped at iteration 1/2") as info:
        train()
    assert info.value.exit_code == 143
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-000001"))
