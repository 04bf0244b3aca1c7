"""The config schema: the dataclasses of an image / video RL run (:class:`RLConfig` and its
sections), the field helper ``_f`` that keeps each field's documentation and checks in its
metadata, the recipe tables (:data:`RECIPES`, :data:`SCHEMAS`) and :func:`num_trained_steps`, the
number of trained steps a sampling section implies."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence


#: recipe name -> class path (imported lazily by flowalign.api.recipe_class).
RECIPES: dict[str, str] = {
    "rl": "flowalign.recipes.rl:RLRecipe",
    "awm": "flowalign.recipes.awm:AWMRecipe",
    "dllm": "flowalign.recipes.dllm_rl:DLLMRecipe",
}

#: recipe name -> config schema for recipes whose config is not :class:`RLConfig`. A schema is a
#: dataclass with a ``recipe`` field and a ``validate(*, check_files, world_size)`` method.
SCHEMAS: dict[str, str] = {"dllm": "flowalign.dllm.config:DLLMConfig"}


AUTO_THREADS_HELP = ("CPU threads of torch in this process (torch.set_num_threads); 0 = automatic: the cores available "
                     "to this process divided among the processes of this machine (flowalign.training.accel."
                     "configure_threads). Tiny models run as fast on 1 thread, and 1 does not slow down next to other jobs.")


def _f(default: Any = None, help: str = "", factory: Any = None, *,  # noqa: A002
       ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
       choices: Sequence[str] | None = None, path: bool = False, why: str = "") -> Any:
    """A dataclass field with its documentation and checks in ``metadata``.

    Args:
        default / factory: the default value, or a zero-argument factory of it.
        help: one line of documentation (``flowalign validate --explain``).
        ge, gt, le, lt: bounds of a numeric field (applied to every number of a list field).
        choices: the admissible values of a string field (``None`` stays admissible for an optional one).
        path: a file or folder path, resolved by :func:`resolve_path` when the config is loaded.
        why: appended to the range error, e.g. ``"group-relative advantages need several samples"``.
    """
    meta: dict[str, Any] = {"help": help}
    meta.update({k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None})
    if choices is not None:
        meta["choices"] = tuple(choices)
    if path:
        meta["path"] = True
    if why:
        meta["why"] = why
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu")
STD_MODES = ("group", "global", "none")


@dataclass
class ModelConfig:
    _component_: str = _f("toy", "Pipeline adapter: a family name from `flowalign ls adapters` or 'package.module:Class'.")
    pretrained: str = _f("assets/quickstart/digits-flow", "Path or hub id given to the adapter's from_pretrained.", path=True)
    dtype: str = _f("float32", "Weights dtype: float32 | bfloat16 | float16.", choices=DTYPES)
    lora_rank: int = _f(0, "LoRA rank (peft); 0 trains all denoiser weights (full fine-tuning).", ge=0)
    lora_alpha: float = _f(0.0, "LoRA alpha; 0 means alpha = rank.", ge=0)
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    options: dict[str, Any] = _f(
        factory=dict,
        help="Adapter keyword arguments for from_pretrained: resolution, shift, num_frames, attention_backend, "
             "offload_idle, embedding_cache_dir, ... (see the adapter's docstring).",
    )


@dataclass
class DataConfig:
    train_prompts: str = _f("assets/prompts/digits_train.txt", "Text file with one training prompt per line.", path=True)
    prompts_per_iter: int = _f(4, "Distinct prompts per iteration, global across ranks (P).", ge=1)


@dataclass
class WindowConfig:
    strategy: str = _f("none", "MixGRPO window schedule: none | progressive | random | decay | exp_decay.")
    size: int = _f(4, "Window size in steps (MixGRPO's w).", ge=1)
    shift_every: int = _f(25, "Iterations per window position (MixGRPO iters_per_group; the maximum for decay schedules).", ge=1)
    min_shift_every: int = _f(5, "decay / exp_decay: iterations per position never drop below this.", ge=1)
    stride: int = _f(1, "Steps the window moves per shift.", ge=1)
    decay_rate: float = _f(0.5, "exp_decay: shift_every * exp(-decay_rate * max(0, start - decay_start)).", ge=0)
    decay_start: int = _f(0, "exp_decay: window start after which the interval starts to decay.", ge=0)
    roll_back: bool = _f(True, "After the last position, start again from step 0 (MixGRPO roll_back); false stays at the end.")


@dataclass
class SamplingConfig:
    num_steps: int = _f(10, "Denoising steps per rollout (T).", ge=1)
    sampler: str = _f("flow_grpo", "SDE used for rollouts: flow_grpo | dance | cps.", choices=("flow_grpo", "dance", "cps"))
    noise_level: float = _f(0.7, "SDE noise level a (Flow-GRPO a, DanceGRPO eta, CPS a).", gt=0,
                            why="policy-gradient training needs stochastic steps")
    group_size: int = _f(8, "Samples per prompt (G); a group may span ranks.", ge=2,
                         why="group-relative advantages need several samples")
    guidance_scale: float = _f(1.0, "Classifier-free guidance scale for rollouts and evaluation (1 = off).", ge=1,
                               why="1 turns guidance off, > 1 strengthens the prompt")
    negative_prompt: str = _f("", "Negative prompt used for classifier-free guidance when guidance_scale > 1.")
    sde_window: list[int] | None = _f(None, "[start, end) steps that use the SDE, ODE elsewhere (MixGRPO, BranchGRPO-Mix); null = all steps.", ge=0)
    timestep_fraction: float = _f(1.0, "Fraction of SDE steps trained (the first ones), as Flow-GRPO's timestep_fraction.", gt=0, le=1)
    window: WindowConfig = _f(factory=WindowConfig, help="MixGRPO sliding SDE window (replaces sde_window when strategy != none).")
    splits: list[list[int]] = _f(
        factory=list, ge=0, help="BranchGRPO shared-prefix splits [[step, k], ...]: after step `step` every node spawns k SDE children. "
                                 "group_size counts leaves: each prompt starts from group_size / prod(k) noises.")
    split_noise_level: float | None = _f(None, "Noise level at split steps (BranchGRPO's split noise scale); null = noise_level.", gt=0)
    branch_steps: list[int] = _f(
        factory=list, ge=0, help="TempFlow-GRPO: iteration i branches at branch_steps[i % len] into group_size SDE children from an "
                                 "ODE trunk, finished by ODE (needs algorithm.advantage=tempflow).")


@dataclass
class AlgorithmConfig:
    advantage: str = _f("group", "Advantage estimator by name: group (Flow-GRPO / DanceGRPO, groups gathered across ranks) | "
                                 "branch (BranchGRPO) | tempflow (TempFlow-GRPO) | dense (DenseGRPO) | vgpo (VGPO); see `flowalign ls advantages`.")
    std_mode: str = _f("group", "Advantage normalisation: group | global | none.", choices=STD_MODES)
    adv_clip: float = _f(5.0, "Clip advantages to [-adv_clip, adv_clip]; 0 disables.", ge=0)
    loss: str = _f("ppo_clip", "Policy loss by name (flowalign.losses.LOSSES; `flowalign ls losses`).")
    clip_range: float = _f(1e-4, "PPO ratio clip epsilon (Flow-GRPO uses 1e-4 for SD3.5).", gt=0)
    kl_beta: float = _f(0.0, "Weight of the KL on transition means against the reference policy.", ge=0)
    ratio_tolerance: float = _f(1e-5, "Max |ratio - 1| allowed at the first inner step (on-policy check).", gt=0)
    reward_normalization: str = _f(
        "sum", "Several rewards: 'sum' normalises the weighted sum in each group (default); 'decoupled' normalises each "
               "reward in its group first, then sums with the weights and renormalises (multi-reward decoupled).",
        choices=("sum", "decoupled"))
    fusion: str = _f("mean", "branch: node value from descendant leaves: mean | logprob_softmax (path-probability weighted).",
                     choices=("mean", "logprob_softmax"))
    fusion_temperature: float = _f(1.0, "branch, fusion=logprob_softmax: temperature of the softmax.", gt=0)
    prune: str = _f("none", "branch: width pruning of trained edges: none | best_worst | fraction.",
                    choices=("none", "best_worst", "fraction"))
    prune_keep: float = _f(0.5, "branch: prune=fraction keeps this fraction per branch; prune=best_worst keeps this many best/worst paths.", gt=0)
    depth_prune_window: int = _f(0, "branch: sliding depth pruning, depths left untrained per iteration; 0 disables.", ge=0)
    depth_prune_stride: int = _f(1, "branch: steps the depth-pruning window moves per iteration.", ge=1)
    noise_aware: bool = _f(True, "tempflow: weight each step's loss by std_t * sqrt(dt) (noise-aware policy weighting).")
    lookahead_steps: int = _f(0, "dense / vgpo: ODE steps from a node to its clean image (0 = all remaining steps, DenseGRPO; "
                                 "1 = one-step projection, VGPO).", ge=0)
    calibrate_noise: bool = _f(False, "dense: reward-aware calibration of each step's noise level psi(t) (DenseGRPO Alg. 1), "
                                      "updated online every iteration and logged (the paper calibrates before training, then fixes it).")
    calibration_rate: float = _f(0.01, "dense: psi(t) step per iteration (DenseGRPO's epsilon_2).", gt=0)
    calibration_margin: float = _f(2.0, "dense: |#gains>0 - #gains<0| below this counts as balanced -> raise psi(t) (epsilon_1).", gt=0)
    discount: float = _f(0.9, "vgpo: discount gamma of the action values Q_t (our choice; the paper's value is not public).", ge=0, le=1)
    value_anchor: float = _f(0.5, "vgpo: k in alpha = k * std, the absolute-value anchor that survives collapsed groups.", ge=0)
    anchor_steps: int | None = _f(None, "vgpo: the anchor applies to the first N steps only (VGPO uses 5 of 10); null = all.", ge=0)


@dataclass
class OptimizerConfig:
    """Optimizer settings; :func:`build_optimizer` turns them into the optimizer.

    ``lr``, ``weight_decay``, ``betas`` and ``eps`` are passed when the optimizer's ``__init__``
    takes them (so ``torch.optim.SGD`` gets no ``betas`` / ``eps``); one it does not take must keep
    its default, else validation fails naming it. ``kwargs`` adds further keyword arguments
    (``{momentum: 0.9, nesterov: true}`` for SGD, ``{amsgrad: true}`` for AdamW), each checked
    against the signature.
    """

    _component_: str = _f("torch.optim.AdamW", "Optimizer class path: a torch.optim.Optimizer subclass, e.g. torch.optim.AdamW | torch.optim.SGD.")
    lr: float = _f(1e-4, "Learning rate.", gt=0)
    weight_decay: float = _f(1e-4, "Weight decay (decoupled for AdamW); passed when the optimizer takes it.", ge=0)
    betas: list[float] = _f(factory=lambda: [0.9, 0.999], help="Adam betas [beta1, beta2]; passed when the optimizer takes them.", ge=0, lt=1)
    eps: float = _f(1e-8, "Adam epsilon; passed when the optimizer takes it.", gt=0)
    kwargs: dict[str, Any] = _f(factory=dict, help="Further keyword arguments of the optimizer class, e.g. {momentum: 0.9} for SGD "
                                                   "(checked against its signature).")


@dataclass
class TrainConfig:
    iterations: int = _f(100, "Sampling + update iterations.", ge=1)
    optimizer: OptimizerConfig = _f(factory=OptimizerConfig, help="Optimizer settings.")
    steps_per_iter: int = _f(2, "Optimizer steps per iteration; the trained edges are split evenly among them.", ge=1)
    micro_batch_size: int = _f(64, "Edges per forward/backward pass (gradient accumulation inside a step).", ge=1)
    grad_clip: float = _f(1.0, "Max gradient norm; 0 disables clipping.", ge=0)
    mixed_precision: str = _f("no", "Autocast precision for model calls: no | bf16 | fp16.", choices=("no", "bf16", "fp16"))
    ema_decay: float = _f(0.0, "EMA decay of the trained weights; 0 disables EMA.", ge=0, lt=1)
    checkpoint_every: int = _f(50, "Save an atomic checkpoint every N iterations (and at the end); 0 = only at the end.", ge=0)
    keep_checkpoints: int = _f(2, "Number of recent checkpoints kept on disk.", ge=1)
    resume: str = _f("auto", "auto (resume from output_dir if a checkpoint exists) | never | a checkpoint folder (checkpoints/step-*).")


@dataclass
class EvalConfig:
    prompts: str = _f("assets/prompts/digits_eval.txt", "Held-out prompt file (never trained on).", path=True)
    samples_per_prompt: int = _f(8, "ODE samples per held-out prompt.", ge=1)
    num_steps: int = _f(10, "ODE steps for evaluation.", ge=1)
    every: int = _f(10, "Evaluate every N iterations (plus before training and at the end); 0 = only those two.", ge=0)
    judges: list[dict[str, Any]] = _f(
        factory=list, help="Independent scorers never trained on (same spec format as `rewards`); reported, never optimised."
    )
    grid_prompts: int = _f(10, "Held-out prompts shown in the before/after image grid.", ge=1)


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "Write TensorBoard event files to output_dir/tensorboard.")
    wandb_project: str | None = _f(None, "Also log to this Weights & Biases project (needs the wandb extra).")
    progress: bool = _f(True, "Show progress bars.")


@dataclass
class RLConfig:
    """A sampled-trajectory policy-gradient run (Flow-GRPO / DanceGRPO and presets built on them)."""

    recipe: str = _f("rl", "Training recipe: rl (policy gradient on sampled transitions) | awm (advantage-weighted flow matching on the sampled finals) | dllm (masked-diffusion LMs; its own schema, flowalign.dllm.config).")
    seed: int = _f(0, "Seed of every random stream (rollout noise, prompt order, initialisation).", ge=0, lt=2**64)
    output_dir: str = _f("runs/quickstart", "Run directory: checkpoints, metrics.jsonl, pictures, final weights (relative to the current directory).")
    device: str = _f("auto", "auto (accelerate's choice) | cpu.", choices=DEVICES, why="auto runs on the GPUs accelerate finds")
    num_threads: int = _f(0, AUTO_THREADS_HELP, ge=0)
    model: ModelConfig = _f(factory=ModelConfig, help="The generator.")
    rewards: list[dict[str, Any]] = _f(
        factory=lambda: [{"_component_": "digit_classifier", "path": "assets/quickstart/digit-classifier", "weight": 1.0}],
        help="Rewards: list of {_component_: name or 'module:Class', weight: float, **constructor kwargs}.",
    )
    data: DataConfig = _f(factory=DataConfig, help="Training prompts.")
    sampling: SamplingConfig = _f(factory=SamplingConfig, help="Rollouts.")
    algorithm: AlgorithmConfig = _f(factory=AlgorithmConfig, help="Advantages and loss.")
    train: TrainConfig = _f(factory=TrainConfig, help="Optimisation.")
    eval: EvalConfig = _f(factory=EvalConfig, help="Held-out evaluation.")
    logging: LoggingConfig = _f(factory=LoggingConfig, help="Logging.")


def num_trained_steps(s: SamplingConfig, window_size: int | None = None) -> int:
    """How many of the SDE steps are trained: the first ceil(fraction * #SDE steps).

    ``window_size`` is the number of SDE steps (default: ``sde_window``'s, the moving window's
    ``size``, or every step)."""
    if window_size is None:
        if s.window.strategy != "none":
            window_size = s.window.size
        else:
            start, end = s.sde_window if s.sde_window is not None else (0, s.num_steps)
            window_size = end - start
    return max(1, math.ceil(s.timestep_fraction * window_size))
