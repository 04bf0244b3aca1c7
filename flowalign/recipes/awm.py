"""The matching-loss recipe: Advantage Weighted Matching (AWM, Xue et al. 2025, arXiv:2509.25050).

Same loop as :class:`flowalign.recipes.rl.RLRecipe` -- rollout, rewards gathered over the global
group, the algorithm's advantages (``algorithm.name: awm``, :mod:`flowalign.algorithms.awm`) -- with
only the update step replaced. Instead of PPO on the
sampled transitions' log-probs, every sampled final ``x0`` is re-noised with the forward process
at a fresh time ``σ ~ U(0, 1)`` and fresh noise ``ε`` and trained with the pretraining
flow-matching loss weighted by its advantage (:func:`flowalign.losses.awm.awm_loss`), plus an
optional velocity-space KL to the reference policy (LoRA disabled, or the frozen copy kept for
full fine-tuning). No log-probs are used, so the sampler is free (AWM is solver-agnostic).

Per iteration: the local leaves are shuffled and split evenly over ``train.steps_per_iter``
optimizer steps (micro-batches of ``train.micro_batch_size``). The shuffle, ``σ`` and ``ε`` come
from the ``("awm", iteration, rank)`` stream, so a resumed run replays the same updates.

The update runs the model without classifier-free guidance (the conditional branch): the loss is
the pretraining objective, which trains the conditional velocity.
"""

from __future__ import annotations

import torch

from flowalign.algorithms.flow import EdgeTargets
from flowalign.losses.awm import awm_loss, flow_matching_pair
from flowalign.recipes.rl import RLRecipe
from flowalign.training.rng import stream_generator
from flowalign.types import Conditioning, RolloutTree

__all__ = ["AWMRecipe", "awm_draws", "leaf_advantages_from_edges"]


def leaf_advantages_from_edges(edge_adv: torch.Tensor, leaf_edges: torch.Tensor) -> torch.Tensor:
    """Each leaf's own advantage, read off the last edge of its path.

    The last edge of a leaf's path leads to the leaf itself, so no other leaf shares it and
    :func:`flowalign.advantages.edge_advantages` gave it exactly that leaf's advantage.

    Args:
        edge_adv: ``[E]`` per-edge advantages from ``edge_advantages``.
        leaf_edges: ``[L, T]`` ``RolloutTree.leaf_edges``.

    Returns:
        ``[L]`` float32 leaf advantages.

    Raises:
        ValueError: a path's last entry is padding (-1) or two leaves end on the same edge.
    """
    if leaf_edges.dim() != 2 or leaf_edges.shape[1] == 0:
        raise ValueError(f"leaf_edges must be [L, T] with T >= 1, got shape {tuple(leaf_edges.shape)}")
    last = leaf_edges[:, -1].long()
    if bool((last < 0).any()):
        raise ValueError("leaf_edges: a leaf's path ends in padding (-1); every leaf must end at the last step")
    if last.unique().numel() != last.numel():
        raise ValueError("leaf_edges: two leaves end on the same edge; a leaf's last edge must be its own")
    return edge_adv[last.to(edge_adv.device)].float()


def awm_draws(num_leaves: int, latent_shape: tuple[int, ...], generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random choices of one AWM update, drawn in a fixed order from ``generator``.

    Returns:
        ``(order [L] long, sigma [L] fp32 ~ U(0, 1), noise [L, *latent_shape] fp32 ~ N(0, I))``;
        ``sigma[i]`` and ``noise[i]`` belong to leaf ``i`` (not to position ``i`` of ``order``).
    """
    order = torch.randperm(num_leaves, generator=generator)
    sigma = torch.rand(num_leaves, generator=generator)
    noise = torch.randn((num_leaves, *latent_shape), generator=generator)
    return order, sigma, noise


class AWMRecipe(RLRecipe):
    """AWM training: the RL recipe's rollout / rewards / advantages, an advantage-weighted
    flow-matching update (``algorithm.kl_beta`` weights the velocity KL)."""

    def _update(self, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets, noise_levels: torch.Tensor,
                iteration: int) -> dict[str, float]:
        """``train.steps_per_iter`` optimizer steps of the AWM loss over this rank's leaves (the
        rollout's noise levels play no part: AWM uses no log-probs)."""
        cfg = self.cfg
        leaf_adv = leaf_advantages_from_edges(targets.advantages, tree.leaf_edges)
        order, sigma, noise = awm_draws(tree.num_leaves, tuple(tree.leaf_latents.shape[1:]),
                                        stream_generator(cfg.seed, "awm", iteration, self.rank))
        return self._optimize(order, lambda mb: self._sample_loss(tree, cond, leaf_adv, sigma, noise, mb), iteration)

    def _sample_loss(self, tree: RolloutTree, cond: Conditioning, leaf_adv: torch.Tensor, sigma: torch.Tensor,
                     noise: torch.Tensor, mb: torch.Tensor):
        """AWM loss of a micro-batch of leaves ``mb [B]``: re-noise their finals, match ``ε − x0``."""
        cfg, acc = self.cfg, self.accelerator
        x0 = tree.leaf_latents[mb].float()
        s = sigma[mb].to(x0.device)
        x_s, target = flow_matching_pair(x0, noise[mb].to(x0.device), s)
        x_s = x_s.to(self.adapter.dtype)
        c = cond[tree.leaf_prompt_idx[mb]]
        with acc.autocast():
            v = self.adapter.predict(x_s, s, c, 1.0)
        v_ref = None
        if cfg.algorithm.kl_beta > 0:
            with torch.no_grad(), self.adapter.disable_adapter(), acc.autocast():
                v_ref = self.adapter.predict(x_s, s, c, 1.0)
        return awm_loss(v.float(), target, leaf_adv[mb].to(v.device), v_ref=v_ref, kl_beta=cfg.algorithm.kl_beta, check=False)
