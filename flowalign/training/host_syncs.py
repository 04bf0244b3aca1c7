"""Count the operations that force a device -> host synchronisation (a "host sync").

CUDA kernels run asynchronously: the Python thread queues work and moves on. An operation whose
*result is needed on the host* -- a Python number, a list, a NumPy array, a branch on a tensor's
value, an output whose size depends on the data -- blocks the host until the device has finished
everything queued before it. In a training iteration every such sync drains the queue and leaves
the GPU idle while Python catches up, so the hot path (the loss, the optimizer step) should have
none; metrics should stay tensors until the one place that logs them.

:func:`count_host_syncs` counts these operations around any block of code, on any machine::

    with count_host_syncs() as syncs:
        trainer.step()
    print(syncs.total, dict(syncs.by_kind), syncs.sites.most_common(5))

It is a :class:`torch.overrides.TorchFunctionMode`, so it sees the calls made through torch's
Python API in the current thread. Counted, by kind (the key of ``by_kind``):

==================  ===================================================================
kind                calls
==================  ===================================================================
``item``            ``t.item()``
``tolist``          ``t.tolist()``
``bool``            ``bool(t)``, ``if t:``, ``t and ...``, ``torch.is_nonzero(t)``, ``x in t``
                    (so ``if (t > 0).any():`` counts once, as ``bool``: ``any``/``all`` alone
                    stay on the device)
``float``           ``float(t)``
``int``             ``int(t)``
``index``           ``t.__index__()``: ``range(t)``, ``lst[t]``, ``operator.index(t)``
``complex``         ``complex(t)``
``numpy``           ``t.numpy()``, ``numpy.asarray(t)`` (``__array__``)
``format``          ``format(t, spec)``, ``f"{t:.3f}"``, ``str(t)``, ``repr(t)`` (printing reads
                    the values)
``nonzero``         ``torch.nonzero``/``t.nonzero()``, ``torch.argwhere``, one-argument
                    ``torch.where(cond)`` (output size depends on the data)
``unique``          ``torch.unique``/``t.unique()``, ``torch.unique_consecutive`` (same)
``masked_select``   ``torch.masked_select``, ``t[mask]`` with a bool/uint8 tensor index (same)
``compare``         ``torch.equal``, ``torch.allclose`` (return a Python bool)
``to_cpu``          ``t.cpu()``, ``t.to("cpu")``, ``t.to(device=...)``/``t.to(other)`` of a device
                    tensor to the CPU; not with ``non_blocking=True`` (a pinned, asynchronous
                    copy that does not block)
==================  ===================================================================

Which tensors count. On a machine with an accelerator only calls on tensors that live on it are
counted (a ``.item()`` of a CPU tensor does not sync anything). On a CPU-only machine every
tensor stands in for the device tensor it would be on a GPU, so calls on CPU tensors are counted
too -- that is what makes the count a CPU-testable prediction of the GPU behaviour. Pass
``include_cpu=True``/``False`` to force either rule. One exception for ``to_cpu``: a CPU tensor
moved with a ``torch.device`` or a tensor argument (``t.to(device=other.device)``, ``t.to(other)``)
is device-generic code whose target would be the GPU on a GPU, so it counts only when the source
tensor is on an accelerator; ``.cpu()`` and the string ``"cpu"`` name the host and always count
(a config string such as ``cfg.device == "cpu"`` on a CPU-only machine counts too). Likewise a
CPU tensor read by ``torch.optim`` code is not counted: optimizers keep their ``step`` counters
on the CPU by design (unless ``capturable``/``fused``) and read them with ``.item()`` every step,
which costs nothing on a GPU either.

Outermost call only. While the mode handles a call it is popped from torch's mode stack, so what
that call does internally is not seen: ``float(t)`` (which calls ``item``) counts once, as
``float``; ``torch.unique`` counts once, not also its internal ops; ``f"{t:.3f}"`` counts once,
as ``format``. A per-counter depth guard enforces the same rule should a tensor subclass re-enter
the mode.

Not counted (limits of a Python-API-level view):

- syncs *inside* a Python-level torch function that itself dispatches through
  ``__torch_function__`` (e.g. an ``.item()`` inside a ``torch.nn.functional`` helper): by the
  outermost rule above, only the outer call is seen, and it is not one of the kinds;
- syncs inside C++ kernels that read device values (``repeat_interleave`` without
  ``output_size``, ``bincount``, ``torch.linalg`` error checks, ``cpu_tensor.copy_(cuda_tensor)``,
  ``x[mask] = values``), ``torch.cuda.synchronize()`` and event/stream ``synchronize()``;
- calls made in other threads (torch function modes are thread-local) or by compiled graphs.

On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` is the device-level equivalent: it warns at
every synchronising CUDA call, including those inside kernels, but it needs a GPU and does not
count or group them. This counter runs in CPU-only tests and reports where the syncs come from.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncCounter", "count_host_syncs"]

_T = torch.Tensor
#: func object (as torch passes it to ``__torch_function__``) -> kind, for the unconditional kinds.
_KIND_OF: dict[Any, str] = {
    _T.item: "item",
    _T.tolist: "tolist",
    _T.__bool__: "bool",
    torch.is_nonzero: "bool",
    _T.is_nonzero: "bool",
    _T.__contains__: "bool",
    _T.__float__: "float",
    _T.__int__: "int",
    _T.__index__: "index",
    _T.__complex__: "complex",
    _T.numpy: "numpy",
    _T.__array__: "numpy",
    _T.__format__: "format",
    _T.__repr__: "format",
    torch.nonzero: "nonzero",
    _T.nonzero: "nonzero",
    torch.argwhere: "nonzero",
    _T.argwhere: "nonzero",
    torch.unique: "unique",
    _T.unique: "unique",
    torch.unique_consecutive: "unique",
    _T.unique_consecutive: "unique",
    torch.masked_select: "masked_select",
    _T.masked_select: "masked_select",
    torch.equal: "compare",
    _T.equal: "compare",
    torch.allclose: "compare",
    _T.allclose: "compare",
    _T.cpu: "to_cpu",
}
#: Every kind :func:`count_host_syncs` can report.
KINDS: tuple[str, ...] = tuple(dict.fromkeys([*_KIND_OF.values(), "to_cpu"]))

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # .../flowalign/
_ROOT_DIR = os.path.dirname(_PKG_DIR.rstrip(os.sep)) + os.sep  # the directory holding flowalign/
_THIS_FILE = os.path.abspath(__file__)
#: torch's dispatch plumbing between a caller and the mode (skipped when looking for the caller).
_PLUMBING = tuple(os.path.join(_TORCH_DIR, name) for name in ("overrides.py", "_tensor.py", "functional.py"))
#: torch code that reads CPU tensors which are host tensors on a GPU machine too (see the docstring).
_HOST_BY_DESIGN = (os.path.join(_TORCH_DIR, "optim") + os.sep,)


@dataclass
class HostSyncCounter:
    """What :func:`count_host_syncs` counted.

    Attributes:
        include_cpu: whether calls on CPU tensors were counted (see the module docstring).
        total: the number of host syncs.
        by_kind: kind -> count (a :class:`collections.Counter`: a missing kind reads 0).
        sites: ``"path:line"`` -> count, the call site: the innermost frame in the ``flowalign``
            package (outside torch and this module), else the innermost frame outside torch
            (e.g. a test). Paths are relative to the directory holding ``flowalign/`` when
            under it.
    """

    include_cpu: bool
    total: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    sites: Counter[str] = field(default_factory=Counter)

    def _record(self, kind: str, site: str) -> None:
        self.total += 1
        self.by_kind[kind] += 1
        self.sites[site] += 1

    def summary(self, top: int = 10) -> str:
        """One line per kind and per call site (the ``top`` busiest), for logs."""
        lines = [f"{self.total} host sync(s)"]
        lines += [f"  {kind}: {n}" for kind, n in self.by_kind.most_common()]
        lines += [f"  at {site}: {n}" for site, n in self.sites.most_common(top)]
        return "\n".join(lines)


def _accelerator_available() -> bool:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


def _tensors(args: tuple, kwargs: dict) -> Iterator[Tensor]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from (x for x in a if isinstance(x, Tensor))


def _on_device(args: tuple, kwargs: dict) -> bool:
    """Whether a tensor argument lives on an accelerator (not the CPU, not ``meta``)."""
    return any(t.device.type not in ("cpu", "meta") for t in _tensors(args, kwargs))


def _is_mask(index: Any) -> bool:
    if isinstance(index, Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, (tuple, list)):
        return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index)
    return False


def _to_cpu_target(args: tuple, kwargs: dict) -> str | None:
    """``Tensor.to(...)``: ``None`` unless a blocking copy to the CPU is asked for; then
    ``"named"`` when the CPU is spelled as a string, ``"generic"`` when it comes as a
    ``torch.device`` or a tensor (``t.to(other.device)``, ``t.to(other)``)."""
    device: Any = kwargs.get("device")
    non_blocking = kwargs.get("non_blocking")
    for a in args[1:]:
        if isinstance(a, bool):
            if non_blocking is None:
                non_blocking = a  # the first positional bool of every overload
        elif isinstance(a, (str, torch.device)) and device is None:
            device = a
        elif isinstance(a, Tensor) and device is None:
            device = a.device
    if device is None or non_blocking or isinstance(device, int):
        return None
    if torch.device(device).type != "cpu":
        return None
    return "named" if isinstance(device, str) else "generic"


def _kind(func: Any, args: tuple, kwargs: dict) -> str | None:
    kind = _KIND_OF.get(func)
    if kind is not None:
        return kind
    if func is _T.to:
        target = _to_cpu_target(args, kwargs)
        if target == "generic" and not _on_device(args[:1], {}):
            return None  # CPU -> CPU via a device object: on a GPU this would be the GPU
        return None if target is None else "to_cpu"
    if func is _T.__getitem__:
        return "masked_select" if len(args) > 1 and _is_mask(args[1]) else None
    if func is torch.where or func is _T.where:
        return "nonzero" if len(args) + len(kwargs) == 1 else None
    return None


def _host_by_design() -> bool:
    """Whether the sync op was called by torch code whose CPU tensors stay on the CPU on a GPU."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path != _THIS_FILE and not path.startswith(_PLUMBING):
            return path.startswith(_HOST_BY_DESIGN)
        frame = frame.f_back
    return False


def _site() -> str:
    fallback = None
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and path != _THIS_FILE:
            if path.startswith(_PKG_DIR):
                return f"{os.path.relpath(path, _ROOT_DIR)}:{frame.f_lineno}"
            if fallback is None:
                shown = os.path.relpath(path, _ROOT_DIR) if path.startswith(_ROOT_DIR) else path
                fallback = f"{shown}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "<unknown>"


class _HostSyncMode(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter
        self._local = threading.local()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        depth = getattr(self._local, "depth", 0)
        kind = _kind(func, args, kwargs) if depth == 0 else None
        if kind is None:
            return func(*args, **kwargs)
        if _on_device(args, kwargs) or (self.counter.include_cpu and not _host_by_design()):
            self.counter._record(kind, _site())
        self._local.depth = depth + 1
        try:
            return func(*args, **kwargs)
        finally:
            self._local.depth = depth


@contextmanager
def count_host_syncs(include_cpu: bool | None = None) -> Iterator[HostSyncCounter]:
    """Count the host syncs made by torch calls in this thread inside the ``with`` block.

    Args:
        include_cpu: count calls on CPU tensors too. ``None`` (default): only on a CPU-only
            machine, where CPU tensors stand in for device tensors; ``True``/``False`` force it.

    Yields:
        A :class:`HostSyncCounter`, updated live and final at exit: ``.total``, ``.by_kind``
        (kind -> count), ``.sites`` (``"path:line"`` -> count). The kinds and what is (not)
        counted are listed in the module docstring.

    Nesting ``count_host_syncs`` blocks is fine: each counter sees every sync in its block.
    Nothing is patched; leaving the block pops the mode, also on an exception.
    """
    if include_cpu is None:
        include_cpu = not _accelerator_available()
    counter = HostSyncCounter(include_cpu=bool(include_cpu))
    with _HostSyncMode(counter):
        yield counter
