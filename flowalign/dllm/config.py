"""Typed configuration of a masked-diffusion LM RL run (``recipe: dllm``), in the style of
:class:`flowalign.config.RLConfig`: nested dataclasses, a help text per field, loaded from YAML by
:func:`flowalign.config.load_config` (which dispatches on ``recipe: dllm``) and checked by
:meth:`DLLMConfig.validate`.

Algorithms are *presets* (``flowalign.dllm.algorithms.PRESETS``): fields left ``null`` here
(``algorithm.estimator``, ``algorithm.inner_steps``, ``sampling.steps``, ``sampling.order``,
``sampling.step_schedule``, ``sampling.eos_early_rejection``) take the value of the preset named by
``algorithm.name``; a value set in the YAML or on the command line always wins. :meth:`DLLMConfig.resolved`
returns the config with the preset applied, which is what the recipe runs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowalign.config import (
    ConfigError,
    LoggingConfig,
    OptimizerConfig,
    _f,
    _looks_like_hub_id,
    _require,
    _require_file,
)

if TYPE_CHECKING:
    from flowalign.dllm.sampling import SamplingSpec

__all__ = [
    "DLLMAlgorithmConfig",
    "DLLMConfig",
    "DLLMEvalConfig",
    "DLLMModelConfig",
    "DLLMSamplingConfig",
    "DLLMTaskConfig",
    "DLLMTrainConfig",
]

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DLLMModelConfig:
    pretrained: str = _f("assets/dllm_quickstart/model", "Local folder or hub id of the masked diffusion LM (LLaDA, Dream, any HF masked LM with a mask token).")
    trust_remote_code: bool = _f(False, "Allow the checkpoint's own modeling code (needed by LLaDA and Dream).")
    shift_logits: bool | None = _f(None, "Dream-style shifted logits (position i predicts i+1); null = detect from the model type.")
    dtype: str = _f("float32", "Weights dtype: float32 | bfloat16 | float16.")
    lora_rank: int = _f(0, "LoRA rank (peft); 0 trains all weights (full fine-tuning; the KL reference is then a frozen copy).")
    lora_alpha: float = _f(0.0, "LoRA alpha; 0 means alpha = rank.")
    lora_target_modules: list[str] | None = _f(None, "Module names LoRA adapts; null = the model's attention/MLP Linear layers.")


@dataclass
class DLLMTaskConfig:
    name: str = _f("addition", "Verifiable task (flowalign.dllm.tasks.TASKS): addition | gsm8k | countdown | sudoku | code.")
    train: str = _f("assets/dllm_quickstart/train.jsonl", "JSONL of training examples (prompt, answer, reference?).")
    eval: str = _f("assets/dllm_quickstart/eval.jsonl", "JSONL of held-out examples (never trained on).")
    kwargs: dict[str, Any] = _f(factory=dict, help="Keyword arguments of the task's constructor (e.g. a time limit for code).")


@dataclass
class DLLMSamplingConfig:
    gen_length: int = _f(5, "Completion window length in tokens (answer, then EOS fill).")
    steps: int | None = _f(None, "Denoising steps per rollout; null = the algorithm preset's (gen_length, fewer for cj_grpo).")
    block_length: int | None = _f(None, "Semi-autoregressive block length (must divide gen_length); null = one block.")
    temperature: float = _f(1.0, "Rollout sampling temperature (> 0: RL needs exploration).")
    remasking: str = _f("low_confidence", "Which masked positions are committed each step: low_confidence | random.")
    order: str | None = _f(None, "diffusion | ar (left to right, JustGRPO); null = the algorithm preset's.")
    step_schedule: str | None = _f(None, "Tokens per step: uniform | ascending (CJ-GRPO's ASS); null = the preset's.")
    eos_early_rejection: float | None = _f(None, "EOS early rejection strength (CJ-GRPO's EOSER; 0 = off); null = the preset's.")
    group_size: int = _f(8, "Rollouts per prompt (G).")
    prompts_per_iter: int = _f(8, "Distinct prompts per iteration, global across ranks (whole groups live on one rank).")


@dataclass
class DLLMAlgorithmConfig:
    name: str = _f("diffu_grpo", "Algorithm preset: diffu_grpo | coupled_grpo | gdpo | mdpo | cj_grpo | igpo | just_grpo.")
    estimator: str | None = _f(None, "Log-likelihood estimator: one_step | coupled | elbo_double_mc | elbo_semi_deterministic | trajectory; null = the preset's.")
    p_mask_prompt: float = _f(0.15, "one_step: probability of masking each prompt token (diffu-GRPO's p_mask).")
    num_mc: int = _f(2, "ELBO estimators: number of time points t (random for double MC, quadrature nodes for semi-deterministic).")
    masks_per_t: int = _f(1, "ELBO estimators: random masks drawn per time point.")
    inner_steps: int | None = _f(None, "Optimizer steps per batch of rollouts (mu), each with fresh estimator masks; null = the preset's.")
    clip_range: float = _f(0.2, "PPO ratio clip epsilon.")
    kl_beta: float = _f(0.0, "Weight of the k3 KL estimate against the reference policy (LoRA off, or a frozen copy).")
    std_mode: str = _f("group", "Advantage normalisation: group | global | none.")
    adv_clip: float = _f(0.0, "Clip advantages to [-adv_clip, adv_clip]; 0 disables.")
    ratio_tolerance: float = _f(1e-5, "Max |ratio - 1| allowed at the first inner step (on-policy check).")
    skip_zero_signal: bool = _f(True, "Leave groups whose rewards are all equal out of the update (no gradient without kl_beta).")
    hint_fraction: list[float] = _f(factory=lambda: [0.2, 0.6], help="IGPO: [min, max] fraction of the reference completion inpainted as a hint prefix.")
    hinted_rollouts: float = _f(0.5, "IGPO: fraction of an all-wrong group's rollouts regenerated with hints.")
    correct_threshold: float = _f(1.0, "A rollout counts as correct when its reward >= this (accuracy, IGPO's all-wrong test).")


@dataclass
class DLLMTrainConfig:
    iterations: int = _f(60, "Sampling + update iterations.")
    optimizer: OptimizerConfig = _f(factory=OptimizerConfig, help="Optimizer settings.")
    micro_batch_size: int = _f(64, "Sequences per forward/backward pass (gradient accumulation inside an inner step).")
    grad_clip: float = _f(1.0, "Max gradient norm; 0 disables clipping.")
    time_budget_s: float = _f(0.0, "Stop after the iteration at which the training time (evaluation excluded) reaches this many seconds; 0 = no budget.")
    checkpoint_every: int = _f(0, "Save an atomic checkpoint every N iterations (and at the end); 0 = only at the end.")
    keep_checkpoints: int = _f(2, "Number of recent checkpoints kept on disk.")
    resume: str = _f("auto", "auto (resume from output_dir if a checkpoint exists) | never | a checkpoint path.")


@dataclass
class DLLMEvalConfig:
    every: int = _f(10, "Evaluate every N iterations (plus before training and at the end); 0 = only those two.")
    max_examples: int = _f(0, "Evaluate on the first N held-out examples; 0 = all.")
    batch_size: int = _f(256, "Held-out examples decoded per batch.")
    temperature: float = _f(0.0, "Held-out decoding temperature (0 = greedy).")


@dataclass
class DLLMConfig:
    """A reinforcement-learning run of a masked diffusion LM against a verifiable task."""

    recipe: str = _f("dllm", "Training recipe; 'dllm' selects this schema (flowalign.recipes.dllm_rl).")
    seed: int = _f(0, "Seed of every random stream (rollouts, estimator masks, prompt order, hints).")
    output_dir: str = _f("runs/dllm_quickstart", "Run directory: checkpoints, metrics.jsonl, summary.json, best/, final/.")
    device: str = _f("auto", "auto (accelerate's choice) | cpu.")
    num_threads: int = _f(0, "CPU threads of torch in this process (torch.set_num_threads); 0 = torch's default. "
                             "Tiny models run many times faster with 1 (thread hand-offs cost more than the math).")
    model: DLLMModelConfig = _f(factory=DLLMModelConfig, help="The masked diffusion LM.")
    task: DLLMTaskConfig = _f(factory=DLLMTaskConfig, help="Task and data.")
    sampling: DLLMSamplingConfig = _f(factory=DLLMSamplingConfig, help="Rollouts.")
    algorithm: DLLMAlgorithmConfig = _f(factory=DLLMAlgorithmConfig, help="Algorithm preset, estimator, advantages and loss.")
    train: DLLMTrainConfig = _f(factory=DLLMTrainConfig, help="Optimisation.")
    eval: DLLMEvalConfig = _f(factory=DLLMEvalConfig, help="Held-out evaluation.")
    logging: LoggingConfig = _f(factory=LoggingConfig, help="Logging.")

    # ------------------------------------------------------------------------------------------
    def resolved(self) -> "DLLMConfig":
        """A copy with the algorithm preset's values filled into every ``null`` field.

        Raises:
            ConfigError: ``algorithm.name`` is not a known preset.
        """
        from flowalign.dllm.algorithms import get_preset

        cfg = copy.deepcopy(self)
        try:
            preset = get_preset(cfg.algorithm.name)
        except ValueError as err:
            raise ConfigError(f"algorithm.name: {err}") from None
        preset.apply(cfg)
        return cfg

    def sampling_spec(self) -> SamplingSpec:
        """The rollouts' :class:`~flowalign.dllm.sampling.SamplingSpec` (preset applied).

        Raises:
            SamplingSpecError: the sampling fields do not make a valid decode (``err.field`` names it).
        """
        from flowalign.dllm.sampling import SamplingSpec

        s = self.resolved().sampling
        return SamplingSpec(gen_length=s.gen_length, steps=s.steps, block_length=s.block_length,
                            temperature=s.temperature, remasking=s.remasking, order=s.order,
                            step_schedule=s.step_schedule, eos_early_rejection=s.eos_early_rejection)

    def validate(self, *, check_files: bool = True, world_size: int = 1) -> None:
        """Semantic checks types cannot express, on the preset-resolved config.

        Raises:
            ConfigError: the message starts with the offending key.
        """
        from flowalign.dllm.algorithms import ESTIMATOR_UNITS
        from flowalign.dllm.sampling import SamplingSpecError

        _require(self.recipe == "dllm", "recipe", f"DLLMConfig runs the 'dllm' recipe, got {self.recipe!r}")
        cfg = self.resolved()
        m, s, a, t, e = cfg.model, cfg.sampling, cfg.algorithm, cfg.train, cfg.eval
        _require(cfg.num_threads >= 0, "num_threads", "must be >= 0 (0 = torch's default)")
        _require(cfg.device in ("auto", "cpu"), "device", f"must be 'auto' or 'cpu', got {cfg.device!r}")
        _require(m.dtype in DTYPES, "model.dtype", f"unsupported dtype {m.dtype!r}; use one of {list(DTYPES)}")
        _require(m.lora_rank >= 0, "model.lora_rank", "must be >= 0")
        _require(m.lora_alpha >= 0, "model.lora_alpha", "must be >= 0")
        _require(m.lora_target_modules is None or m.lora_rank > 0, "model.lora_target_modules", "only used with model.lora_rank > 0")

        from flowalign.dllm.tasks import TASKS, get_task

        _require(cfg.task.name in TASKS, "task.name", f"unknown task {cfg.task.name!r}; available: {sorted(TASKS)}")
        try:
            get_task(cfg.task.name, **cfg.task.kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"task.kwargs: {err}") from None

        try:  # the decoder's own checks (flowalign.dllm.sampling.SamplingSpec), reported by key
            cfg.sampling_spec()
        except SamplingSpecError as err:
            raise ConfigError(f"sampling.{err.field}: {err}") from None
        _require(s.temperature > 0, "sampling.temperature", "must be > 0: rollouts must explore (greedy rollouts give identical groups)")
        _require(s.group_size >= 2, "sampling.group_size", "must be >= 2 (group-relative advantages need several rollouts)")
        _require(s.prompts_per_iter >= 1, "sampling.prompts_per_iter", "must be >= 1")
        _require(s.prompts_per_iter % world_size == 0, "sampling.prompts_per_iter",
                 f"prompts_per_iter={s.prompts_per_iter} must be divisible by the number of processes ({world_size}): "
                 "each rank samples whole groups of prompts_per_iter / world_size prompts")

        _require(a.estimator in ESTIMATOR_UNITS, "algorithm.estimator",
                 f"unknown estimator {a.estimator!r}; available: {sorted(ESTIMATOR_UNITS)}")
        if a.name in ("mdpo", "cj_grpo", "just_grpo"):
            _require(a.estimator == "trajectory", "algorithm.estimator",
                     f"{a.name} trains exact trajectory log-probs: estimator must be 'trajectory', got {a.estimator!r}")
        if a.name == "igpo":
            _require(a.estimator != "trajectory", "algorithm.estimator",
                     "igpo's hinted rollouts are decoded with a shorter window; use a mask-based estimator (one_step, coupled, elbo_*)")
        if a.name == "just_grpo":
            _require(s.order == "ar", "sampling.order", f"just_grpo generates left to right: order must be 'ar', got {s.order!r}")
        _require(0 <= a.p_mask_prompt < 1, "algorithm.p_mask_prompt", f"must be in [0, 1), got {a.p_mask_prompt}")
        _require(a.num_mc >= 1, "algorithm.num_mc", "must be >= 1")
        _require(a.masks_per_t >= 1, "algorithm.masks_per_t", "must be >= 1")
        _require(a.inner_steps is not None and a.inner_steps >= 1, "algorithm.inner_steps", f"must be >= 1, got {a.inner_steps}")
        _require(a.clip_range > 0, "algorithm.clip_range", "must be > 0")
        _require(a.kl_beta >= 0, "algorithm.kl_beta", "must be >= 0")
        _require(a.std_mode in ("group", "global", "none"), "algorithm.std_mode", f"unknown std_mode {a.std_mode!r}; use group | global | none")
        _require(a.adv_clip >= 0, "algorithm.adv_clip", "must be >= 0 (0 disables)")
        _require(a.ratio_tolerance > 0, "algorithm.ratio_tolerance", "must be > 0")
        _require(len(a.hint_fraction) == 2 and 0 < a.hint_fraction[0] <= a.hint_fraction[1] < 1, "algorithm.hint_fraction",
                 f"must be [min, max] with 0 < min <= max < 1, got {a.hint_fraction}")
        _require(0 < a.hinted_rollouts <= 1, "algorithm.hinted_rollouts", f"must be in (0, 1], got {a.hinted_rollouts}")
        _require(0 < a.correct_threshold <= 1, "algorithm.correct_threshold", "must be in (0, 1] (task rewards lie in [0, 1])")

        _require(t.iterations >= 1, "train.iterations", "must be >= 1")
        _require(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables)")
        _require(t.optimizer.lr > 0, "train.optimizer.lr", "must be > 0")
        _require(t.time_budget_s >= 0, "train.time_budget_s", "must be >= 0 (0 = no budget)")
        _require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _require(e.every >= 0, "eval.every", "must be >= 0")
        _require(e.max_examples >= 0, "eval.max_examples", "must be >= 0 (0 = all)")
        _require(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _require(e.temperature >= 0, "eval.temperature", "must be >= 0")

        if check_files:
            if not _looks_like_hub_id(m.pretrained):
                _require_file(m.pretrained, "model.pretrained")
            _require_file(cfg.task.train, "task.train")
            _require_file(cfg.task.eval, "task.eval")

    # ------------------------------------------------------------------------------------------
    def global_batch(self) -> dict[str, int]:
        """The batch arithmetic of one iteration (global, any number of processes)."""
        cfg = self.resolved()
        s, a = cfg.sampling, cfg.algorithm
        rollouts = s.prompts_per_iter * s.group_size
        return {"rollouts": rollouts, "optimizer_steps": a.inner_steps,
                "micro_batches_per_step": math.ceil(rollouts / cfg.train.micro_batch_size)}
