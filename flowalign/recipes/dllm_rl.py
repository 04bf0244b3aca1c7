"""Reinforcement learning of masked diffusion LMs against verifiable tasks: ONE loop for every
``dllm`` algorithm of :mod:`flowalign.algorithms` (diffu-GRPO, coupled-GRPO, GDPO, MDPO, CJ-GRPO,
IGPO, JustGRPO). The algorithm (``algorithm.name``, a :class:`~flowalign.algorithms.dllm.DLLMAlgorithm`)
decides what changes; the plumbing (run directory, checkpoints, evaluation schedule, time budget, the
optimizer step) is :class:`flowalign.recipes.base.Recipe`'s. Each iteration:

1. **rollout** -- ``prompts_per_iter`` prompts x ``group_size`` completions decoded by
   ``flowalign.dllm.sampling.generate`` (no grad, trajectory recorded); each rank decodes whole groups;
2. **reward** -- decode to text and score with the task's verifier; the algorithm may then change
   the rollouts (:meth:`~flowalign.algorithms.dllm.DLLMAlgorithm.augment_rollouts`; IGPO: all-wrong
   groups are re-decoded with a reference prefix inpainted as a hint, and correct re-decodes
   replace some rollouts);
3. **advantages** -- the algorithm's (:meth:`~flowalign.algorithms.dllm.DLLMAlgorithm.advantages`):
   group-relative per sequence or, for MDPO, per denoising step; groups without signal are left out
   of the update;
4. **update** -- ``inner_steps`` optimizer steps; inner step ``k`` draws the estimator's random
   masks once and uses them for the old log-probs (computed before any update) and the new ones,
   so the first inner step's ratio is exactly 1 (checked before the weights change, and logged); the
   clipped loss is ``flowalign.losses.ppo_clip_loss`` on the estimator's units (tokens, sequences,
   steps or (step, token) pairs) with the algorithm's unit weights
   (:meth:`~flowalign.algorithms.dllm.DLLMAlgorithm.unit_weights`, ``loss_weights``) and ratio
   (``ratio_log_probs``; IGPO's GSPO sequence ratio); one host sync per optimizer step.

Every random stream is derived from ``(seed, stream name, iteration, prompt[, inner step])``
(:func:`flowalign.training.rng.stream_seed`), ``prompt`` being the group's position among the
iteration's prompts, never the rank: each group's rows draw from their own streams
(:class:`~flowalign.training.rng.RowStreams`), so a resumed run replays what an uninterrupted one
does, and 1 and W processes decode the same rollouts, draw the same estimator masks and take the
same update (prompts are padded to the iteration's longest; statistics spanning groups are taken
over every rank's rows). The model runs in eval mode throughout (no dropout): old and new log-probs are the same function.
"""

from __future__ import annotations

import copy
import math
import os
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from flowalign.algorithms import get_algorithm
from flowalign.algorithms.dllm import DLLMAlgorithm, DLLMRollouts
from flowalign.config import build_optimizer
from flowalign.diversity import distinct_fraction
from flowalign.dllm.algorithms import (
    RolloutBatch,
    policy_loss,
    select_draws,
    trained_token_mask,
    unit_advantages,
)
from flowalign.dllm.config import DLLMConfig
from flowalign.dllm.model import MaskedDiffusionLM
from flowalign.dllm.sampling import generate
from flowalign.dllm.tasks import get_task
from flowalign.errors import loading
from flowalign.guards import assert_finite, assert_on_policy
from flowalign.recipes.base import FIRST_STEP_DEV, Recipe, accumulate, average_steps
from flowalign.training.fsdp import sum_gradients, sync_gradients
from flowalign.training.plots import save_reward_curve
from flowalign.training.rng import RowStreams, prompt_indices, stream_seed

RewardFn = Callable[[str, Any], float]


class DLLMRecipe(Recipe):
    """Group-relative policy optimisation of a :class:`~flowalign.dllm.model.MaskedDiffusionLM`.

    Args:
        cfg: the run configuration (validated; the algorithm's defaults are applied here with ``cfg.resolved()``).
        rewards: optional Python reward ``fn(completion: str, example: TaskExample) -> float in [0, 1]``
            replacing the task's verifier.
        judges: optional ``{name: fn(completion, example) -> float}`` scored on the held-out set
            (reported as ``eval/judge/<name>``, never optimised).

    What an algorithm's hooks may use: :meth:`logits_fn`, :meth:`score`, :meth:`mean`,
    :meth:`gather_rows`, :meth:`totals`, ``model``, ``spec`` (the rollouts' decode), ``mask_id``, ``eos_id``,
    ``rank``, ``world``.
    """

    best_metric = "eval/accuracy"
    outputs = "accuracy_curve.png, metrics.jsonl, summary.json, final/, best/"

    def __init__(self, cfg: DLLMConfig, *, rewards: Any = None, judges: Any = None):
        if rewards is not None and not callable(rewards):
            raise TypeError(f"rewards must be a callable fn(completion, example) -> float, got {type(rewards).__name__}")
        if judges is not None and not (isinstance(judges, dict) and all(callable(j) for j in judges.values())):
            raise TypeError("judges must be a dict {name: fn(completion, example) -> float}")
        super().__init__(cfg.resolved(), rewards=rewards, judges=judges)
        self.algorithm: DLLMAlgorithm = get_algorithm(self.cfg.algorithm.name, recipes=("dllm",))(self.cfg)
        self.label = f"flowalign dllm {self.cfg.algorithm.name}"
        self._reward_override, self.judges = rewards, dict(judges or {})

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def build(self) -> None:
        """Load the model (and the KL reference), the optimizer, the task and its data."""
        cfg = self.cfg
        m, a = cfg.model, cfg.algorithm
        with loading("model.pretrained", m.pretrained):
            self.model = MaskedDiffusionLM.from_pretrained(
                m.pretrained, device=self.accelerator.device, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                shift_logits=m.shift_logits, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
                lora_target_modules=m.lora_target_modules)
        self.model.eval()  # no dropout anywhere: the rollout, old and new log-probs are one function
        self.mask_id, self.eos_id = self.model.mask_token_id, self.model.eos_token_id
        self.reference = None
        if a.kl_beta > 0 and m.lora_rank == 0:  # with LoRA the reference is the model with the adapter disabled
            self.reference = copy.deepcopy(self.model).requires_grad_(False).eval()
        # FSDP2 (train.fsdp or an accelerate FSDP launch): the policy and the frozen KL reference copy are
        # sharded over every process (the reference resharded after each forward); without it, no-op
        self.shard_trainable(self.model, reference=self.reference)
        self.algorithm.setup(self)
        self.params = self.algorithm.trainable_parameters(self)
        optimizer = build_optimizer(cfg.train.optimizer, self.algorithm.param_groups(self, self.params))
        if self.fsdp is not None:
            # each rank's loss is its share of the global loss (divided by every rank's total weight): the
            # reduce-scatter must sum the ranks' gradients, as _all_reduce_gradients does, not average them
            sum_gradients(self.model)
            self._watch_forwards()
            self.optimizer = optimizer  # sharded in place: accelerate wraps neither the model nor its optimizer
        else:
            # The model is not wrapped in DDP: ranks run different numbers of forwards per update (rows with
            # signal differ, estimators take several forwards per row), which DDP's per-forward reducer cannot
            # match; gradients are summed over ranks by hand once per optimizer step (_all_reduce_gradients).
            self.optimizer = self.accelerator.prepare(optimizer)

        self.task = get_task(cfg.task.name, **cfg.task.kwargs)
        self.reward_fn: RewardFn = self._reward_override or self.task.reward
        self.train_examples = self.task.load(cfg.task.train)
        eval_examples = self.task.load(cfg.task.eval)
        self.eval_examples = eval_examples[: cfg.eval.max_examples] if cfg.eval.max_examples else eval_examples
        self.spec = cfg.sampling_spec()
        self.eval_spec = replace(self.spec, temperature=cfg.eval.temperature)
        self.estimator = self.algorithm.build_estimator(a.estimator, mask_id=self.mask_id, p_mask_prompt=a.p_mask_prompt,
                                                        num_mc=a.num_mc, masks_per_t=a.masks_per_t,
                                                        temperature=self.spec.log_prob_temperature,
                                                        cfg_scale=a.likelihood_cfg_scale)
        self.forward_calls = self.forward_rows = 0

    def optimizer_steps_per_iteration(self) -> int:
        return self.cfg.algorithm.inner_steps

    def checkpoint_module(self) -> torch.nn.Module:
        return self.model

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.algorithm.save_pretrained(path)

    def judge_names(self) -> list[str]:
        return list(self.judges)

    def describe(self) -> str:
        cfg = self.cfg
        m, s, a = cfg.model, cfg.sampling, cfg.algorithm
        return (f"[flowalign] dLLM {a.name} ({self.algorithm.paper}) on {m.pretrained}, task {cfg.task.name}, "
                f"{self.accelerator.device}, num_processes={self.world}, threads={self.num_threads}, trainable parameters="
                f"{sum(p.numel() for p in self.params):,}; per iteration: {s.prompts_per_iter} prompts x "
                f"{s.group_size} rollouts, {s.steps} steps ({s.order}, {s.step_schedule}), estimator {a.estimator}, "
                f"{a.inner_steps} inner step(s)")

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['train/reward_mean']:.3f}", "acc": f"{metrics['train/accuracy']:.2f}"}

    def logits_fn(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The trained policy's logits ``[B, L, V]`` (a LogitsFn), counting forward passes."""
        self.forward_calls += 1
        self.forward_rows += input_ids.shape[0]
        return self.model(input_ids, attention_mask)

    def reference_logits_fn(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The reference policy's logits (LoRA disabled, or the frozen copy), no grad."""
        self.forward_calls += 1
        self.forward_rows += input_ids.shape[0]
        with torch.no_grad():
            if self.reference is not None:
                return self.reference(input_ids, attention_mask)
            with self.model.disable_adapter():
                return self.model(input_ids, attention_mask)

    # ------------------------------------------------------------------------------------------
    # sharding: every rank runs the same forwards (flowalign.training.fsdp)
    # ------------------------------------------------------------------------------------------
    # Every forward (and backward) of a sharded module all-gathers its blocks' weights, a collective: the
    # ranks must run the same sequence of them. Decoding runs spec.steps forwards on every rank, but some
    # phases run data-dependent numbers (IGPO re-decodes only all-wrong groups, with hint-dependent step
    # counts; held-out batches are dealt round-robin; the update trains only rows with signal). Two means:
    # * no-grad forwards of the policy (rollouts, IGPO's re-decodes and entropy pass, MDPO's predictions,
    #   old log-probs, held-out decoding): each is announced to the other ranks by an all-reduce of a
    #   "forward" flag (_announce_forward); before any other collective of the recipe (mean / totals /
    #   gather_rows, which the algorithms' hooks use too, and the update's reductions) every rank runs
    #   _lockstep: it answers each announcement with a no-op forward until no rank announces any more
    #   (a "done" flag agreed by the same all-reduce);
    # * the update (forwards with grad, then backwards): every rank's batch is padded to the most rows of
    #   any rank with zero-weight copies of a row (_lockstep_rows), so every rank runs the same
    #   micro-batches with the same forwards, backwards and gradient reductions; the frozen reference
    #   copy runs only there, on the padded rows.
    def _watch_forwards(self) -> None:
        """Announce every no-grad forward of the sharded policy (:meth:`_announce_forward`), before
        FSDP's own pre-forward hook all-gathers the weights."""
        self._padding = False
        if self.world > 1:
            self.model.register_forward_pre_hook(self._announce_forward, prepend=True)

    def _announce_forward(self, module: torch.nn.Module, args: Any) -> None:
        """Forward pre-hook: all-reduce (max) a flag 1 -- "this rank runs a forward" -- that pairs
        with the same all-reduce of every other rank, announcing a forward or waiting in
        :meth:`_lockstep`. Forwards with grad (the update, balanced by padding) and
        :meth:`_lockstep`'s own are not announced."""
        if self._padding or torch.is_grad_enabled():
            return
        flag = torch.ones(1, device=self.accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)

    def _lockstep(self) -> None:
        """With a model sharded over several processes: wait until every rank is done with its
        no-grad forwards, running a no-op forward (one ``[MASK]`` token, no grad, output dropped)
        for each forward another rank announces meanwhile; every rank leaves together when none
        announces (all-reduce (max) of flag 0 gives 0). Called by every rank before every collective
        of the recipe that is not FSDP's own. No-op without FSDP or with one process."""
        if self.fsdp is None or self.world == 1:
            return
        token = torch.full((1, 1), self.mask_id, dtype=torch.long, device=self.accelerator.device)
        self._padding = True
        try:
            while True:
                flag = torch.zeros(1, device=self.accelerator.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                if not bool(flag.item()):
                    return
                with torch.no_grad():
                    self.model(token, None)
        finally:
            self._padding = False

    def _lockstep_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's trained ``rows [n]`` (indices into its rollouts) and, with FSDP, ``real [m]``
        bool: the rows padded to the most rows ``m`` of any rank with copies of row 0, which the
        update weighs 0 (``real`` False); without FSDP ``(rows, None)``."""
        if self.fsdp is None:
            return rows, None
        most = torch.tensor([len(rows)], device=self.accelerator.device)
        if self.world > 1:
            self._lockstep()
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        real = torch.arange(int(most)) < len(rows)
        return torch.cat([rows, rows.new_zeros(int(most) - len(rows))]), real

    def _pass_sync(self, last: bool) -> Any:
        """The context of one micro-batch's forward and backward: with FSDP, gradients are
        reduce-scattered only in the optimizer step's last pass (accumulated locally before)."""
        return sync_gradients(self.model, last) if self.fsdp is not None else nullcontext()

    # ------------------------------------------------------------------------------------------
    # one iteration
    # ------------------------------------------------------------------------------------------
    def train_iteration(self, iteration: int) -> dict[str, float]:
        """One rollout + reward + advantage + update cycle; returns its metrics."""
        cfg, s, a = self.cfg, self.cfg.sampling, self.cfg.algorithm
        calls0, rows0 = self.forward_calls, self.forward_rows
        t0 = time.perf_counter()
        per_rank, first = s.prompts_per_iter // self.world, self.rank * (s.prompts_per_iter // self.world)
        idx = prompt_indices(len(self.train_examples), s.prompts_per_iter, iteration, cfg.seed)
        # every rank tokenizes the iteration's prompts: each share is padded to the whole batch's
        # longest prompt, so a prompt's input does not depend on the number of processes
        encoded = self.model.encode([self.train_examples[i].prompt for i in idx])
        examples = [self.train_examples[i] for i in idx[first:first + per_rank]]
        prompt_ids, prompt_mask = self.model.pad_prompts(encoded[first:first + per_rank], max(len(e) for e in encoded))
        prompt_ids = prompt_ids.to(self.accelerator.device).repeat_interleave(s.group_size, dim=0)
        prompt_mask = prompt_mask.to(self.accelerator.device).repeat_interleave(s.group_size, dim=0)
        # prompt first + j's group decodes from stream ("rollout", iteration, first + j), whichever rank holds it
        streams = RowStreams.for_blocks(cfg.seed, "rollout", list(range(first, first + per_rank)), [s.group_size] * per_rank,
                                        prefix=(iteration,))
        traj = generate(self.logits_fn, prompt_ids, prompt_mask, self.spec, mask_id=self.mask_id, eos_id=self.eos_id,
                        generator=streams, record_predictions=self.algorithm.record_predictions,
                        commit_policy=self.algorithm.commit_policy(self, greedy=False))
        P = traj.prompt_length
        t1 = time.perf_counter()
        rollout_examples = [ex for ex in examples for _ in range(s.group_size)]
        rewards = self.score(traj.sequences[:, P:], rollout_examples)
        metrics: dict[str, float] = {"train/reward_mean": self.mean(rewards),
                                     "train/accuracy": self.mean((rewards >= a.correct_threshold).float())}
        rollouts = DLLMRollouts(prompt_ids, prompt_mask, traj, traj.sequences, rewards,
                                fixed=torch.zeros_like(traj.sequences[:, P:], dtype=torch.bool),
                                group_ids=torch.arange(per_rank).repeat_interleave(s.group_size), examples=rollout_examples,
                                first_group=first)
        rollouts, algorithm_metrics = self.algorithm.augment_rollouts(self, iteration, rollouts)
        metrics.update(algorithm_metrics)
        advantages, algorithm_metrics = self.algorithm.advantages(self, rollouts)
        metrics.update(algorithm_metrics)
        advantages = assert_finite(advantages, "advantages")
        t2 = time.perf_counter()

        sequences, group_ids = rollouts.sequences, rollouts.group_ids
        trained = trained_token_mask(sequences[:, P:], self.eos_id, rollouts.fixed.to(sequences.device))
        batch = RolloutBatch(sequences, traj.attention_mask, P, trained, traj if self.estimator.unit in ("step", "step_token") else None)
        # groups (or, for MDPO, every step cell) whose rewards coincide carry no policy gradient
        signal = (advantages != 0).reshape(len(batch), -1).any(dim=1)
        group_signal = torch.zeros(per_rank, dtype=torch.long).index_add_(0, group_ids, signal.long().cpu()) > 0
        keep = group_signal[group_ids] if (a.skip_zero_signal and a.kl_beta == 0) else torch.ones(len(batch), dtype=torch.bool)
        metrics["train/zero_signal_groups"] = self.mean((~group_signal).float())
        metrics["train/advantage_abs_mean"] = self.mean(advantages.abs())
        rows, real = self._lockstep_rows(keep.nonzero().squeeze(1))
        prompts, row_advantages = group_ids[rows] + first, advantages[rows]
        if real is not None:  # padding rows: a prompt position no group has (their own mask streams), advantage 0
            prompts = torch.where(real, prompts, s.prompts_per_iter)
            pad = (~real).to(row_advantages.device).reshape(-1, *[1] * (row_advantages.dim() - 1))
            row_advantages = row_advantages.masked_fill(pad, 0.0)
        metrics.update(self._update(batch.select(rows), row_advantages, iteration, prompts, real))
        t3 = time.perf_counter()
        metrics.update({
            "cost/forward_calls": float(self.forward_calls - calls0),
            "cost/sequence_forwards": float(self.forward_rows - rows0),
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/train_s": t3 - t2, "time/iteration_s": t3 - t0,
        })
        return metrics

    def _update(self, batch: RolloutBatch, advantages: torch.Tensor, iteration: int, prompts: torch.Tensor,
                real: torch.Tensor | None = None) -> dict[str, float]:
        """``inner_steps`` clipped-loss optimizer steps on ``batch`` (rows with signal; ``prompts
        [n]``: each row's prompt position in the iteration, whole groups next to each other; with
        FSDP ``real [n]`` bool marks the rows that are not padding (:meth:`_lockstep_rows`): the
        padding weighs 0, and every micro-batch runs its forward and backward on every rank, with
        loss 0 where this rank has nothing to train in it).

        Inner step ``k`` uses the estimator draws of the streams ``("masks", iteration, prompt, k)``
        (each group's rows from its own) for its old log-probs (all computed before the first
        update) and its new ones. The inputs are
        checked once (:meth:`_update_inputs`); each optimizer step brings its micro-batches' summed
        metrics (0-dim tensors) and the gradient norm to the host in one transfer
        (:meth:`Recipe.optimizer_step`), the first one with the on-policy check before the weights
        change. Returns the metrics averaged over micro-batches, the mean gradient norm, the first
        inner step's max ``|ratio - 1|`` and this rank's trained rows."""
        cfg, a, acc = self.cfg, self.cfg.algorithm, self.accelerator
        n = len(batch)
        # every rank steps together (gradients are summed over ranks): the rank with the most rows decides
        # (with FSDP every rank's rows were padded to that already)
        n_max = int(acc.gather(torch.tensor([n], device=acc.device)).max()) if self.world > 1 and real is None else n
        if n_max == 0:
            return {"train/skipped_update": 1.0}
        k_draws = 1 if self.estimator.deterministic else a.inner_steps
        draws = [self.estimator.draw(batch, RowStreams.for_rows(cfg.seed, "masks", prompts, prefix=(iteration,), suffix=(k,)))
                 for k in range(k_draws)]
        chunks = torch.arange(n).split(cfg.train.micro_batch_size)
        with torch.no_grad():  # old (and reference) log-probs, before any weight changes
            old = [torch.cat([self.estimator(self.logits_fn, batch.select(c), select_draws(d, c)) for c in chunks]) if n else None
                   for d in draws]
            ref = None
            if a.kl_beta > 0:
                self._lockstep()  # (sharded) every rank done with the policy before the frozen copy runs
                ref = [torch.cat([self.estimator(self.reference_logits_fn, batch.select(c), select_draws(d, c)) for c in chunks]) if n else None
                       for d in draws]
        unit_shape = old[0].shape if n else (0, 1)
        weights = self.algorithm.unit_weights(self.estimator, batch, old[0]) if n else torch.zeros(0, 1)
        unit_adv = unit_advantages(advantages.to(weights.device), tuple(unit_shape)) if n else torch.zeros(0, 1)
        if n:
            weights = self.algorithm.loss_weights(weights, unit_adv)
        if real is not None:  # padding rows are never trained
            weights = weights * real.to(weights.device, weights.dtype).unsqueeze(1)
        units, chunk_weights, total_weight = self._update_inputs(weights, chunks, old, ref)
        steps: list[dict[str, float]] = []
        n_micro = 0
        for k in range(a.inner_steps):
            d = k % k_draws
            sums: dict[str, torch.Tensor] = {}
            first_devs: list[torch.Tensor] = []
            for j, (c, u, w) in enumerate(zip(chunks, units, chunk_weights)):
                if len(u) == 0 and real is None:  # no trained unit in this micro-batch
                    continue
                with self._pass_sync(j == len(chunks) - 1):
                    new = self.estimator(self.logits_fn, batch.select(c), select_draws(draws[d], c))
                    if len(u) == 0:  # sharded: another rank trains in this pass; this one runs it with loss 0
                        acc.backward(new.sum() * 0.0)
                        continue
                    new, ref_c = self.algorithm.ratio_log_probs(new, old[d][c], ref[d][c] if ref is not None else None,
                                                                weights[c])
                    loss, m, _ = policy_loss(new, old[d][c], unit_adv[c], weights[c], clip_range=a.clip_range,
                                             clip_range_high=a.clip_range_high,
                                             ref_log_prob=ref_c, kl_beta=a.kl_beta,
                                             units=u, check=False)
                    # the loss is the unit-weighted mean over every rank's rows: scale by this chunk's share
                    acc.backward(loss * (w / total_weight))
                if k == 0:
                    first_devs.append(m["ratio_max_dev"])
                accumulate(sums, m)
                n_micro += 1
            if self.fsdp is None:  # (FSDP's reduce-scatter sums them: flowalign.training.fsdp.sum_gradients)
                self._all_reduce_gradients()
            on_policy = None
            if k == 0:  # the first inner step: on-policy check before the weights change
                dev = torch.stack(first_devs).max() if first_devs else torch.zeros((), device=acc.device)
                if self.world > 1:  # every rank refuses together
                    dev = acc.gather(dev.reshape(1).to(acc.device)).max()
                sums[FIRST_STEP_DEV] = dev
                on_policy = lambda values: self._check_on_policy(values[FIRST_STEP_DEV])  # noqa: E731
            steps.append(self.optimizer_step(sums, before_step=on_policy))
        out = average_steps(steps, max(n_micro, 1))
        out["train/trained_rows"] = float(n if real is None else int(real.sum()))
        return out

    def _update_inputs(self, weights: torch.Tensor, chunks: tuple[torch.Tensor, ...], old: list, ref: list | None
                       ) -> tuple[list[torch.Tensor], list[float], float]:
        """What every inner step reuses, found and checked once before the inner steps: the old (and
        reference) log-probs must be finite (one transfer, with the weights). Returns, per micro-batch, the flat indices of its
        trained units (those with positive weight; none: nothing to train there) and their weight,
        and the total weight of every rank's units, which the loss divides by so that it is the
        unit-weighted mean over all ranks' rows."""
        acc = self.accelerator
        units = [(weights[c] > 0).reshape(-1).nonzero().squeeze(1) for c in chunks]
        total = weights.sum().reshape(1).to(acc.device)
        if self.world > 1:
            self._lockstep()
            total = acc.reduce(total, reduction="sum")
        logprobs = [("log_prob_old", t) for t in old if t is not None]
        logprobs += [("ref_log_prob", t) for t in (ref or []) if t is not None]
        parts = [total.float(), *(weights[c].reshape(-1)[u].sum().reshape(1).to(acc.device) for c, u in zip(chunks, units)),
                 *(torch.isfinite(t).all().float().reshape(1).to(acc.device) for _, t in logprobs)]
        values = torch.cat(parts).tolist()
        if not all(values[1 + len(chunks):]):
            for what, t in logprobs:
                assert_finite(t, what)
        return units, values[1:1 + len(chunks)], values[0]

    #: elements per all-reduce bucket of :meth:`_all_reduce_gradients` (25 M, DDP's default bucket of 100 MB fp32)
    reduce_bucket_numel = 25_000_000

    def _all_reduce_gradients(self) -> None:
        """Sum every trainable parameter's gradient over the ranks (a rank without rows contributes
        zeros), so each rank takes the same optimizer step on the globally weighted loss. Gradients
        are summed in float32 and written back in place, in buckets of at most
        :attr:`reduce_bucket_numel` elements of one dtype (a copy of one bucket at a time, not of the
        whole model; a larger tensor goes alone)."""
        if self.world == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in self.params], self.reduce_bucket_numel):
            if len(bucket) == 1 and bucket[0].dtype == torch.float32 and bucket[0].is_contiguous():
                torch.distributed.all_reduce(bucket[0])
                continue
            flat = torch.cat([g.reshape(-1).float() for g in bucket])  # summed in float32 whatever the weights' dtype
            torch.distributed.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def _check_on_policy(self, ratio_dev: float) -> None:
        """docs/ARCHITECTURE.md invariant 2: before any update the recomputed log-probs equal the old ones."""
        assert_on_policy(ratio_dev, self.ratio_tolerance(), "old and new log-probs were computed "
                         "differently (different estimator draws? dropout? non-deterministic kernels?)")

    def score(self, completions: torch.Tensor, examples: list) -> torch.Tensor:
        """Task rewards ``[N]`` float32 (CPU) of completion tokens ``[N, Lg]`` (decoded up to the first EOS)."""
        return self._score_texts(self.model.decode(completions), examples)

    def _score_texts(self, texts: list[str], examples: list) -> torch.Tensor:
        """Task rewards ``[N]`` float32 of decoded completions, each checked to be a float in [0, 1]."""
        values = []
        for text, ex in zip(texts, examples):
            r = float(self.reward_fn(text, ex))
            if not (math.isfinite(r) and 0.0 <= r <= 1.0):
                raise ValueError(f"reward {r!r} for completion {text!r} is not a float in [0, 1]")
            values.append(r)
        return torch.tensor(values, dtype=torch.float32)

    def gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values [n, ...]`` (the same ``n`` on every rank) concatenated in rank
        order -- the order of the iteration's prompts -- on ``values``' device."""
        if self.world == 1:
            return values
        self._lockstep()
        return self.accelerator.gather(values.to(self.accelerator.device).contiguous()).to(values.device)

    def totals(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sums ``[K]`` float64 (CPU) of every rank's ``values [K]`` (counts that
        metrics report for the whole iteration, not for this rank's share)."""
        values = values.reshape(-1).double()
        if self.world == 1:
            return values.cpu()
        self._lockstep()
        return self.accelerator.reduce(values.to(self.accelerator.device), reduction="sum").cpu()

    def mean(self, values: torch.Tensor) -> float:
        """Mean of ``values`` over every rank."""
        acc = self.accelerator
        total = torch.tensor([float(values.sum()), float(values.numel())], device=acc.device)
        if self.world > 1:
            self._lockstep()
            total = acc.reduce(total, reduction="sum")
        return float(total[0] / total[1].clamp_min(1))

    # ------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Held-out accuracy and mean reward of ``eval.temperature`` (greedy) decoding, sharded over ranks.

        The held-out set is cut into batches of ``eval.batch_size`` consecutive examples, batch
        ``i`` decoded by rank ``i mod W`` with stream ``("eval", i x batch_size)``: every batch
        holds (and pads) the same examples with any number of processes, so the metrics do not
        depend on it (up to the summation order of the means). With a sharded model a rank with
        fewer batches catches up with no-op forwards in :meth:`mean` (:meth:`_lockstep`)."""
        cfg = self.cfg
        size = cfg.eval.batch_size
        starts = list(range(0, len(self.eval_examples), size))[self.rank::self.world]
        rewards, judged = [], {name: [] for name in self.judges}
        for start in starts:
            chunk = self.eval_examples[start:start + size]
            ids, am = self.model.pad_prompts(self.model.encode([ex.prompt for ex in chunk]))
            traj = generate(self.model, ids.to(self.accelerator.device), am.to(self.accelerator.device), self.eval_spec,
                            mask_id=self.mask_id, eos_id=self.eos_id,
                            generator=RowStreams([stream_seed(cfg.seed, "eval", start)], [len(chunk)]),
                            record_predictions=False, commit_policy=self.algorithm.commit_policy(self, greedy=True))
            texts = self.model.decode(traj.sequences[:, traj.prompt_length:])
            rewards.append(self._score_texts(texts, chunk))
            if self.judges:
                for name, judge in self.judges.items():
                    judged[name].extend(float(judge(t, ex)) for t, ex in zip(texts, chunk))
        r = torch.cat(rewards) if rewards else torch.zeros(0)
        result = {"eval/accuracy": self.mean((r >= cfg.algorithm.correct_threshold).float()), "eval/reward": self.mean(r)}
        for name, values in judged.items():
            result[f"eval/judge/{name}"] = self.mean(torch.tensor(values, dtype=torch.float32))
        if cfg.eval.diversity_prompts:
            result["eval/diversity"] = self._completion_diversity()
        return result

    def _completion_diversity(self) -> float:
        """Mean fraction of distinct completions (:func:`flowalign.diversity.distinct_fraction`) among
        ``eval.diversity_samples`` rollout-temperature samples of each of the first
        ``eval.diversity_prompts`` held-out prompts (sharded over ranks; prompt ``i``'s samples from
        stream ``("eval_diversity", i)``, every prompt padded to the longest of them, so the
        fraction does not depend on the number of processes)."""
        e = self.cfg.eval
        prompts = list(range(min(e.diversity_prompts, len(self.eval_examples))))[self.rank::self.world]
        if not prompts:
            return self.mean(torch.zeros(0))
        encoded = self.model.encode([ex.prompt for ex in self.eval_examples[: e.diversity_prompts]])
        ids, am = self.model.pad_prompts([encoded[i] for i in prompts], max(len(t) for t in encoded))
        ids = ids.to(self.accelerator.device).repeat_interleave(e.diversity_samples, dim=0)
        am = am.to(self.accelerator.device).repeat_interleave(e.diversity_samples, dim=0)
        streams = RowStreams.for_blocks(self.cfg.seed, "eval_diversity", prompts, [e.diversity_samples] * len(prompts))
        traj = generate(self.model, ids, am, self.spec, mask_id=self.mask_id, eos_id=self.eos_id,
                        generator=streams, record_predictions=False, commit_policy=self.algorithm.commit_policy(self, greedy=False))
        completions = [tuple(row) for row in traj.sequences[:, traj.prompt_length:].tolist()]
        k = e.diversity_samples
        fractions = [distinct_fraction(completions[i * k:(i + 1) * k]) for i in range(len(prompts))]
        return self.mean(torch.tensor(fractions, dtype=torch.float32))

    # ------------------------------------------------------------------------------------------
    # outputs
    # ------------------------------------------------------------------------------------------
    def write_outputs(self, summary: dict[str, Any], final: dict[str, Any], records: list[dict]) -> None:
        """Model forwards per iteration and the accuracy curve (``accuracy_curve.png``)."""
        cfg = self.cfg
        forwards = [r["cost/sequence_forwards"] for r in records if "cost/sequence_forwards" in r]
        summary["sequence_forwards_per_iteration"] = float(np.mean(forwards)) if forwards else float("nan")
        summary["curve"] = save_reward_curve(
            os.path.join(cfg.output_dir, "accuracy_curve.png"), records, ylabel="accuracy",
            series={"train/accuracy": "rollout accuracy (sampled)", "eval/accuracy": "held-out accuracy (greedy)"},
            title=f"{cfg.algorithm.name} on {cfg.task.name}")


def _buckets(tensors: list[torch.Tensor], max_numel: int) -> list[list[torch.Tensor]]:
    """Consecutive tensors grouped into buckets of one dtype and device of at most ``max_numel``
    elements (a tensor larger than that is a bucket of its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        last = buckets[-1] if buckets else None
        if last is None or size + t.numel() > max_numel or (t.dtype, t.device) != (last[0].dtype, last[0].device):
            buckets.append([t])
            size = t.numel()
        else:
            last.append(t)
            size += t.numel()
    return buckets
