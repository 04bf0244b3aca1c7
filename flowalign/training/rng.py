"""Random streams of a run: named per-purpose generators, and the global generators' state.

:func:`stream_generator` derives one CPU generator per named stream and indices (``("rollout",
iteration, rank)``), so what a run draws never depends on what ran before it: a resumed run replays
exactly what an uninterrupted one would have done. :func:`prompt_indices` picks an iteration's
prompts from such a stream. :class:`RowStreams` gives each block of a batch's rows (a prompt
group) its own stream (:func:`rand_rows`, :func:`randint_rows`), so that what a group draws does
not depend on which rank holds it nor on the groups beside it (the dLLM recipe keys them by
``(iteration, prompt)``).

Capture and restore every global random-number generator, for exact resume.

The state covers Python's ``random``, NumPy's global generator, torch's CPU generator and, when
CUDA is available, the generator of every visible CUDA device. Explicit ``torch.Generator`` objects
owned by a recipe are not global; save their ``get_state()`` beside this dict.

The returned dict holds only types that ``torch.load(..., weights_only=True)`` accepts (ints,
floats, strings, tuples, lists, dicts and tensors), so a checkpoint's ``rng.pt`` never needs
arbitrary unpickling: NumPy's ``uint32`` key array is stored as an ``int64`` tensor.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["RowStreams", "capture_rng_state", "prompt_indices", "rand_rows", "randint_rows", "restore_rng_state",
           "stream_generator", "stream_seed"]

_KEYS = ("python", "numpy", "torch", "cuda")


def stream_seed(seed: int, stream: str, *indices: int) -> int:
    """The 32-bit seed of one named random stream (what :func:`stream_generator` seeds with)."""
    words = [seed, *(ord(c) for c in stream), *indices]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def stream_generator(seed: int, stream: str, *indices: int) -> torch.Generator:
    """A CPU generator for one named random stream, e.g. ``("rollout", iteration, rank)``."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, *indices))


class RowStreams:
    """One random stream per block of consecutive rows: what a batch draws row by row when its
    rows must not depend on which other rows share the batch (a process's share of a global batch).

    Block ``i`` covers rows ``[sum(sizes[:i]), sum(sizes[:i + 1]))`` and draws from its own
    generator, seeded with ``seeds[i]`` and created on the device of the first draw (on the CPU it
    is :func:`stream_generator`'s generator of that seed). A draw of shape ``[B, ...]``
    (:func:`rand_rows`, :func:`randint_rows`, with ``B = sum(sizes)``) is the concatenation over
    the blocks of the draw of shape ``[size_i, ...]`` from block ``i``'s generator, so a block's
    rows are the same whichever blocks sit beside it; a single block equals the plain draw from its
    generator. The generators keep their state between draws, as one ``torch.Generator`` does.

    Args:
        seeds: one seed per block (e.g. :func:`stream_seed` of ``("rollout", iteration, prompt)``).
        sizes: rows per block (>= 0), same length.
    """

    def __init__(self, seeds: list[int], sizes: list[int]):
        if len(seeds) != len(sizes):
            raise ValueError(f"RowStreams needs one size per seed, got {len(seeds)} seeds and {len(sizes)} sizes")
        if any(int(n) < 0 for n in sizes):
            raise ValueError(f"RowStreams block sizes must be >= 0, got {list(sizes)}")
        self.seeds, self.sizes = [int(s) for s in seeds], [int(n) for n in sizes]
        self._generators: dict[tuple[int, torch.device], torch.Generator] = {}

    @classmethod
    def for_blocks(cls, seed: int, stream: str, blocks: list[int], sizes: list[int], *, prefix: tuple[int, ...] = (),
                   suffix: tuple[int, ...] = ()) -> RowStreams:
        """Block ``i`` draws from stream ``(stream, *prefix, blocks[i], *suffix)``, e.g.
        ``("masks", iteration, prompt, inner_step)``."""
        return cls([stream_seed(seed, stream, *prefix, int(b), *suffix) for b in blocks], sizes)

    @classmethod
    def for_rows(cls, seed: int, stream: str, block_of_row: torch.Tensor, *, prefix: tuple[int, ...] = (),
                 suffix: tuple[int, ...] = ()) -> RowStreams:
        """The blocks of consecutive equal values of ``block_of_row`` (``[B]`` ints, e.g. each
        row's global prompt index), each drawing from ``(stream, *prefix, value, *suffix)``."""
        values = block_of_row.reshape(-1).tolist()
        blocks, sizes = [], []
        for v in values:
            if blocks and blocks[-1] == v:
                sizes[-1] += 1
            else:
                blocks.append(int(v))
                sizes.append(1)
        return cls.for_blocks(seed, stream, blocks, sizes, prefix=prefix, suffix=suffix)

    @property
    def rows(self) -> int:
        """``B``: the rows a draw covers."""
        return sum(self.sizes)

    def generator(self, block: int, device: torch.device | str | None = None) -> torch.Generator:
        """Block ``block``'s generator on ``device`` (CPU by default), created at its first use."""
        dev = torch.device("cpu" if device is None else device)
        key = (block, dev)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=dev).manual_seed(self.seeds[block])
        return self._generators[key]

    def _draw(self, out: torch.Tensor, fill) -> torch.Tensor:
        """Fill ``out [B, ...]`` block by block in place (``fill(rows_view, generator)``; no
        concatenation, so a large draw -- Gumbel noise over a vocabulary -- is held once)."""
        if out.dim() == 0 or out.shape[0] != self.rows:
            raise ValueError(f"RowStreams covers {self.rows} rows ({self.sizes}); a draw of shape {tuple(out.shape)} does not match")
        start = 0
        for i, n in enumerate(self.sizes):
            if n:
                fill(out[start:start + n], self.generator(i, out.device))
            start += n
        return out


Generator = torch.Generator | RowStreams | None


def rand_rows(shape: tuple[int, ...], generator: Generator, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.rand(shape)`` from ``generator``: a ``torch.Generator`` (or ``None``, the global
    one) draws it whole; :class:`RowStreams` block by block along dim 0."""
    if isinstance(generator, RowStreams):
        out = torch.empty(tuple(int(d) for d in shape), device=device, dtype=dtype)
        return generator._draw(out, lambda rows, g: torch.rand(rows.shape, generator=g, out=rows))
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def randint_rows(low: int, high: int, shape: tuple[int, ...], generator: Generator, *,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.randint(low, high, shape)`` from ``generator`` (see :func:`rand_rows`)."""
    if isinstance(generator, RowStreams):
        out = torch.empty(tuple(int(d) for d in shape), device=device, dtype=torch.long)
        return generator._draw(out, lambda rows, g: torch.randint(low, high, rows.shape, generator=g, out=rows))
    return torch.randint(low, high, shape, generator=generator, device=device)


def prompt_indices(num_prompts: int, per_iter: int, iteration: int, seed: int) -> list[int]:
    """Prompts of one iteration: consecutive slices of a fresh seeded permutation per epoch."""
    out = []
    for position in range(iteration * per_iter, (iteration + 1) * per_iter):
        epoch, offset = divmod(position, num_prompts)
        perm = torch.randperm(num_prompts, generator=stream_generator(seed, "prompts", epoch))
        out.append(int(perm[offset]))
    return out


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the global RNGs.

    Returns:
        ``{"python": random.getstate(), "numpy": {...}, "torch": ByteTensor, "cuda": list[ByteTensor]
        | None}`` where ``"numpy"`` is ``{"bit_generator": str, "key": int64 Tensor [624], "pos":
        int, "has_gauss": int, "gauss": float}`` and ``"cuda"`` has one state per visible device
        (``None`` without CUDA).
    """
    np_state = np.random.get_state(legacy=False)
    if np_state["bit_generator"] != "MT19937":  # np.random's global generator is always MT19937
        raise RuntimeError(f"unexpected numpy global bit generator {np_state['bit_generator']!r}")
    cuda = None
    if torch.cuda.is_available():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNGs from a :func:`capture_rng_state` snapshot.

    After this call the next ``random`` / ``numpy.random`` / ``torch.rand`` (CPU and CUDA) draws
    equal those that followed the capture.

    Raises:
        TypeError / ValueError: naming the missing or malformed key.
    """
    if not isinstance(state, dict):
        raise TypeError(f"rng state must be a dict from capture_rng_state(), got {type(state).__name__}")
    missing = [k for k in _KEYS if k not in state]
    if missing:
        raise ValueError(f"rng state is missing key(s) {missing}; expected keys {list(_KEYS)}")

    py = state["python"]
    try:
        # torch.load may hand tuples back as lists; random.setstate needs the exact tuple shape.
        version, internal, gauss_next = py
        random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    except (TypeError, ValueError) as err:
        raise ValueError(f"rng state key 'python' is not a random.getstate() tuple: {err}") from err

    npst = state["numpy"]
    need = ("bit_generator", "key", "pos", "has_gauss", "gauss")
    if not isinstance(npst, dict) or any(k not in npst for k in need):
        raise ValueError(f"rng state key 'numpy' must be a dict with keys {list(need)}")
    key = torch.as_tensor(npst["key"]).cpu().numpy().astype(np.uint32)
    if key.shape != (624,):
        raise ValueError(f"rng state key 'numpy.key' must have shape (624,), got {tuple(key.shape)}")
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": key, "pos": int(npst["pos"])},
            "has_gauss": int(npst["has_gauss"]),
            "gauss": float(npst["gauss"]),
        }
    )

    cpu = state["torch"]
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8:
        raise ValueError("rng state key 'torch' must be the uint8 tensor from torch.get_rng_state()")
    torch.set_rng_state(cpu.cpu())

    cuda = state["cuda"]
    if cuda is None:
        return
    if not isinstance(cuda, (list, tuple)):
        raise ValueError("rng state key 'cuda' must be a list of per-device states or None")
    if not torch.cuda.is_available():
        warnings.warn(
            f"rng state holds {len(cuda)} CUDA generator state(s) but CUDA is not available; "
            "only the CPU generators were restored",
            stacklevel=2,
        )
        return
    n_dev = torch.cuda.device_count()
    if len(cuda) != n_dev:
        warnings.warn(
            f"rng state holds {len(cuda)} CUDA generator state(s) but {n_dev} device(s) are visible; "
            f"restoring the first {min(len(cuda), n_dev)}",
            stacklevel=2,
        )
    for device, dev_state in enumerate(cuda[:n_dev]):
        torch.cuda.set_rng_state(torch.as_tensor(dev_state).cpu(), device)
