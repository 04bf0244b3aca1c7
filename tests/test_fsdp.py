"""FSDP2 (``train.fsdp``, flowalign/training/fsdp.py) on the image recipe, 2 CPU processes with gloo.

* the sharded blocks are the repeated blocks, not single layers; the settings refuse what cannot run;
* one iteration of the quickstart with the model sharded over 2 processes takes the same step as
  one unsharded process (full fine-tuning; LoRA with gradient checkpointing and ZeRO-2-like
  resharding; AWM with its sharded KL reference and EMA-KL copy);
* a sharded run stopped by a SIGTERM after one iteration and continued is bit-identical to an
  uninterrupted one (weights in ``final/``, logged metrics), and ``final/`` loads with diffusers' own class;
* the dLLM recipe refuses ``train.fsdp`` (naming the key); its unsharded gradient sum over ranks goes
  bucket by bucket and equals the former flat float32 sum.
"""

from __future__ import annotations

import glob
import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from flowalign.training.fsdp import fsdp_settings, sharded_blocks
from tests.conftest import REPO, free_port, join_processes

CONFIG = os.path.join(REPO, "configs", "quickstart.yaml")
TINY = {"data.prompts_per_iter": 2, "sampling.num_steps": 4, "eval.num_steps": 4, "train.steps_per_iter": 1,
        "train.micro_batch_size": 8, "num_threads": 1, "logging.progress": False, "logging.tensorboard": False}
AWM = os.path.join(REPO, "configs", "awm", "quickstart.yaml")
#: (config, overrides) of each compared run: full fine-tuning; LoRA with gradient checkpointing and the
#: ZeRO-2-like setting (gathered weights kept from forward to backward); AWM, whose KL reference copy is
#: sharded as well and whose EMA-KL copy is kept on the shards
MODES = {"full": (CONFIG, {}),
         "lora": (CONFIG, {"model.lora_rank": 4, "model.gradient_checkpointing": True,
                           "train.fsdp.reshard_after_forward": False}),
         "awm": (AWM, {})}


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.to_out = nn.ModuleList([nn.Linear(4, 4), nn.Dropout(0.0)])


def test_sharded_blocks_are_the_outermost_blocks():
    model = nn.Module()
    model.blocks = nn.ModuleList([_Block(), nn.Sequential(nn.ModuleList([_Block()]), nn.Linear(4, 4)), nn.Dropout(0.0)])
    model.head = nn.ModuleList([nn.Linear(4, 4)])  # a list of single layers: no block
    blocks = sharded_blocks(model)
    # not to_out's Linear / Dropout, not the block nested inside blocks[1], not the weightless Dropout
    assert [id(b) for b in blocks] == [id(model.blocks[0]), id(model.blocks[1])]


def test_settings_name_what_cannot_run():
    from accelerate.utils import DistributedType

    cfg = SimpleNamespace(enabled=False, reshard_after_forward=True, cpu_offload=False, param_dtype=None)
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, device=torch.device("cpu"))
    assert fsdp_settings(cfg, acc) is None
    cfg.enabled, cfg.param_dtype = True, "bfloat16"
    assert fsdp_settings(cfg, acc).param_dtype == torch.bfloat16
    cfg.cpu_offload = True
    with pytest.raises(ValueError, match="train.fsdp.cpu_offload"):
        fsdp_settings(cfg, acc)
    with pytest.raises(ValueError, match="DeepSpeed"):
        fsdp_settings(cfg, SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, device=torch.device("cpu")))


def test_an_accelerate_fsdp_launch_turns_sharding_on_with_its_settings(monkeypatch):
    """`accelerate launch --config_file configs/accelerate/zero2_like_fsdp_1x8.yaml` exports these to every
    process, also on CPU where accelerate itself reports MULTI_CPU: flowalign shards, with the file's settings."""
    from accelerate.utils import DistributedType

    cfg = SimpleNamespace(enabled=False, reshard_after_forward=True, cpu_offload=False, param_dtype=None)
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, device=torch.device("cpu"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert fsdp_settings(cfg, acc).reshard_after_forward is False
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed"):
        fsdp_settings(cfg, acc)


def test_dllm_recipe_refuses_fsdp_naming_the_key(tmp_path):
    from flowalign.api import recipe_class
    from flowalign.config import ConfigError, load_config

    cfg = load_config(os.path.join(REPO, "configs", "dllm", "quickstart.yaml"),
                      {"train.fsdp.enabled": True, "output_dir": str(tmp_path), "num_threads": 1})
    recipe = recipe_class(cfg)(cfg)
    with pytest.raises(ConfigError, match="train.fsdp.enabled"):
        recipe.setup(for_training=False)


# ---------------------------------------------------------------------------------------------
# two processes
# ---------------------------------------------------------------------------------------------
def _one_iteration(mode: str, out_dir: str, fsdp: bool) -> dict:
    """Trainable weights before and after one iteration (gathered whole from a sharded model)."""
    from flowalign.api import recipe_class
    from flowalign.config import load_config
    from flowalign.training.fsdp import full_tensor

    config, overrides = MODES[mode]
    cfg = load_config(config, {**TINY, **overrides, "train.fsdp.enabled": fsdp, "output_dir": os.path.join(out_dir, mode)})
    recipe = recipe_class(cfg)(cfg)
    recipe.setup(for_training=False)
    weights = lambda: {n: full_tensor(p.detach()).cpu().clone() for n, p in recipe.module.named_parameters() if p.requires_grad}  # noqa: E731
    before = weights()
    recipe.train_iteration(0)
    after = weights()
    recipe.cleanup()
    return {"before": before, "after": after}


def _train(out: str, iterations: int) -> None:
    from flowalign.api import train

    train(CONFIG, {**TINY, "train.fsdp.enabled": True, "train.iterations": iterations, "train.checkpoint_every": 1,
                   "eval.every": 0, "eval.samples_per_prompt": 2, "train.ema_decay": 0.5, "output_dir": out})


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    join_processes(rank, world, port)
    for mode in MODES:
        result = _one_iteration(mode, os.path.join(out_dir, f"w{world}"), fsdp=world > 1)
        torch.save(result, os.path.join(out_dir, f"{mode}.world{world}.rank{rank}.pt"))
    if world > 1:
        _train(os.path.join(out_dir, "straight"), 2)
        _train_interrupted(os.path.join(out_dir, "resumed"), rank)  # SIGTERM in iteration 1: checkpoint, stop ...
        _train(os.path.join(out_dir, "resumed"), 2)  # ... and continue from that checkpoint


def _train_interrupted(out: str, rank: int) -> None:
    """:func:`_train` for 2 iterations, rank 1 getting a SIGTERM at the end of the first (as a
    scheduler's preemption would send it): every rank finishes the iteration, checkpoints and stops."""
    from unittest import mock

    from flowalign.errors import TrainingInterrupted
    from flowalign.recipes.rl import RLRecipe

    original = RLRecipe.train_iteration

    def signalled(self, iteration):
        metrics = original(self, iteration)
        if iteration == 0 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    with mock.patch.object(RLRecipe, "train_iteration", signalled), \
            pytest.raises(TrainingInterrupted, match="stopped at iteration 1/2") as info:
        _train(out, 2)
    assert info.value.exit_code == 143
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-000001"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp"))
    mp.spawn(_worker, args=(1, free_port(), out), nprocs=1, join=True)
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    return out


@pytest.mark.slow  # ~1.5 min on the loaded 2-core machine
@pytest.mark.parametrize("mode", list(MODES))
def test_sharded_step_equals_one_unsharded_process(runs, mode):
    one = torch.load(os.path.join(runs, f"{mode}.world1.rank0.pt"))
    two = [torch.load(os.path.join(runs, f"{mode}.world2.rank{r}.pt")) for r in (0, 1)]
    assert one["after"].keys() == two[0]["after"].keys() and one["after"]
    assert (mode == "lora") == all("lora" in k for k in one["after"])
    for key in one["after"]:
        assert torch.equal(two[0]["before"][key], one["before"][key]), key  # same start (LoRA init included)
        assert torch.equal(two[0]["after"][key], two[1]["after"][key]), key  # the ranks agree
    step_one = torch.cat([(one["after"][k] - one["before"][k]).flatten() for k in one["after"]])
    step_two = torch.cat([(two[0]["after"][k] - one["before"][k]).flatten() for k in one["after"]])
    assert float(step_one.norm()) > 0
    # float tolerance: the sharded run sums gradients in another order; Adam's first step is ~lr x sign(g)
    assert float((step_two - step_one).norm() / step_one.norm()) < 1e-3


def _final_weights(run: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(glob.glob(os.path.join(run, "final", "**", "*.safetensors"), recursive=True)):
        out.update({f"{os.path.relpath(path, run)}:{k}": v for k, v in load_file(path).items()})
    return out


@pytest.mark.slow
def test_stopped_and_continued_sharded_run_is_bit_identical(runs):
    straight, resumed = (os.path.join(runs, name) for name in ("straight", "resumed"))
    a, b = _final_weights(straight), _final_weights(resumed)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every iteration's training metrics
    metrics = [{r["step"]: {k: v for k, v in r.items() if k.startswith("train/")}
                for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "train/loss" in r}
               for run in (straight, resumed)]
    assert sorted(metrics[0]) == [1, 2] and metrics[0] == metrics[1]
    # the checkpoint and final/ hold whole weights in the usual layout: the official class loads them
    from diffusers import UNet2DConditionModel

    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(os.path.join(straight, "final", "unet"))
    assert sum(p.numel() for p in unet.parameters()) > 1_000_000
    # final/ holds the EMA weights (train.ema_decay) gathered from the shards: the last checkpoint's
    # EMA shadow, whole, not its raw weights
    last = os.path.join(straight, "checkpoints", "step-000002")
    ema, raw = load_file(os.path.join(last, "ema.safetensors")), load_file(os.path.join(last, "model.safetensors"))
    loaded = unet.state_dict()
    assert ema.keys() == raw.keys() and set(ema) <= set(loaded)
    assert all(torch.equal(loaded[k], ema[k].to(loaded[k].dtype)) for k in ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)


# ---------------------------------------------------------------------------------------------
# the dLLM recipe's gradient sum (not sharded): buckets instead of one flat copy of every gradient
# ---------------------------------------------------------------------------------------------
SHAPES = [((3, 5), torch.float32), ((7,), torch.float32), ((4, 4), torch.bfloat16), ((2, 3), torch.bfloat16),
          ((40,), torch.float32), ((6,), torch.float32)]


def _gradients(rank: int) -> list[torch.Tensor | None]:
    """Rank ``rank``'s gradients of :data:`SHAPES` (its 2nd is missing: a parameter without rows)."""
    g = torch.Generator().manual_seed(100 + rank)
    return [None if (rank == 1 and i == 1) else torch.randn(shape, generator=g).to(dtype) for i, (shape, dtype) in enumerate(SHAPES)]


def _sum_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from flowalign.recipes.dllm_rl import DLLMRecipe

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    params = [nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in SHAPES]
    for p, grad in zip(params, _gradients(rank)):
        p.grad = grad
    # buckets of <= 25 elements: [15, 7] (float32) | [16, 6] (bfloat16) | [40] (alone, in place) | [6]
    DLLMRecipe._all_reduce_gradients(SimpleNamespace(world=world, params=params, reduce_bucket_numel=25))
    torch.save([p.grad for p in params], os.path.join(out_dir, f"sum.rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_dllm_bucketed_gradient_sum_equals_the_flat_float32_sum(tmp_path):
    mp.spawn(_sum_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    per_rank = [_gradients(r) for r in (0, 1)]
    # the former flat all-reduce: every gradient (zeros where missing) summed in float32, cast back
    expected = [sum((g if g is not None else torch.zeros(shape, dtype=dtype)).float() for g in grads).to(dtype)
                for (shape, dtype), grads in zip(SHAPES, zip(*per_rank))]
    for rank in (0, 1):
        got = torch.load(os.path.join(tmp_path, f"sum.rank{rank}.pt"))
        assert [g.dtype for g in got] == [dtype for _, dtype in SHAPES]
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), rank
