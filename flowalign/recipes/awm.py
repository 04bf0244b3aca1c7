"""The matching-loss recipe: Advantage Weighted Matching (AWM, Xue et al. 2025, arXiv:2509.25050).

Same loop as :class:`flowalign.recipes.rl.RLRecipe` -- rollout, rewards gathered over the global
group, the algorithm's advantages (``algorithm.name: awm``, :mod:`flowalign.algorithms.awm`) -- with
only the update step replaced. Instead of PPO on the sampled transitions' log-probs, every sampled
final ``x0`` is re-noised with the forward process at ``algorithm.awm.train_timesteps`` times ``σ``
(drawn as ``algorithm.awm.time_sampling`` says) with fresh noise ``ε`` each, and trained with the
flow-matching loss (:func:`flowalign.losses.awm.awm_loss`): by default the reference's PPO-style
ratio of the time-weighted flow-matching log-likelihood, plus velocity-space KLs to the reference
policy (LoRA disabled, or the frozen copy kept for full fine-tuning; ``algorithm.kl_beta``) and to
an EMA copy of the policy (``algorithm.awm.ema_kl_beta``). No sampler log-probs are used, so the
sampler is free (AWM is solver-agnostic).

The reference is scxue/advantage_weighted_matching @ be51372,
``advantage_weighted_matching/scripts/train_sd3_awm.py`` (cited by line below).

Per iteration: the local leaves are shuffled and split evenly over ``train.steps_per_iter``
optimizer steps (micro-batches of ``train.micro_batch_size`` leaves, each expanded into its
``train_timesteps`` rows). The shuffle, the times and the noises come from the
``("awm", iteration, rank)`` stream, so a resumed run replays the same updates. ``log p_old`` of
the leaves of the first optimizer step is the current one detached (the reference's on-policy
pass, lines 1282-1284: ratio 1); that of the later steps' leaves is computed before the first
step with the same draws (the reference's old-log-prob pass, lines 1119-1238). The EMA copy is
updated once per iteration after the update (lines 1409-1419) and checkpointed with the run.

The update runs the model without classifier-free guidance (the conditional branch, the
reference's ``train.cfg = False``): the loss is the pretraining objective, which trains the
conditional velocity.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from flowalign.algorithms.flow import EdgeTargets
from flowalign.losses.awm import awm_log_likelihood, awm_loss, flow_matching_pair
from flowalign.recipes.rl import RLRecipe
from flowalign.training.ema import EMA
from flowalign.training.rng import stream_generator
from flowalign.types import Conditioning, RolloutTree

__all__ = ["AWMRecipe", "awm_draws", "awm_times", "ema_kl_decay", "leaf_advantages_from_edges"]

#: prefix of the EMA-KL copy's names in the checkpoint's ``ema.safetensors`` (beside train.ema_decay's)
KL_EMA_PREFIX = "awm_kl_ema/"


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


def _shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 time shift ``s·t / (1 + (s − 1)·t)`` (train_sd3_awm.py lines 1156, 1169)."""
    return shift * t / (1 + (shift - 1) * t)


def awm_times(kind: str, num_leaves: int, count: int, generator: torch.Generator, *, grid: torch.Tensor | None = None,
              timestep_fraction: float = 0.9, shift: float = 3.0) -> torch.Tensor:
    """``[L, count]`` training times per leaf, stratified into ``count`` bins (train_sd3_awm.py lines 1138-1207).

    * ``discrete_wo_init`` / ``discrete``: bin edges ``linspace(first, int(N·timestep_fraction), count + 1)``
      truncated to integers (first = 1 / 0, N = the rollout's steps); one step index per bin drawn
      uniformly in ``[lower, upper)`` (``lower`` when the bin is empty); the time is the rollout grid's
      ``σ`` at that index (the step's starting time; lines 1172-1205);
    * ``uniform``: ``(k + u_k)/count`` mapped to ``[0.2, 1]``, then shifted (lines 1162-1170);
    * ``logit_normal``: ``Φ⁻¹((k + u_k)/count)`` through a sigmoid, shifted, at least 0.01 (lines 1138-1160).

    Each leaf draws its own bins (the reference draws one set per micro-batch for ``discrete*`` and
    ``logit_normal``); the order of the times within a leaf plays no part (the loss averages them).

    Args:
        kind: one of :data:`flowalign.algorithms.awm.TIME_SAMPLINGS`.
        num_leaves, count: L and the number of times per leaf.
        generator: the random stream.
        grid: ``[N + 1]`` the rollout's descending ``σ`` grid (``discrete*``).
        timestep_fraction, shift: see :class:`flowalign.algorithms.awm.AWMConfig`.

    Returns:
        ``[L, count]`` float32 times in ``[0, 1]``.
    """
    u = torch.rand(num_leaves, count, generator=generator)
    k = torch.arange(count, dtype=torch.float32)
    if kind in ("discrete_wo_init", "discrete"):
        if grid is None:
            raise ValueError(f"awm_times: time sampling {kind!r} needs the rollout's sigma grid")
        n_steps = len(grid) - 1
        first = 1 if kind == "discrete_wo_init" else 0
        last = int(n_steps * timestep_fraction)
        if last <= first:
            raise ValueError(f"awm_times: {kind} draws steps [{first}, {last}): empty (num_steps={n_steps}, "
                             f"timestep_fraction={timestep_fraction})")
        edges = torch.linspace(first, last, steps=count + 1).long()  # .long() truncates, as the reference's
        lower, upper = edges[:-1], edges[1:]
        idx = lower + (u * (upper - lower)).long()
        return grid.detach().float().cpu()[idx]
    if kind == "uniform":
        return _shift(0.2 + (k + u) / count * (1.0 - 0.2), shift)
    if kind == "logit_normal":
        normal = torch.distributions.Normal(0.0, 1.0)
        z = normal.icdf(((k + u) / count).clamp(1e-7, 1 - 1e-7))
        return _shift(torch.sigmoid(z), shift).clamp_min(0.01)
    raise ValueError(f"awm_times: unknown time sampling {kind!r}")


def awm_draws(num_leaves: int, latent_shape: tuple[int, ...], generator: torch.Generator, *, kind: str = "discrete_wo_init",
              count: int = 6, grid: torch.Tensor | None = None, timestep_fraction: float = 0.9, shift: float = 3.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random choices of one AWM update, drawn in a fixed order from ``generator``.

    Returns:
        ``(order [L] long, sigma [L, count] fp32, noise [L, count, *latent_shape] fp32 ~ N(0, I))``;
        ``sigma[i]`` and ``noise[i]`` belong to leaf ``i`` (not to position ``i`` of ``order``): fresh
        noise for each time (train_sd3_awm.py lines 1215-1220).
    """
    order = torch.randperm(num_leaves, generator=generator)
    sigma = awm_times(kind, num_leaves, count, generator, grid=grid, timestep_fraction=timestep_fraction, shift=shift)
    noise = torch.randn((num_leaves, count, *latent_shape), generator=generator)
    return order, sigma, noise


def ema_kl_decay(kind: str, decay: float, ramp: float, optimizer_steps: int) -> float:
    """The EMA copy's decay after ``optimizer_steps`` steps: ``min(decay, ramp·steps)`` (``linear``)
    or ``decay`` (``constant``) (train_sd3_awm.py lines 1410-1413)."""
    return min(decay, ramp * optimizer_steps) if kind == "linear" else decay


class _CheckpointedEMAs:
    """``train.ema_decay``'s EMA (names unchanged) and AWM's EMA-KL copy (names prefixed
    :data:`KL_EMA_PREFIX`) as the one ``ema`` object a checkpoint saves and loads."""

    def __init__(self, ema: EMA | None, kl_ema: EMA):
        self.ema, self.kl_ema = ema, kl_ema

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.ema.state_dict()) if self.ema is not None else {}
        state.update({KL_EMA_PREFIX + n: v for n, v in self.kl_ema.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        kl = {n[len(KL_EMA_PREFIX):]: v for n, v in state.items() if n.startswith(KL_EMA_PREFIX)}
        rest = {n: v for n, v in state.items() if not n.startswith(KL_EMA_PREFIX)}
        if self.ema is not None and rest:
            self.ema.load_state_dict(rest)
        if kl:
            self.kl_ema.load_state_dict(kl)
        else:
            warnings.warn("the checkpoint holds no AWM EMA-KL copy (a run without algorithm.awm.ema_kl_beta?): "
                          "the copy restarts from the resumed weights", stacklevel=2)


class AWMRecipe(RLRecipe):
    """AWM training: the RL recipe's rollout / rewards / advantages, an advantage-weighted
    flow-matching update (``algorithm.kl_beta`` weights the velocity KL to the reference,
    ``algorithm.awm.*`` the rest)."""

    def build(self) -> None:
        super().build()
        o = self.algorithm.opts
        if self.algorithm.loss != "awm":  # another matching update (FlowAlgorithm.matching_update) owns the copy's use
            self.kl_ema = EMA(self.module, decay=0.0) if self.algorithm.policy_copy else None
            return
        #: the EMA copy of the policy the update is pulled toward (train_sd3_awm.py lines 649-658: starts at the policy)
        self.kl_ema = EMA(self.module, decay=o.ema_kl_decay) if o.ema_kl_beta > 0 else None

    def checkpoint_ema(self) -> Any:
        """The checkpoint's EMA file also holds the EMA-KL copy (names prefixed :data:`KL_EMA_PREFIX`)."""
        return _CheckpointedEMAs(self.ema, self.kl_ema) if self.kl_ema is not None else self.ema

    # ------------------------------------------------------------------------------------------
    # the update
    # ------------------------------------------------------------------------------------------
    def _update(self, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets, noise_levels: torch.Tensor,
                iteration: int) -> dict[str, float]:
        """``train.steps_per_iter`` optimizer steps of the AWM loss over this rank's leaves (the
        rollout's noise levels play no part: AWM uses no sampler log-probs), then the EMA-copy update.
        An algorithm with another matching loss runs its own update here (FlowAlgorithm.matching_update)."""
        if self.algorithm.loss != "awm":
            return self.algorithm.matching_update(self, tree, cond, targets, iteration)
        cfg, o = self.cfg, self.algorithm.opts
        leaf_adv = leaf_advantages_from_edges(targets.advantages, tree.leaf_edges)
        # drawn for every rank's leaves from one stream (rank 0's index, as a one-process run), this rank's kept
        order, sigma, noise = awm_draws(tree.num_leaves * self.world, tuple(tree.leaf_latents.shape[1:]),
                                        stream_generator(cfg.seed, "awm", iteration, 0), kind=o.time_sampling,
                                        count=o.train_timesteps, grid=tree.sigmas, timestep_fraction=o.timestep_fraction,
                                        shift=o.time_shift)
        order, sigma, noise = self._local_draws(order, sigma, noise, len(tree.prompts))
        old = self._old_log_probs(tree, cond, sigma, noise, order) if o.objective == "ratio" else None
        metrics = self._optimize(order, lambda mb: self._sample_loss(tree, cond, leaf_adv, sigma, noise, old, mb), iteration)
        if self.kl_ema is not None:  # once per iteration, after the update (lines 1409-1419)
            steps = (iteration + 1) * cfg.train.steps_per_iter
            decay = ema_kl_decay(o.ema_kl_decay_type, o.ema_kl_decay, o.ema_kl_ramp, steps)
            self.kl_ema.update(self.module, step=steps, decay=decay)
            metrics["train/ema_kl_decay"] = decay
        return metrics

    def _local_draws(self, order: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, num_prompts: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's part of :func:`awm_draws` made for every rank's leaves: its leaves' times and
        noises, and its leaves in the order the whole permutation visits them (local ids)."""
        if self.world == 1:
            return order, sigma, noise
        mine = self.shard.local_rows(torch.arange(len(order)), num_prompts)  # global ids of this rank's leaves
        local_id = torch.full((len(order),), -1, dtype=torch.long)
        local_id[mine] = torch.arange(len(mine))
        visited = local_id[order]
        return (visited[visited >= 0], self.shard.local_rows(sigma, num_prompts),
                self.shard.local_rows(noise, num_prompts))

    @torch.no_grad()
    def _old_log_probs(self, tree: RolloutTree, cond: Conditioning, sigma: torch.Tensor, noise: torch.Tensor,
                       order: torch.Tensor) -> torch.Tensor | None:
        """``[L, count]`` ``log p`` before the update of the leaves trained after the first optimizer
        step (NaN for the first step's leaves, whose ``log p_old`` is their current one detached), or
        ``None`` with a single optimizer step."""
        chunks = order.tensor_split(self.cfg.train.steps_per_iter)
        if len(chunks) < 2:
            return None
        old = torch.full(sigma.shape, math.nan, dtype=torch.float32)
        later = torch.cat(chunks[1:])
        for mb in later.split(self.cfg.train.micro_batch_size):
            _, _, log_p = self._forward(tree, cond, sigma, noise, mb)
            old[mb] = log_p.float().cpu().view(len(mb), -1)
        return old

    def _rows(self, tree: RolloutTree, sigma: torch.Tensor, noise: torch.Tensor, mb: torch.Tensor):
        """The ``B·count`` rows of a micro-batch of leaves ``mb [B]`` (leaf-major): ``x_σ``, target, ``σ``, prompt ids."""
        count = sigma.shape[1]
        x0 = tree.leaf_latents[mb].float()
        x0 = x0.repeat_interleave(count, dim=0)
        s = sigma[mb].reshape(-1).to(x0.device)
        x_s, target = flow_matching_pair(x0, noise[mb].reshape(-1, *noise.shape[2:]).to(x0.device), s)
        return x_s.to(self.adapter.dtype), target, s, tree.leaf_prompt_idx[mb].repeat_interleave(count)

    def _forward(self, tree: RolloutTree, cond: Conditioning, sigma: torch.Tensor, noise: torch.Tensor, mb: torch.Tensor):
        """``(v, target, log p)`` of the micro-batch's rows under the current weights (no guidance)."""
        o = self.algorithm.opts
        x_s, target, s, prompts = self._rows(tree, sigma, noise, mb)
        with self.accelerator.autocast():
            v = self.adapter.predict(x_s, s, cond[prompts], 1.0)
        fm = (v.float() - target.float()).pow(2).reshape(v.shape[0], -1).mean(dim=1)
        return v, target, awm_log_likelihood(fm, s, o.weighting, o.ghuber_power)

    def _sample_loss(self, tree: RolloutTree, cond: Conditioning, leaf_adv: torch.Tensor, sigma: torch.Tensor,
                     noise: torch.Tensor, old: torch.Tensor | None, mb: torch.Tensor):
        """AWM loss of a micro-batch of leaves ``mb [B]``: re-noise their finals at their ``count`` times, match ``ε − x0``."""
        cfg, acc, o = self.cfg, self.accelerator, self.algorithm.opts
        count = sigma.shape[1]
        x_s, target, s, prompts = self._rows(tree, sigma, noise, mb)
        c = cond[prompts]
        v_ema = None
        if self.kl_ema is not None:  # before the graph of v: swapping the weights in place would break its backward
            with torch.no_grad(), self.kl_ema.swapped_into(self.module), acc.autocast():
                v_ema = self.adapter.predict(x_s, s, c, 1.0)
        with acc.autocast():
            v = self.adapter.predict(x_s, s, c, 1.0)
        v_ref = None
        if cfg.algorithm.kl_beta > 0:
            with torch.no_grad(), self.adapter.disable_adapter(), acc.autocast():
                v_ref = self.adapter.predict(x_s, s, c, 1.0)
        log_p_old = None
        if old is not None:
            mb_old = old[mb]
            if not bool(torch.isnan(mb_old).any()):  # a leaf of a later optimizer step: its value before the update
                log_p_old = mb_old.reshape(-1).to(v.device)
        adv = leaf_adv[mb].repeat_interleave(count).to(v.device)
        return awm_loss(v.float(), target, adv, sigma=s, weighting=o.weighting, ghuber_power=o.ghuber_power,
                        clip_range=o.clip_range if o.objective == "ratio" else None, log_prob_old=log_p_old,
                        v_ref=v_ref, kl_beta=cfg.algorithm.kl_beta, v_ema=v_ema, ema_kl_beta=o.ema_kl_beta, check=False)
