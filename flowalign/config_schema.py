"""The config schema: the dataclasses of an image / video RL run (:class:`RLConfig` and its
sections) and the recipe tables (:data:`RECIPES`, :data:`SCHEMAS`).

The ``algorithm`` section is assembled from the algorithm registry: the fields every image
algorithm shares (:class:`AlgorithmBase`) plus one node per algorithm with fields of its own
(``algorithm.branch_grpo``, ``algorithm.mix_grpo``, ...; :mod:`flowalign.algorithms`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowalign.algorithms import algorithm_config_class, algorithm_names
from flowalign.algorithms.flow import num_trained_steps
from flowalign.config_fields import _f

__all__ = ["RECIPES", "SCHEMAS", "AlgorithmBase", "AlgorithmConfig", "DataConfig", "EvalConfig", "LRSchedulerConfig",
           "FSDPConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig", "RLConfig", "SamplingConfig", "TrainConfig", "_f",
           "num_trained_steps"]


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


RATIO_TOLERANCE_HELP = ("Max |ratio - 1| allowed at the first inner step (on-policy check: before any update the recomputed "
                        "log-probs equal the rollout's); null = by where the model computes: 1e-5 float32 on the CPU, 1e-4 "
                        "float32 on a GPU (cuBLAS / TF32 kernels differ between the rollout's and the update's batches), 1e-2 "
                        "with bfloat16 / float16 weights, autocast or train.fsdp.param_dtype (flowalign.guards."
                        "RATIO_TOLERANCES).")


TIME_BUDGET_HELP = ("Stop after the iteration at which the training time (evaluation excluded) reaches this many seconds; "
                    "0 = no budget.")

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
class SamplingConfig:
    num_steps: int = _f(10, "Denoising steps per rollout (T).", ge=1)
    sampler: str = _f("flow_grpo", "SDE used for rollouts: flow_grpo | dance | cps | sage (SAGE-GRPO's step-integrated "
                      "variance).", choices=("flow_grpo", "dance", "cps", "sage"))
    noise_level: float = _f(0.7, "SDE noise level a (Flow-GRPO a, DanceGRPO eta, CPS a).", gt=0,
                            why="policy-gradient training needs stochastic steps")
    group_size: int = _f(8, "Samples per prompt (G); a group may span ranks.", ge=2,
                         why="group-relative advantages need several samples")
    guidance_scale: float = _f(1.0, "Classifier-free guidance scale for rollouts and evaluation (1 = off).", ge=1,
                               why="1 turns guidance off, > 1 strengthens the prompt")
    negative_prompt: str = _f("", "Negative prompt used for classifier-free guidance when guidance_scale > 1.")
    sde_window: list[int] | None = _f(None, "[start, end) steps that use the SDE, ODE elsewhere (MixGRPO, BranchGRPO-Mix); null = all steps.", ge=0)
    timestep_fraction: float = _f(1.0, "Fraction of SDE steps trained: the first int(#SDE steps x timestep_fraction), at least 1 "
                                   "(Flow-GRPO's timestep_fraction and its rounding: 10 steps x 0.99 -> 9).", gt=0, le=1)
    cps_log_prob: str = _f("exact", "sampler cps: the transition log-prob of rollout and update. exact = the Gaussian "
                                    "log-density (mean over latent dims); flow_grpo = Flow-GRPO's -mean((x - mean)^2) with "
                                    "constants and the 1/(2 std^2) factor removed (docs/FIDELITY.md).",
                           choices=("exact", "flow_grpo"))
    train_steps: str = _f("first", "Which SDE steps are trained: first = the first int(#SDE steps x timestep_fraction), the same for "
                                   "every sample (Flow-GRPO); random_subset = DanceGRPO's: the last SDE step is never trained and "
                                   "each sample trains its own random int((#SDE steps - 1) x timestep_fraction) of the others "
                                   "(a flat group only; drawn from the ('train_steps', iteration, rank) stream).",
                          choices=("first", "random_subset"))
    init_same_noise: bool = _f(False, "One initial noise shared by the whole group of a prompt (DanceGRPO's --init_same_noise); "
                                      "false = independent noises (Flow-GRPO).")
    final_sample: str = _f("sde", "What is decoded and rewarded: sde = the sample after the last SDE step (Flow-GRPO); "
                                  "predicted_x0 = the last step's prediction x - sigma v (DanceGRPO).",
                           choices=("sde", "predicted_x0"))


@dataclass
class AlgorithmBase:
    """The fields every image / video algorithm shares; ``name`` picks the algorithm, whose own
    fields (if any) live in the node of the same name (``algorithm.branch_grpo.prune``)."""

    name: str = _f("grpo", "Algorithm: " + " | ".join(algorithm_names(("rl", "awm"))) + " (`flowalign ls algorithms`).",
                   choices=algorithm_names(("rl", "awm")))
    std_mode: str = _f("group", "Advantage normalisation: group | global | none.", choices=STD_MODES)
    adv_clip: float = _f(5.0, "Clip advantages to [-adv_clip, adv_clip]; 0 disables.", ge=0)
    clip_range: float = _f(1e-4, "PPO ratio clip epsilon (Flow-GRPO uses 1e-4 for SD3.5).", gt=0)
    kl_beta: float = _f(0.0, "Weight of the KL to the reference policy (PPO: on transition means; awm: on velocities).", ge=0)
    kl_form: str = _f("exact", "rl recipe: the KL on transition means. exact = the per-dimension Gaussian KL between the "
                               "policy's and the reference's transition kernels; flow_grpo = Flow-GRPO's train_sd3.py form "
                               "(divided by the SDE std before its sqrt(dt): exact x dt for the flow_grpo / dance samplers, "
                               "equal to exact for cps). Use flow_grpo with a kl_beta copied from Flow-GRPO (docs/FIDELITY.md).",
                      choices=("exact", "flow_grpo"))
    std_estimator: str | None = _f(None, "Std of the advantage normalisation (std_mode group / global): population (ddof 0, "
                                         "Flow-GRPO) | unbiased (ddof 1, DanceGRPO / MixGRPO / Pref-GRPO / BranchGRPO / GDPO's multi-reward); "
                                         "null = the algorithm's reference. Used by the group-normalising estimators (grpo, mix_grpo, "
                                         "pref_grpo, branch_grpo, multi_reward); the others keep their own.", choices=("population", "unbiased"))
    std_eps: float | None = _f(None, "Added to the std of the advantage normalisation (Flow-GRPO 1e-4; DanceGRPO / MixGRPO / "
                                     "Pref-GRPO / BranchGRPO 1e-8; GDPO's multi-reward 1e-4); null = the algorithm's reference.", ge=0)
    ratio_tolerance: float | None = _f(None, RATIO_TOLERANCE_HELP, gt=0)


AlgorithmConfig = algorithm_config_class("AlgorithmConfig", AlgorithmBase, ("rl", "awm"))


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
class LRSchedulerConfig:
    """The learning-rate schedule, stepped after every optimizer step (:mod:`flowalign.training.lr_schedules`)."""

    _component_: str = _f("constant", "Schedule: constant | cosine | linear, or a torch.optim.lr_scheduler class path "
                                      "(e.g. torch.optim.lr_scheduler.StepLR, built with kwargs).")
    warmup_steps: int = _f(0, "constant / cosine / linear: optimizer steps of linear warmup from 0.", ge=0)
    min_lr_ratio: float = _f(0.0, "cosine / linear: the final learning rate as a fraction of train.optimizer.lr.", ge=0, le=1)
    kwargs: dict[str, Any] = _f(factory=dict, help="Keyword arguments of a torch scheduler class (checked against its signature).")


@dataclass
class FSDPConfig:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over all processes: each rank keeps a shard of the
    trainable module's weights, gradients and optimizer state (flowalign.training.fsdp)."""

    enabled: bool = _f(False, "Shard the trained module over every process with FSDP2 instead of replicating it (DDP). "
                              "Also on when `accelerate launch` runs with an accelerate config whose distributed_type is FSDP "
                              "(its fsdp_reshard_after_forward / fsdp_offload_params then replace the two keys below).")
    reshard_after_forward: bool = _f(True, "Free the gathered weights after each block's forward and gather them again for "
                                           "the backward (ZeRO-3-like); false keeps them until the backward (ZeRO-2-like: "
                                           "more memory, fewer all-gathers).")
    cpu_offload: bool = _f(False, "Keep the sharded weights, gradients and optimizer state in CPU memory between uses "
                                  "(torch's CPUOffloadPolicy; needs a GPU).")
    param_dtype: str | None = _f(None, "Weights' dtype in forward / backward (MixedPrecisionPolicy; gradients are "
                                       "reduced in float32): bfloat16 | float16 | float32; null = the model's dtype.",
                                 choices=("bfloat16", "float16", "float32"))
    state_dict: str = _f("full", "How checkpoints of a sharded run hold the trainable weights, EMA and optimizer state: "
                                 "full = gathered whole and written by the main process (model.safetensors, optimizer.pt: it "
                                 "needs host memory for all of them); sharded = every process writes its own shards "
                                 "(torch.distributed.checkpoint, checkpoints/step-*/shards/), nothing is gathered; resumes with "
                                 "train.fsdp on any number of processes. best/, final/ and lora/ are gathered whole either way.",
                         choices=("full", "sharded"))


@dataclass
class TrainConfig:
    iterations: int = _f(100, "Sampling + update iterations.", ge=1)
    optimizer: OptimizerConfig = _f(factory=OptimizerConfig, help="Optimizer settings.")
    lr_scheduler: LRSchedulerConfig = _f(factory=LRSchedulerConfig, help="Learning-rate schedule over all optimizer steps.")
    steps_per_iter: int = _f(2, "Optimizer steps per iteration; the trained edges are split evenly among them.", ge=1)
    micro_batch_size: int = _f(64, "Edges per forward/backward pass (gradient accumulation inside a step).", ge=1)
    grad_clip: float = _f(1.0, "Max gradient norm; 0 disables clipping.", ge=0)
    mixed_precision: str = _f("no", "Autocast precision for model calls: no | bf16 | fp16.", choices=("no", "bf16", "fp16"))
    ema_decay: float = _f(0.0, "EMA decay of the trained weights; 0 disables EMA.", ge=0, lt=1)
    checkpoint_every: int = _f(50, "Save an atomic checkpoint every N iterations (and at the end); 0 = only at the end.", ge=0)
    keep_checkpoints: int = _f(2, "Number of recent checkpoints kept on disk.", ge=1)
    resume: str = _f("auto", "auto (resume from output_dir if a checkpoint exists) | never | a checkpoint folder (checkpoints/step-*).")
    time_budget_s: float = _f(0.0, TIME_BUDGET_HELP, ge=0)
    fsdp: FSDPConfig = _f(factory=FSDPConfig, help="Sharded data parallelism (FSDP2) under several processes.")


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
    """A sampled-trajectory policy-gradient run (Flow-GRPO / DanceGRPO and the algorithms built on them)."""

    recipe: str = _f("rl", "Training loop: rl (policy gradient on sampled transitions) | awm (advantage-weighted flow matching on the "
                           "sampled finals) | dllm (masked-diffusion LMs; its own schema, flowalign.dllm.config). Left out, it "
                           "follows algorithm.name.")
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
    algorithm: AlgorithmConfig = _f(factory=AlgorithmConfig, help="The algorithm (algorithm.name) and its settings.")
    train: TrainConfig = _f(factory=TrainConfig, help="Optimisation.")
    eval: EvalConfig = _f(factory=EvalConfig, help="Held-out evaluation.")
    logging: LoggingConfig = _f(factory=LoggingConfig, help="Logging.")

