"""What every training recipe shares, in one place (torchtune's recipe / ``training`` split).

:class:`Recipe` owns the plumbing: torch threads, the accelerator, the run directory record,
checkpoint / resume (weights, optimizer, LR schedule, EMA, RNG, before / best evaluations, elapsed
training time), the loop (progress bar, evaluation schedule, checkpoint schedule, time budget,
Ctrl-C), one optimizer step with a single host sync, the best / final model folders and the
summary. A recipe subclass holds only its own loop body:

* :meth:`build` -- load the model, the optimizer (``self.optimizer``, ``self.params``) and the data;
* :meth:`train_iteration` -- rollout, reward, advantages, update; returns metrics with
  ``time/iteration_s`` (training time, evaluation excluded);
* :meth:`evaluate` -- held-out metrics (``eval/reward``; extra non-scalar entries such as
  ``"media"`` are kept out of the logs);
* :meth:`save_pretrained` / :meth:`checkpoint_module` -- what ``best/``, ``final/`` and checkpoints hold;
* :meth:`write_outputs` -- pictures and summary entries of its own.

Every random stream comes from :func:`flowalign.training.rng.stream_generator`, so a resumed run
replays exactly what an uninterrupted one would have done.
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

from flowalign.config import ConfigError, to_yaml
from flowalign.diversity import HackingMonitor
from flowalign.guards import resolve_ratio_tolerance
from flowalign.training.accel import configure_threads, end_accelerator
from flowalign.training.checkpoint import (resume_training_state, save_sharded_training_state, training_states,
                                           write_training_state)
from flowalign.training.fsdp import DTYPES as TORCH_DTYPES
from flowalign.training.fsdp import fsdp_settings, full_tensor, gathered_state, shard_module, state_dict_view
from flowalign.training.interrupt import StopSignal, stopped_run
from flowalign.training.lr_schedules import build_lr_scheduler
from flowalign.training.metrics import MetricsLogger, discard_stale_metrics, read_metrics, write_summary
from flowalign.training.plots import before_after_table
from flowalign.training.rundir import record_run, write_folder_atomically

__all__ = ["Recipe", "accumulate", "average_steps", "scalars"]

#: a step value that is the iteration's first micro-batch's, not a sum over micro-batches
FIRST_STEP_DEV = "ratio_first_step_dev"


def accumulate(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    """Add a micro-batch's 0-dim tensor ``metrics`` into ``sums`` (on the device: no host sync)."""
    for name, value in metrics.items():
        sums[name] = sums[name] + value if name in sums else value


def average_steps(steps: list[dict[str, float]], num_micro_batches: int) -> dict[str, float]:
    """The ``train/*`` metrics of an update from what :meth:`Recipe.optimizer_step` returned per
    step: each summed metric averaged over the ``num_micro_batches`` micro-batches, the gradient
    norm averaged over the steps, and ``ratio_first_step_dev`` (the on-policy check) as measured."""
    out: dict[str, float] = {}
    for values in steps:
        for name, value in values.items():
            if name not in ("grad_norm", FIRST_STEP_DEV):
                out[f"train/{name}"] = out.get(f"train/{name}", 0.0) + value / num_micro_batches
    if steps:
        out["train/grad_norm"] = sum(v["grad_norm"] for v in steps) / len(steps)
    first = [v[FIRST_STEP_DEV] for v in steps if FIRST_STEP_DEV in v]
    if first:
        out[f"train/{FIRST_STEP_DEV}"] = first[0]
    return out


def scalars(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """An evaluation result without its non-scalar entries (``"media"``)."""
    return None if result is None else {k: v for k, v in result.items() if k != "media"}


class Recipe:
    """The shared plumbing of a training loop; subclasses implement the hooks named in the module docstring.

    Attributes set by :meth:`setup`: ``accelerator``, ``rank``, ``world``, ``is_main``,
    ``num_threads``, ``optimizer``, ``params``, ``lr_scheduler``, ``ema`` (``None`` unless the
    recipe keeps one), ``monitor``, ``logger``, ``start_iteration``, ``before``, ``best``,
    ``train_seconds``, ``last_step``.
    """

    #: progress-bar label
    label = "flowalign train"
    #: held-out metric that picks ``best/``
    best_metric = "eval/reward"
    #: the files the summary lists for the reader
    outputs = "metrics.jsonl, summary.json, final/, best/"

    def __init__(self, cfg: Any, *, rewards: Any = None, judges: Any = None):
        self.cfg = cfg
        #: Python objects standing in for config entries, recorded with the run's settings (run.json)
        self.replacements = {"rewards": rewards, "eval.judges": judges}
        self.ema = None
        #: FSDP settings (flowalign.training.fsdp.FSDPSettings) when the trained module is sharded, else None
        self.fsdp = None

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------
    def build(self) -> None:
        """Load the model, set ``self.optimizer`` and ``self.params``, the rewards and the data."""
        raise NotImplementedError

    def train_iteration(self, iteration: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, Any]:
        raise NotImplementedError

    def checkpoint_module(self) -> torch.nn.Module:
        """The module whose trainable weights a checkpoint holds."""
        raise NotImplementedError

    def save_pretrained(self, path: str) -> None:
        """Write the current model (the EMA weights, when kept) to ``path`` (``best/``, ``final/``)."""
        raise NotImplementedError

    def optimizer_steps_per_iteration(self) -> int:
        raise NotImplementedError

    def judge_names(self) -> list[str]:
        return []

    def describe(self) -> str:
        """The line printed when training starts."""
        return ""

    def checkpoint_extra(self) -> dict[str, Any]:
        """Recipe state (JSON) saved with every checkpoint."""
        return {}

    def restore_extra(self, extra: dict[str, Any]) -> None:
        """Read back :meth:`checkpoint_extra` from a resumed checkpoint."""

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['train/reward_mean']:.3f}"}

    def write_outputs(self, summary: dict[str, Any], final: dict[str, Any], records: list[dict]) -> None:
        """Main rank, end of training: pictures and the summary's own entries (``summary["table"]`` is set after)."""

    # ------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------
    def setup(self, *, for_training: bool = True) -> None:
        """Threads, accelerator, :meth:`build`, LR schedule; with ``for_training`` also the run
        directory record, the resume and the logs (``False``, for evaluation only, neither reads
        nor writes ``output_dir``)."""
        cfg = self.cfg
        self.num_threads = configure_threads(cfg.num_threads)
        # Without an accelerator, accelerate only sets up multi-process (gloo) training when told to
        # use the CPU; Accelerator() would leave every torchrun process training alone.
        no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
        self.accelerator = Accelerator(cpu=cfg.device == "cpu" or no_accelerator,
                                       mixed_precision=getattr(cfg.train, "mixed_precision", "no"))
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        torch.manual_seed(cfg.seed)  # LoRA initialisation
        self.build()
        s = cfg.train.lr_scheduler
        self.lr_scheduler = build_lr_scheduler(self.optimizer, s._component_, total_steps=self.total_optimizer_steps(),
                                               warmup_steps=s.warmup_steps, min_lr_ratio=s.min_lr_ratio, kwargs=s.kwargs)
        self.monitor = HackingMonitor("eval/reward", [f"eval/judge/{name}" for name in self.judge_names()])
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
            print(self.describe())
        self.logger = MetricsLogger(cfg.output_dir, tensorboard=cfg.logging.tensorboard,
                                    wandb_project=cfg.logging.wandb_project,
                                    resume_step=self.start_iteration or None, enabled=self.is_main)

    # ------------------------------------------------------------------------------------------
    # sharding (FSDP2, flowalign.training.fsdp)
    # ------------------------------------------------------------------------------------------
    def shard_trainable(self, module: torch.nn.Module, reference: torch.nn.Module | None = None) -> None:
        """Shard ``module`` in place over every process when ``train.fsdp`` (or an accelerate FSDP
        launch) asks for it, and a frozen ``reference`` copy alike (resharded after each forward: it
        has no backward); sets :attr:`fsdp`. Call before building the optimizer."""
        try:
            self.fsdp = fsdp_settings(self.cfg.train.fsdp, self.accelerator)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self.fsdp is not None and getattr(self.cfg.train, "mixed_precision", "no") == "fp16":
            raise ConfigError("train.mixed_precision: fp16 scales the loss with a gradient scaler that a sharded model's "
                              "gradients bypass; with train.fsdp use bf16 (or train.fsdp.param_dtype)")
        if self.fsdp is None:
            return
        options = dict(device_type=self.accelerator.device.type, cpu_offload=self.fsdp.cpu_offload, param_dtype=self.fsdp.param_dtype)
        shard_module(module, reshard_after_forward=self.fsdp.reshard_after_forward, **options)
        if reference is not None:
            shard_module(reference, reshard_after_forward=True, **options)

    def passes_per_step(self, counts: list[int]) -> list[int]:
        """Forward / backward passes of each optimizer step: this rank's micro-batch ``counts``, or
        with a sharded model the most any rank has (every pass all-gathers weights, so every rank
        must run as many; one all-reduce)."""
        if self.fsdp is None or self.world == 1:
            return counts
        most = torch.tensor(counts, device=self.accelerator.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return most.tolist()

    def full_weights(self) -> Any:
        """A context in which the main rank can write the model with its library's own writer
        (``save_pretrained``): with a sharded model, every rank gathers the (EMA) weights and the
        main rank's module reports them whole from ``state_dict()``. Every rank must enter it."""
        if self.fsdp is None:
            return nullcontext()
        module = self.checkpoint_module()
        with self.ema_weights():
            state = gathered_state(module.state_dict(), keep=self.is_main)
        return state_dict_view(module, state) if self.is_main else nullcontext()

    def ema_weights(self) -> Any:
        """A context with the EMA weights swapped into the trained module (when an EMA is kept)."""
        return self.ema.swapped_into(self.checkpoint_module()) if self.ema is not None else nullcontext()

    def compute_dtype(self) -> torch.dtype:
        """The precision the model computes in: ``train.mixed_precision``'s autocast dtype, else
        FSDP2's ``train.fsdp.param_dtype`` (when sharded), else ``model.dtype``."""
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(getattr(self.cfg.train, "mixed_precision", "no"))
        if autocast is not None:
            return autocast
        if self.fsdp is not None and self.fsdp.param_dtype is not None:
            return self.fsdp.param_dtype
        return TORCH_DTYPES[self.cfg.model.dtype]

    def ratio_tolerance(self) -> float:
        """The on-policy check's bound on max |ratio - 1|: ``algorithm.ratio_tolerance``, or when it is
        null the default for where the model computes (:func:`flowalign.guards.resolve_ratio_tolerance`
        of the accelerator's device type -- before :meth:`setup`, the CPU with ``device: cpu`` or no GPU,
        else CUDA -- and :meth:`compute_dtype`)."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            device = accelerator.device.type
        else:
            device = "cpu" if self.cfg.device == "cpu" or not torch.cuda.is_available() else "cuda"
        return resolve_ratio_tolerance(self.cfg.algorithm.ratio_tolerance, device, self.compute_dtype())

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (the LR schedule's length)."""
        return self.cfg.train.iterations * self.optimizer_steps_per_iteration()

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Evaluate, then train ``train.iterations`` iterations (or until ``train.time_budget_s``),
        evaluating every ``eval.every`` and checkpointing every ``train.checkpoint_every``; a
        stop request (Ctrl-C, SIGTERM) checkpoints and raises. Returns the summary."""
        cfg = self.cfg
        if self.before is None:
            self.before = self._evaluate(0)
            self._log_eval(0, self.before)
        step = self.start_iteration
        iterations = range(self.start_iteration, cfg.train.iterations) if not self._out_of_time() else range(0)
        bar = tqdm(iterations, desc=self.label, initial=self.start_iteration, total=cfg.train.iterations,
                   disable=not (self.is_main and cfg.logging.progress))
        with StopSignal() as stop:
            for iteration in bar:
                step = iteration + 1
                metrics = self.train_iteration(iteration)
                self.train_seconds += metrics["time/iteration_s"]
                metrics["time/train_elapsed_s"] = self.train_seconds
                metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
                self.logger.log(step, metrics)  # before the checkpoint: a resumed run keeps every logged step
                if step == cfg.train.iterations or self._out_of_time():
                    break
                if cfg.eval.every and step % cfg.eval.every == 0:
                    self._log_eval(step, self._evaluate(step))
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    self.save_checkpoint(step)
                bar.set_postfix(self.progress_postfix(metrics))
                if stop.requested(self.accelerator):
                    bar.close()
                    self.save_checkpoint(step)
                    raise stopped_run(step, cfg.train.iterations, cfg.output_dir, stop.exit_code)
        bar.close()
        self.last_step = step
        final = self._evaluate(step)
        if self.start_iteration < step:  # else: a finished run re-opened, already logged
            self._log_eval(step, final)
            self.save_checkpoint(step)
        return self._finish(final)

    def _out_of_time(self) -> bool:
        budget = self.cfg.train.time_budget_s
        return bool(budget) and self.train_seconds >= budget

    def optimizer_step(self, values: dict[str, torch.Tensor] | None = None,
                       before_step: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
        """Clip the accumulated gradients (``train.grad_clip``), refuse a non-finite gradient norm
        or loss, step the optimizer and the LR schedule, zero the gradients.

        ``values`` holds the step's 0-dim tensors (the micro-batches' summed metrics, the first
        micro-batch's ratio deviation...): they come to the host together with the gradient norm
        in ONE transfer, the step's only host sync, before the weights change;
        ``before_step(floats)`` may refuse them (raise) before the optimizer steps.

        Returns:
            ``{"grad_norm": float, **values as floats}``.

        Raises:
            FloatingPointError: the gradient norm or a value whose name ends in ``loss`` is NaN/Inf;
                the weights are left unchanged.
        """
        values = values or {}
        clip = self.cfg.train.grad_clip
        max_norm = clip if clip > 0 else math.inf
        if self.fsdp is not None:  # DTensor gradients: torch's clipping reduces the norm over the shards
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        else:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32)
        device = self.accelerator.device
        stacked = torch.stack([grad_norm.to(device).reshape(()), *(t.detach().float().to(device).reshape(()) for t in values.values())])
        floats = dict(zip(["grad_norm", *values], stacked.tolist()))
        for name, value in floats.items():
            if (name == "grad_norm" or name.endswith("loss")) and not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(f"{name.replace('_', ' ')} contains NaN/Inf ({value}); the optimizer step was refused "
                                         "(lower train.optimizer.lr, or check the rewards and the model's dtype)")
        if before_step is not None:
            before_step(floats)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return floats

    # ------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------
    def _evaluate(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = self.evaluate(step)
        result["time/eval_s"] = time.perf_counter() - t0
        return result

    def _log_eval(self, step: int, result: dict[str, Any]) -> None:
        """Log an evaluation (with the judges' gaps, ``eval/gap/<judge>``) and keep ``best/``."""
        result.update(self.monitor.update(step, result)[0])
        values = scalars(result)
        self.logger.log(step, values)
        if step and (self.best is None or values[self.best_metric] > self.best[self.best_metric]):
            self.best = {"step": step, **values}
            with self.full_weights():
                if self.is_main:
                    write_folder_atomically(os.path.join(self.cfg.output_dir, "best"), self.save_pretrained)

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def checkpoint_ema(self) -> Any:
        """What the checkpoint's EMA file holds (an object with ``state_dict`` / ``load_state_dict``,
        or ``None``): ``train.ema_decay``'s EMA; AWM adds its EMA-KL copy."""
        return self.ema

    def save_checkpoint(self, step: int) -> None:
        """Atomic checkpoint: trainable weights, optimizer, EMA, RNG, LR schedule, step, elapsed
        training time, before / best evaluations and the recipe's :meth:`checkpoint_extra`. A sharded
        model with ``train.fsdp.state_dict: sharded`` is written by every rank, its own shards."""
        self.accelerator.wait_for_everyone()
        keep_last = self.cfg.train.keep_checkpoints
        if self.fsdp is not None and self.fsdp.state_dict == "sharded":
            save_sharded_training_state(self.cfg.output_dir, step, self.checkpoint_module(), self.optimizer,
                                        ema=self.checkpoint_ema(), extra=self._run_state(step) if self.is_main else None,
                                        keep_last=keep_last)
        else:
            states = training_states(self.checkpoint_module(), self.optimizer, self.checkpoint_ema(), keep=self.is_main)
            if self.is_main:
                write_training_state(self.cfg.output_dir, step, states, extra=self._run_state(step), keep_last=keep_last)
        self.accelerator.wait_for_everyone()

    def _run_state(self, step: int) -> dict[str, Any]:
        """A checkpoint's ``extra`` (JSON): step, before / best evaluations, training time, LR schedule, the recipe's own."""
        return {"step": step, "before": scalars(self.before), "best": self.best, "train_seconds": self.train_seconds,
                "lr_scheduler": self.lr_scheduler.state_dict(), **self.checkpoint_extra()}

    def _maybe_resume(self) -> None:
        ckpt = resume_training_state(self.cfg.train.resume, self.cfg.output_dir, self.checkpoint_module(),
                                     self.optimizer, self.checkpoint_ema())
        if ckpt is None:
            return
        extra = ckpt.extra
        self.start_iteration = int(extra["step"])
        self.before, self.best = extra.get("before"), extra.get("best")
        self.train_seconds = float(extra.get("train_seconds", 0.0))
        if "lr_scheduler" in extra:
            self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        self.restore_extra(extra)
        self.monitor.replay(self.cfg.output_dir, until=self.start_iteration)
        if self.is_main:
            print(f"[flowalign] resumed from {ckpt.path} at iteration {self.start_iteration}")

    # ------------------------------------------------------------------------------------------
    # outputs
    # ------------------------------------------------------------------------------------------
    def _finish(self, final: dict[str, Any]) -> dict[str, Any]:
        """``final/``, the recipe's pictures, ``summary.json`` and the before / after table."""
        out = self.cfg.output_dir
        summary: dict[str, Any] = {"output_dir": out, "algorithm": self.cfg.algorithm.name, "iterations": self.last_step,
                                   "before": scalars(self.before), "after": scalars(final), "best": self.best}
        with self.full_weights():  # every rank: a sharded model is gathered for final/ and write_outputs' exports
            if not self.is_main:
                return summary
            write_folder_atomically(os.path.join(out, "final"), self.save_pretrained)
            records = read_metrics(os.path.join(out, "metrics.jsonl"))
            iter_times = [r["time/iteration_s"] for r in records if "time/iteration_s" in r]
            summary["seconds_per_iteration"] = float(np.mean(iter_times)) if iter_times else float("nan")
            summary["train_seconds"] = self.train_seconds
            self.write_outputs(summary, final, records)
        summary["table"] = before_after_table(scalars(self.before), scalars(final), self.best, summary["seconds_per_iteration"])
        write_summary(out, summary, self.outputs)
        return summary

    def cleanup(self) -> None:
        self.logger.close()
        end_accelerator(self.accelerator)

