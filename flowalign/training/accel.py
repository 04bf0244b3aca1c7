"""Releasing accelerate's process-global state at the end of a run."""

from __future__ import annotations

from accelerate import Accelerator


def end_accelerator(accelerator: Accelerator) -> None:
    """End ``accelerator``'s trackers and release accelerate's process-global state.

    accelerate keeps mixed-precision and gradient-accumulation settings in singletons; resetting
    them lets a second run in the same process (a notebook, a sweep, a benchmark) choose other
    settings. The process group (``PartialState``) is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
