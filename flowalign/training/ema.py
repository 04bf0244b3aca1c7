"""Exponential moving average (EMA) of a module's trainable parameters.

θ_ema ← d·θ_ema + (1 − d)·θ  -- exponential Polyak averaging (Polyak & Juditsky 1992, "Acceleration
of stochastic approximation by averaging"; the exponential form is Eq. (1) of Tarvainen & Valpola
2017, "Mean teachers are better role models", θ'_t = α θ'_{t-1} + (1 − α) θ_t).

Shadow weights are kept in at least float32 (bf16 / fp16 parameters are averaged in fp32, since
(1 − d)·θ with d = 0.999 is below bf16 resolution relative to θ_ema) on the parameter's device.
Only parameters with ``requires_grad=True`` at construction are tracked, by name; a module wrapped
by DistributedDataParallel / DataParallel / ``torch.compile`` is unwrapped first so names match.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["EMA", "ema_update_"]


def _unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile wrappers (whose parameter names carry a prefix)."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):  # torch.compile
            module = module._orig_mod
        else:
            return module


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in _unwrap(module).named_parameters() if p.requires_grad}


@torch.no_grad()
def ema_update_(shadow: Tensor, param: Tensor, decay: float) -> None:
    """In place: ``shadow ← decay·shadow + (1 − decay)·param`` (Tarvainen & Valpola 2017, Eq. 1).

    ``lerp_(p, w)`` computes ``shadow + w·(p − shadow) = (1 − w)·shadow + w·p`` with w = 1 − decay.
    """
    shadow.lerp_(param.detach().to(device=shadow.device, dtype=shadow.dtype), 1.0 - decay)


class EMA:
    """EMA of a module's trainable parameters.

    Args:
        module: the model (or LoRA-wrapped model) being trained.
        decay: d in θ_ema ← d·θ_ema + (1 − d)·θ, in [0, 1].
        update_after_step: :meth:`update` is a no-op while ``step < update_after_step``, copies
            θ_ema ← θ at ``step == update_after_step`` and averages after. The rule depends on
            ``step`` alone, so a resumed run continues exactly.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, update_after_step: int = 0) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if isinstance(update_after_step, bool) or not isinstance(update_after_step, int) or update_after_step < 0:
            raise ValueError(f"update_after_step must be a non-negative int, got {update_after_step!r}")
        params = _trainable(module)
        if not params:
            raise ValueError("module has no trainable parameters (requires_grad=True) to average")
        self.decay = decay
        self.update_after_step = update_after_step
        self.shadow: dict[str, Tensor] = {
            n: p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone() for n, p in params.items()
        }

    def _params_of(self, module: nn.Module, arg: str = "module") -> dict[str, nn.Parameter]:
        params = _trainable(module)
        missing = sorted(set(self.shadow) - set(params))
        unexpected = sorted(set(params) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"{arg}'s trainable parameters do not match the EMA's: missing {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}"
            )
        for n, p in params.items():
            if p.shape != self.shadow[n].shape:
                raise ValueError(f"{arg} parameter {n!r} has shape {tuple(p.shape)}, EMA has {tuple(self.shadow[n].shape)}")
        return params

    @torch.no_grad()
    def update(self, module: nn.Module, step: int, decay: float | None = None) -> None:
        """Fold the module's current weights into the average (see the class doc for ``step``).

        ``decay`` overrides :attr:`decay` for this update (a decay schedule, e.g. AWM's EMA-KL copy)."""
        if decay is not None and not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        d = self.decay if decay is None else float(decay)
        if step < self.update_after_step:
            return
        params = self._params_of(module)
        for n, p in params.items():
            shadow = self.shadow[n]
            if shadow.device != p.device:
                shadow = self.shadow[n] = shadow.to(p.device)
            if step == self.update_after_step:
                shadow.copy_(p.detach())
            else:
                ema_update_(shadow, p, d)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow weights, name -> tensor (references, like ``nn.Module.state_dict``)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load shadow weights; names and shapes must match exactly.

        Raises:
            ValueError: listing missing / unexpected names or the first shape mismatch.
        """
        if not isinstance(state, dict):
            raise TypeError(f"EMA state must be a dict[str, Tensor], got {type(state).__name__}")
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state names do not match: missing {missing}, unexpected {unexpected}")
        for n, v in state.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"EMA state[{n!r}] must be a Tensor, got {type(v).__name__}")
            if v.shape != self.shadow[n].shape:
                raise ValueError(f"EMA state[{n!r}] has shape {tuple(v.shape)}, expected {tuple(self.shadow[n].shape)}")
        for n, v in state.items():
            self.shadow[n].copy_(v)

    @contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``module`` (e.g. for evaluation); restore after.

        The original weights are restored even if the body raises.
        """
        params = self._params_of(module)
        with torch.no_grad():
            backup = {n: p.detach().clone() for n, p in params.items()}
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])
