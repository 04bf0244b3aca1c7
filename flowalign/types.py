"""The data contract between flowalign's stages (see docs/ARCHITECTURE.md, "The data contract").

Two types flow between stages; nothing passes positional tuples:

* :class:`Conditioning` -- what a pipeline adapter's encoder returns. Algorithms treat it as
  opaque; they only slice it by prompt index, move it, and concatenate it.
* :class:`RolloutTree` -- the result of sampling a batch of prompts, stored as flat tensors.
  A flat Flow-GRPO group is a tree that branches only at the root (G initial noises per prompt);
  BranchGRPO / TempFlow trees branch at chosen steps. The trainer iterates over *edges*
  (transitions x_t -> x_next), each with its own advantage and weight.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Prompt conditioning produced by ``PipelineAdapter.encode``.

    Attributes:
        tensors: named tensors, each with the prompt batch as dim 0, e.g.
            ``{"prompt_embeds": [B, L, D], "pooled": [B, D]}``.
        negative: the unconditional / negative-prompt counterpart with the same keys and
            shapes, present when classifier-free guidance is used; ``None`` otherwise.
    """

    tensors: dict[str, Tensor]
    negative: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, index: Tensor | slice | int | Sequence[int]) -> "Conditioning":
        """Select prompts along dim 0 (an index tensor may repeat prompts)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)

        def take(d: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
            if d is None:
                return None
            return {k: v[index.to(v.device) if isinstance(index, Tensor) else index] for k, v in d.items()}

        return Conditioning(take(self.tensors), take(self.negative))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move every tensor; ``dtype`` only applies to floating-point tensors."""

        def move(d: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
            if d is None:
                return None
            return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in d.items()}

        return Conditioning(move(self.tensors), move(self.negative))

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate conditionings along the prompt dimension."""
        keys = parts[0].tensors.keys()
        tensors = {k: torch.cat([p.tensors[k] for p in parts]) for k in keys}
        negative = None
        if parts[0].negative is not None:
            negative = {k: torch.cat([p.negative[k] for p in parts]) for k in parts[0].negative}
        return Conditioning(tensors, negative)


@dataclass
class RolloutTree:
    """A batch of sampled trajectories, as flat tensors (E edges, L leaves, T steps).

    Per edge ``e`` (one transition x_t -> x_next at ``step[e]``):
        prompt_idx: ``[E]`` long, index into ``prompts``.
        parent: ``[E]`` long, id of the edge whose ``x_next`` is this edge's ``x_t``; -1 for
            edges leaving an initial noise.
        step: ``[E]`` long, index into ``sigmas`` (the edge goes sigmas[step] -> sigmas[step+1]).
        x_t, x_next: ``[E, *latent_shape]`` latents before / after the transition.
        log_prob_old: ``[E]`` fp32 log-density of ``x_next`` under the sampling policy (mean over
            latent dims); 0 where the transition is deterministic.
        noise_std: ``[E]`` fp32 std of the transition's Gaussian; 0 for ODE transitions.
        trainable: ``[E]`` bool, whether the edge receives a policy-gradient update (an SDE edge
            not pruned by the spec). Pruning never changes what was sampled.
        mean_old: ``[E, *latent_shape]`` transition means, kept when a KL term needs them.
        velocity: ``[E, *latent_shape]`` the (guided) model velocity at the edge's ``x_t``, kept when
            look-ahead estimators reuse it as the first step of an ODE look-ahead from ``x_t``.

    Per leaf ``l`` (one finished sample):
        leaf_prompt_idx: ``[L]`` long, index into ``prompts``.
        leaf_group: ``[L]`` long, global group id (the prompt's index in the global batch), so
            groups can span ranks.
        leaf_edges: ``[L, T]`` long, the ids of the edges on the leaf's path, in step order.
        leaf_latents: ``[L, *latent_shape]`` final latents.
        media: decoded media in [0, 1]: ``[L, 3, H, W]`` images or ``[L, F, 3, H, W]`` video.

    The tree holds what sampling produced; scores and values computed from it (rewards, look-ahead
    values, advantages) are passed explicitly to what needs them, never stored on the tree.

    Batch-wide:
        prompts: the prompt strings indexed by ``prompt_idx``.
        sigmas: ``[T + 1]`` the schedule, descending from 1 to 0.
        nfe: number of per-sample model evaluations spent on the rollout (a CFG evaluation
            counts once; shared prefixes are counted once).
    """

    prompt_idx: Tensor
    parent: Tensor
    step: Tensor
    x_t: Tensor
    x_next: Tensor
    log_prob_old: Tensor
    noise_std: Tensor
    trainable: Tensor
    leaf_prompt_idx: Tensor
    leaf_group: Tensor
    leaf_edges: Tensor
    leaf_latents: Tensor
    prompts: list[str]
    sigmas: Tensor
    nfe: int
    mean_old: Tensor | None = None
    velocity: Tensor | None = None
    media: Tensor | None = None

    @property
    def num_edges(self) -> int:
        return int(self.step.shape[0])

    @property
    def num_leaves(self) -> int:
        return int(self.leaf_prompt_idx.shape[0])

    def to(self, device: torch.device | str) -> "RolloutTree":
        """A copy with every tensor moved to ``device``."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                moved[f.name] = v.to(device)
        return replace(self, **moved)
