"""Typed configuration of a masked-diffusion LM RL run (``recipe: dllm``), in the style of
:class:`flowalign.config.RLConfig`: nested dataclasses, a help text per field, loaded from YAML by
:func:`flowalign.config.load_config` (which dispatches on ``recipe: dllm``) and checked by
:meth:`DLLMConfig.validate`.

Algorithms are units of :mod:`flowalign.algorithms` (``recipe = "dllm"``, on the hooks of
:mod:`flowalign.algorithms.dllm`): fields left ``null`` here (``algorithm.estimator``,
``algorithm.inner_steps``, ``sampling.steps``, ``sampling.order``, ``sampling.step_schedule``,
``sampling.eos_early_rejection``) take the defaults of the algorithm named by ``algorithm.name``; a
value set in the YAML or on the command line always wins. :meth:`DLLMConfig.resolved` returns the
config with those defaults applied, which is what the recipe runs. An algorithm's own fields live in
its node (``algorithm.igpo.hint_fraction``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowalign.algorithms import algorithm_config_class, algorithm_names, get_algorithm
from flowalign.dllm.algorithms import LOSS_NORMALIZATIONS
from flowalign.config_checks import _require, _require_choice
from flowalign.config_files import _looks_like_hub_id, _require_file, read_text_file
from flowalign.config_schema import (
    AUTO_THREADS_HELP,
    DEVICES,
    DTYPES,
    RATIO_TOLERANCE_HELP,
    STD_MODES,
    TIME_BUDGET_HELP,
    FSDPConfig,
    LoggingConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    _f,
)
from flowalign.config_validation import check_algorithm_nodes, validate_common
from flowalign.errors import ConfigError

if TYPE_CHECKING:
    from flowalign.dllm.sampling import SamplingSpec

__all__ = [
    "DLLMAlgorithmBase",
    "DLLMAlgorithmConfig",
    "DLLMConfig",
    "DLLMEvalConfig",
    "DLLMModelConfig",
    "DLLMSamplingConfig",
    "DLLMTaskConfig",
    "DLLMTrainConfig",
]

#: the decoder's choices (flowalign.dllm.sampling REMASKING / ORDERS / STEP_SCHEDULES; a test keeps them equal)
REMASKING = ("low_confidence", "random")
ORDERS = ("diffusion", "ar")
STEP_SCHEDULES = ("uniform", "ascending")


@dataclass
class DLLMModelConfig:
    pretrained: str = _f("assets/dllm_quickstart/model", "Local folder or hub id of the masked diffusion LM (LLaDA, Dream, any HF masked LM with a mask token).", path=True)
    trust_remote_code: bool = _f(False, "Allow the checkpoint's own modeling code (needed by LLaDA and Dream).")
    shift_logits: bool | None = _f(None, "Dream-style shifted logits (position i predicts i+1); null = detect from the model type.")
    dtype: str = _f("float32", "Weights dtype: float32 | bfloat16 | float16.", choices=DTYPES)
    lora_rank: int = _f(0, "LoRA rank (peft); 0 trains all weights (full fine-tuning; the KL reference is then a frozen copy).", ge=0)
    lora_alpha: float = _f(0.0, "LoRA alpha; 0 means alpha = rank.", ge=0)
    lora_target_modules: list[str] | None = _f(None, "Module names LoRA adapts; null = the model's attention/MLP Linear layers.")


@dataclass
class DLLMTaskConfig:
    name: str = _f("addition", "Verifiable task (flowalign.dllm.tasks.TASKS): addition | gsm8k | countdown | sudoku | code.")
    train: str = _f("assets/dllm_quickstart/train.jsonl", "JSONL of training examples (prompt, answer, reference?).", path=True)
    eval: str = _f("assets/dllm_quickstart/eval.jsonl", "JSONL of held-out examples (never trained on).", path=True)
    kwargs: dict[str, Any] = _f(factory=dict, help="Keyword arguments of the task's constructor (e.g. a time limit for code).")


@dataclass
class DLLMSamplingConfig:
    gen_length: int = _f(5, "Completion window length in tokens (answer, then EOS fill).", ge=1)
    steps: int | None = _f(None, "Denoising steps per rollout; null = the algorithm's default (gen_length, fewer for cj_grpo).", ge=1)
    block_length: int | None = _f(None, "Semi-autoregressive block length (must divide gen_length); null = one block.", ge=1)
    temperature: float = _f(1.0, "Rollout sampling temperature (> 0: RL needs exploration).", gt=0,
                            why="rollouts must explore: greedy rollouts give identical groups")
    remasking: str = _f("low_confidence", "Which masked positions are committed each step: low_confidence | random.", choices=REMASKING)
    order: str | None = _f(None, "diffusion | ar (left to right, JustGRPO); null = the algorithm's default.", choices=ORDERS)
    step_schedule: str | None = _f(None, "Tokens per step: uniform | ascending (CJ-GRPO's ASS); null = the algorithm's default.", choices=STEP_SCHEDULES)
    eos_early_rejection: float | None = _f(None, "EOS early rejection strength 1 - gamma_min (CJ-GRPO's EOSER; 0 = off); null = the "
                                           "algorithm's default (cj_grpo: 0.99, the reference's eos_min_gamma 0.01).", ge=0, lt=1)
    eos_restart_per_block: bool | None = _f(None, "EOSER with several blocks: the EOS factor restarts at gamma_min in every block "
                                            "(true; CJ-GRPO's reference eoser_generate) or rises over the whole decode (false); "
                                            "null = the algorithm's default (cj_grpo: true).")
    cfg_scale: float = _f(0.0, "Classifier-free guidance scale s of the decode (LLaDA's: logits = un + (s + 1)(cond - un), un with "
                          "the prompt masked; one extra forward per step); 0 = off (d1's and LLaDA's default).", ge=0)
    group_size: int = _f(8, "Rollouts per prompt (G).", ge=2, why="group-relative advantages need several rollouts")
    prompts_per_iter: int = _f(8, "Distinct prompts per iteration, global across ranks (whole groups live on one rank).", ge=1)


@dataclass
class DLLMAlgorithmBase:
    """The fields every dLLM algorithm shares; ``name`` picks the algorithm, whose own fields (if
    any) live in the node of the same name (``algorithm.igpo.hint_fraction``)."""

    name: str = _f("diffu_grpo", "Algorithm: " + " | ".join(algorithm_names(("dllm",))) + " (`flowalign ls algorithms`).",
                   choices=algorithm_names(("dllm",)))
    estimator: str | None = _f(None, "Log-likelihood estimator: one_step | coupled | elbo_double_mc | elbo_l_form | elbo_semi_deterministic "
                               "| trajectory; null = the algorithm's.")
    p_mask_prompt: float = _f(0.15, "one_step: probability of masking each prompt token (diffu-GRPO's p_mask).", ge=0, lt=1)
    num_mc: int = _f(2, "ELBO estimators: number of time points t (random for double MC, quadrature nodes for semi-deterministic, "
                     "stratified mask counts l for l-form).", ge=1)
    masks_per_t: int = _f(1, "ELBO estimators: random masks drawn per time point.", ge=1)
    inner_steps: int | None = _f(None, "Optimizer steps per batch of rollouts (mu), each with fresh estimator masks; null = the algorithm's.", ge=1)
    clip_range: float | None = _f(None, "PPO ratio clip epsilon (the lower bound 1 - eps; also the upper one unless clip_range_high); "
                                 "null = the algorithm's (0.2; diffu_grpo, coupled_grpo, cj_grpo 0.5).", gt=0)
    clip_range_high: float | None = _f(None, "Asymmetric clipping: the ratio's upper bound is 1 + clip_range_high (TRL's epsilon_high, "
                                       "as in DiffuCoder's trainer); null = symmetric (DiffuCoder's shipped config).", gt=0)
    kl_beta: float | None = _f(None, "Weight of the k3 KL estimate against the reference policy (LoRA off, or a frozen copy); "
                               "null = the algorithm's (0; diffu_grpo, cj_grpo 0.04; coupled_grpo 0.01).", ge=0)
    loss_normalization: str | None = _f(None, "How unit losses are averaged: sequence (each sequence's mean, then the mean over "
                                        "sequences: GRPO) | token (sum over the batch's trained units / their count: d1, "
                                        "DiffuCoder) | window (every unit of the completion window, EOS fill included, over "
                                        "gen_length x the rows with a nonzero advantage: JustGRPO); null = the algorithm's "
                                        "(diffu_grpo, coupled_grpo: token; just_grpo: window; others: sequence).",
                                        choices=LOSS_NORMALIZATIONS)
    likelihood_cfg_scale: float | None = _f(None, "Classifier-free guidance scale of the update's log-likelihood estimates (d1 scores "
                                            "with its decode's cfg_scale); null = sampling.cfg_scale. The trajectory estimator "
                                            "always uses the decode's.", ge=0)
    std_mode: str | None = _f(None, "Advantage normalisation: group (/ group std) | global | none (r - group mean only); "
                              "null = the algorithm's (diffu_grpo, coupled_grpo: none, as d1 and DiffuCoder's "
                              "scale_rewards: false; others: group).", choices=STD_MODES)
    adv_clip: float = _f(0.0, "Clip advantages to [-adv_clip, adv_clip]; 0 disables.", ge=0)
    ratio_tolerance: float | None = _f(None, RATIO_TOLERANCE_HELP, gt=0)
    skip_zero_signal: bool = _f(True, "Leave groups whose rewards are all equal out of the update (no gradient without kl_beta).")
    correct_threshold: float = _f(1.0, "A rollout counts as correct when its reward >= this (accuracy, IGPO's all-wrong test).", gt=0, le=1,
                                  why="task rewards lie in [0, 1]")


DLLMAlgorithmConfig = algorithm_config_class("DLLMAlgorithmConfig", DLLMAlgorithmBase, ("dllm",))


@dataclass
class DLLMTrainConfig:
    iterations: int = _f(60, "Sampling + update iterations.", ge=1)
    optimizer: OptimizerConfig = _f(factory=OptimizerConfig, help="Optimizer settings.")
    lr_scheduler: LRSchedulerConfig = _f(factory=LRSchedulerConfig, help="Learning-rate schedule over all optimizer steps "
                                                                       "(iterations x algorithm.inner_steps).")
    micro_batch_size: int = _f(64, "Sequences per forward/backward pass (gradient accumulation inside an inner step).", ge=1)
    grad_clip: float = _f(1.0, "Max gradient norm; 0 disables clipping.", ge=0)
    time_budget_s: float = _f(0.0, TIME_BUDGET_HELP, ge=0)
    checkpoint_every: int = _f(0, "Save an atomic checkpoint every N iterations (and at the end); 0 = only at the end.", ge=0)
    keep_checkpoints: int = _f(2, "Number of recent checkpoints kept on disk.", ge=1)
    resume: str = _f("auto", "auto (resume from output_dir if a checkpoint exists) | never | a checkpoint folder (checkpoints/step-*).")
    fsdp: FSDPConfig = _f(factory=FSDPConfig, help="Sharded data parallelism (FSDP2) under several processes.")


@dataclass
class DLLMEvalConfig:
    every: int = _f(10, "Evaluate every N iterations (plus before training and at the end); 0 = only those two.", ge=0)
    max_examples: int = _f(0, "Evaluate on the first N held-out examples; 0 = all.", ge=0)
    batch_size: int = _f(256, "Held-out examples decoded per batch.", ge=1)
    temperature: float = _f(0.0, "Held-out decoding temperature (0 = greedy).", ge=0)
    diversity_prompts: int = _f(32, "Held-out prompts whose sampled completions measure eval/diversity (the fraction of "
                                     "distinct completions per prompt); 0 = not measured.", ge=0)
    diversity_samples: int = _f(4, "Completions sampled per such prompt, at the rollout temperature.", ge=2)


@dataclass
class DLLMConfig:
    """A reinforcement-learning run of a masked diffusion LM against a verifiable task."""

    recipe: str = _f("dllm", "Training recipe; 'dllm' selects this schema (flowalign.recipes.dllm_rl).")
    seed: int = _f(0, "Seed of every random stream (rollouts, estimator masks, prompt order, hints).", ge=0, lt=2**64)
    output_dir: str = _f("runs/dllm_quickstart", "Run directory: checkpoints, metrics.jsonl, summary.json, best/, final/ (relative to the current directory).")
    device: str = _f("auto", "auto (accelerate's choice) | cpu.", choices=DEVICES, why="auto runs on the GPUs accelerate finds")
    num_threads: int = _f(0, AUTO_THREADS_HELP + " Tiny models run many times faster with 1 (thread hand-offs cost more than the math).", ge=0)
    model: DLLMModelConfig = _f(factory=DLLMModelConfig, help="The masked diffusion LM.")
    task: DLLMTaskConfig = _f(factory=DLLMTaskConfig, help="Task and data.")
    sampling: DLLMSamplingConfig = _f(factory=DLLMSamplingConfig, help="Rollouts.")
    algorithm: DLLMAlgorithmConfig = _f(factory=DLLMAlgorithmConfig, help="The algorithm (algorithm.name), estimator, advantages and loss.")
    train: DLLMTrainConfig = _f(factory=DLLMTrainConfig, help="Optimisation.")
    eval: DLLMEvalConfig = _f(factory=DLLMEvalConfig, help="Held-out evaluation.")
    logging: LoggingConfig = _f(factory=LoggingConfig, help="Logging.")

    # ------------------------------------------------------------------------------------------
    def resolved(self) -> "DLLMConfig":
        """A copy with the defaults of the algorithm named by ``algorithm.name`` filled into every
        ``null`` field (:meth:`flowalign.algorithms.dllm.DLLMAlgorithm.apply`).

        Raises:
            ConfigError: ``algorithm.name`` is not a dLLM algorithm.
        """
        cfg = copy.deepcopy(self)
        get_algorithm(cfg.algorithm.name, recipes=("dllm",)).apply(cfg)
        return cfg

    def sampling_spec(self) -> SamplingSpec:
        """The rollouts' :class:`~flowalign.dllm.sampling.SamplingSpec` (algorithm defaults applied).

        Raises:
            SamplingSpecError: the sampling fields do not make a valid decode (``err.field`` names it).
        """
        from flowalign.dllm.sampling import SamplingSpec

        s = self.resolved().sampling
        return SamplingSpec(gen_length=s.gen_length, steps=s.steps, block_length=s.block_length,
                            temperature=s.temperature, remasking=s.remasking, order=s.order,
                            step_schedule=s.step_schedule, eos_early_rejection=s.eos_early_rejection,
                            eos_restart_per_block=s.eos_restart_per_block, cfg_scale=s.cfg_scale)

    def validate(self, *, check_files: bool = True, world_size: int = 1) -> None:
        """Semantic checks types cannot express, on the resolved config (algorithm defaults applied):
        every field's range and choices (:func:`flowalign.config.check_fields`), the optimizer, the LR
        schedule, ``train.resume`` and ``output_dir`` (:func:`flowalign.config.validate_common`), that
        only the chosen algorithm's node is set, the decode, the estimator, the algorithm's own
        :meth:`~flowalign.algorithms.registry.Algorithm.check`, and with ``check_files`` the model
        folder and the task files (read with the task's loader).

        Raises:
            ConfigError: the message starts with the offending key.
        """
        from flowalign.dllm.algorithms import ESTIMATOR_UNITS
        from flowalign.dllm.sampling import SamplingSpecError
        from flowalign.dllm.tasks import TASKS, get_task

        _require(self.recipe == "dllm", "recipe", f"DLLMConfig runs the 'dllm' recipe, got {self.recipe!r}")
        cfg = self.resolved()
        m, s, a = cfg.model, cfg.sampling, cfg.algorithm
        algorithm = get_algorithm(a.name, recipes=("dllm",))
        validate_common(cfg, check_files=check_files, optimizer_steps=cfg.train.iterations * a.inner_steps)
        check_algorithm_nodes(a, a.name)
        _require(m.lora_target_modules is None or m.lora_rank > 0, "model.lora_target_modules", "only used with model.lora_rank > 0")

        _require_choice(cfg.task.name, sorted(TASKS), "task.name", "task")
        try:
            task = get_task(cfg.task.name, **cfg.task.kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"task.kwargs: {err}") from None

        try:  # the decoder's own checks (flowalign.dllm.sampling.SamplingSpec), reported by key
            cfg.sampling_spec()
        except SamplingSpecError as err:
            raise ConfigError(f"sampling.{err.field}: {err}") from None
        _require(s.prompts_per_iter % world_size == 0, "sampling.prompts_per_iter",
                 f"prompts_per_iter={s.prompts_per_iter} must be divisible by the number of processes ({world_size}): "
                 "each rank samples whole groups of prompts_per_iter / world_size prompts")

        _require_choice(a.estimator, sorted(ESTIMATOR_UNITS), "algorithm.estimator", "estimator")
        _require(a.estimator != "trajectory" or a.likelihood_cfg_scale == s.cfg_scale, "algorithm.likelihood_cfg_scale",
                 f"the trajectory estimator scores the decode with its own guidance (sampling.cfg_scale={s.cfg_scale}); "
                 f"got {a.likelihood_cfg_scale}: leave it null")
        algorithm.check(cfg, world_size)

        if check_files:
            if not _looks_like_hub_id(m.pretrained):
                _require_file(m.pretrained, "model.pretrained")
            for key in ("task.train", "task.eval"):
                _check_task_file(task, getattr(cfg.task, key.split(".")[1]), key)

    # ------------------------------------------------------------------------------------------
    def global_batch(self) -> dict[str, int]:
        """The batch arithmetic of one iteration (global, any number of processes)."""
        cfg = self.resolved()
        s, a = cfg.sampling, cfg.algorithm
        rollouts = s.prompts_per_iter * s.group_size
        return {"rollouts": rollouts, "optimizer_steps": a.inner_steps,
                "micro_batches_per_step": math.ceil(rollouts / cfg.train.micro_batch_size)}


def _check_task_file(task: Any, path: str, key: str) -> None:
    """``path`` must be a regular UTF-8 file that ``task.load`` reads into at least one example."""
    read_text_file(path, key)
    try:
        task.load(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{key}: {err}") from None
