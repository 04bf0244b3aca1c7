"""Tests for flowalign.training.lr_schedules: the named schedules against transformers' own
schedulers, a hand-worked example, state_dict round-trips, torch class paths and config errors."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup)

from flowalign.errors import ConfigError
from flowalign.training.lr_schedules import SCHEDULES, build_lr_scheduler, check_lr_scheduler

LR = 0.1


def _optimizer(lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """The learning rate each of ``steps`` optimizer steps uses (stepping the schedule after each)."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("warmup", [0, 1, 5])
@pytest.mark.parametrize("name, reference", [
    ("constant", lambda opt, w, t: get_constant_schedule_with_warmup(opt, w)),
    ("cosine", lambda opt, w, t: get_cosine_schedule_with_warmup(opt, w, t)),
    ("linear", lambda opt, w, t: get_linear_schedule_with_warmup(opt, w, t)),
])
def test_named_schedules_match_transformers(name, reference, warmup):
    total = 20
    ref_opt, opt = _optimizer(), _optimizer()
    expected = _lrs(ref_opt, reference(ref_opt, warmup, total), total)
    got = _lrs(opt, build_lr_scheduler(opt, name, total_steps=total, warmup_steps=warmup), total)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert got[0] == (LR if warmup == 0 else 0.0)


def test_cosine_min_lr_ratio_matches_transformers():
    ref_opt, opt = _optimizer(), _optimizer()
    expected = _lrs(ref_opt, get_cosine_with_min_lr_schedule_with_warmup(ref_opt, 3, 20, min_lr_rate=0.2), 20)
    got = _lrs(opt, build_lr_scheduler(opt, "cosine", total_steps=20, warmup_steps=3, min_lr_ratio=0.2), 20)
    assert got == pytest.approx(expected, rel=1e-12)


def test_hand_worked_min_lr_ratio():
    # warmup 2, total 6, min_lr_ratio 0.5: warmup multipliers 0, 1/2; then progress p = 0, 1/4, 1/2,
    # 3/4, 1, 1 (clamped past total): linear 1 - p/2, cosine 0.5 + 0.25 * (1 + cos(pi p)).
    opt = _optimizer(1.0)
    assert _lrs(opt, build_lr_scheduler(opt, "linear", total_steps=6, warmup_steps=2, min_lr_ratio=0.5), 8) == \
        pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.5])
    opt = _optimizer(1.0)
    half = 0.25 * math.cos(math.pi / 4)  # = 0.25 * sqrt(1/2)
    assert _lrs(opt, build_lr_scheduler(opt, "cosine", total_steps=6, warmup_steps=2, min_lr_ratio=0.5), 8) == \
        pytest.approx([0.0, 0.5, 1.0, 0.75 + half, 0.75, 0.75 - half, 0.5, 0.5])


def test_constant_without_warmup_leaves_lr_unchanged():
    lr = 3.7e-5
    opt = _optimizer(lr)
    sched = build_lr_scheduler(opt, "constant", total_steps=10)
    assert all(x == lr for x in _lrs(opt, sched, 15))  # bit for bit, also past total_steps
    assert opt.param_groups[0]["lr"] == lr


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_state_dict_round_trip(name, tmp_path):
    def build(opt):
        return build_lr_scheduler(opt, name, total_steps=20, warmup_steps=4, min_lr_ratio=0.0 if name == "constant" else 0.1)

    opt = _optimizer()
    uninterrupted = _lrs(opt, build(opt), 20)

    opt = _optimizer()
    sched = build(opt)
    first = _lrs(opt, sched, 7)
    torch.save({"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)  # plain data: loads without pickled code
    opt2 = _optimizer()
    sched2 = build(opt2)
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["lr_scheduler"])
    assert sched2.last_epoch == 7
    assert first + _lrs(opt2, sched2, 13) == uninterrupted


def test_torch_class_path():
    opt = _optimizer(1.0)
    sched = build_lr_scheduler(opt, "torch.optim.lr_scheduler.StepLR", total_steps=10, kwargs={"step_size": 2, "gamma": 0.5})
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    assert _lrs(opt, sched, 6) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    # pkg.mod:Class spelling, OmegaConf kwargs with a list value
    opt = _optimizer(1.0)
    kwargs = OmegaConf.create({"milestones": [1, 3], "gamma": 0.1})
    sched = build_lr_scheduler(opt, "torch.optim.lr_scheduler:MultiStepLR", total_steps=10, kwargs=kwargs)
    assert _lrs(opt, sched, 4) == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_build_rejects_warmup_for_class_path():
    with pytest.raises(ValueError, match=r"^train\.lr_scheduler\.warmup_steps: "):
        build_lr_scheduler(_optimizer(), "torch.optim.lr_scheduler.StepLR", total_steps=10, warmup_steps=2, kwargs={"step_size": 2})


_OK = dict(warmup_steps=0, min_lr_ratio=0.0, kwargs={}, total_steps=10)


@pytest.mark.parametrize("name, changes, key, text", [
    ("cosin", {}, "train.lr_scheduler._component_", "did you mean 'cosine'?"),
    ("", {}, "train.lr_scheduler._component_", "schedule name or class path"),
    ("cosine", {"warmup_steps": 10}, "train.lr_scheduler.warmup_steps", "[0, 10)"),
    ("linear", {"warmup_steps": -1}, "train.lr_scheduler.warmup_steps", "[0, 10)"),
    ("linear", {"warmup_steps": 1.5}, "train.lr_scheduler.warmup_steps", "integer"),
    ("cosine", {"min_lr_ratio": 1.5}, "train.lr_scheduler.min_lr_ratio", "[0, 1]"),
    ("cosine", {"min_lr_ratio": -0.1}, "train.lr_scheduler.min_lr_ratio", "[0, 1]"),
    ("cosine", {"min_lr_ratio": float("nan")}, "train.lr_scheduler.min_lr_ratio", "[0, 1]"),
    ("constant", {"min_lr_ratio": 0.1}, "train.lr_scheduler.min_lr_ratio", "does not decay"),
    ("cosine", {"kwargs": {"T_max": 5}}, "train.lr_scheduler.kwargs", "takes no kwargs"),
    ("torch.optim.lr_scheduler.StepLr", {}, "train.lr_scheduler._component_", "did you mean 'torch.optim.lr_scheduler.StepLR'?"),
    ("torch.optim.AdamW", {}, "train.lr_scheduler._component_", "not a torch.optim.lr_scheduler.LRScheduler subclass"),
    ("torch.optim.lr_scheduler.ReduceLROnPlateau", {}, "train.lr_scheduler._component_", "needs a metric"),
    ("torch.optim.lr_scheduler.StepLR", {"kwargs": {"step_size": 2, "step_sise": 3}}, "train.lr_scheduler.kwargs.step_sise",
     "did you mean 'step_size'?"),
    ("torch.optim.lr_scheduler.StepLR", {"kwargs": {"gamma": 0.5}}, "train.lr_scheduler.kwargs.step_size", "missing"),
    ("torch.optim.lr_scheduler.StepLR", {"kwargs": {"step_size": 2, "last_epoch": 3}}, "train.lr_scheduler.kwargs.last_epoch",
     "checkpoint"),
    ("torch.optim.lr_scheduler.StepLR", {"kwargs": {"step_size": 2}, "warmup_steps": 2}, "train.lr_scheduler.warmup_steps",
     "leave it at 0"),
    ("torch.optim.lr_scheduler.StepLR", {"kwargs": {"step_size": 2}, "min_lr_ratio": 0.1}, "train.lr_scheduler.min_lr_ratio",
     "leave it at 0"),
])
def test_check_errors_name_the_key(name, changes, key, text):
    with pytest.raises(ConfigError) as info:
        check_lr_scheduler(name, **{**_OK, **changes})
    message = str(info.value)
    assert message.startswith(f"{key}: "), message
    assert text in message, message


def test_check_accepts_good_settings_and_custom_key():
    for name in SCHEDULES:
        check_lr_scheduler(name, **{**_OK, "warmup_steps": 9, "min_lr_ratio": 0.0 if name == "constant" else 1.0})
    check_lr_scheduler("torch.optim.lr_scheduler.StepLR", **{**_OK, "kwargs": OmegaConf.create({"step_size": 2})})
    check_lr_scheduler("torch.optim.lr_scheduler.CosineAnnealingLR", **{**_OK, "kwargs": {"T_max": 3}})
    check_lr_scheduler("linear", **{**_OK, "kwargs": None})
    with pytest.raises(ConfigError, match=r"^dllm\.train\.lr_scheduler\._component_: "):
        check_lr_scheduler("cosin", **_OK, key="dllm.train.lr_scheduler")
