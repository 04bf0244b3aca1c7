"""The sampled-trajectory policy-gradient loop of every image / video algorithm (``recipe: rl``).

One readable iteration; the algorithm (``algorithm.name``, :mod:`flowalign.algorithms`) decides what
is sampled and what each edge is trained with, the plumbing (run directory, checkpoints, evaluation
schedule, time budget) is :class:`flowalign.recipes.base.Recipe`'s:

1. **rollout** -- P prompts x G samples sampled as the algorithm's ``rollout_spec`` says (a flat
   group, a shared-prefix tree, an SDE window, a branch step) into a ``RolloutTree``; each rank
   samples G / world_size of every prompt's group (groups span ranks), or with trees and
   pairwise rewards P / world_size whole groups (:class:`flowalign.rollout.Shard`). Every sample
   is the same whatever the number of processes;
2. **reward** -- decode and score the leaves, then gather scores from every rank;
3. **targets** -- the algorithm's estimator turns them into per-edge advantages, trained edges and
   weights (``EdgeTargets``), spending model evaluations if it needs them (look-aheads);
4. **update** -- recompute each trained edge's log-prob under the current weights and minimise the
   PPO-clip loss (+ optional KL on transition means against the reference policy), one host sync
   per optimizer step.

All math lives in ``flowalign.samplers``, ``flowalign.advantages``, ``flowalign.estimators`` and
``flowalign.losses``. Every random stream is derived from ``(seed, stream name, iteration[, rank])``
(:func:`flowalign.training.rng.stream_generator`), so a resumed run replays exactly what an
uninterrupted one would have done; the rollout's streams are the same on every rank.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from contextlib import nullcontext
from typing import Any, Callable

import torch

from flowalign.algorithms import get_algorithm
from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm, RolloutContext, ScoredRollout
from flowalign.config import ConfigError, RLConfig, build_optimizer, read_prompt_records
from flowalign.data.images import load_source_images, resolve_record_images
from flowalign.diversity import embedding_source, group_diversity
from flowalign.errors import loading
from flowalign.guards import assert_finite, assert_on_policy
from flowalign.losses import kl_form_scale, kl_on_means
from flowalign.pipelines import load_adapter_class
from flowalign.recipes.base import FIRST_STEP_DEV, Recipe, accumulate, average_steps, scalars
from flowalign.rewards.registry import build_rewards
from flowalign.rollout import Shard, rollout, sample_ode
from flowalign.samplers import sde_step
from flowalign.training.ema import EMA
from flowalign.training.fsdp import sync_gradients
from flowalign.training.plots import save_image_grid, save_reward_curve
from flowalign.training.rng import prompt_indices, stream_generator
from flowalign.training.rundir import write_folder_atomically
from flowalign.types import Conditioning, RolloutTree

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RLRecipe(Recipe):
    """Policy-gradient training of a pipeline adapter against rewards, for any ``rl`` algorithm.

    Args:
        cfg: the validated run configuration.
        rewards: optional Python reward(s) replacing ``cfg.rewards`` (a Reward, a plain callable
            ``fn(media, prompts, metadata)``, or a list / dict of them).
        judges: optional Python judge(s) replacing ``cfg.eval.judges``.
    """

    outputs = "before_after.png, reward_curve.png, metrics.jsonl, final/, best/"

    def __init__(self, cfg: RLConfig, *, rewards: Any = None, judges: Any = None):
        super().__init__(cfg, rewards=rewards, judges=judges)
        self._reward_override = rewards
        self._judge_override = judges
        self.algorithm: FlowAlgorithm = get_algorithm(cfg.algorithm.name, recipes=(cfg.recipe,))(cfg)

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def build(self) -> None:
        """Load the model (LoRA or full fine-tuning), the optimizer, the rewards, judges and prompts."""
        cfg = self.cfg
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
        self.algorithm.prepare_module(self.module, self.adapter)  # FIND: freeze the generator, attach the noise policy
        self.shard_trainable(self.module, reference=self.adapter.reference_copy)  # the KL reference, sharded alike
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg.train.optimizer, self.params)
        if self.fsdp is not None:  # sharded in place: accelerate wraps neither the model nor its optimizer
            wrapped, self.optimizer = self.module, optimizer
        else:
            wrapped, self.optimizer = self.accelerator.prepare(self.module, optimizer)
        self.adapter.set_trainable_module(wrapped)
        self.wrapped = wrapped
        self.ema = EMA(self.module, decay=cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

        # plain Python functions score what this adapter decodes: [B,3,H,W] images or [B,F,3,H,W] video
        modality = self.adapter.modality
        reward_specs = self._reward_override if self._reward_override is not None else cfg.rewards
        self.reward_fn = build_rewards(_spec_list(reward_specs, modality))
        judge_specs = _spec_list(self._judge_override if self._judge_override is not None else cfg.eval.judges, modality)
        self.judges = build_rewards(judge_specs).rewards if judge_specs else {}
        self.embedder = embedding_source({**self.judges, **self.reward_fn.rewards})  # sample diversity's features
        self.train_records = read_prompt_records(cfg.data.train_prompts, "data.train_prompts")
        self.eval_records = read_prompt_records(cfg.eval.prompts, "eval.prompts")
        if getattr(self.adapter, "source_images", 0):  # editing: absolute "image" paths, for the adapter and the rewards
            self.train_records = resolve_record_images(self.train_records, source=cfg.data.train_prompts)
            self.eval_records = resolve_record_images(self.eval_records, source=cfg.eval.prompts)
        self.train_prompts = [r["prompt"] for r in self.train_records]
        self.eval_prompts = [r["prompt"] for r in self.eval_records]
        self.shard = Shard(self.rank, self.world, by=self._shard_by())

    def _shard_by(self) -> str:
        """The algorithm's placement of groups over ranks, or whole groups per rank when a reward
        scores a sample against its group (``needs_whole_groups``: pairwise judges, ranks)."""
        whole = [name for name, r in self.reward_fn.rewards.items() if getattr(r, "needs_whole_groups", False)]
        if self.algorithm.shard_by == "prompt" or not whole or self.world == 1:
            return self.algorithm.shard_by
        if self.cfg.data.prompts_per_iter % self.world:
            raise ConfigError(f"data.prompts_per_iter: the reward(s) {whole} score each sample against its whole group, "
                              f"so each rank holds whole groups: prompts_per_iter={self.cfg.data.prompts_per_iter} must be "
                              f"divisible by the number of processes ({self.world})")
        return "prompt"

    def _make_trainable(self, module: torch.nn.Module) -> torch.nn.Module:
        m = self.cfg.model
        if m.lora_rank > 0:
            from peft import LoraConfig

            module.requires_grad_(False)
            module.add_adapter(LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha or m.lora_rank,
                                          target_modules=self.adapter.lora_target_modules, init_lora_weights="gaussian"))
        else:
            module.requires_grad_(True)
            if self.cfg.algorithm.kl_beta > 0 or self.algorithm.needs_reference:
                self.adapter.keep_reference_copy()
        if m.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        return module.train()

    def judge_names(self) -> list[str]:
        return list(self.judges)

    def optimizer_steps_per_iteration(self) -> int:
        return self.cfg.train.steps_per_iter

    def checkpoint_module(self) -> torch.nn.Module:
        return self.module

    def checkpoint_extra(self) -> dict[str, Any]:
        return self.algorithm.state_dict()

    def restore_extra(self, extra: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(extra)
        media_file = os.path.join(self.cfg.output_dir, "eval_before_media.pt")
        if self.before is not None and os.path.exists(media_file):
            self.before["media"] = torch.load(media_file)

    def save_pretrained(self, path: str) -> None:
        with self.ema_weights():
            self.adapter.save_pretrained(path)

    def describe(self) -> str:
        cfg, s = self.cfg, self.cfg.sampling
        sampler = "ODE" if self.algorithm.deterministic_rollouts else f"{s.sampler} SDE, noise {s.noise_level}"
        return (f"[flowalign] {cfg.algorithm.name} ({self.algorithm.paper}) on {cfg.model._component_} ({cfg.model.pretrained}), "
                f"{self.accelerator.device}, num_processes={self.world}, threads={self.num_threads}, trainable parameters="
                f"{sum(p.numel() for p in self.params):,}; per iteration: {cfg.data.prompts_per_iter} prompts x "
                f"{s.group_size} samples, {s.num_steps} steps ({sampler})")

    # ------------------------------------------------------------------------------------------
    # one iteration
    # ------------------------------------------------------------------------------------------
    def train_iteration(self, iteration: int) -> dict[str, float]:
        """One rollout + reward + targets + update cycle; returns its metrics."""
        cfg, acc = self.cfg, self.accelerator
        t0 = time.perf_counter()
        mine = self.shard.prompt_slice(cfg.data.prompts_per_iter)
        idx = prompt_indices(len(self.train_prompts), cfg.data.prompts_per_iter, iteration, cfg.seed)[mine]
        prompts = [self.train_prompts[i] for i in idx]
        records = [self.train_records[i] for i in idx]
        spec = self.algorithm.rollout_spec(iteration, self.shard.group_split)
        self.module.eval()
        with acc.autocast():
            cond = self._encode(prompts, records, self.cfg.data.train_prompts)
            # Every rank draws the whole rollout's noises from the same streams and keeps its rows (Shard);
            # the streams keep rank 0's index, so a one-process run is what it was before.
            tree = rollout(self.adapter, cond, spec, prompts=prompts,
                           generator=stream_generator(cfg.seed, "rollout", iteration, 0),
                           init_generator=stream_generator(cfg.seed, "init_noise", iteration) if spec.shared_noise else None,
                           train_generator=stream_generator(cfg.seed, "train_steps", iteration, 0),
                           group_ids=torch.arange(cfg.data.prompts_per_iter)[mine],
                           initial_latents=self._policy_initial_latents(cond, spec, iteration),
                           keep_means=self.algorithm.keeps_means,
                           keep_velocities=self.algorithm.keeps_velocities, decode=True, shard=self.shard)
        t1 = time.perf_counter()

        scored, reward = self._score_leaves(tree, prompts, records)
        ctx = RolloutContext(self.adapter, cond, cfg.sampling.guidance_scale, acc.autocast,
                             lambda media, idx: self._score_nodes(media, idx, prompts, records))
        targets = self.algorithm.targets(tree, scored, ctx, iteration)
        assert_finite(targets.advantages, "advantages")
        t2 = time.perf_counter()

        self.module.train()
        noise_levels = torch.tensor(spec.noise_levels, dtype=torch.float32, device=tree.step.device)
        train_metrics = self._update(tree, cond, targets, noise_levels, iteration)
        t3 = time.perf_counter()

        trainable = targets.trainable.cpu()  # the scores live on the CPU, the tree's mask on the model's device
        trained = targets.advantages.cpu()[trainable]
        stats = torch.stack([scored.all_scores.mean(), scored.all_scores.std(), trained.abs().mean(),
                             trainable.sum().float()]).tolist()
        metrics = {
            "train/reward_mean": stats[0], "train/reward_std": stats[1], "train/advantage_abs_mean": stats[2],
            "rollout/nfe": float(tree.nfe + targets.nfe), "rollout/trained_edges": stats[3],
            **{f"train/{k}": acc.gather(v.to(acc.device)).mean().item() for k, v in reward.components.items()},
            **targets.metrics, **train_metrics,
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/train_s": t3 - t2, "time/iteration_s": t3 - t0,
        }
        return metrics

    def _policy_initial_latents(self, cond: Conditioning, spec: Any, iteration: int) -> torch.Tensor | None:
        """``[P*G, *latent]`` the rollout's initial latents through :meth:`FlowAlgorithm.initial_latents` (from
        the noises the rollout itself would draw, the ``("init_noise", iteration)`` stream), or ``None`` (the
        rollout draws them) unless the algorithm ``shapes_initial_noise``."""
        if not self.algorithm.shapes_initial_noise:
            return None
        P, G = len(cond), spec.samples_per_prompt
        if spec.splits or spec.shared_noise:
            raise ConfigError(f"algorithm.name: {self.cfg.algorithm.name} draws every sample's own initial noise; "
                              "it runs neither with tree splits nor with sampling.init_same_noise")
        drawn = self.adapter.init_latents(P * G * self.world, stream_generator(self.cfg.seed, "init_noise", iteration))
        noise = self.shard.local_rows(drawn, P)
        return self.algorithm.initial_latents(noise, cond[torch.arange(P).repeat_interleave(G)])

    def _score_leaves(self, tree: RolloutTree, prompts: list[str], records: list[dict]) -> tuple[ScoredRollout, Any]:
        """Score this rank's leaves and gather the scores of every rank's."""
        acc = self.accelerator
        leaf_idx = tree.leaf_prompt_idx.tolist()
        reward = self.reward_fn(tree.media, [prompts[i] for i in leaf_idx],
                                _metadata([records[i] for i in leaf_idx], tree.leaf_group.tolist()))
        scores = assert_finite(reward.scores.to(acc.device), "rewards")
        valid = reward.valid.to(acc.device) if reward.valid is not None else torch.ones_like(scores, dtype=torch.bool)
        all_scores, all_groups, all_valid = (t.cpu() for t in acc.gather((scores, tree.leaf_group.to(acc.device), valid)))
        scored = ScoredRollout(scores=scores.cpu(), valid=valid.cpu(), components={k: v.cpu() for k, v in reward.components.items()},
                               weights=dict(self.reward_fn.weights), all_scores=all_scores, all_groups=all_groups,
                               all_valid=all_valid, rank=self.rank, world=self.world,
                               gather=lambda t: acc.gather(t.to(acc.device)).cpu())
        return scored, reward

    def _score_nodes(self, media: torch.Tensor, prompt_idx: list[int], prompts: list[str], records: list[dict]) -> torch.Tensor:
        """Rewards ``[N]`` (CPU float32, checked finite) of media decoded from inner nodes (look-aheads)."""
        out = self.reward_fn(media, [prompts[i] for i in prompt_idx], _metadata([records[i] for i in prompt_idx], prompt_idx))
        return assert_finite(out.scores.float().cpu(), "look-ahead rewards")

    def _update(self, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets, noise_levels: torch.Tensor,
                iteration: int) -> dict[str, float]:
        """PPO-clip updates over the trained edges (shuffled), ``train.steps_per_iter`` optimizer steps.

        The first micro-batch runs before any weight change, so its ratio must be exactly 1
        (docs/ARCHITECTURE.md invariant 2): it is checked, with the first step's other values, in
        that step's single host sync, before the optimizer steps."""
        custom = self.algorithm.trajectory_update(self, tree, cond, targets, noise_levels, iteration)
        if custom is not None:  # a loss coupling edges (FlowAlgorithm.trajectory_update)
            return custom
        device = tree.step.device  # the estimators' targets may live on the CPU; the tree on the model's device
        targets = replace(targets, advantages=targets.advantages.to(device), trainable=targets.trainable.to(device),
                          weights=targets.weights.to(device) if targets.weights is not None else None)
        edges = targets.trainable.nonzero().squeeze(1)
        edges = edges[torch.randperm(len(edges), generator=stream_generator(self.cfg.seed, "shuffle", iteration, self.rank)).to(device)]
        return self._optimize(edges, lambda mb: self._edge_loss(tree, cond, targets, noise_levels, mb), iteration,
                              check_first=self._check_on_policy)

    def _optimize(self, items: torch.Tensor, micro_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                  iteration: int, check_first: Callable[[float], None] | None = None) -> dict[str, float]:
        """``train.steps_per_iter`` optimizer steps over ``items [N]`` (shuffled edge or leaf ids), split
        evenly; each step accumulates gradients over micro-batches of ``train.micro_batch_size``
        (``micro_loss(ids) -> (loss, metrics as 0-dim tensors)``), then :meth:`Recipe.optimizer_step`
        brings the summed metrics and the gradient norm to the host in one sync, refuses non-finite
        values, steps and updates the EMA. ``check_first`` sees the first micro-batch's
        ``ratio_max_dev`` before any weight changes. Returns the metrics averaged over micro-batches
        and the mean gradient norm."""
        cfg, acc = self.cfg, self.accelerator
        steps: list[dict[str, float]] = []
        n_micro = 0
        chunks = items.tensor_split(cfg.train.steps_per_iter)
        passes = self.passes_per_step([len(c.split(cfg.train.micro_batch_size)) for c in chunks])
        for k, chunk in enumerate(chunks):
            micro_batches = chunk.split(cfg.train.micro_batch_size)
            sums: dict[str, torch.Tensor] = {}
            for j in range(passes[k]):
                # a sharded model runs collectives in every pass: a rank with fewer micro-batches than
                # another runs extra passes over one of its edges with weight 0 (passes_per_step)
                mb = micro_batches[j] if j < len(micro_batches) else items[:1]
                weight = len(mb) / len(chunk) if j < len(micro_batches) else 0.0
                last = j == passes[k] - 1
                sync = nullcontext() if last else (sync_gradients(self.wrapped, False) if self.fsdp else acc.no_sync(self.wrapped))
                with sync:
                    loss, m = micro_loss(mb)
                    acc.backward(loss * weight)
                if j >= len(micro_batches):
                    continue
                if n_micro == 0 and check_first is not None:
                    sums[FIRST_STEP_DEV] = m["ratio_max_dev"]
                accumulate(sums, m)
                n_micro += 1
            # the first step carries the on-policy check, made before the weights change
            on_policy = (lambda values: check_first(values[FIRST_STEP_DEV])) if FIRST_STEP_DEV in sums else None  # noqa: E731
            steps.append(self.optimizer_step(sums, before_step=on_policy))
            if self.ema is not None:
                self.ema.update(self.module, step=iteration * cfg.train.steps_per_iter + k)
        return average_steps(steps, n_micro)

    def _edge_loss(self, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets, noise_levels: torch.Tensor,
                   mb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of a micro-batch of edges: new log-probs of the stored transitions vs the old ones."""
        cfg, acc = self.cfg, self.accelerator
        step = tree.step[mb]
        sigma, sigma_next = tree.sigmas[step], tree.sigmas[step + 1]
        x_t = tree.x_t[mb].to(self.adapter.dtype)
        c = cond[tree.prompt_idx[mb]]
        kwargs = dict(kind=cfg.sampling.sampler, noise_level=noise_levels[step], prev_sample=tree.x_next[mb],
                      cps_log_prob=cfg.sampling.cps_log_prob, check=False)  # the rollout checked this schedule
        with acc.autocast():
            v = self.adapter.predict(x_t, sigma, c, cfg.sampling.guidance_scale)
        new = sde_step(v.float(), sigma, sigma_next, tree.x_t[mb], **kwargs)
        kl = None
        if cfg.algorithm.kl_beta > 0:
            with torch.no_grad(), self.algorithm.reference_policy(self), acc.autocast():
                v_ref = self.adapter.predict(x_t, sigma, c, cfg.sampling.guidance_scale)
            ref = sde_step(v_ref.float(), sigma, sigma_next, tree.x_t[mb], **kwargs)
            # algorithm.kl_form: exact, or Flow-GRPO's train_sd3.py form (exact x dt; losses.ppo.kl_form_scale)
            scale = kl_form_scale(cfg.algorithm.kl_form, cfg.sampling.sampler, (sigma - sigma_next).to(new.std.device))
            kl = kl_on_means(new.mean, ref.mean, new.std, scale=scale, check=False)
        weights = targets.weights[mb] if targets.weights is not None else None
        mean_old = tree.mean_old[mb] if self.algorithm.keeps_means else None
        loss, metrics = self.algorithm.edge_loss(new.log_prob, tree.log_prob_old[mb], targets.advantages[mb], weights=weights,
                                                 kl=kl, mean=new.mean, mean_old=mean_old, std=new.std,
                                                 delta=(sigma - sigma_next).to(new.std.device))
        return loss * targets.loss_scale, metrics

    def _encode(self, prompts: list[str], records: list[dict[str, Any]] | None = None, source: str = "") -> Conditioning:
        """Encode prompts, with the negative prompt when classifier-free guidance is on, and for an editing
        adapter (``source_images != 0``) each record's source image(s) from the prompt file ``source``."""
        s = self.cfg.sampling
        negatives = [s.negative_prompt] * len(prompts) if s.guidance_scale != 1.0 else None
        if getattr(self.adapter, "source_images", 0):
            if records is None:
                raise ValueError(f"{type(self.adapter).__name__} edits source images: pass the prompts' records")
            return self.adapter.encode(prompts, negatives, images=load_source_images(records, source=source))
        return self.adapter.encode(prompts, negatives)

    def _check_on_policy(self, ratio_dev: float) -> None:
        """Invariant 2 of docs/ARCHITECTURE.md: before any update the recomputed log-probs equal the rollout's."""
        assert_on_policy(ratio_dev, self.ratio_tolerance(), "the rollout and the update compute "
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
        with self.ema_weights(), acc.autocast():
            cond = self._encode(local_prompts, records[shard], cfg.eval.prompts)
            if self.algorithm.shapes_initial_noise:  # FIND: the same fixed noise through the noise policy
                latents = self.algorithm.initial_latents(latents, cond)
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
        result["eval/diversity"] = group_diversity(acc.gather(features.float().contiguous().to(acc.device)).cpu(), torch.tensor(groups)).item()
        grid_media = acc.gather((media * 255).round().to(torch.uint8).contiguous())
        n_grid = min(e.grid_prompts, len(self.eval_prompts)) * e.samples_per_prompt
        result["media"] = grid_media[:n_grid].float().div(255).cpu()
        return result

    def _log_eval(self, step: int, result: dict[str, Any]) -> None:
        super()._log_eval(step, result)
        if self.is_main and step == 0:
            torch.save(result["media"], os.path.join(self.cfg.output_dir, "eval_before_media.pt"))

    # ------------------------------------------------------------------------------------------
    # outputs
    # ------------------------------------------------------------------------------------------
    def write_outputs(self, summary: dict[str, Any], final: dict[str, Any], records: list[dict]) -> None:
        """``lora/`` (diffusers format), the before | after grid (and video grid), the reward curve."""
        cfg, out, before = self.cfg, self.cfg.output_dir, self.before
        if self.adapter.has_lora() and hasattr(self.adapter, "save_lora_weights"):
            with self.ema_weights():  # diffusers LoRA format: DiffusionPipeline.load_lora_weights(<output_dir>/lora)
                write_folder_atomically(os.path.join(out, "lora"), self.adapter.save_lora_weights)
        if before is not None and "media" in before:
            spp, k = cfg.eval.samples_per_prompt, min(4, cfg.eval.samples_per_prompt)
            if before["media"].ndim == 5:  # video: the same before | after tiling, animated
                from flowalign.training.video import save_video_grid

                n = before["media"].shape[0] // spp
                summary["video_grid"] = save_video_grid(
                    os.path.join(out, "before_after"),
                    [torch.cat([before["media"][i * spp:][:k], final["media"][i * spp:][:k]]) for i in range(n)], fps=8)
            still = lambda media: media[:, media.shape[1] // 2] if media.ndim == 5 else media  # noqa: E731  video: middle frame
            first, last = still(before["media"]), still(final["media"])
            n = first.shape[0] // spp
            rows = [torch.cat([first[i * spp:][:k], last[i * spp:][:k]]) for i in range(n)]
            summary["grid"] = save_image_grid(os.path.join(out, "before_after.png"), rows,
                                              row_labels=self.eval_prompts[:n], col_labels=["before"] * k + ["after"] * k,
                                              title="held-out prompts: base model | aligned model (ODE, fixed noise)")
        series = {"train/reward_mean": "train reward", "eval/reward": "held-out reward"}
        series.update({k: k.removeprefix("eval/") for k in scalars(final) if k.startswith("eval/judge/") and k.endswith("accuracy")})
        series["eval/diversity"] = "held-out diversity"
        summary["curve"] = save_reward_curve(os.path.join(out, "reward_curve.png"), records, series=series,
                                             title=f"{cfg.model._component_}: {self.reward_fn.name}")


def _metadata(records: list[dict[str, Any]], groups: list[int]) -> list[dict[str, Any]]:
    """Per-sample reward metadata: each prompt record without its "prompt", plus ``"group"``: the
    sample's group (its prompt in the batch), which groupwise rewards (Pref-GRPO win rates) compare within."""
    return [{**{k: v for k, v in r.items() if k != "prompt"}, "group": int(g)} for r, g in zip(records, groups)]


def _spec_list(specs: Any, modality: str) -> list | dict:
    """Reward specs as a list or dict: a single reward becomes a one-element list, and plain
    functions (no ``modality`` attribute) are wrapped as rewards of the adapter's ``modality``."""
    from flowalign.rewards.callable import CallableReward

    def wrap(spec: Any) -> Any:
        return CallableReward(spec, modality=modality) if callable(spec) and not hasattr(spec, "modality") else spec

    if isinstance(specs, dict):
        return {k: wrap(v) for k, v in specs.items()} if "_component_" not in specs else [specs]
    return [wrap(spec) for spec in (specs if isinstance(specs, (list, tuple)) else [specs])]

