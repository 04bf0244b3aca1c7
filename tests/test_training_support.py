"""Tests for flowalign.training: checkpoints, RNG capture, EMA, metrics logging and plots."""

from __future__ import annotations

import glob
import json
import os
import random
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from flowalign.errors import CheckpointError
from flowalign.training import checkpoint as ckpt_mod
from flowalign.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flowalign.training.ema import EMA
from flowalign.training.metrics import MetricsLogger, read_metrics
from flowalign.training.plots import before_after_table, format_table, save_curves, save_image_grid, save_reward_curve
from flowalign.training.rng import capture_rng_state, restore_rng_state


# ------------------------------------------------------------------------------------- helpers


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.randn(5), requires_grad=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_nested_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _save_simple(run_dir, step, value: float, **kw) -> str:
    return save_checkpoint(str(run_dir), step, model_state={"w": torch.full((3,), value)}, **kw)


# ---------------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip_every_part_and_exact_resume(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ema = EMA(model, decay=0.9)
    x = torch.randn(8, 4)
    _train_step(model, opt, x)
    ema.update(model, step=1)

    model_state = _trainable_state(model)
    # shared storage and a non-contiguous view: safetensors rejects both unless copied
    model_state["tied"] = model_state["a.weight"]
    model_state["a.weight_t"] = model.a.weight.detach().t()
    model_state["half"] = torch.randn(2, 2).to(torch.bfloat16)
    rng = capture_rng_state()
    extra = {"data_position": 17, "best_eval": {"step": 1, "judge": 0.25}, "note": "x"}
    path = save_checkpoint(
        str(tmp_path),
        1,
        model_state=model_state,
        optimizer_state=opt.state_dict(),
        ema_state=ema.state_dict(),
        rng_state=rng,
        extra=extra,
    )
    assert path == os.path.join(str(tmp_path), "checkpoints", "step-000001")
    assert latest_checkpoint(str(tmp_path)) == path
    assert sorted(os.listdir(path)) == ["ema.safetensors", "model.safetensors", "optimizer.pt", "rng.pt", "state.json"]

    ck = load_checkpoint(path)
    assert ck.path == path and ck.step == 1 and ck.extra == extra
    _assert_nested_equal(model_state, ck.model_state, "model_state")
    _assert_nested_equal(opt.state_dict(), ck.optimizer_state, "optimizer_state")
    _assert_nested_equal(ema.state_dict(), ck.ema_state, "ema_state")
    _assert_nested_equal(rng, ck.rng_state, "rng_state")

    # exact resume: a fresh model + optimizer restored from the checkpoint takes the same next step
    torch.manual_seed(123)
    resumed = TinyNet()
    resumed.load_state_dict({**resumed.state_dict(), **{k: ck.model_state[k] for k in _trainable_state(model)}})
    resumed.frozen.data.copy_(model.frozen)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(ck.optimizer_state)
    _train_step(model, opt, x)
    _train_step(resumed, opt2, x)
    for (n, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_checkpoint_optional_parts_absent(tmp_path):
    path = _save_simple(tmp_path, 0, 1.0)
    ck = load_checkpoint(path, map_location=torch.device("cpu"))
    assert ck.optimizer_state is None and ck.ema_state is None and ck.rng_state is None and ck.extra == {}
    assert torch.equal(ck.model_state["w"], torch.ones(3))


def _no_step_folder_visible(run_dir, step):
    root = os.path.join(str(run_dir), "checkpoints")
    name = f"step-{step:06d}"
    assert not os.path.exists(os.path.join(root, name))
    # no temp folder left behind either
    assert [n for n in os.listdir(root) if n.startswith(".")] == []


def test_failed_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = _save_simple(tmp_path, 1, 1.0)
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-step-" in os.path.basename(str(src)):
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step-000002.*simulated") as info:
        _save_simple(tmp_path, 2, 2.0)
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.setattr(os, "replace", real_replace)
    assert latest_checkpoint(str(tmp_path)) == first
    _no_step_folder_visible(tmp_path, 2)
    assert torch.equal(load_checkpoint(first).model_state["w"], torch.ones(3))


def test_failed_tensor_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = _save_simple(tmp_path, 1, 1.0)
    real_write = ckpt_mod._write_chunk
    calls = []

    def failing_write(fh, data):
        calls.append(fh.name)
        if os.path.basename(fh.name) == "ema.safetensors":  # model.safetensors already written
            real_write(fh, bytes(data)[: len(data) // 2])
            raise RuntimeError("killed mid-write (simulated)")
        return real_write(fh, data)

    monkeypatch.setattr(ckpt_mod, "_write_chunk", failing_write)
    with pytest.raises(RuntimeError, match="simulated"):
        _save_simple(tmp_path, 2, 2.0, ema_state={"w": torch.zeros(3)})
    assert [os.path.basename(c) for c in calls] == ["model.safetensors", "ema.safetensors"]
    assert latest_checkpoint(str(tmp_path)) == first
    _no_step_folder_visible(tmp_path, 2)


def test_failed_latest_write_leaves_latest_at_previous(tmp_path, monkeypatch):
    first = _save_simple(tmp_path, 1, 1.0)
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(str(dst)) == "latest":
            raise OSError("simulated")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match=r"latest.*step-000002 itself is complete.*simulated"):
        _save_simple(tmp_path, 2, 2.0)
    monkeypatch.setattr(os, "replace", real_replace)
    root = os.path.join(str(tmp_path), "checkpoints")
    assert open(os.path.join(root, "latest")).read().strip() == "step-000001"
    assert latest_checkpoint(str(tmp_path)) == first
    assert not [n for n in os.listdir(root) if n.startswith("latest.")]  # temp file cleaned up


def test_latest_checkpoint_ignores_incomplete_and_temp_folders(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    good = _save_simple(tmp_path, 3, 3.0, keep_last=None)
    root = os.path.join(str(tmp_path), "checkpoints")
    # a higher step folder without state.json (e.g. copied by hand, interrupted)
    os.makedirs(os.path.join(root, "step-000009"))
    torch.save({}, os.path.join(root, "step-000009", "optimizer.pt"))
    # a higher step folder whose state.json lists a file that is missing
    broken = _save_simple(tmp_path, 7, 7.0, optimizer_state={"state": {}, "param_groups": []}, keep_last=None)
    os.remove(os.path.join(broken, "optimizer.pt"))
    # a complete-looking temp folder of a crashed writer
    tmp_copy = os.path.join(root, ".tmp-step-000012-99999")
    os.makedirs(tmp_copy)
    for f in os.listdir(good):
        with open(os.path.join(good, f), "rb") as src, open(os.path.join(tmp_copy, f), "wb") as dst:
            dst.write(src.read())
    for pointer in ("step-000009", "step-000007", "garbage", "../step-000003"):
        with open(os.path.join(root, "latest"), "w") as fh:
            fh.write(pointer)
        assert latest_checkpoint(str(tmp_path)) == good, pointer
    os.remove(os.path.join(root, "latest"))
    assert latest_checkpoint(str(tmp_path)) == good


def test_resave_same_step_replaces_it(tmp_path):
    _save_simple(tmp_path, 5, 1.0)
    path = _save_simple(tmp_path, 5, 2.0)
    assert torch.equal(load_checkpoint(path).model_state["w"], torch.full((3,), 2.0))
    root = os.path.join(str(tmp_path), "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step-000005"]


def test_keep_last_pruning(tmp_path):
    root = os.path.join(str(tmp_path), "checkpoints")
    for step in (1, 2, 3, 4):
        _save_simple(tmp_path, step, float(step), keep_last=2)
    assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == ["step-000003", "step-000004"]
    # the checkpoint just written is never pruned, even when older than the rest
    _save_simple(tmp_path, 2, 2.0, keep_last=2)
    assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == ["step-000002", "step-000003", "step-000004"]
    assert latest_checkpoint(str(tmp_path)).endswith("step-000002")
    _save_simple(tmp_path, 5, 5.0, keep_last=1)
    assert sorted(n for n in os.listdir(root) if n.startswith("step-")) == ["step-000005"]
    for step in (6, 7, 8):
        _save_simple(tmp_path, step, float(step), keep_last=None)
    assert len([n for n in os.listdir(root) if n.startswith("step-")]) == 4


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.*does not exist"):
        load_checkpoint(str(tmp_path / "nope"))
    path = _save_simple(tmp_path, 1, 1.0, optimizer_state={"state": {}, "param_groups": []}, keep_last=None)
    os.remove(os.path.join(path, "optimizer.pt"))
    with pytest.raises(CheckpointError, match="step-000001: missing optimizer.pt"):
        load_checkpoint(path)

    path = _save_simple(tmp_path, 2, 1.0, keep_last=None)
    with open(os.path.join(path, "model.safetensors"), "wb") as fh:
        fh.write(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="step-000002: model.safetensors is truncated"):
        load_checkpoint(path)
    path = _save_simple(tmp_path, 4, 1.0, keep_last=None)
    model_file = os.path.join(path, "model.safetensors")
    with open(model_file, "r+b") as fh:  # same size, garbage header
        fh.write(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="step-000004: model.safetensors fails its sha256 check"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="step-000004: corrupt model.safetensors"):
        load_checkpoint(path, verify=False)

    path = _save_simple(tmp_path, 3, 1.0, keep_last=None)
    with open(os.path.join(path, "state.json"), "w") as fh:
        fh.write("{truncated")
    with pytest.raises(CheckpointError, match="step-000003: corrupt state.json"):
        load_checkpoint(path)
    os.remove(os.path.join(path, "state.json"))
    with pytest.raises(CheckpointError, match="step-000003: missing state.json"):
        load_checkpoint(path)


def test_save_checkpoint_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="'w'"):
        save_checkpoint(str(tmp_path), 1, model_state={"w": [1.0, 2.0]})
    with pytest.raises(ValueError, match="model_state"):
        save_checkpoint(str(tmp_path), 1, model_state={})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(str(tmp_path), -1, model_state={"w": torch.ones(1)})
    with pytest.raises(TypeError, match="extra"):
        save_checkpoint(str(tmp_path), 1, model_state={"w": torch.ones(1)}, extra={"f": object()})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(str(tmp_path), 1, model_state={"w": torch.ones(1)}, keep_last=0)
    assert latest_checkpoint(str(tmp_path)) is None


# ----------------------------------------------------------------------------------------- rng


def _draws():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + np.random.randn(3).tolist(),
        torch.rand(4),
        torch.randn(2, 3),
    )


def test_restore_rng_state_reproduces_next_draws(tmp_path):
    random.gauss(0, 1)  # leave a cached gaussian in both generators: the state must carry it
    np.random.randn(1)
    state = capture_rng_state()
    first = _draws()
    _draws()  # move every generator on
    # through torch.save / weights-only torch.load, as in a checkpoint's rng.pt
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = _draws()
    assert first[0] == second[0]
    assert first[1] == second[1]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


def test_restore_rng_state_rejects_bad_state():
    state = capture_rng_state()
    del state["numpy"]
    with pytest.raises(ValueError, match="numpy"):
        restore_rng_state(state)
    with pytest.raises(TypeError):
        restore_rng_state([1, 2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_restore_rng_state_cuda():
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    a = torch.rand(5, device="cuda")
    torch.rand(5, device="cuda")
    restore_rng_state(state)
    assert torch.equal(a, torch.rand(5, device="cuda"))


# ----------------------------------------------------------------------------------------- ema


def test_ema_matches_hand_computation_over_three_updates():
    torch.manual_seed(0)
    model = TinyNet()
    d = 0.9
    ema = EMA(model, decay=d)
    assert set(ema.state_dict()) == {"a.weight", "a.bias", "b.weight", "b.bias"}  # frozen excluded
    theta = [_trainable_state(model)]
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        theta.append(_trainable_state(model))
        ema.update(model, step)
    for name in theta[0]:
        t0, t1, t2, t3 = (t[name].double() for t in theta)
        # unrolled: e3 = d^3 θ0 + (1-d)(d^2 θ1 + d θ2 + θ3)
        expected = d**3 * t0 + (1 - d) * (d**2 * t1 + d * t2 + t3)
        torch.testing.assert_close(ema.state_dict()[name].double(), expected, rtol=1e-6, atol=1e-6)


def test_ema_update_after_step():
    torch.manual_seed(0)
    model = TinyNet()
    ema = EMA(model, decay=0.5, update_after_step=2)
    init = _trainable_state(model)

    def perturb():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)

    perturb()
    ema.update(model, 0)
    ema.update(model, 1)
    for n, v in init.items():  # no-op before update_after_step
        assert torch.equal(ema.state_dict()[n], v)
    perturb()
    ema.update(model, 2)  # copies
    copied = _trainable_state(model)
    for n, v in copied.items():
        assert torch.equal(ema.state_dict()[n], v)
    perturb()
    ema.update(model, 3)  # averages: 0.5 * copied + 0.5 * (copied + 1)
    for n, v in copied.items():
        torch.testing.assert_close(ema.state_dict()[n], v + 0.5)


def test_ema_swapped_into_restores_weights_even_on_error():
    torch.manual_seed(0)
    model = TinyNet()
    ema = EMA(model, decay=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema.update(model, 1)  # decay 0: shadow = current weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped_into(model) as m:
        assert m is model
        for n, p in model.named_parameters():
            if n == "frozen":
                assert torch.equal(p, before[n])
            else:
                assert torch.equal(p, ema.state_dict()[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped_into(model):
            raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_ema_state_dict_round_trip_and_mismatch_errors():
    torch.manual_seed(0)
    model = TinyNet()
    ema = EMA(model, decay=0.9)
    state = {k: v + 1 for k, v in ema.state_dict().items()}
    other = EMA(model, decay=0.9)
    other.load_state_dict(state)
    _assert_nested_equal(state, other.state_dict())
    bad = dict(state)
    bad.pop("a.bias")
    bad["c.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['a.bias'\].*unexpected \['c.weight'\]"):
        ema.load_state_dict(bad)
    with pytest.raises(ValueError, match="a.bias"):
        ema.load_state_dict({**state, "a.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match="b.weight"):
        ema.update(_without_b(model), 1)


def _without_b(model: TinyNet) -> nn.Module:
    m = TinyNet()
    m.b.weight.requires_grad_(False)
    return m


def test_ema_low_precision_params_average_in_fp32():
    model = nn.Linear(2, 2).to(torch.bfloat16)
    ema = EMA(model, decay=0.999)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values())
    with ema.swapped_into(model):
        assert model.weight.dtype == torch.bfloat16


def test_ema_rejects_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(2, 2), decay=1.5)
    with pytest.raises(ValueError, match="update_after_step"):
        EMA(nn.Linear(2, 2), update_after_step=-1)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        EMA(frozen)


# ------------------------------------------------------------------------------------- metrics


def _log_run(run_dir, steps, resume_step=None):
    with MetricsLogger(str(run_dir), resume_step=resume_step) as logger:
        for s in steps:
            logger.log(s, {"reward": 0.1 * s, "loss": torch.tensor(1.0 / (s + 1)), "lr": np.float32(1e-4), "phase": "rl"})


def _tb_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(str(run_dir), "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_metrics_logger_jsonl_tensorboard_and_resume_truncation(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _log_run(straight, range(8))
    _log_run(resumed, range(6))  # "crashed" after logging step 5; checkpoint was at step 3
    with open(resumed / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "rew')  # torn last line from the crash
    _log_run(resumed, range(4, 8), resume_step=3)

    assert read_metrics(str(straight / "metrics.jsonl")) == read_metrics(str(resumed))
    assert (straight / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()
    recs = read_metrics(str(straight))
    assert [r["step"] for r in recs] == list(range(8))
    assert recs[2] == {"step": 2, "reward": pytest.approx(0.2), "loss": pytest.approx(1 / 3), "lr": pytest.approx(1e-4), "phase": "rl"}

    assert glob.glob(str(straight / "tensorboard" / "events.out.tfevents.*"))
    tb = _tb_scalars(straight, "reward")
    assert [s for s, _ in tb] == list(range(8))
    assert [v for _, v in tb] == pytest.approx([0.1 * s for s in range(8)], abs=1e-6)
    # the resumed run's TensorBoard view purges the overlapping steps 4, 5 of the first attempt
    assert [s for s, _ in _tb_scalars(resumed, "reward")] == list(range(8))


def test_metrics_logger_disabled_is_a_no_op(tmp_path):
    logger = MetricsLogger(str(tmp_path / "rank1"), enabled=False, wandb_project="never-imported")
    logger.log(0, {"reward": 1.0})
    logger.close()
    assert not (tmp_path / "rank1").exists()


def test_metrics_logger_rejects_bad_values(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False) as logger:
        with pytest.raises(TypeError, match="'img'"):
            logger.log(0, {"img": [1, 2]})
        with pytest.raises(ValueError, match="'vec'"):
            logger.log(0, {"vec": torch.ones(3)})
        with pytest.raises(ValueError, match="step"):
            logger.log(0, {"step": 1})
        with pytest.raises(ValueError, match="step"):
            logger.log(-1, {"r": 1.0})
    assert read_metrics(str(tmp_path)) == []
    assert not (tmp_path / "tensorboard").exists()


def test_read_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_metrics(str(tmp_path / "missing.jsonl"))
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 0}\n{oops\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(str(p))


def test_metrics_logger_wandb_calls(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        id = "abc123"

        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    def init(**kw):
        calls["init"].append(kw)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricsLogger(str(tmp_path), tensorboard=False, wandb_project="proj") as logger:
        logger.log(3, {"reward": 0.5, "phase": "rl"})
    assert calls["log"] == [(3, {"reward": 0.5})] and calls["finish"] == 1
    assert calls["init"][0]["project"] == "proj" and calls["init"][0]["id"] is None
    MetricsLogger(str(tmp_path), tensorboard=False, wandb_project="proj", resume_step=3).close()
    assert calls["init"][1]["id"] == "abc123" and calls["init"][1]["resume"] == "allow"


# --------------------------------------------------------------------------------------- plots


def test_save_image_grid_size_and_pixels_without_labels(tmp_path):
    torch.manual_seed(0)
    rows = [torch.rand(3, 3, 5, 7), torch.rand(3, 3, 5, 7)]
    path = save_image_grid(str(tmp_path / "g" / "grid.png"), rows, scale=4)
    img = np.asarray(Image.open(path).convert("RGB"))
    n, h, w, s, sep = 3, 5, 7, 4, 2
    assert img.shape == (2 * h * s + 3 * sep, n * w * s + (n + 1) * sep, 3)
    # cell (row 1, col 2) is the nearest-neighbour upscaled image
    y0, x0 = sep + 1 * (h * s + sep), sep + 2 * (w * s + sep)
    expected = (rows[1][2].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = np.kron(expected, np.ones((s, s, 1), dtype=np.uint8))
    np.testing.assert_array_equal(img[y0 : y0 + h * s, x0 : x0 + w * s], expected)
    # a separator column between cells
    assert (img[:, sep + w * s, :] == img[0, 0, :]).all()


def test_save_image_grid_size_with_labels_and_title(tmp_path):
    rows = [torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)]
    row_labels, col_labels, title = ["a prompt", "a much longer prompt"], ["seed 0", "seed 1"], "step 10"
    path = save_image_grid(str(tmp_path / "grid.png"), rows, row_labels=row_labels, col_labels=col_labels, title=title, scale=8)
    img = Image.open(path)
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(t):
        box = draw.textbbox((0, 0), t, font=font)
        return box[2], box[3]

    pad = 4
    left = max(size(t)[0] for t in row_labels) + 2 * pad
    top = size(title)[1] + 2 * pad + max(size(t)[1] for t in col_labels) + 2 * pad
    assert img.size == (left + 2 * 32 + 3 * 2, top + 2 * 32 + 3 * 2)
    arr = np.asarray(img.convert("RGB"))
    assert (arr[top + 2 : top + 2 + 32, left + 2 : left + 2 + 32] == 0).all()  # row 0: black cells
    assert (arr[top + 36 : top + 36 + 32, left + 2 : left + 2 + 32] == 255).all()  # row 1: white cells
    assert (arr[top:, :left] < 128).any()  # row labels drawn in the left margin
    assert (arr[:top, left:] < 128).any()  # title / column labels drawn in the top margin


def test_save_image_grid_rejects_bad_input(tmp_path):
    p = str(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        save_image_grid(p, [torch.rand(2, 3, 4, 4), torch.rand(3, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"rows\[0\].*\[0, 1\]"):
        save_image_grid(p, [torch.rand(2, 3, 4, 4) * 2 - 1])
    with pytest.raises(ValueError, match="row_labels"):
        save_image_grid(p, [torch.rand(2, 3, 4, 4)], row_labels=["a", "b"])
    with pytest.raises(ValueError, match="col_labels"):
        save_image_grid(p, [torch.rand(2, 3, 4, 4)], col_labels=["a"])
    with pytest.raises(ValueError, match="scale"):
        save_image_grid(p, [torch.rand(2, 3, 4, 4)], scale=0)
    assert not os.path.exists(p)


def test_save_reward_curve_writes_png(tmp_path):
    records = [{"step": s, "reward": 0.1 * s} for s in range(20)]
    for r in records[::5]:
        r["eval/judge"] = 0.5
    path = save_reward_curve(
        str(tmp_path / "curves" / "reward.png"),
        records,
        series={"reward": "train reward", "eval/judge": "judge (held-out)", "never": "absent"},
        title="quickstart",
    )
    assert os.path.getsize(path) > 1000
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (768, 480)
    arr = np.asarray(img.convert("L"))
    assert arr.min() < 128 and arr.max() == 255  # something was drawn on a white canvas
    with pytest.raises(ValueError, match=r"records\[1\]"):
        save_reward_curve(str(tmp_path / "bad.png"), [{"step": 0}, {"reward": 1.0}], series={"reward": "r"})


def test_format_table_alignment():
    text = format_table(["algorithm", "reward", "judge", "steps"], [["flow-grpo", 0.81234, 0.7, 200], ["awm", 1.5, None, 50]])
    lines = text.split("\n")
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["algorithm", "reward", "judge", "steps"]
    assert lines[2].split() == ["flow-grpo", "0.812", "0.700", "200"]
    assert lines[3].split() == ["awm", "1.500", "-", "50"]
    # text left-aligned, numbers right-aligned: columns end at the same offset
    for col in ("0.812", "0.700", "200"):
        end = lines[2].index(col) + len(col)
        assert lines[1][end - 1] == "-" and (end == len(lines[1]) or lines[1][end] == " ")
    assert lines[3].startswith("awm ") and lines[2].rstrip().endswith(" 200") and lines[3].endswith("   50")
    with pytest.raises(ValueError, match=r"rows\[0\]"):
        format_table(["a", "b"], [[1]])


def test_save_curves_draws_the_reference_line(tmp_path):
    curves = {"grpo": [(2.0, 0.6), (0.0, 0.5), (4.0, 0.7)], "empty": []}
    plain = np.asarray(Image.open(save_curves(str(tmp_path / "a.png"), curves, xlabel="s", ylabel="r")).convert("L"))
    ref = save_curves(str(tmp_path / "b.png"), curves, xlabel="s", ylabel="r", reference=(0.65, "baseline"))
    with_ref = np.asarray(Image.open(ref).convert("L"))
    assert plain.shape == with_ref.shape == (480, 768)
    # the dashed line adds dark pixels along one image row inside the axes
    gained = (with_ref < 200) & (plain >= 200)
    assert gained.sum(axis=1).max() > 100


def test_before_after_table_rows_and_missing_values():
    before = {"eval/reward": 0.25, "eval/accuracy": 0.5}
    after = {"eval/reward": 0.75, "eval/accuracy": 0.9, "eval/judge/x": 0.1, "time/eval_s": 3.0}
    lines = before_after_table(before, after, {"step": 40, "eval/reward": 0.8}, 1.5).split("\n")
    assert lines[0].split() == ["held-out", "metric", "before", "after", "best", "(it", "40)"]
    assert [line.split() for line in lines[2:]] == [
        ["reward", "0.250", "0.750", "0.800"], ["accuracy", "0.500", "0.900", "-"], ["judge/x", "-", "0.100", "-"],
        ["seconds", "/", "iteration", "-", "1.500", "-"]]
    assert before_after_table(None, after, None, 1.0).split("\n")[0].endswith("best (it -)")


def test_write_summary_drops_the_table_and_prints_it(tmp_path, capsys):
    from flowalign.training.metrics import write_summary

    write_summary(str(tmp_path), {"after": {"eval/reward": 0.5}, "table": "THE TABLE"}, "final/")
    assert json.loads((tmp_path / "summary.json").read_text()) == {"after": {"eval/reward": 0.5}}
    out = capsys.readouterr().out
    assert "THE TABLE" in out and f"run directory: {tmp_path}  (final/)" in out


def test_resume_training_state_restores_weights_optimizer_ema_and_rng(tmp_path):
    from flowalign.training.checkpoint import resume_training_state

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ema = EMA(model, decay=0.5)
    save_checkpoint(str(tmp_path), 7, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                    ema_state=ema.state_dict(), rng_state=capture_rng_state(), extra={"step": 7})
    expected_draw = torch.rand(3)

    fresh = nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    fresh_ema = EMA(fresh, decay=0.5)
    assert resume_training_state("never", str(tmp_path), fresh, fresh_opt) is None
    assert resume_training_state("auto", str(tmp_path / "empty"), fresh, fresh_opt) is None
    torch.rand(5)  # move the global RNG on; resuming must put it back
    ckpt = resume_training_state("auto", str(tmp_path), fresh, fresh_opt, fresh_ema)
    assert ckpt.extra["step"] == 7
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert all(torch.equal(fresh_ema.state_dict()[k], v) for k, v in ema.state_dict().items())
    other = nn.Sequential(nn.Linear(3, 2))  # parameters named "0.weight", "0.bias"
    with pytest.raises(CheckpointError, match="does not match the model"):
        resume_training_state(ckpt.path, str(tmp_path), other, torch.optim.Adam(other.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_and_ema_on_cuda(tmp_path):
    model = nn.Linear(3, 3).cuda().to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 1)
    assert ema.state_dict()["weight"].is_cuda and ema.state_dict()["weight"].dtype == torch.float32
    path = save_checkpoint(str(tmp_path), 1, model_state=dict(model.state_dict()), ema_state=ema.state_dict(),
                           rng_state=capture_rng_state())
    ck = load_checkpoint(path, map_location="cuda:0")
    assert ck.model_state["weight"].is_cuda and torch.equal(ck.model_state["weight"], model.weight)
    assert torch.equal(ck.ema_state["weight"], ema.state_dict()["weight"])
    assert not ck.rng_state["torch"].is_cuda  # RNG states always load on the CPU
    restore_rng_state(ck.rng_state)
