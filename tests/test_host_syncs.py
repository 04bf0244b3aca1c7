"""Tests for flowalign.training.host_syncs: every counted kind counts once, pure tensor math counts
nothing, only the outermost call counts, and leaving the context restores torch."""

from __future__ import annotations

import operator
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from flowalign.training.host_syncs import KINDS, HostSyncCounter, count_host_syncs

V = torch.tensor([1.5, 0.0, -2.0, 1.5])
S = torch.tensor(2.0)
IDX = torch.tensor(3)

# (kind, call): each call is exactly one host sync of that kind.
ONE_SYNC = [
    ("item", lambda: S.item()),
    ("tolist", lambda: V.tolist()),
    ("bool", lambda: bool(S)),
    ("bool", lambda: 1 if (V > 0).any() else 0),
    ("bool", lambda: torch.is_nonzero(S)),
    ("bool", lambda: 1.5 in V),
    ("float", lambda: float(S)),
    ("int", lambda: int(S)),
    ("index", lambda: [0, 1, 2, 3, 4][IDX]),
    ("index", lambda: operator.index(IDX)),
    ("index", lambda: range(IDX)),
    ("complex", lambda: complex(S)),
    ("numpy", lambda: V.numpy()),
    ("numpy", lambda: np.asarray(V)),
    ("format", lambda: f"{S:.3f}"),
    ("format", lambda: repr(V)),
    ("nonzero", lambda: V.nonzero()),
    ("nonzero", lambda: torch.nonzero(V)),
    ("nonzero", lambda: torch.argwhere(V)),
    ("nonzero", lambda: torch.where(V > 0)),
    ("unique", lambda: torch.unique(V)),
    ("unique", lambda: V.unique(return_counts=True)),
    ("unique", lambda: torch.unique_consecutive(V)),
    ("masked_select", lambda: V[V > 0]),
    ("masked_select", lambda: torch.masked_select(V, V > 0)),
    ("compare", lambda: torch.equal(V, V)),
    ("compare", lambda: torch.allclose(V, V)),
    ("to_cpu", lambda: V.cpu()),
    ("to_cpu", lambda: V.to("cpu")),
    ("to_cpu", lambda: V.to(device="cpu", dtype=torch.float64)),
    ("to_cpu", lambda: V.to("cpu", torch.float64, False)),
]


@pytest.mark.parametrize("kind,call", ONE_SYNC, ids=[f"{k}-{i}" for i, (k, _) in enumerate(ONE_SYNC)])
def test_each_kind_counts_one(kind, call):
    with count_host_syncs(include_cpu=True) as syncs:
        call()
    assert isinstance(syncs, HostSyncCounter)
    assert syncs.total == 1, syncs.summary()
    assert dict(syncs.by_kind) == {kind: 1}
    assert sum(syncs.sites.values()) == 1
    (site,) = syncs.sites
    assert site.startswith(os.path.join("tests", "test_host_syncs.py") + ":"), site


def test_every_kind_is_exercised():
    assert {kind for kind, _ in ONE_SYNC} == set(KINDS)


def test_pure_tensor_computation_counts_zero():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=gen, requires_grad=True)
    b = torch.randn(8, 8, generator=gen)
    with count_host_syncs(include_cpu=True) as syncs:
        x = torch.exp(a @ b)
        y = torch.where(x > 1.0, x, -x).clamp(-3.0, 3.0)
        z = torch.stack([y.sum(0), y.mean(1), y.amax(1)])
        flags = (z > 0).any() & (z < 10).all()  # any/all alone stay on the device
        w = z[1:, ::2] * flags + z[:, torch.tensor([0, 2])].sum()  # slices and integer indices
        w = w.to(torch.float64).to(a.device).to(device=a.device, dtype=torch.float32)
        loss = w.square().mean()
        loss.backward()
        shape = (tuple(loss.shape), a.dim(), a.numel(), a.shape[0])  # metadata lives on the host
    assert syncs.total == 0, syncs.summary()
    assert dict(syncs.by_kind) == {} and dict(syncs.sites) == {}
    assert a.grad is not None and shape == ((), 2, 64, 8)


def test_non_blocking_and_generic_device_moves_are_not_counted():
    with count_host_syncs(include_cpu=True) as syncs:
        V.to("cpu", non_blocking=True)
        V.to(device="cpu", non_blocking=True)
        V.to(torch.device("cpu"))  # device-generic (`other.device`): the GPU on a GPU machine
        V.to(S)
        V.to(torch.float64)
    assert syncs.total == 0, syncs.summary()


def test_outermost_call_only():
    with count_host_syncs(include_cpu=True) as syncs:
        float(S)  # Tensor.__float__ calls item internally
        f"{S:.2f}"  # Tensor.__format__ calls item internally
        torch.unique(V, sorted=True, return_inverse=True)
        bool(V.any())
    assert syncs.total == 4, syncs.summary()
    assert dict(syncs.by_kind) == {"float": 1, "format": 1, "unique": 1, "bool": 1}

    def user_code(t):  # plain Python is not a torch call: each sync in it counts
        return t.sum().item() + t.max().item()

    with count_host_syncs(include_cpu=True) as syncs:
        user_code(V)
    assert dict(syncs.by_kind) == {"item": 2}


def test_nested_counters_each_count_their_block():
    with count_host_syncs(include_cpu=True) as outer:
        S.item()
        with count_host_syncs(include_cpu=True) as inner:
            float(S)
            V.tolist()
        int(S)
    assert dict(inner.by_kind) == {"float": 1, "tolist": 1} and inner.total == 2
    assert dict(outer.by_kind) == {"item": 1, "float": 1, "tolist": 1, "int": 1} and outer.total == 4


def test_cpu_tensors_are_counted_only_without_an_accelerator():
    with count_host_syncs(include_cpu=False) as syncs:
        S.item()
        V.cpu()
        V.nonzero()
    assert syncs.total == 0 and syncs.include_cpu is False
    accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    with count_host_syncs() as syncs:
        S.item()
    assert syncs.include_cpu is (not accel)
    assert syncs.total == (0 if accel else 1)


def test_sites_name_the_flowalign_frame():
    from flowalign.guards import assert_finite

    with count_host_syncs(include_cpu=True) as syncs:
        assert_finite(V, "v")
    assert syncs.total == 1
    (site,) = syncs.sites
    assert site.startswith(os.path.join("flowalign", "guards.py") + ":"), site
    assert "host sync" in syncs.summary() and site in syncs.summary()


def test_exit_restores_torch():
    depth = torch._C._len_torch_function_stack()
    with count_host_syncs(include_cpu=True) as syncs:
        S.item()
        assert torch._C._len_torch_function_stack() == depth + 1
    assert torch._C._len_torch_function_stack() == depth
    assert syncs.total == 1
    # After exit nothing is counted any more, and torch works as before.
    assert S.item() == 2.0 and float(S) == 2.0 and V.tolist() == [1.5, 0.0, -2.0, 1.5]
    assert torch.unique(V).tolist() == [-2.0, 0.0, 1.5] and V.cpu() is V
    assert syncs.total == 1 and dict(syncs.by_kind) == {"item": 1}
    # Also when the block raises.
    with pytest.raises(RuntimeError, match="boom"):
        with count_host_syncs(include_cpu=True) as syncs:
            float(S)
            raise RuntimeError("boom")
    assert torch._C._len_torch_function_stack() == depth
    int(S)
    assert dict(syncs.by_kind) == {"float": 1}


def test_optimizer_step_counters_are_host_tensors_by_design():
    # torch.optim keeps `step` on the CPU (not capturable) and reads it with .item(): no sync on a GPU.
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with count_host_syncs(include_cpu=True) as syncs:
        for _ in range(2):
            model(torch.ones(3, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        S.item()  # still counted around it
    assert dict(syncs.by_kind) == {"item": 1}, syncs.summary()
