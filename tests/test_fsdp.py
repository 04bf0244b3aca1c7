"""FSDP2 (``train.fsdp``, flowalign/training/fsdp.py) on the image recipe, 2 CPU processes with gloo.

* the sharded blocks are the repeated blocks, not single layers; modules of another dtype than their
  unit's (float32 norms of a bfloat16 Wan) are units of their own; the settings refuse what cannot run;
* one iteration of the quickstart with the model sharded over 2 processes takes the same step as
  one unsharded process (full fine-tuning; LoRA with gradient checkpointing and ZeRO-2-like
  resharding; AWM with its sharded KL reference and EMA-KL copy);
* a sharded run stopped by a SIGTERM after one iteration and continued is bit-identical to an
  uninterrupted one (weights in ``final/``, logged metrics), and ``final/`` loads with diffusers' own class;
  the same with per-rank sharded checkpoints (``train.fsdp.state_dict: sharded``, torch.distributed.checkpoint),
  whose every rank's shard file is listed and hashed in ``state.json``;
* a sharded checkpoint of a tiny module resumes exactly (weights, AdamW state, EMA) with 2 processes and,
  resharded by DCP, with 1; a flipped byte in one rank's shard file or a torn folder is skipped on resume
  (and refused when named); a save that fails on one rank raises on every rank and leaves nothing behind;
  another model's shards and one unsharded process (naming ``train.fsdp.enabled``) are refused;
* the dLLM recipe shards its policy and KL reference with ``train.fsdp`` (2 processes:
  tests/test_fsdp_dllm.py); its unsharded gradient sum over ranks goes bucket by bucket and equals
  the former flat float32 sum.
"""

from __future__ import annotations

import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from flowalign.training.fsdp import fsdp_settings, mixed_dtype_parts, sharded_blocks
from tests.conftest import REPO, free_port, join_processes, train_preempted

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

    cfg = SimpleNamespace(enabled=False, reshard_after_forward=True, cpu_offload=False, param_dtype=None, state_dict="full")
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, device=torch.device("cpu"))
    assert fsdp_settings(cfg, acc) is None
    cfg.enabled, cfg.param_dtype = True, "bfloat16"
    assert fsdp_settings(cfg, acc).param_dtype == torch.bfloat16
    cfg.state_dict = "sharded"
    assert fsdp_settings(cfg, acc).state_dict == "sharded"
    cfg.cpu_offload = True
    with pytest.raises(ValueError, match="train.fsdp.cpu_offload"):
        fsdp_settings(cfg, acc)
    with pytest.raises(ValueError, match="DeepSpeed"):
        fsdp_settings(cfg, SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, device=torch.device("cpu")))


def test_an_accelerate_fsdp_launch_turns_sharding_on_with_its_settings(monkeypatch):
    """`accelerate launch --config_file configs/accelerate/zero2_like_fsdp_1x8.yaml` exports these to every
    process, also on CPU where accelerate itself reports MULTI_CPU: flowalign shards, with the file's settings."""
    from accelerate.utils import DistributedType

    cfg = SimpleNamespace(enabled=False, reshard_after_forward=True, cpu_offload=False, param_dtype=None, state_dict="full")
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, device=torch.device("cpu"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert fsdp_settings(cfg, acc).reshard_after_forward is False
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed"):
        fsdp_settings(cfg, acc)


def _dllm_sharded_worker(rank: int, out_dir: str) -> None:
    """One process, ``train.fsdp.enabled``: what the dLLM recipe shards (a process group of one is started)."""
    from flowalign.api import recipe_class
    from flowalign.config import load_config
    from flowalign.training.fsdp import is_sharded

    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config(os.path.join(REPO, "configs", "dllm", "quickstart.yaml"),
                      {"train.fsdp.enabled": True, "output_dir": out_dir, "num_threads": 1})
    recipe = recipe_class(cfg)(cfg)
    recipe.setup(for_training=False)
    layers = recipe.model.model.bert.encoder.layer
    torch.save({"model": is_sharded(recipe.model), "reference": is_sharded(recipe.reference),
                "layers": [is_sharded(layer) for layer in layers],
                "dtensor_params": all(type(p).__name__ == "DTensor" for p in recipe.params)},
               os.path.join(out_dir, "sharded.pt"))
    recipe.cleanup()


def test_mixed_dtype_parts_are_sharded_on_their_own():
    """A unit keeps its own parameters' dtype (else its largest one); submodules of another dtype become units of
    their own, innermost first; a module holding two dtypes itself is refused."""
    unit = nn.Module()
    unit.table = nn.Parameter(torch.zeros(3))  # float32, held by the unit itself: the unit keeps float32
    unit.proj = nn.Linear(4, 4).to(torch.bfloat16)
    unit.inner = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4).to(torch.bfloat16))
    assert [id(m) for m in mixed_dtype_parts(unit, inside=[])] == [id(unit.inner[1]), id(unit.proj)]
    assert mixed_dtype_parts(unit, inside=[unit.inner, unit.proj]) == []
    bare = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8).to(torch.bfloat16))  # no own weights: the largest dtype stays
    assert [id(m) for m in mixed_dtype_parts(bare, inside=[])] == [id(bare[1])]
    bad = nn.Linear(4, 4)
    bad.bias.data = bad.bias.data.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"Linear.<root>.*bfloat16.*float32"):
        mixed_dtype_parts(nn.Sequential(bad, nn.Linear(2, 2).to(torch.bfloat16)).get_submodule("0"), inside=[])


def _wan_bf16_worker(rank: int, directory: str) -> None:
    from diffusers import WanTransformer3DModel

    from flowalign.training.fsdp import shard_module

    torch.manual_seed(0)
    model = WanTransformer3DModel.from_pretrained(directory, torch_dtype=torch.bfloat16)  # norms etc. stay float32
    reference = WanTransformer3DModel.from_pretrained(directory, torch_dtype=torch.bfloat16)
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 8, 8, dtype=torch.bfloat16), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 5, 32, dtype=torch.bfloat16), return_dict=False)
    shard_module(model, device_type="cpu")
    outputs = []
    for m in (model, reference):
        out = m(**inputs)[0]
        out.float().square().mean().backward()
        outputs.append(out.detach().float())
    grad = model.proj_out.weight.grad.full_tensor().float()
    torch.save({"dtypes": sorted({str(p.dtype) for p in reference.parameters()}),
                "out_diff": float((outputs[0] - outputs[1]).abs().max()),
                "grad_diff": float((grad - reference.proj_out.weight.grad.float()).abs().max())},
               os.path.join(directory, "wan.pt"))


def test_a_bfloat16_model_with_float32_modules_shards_and_matches(tmp_path):
    """Wan keeps its norms, time embedder and scale-shift table in float32 in a bfloat16 model
    (``_keep_in_fp32_modules``), which one FSDP2 unit cannot hold: sharded, it runs forward and backward
    and gives the unsharded model's output and gradients (1 process)."""
    from diffusers import WanTransformer3DModel

    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                          out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads", rope_max_seq_len=32).save_pretrained(str(tmp_path))
    mp.spawn(_wan_bf16_worker, args=(str(tmp_path),), nprocs=1, join=True)
    seen = torch.load(os.path.join(tmp_path, "wan.pt"))
    assert seen["dtypes"] == ["torch.bfloat16", "torch.float32"]
    assert seen["out_diff"] == 0.0 and seen["grad_diff"] == 0.0


def test_dllm_recipe_shards_the_policy_and_its_kl_reference(tmp_path):
    """``train.fsdp.enabled`` on the dLLM recipe (the quickstart: full fine-tuning with a k3 KL to a
    frozen copy): the policy's transformer layers and root, and the frozen reference copy, are
    sharded; the optimizer holds the shards (tests/test_fsdp_dllm.py runs it on 2 processes)."""
    mp.spawn(_dllm_sharded_worker, args=(str(tmp_path),), nprocs=1, join=True)
    seen = torch.load(os.path.join(tmp_path, "sharded.pt"))
    assert seen == {"model": True, "reference": True, "layers": [True] * 3, "dtensor_params": True}


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


def _train(out: str, iterations: int, state_dict: str = "full") -> None:
    from flowalign.api import train

    train(CONFIG, {**TINY, "train.fsdp.enabled": True, "train.iterations": iterations, "train.checkpoint_every": 1,
                   "eval.every": 0, "eval.samples_per_prompt": 2, "train.ema_decay": 0.5, "output_dir": out,
                   "train.fsdp.state_dict": state_dict})


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    join_processes(rank, world, port)
    for mode in MODES:
        result = _one_iteration(mode, os.path.join(out_dir, f"w{world}"), fsdp=world > 1)
        torch.save(result, os.path.join(out_dir, f"{mode}.world{world}.rank{rank}.pt"))
    if world > 1:
        _train(os.path.join(out_dir, "straight"), 2)
        _train_interrupted(os.path.join(out_dir, "resumed"), rank)  # SIGTERM in iteration 1: checkpoint, stop ...
        _train_continued(os.path.join(out_dir, "resumed"))  # ... and continue from that checkpoint
        # the same with per-rank sharded checkpoints (the straight run above is the reference: the checkpoints'
        # layout does not change what is trained)
        _train_interrupted(os.path.join(out_dir, "resumed_sharded"), rank, state_dict="sharded")
        _train_continued(os.path.join(out_dir, "resumed_sharded"), state_dict="sharded")


def _train_interrupted(out: str, rank: int, state_dict: str = "full") -> None:
    """:func:`_train` for 2 iterations, stopped by a SIGTERM to rank 1 after the first (conftest.train_preempted)."""
    from flowalign.recipes.rl import RLRecipe

    train_preempted(RLRecipe, rank, out, lambda: _train(out, 2, state_dict))


def _train_continued(out: str, state_dict: str = "full") -> None:
    """:func:`_train` for 2 iterations, checking that it resumed at iteration 1 (from the checkpoint
    :func:`_train_interrupted` wrote) rather than starting afresh."""
    from unittest import mock

    from flowalign.recipes.base import Recipe

    original, starts = Recipe._maybe_resume, []

    def recorded(self):
        original(self)
        starts.append(self.start_iteration)

    with mock.patch.object(Recipe, "_maybe_resume", recorded):
        _train(out, 2, state_dict)
    assert starts == [1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp"))
    mp.spawn(_worker, args=(1, free_port(), out), nprocs=1, join=True)
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    return out


@pytest.mark.slow  # ~1.7 min (up to ~3.5 under load) on the 2-core machine: the `runs` fixture
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


def _assert_same_run(straight: str, resumed: str) -> None:
    """``final/`` weights and every iteration's training metrics of the two runs are identical."""
    a, b = _final_weights(straight), _final_weights(resumed)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [{r["step"]: {k: v for k, v in r.items() if k.startswith("train/")}
                for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "train/loss" in r}
               for run in (straight, resumed)]
    assert sorted(metrics[0]) == [1, 2] and metrics[0] == metrics[1]


@pytest.mark.slow
def test_stopped_and_continued_sharded_run_is_bit_identical(runs):
    straight, resumed = (os.path.join(runs, name) for name in ("straight", "resumed"))
    _assert_same_run(straight, resumed)
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


@pytest.mark.slow
def test_stopped_and_continued_run_with_per_rank_checkpoints_is_bit_identical(runs):
    from flowalign.training.checkpoint import check_checkpoint

    resumed = os.path.join(runs, "resumed_sharded")
    _assert_same_run(os.path.join(runs, "straight"), resumed)
    for step in (1, 2):  # the checkpoint the SIGTERM wrote and the final one: each rank's own shards, all hashed
        folder = os.path.join(resumed, "checkpoints", f"step-00000{step}")
        state = json.load(open(os.path.join(folder, "state.json")))
        assert state["format"] == 3 and state["sharded"] == {"world_size": 2, "parts": ["ema", "model", "optimizer"]}
        assert {"shards/__0_0.distcp", "shards/__1_0.distcp", "shards/.metadata", "rng.pt"} == set(state["files"])
        assert set(state["sha256"]) == set(state["files"]) and not os.path.exists(os.path.join(folder, "model.safetensors"))
        assert check_checkpoint(folder).intact


# ---------------------------------------------------------------------------------------------
# per-rank sharded checkpoints of a tiny module (torch.distributed.checkpoint)
# ---------------------------------------------------------------------------------------------
class _Net(nn.Module):
    """Two blocks (each an FSDP unit) and a head whose bias is frozen (left out of checkpoints)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 6)) for _ in range(2)])
        self.head = nn.Linear(6, 3)
        self.head.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 6] -> [B, 3]
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _tiny_run():
    """A sharded :class:`_Net` (the same start on every call), its AdamW and an EMA of it."""
    from flowalign.training.ema import EMA
    from flowalign.training.fsdp import shard_module

    torch.manual_seed(0)
    net = shard_module(_Net(), device_type="cpu")
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    return net, opt, EMA(net, decay=0.5)


def _tiny_step(net, opt, ema, step: int) -> None:
    net(torch.randn(4, 6, generator=torch.Generator().manual_seed(step))).square().sum().backward()
    opt.step()
    opt.zero_grad()
    ema.update(net, step=step)


def _whole(net, opt, ema) -> dict:
    """Weights, AdamW state and EMA shadow gathered whole (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from flowalign.training.fsdp import full_tensor

    optim = get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True))["state"]
    return {"weights": {n: full_tensor(p.detach()).clone() for n, p in net.named_parameters()},
            "optimizer": {f"{n}.{k}": full_tensor(v).clone() for n, per in optim.items() for k, v in per.items()},
            "ema": {n: full_tensor(v).clone() for n, v in ema.state_dict().items()}}


def _damage(run: str, damaged: str) -> None:
    """``damaged``: ``run`` with a flipped byte in rank 1's shard file of step 2 and a torn step 3
    (step 2's files without ``state.json``, as a write killed before its completion marker leaves none)."""
    import shutil

    shutil.copytree(run, damaged)
    ckpts = os.path.join(damaged, "checkpoints")
    shutil.copytree(os.path.join(ckpts, "step-000002"), os.path.join(ckpts, "step-000003"))
    os.remove(os.path.join(ckpts, "step-000003", "state.json"))
    with open(os.path.join(ckpts, "step-000002", "shards", "__1_0.distcp"), "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0x01]))


def _resume_tiny(resume: str, run: str) -> tuple[dict, int, list[str]]:
    """A fresh :func:`_tiny_run` resumed from ``run``: its whole state, the step and the warnings."""
    import warnings

    from flowalign.training.checkpoint import resume_training_state

    net, opt, ema = _tiny_run()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = resume_training_state(resume, run, net, opt, ema)
    return _whole(net, opt, ema), ckpt.step, [str(w.message) for w in caught if "damaged checkpoint" in str(w.message)]


def _sharded_ckpt_worker(rank: int, world: int, port: int, out: str) -> None:
    import errno
    from contextlib import nullcontext
    from unittest import mock

    from flowalign.errors import CheckpointError
    from flowalign.training.checkpoint import resume_training_state, save_sharded_training_state
    from flowalign.training.fsdp import shard_module

    join_processes(rank, world, port)
    run, results = os.path.join(out, "run"), {}
    if world == 2:  # train 2 steps, checkpoint each, resume on 2 processes (intact, then damaged)
        net, opt, ema = _tiny_run()
        for step in (1, 2):
            _tiny_step(net, opt, ema, step)
            save_sharded_training_state(run, step, net, opt, ema=ema, extra={"step": step} if rank == 0 else None, keep_last=None)
            results[f"saved{step}"] = _whole(net, opt, ema)
        # a full disk while rank 1 reads back its share of the files: every rank raises, nothing is left behind
        full = OSError(errno.ENOSPC, "No space left on device")
        with mock.patch("flowalign.training.checkpoint._digest", side_effect=full) if rank == 1 else nullcontext():
            try:
                save_sharded_training_state(run, 3, net, opt, ema=ema, extra={"step": 3} if rank == 0 else None)
            except CheckpointError as err:
                results["failed_save"] = str(err)
        if rank == 0:
            _damage(run, os.path.join(out, "damaged"))
        torch.distributed.barrier()
        results["auto"] = _resume_tiny("auto", run)
        results["damaged"] = _resume_tiny("auto", os.path.join(out, "damaged"))
        try:
            _resume_tiny(os.path.join(out, "damaged", "checkpoints", "step-000002"), run)
        except CheckpointError as err:
            results["named_damaged"] = str(err)
    else:  # one process: DCP reshards the 2 processes' checkpoint
        results["auto"] = _resume_tiny("auto", run)
        torch.manual_seed(0)
        other = _Net()
        other.head = nn.Linear(6, 4)  # another model: the saved shards do not fit
        other = shard_module(other, device_type="cpu")
        try:
            resume_training_state("auto", run, other, torch.optim.AdamW(other.parameters()))
        except CheckpointError as err:
            results["mismatch"] = str(err)
    if rank == 0:
        torch.save(results, os.path.join(out, f"tiny.world{world}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_sharded(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny_sharded"))
    mp.spawn(_sharded_ckpt_worker, args=(2, free_port(), out), nprocs=2, join=True)
    mp.spawn(_sharded_ckpt_worker, args=(1, free_port(), out), nprocs=1, join=True)
    return out, torch.load(os.path.join(out, "tiny.world2.pt")), torch.load(os.path.join(out, "tiny.world1.pt"))


def _assert_equal_states(a: dict, b: dict) -> None:
    for part in ("weights", "optimizer", "ema"):
        assert a[part].keys() == b[part].keys() and a[part], part
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.slow  # ~40 s: 2 + 1 processes
def test_sharded_checkpoint_resumes_exactly_with_the_same_and_another_number_of_processes(tiny_sharded):
    out, two, one = tiny_sharded
    assert any("exp_avg_sq" in k for k in two["saved2"]["optimizer"])
    assert "head.bias" in two["saved2"]["weights"] and not any(torch.equal(two["saved1"]["weights"][k], two["saved2"]["weights"][k])
                                                              for k in two["saved2"]["weights"] if k != "head.bias")
    state, step, warned = two["auto"]
    assert step == 2 and not warned
    _assert_equal_states(state, two["saved2"])
    state, step, warned = one["auto"]  # saved by 2 processes, read by 1: resharded by DCP
    assert step == 2 and not warned
    _assert_equal_states(state, two["saved2"])


@pytest.mark.slow
def test_a_damaged_sharded_checkpoint_is_skipped_or_refused(tiny_sharded):
    from flowalign.errors import CheckpointError
    from flowalign.training.checkpoint import check_checkpoint, load_checkpoint, resume_training_state

    out, two, one = tiny_sharded
    state, step, warned = two["damaged"]  # latest (step 2, a flipped byte) and the torn step 3 skipped, step 1 resumed
    assert step == 1
    _assert_equal_states(state, two["saved1"])
    assert any("step-000002" in w and "shards/__1_0.distcp fails its sha256 check" in w for w in warned), warned
    assert any("step-000003" in w and "missing state.json" in w for w in warned), warned
    assert "cannot resume from" in two["named_damaged"] and "shards/__1_0.distcp fails its sha256" in two["named_damaged"]
    # a save that failed on one rank: raised on every rank (the main one names it), no step-000003, no temp folder
    assert "disk full while writing checkpoint" in two["failed_save"] and two["failed_save"].endswith("(process 1)")
    assert sorted(os.listdir(os.path.join(out, "run", "checkpoints"))) == ["latest", "step-000001", "step-000002"]
    assert "does not match the model (ValueError: Size mismatch" in one["mismatch"] and "head.weight" in one["mismatch"]
    status = check_checkpoint(os.path.join(out, "damaged", "checkpoints", "step-000002"))
    assert not status.intact and "__1_0.distcp" in status.problem
    # one unsharded process cannot read per-rank shards as whole tensors: refused, naming the keys
    intact = os.path.join(out, "run", "checkpoints", "step-000002")
    assert check_checkpoint(intact).intact
    with pytest.raises(CheckpointError, match="train.fsdp.enabled=true"):
        load_checkpoint(intact)
    net = _Net()  # not sharded
    with pytest.raises(CheckpointError, match=r"shards of 2 process\(es\) \(train.fsdp.state_dict=sharded\)"):
        resume_training_state("auto", os.path.join(out, "run"), net, torch.optim.AdamW(net.parameters()))


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
