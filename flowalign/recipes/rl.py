"""The sampled-trajectory policy-gradient recipe: Flow-GRPO, DanceGRPO and the presets built on them.

One readable loop (torchtune-style ``setup / train / save_checkpoint / cleanup``). Each iteration:

1. **rollout** -- P prompts x G samples through the SDE sampler, recorded as a ``RolloutTree``
   (each rank samples G / world_size of every prompt's group, so groups span ranks);
2. **reward** -- decode and score the leaves, then gather scores from every rank;
3. **advantages** -- group-relative over the *global* group, scattered back onto the tree's edges;
4. **update** -- recompute each trained edge's log-prob under the current weights and minimise the
   PPO-clip loss (+ optional KL on transition means against the reference policy).

All math lives in ``flowalign.samplers``, ``flowalign.advantages`` and ``flowalign.losses``. Every
random stream is derived from ``(seed, stream name, iteration, rank)``, so a resumed run replays
exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from flowalign.advantages import edge_advantages, get_advantage_estimator
from flowalign.config import (
    ConfigError,
    RLConfig,
    build_optimizer,
    num_trained_steps,
    read_prompt_records,
    to_yaml,
)
from flowalign.errors import loading
from flowalign.diversity import HackingMonitor, embedding_source, group_diversity
from flowalign.estimators.dense import calibrate_noise, step_reward_gains
from flowalign.estimators.preference import decoupled_normalization
from flowalign.estimators.presets import EDGE_ESTIMATORS, EdgeTargets, lookahead_table
from flowalign.estimators.tree import noise_aware_weights
from flowalign.guards import assert_finite, assert_on_policy
from flowalign.losses import get_loss, kl_on_means
from flowalign.pipelines import load_adapter_class
from flowalign.rewards.registry import build_rewards
from flowalign.rollout import BranchSpec, integrate_ode, lookahead_sigmas, rollout, sample_ode
from flowalign.rollout.schedules import mix_window
from flowalign.samplers import sde_step
from flowalign.training.accel import configure_threads, end_accelerator
from flowalign.training.checkpoint import resume_training_state, save_training_state
from flowalign.training.ema import EMA
from flowalign.training.interrupt import StopSignal, stopped_run
from flowalign.training.metrics import MetricsLogger, discard_stale_metrics, read_metrics, write_summary
from flowalign.training.plots import before_after_table, save_image_grid, save_reward_curve
from flowalign.training.rundir import record_run, write_folder_atomically
from flowalign.types import Conditioning, RolloutTree

#: edge estimators that score an ODE look-ahead from every node (RLRecipe._score_lookaheads).
LOOKAHEAD_ESTIMATORS = ("dense", "vgpo")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIME_KEYS = ("time/rollout_s", "time/reward_s", "time/train_s", "time/other_s", "time/iteration_s")


def stream_generator(seed: int, stream: str, *indices: int) -> torch.Generator:
    """A CPU generator for one named random stream, e.g. ``("rollout", iteration, rank)``."""
    words = [seed, *(ord(c) for c in stream), *indices]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))


def prompt_indices(num_prompts: int, per_iter: int, iteration: int, seed: int) -> list[int]:
    """Prompts of one iteration: consecutive slices of a fresh seeded permutation per epoch."""
    out = []
    for position in range(iteration * per_iter, (iteration + 1) * per_iter):
        epoch, offset = divmod(position, num_prompts)
        perm = torch.randperm(num_prompts, generator=stream_generator(seed, "prompts", epoch))
        out.append(int(perm[offset]))
    return out


class RLRecipe:
    """Flow-GRPO-style training of a pipeline adapter against rewards.

    Args:
        cfg: the validated run configuration.
        rewards: optional Python reward(s) replacing ``cfg.rewards`` (a Reward, a plain callable
            ``fn(media, prompts, metadata)``, or a list / dict of them).
        judges: optional Python judge(s) replacing ``cfg.eval.judges``.
    """

    def __init__(self, cfg: RLConfig, *, rewards: Any = None, judges: Any = None):
        self.cfg = cfg
        self._reward_override = rewards
        self._judge_override = judges
        #: Python objects standing in for config entries, recorded with the run's settings (run.json)
        self.replacements = {"rewards": rewards, "eval.judges": judges}

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self, *, for_training: bool = True) -> None:
        """Load the model, rewards and prompts. ``for_training=False`` (evaluation only) neither
        reads nor writes ``output_dir``: no resume, no config record, no logs."""
        cfg = self.cfg
        self.num_threads = configure_threads(cfg.num_threads)
        # Without an accelerator, accelerate only sets up multi-process (gloo) training when told to
        # use the CPU; Accelerator() would leave every torchrun process training alone.
        no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
        self.accelerator = Accelerator(cpu=cfg.device == "cpu" or no_accelerator, mixed_precision=cfg.train.mixed_precision)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        torch.manual_seed(cfg.seed)  # LoRA initialisation

        adapter_cls = load_adapter_class(cfg.model._component_)
        try:
            with loading("model.pretrained", cfg.model.pretrained):
                self.adapter = adapter_cls.from_pretrained(cfg.model.pretrained, dtype=DTYPES[cfg.model.dtype],
                                                           device=self.accelerator.device, **cfg.model.options)
        except TypeError as err:
            if "unexpected keyword" not in str(err):
                raise
            raise ConfigError(f"model.options: {err} (options accepted by {adapter_cls.__name__}.from_pretrained)") from err
        self.module = self._make_trainable(self.adapter.trainable_module())
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg.train.optimizer, self.params)
        wrapped, self.optimizer = self.accelerator.prepare(self.module, optimizer)
        self.adapter.set_trainable_module(wrapped)
        self.wrapped = wrapped
        self.ema = EMA(self.module, decay=cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

        # plain Python functions score what this adapter decodes: [B,3,H,W] images or [B,F,3,H,W] video
        modality = "video" if len(self.adapter.latent_shape) == 4 else "image"
        reward_specs = self._reward_override if self._reward_override is not None else cfg.rewards
        self.reward_fn = build_rewards(_spec_list(reward_specs, modality))
        judge_specs = _spec_list(self._judge_override if self._judge_override is not None else cfg.eval.judges, modality)
        self.judges = build_rewards(judge_specs).rewards if judge_specs else {}
        self.embedder = embedding_source({**self.judges, **self.reward_fn.rewards})  # sample diversity's features
        self.monitor = HackingMonitor("eval/reward", [f"eval/judge/{name}" for name in self.judges])
        self.train_records = read_prompt_records(cfg.data.train_prompts, "data.train_prompts")
        self.eval_records = read_prompt_records(cfg.eval.prompts, "eval.prompts")
        self.train_prompts = [r["prompt"] for r in self.train_records]
        self.eval_prompts = [r["prompt"] for r in self.eval_records]
        a = cfg.algorithm
        self.edge_estimator = EDGE_ESTIMATORS.get(a.advantage)
        self.advantage_fn = None if self.edge_estimator else get_advantage_estimator(a.advantage)
        self.loss_fn = get_loss(a.loss)
        self.noise_level_schedule = [cfg.sampling.noise_level] * cfg.sampling.num_steps

        self.start_iteration, self.before, self.best = 0, None, None
        self.logger = MetricsLogger(cfg.output_dir, enabled=False)
        if not for_training:
            return
        if self.is_main:
            record_run(cfg.output_dir, cfg, to_yaml(cfg), self.replacements)
        self._maybe_resume()
        if self.is_main and self.start_iteration == 0:
            discard_stale_metrics(cfg.output_dir)
        if self.is_main:
            s = cfg.sampling
            print(f"[flowalign] {cfg.model._component_} ({cfg.model.pretrained}) on {self.accelerator.device}, "
                  f"num_processes={self.world}, threads={self.num_threads}, trainable parameters="
                  f"{sum(p.numel() for p in self.params):,}; per iteration: {cfg.data.prompts_per_iter} prompts x "
                  f"{s.group_size} samples, {s.num_steps} steps ({s.sampler} SDE, noise {s.noise_level})")
        self.logger = MetricsLogger(cfg.output_dir, tensorboard=cfg.logging.tensorboard,
                                    wandb_project=cfg.logging.wandb_project,
                                    resume_step=self.start_iteration or None,
                                    enabled=self.is_main)

    def _make_trainable(self, module: torch.nn.Module) -> torch.nn.Module:
        m = self.cfg.model
        if m.lora_rank > 0:
            from peft import LoraConfig

            module.requires_grad_(False)
            module.add_adapter(LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha or m.lora_rank,
                                          target_modules=self.adapter.lora_target_modules, init_lora_weights="gaussian"))
        else:
            module.requires_grad_(True)
            if self.cfg.algorithm.kl_beta > 0:
                self.adapter.keep_reference_copy()
        if m.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        return module.train()

    def _branch_spec(self, iteration: int) -> BranchSpec:
        """What iteration ``iteration`` samples on this rank (a flat group, a BranchGRPO tree, a
        MixGRPO window or a TempFlow branch; see :mod:`flowalign.rollout.spec`)."""
        s = self.cfg.sampling
        T, per_rank = s.num_steps, s.group_size // self.world
        levels = self.noise_level_schedule
        if s.branch_steps:  # TempFlow-GRPO: ODE trunk, one SDE split per iteration, ODE finish
            k = s.branch_steps[iteration % len(s.branch_steps)]
            noise = [levels[t] if t == k else 0.0 for t in range(T)]
            return BranchSpec(T, noise, samples_per_prompt=1, splits=((k, per_rank),), sampler=s.sampler,
                              guidance_scale=s.guidance_scale)
        start, end = self._sde_window(iteration)
        noise = [levels[t] if start <= t < end else 0.0 for t in range(T)]
        splits = tuple((step, k) for step, k in s.splits)
        for step, _ in splits:  # BranchGRPO's split noise scale
            noise[step] = s.split_noise_level if s.split_noise_level is not None else levels[step]
        trained = tuple(range(start, start + num_trained_steps(s, end - start)))
        return BranchSpec(T, noise, samples_per_prompt=per_rank // math.prod(k for _, k in splits), splits=splits,
                          sampler=s.sampler, train_steps=trained, guidance_scale=s.guidance_scale)

    def _sde_window(self, iteration: int) -> tuple[int, int]:
        """``[start, end)`` steps sampled with the SDE: MixGRPO's moving window, a fixed
        ``sampling.sde_window``, or every step."""
        s = self.cfg.sampling
        w = s.window
        if w.strategy != "none":
            return mix_window(iteration, s.num_steps, strategy=w.strategy, size=w.size, shift_every=w.shift_every,
                              min_shift_every=w.min_shift_every, stride=w.stride, decay_rate=w.decay_rate,
                              decay_start=w.decay_start, roll_back=w.roll_back,
                              generator=stream_generator(self.cfg.seed, "window", iteration))
        return tuple(s.sde_window) if s.sde_window is not None else (0, s.num_steps)

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.before is None:
            self.before = self.evaluate(step=0)
            self._log_eval(0, self.before)
        bar = tqdm(range(self.start_iteration, cfg.train.iterations), desc="flowalign train", initial=self.start_iteration,
                   total=cfg.train.iterations, disable=not (self.is_main and cfg.logging.progress))
        with StopSignal() as stop:
            for iteration in bar:
                step = iteration + 1
                metrics = self.train_iteration(iteration)
                t0 = time.perf_counter()
                if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.iterations:
                    self._log_eval(step, self.evaluate(step))
                metrics["time/other_s"] = time.perf_counter() - t0
                metrics["time/iteration_s"] = sum(metrics[k] for k in TIME_KEYS[:4])
                self.logger.log(step, metrics)  # before the checkpoint: a resumed run keeps every logged step
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step != cfg.train.iterations:
                    self.save_checkpoint(step)
                bar.set_postfix(reward=f"{metrics['train/reward_mean']:.3f}")
                if step != cfg.train.iterations and stop.requested(self.accelerator):
                    bar.close()
                    self.save_checkpoint(step)
                    raise stopped_run(step, cfg.train.iterations, cfg.output_dir, stop.exit_code)
        final = self.evaluate(cfg.train.iterations)
        if self.start_iteration < cfg.train.iterations:  # else: a finished run re-opened, already logged
            self._log_eval(cfg.train.iterations, final)
            self.save_checkpoint(cfg.train.iterations)
        return self._finish(final)

    def train_iteration(self, iteration: int) -> dict[str, float]:
        """One rollout + reward + advantage + update cycle; returns its metrics."""
        cfg, acc = self.cfg, self.accelerator
        t0 = time.perf_counter()
        idx = prompt_indices(len(self.train_prompts), cfg.data.prompts_per_iter, iteration, cfg.seed)
        prompts = [self.train_prompts[i] for i in idx]
        records = [self.train_records[i] for i in idx]
        spec = self._branch_spec(iteration)
        self.noise_levels = torch.tensor(spec.noise_levels, dtype=torch.float32)
        self.module.eval()
        with acc.autocast():
            cond = self._encode(prompts)
            tree = rollout(self.adapter, cond, spec, prompts=prompts,
                           generator=stream_generator(cfg.seed, "rollout", iteration, self.rank),
                           keep_means=False, keep_velocities=cfg.algorithm.advantage in LOOKAHEAD_ESTIMATORS, decode=True)
        t1 = time.perf_counter()

        leaf_idx = tree.leaf_prompt_idx.tolist()
        reward = self.reward_fn(tree.media, [prompts[i] for i in leaf_idx],
                                _metadata([records[i] for i in leaf_idx], tree.leaf_group.tolist()))
        scores = assert_finite(reward.scores.to(acc.device), "rewards")
        valid = reward.valid.to(acc.device) if reward.valid is not None else torch.ones_like(scores, dtype=torch.bool)
        all_scores, all_groups, all_valid = acc.gather((scores, tree.leaf_group.to(acc.device), valid))
        lookahead_nfe = 0
        if cfg.algorithm.advantage in LOOKAHEAD_ESTIMATORS:
            lookahead_nfe = self._score_lookaheads(tree, cond, prompts, records)
        t2 = time.perf_counter()

        targets = self._edge_targets(tree, reward, scores, valid, (all_scores, all_groups, all_valid), iteration)
        self.module.train()
        train_metrics = self._update(tree, cond, targets, iteration)
        if cfg.algorithm.calibrate_noise:
            train_metrics.update(self._calibrate_noise(tree, scores.cpu()))
        t3 = time.perf_counter()

        metrics = {
            "train/reward_mean": all_scores.mean().item(),
            "train/reward_std": all_scores.std().item(),
            "train/advantage_abs_mean": targets.advantages[targets.trainable].abs().mean().item(),
            "rollout/nfe": float(tree.nfe + lookahead_nfe),
            "rollout/trained_edges": float(targets.trainable.sum().item()),
            **{f"train/{k}": acc.gather(v.to(acc.device)).mean().item() for k, v in reward.components.items()},
            **train_metrics,
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/train_s": t3 - t2,
        }
        return metrics

    def _edge_targets(self, tree: RolloutTree, reward: Any, scores: torch.Tensor, valid: torch.Tensor,
                      gathered: tuple[torch.Tensor, torch.Tensor, torch.Tensor], iteration: int) -> EdgeTargets:
        """Per-edge advantages of this rank's tree: the flat group estimator over groups gathered
        from every rank, or a tree preset (``algorithm.advantage`` in EDGE_ESTIMATORS) on the local tree."""
        a = self.cfg.algorithm
        if self.edge_estimator is not None:
            if not bool(valid.all()):
                raise FloatingPointError(f"algorithm.advantage={a.advantage!r} needs every leaf scored, but the reward "
                                         f"marked {int((~valid).sum())} samples invalid")
            targets = self.edge_estimator(tree, scores.cpu(), a, iteration)
            if a.advantage == "tempflow" and a.noise_aware:
                targets.loss_scale = self._branch_step_weight(tree)
        else:
            all_scores, all_groups, all_valid = (t.cpu() for t in gathered)
            if a.reward_normalization == "decoupled" and len(self.reward_fn.weights) > 1:
                if not bool(all_valid.all()):
                    raise FloatingPointError("algorithm.reward_normalization=decoupled needs every sample scored by every reward")
                parts = {name: self.accelerator.gather(reward.components[name].to(self.accelerator.device)).cpu()
                         for name in self.reward_fn.weights}
                all_adv = decoupled_normalization(parts, self.reward_fn.weights, all_groups, std_mode=a.std_mode, renormalize=True)
                all_adv = all_adv.clamp(-a.adv_clip, a.adv_clip) if a.adv_clip else all_adv
            else:
                all_adv = self.advantage_fn(all_scores, all_groups, std_mode=a.std_mode, clip=a.adv_clip or None, valid=all_valid)
            leaf_adv = all_adv.view(self.world, -1)[self.rank]
            targets = EdgeTargets(edge_advantages(leaf_adv, tree.leaf_edges, tree.num_edges), tree.trainable)
        assert_finite(targets.advantages, "advantages")
        return targets

    @torch.no_grad()
    def _score_lookaheads(self, tree: RolloutTree, cond: Conditioning, prompts: list[str], records: list[dict]) -> int:
        """Score the ODE look-ahead from every node before each step (DenseGRPO Eqs. 8-9; with
        ``algorithm.lookahead_steps=1`` VGPO's one-step projection) into
        ``tree.node_values["lookahead"] [E]``; returns the model evaluations spent. The first step
        of each look-ahead reuses the velocity the rollout computed at that ``x_t`` (same weights,
        same point), so a one-step projection costs no model evaluation. Runs in the rollout's eval mode."""
        cfg, acc = self.cfg, self.accelerator
        values = torch.zeros(tree.num_edges, dtype=torch.float32)
        nfe = 0
        for depth in range(len(tree.sigmas) - 1):
            edges = (tree.step == depth).nonzero().squeeze(1)
            sigmas = lookahead_sigmas(tree.sigmas, depth, cfg.algorithm.lookahead_steps)
            with acc.autocast():
                x0 = integrate_ode(self.adapter, cond[tree.prompt_idx[edges]], tree.x_t[edges], sigmas,
                                   guidance_scale=cfg.sampling.guidance_scale,
                                   first_velocity=tree.velocity[edges] if tree.velocity is not None else None)
                media = self.adapter.decode(x0)
            idx = tree.prompt_idx[edges].tolist()
            out = self.reward_fn(media, [prompts[i] for i in idx], _metadata([records[i] for i in idx], idx))
            values[edges.cpu()] = assert_finite(out.scores.float().cpu(), "look-ahead rewards")
            nfe += len(edges) * (len(sigmas) - 1 - (tree.velocity is not None))
        tree.node_values["lookahead"] = values
        return nfe

    def _calibrate_noise(self, tree: RolloutTree, leaf_rewards: torch.Tensor) -> dict[str, float]:
        """DenseGRPO's reward-aware exploration calibration (Algorithm 1) of the per-step noise level
        used by the next rollouts. ψ(t) is our per-step noise level ``a_t``: the SDE std is
        ``a_t·√(σ/(1−σ))`` (Flow-GRPO) instead of Eq. 11's ``σ_t = ψ(t)``, the same per-step degree of freedom."""
        gains = step_reward_gains(lookahead_table(tree, leaf_rewards))
        psi = calibrate_noise(torch.tensor(self.noise_level_schedule), gains, rate=self.cfg.algorithm.calibration_rate,
                              margin=self.cfg.algorithm.calibration_margin, bounds=(1e-3, math.inf))
        self.noise_level_schedule = [float(a) for a in psi]
        return {f"rollout/noise_level_{t}": a for t, a in enumerate(self.noise_level_schedule)}

    def _branch_step_weight(self, tree: RolloutTree) -> float:
        """TempFlow-GRPO noise-aware weight of this iteration's branch step (He et al. 2025,
        arXiv:2508.04324, §3.2): its transition std ``std_k·√Δ_k`` relative to the mean over all
        branch steps of ``sampling.branch_steps``, so the schedule's average weight is 1."""
        s = self.cfg.sampling
        stds = []
        for k in s.branch_steps:
            sigma, sigma_next = tree.sigmas[k].reshape(1), tree.sigmas[k + 1].reshape(1)
            x = torch.zeros(1, 1, device=sigma.device)
            stds.append(float(sde_step(x, sigma, sigma_next, x, kind=s.sampler, noise_level=self.noise_level_schedule[k],
                                       prev_sample=x).std.reshape(-1)[0]))
        weights = noise_aware_weights(torch.tensor(stds))
        return float(weights[s.branch_steps.index(int(tree.step[tree.noise_std > 0][0]))])

    def _update(self, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets, iteration: int) -> dict[str, float]:
        """PPO-clip updates over the trained edges, ``steps_per_iter`` optimizer steps.

        The first micro-batch runs before any weight change, so its ratio must be exactly 1
        (docs/ARCHITECTURE.md invariant 2): it is checked and logged every iteration."""
        edges = targets.trainable.nonzero().squeeze(1)
        edges = edges[torch.randperm(len(edges), generator=stream_generator(self.cfg.seed, "shuffle", iteration, self.rank))]
        first: dict[str, float] = {}

        def check_on_policy(metrics: dict[str, float]) -> None:
            first.update(metrics)
            self._check_on_policy(metrics["ratio_max_dev"])

        out = self._optimize(edges, lambda mb: self._edge_loss(tree, cond, targets, mb), iteration, on_first=check_on_policy)
        out["train/ratio_first_step_dev"] = first["ratio_max_dev"]
        return out

    def _optimize(self, items: torch.Tensor, micro_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
                  iteration: int, on_first: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
        """``train.steps_per_iter`` optimizer steps over ``items [N]`` (shuffled edge or leaf ids), split
        evenly; each step accumulates gradients over micro-batches of ``train.micro_batch_size``
        (``micro_loss(ids) -> (loss, metrics)``), clips them, refuses a non-finite norm, steps and
        updates the EMA. ``on_first`` sees the first micro-batch's metrics before any weight changes.
        Returns the metrics averaged over micro-batches, and the mean gradient norm."""
        cfg, acc = self.cfg, self.accelerator
        sums: dict[str, float] = {}
        grad_norms: list[float] = []
        n_micro = 0
        for k, chunk in enumerate(items.tensor_split(cfg.train.steps_per_iter)):
            micro_batches = chunk.split(cfg.train.micro_batch_size)
            for j, mb in enumerate(micro_batches):
                sync = nullcontext() if j == len(micro_batches) - 1 else acc.no_sync(self.wrapped)
                with sync:
                    loss, m = micro_loss(mb)
                    acc.backward(loss * (len(mb) / len(chunk)))
                if n_micro == 0 and on_first is not None:
                    on_first(m)
                for name, value in m.items():
                    sums[f"train/{name}"] = sums.get(f"train/{name}", 0.0) + value
                n_micro += 1
            grad_norm = acc.clip_grad_norm_(self.params, cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf)
            grad_norms.append(assert_finite(torch.as_tensor(grad_norm, dtype=torch.float32).reshape(1), "gradient norm").item())
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.module, step=iteration * cfg.train.steps_per_iter + k)
        out = {name: total / n_micro for name, total in sums.items()}
        out["train/grad_norm"] = float(np.mean(grad_norms))
        return out

    def _edge_loss(self, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets, mb: torch.Tensor):
        """Loss of a micro-batch of edges: new log-probs of the stored transitions vs the old ones."""
        cfg, acc = self.cfg, self.accelerator
        step = tree.step[mb]
        sigma, sigma_next = tree.sigmas[step], tree.sigmas[step + 1]
        x_t = tree.x_t[mb].to(self.adapter.dtype)
        c = cond[tree.prompt_idx[mb]]
        kwargs = dict(kind=cfg.sampling.sampler, noise_level=self.noise_levels[step].to(x_t.device), prev_sample=tree.x_next[mb])
        with acc.autocast():
            v = self.adapter.predict(x_t, sigma, c, cfg.sampling.guidance_scale)
        new = sde_step(v.float(), sigma, sigma_next, tree.x_t[mb], **kwargs)
        kl = None
        if cfg.algorithm.kl_beta > 0:
            with torch.no_grad(), self.adapter.disable_adapter(), acc.autocast():
                v_ref = self.adapter.predict(x_t, sigma, c, cfg.sampling.guidance_scale)
            ref = sde_step(v_ref.float(), sigma, sigma_next, tree.x_t[mb], **kwargs)
            kl = kl_on_means(new.mean, ref.mean, new.std)
        weights = targets.weights[mb] if targets.weights is not None else None
        loss, metrics = self.loss_fn(new.log_prob, tree.log_prob_old[mb], targets.advantages[mb], clip_range=cfg.algorithm.clip_range,
                                     weights=weights, kl=kl, kl_beta=cfg.algorithm.kl_beta)
        return loss * targets.loss_scale, metrics

    def _encode(self, prompts: list[str]) -> Conditioning:
        """Encode prompts, with the negative prompt when classifier-free guidance is on."""
        s = self.cfg.sampling
        negatives = [s.negative_prompt] * len(prompts) if s.guidance_scale != 1.0 else None
        return self.adapter.encode(prompts, negatives)

    def _check_on_policy(self, ratio_dev: float) -> None:
        """Invariant 2 of docs/ARCHITECTURE.md: before any update the recomputed log-probs equal the rollout's."""
        assert_on_policy(ratio_dev, self.cfg.algorithm.ratio_tolerance, "the rollout and the update compute "
                         "log-probs differently (dropout on? different precision? non-deterministic kernels?)")

    # ------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Deterministic ODE samples of the held-out prompts from fixed noise, scored by the
        training rewards and by the judges. Returns metrics plus the grid's media (main rank)."""
        cfg, acc = self.cfg, self.accelerator
        e = cfg.eval
        records = [r for r in self.eval_records for _ in range(e.samples_per_prompt)]
        prompts = [r["prompt"] for r in records]
        n_local = len(prompts) // self.world
        shard = slice(self.rank * n_local, (self.rank + 1) * n_local)
        latents = self.adapter.init_latents(len(prompts), stream_generator(cfg.seed, "eval"))[shard]
        groups = [i // e.samples_per_prompt for i in range(len(prompts))]  # one group per held-out prompt
        local_prompts, local_metadata = prompts[shard], _metadata(records[shard], groups[shard])
        self.module.eval()
        with (self.ema.swapped_into(self.module) if self.ema is not None else nullcontext()), acc.autocast():
            cond = self._encode(local_prompts)
            final = sample_ode(self.adapter, cond, e.num_steps, latents=latents, guidance_scale=cfg.sampling.guidance_scale)
            media = self.adapter.decode(final)
        self.module.train()
        result: dict[str, Any] = {}
        scorers = {"reward": self.reward_fn, **{f"judge/{name}": judge for name, judge in self.judges.items()}}
        for prefix, scorer in scorers.items():
            out = scorer(media, local_prompts, local_metadata)
            result[f"eval/{prefix}"] = acc.gather(out.scores.to(acc.device)).mean().item()
            for comp, values in out.components.items():
                result[f"eval/{prefix}/{comp}"] = acc.gather(values.float().to(acc.device)).mean().item()
        features = self.embedder[1].embed(media) if self.embedder else final.flatten(1)
        result["eval/diversity"] = group_diversity(acc.gather(features.float().contiguous()).cpu(), torch.tensor(groups)).item()
        grid_media = acc.gather((media * 255).round().to(torch.uint8).contiguous())
        n_grid = min(e.grid_prompts, len(self.eval_prompts)) * e.samples_per_prompt
        result["media"] = grid_media[:n_grid].float().div(255).cpu()
        return result

    def _log_eval(self, step: int, result: dict[str, Any]) -> None:
        result.update(self.monitor.update(step, result)[0])  # eval/gap/<judge>
        scalars = {k: v for k, v in result.items() if k != "media"}
        self.logger.log(step, scalars)
        if step and (self.best is None or scalars["eval/reward"] > self.best["eval/reward"]):
            self.best = {"step": step, **scalars}
            if self.is_main:
                with self.ema.swapped_into(self.module) if self.ema is not None else nullcontext():
                    write_folder_atomically(os.path.join(self.cfg.output_dir, "best"), self.adapter.save_pretrained)
        if self.is_main and step == 0:
            torch.save(result["media"], os.path.join(self.cfg.output_dir, "eval_before_media.pt"))

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        """Atomic checkpoint: trainable weights, optimizer, EMA, RNG, step, before/best evaluations."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            save_training_state(self.cfg.output_dir, step, self.module, self.optimizer, ema=self.ema,
                                extra={"step": step, "before": _scalars(self.before), "best": self.best,
                                       "noise_level_schedule": self.noise_level_schedule},
                                keep_last=self.cfg.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def _maybe_resume(self) -> None:
        ckpt = resume_training_state(self.cfg.train.resume, self.cfg.output_dir, self.module, self.optimizer, self.ema)
        if ckpt is None:
            return
        self.start_iteration = int(ckpt.extra["step"])
        self.before = ckpt.extra.get("before")
        self.best = ckpt.extra.get("best")
        self.noise_level_schedule = ckpt.extra.get("noise_level_schedule", self.noise_level_schedule)
        self.monitor.replay(self.cfg.output_dir, until=self.start_iteration)
        media_file = os.path.join(self.cfg.output_dir, "eval_before_media.pt")
        if self.before is not None and os.path.exists(media_file):
            self.before["media"] = torch.load(media_file)
        if self.is_main:
            print(f"[flowalign] resumed from {ckpt.path} at iteration {self.start_iteration}")

    # ------------------------------------------------------------------------------------------
    # outputs
    # ------------------------------------------------------------------------------------------
    def _finish(self, final: dict[str, Any]) -> dict[str, Any]:
        cfg, out = self.cfg, self.cfg.output_dir
        before = self.before
        summary: dict[str, Any] = {"output_dir": out, "iterations": cfg.train.iterations,
                                   "before": _scalars(before), "after": _scalars(final), "best": self.best}
        if not self.is_main:
            return summary
        with self.ema.swapped_into(self.module) if self.ema is not None else nullcontext():
            write_folder_atomically(os.path.join(out, "final"), self.adapter.save_pretrained)
            if self.adapter.has_lora() and hasattr(self.adapter, "save_lora_weights"):
                # diffusers LoRA format: DiffusionPipeline.load_lora_weights(<output_dir>/lora)
                write_folder_atomically(os.path.join(out, "lora"), self.adapter.save_lora_weights)
        records = read_metrics(os.path.join(out, "metrics.jsonl"))
        iter_times = [r["time/iteration_s"] for r in records if "time/iteration_s" in r]
        summary["seconds_per_iteration"] = float(np.mean(iter_times)) if iter_times else float("nan")

        if before is not None and "media" in before:
            if before["media"].ndim == 5:  # video: the same before | after tiling, animated
                from flowalign.training.video import save_video_grid

                spp, k = cfg.eval.samples_per_prompt, min(4, cfg.eval.samples_per_prompt)
                n = before["media"].shape[0] // spp
                summary["video_grid"] = save_video_grid(
                    os.path.join(out, "before_after"),
                    [torch.cat([before["media"][i * spp:][:k], final["media"][i * spp:][:k]]) for i in range(n)], fps=8)
            still = lambda media: media[:, media.shape[1] // 2] if media.ndim == 5 else media  # noqa: E731  video: middle frame
            before, final = {**before, "media": still(before["media"])}, {**final, "media": still(final["media"])}
            k = min(4, cfg.eval.samples_per_prompt)
            n = before["media"].shape[0] // cfg.eval.samples_per_prompt
            rows = [torch.cat([before["media"][i * cfg.eval.samples_per_prompt:][:k],
                               final["media"][i * cfg.eval.samples_per_prompt:][:k]]) for i in range(n)]
            summary["grid"] = save_image_grid(os.path.join(out, "before_after.png"), rows,
                                              row_labels=self.eval_prompts[:n], col_labels=["before"] * k + ["after"] * k,
                                              title="held-out prompts: base model | aligned model (ODE, fixed noise)")
        series = {"train/reward_mean": "train reward", "eval/reward": "held-out reward"}
        series.update({k: k.removeprefix("eval/") for k in final if k.startswith("eval/judge/") and k.endswith("accuracy")})
        series["eval/diversity"] = "held-out diversity"
        summary["curve"] = save_reward_curve(os.path.join(out, "reward_curve.png"), records, series=series,
                                             title=f"{cfg.model._component_}: {self.reward_fn.name}")
        summary["table"] = before_after_table(_scalars(before), _scalars(final), self.best, summary["seconds_per_iteration"])
        write_summary(out, summary, "before_after.png, reward_curve.png, metrics.jsonl, final/, best/")
        return summary

    def cleanup(self) -> None:
        self.logger.close()
        end_accelerator(self.accelerator)


def _metadata(records: list[dict[str, Any]], groups: list[int]) -> list[dict[str, Any]]:
    """Per-sample reward metadata: each prompt record without its "prompt", plus ``"group"``: the
    sample's group (its prompt in the batch), which groupwise rewards (Pref-GRPO win rates) compare within."""
    return [{**{k: v for k, v in r.items() if k != "prompt"}, "group": int(g)} for r, g in zip(records, groups)]


def _scalars(result: dict[str, Any] | None) -> dict[str, float] | None:
    return None if result is None else {k: v for k, v in result.items() if k != "media"}


def _spec_list(specs: Any, modality: str) -> list | dict:
    """Reward specs as a list or dict: a single reward becomes a one-element list, and plain
    functions (no ``modality`` attribute) are wrapped as rewards of the adapter's ``modality``."""
    from flowalign.rewards.callable import CallableReward

    def wrap(spec: Any) -> Any:
        return CallableReward(spec, modality=modality) if callable(spec) and not hasattr(spec, "modality") else spec

    if isinstance(specs, dict):
        return {k: wrap(v) for k, v in specs.items()} if "_component_" not in specs else [specs]
    return [wrap(spec) for spec in (specs if isinstance(specs, (list, tuple)) else [specs])]

