"""Reinforcement learning of masked diffusion LMs against verifiable tasks: ONE loop for every
algorithm preset of ``flowalign.dllm.algorithms`` (diffu-GRPO, coupled-GRPO, GDPO, MDPO, CJ-GRPO,
IGPO, JustGRPO). Each iteration:

1. **rollout** -- ``prompts_per_iter`` prompts x ``group_size`` completions decoded by
   ``flowalign.dllm.sampling.generate`` (no grad, trajectory recorded); each rank decodes whole groups;
2. **reward** -- decode to text and score with the task's verifier (IGPO: all-wrong groups get
   some rollouts re-decoded with a reference prefix inpainted as a fixed hint);
3. **advantages** -- group-relative (``flowalign.advantages.group_advantages``), per sequence or,
   for MDPO, per denoising step; groups without signal are left out of the update;
4. **update** -- ``inner_steps`` optimizer steps; inner step ``k`` draws the estimator's random
   masks once and uses them for the old log-probs (computed before any update) and the new ones,
   so the first inner step's ratio is exactly 1 (checked and logged); the clipped loss is
   ``flowalign.losses.ppo_clip_loss`` on the estimator's units (tokens, sequences or steps).

Every random stream is derived from ``(seed, stream name, iteration, rank[, inner step])``
(``flowalign.recipes.rl.stream_generator``), so a resumed run replays what an uninterrupted one does.
The model runs in eval mode throughout (no dropout): old and new log-probs are the same function.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from flowalign.advantages import group_advantages
from flowalign.config import build_optimizer, to_yaml
from flowalign.diversity import HackingMonitor, distinct_fraction
from flowalign.dllm.algorithms import (
    LogProbEstimator,
    RolloutBatch,
    all_wrong_groups,
    get_preset,
    hint_lengths,
    mdpo_step_advantages,
    policy_loss,
    predicted_completions,
    select_draws,
    trained_token_mask,
    unit_advantages,
    unit_weights,
)
from flowalign.dllm.config import DLLMConfig
from flowalign.dllm.model import MaskedDiffusionLM
from flowalign.dllm.sampling import generate
from flowalign.dllm.tasks import get_task
from flowalign.guards import assert_finite, assert_on_policy
from flowalign.recipes.rl import prompt_indices, stream_generator
from flowalign.errors import loading
from flowalign.training.accel import configure_threads, end_accelerator
from flowalign.training.checkpoint import resume_training_state, save_training_state
from flowalign.training.interrupt import StopSignal, stopped_run
from flowalign.training.metrics import MetricsLogger, discard_stale_metrics, read_metrics, write_summary
from flowalign.training.plots import before_after_table, save_reward_curve
from flowalign.training.rundir import record_run, write_folder_atomically

RewardFn = Callable[[str, Any], float]


class DLLMRecipe:
    """Group-relative policy optimisation of a :class:`~flowalign.dllm.model.MaskedDiffusionLM`.

    Args:
        cfg: the run configuration (validated; presets are applied here with ``cfg.resolved()``).
        rewards: optional Python reward ``fn(completion: str, example: TaskExample) -> float in [0, 1]``
            replacing the task's verifier.
        judges: optional ``{name: fn(completion, example) -> float}`` scored on the held-out set
            (reported as ``eval/judge/<name>``, never optimised).
    """

    def __init__(self, cfg: DLLMConfig, *, rewards: Any = None, judges: Any = None):
        self.cfg = cfg.resolved()
        self.preset = get_preset(self.cfg.algorithm.name)
        if rewards is not None and not callable(rewards):
            raise TypeError(f"rewards must be a callable fn(completion, example) -> float, got {type(rewards).__name__}")
        if judges is not None and not (isinstance(judges, dict) and all(callable(j) for j in judges.values())):
            raise TypeError("judges must be a dict {name: fn(completion, example) -> float}")
        self._reward_override, self.judges = rewards, dict(judges or {})
        #: Python objects standing in for config entries, recorded with the run's settings (run.json)
        self.replacements = {"rewards": rewards, "eval.judges": judges}

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self, *, for_training: bool = True) -> None:
        """Load the model, task and data. ``for_training=False`` (evaluation only) neither reads nor
        writes ``output_dir``: no resume, no config record, no logs."""
        cfg = self.cfg
        m, s, a = cfg.model, cfg.sampling, cfg.algorithm
        self.num_threads = configure_threads(cfg.num_threads)
        no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
        self.accelerator = Accelerator(cpu=cfg.device == "cpu" or no_accelerator)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        torch.manual_seed(cfg.seed)  # LoRA initialisation

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
        self.params = list(self.model.trainable_parameters())
        optimizer = build_optimizer(cfg.train.optimizer, self.params)
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
        self.estimator = LogProbEstimator(a.estimator, mask_id=self.mask_id, p_mask_prompt=a.p_mask_prompt,
                                          num_mc=a.num_mc, masks_per_t=a.masks_per_t,
                                          temperature=self.spec.log_prob_temperature)
        self.forward_calls = self.forward_rows = 0
        self.monitor = HackingMonitor("eval/reward", [f"eval/judge/{name}" for name in self.judges])

        self.start_iteration, self.before, self.best, self.train_seconds = 0, None, None, 0.0
        self.last_step = cfg.train.iterations
        self.logger = MetricsLogger(cfg.output_dir, enabled=False)
        if not for_training:
            return
        if self.is_main:
            record_run(cfg.output_dir, cfg, to_yaml(cfg), self.replacements)
        self._maybe_resume()
        if self.is_main and self.start_iteration == 0:
            discard_stale_metrics(cfg.output_dir)
        if self.is_main:
            print(f"[flowalign] dLLM {a.name} ({self.preset.paper}) on {m.pretrained}, task {cfg.task.name}, "
                  f"{self.accelerator.device}, num_processes={self.world}, threads={self.num_threads}, trainable parameters="
                  f"{sum(p.numel() for p in self.params):,}; per iteration: {s.prompts_per_iter} prompts x "
                  f"{s.group_size} rollouts, {s.steps} steps ({s.order}, {s.step_schedule}), estimator {a.estimator}, "
                  f"{a.inner_steps} inner step(s)")
        self.logger = MetricsLogger(cfg.output_dir, tensorboard=cfg.logging.tensorboard,
                                    wandb_project=cfg.logging.wandb_project,
                                    resume_step=self.start_iteration or None, enabled=self.is_main)

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
    # the loop
    # ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.before is None:
            self.before = self.evaluate(step=0)
            self._log_eval(0, self.before)
        bar = tqdm(range(self.start_iteration, cfg.train.iterations), desc=f"flowalign dllm {cfg.algorithm.name}",
                   initial=self.start_iteration, total=cfg.train.iterations,
                   disable=not (self.is_main and cfg.logging.progress))
        step = self.start_iteration
        with StopSignal() as stop:
            for iteration in bar:
                step = iteration + 1
                metrics = self.train_iteration(iteration)
                self.train_seconds += metrics["time/iteration_s"]
                metrics["time/train_elapsed_s"] = self.train_seconds
                self.logger.log(step, metrics)
                out_of_time = bool(cfg.train.time_budget_s) and self.train_seconds >= cfg.train.time_budget_s
                if out_of_time or step == cfg.train.iterations:
                    break
                if cfg.eval.every and step % cfg.eval.every == 0:
                    self._log_eval(step, self.evaluate(step))
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    self.save_checkpoint(step)
                bar.set_postfix(reward=f"{metrics['train/reward_mean']:.3f}", acc=f"{metrics['train/accuracy']:.2f}")
                if stop.requested(self.accelerator):
                    bar.close()
                    self.save_checkpoint(step)
                    raise stopped_run(step, cfg.train.iterations, cfg.output_dir, stop.exit_code)
        bar.close()
        self.last_step = step
        final = self.evaluate(step)
        if self.start_iteration < step:  # else: a finished run re-opened, already logged
            self._log_eval(step, final)
            self.save_checkpoint(step)
        return self._finish(final)

    def train_iteration(self, iteration: int) -> dict[str, float]:
        """One rollout + reward + advantage + update cycle; returns its metrics."""
        cfg, s, a = self.cfg, self.cfg.sampling, self.cfg.algorithm
        calls0, rows0 = self.forward_calls, self.forward_rows
        t0 = time.perf_counter()
        per_rank = s.prompts_per_iter // self.world
        idx = prompt_indices(len(self.train_examples), s.prompts_per_iter, iteration, cfg.seed)
        examples = [self.train_examples[i] for i in idx[self.rank * per_rank:(self.rank + 1) * per_rank]]
        prompt_ids, prompt_mask = self.model.pad_prompts(self.model.encode([ex.prompt for ex in examples]))
        prompt_ids = prompt_ids.to(self.accelerator.device).repeat_interleave(s.group_size, dim=0)
        prompt_mask = prompt_mask.to(self.accelerator.device).repeat_interleave(s.group_size, dim=0)
        rollout_examples = [ex for ex in examples for _ in range(s.group_size)]
        group_ids = torch.arange(per_rank).repeat_interleave(s.group_size)
        traj = generate(self.logits_fn, prompt_ids, prompt_mask, self.spec, mask_id=self.mask_id, eos_id=self.eos_id,
                        generator=stream_generator(cfg.seed, "rollout", iteration, self.rank), record_predictions=False)
        sequences, attention_mask, P = traj.sequences, traj.attention_mask, traj.prompt_length
        t1 = time.perf_counter()
        rewards = self._score(sequences[:, P:], rollout_examples)
        fixed = torch.zeros_like(sequences[:, P:], dtype=torch.bool)
        metrics: dict[str, float] = {"train/reward_mean": self._mean(rewards),
                                     "train/accuracy": self._mean((rewards >= a.correct_threshold).float())}
        if self.preset.hints:
            sequences, rewards, fixed, hint_metrics = self.inpaint_hints(
                iteration, sequences, prompt_ids, prompt_mask, rewards, group_ids, rollout_examples)
            metrics.update(hint_metrics)
        advantages = group_advantages(rewards, group_ids, std_mode=a.std_mode, clip=a.adv_clip or None)
        if self.preset.step_rewards:  # MDPO: rewards of the intermediate greedy predictions
            predicted = predicted_completions(self.logits_fn, traj, self.mask_id)  # [N, S, Lg]
            N, S, Lg = predicted.shape
            step_rewards = self._score(predicted.reshape(N * S, Lg), [ex for ex in rollout_examples for _ in range(S)]).reshape(N, S)
            advantages = mdpo_step_advantages(step_rewards, group_ids, std_mode=a.std_mode, clip=a.adv_clip or None)
            metrics["train/step_reward_first"] = self._mean(step_rewards[:, 0])
        advantages = assert_finite(advantages, "advantages")
        t2 = time.perf_counter()

        batch = RolloutBatch(sequences, attention_mask, P, trained_token_mask(sequences[:, P:], self.eos_id, fixed.to(sequences.device)),
                             traj if self.estimator.unit == "step" else None)
        # groups (or, for MDPO, every step cell) whose rewards coincide carry no policy gradient
        signal = (advantages != 0).reshape(len(batch), -1).any(dim=1)
        group_signal = torch.zeros(per_rank, dtype=torch.long).index_add_(0, group_ids, signal.long().cpu()) > 0
        keep = group_signal[group_ids] if (a.skip_zero_signal and a.kl_beta == 0) else torch.ones(len(batch), dtype=torch.bool)
        metrics["train/zero_signal_groups"] = self._mean((~group_signal).float())
        metrics["train/advantage_abs_mean"] = self._mean(advantages.abs())
        rows = keep.nonzero().squeeze(1)
        metrics.update(self._update(batch.select(rows), advantages[rows], iteration))
        t3 = time.perf_counter()
        metrics.update({
            "cost/forward_calls": float(self.forward_calls - calls0),
            "cost/sequence_forwards": float(self.forward_rows - rows0),
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/train_s": t3 - t2, "time/iteration_s": t3 - t0,
        })
        return metrics

    def _update(self, batch: RolloutBatch, advantages: torch.Tensor, iteration: int) -> dict[str, float]:
        """``inner_steps`` clipped-loss optimizer steps on ``batch`` (rows with signal).

        Inner step ``k`` uses the estimator draws of stream ``("masks", iteration, rank, k)`` for
        its old log-probs (all computed before the first update) and its new ones."""
        cfg, a, acc = self.cfg, self.cfg.algorithm, self.accelerator
        n = len(batch)
        # every rank steps together (gradients are summed over ranks): the rank with the most rows decides
        n_max = int(acc.gather(torch.tensor([n], device=acc.device)).max()) if self.world > 1 else n
        if n_max == 0:
            return {"train/skipped_update": 1.0}
        k_draws = 1 if self.estimator.deterministic else a.inner_steps
        draws = [self.estimator.draw(batch, stream_generator(cfg.seed, "masks", iteration, self.rank, k)) for k in range(k_draws)]
        chunks = torch.arange(n).split(cfg.train.micro_batch_size)
        with torch.no_grad():  # old (and reference) log-probs, before any weight changes
            old = [torch.cat([self.estimator(self.logits_fn, batch.select(c), select_draws(d, c)) for c in chunks]) if n else None
                   for d in draws]
            ref = None
            if a.kl_beta > 0:
                ref = [torch.cat([self.estimator(self.reference_logits_fn, batch.select(c), select_draws(d, c)) for c in chunks]) if n else None
                       for d in draws]
        unit_shape = old[0].shape if n else (0, 1)
        weights = unit_weights(self.estimator.unit, batch.trained, batch.trajectory) if n else torch.zeros(0, 1)
        unit_adv = unit_advantages(advantages, tuple(unit_shape)) if n else torch.zeros(0, 1)
        # the loss is the token (unit) weighted mean over every rank's rows: divide by the global weight
        total_weight = float(weights.sum())
        if self.world > 1:
            total_weight = float(acc.reduce(torch.tensor([total_weight], device=acc.device), reduction="sum")[0])
        sums: dict[str, float] = {}
        grad_norms, first_dev, n_micro = [], 0.0, 0
        for k in range(a.inner_steps):
            d = k % k_draws
            for c in chunks:
                if not bool((weights[c] > 0).any()):
                    continue
                new = self.estimator(self.logits_fn, batch.select(c), select_draws(draws[d], c))
                loss, m, w = policy_loss(new, old[d][c], unit_adv[c], weights[c], clip_range=a.clip_range,
                                         ref_log_prob=ref[d][c] if ref is not None else None, kl_beta=a.kl_beta)
                acc.backward(loss * (w / total_weight))
                if k == 0:
                    first_dev = max(first_dev, m["ratio_max_dev"])
                for name, value in m.items():
                    sums[f"train/{name}"] = sums.get(f"train/{name}", 0.0) + value
                n_micro += 1
            self._all_reduce_gradients()
            if k == 0:
                if self.world > 1:  # every rank refuses together
                    first_dev = float(acc.gather(torch.tensor([first_dev], device=acc.device)).max())
                self._check_on_policy(first_dev)
            grad_norm = acc.clip_grad_norm_(self.params, cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf)
            grad_norms.append(assert_finite(torch.as_tensor(grad_norm, dtype=torch.float32).reshape(1), "gradient norm").item())
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        out = {name: total / max(n_micro, 1) for name, total in sums.items()}
        out["train/ratio_first_step_dev"] = first_dev
        out["train/grad_norm"] = float(np.mean(grad_norms))
        out["train/trained_rows"] = float(n)
        return out

    def _all_reduce_gradients(self) -> None:
        """Sum every trainable parameter's gradient over the ranks (a rank without rows contributes
        zeros), so each rank takes the same optimizer step on the globally weighted loss. One flat
        all-reduce of the trainable parameters' size (LoRA: the adapter)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    def _check_on_policy(self, ratio_dev: float) -> None:
        """docs/ARCHITECTURE.md invariant 2: before any update the recomputed log-probs equal the old ones."""
        assert_on_policy(ratio_dev, self.cfg.algorithm.ratio_tolerance, "old and new log-probs were computed "
                         "differently (different estimator draws? dropout? non-deterministic kernels?)")

    def _score(self, completions: torch.Tensor, examples: list) -> torch.Tensor:
        """Task rewards ``[N]`` float32 of completion tokens ``[N, Lg]`` (decoded up to the first EOS)."""
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

    def _mean(self, values: torch.Tensor) -> float:
        """Mean over every rank."""
        acc = self.accelerator
        total = torch.tensor([float(values.sum()), float(values.numel())], device=acc.device)
        if self.world > 1:
            total = acc.reduce(total, reduction="sum")
        return float(total[0] / total[1].clamp_min(1))

    # ------------------------------------------------------------------------------------------
    # IGPO
    # ------------------------------------------------------------------------------------------
    def inpaint_hints(self, iteration: int, sequences: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      rewards: torch.Tensor, group_ids: torch.Tensor, examples: list
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """IGPO (Zhao et al. 2025, arXiv:2509.10396, §3): in every group whose rollouts all fail,
        re-decode the first ``ceil(hinted_rollouts x G)`` rollouts with a prefix of the reference
        completion inpainted as fixed hint tokens (its length a random fraction in
        ``algorithm.hint_fraction``), so the group gets a reward spread. Groups with a correct
        rollout are untouched.

        The hint occupies the first ``h`` completion positions: the decoder sees
        ``[prompt | hint]`` as its prompt and fills the remaining ``gen_length - h`` positions
        (steps scaled in proportion), which is the inpainting of a masked window whose first ``h``
        tokens are given.

        Returns:
            ``(sequences, rewards, fixed [N, Lg] bool = hint tokens, metrics)``.
        """
        cfg, s, a = self.cfg, self.cfg.sampling, self.cfg.algorithm
        P, Lg, G = prompt_ids.shape[1], s.gen_length, s.group_size
        sequences, rewards = sequences.clone(), rewards.clone()
        fixed = torch.zeros(sequences.shape[0], Lg, dtype=torch.bool)
        wrong = all_wrong_groups(rewards, group_ids, a.correct_threshold).nonzero().squeeze(1).tolist()
        groups = [g for g in wrong if examples[g * G].reference]
        generator = stream_generator(cfg.seed, "hints", iteration, self.rank)
        refs = [self.model.encode([examples[g * G].reference])[0][:Lg] for g in groups]
        lengths = hint_lengths(torch.tensor([len(r) for r in refs], dtype=torch.long), tuple(a.hint_fraction), Lg, generator)
        k = max(1, math.ceil(a.hinted_rollouts * G))
        hinted_rewards = []
        for g, ref, h in zip(groups, refs, lengths.tolist()):
            if h == 0:
                continue
            rows = torch.arange(g * G, g * G + k)
            hint = torch.tensor(ref[:h], dtype=torch.long, device=prompt_ids.device)[None].expand(k, h)
            ids = torch.cat([prompt_ids[rows], hint], dim=1)
            am = torch.cat([prompt_mask[rows], torch.ones_like(hint)], dim=1)
            steps = max(1, round(self.spec.steps * (Lg - h) / Lg))
            spec = replace(self.spec, gen_length=Lg - h, steps=steps, block_length=None)
            traj = generate(self.logits_fn, ids, am, spec, mask_id=self.mask_id, eos_id=self.eos_id,
                            generator=generator, record_predictions=False)
            sequences[rows] = traj.sequences
            fixed[rows, :h] = True
            rewards[rows] = self._score(traj.sequences[:, P:], [examples[i] for i in rows.tolist()])
            hinted_rewards.append(rewards[rows])
        hinted = torch.cat(hinted_rewards) if hinted_rewards else torch.zeros(0)
        metrics = {"igpo/all_wrong_groups": float(len(wrong)), "igpo/hinted_groups": float(len(hinted_rewards)),
                   "igpo/hinted_accuracy": float((hinted >= a.correct_threshold).float().mean()) if len(hinted) else 0.0}
        return sequences, rewards, fixed, metrics

    # ------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Held-out accuracy and mean reward of ``eval.temperature`` (greedy) decoding, sharded over ranks."""
        cfg = self.cfg
        t0 = time.perf_counter()
        examples = self.eval_examples[self.rank::self.world]
        rewards, judged = [], {name: [] for name in self.judges}
        for start in range(0, len(examples), cfg.eval.batch_size):
            chunk = examples[start:start + cfg.eval.batch_size]
            ids, am = self.model.pad_prompts(self.model.encode([ex.prompt for ex in chunk]))
            traj = generate(self.model, ids.to(self.accelerator.device), am.to(self.accelerator.device), self.eval_spec,
                            mask_id=self.mask_id, eos_id=self.eos_id, generator=stream_generator(cfg.seed, "eval", start),
                            record_predictions=False)
            texts = self.model.decode(traj.sequences[:, traj.prompt_length:])
            rewards.append(self._score_texts(texts, chunk))
            if self.judges:
                for name, judge in self.judges.items():
                    judged[name].extend(float(judge(t, ex)) for t, ex in zip(texts, chunk))
        r = torch.cat(rewards) if rewards else torch.zeros(0)
        result = {"eval/accuracy": self._mean((r >= cfg.algorithm.correct_threshold).float()), "eval/reward": self._mean(r)}
        for name, values in judged.items():
            result[f"eval/judge/{name}"] = self._mean(torch.tensor(values, dtype=torch.float32))
        if cfg.eval.diversity_prompts:
            result["eval/diversity"] = self._completion_diversity()
        result["time/eval_s"] = time.perf_counter() - t0
        return result

    def _completion_diversity(self) -> float:
        """Mean fraction of distinct completions (:func:`flowalign.diversity.distinct_fraction`) among
        ``eval.diversity_samples`` rollout-temperature samples of each of the first
        ``eval.diversity_prompts`` held-out prompts (sharded over ranks, fixed seeds)."""
        e = self.cfg.eval
        examples = self.eval_examples[: e.diversity_prompts][self.rank::self.world]
        if not examples:
            return self._mean(torch.zeros(0))
        ids, am = self.model.pad_prompts(self.model.encode([ex.prompt for ex in examples]))
        ids = ids.to(self.accelerator.device).repeat_interleave(e.diversity_samples, dim=0)
        am = am.to(self.accelerator.device).repeat_interleave(e.diversity_samples, dim=0)
        traj = generate(self.model, ids, am, self.spec, mask_id=self.mask_id, eos_id=self.eos_id,
                        generator=stream_generator(self.cfg.seed, "eval_diversity", self.rank), record_predictions=False)
        completions = [tuple(row) for row in traj.sequences[:, traj.prompt_length:].tolist()]
        k = e.diversity_samples
        fractions = [distinct_fraction(completions[i * k:(i + 1) * k]) for i in range(len(examples))]
        return self._mean(torch.tensor(fractions, dtype=torch.float32))

    def _log_eval(self, step: int, result: dict[str, Any]) -> None:
        result.update(self.monitor.update(step, result)[0])  # eval/gap/<judge>
        self.logger.log(step, result)
        if step and (self.best is None or result["eval/accuracy"] > self.best["eval/accuracy"]):
            self.best = {"step": step, **result}
            if self.is_main:
                write_folder_atomically(os.path.join(self.cfg.output_dir, "best"), self.model.save_pretrained)

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        """Atomic checkpoint: trainable weights, optimizer, RNG, step, elapsed time, before/best evaluations."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            save_training_state(self.cfg.output_dir, step, self.model, self.optimizer,
                                extra={"step": step, "before": self.before, "best": self.best,
                                       "train_seconds": self.train_seconds},
                                keep_last=self.cfg.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def _maybe_resume(self) -> None:
        ckpt = resume_training_state(self.cfg.train.resume, self.cfg.output_dir, self.model, self.optimizer)
        if ckpt is None:
            return
        self.start_iteration = int(ckpt.extra["step"])
        self.before, self.best = ckpt.extra.get("before"), ckpt.extra.get("best")
        self.train_seconds = float(ckpt.extra.get("train_seconds", 0.0))
        self.monitor.replay(self.cfg.output_dir, until=self.start_iteration)
        if self.is_main:
            print(f"[flowalign] resumed from {ckpt.path} at iteration {self.start_iteration}")

    # ------------------------------------------------------------------------------------------
    # outputs
    # ------------------------------------------------------------------------------------------
    def _finish(self, final: dict[str, Any]) -> dict[str, Any]:
        cfg, out = self.cfg, self.cfg.output_dir
        summary: dict[str, Any] = {"output_dir": out, "algorithm": cfg.algorithm.name, "iterations": self.last_step,
                                   "before": self.before, "after": final, "best": self.best}
        if not self.is_main:
            return summary
        write_folder_atomically(os.path.join(out, "final"), self.model.save_pretrained)
        records = read_metrics(os.path.join(out, "metrics.jsonl"))
        iter_times = [r["time/iteration_s"] for r in records if "time/iteration_s" in r]
        forwards = [r["cost/sequence_forwards"] for r in records if "cost/sequence_forwards" in r]
        summary["seconds_per_iteration"] = float(np.mean(iter_times)) if iter_times else float("nan")
        summary["sequence_forwards_per_iteration"] = float(np.mean(forwards)) if forwards else float("nan")
        summary["train_seconds"] = self.train_seconds
        summary["curve"] = save_reward_curve(
            os.path.join(out, "accuracy_curve.png"), records, ylabel="accuracy",
            series={"train/accuracy": "rollout accuracy (sampled)", "eval/accuracy": "held-out accuracy (greedy)"},
            title=f"{cfg.algorithm.name} on {cfg.task.name}")
        summary["table"] = before_after_table(self.before, final, self.best, summary["seconds_per_iteration"])
        write_summary(out, summary, "accuracy_curve.png, metrics.jsonl, summary.json, final/, best/")
        return summary

    def cleanup(self) -> None:
        self.logger.close()
        end_accelerator(self.accelerator)
