"""Guards of the training invariants of docs/ARCHITECTURE.md: finite values (invariant 3: a NaN reward or loss
never reaches the optimizer silently) and on-policy first steps (invariant 2).

:func:`assert_finite` is a pure check: it returns its input unchanged (same object, autograd graph
intact) or raises :class:`FloatingPointError` naming what was checked and where it went wrong.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RATIO_TOLERANCES", "assert_finite", "assert_on_policy", "resolve_ratio_tolerance"]

#: the on-policy check's bound on max |ratio - 1| at the first inner step when ``algorithm.ratio_tolerance`` is
#: null, by where the model computes (docs/ARCHITECTURE.md invariant 2; image and dLLM recipes alike). The rollout and the update evaluate the
#: same weights on the same inputs but batch them differently (the update's micro-batches mix steps and trees),
#: so a log-prob -- a sum over every latent element -- comes out of different kernels / reduction orders:
#: * ``cpu``: float32 on the CPU: the quickstart presets log 0 to 1.2e-7 (one float32 ulp of 1), so 1e-5 still
#:   flags any real change;
#: * ``cuda``: float32 weights on a GPU, where cuBLAS / cuDNN pick algorithms by batch shape and may use TF32
#:   (10-bit mantissa) matmuls: one H200 FSDP quickstart measured 1.27e-5 (docs/SCALING.md); 1e-4 leaves ~8x room
#:   and is still the PPO clip range of Flow-GRPO's SD3.5 recipe (1e-4), i.e. no policy step has been taken yet;
#: * ``half``: bfloat16 / float16 weights or autocast on any device: one rounding of a bfloat16 value is up to
#:   2^-8 = 3.9e-3 relative (float16 2^-11), so log-probs from differently batched GPU kernels may differ by
#:   ~1e-3 (an estimate: not measured on a GPU; bf16 autocast on the CPU logs 0, the same kernels either way);
#:   1e-2 still catches the bugs the check is for (dropout left on, another model or scheduler), which move the
#:   ratio by O(1).
RATIO_TOLERANCES: dict[str, float] = {"cpu": 1e-5, "cuda": 1e-4, "half": 1e-2}


# How many offending entries an error message lists before summarizing the rest.
_MAX_REPORTED = 5


def assert_finite(tensor: Tensor, what: str) -> Tensor:
    """Raise if ``tensor`` holds a NaN or an infinity; otherwise return it unchanged.

    Args:
        tensor: any shape, any dtype. Integer and bool tensors are always finite.
        what: a short name for the tensor (``"rewards"``, ``"loss"``), put first in the message.

    Returns:
        ``tensor`` itself (not a copy), so the call can wrap an expression.

    Raises:
        TypeError: ``tensor`` is not a ``torch.Tensor`` or ``what`` is not a string.
        FloatingPointError: ``"{what} contains NaN/Inf at indices [...]: values [...]"`` with the
            first few offending indices (tuples for tensors with more than one dimension) and
            the count of non-finite entries.
    """
    if not isinstance(what, str):
        raise TypeError(f"assert_finite: `what` must be a str naming the tensor, got {type(what).__name__}")
    if not isinstance(tensor, Tensor):
        raise TypeError(f"assert_finite: {what} must be a torch.Tensor, got {type(tensor).__name__}")
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return tensor
    with torch.no_grad():
        bad = ~torch.isfinite(tensor.detach())
        if not bool(bad.any()):
            return tensor
        count = int(bad.sum())
        if tensor.dim() == 0:
            indices: list = [()]
            values = [tensor.detach().item()]
        else:
            where = torch.nonzero(bad)[:_MAX_REPORTED].cpu()
            flat = tensor.detach()[bad][:_MAX_REPORTED].cpu().tolist()
            if tensor.dim() == 1:
                indices = [int(row[0]) for row in where]
            else:
                indices = [tuple(int(i) for i in row) for row in where]
            values = flat
    more = " (first %d shown)" % _MAX_REPORTED if count > _MAX_REPORTED else ""
    raise FloatingPointError(
        f"{what} contains NaN/Inf at indices {indices}: values {values}{more}; "
        f"{count} of {tensor.numel()} entries non-finite, shape {tuple(tensor.shape)}"
    )


def assert_on_policy(ratio_dev: float, tolerance: float, likely_causes: str) -> None:
    """docs/ARCHITECTURE.md invariant 2: at the first inner step, before any weight changes, the recomputed
    log-probs equal the old ones, so ``max |ratio - 1|`` (``ratio_dev``) is at most ``tolerance``
    (``algorithm.ratio_tolerance``).

    Raises:
        RuntimeError: naming the deviation, the key and ``likely_causes`` (the recipe's own hint).
    """
    if ratio_dev > tolerance:
        raise RuntimeError(f"on-policy check failed: max |ratio - 1| = {ratio_dev:.3g} > algorithm.ratio_tolerance="
                           f"{tolerance} at the first inner step; {likely_causes}")


def resolve_ratio_tolerance(tolerance: float | None, device_type: str, dtype: torch.dtype) -> float:
    """The on-policy check's tolerance: ``algorithm.ratio_tolerance`` when set (a number is used as given),
    else :data:`RATIO_TOLERANCES` for the device type (``"cpu"``, ``"cuda"``, ``"mps"``...) and the dtype the
    model computes in (``torch.bfloat16`` / ``torch.float16`` -> ``"half"`` on any device; float32 / float64 on a
    device other than the CPU -> ``"cuda"``'s)."""
    if tolerance is not None:
        return float(tolerance)
    if dtype in (torch.bfloat16, torch.float16):
        return RATIO_TOLERANCES["half"]
    return RATIO_TOLERANCES["cpu" if device_type == "cpu" else "cuda"]
