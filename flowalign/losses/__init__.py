"""Policy losses (docs/ARCHITECTURE.md, "Advantages and losses"), selected by name from :data:`LOSSES`.

Each loss returns ``(loss, metrics)``: a 0-dim tensor to backpropagate and a dict of 0-dim tensors
(brought to the host once per optimizer step by the recipe).
"""

from __future__ import annotations

from typing import Callable

from flowalign.losses.awm import awm_loss
from flowalign.losses.ppo import KL_FORMS, kl_form_scale, kl_on_means, ppo_clip_loss

__all__ = ["KL_FORMS", "LOSSES", "awm_loss", "get_loss", "kl_form_scale", "kl_on_means", "ppo_clip_loss"]

#: Static name -> loss table.
LOSSES: dict[str, Callable] = {
    "ppo_clip": ppo_clip_loss,
    "awm": awm_loss,
}


def get_loss(name: str) -> Callable:
    """Look up a loss by name; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; valid names: {sorted(LOSSES)}") from None
