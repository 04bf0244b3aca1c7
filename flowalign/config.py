"""Typed run configuration: YAML (OmegaConf) -> dataclasses, with ``key.sub=value`` overrides.

Every field carries its documentation in ``metadata["help"]`` (``flowalign validate --explain``
prints them). Loading fails *before any model loads* on unknown keys, wrong types, missing files
and impossible batch arithmetic, and the error names the offending key.

Swappable leaves are named with ``_component_``: the pipeline adapter (``model._component_``),
each reward (``rewards[i]._component_``) and the optimizer (``train.optimizer._component_``).
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


#: recipe name -> class path (imported lazily by flowalign.api.recipe_class).
RECIPES: dict[str, str] = {
    "rl": "flowalign.recipes.rl:RLRecipe",
    "awm": "flowalign.recipes.awm:AWMRecipe",
    "dllm": "flowalign.recipes.dllm_rl:DLLMRecipe",
}

#: recipe name -> config schema for recipes whose config is not :class:`RLConfig`. A schema is a
#: dataclass with a ``recipe`` field and a ``validate(*, check_files, world_size)`` method.
SCHEMAS: dict[str, str] = {"dllm": "flowalign.dllm.config:DLLMConfig"}


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key (or file)."""


def _f(default: Any = None, help: str = "", factory: Any = None) -> Any:  # noqa: A002
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    _component_: str = _f("toy", "Pipeline adapter: a family name from `flowalign ls adapters` or 'package.module:Class'.")
    pretrained: str = _f("assets/quickstart/digits-flow", "Path or hub id given to the adapter's from_pretrained.")
    dtype: str = _f("float32", "Weights dtype: float32 | bfloat16 | float16.")
    lora_rank: int = _f(0, "LoRA rank (peft); 0 trains all denoiser weights (full fine-tuning).")
    lora_alpha: float = _f(0.0, "LoRA alpha; 0 means alpha = rank.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    options: dict[str, Any] = _f(
        factory=dict,
        help="Adapter keyword arguments for from_pretrained: resolution, shift, num_frames, attention_backend, "
             "offload_idle, embedding_cache_dir, ... (see the adapter's docstring).",
    )


@dataclass
class DataConfig:
    train_prompts: str = _f("assets/prompts/digits_train.txt", "Text file with one training prompt per line.")
    prompts_per_iter: int = _f(4, "Distinct prompts per iteration, global across ranks (P).")


@dataclass
class WindowConfig:
    strategy: str = _f("none", "MixGRPO window schedule: none | progressive | random | decay | exp_decay.")
    size: int = _f(4, "Window size in steps (MixGRPO's w).")
    shift_every: int = _f(25, "Iterations per window position (MixGRPO iters_per_group; the maximum for decay schedules).")
    min_shift_every: int = _f(5, "decay / exp_decay: iterations per position never drop below this.")
    stride: int = _f(1, "Steps the window moves per shift.")
    decay_rate: float = _f(0.5, "exp_decay: shift_every * exp(-decay_rate * max(0, start - decay_start)).")
    decay_start: int = _f(0, "exp_decay: window start after which the interval starts to decay.")
    roll_back: bool = _f(True, "After the last position, start again from step 0 (MixGRPO roll_back); false stays at the end.")


@dataclass
class SamplingConfig:
    num_steps: int = _f(10, "Denoising steps per rollout (T).")
    sampler: str = _f("flow_grpo", "SDE used for rollouts: flow_grpo | dance | cps.")
    noise_level: float = _f(0.7, "SDE noise level a (Flow-GRPO a, DanceGRPO eta, CPS a).")
    group_size: int = _f(8, "Samples per prompt (G); a group may span ranks.")
    guidance_scale: float = _f(1.0, "Classifier-free guidance scale for rollouts and evaluation (1 = off).")
    negative_prompt: str = _f("", "Negative prompt used for classifier-free guidance when guidance_scale > 1.")
    sde_window: list[int] | None = _f(None, "[start, end) steps that use the SDE, ODE elsewhere (MixGRPO, BranchGRPO-Mix); null = all steps.")
    timestep_fraction: float = _f(1.0, "Fraction of SDE steps trained (the first ones), as Flow-GRPO's timestep_fraction.")
    window: WindowConfig = _f(factory=WindowConfig, help="MixGRPO sliding SDE window (replaces sde_window when strategy != none).")
    splits: list[list[int]] = _f(
        factory=list, help="BranchGRPO shared-prefix splits [[step, k], ...]: after step `step` every node spawns k SDE children. "
                           "group_size counts leaves: each prompt starts from group_size / prod(k) noises.")
    split_noise_level: float | None = _f(None, "Noise level at split steps (BranchGRPO's split noise scale); null = noise_level.")
    branch_steps: list[int] = _f(
        factory=list, help="TempFlow-GRPO: iteration i branches at branch_steps[i % len] into group_size SDE children from an "
                           "ODE trunk, finished by ODE (needs algorithm.advantage=tempflow).")


@dataclass
class AlgorithmConfig:
    advantage: str = _f("group", "Advantage estimator by name: group (Flow-GRPO / DanceGRPO, groups gathered across ranks) | "
                                 "branch (BranchGRPO) | tempflow (TempFlow-GRPO) | dense (DenseGRPO) | vgpo (VGPO); see `flowalign ls advantages`.")
    std_mode: str = _f("group", "Advantage normalisation: group | global | none.")
    adv_clip: float = _f(5.0, "Clip advantages to [-adv_clip, adv_clip]; 0 disables.")
    loss: str = _f("ppo_clip", "Policy loss by name (flowalign.losses.LOSSES).")
    clip_range: float = _f(1e-4, "PPO ratio clip epsilon (Flow-GRPO uses 1e-4 for SD3.5).")
    kl_beta: float = _f(0.0, "Weight of the KL on transition means against the reference policy.")
    ratio_tolerance: float = _f(1e-5, "Max |ratio - 1| allowed at the first inner step (on-policy check).")
    reward_normalization: str = _f(
        "sum", "Several rewards: 'sum' normalises the weighted sum in each group (default); 'decoupled' normalises each "
               "reward in its group first, then sums with the weights and renormalises (multi-reward decoupled).")
    fusion: str = _f("mean", "branch: node value from descendant leaves: mean | logprob_softmax (path-probability weighted).")
    fusion_temperature: float = _f(1.0, "branch, fusion=logprob_softmax: temperature of the softmax.")
    prune: str = _f("none", "branch: width pruning of trained edges: none | best_worst | fraction.")
    prune_keep: float = _f(0.5, "branch: prune=fraction keeps this fraction per branch; prune=best_worst keeps this many best/worst paths.")
    depth_prune_window: int = _f(0, "branch: sliding depth pruning, depths left untrained per iteration; 0 disables.")
    depth_prune_stride: int = _f(1, "branch: steps the depth-pruning window moves per iteration.")
    noise_aware: bool = _f(True, "tempflow: weight each step's loss by std_t * sqrt(dt) (noise-aware policy weighting).")
    lookahead_steps: int = _f(0, "dense / vgpo: ODE steps from a node to its clean image (0 = all remaining steps, DenseGRPO; "
                                 "1 = one-step projection, VGPO).")
    calibrate_noise: bool = _f(False, "dense: reward-aware calibration of each step's noise level psi(t) (DenseGRPO Alg. 1), "
                                      "updated online every iteration and logged (the paper calibrates before training, then fixes it).")
    calibration_rate: float = _f(0.01, "dense: psi(t) step per iteration (DenseGRPO's epsilon_2).")
    calibration_margin: float = _f(2.0, "dense: |#gains>0 - #gains<0| below this counts as balanced -> raise psi(t) (epsilon_1).")
    discount: float = _f(0.9, "vgpo: discount gamma of the action values Q_t (our choice; the paper's value is not public).")
    value_anchor: float = _f(0.5, "vgpo: k in alpha = k * std, the absolute-value anchor that survives collapsed groups.")
    anchor_steps: int | None = _f(None, "vgpo: the anchor applies to the first N steps only (VGPO uses 5 of 10); null = all.")


@dataclass
class OptimizerConfig:
    _component_: str = _f("torch.optim.AdamW", "Optimizer class path.")
    lr: float = _f(1e-4, "Learning rate.")
    weight_decay: float = _f(1e-4, "Decoupled weight decay.")
    betas: list[float] = _f(factory=lambda: [0.9, 0.999], help="Adam betas.")
    eps: float = _f(1e-8, "Adam epsilon.")


@dataclass
class TrainConfig:
    iterations: int = _f(100, "Sampling + update iterations.")
    optimizer: OptimizerConfig = _f(factory=OptimizerConfig, help="Optimizer settings.")
    steps_per_iter: int = _f(2, "Optimizer steps per iteration; the trained edges are split evenly among them.")
    micro_batch_size: int = _f(64, "Edges per forward/backward pass (gradient accumulation inside a step).")
    grad_clip: float = _f(1.0, "Max gradient norm; 0 disables clipping.")
    mixed_precision: str = _f("no", "Autocast precision for model calls: no | bf16 | fp16.")
    ema_decay: float = _f(0.0, "EMA decay of the trained weights; 0 disables EMA.")
    checkpoint_every: int = _f(50, "Save an atomic checkpoint every N iterations (and at the end); 0 = only at the end.")
    keep_checkpoints: int = _f(2, "Number of recent checkpoints kept on disk.")
    resume: str = _f("auto", "auto (resume from output_dir if a checkpoint exists) | never | a checkpoint path.")


@dataclass
class EvalConfig:
    prompts: str = _f("assets/prompts/digits_eval.txt", "Held-out prompt file (never trained on).")
    samples_per_prompt: int = _f(8, "ODE samples per held-out prompt.")
    num_steps: int = _f(10, "ODE steps for evaluation.")
    every: int = _f(10, "Evaluate every N iterations (plus before training and at the end); 0 = only those two.")
    judges: list[dict[str, Any]] = _f(
        factory=list, help="Independent scorers never trained on (same spec format as `rewards`); reported, never optimised."
    )
    grid_prompts: int = _f(10, "Held-out prompts shown in the before/after image grid.")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "Write TensorBoard event files to output_dir/tensorboard.")
    wandb_project: str | None = _f(None, "Also log to this Weights & Biases project (needs the wandb extra).")
    progress: bool = _f(True, "Show progress bars.")


@dataclass
class RLConfig:
    """A sampled-trajectory policy-gradient run (Flow-GRPO / DanceGRPO and presets built on them)."""

    recipe: str = _f("rl", "Training recipe: rl (policy gradient on sampled transitions) | awm (advantage-weighted flow matching on the sampled finals) | dllm (masked-diffusion LMs; its own schema, flowalign.dllm.config).")
    seed: int = _f(0, "Seed of every random stream (rollout noise, prompt order, initialisation).")
    output_dir: str = _f("runs/quickstart", "Run directory: checkpoints, metrics.jsonl, pictures, final weights.")
    device: str = _f("auto", "auto (accelerate's choice) | cpu.")
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


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _omegaconf_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    return ConfigError(f"{key}: {msg} (in {source})")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[1,2]"]`` -> ``[("a.b", 1), ("c", [1, 2])]`` (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        parsed.append((key.strip(), _yaml_value(value)))
    return parsed


def _yaml_value(text: str) -> Any:
    """Parse an override value as YAML (``2`` -> int, ``[1,2]`` -> list); unparsable text stays a string."""
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def load_config(
    source: str | os.PathLike | dict | Any,
    overrides: Sequence[str] | dict[str, Any] = (),
    *,
    check_files: bool = True,
    world_size: int = 1,
) -> Any:
    """Load a YAML file (or dict / config dataclass), apply overrides, type-check and validate.

    The ``recipe`` key (in the source or an override) picks the schema: :class:`RLConfig` for the
    image/video recipes, or the class :data:`SCHEMAS` names (``recipe: dllm`` -> ``DLLMConfig``).

    Args:
        source: path to a YAML file, a nested dict, or a config dataclass instance.
        overrides: ``["train.iterations=2", ...]`` or ``{"train.iterations": 2}``.
        check_files: verify that referenced files exist (the ``validate`` command and ``train`` do).
        world_size: number of processes, for the batch arithmetic checks.
    Raises:
        ConfigError: naming the offending key or file.
    """
    if is_dataclass(source) and not isinstance(source, type):
        loaded, where = OmegaConf.structured(source), type(source).__name__
    elif isinstance(source, dict):
        loaded, where = OmegaConf.create(source), "dict"
    else:
        where = os.fspath(source)
        if not os.path.isfile(where):
            raise ConfigError(f"config file not found: {where!r}")
        try:
            loaded = OmegaConf.load(where)
        except Exception as err:  # yaml syntax errors
            raise ConfigError(f"{where}: cannot parse YAML: {err}") from err
    items = list(overrides.items()) if isinstance(overrides, dict) else parse_overrides(overrides)
    recipe = dict(items).get("recipe", loaded.get("recipe", "rl") if OmegaConf.is_dict(loaded) else "rl")
    schema = config_schema(str(recipe))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), loaded)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, where) from err

    for key, value in items:
        try:
            if not _key_exists(merged, key):
                raise ConfigError(f"{key}: unknown key (override {key}={value!r}); see `flowalign validate --explain`")
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, f"override {key}={value!r}") from err
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, where) from err
    if isinstance(cfg, RLConfig):
        validate_config(cfg, check_files=check_files, world_size=world_size)
    else:
        cfg.validate(check_files=check_files, world_size=world_size)
    return cfg


def config_schema(recipe: str) -> type:
    """The config dataclass of a recipe: :class:`RLConfig` unless :data:`SCHEMAS` names another."""
    if recipe not in SCHEMAS:
        return RLConfig  # an unknown recipe name is reported by validate_config, naming the key
    return import_path(SCHEMAS[recipe], "recipe")


def import_path(path: str, key: str) -> Any:
    """The object a ``package.module.Name`` or ``package.module:Name`` path names; a ValueError
    starting with ``key`` when it cannot be imported."""
    import importlib

    module_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{key}: cannot import {path!r}: {err}") from err


def _key_exists(conf: Any, key: str) -> bool:
    node = conf
    for part in key.split("."):
        if OmegaConf.is_list(node):
            if not part.isdigit() or int(part) >= len(node):
                return False
            node = node[int(part)]
        elif OmegaConf.is_dict(node):
            # free-form dicts (reward specs) accept new keys; structured ones do not
            if part not in node and OmegaConf.get_type(node) is not dict:
                return False
            if part not in node:
                return True
            node = node[part]
        else:
            return False
    return True


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _require_file(path: str, key: str) -> None:
    _require(os.path.exists(path), key, f"file or folder not found: {path!r} (relative paths resolve against {os.getcwd()!r})")


def validate_config(cfg: RLConfig, *, check_files: bool = True, world_size: int = 1) -> None:
    """Semantic checks that types cannot express; each error names its key."""
    s, t, a, e = cfg.sampling, cfg.train, cfg.algorithm, cfg.eval
    _require(cfg.recipe in RECIPES, "recipe", f"unknown recipe {cfg.recipe!r}; available: {sorted(RECIPES)}")
    if cfg.recipe == "awm":
        _require(a.loss == "awm", "algorithm.loss", f"the awm recipe trains the 'awm' loss, got {a.loss!r}")
    _require(cfg.device in ("auto", "cpu"), "device", f"must be 'auto' or 'cpu', got {cfg.device!r}")
    _require(cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"unsupported dtype {cfg.model.dtype!r}")
    _require(cfg.model.lora_rank >= 0, "model.lora_rank", "must be >= 0")
    _require(s.num_steps >= 1, "sampling.num_steps", "must be >= 1")
    _require(s.sampler in ("flow_grpo", "dance", "cps"), "sampling.sampler", f"unknown sampler {s.sampler!r}; use flow_grpo | dance | cps")
    _require(s.noise_level > 0, "sampling.noise_level", "must be > 0 (policy-gradient training needs stochastic steps)")
    _require(s.group_size >= 2, "sampling.group_size", "must be >= 2 (group-relative advantages need several samples)")
    _require(0 < s.timestep_fraction <= 1, "sampling.timestep_fraction", "must be in (0, 1]")
    if s.sde_window is not None:
        _require(len(s.sde_window) == 2 and 0 <= s.sde_window[0] < s.sde_window[1] <= s.num_steps,
                 "sampling.sde_window", f"must be [start, end) with 0 <= start < end <= num_steps={s.num_steps}")
    _validate_tree_sampling(cfg, world_size)
    _require(s.group_size % world_size == 0, "sampling.group_size",
             f"group_size={s.group_size} must be divisible by the number of processes ({world_size}): each rank samples group_size / world_size per prompt")
    _require(cfg.data.prompts_per_iter >= 1, "data.prompts_per_iter", "must be >= 1")
    _require(a.std_mode in ("group", "global", "none"), "algorithm.std_mode", f"unknown std_mode {a.std_mode!r}")
    _require(a.clip_range > 0, "algorithm.clip_range", "must be > 0")
    _require(a.kl_beta >= 0, "algorithm.kl_beta", "must be >= 0")
    _require(t.iterations >= 1, "train.iterations", "must be >= 1")
    _require(t.steps_per_iter >= 1, "train.steps_per_iter", "must be >= 1")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    _require(t.mixed_precision in ("no", "bf16", "fp16"), "train.mixed_precision", f"unknown precision {t.mixed_precision!r}")
    _require(0 <= t.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
    _require(t.optimizer.lr > 0, "train.optimizer.lr", "must be > 0")
    # rl trains every trained step's edge; awm trains each sampled final once per iteration
    per_sample, unit = (1, "samples") if cfg.recipe == "awm" or s.branch_steps else (num_trained_steps(s), "edges")
    trained_per_rank = cfg.data.prompts_per_iter * (s.group_size // world_size) * per_sample
    _require(trained_per_rank >= t.steps_per_iter, "train.steps_per_iter",
             f"{t.steps_per_iter} optimizer steps but only {trained_per_rank} trained {unit} per rank per iteration "
             f"(prompts_per_iter x group_size / world_size" + (" x trained steps)" if unit == "edges" else ")"))
    _require(e.samples_per_prompt >= 1 and e.num_steps >= 1, "eval.samples_per_prompt", "samples_per_prompt and num_steps must be >= 1")
    _require(len(cfg.rewards) >= 1, "rewards", "at least one reward is needed")
    for i, spec in enumerate(cfg.rewards):
        _require(isinstance(spec, dict) and "_component_" in spec, f"rewards[{i}]", "needs a _component_ (reward name or 'module:Class')")
    for i, spec in enumerate(e.judges):
        _require(isinstance(spec, dict) and "_component_" in spec, f"eval.judges[{i}]", "needs a _component_")
    if check_files:
        from flowalign.pipelines import ADAPTERS, load_adapter_class
        from flowalign.rewards.registry import resolve_reward_class

        for key, resolve, name in [("model._component_", load_adapter_class, cfg.model._component_)] + [
            (f"{group}[{i}]._component_", resolve_reward_class, spec["_component_"])
            for group, specs in (("rewards", cfg.rewards), ("eval.judges", e.judges))
            for i, spec in enumerate(specs)
            if isinstance(spec["_component_"], str)
        ]:
            try:
                resolve(name)
            except ValueError as err:
                raise ConfigError(f"{key}: {err}") from err

        if cfg.model._component_ in ADAPTERS and not _looks_like_hub_id(cfg.model.pretrained):
            _require_file(cfg.model.pretrained, "model.pretrained")
        _require_file(cfg.data.train_prompts, "data.train_prompts")
        _require_file(e.prompts, "eval.prompts")
        for i, spec in enumerate(cfg.rewards):
            if isinstance(spec.get("path"), str) and not _looks_like_hub_id(spec["path"]):
                _require_file(spec["path"], f"rewards[{i}].path")
        n_eval = len(read_prompts(e.prompts, "eval.prompts")) * e.samples_per_prompt
        _require(n_eval % world_size == 0, "eval.samples_per_prompt",
                 f"{n_eval} held-out samples cannot be split evenly over {world_size} processes")
        read_prompts(cfg.data.train_prompts, "data.train_prompts")


def _validate_tree_sampling(cfg: RLConfig, world_size: int) -> None:
    """Checks of the tree / window presets (BranchGRPO, TempFlow-GRPO, MixGRPO, DenseGRPO, VGPO)."""
    from flowalign.advantages import ADVANTAGE_ESTIMATORS
    from flowalign.estimators.presets import EDGE_ESTIMATORS
    from flowalign.rollout.schedules import WINDOW_STRATEGIES

    s, a, w = cfg.sampling, cfg.algorithm, cfg.sampling.window
    names = sorted(ADVANTAGE_ESTIMATORS) + sorted(EDGE_ESTIMATORS)
    _require(a.advantage in names, "algorithm.advantage", f"unknown estimator {a.advantage!r}; available: {names}")
    _require(a.reward_normalization in ("sum", "decoupled"), "algorithm.reward_normalization",
             f"must be 'sum' or 'decoupled', got {a.reward_normalization!r}")
    _require(a.fusion in ("mean", "logprob_softmax"), "algorithm.fusion", f"must be mean | logprob_softmax, got {a.fusion!r}")
    _require(a.prune in ("none", "best_worst", "fraction"), "algorithm.prune", f"must be none | best_worst | fraction, got {a.prune!r}")
    _require(0 <= a.depth_prune_window < s.num_steps, "algorithm.depth_prune_window", f"must be in [0, num_steps={s.num_steps})")
    _require(w.strategy in WINDOW_STRATEGIES, "sampling.window.strategy", f"unknown strategy {w.strategy!r}; use one of {list(WINDOW_STRATEGIES)}")
    if w.strategy != "none":
        _require(s.sde_window is None, "sampling.window.strategy", "a moving window replaces sampling.sde_window; set one of them")
        _require(1 <= w.size <= s.num_steps, "sampling.window.size", f"must be in [1, num_steps={s.num_steps}]")
        _require(w.shift_every >= 1 and w.min_shift_every >= 1 and w.stride >= 1, "sampling.window.shift_every",
                 "shift_every, min_shift_every and stride must be >= 1")
    leaves_per_root = 1
    for i, pair in enumerate(s.splits):
        _require(len(pair) == 2 and 0 <= pair[0] < s.num_steps and pair[1] >= 1, f"sampling.splits[{i}]",
                 f"must be [step, k] with 0 <= step < num_steps={s.num_steps} and k >= 1, got {pair}")
        leaves_per_root *= pair[1]
        if s.sde_window is not None:
            _require(s.sde_window[0] <= pair[0] < s.sde_window[1], f"sampling.splits[{i}]",
                     f"split step {pair[0]} lies outside sampling.sde_window {s.sde_window} (a split needs an SDE step)")
    _require(len({p[0] for p in s.splits}) == len(s.splits), "sampling.splits", "lists a step more than once")
    if s.splits:
        _require(w.strategy == "none", "sampling.splits", "BranchGRPO splits are fixed steps; they cannot follow a moving window")
        per_rank = s.group_size // world_size
        _require(per_rank % leaves_per_root == 0, "sampling.group_size",
                 f"{per_rank} leaves per prompt per rank (group_size / processes) is not a multiple of the {leaves_per_root} "
                 "leaves each initial noise grows through sampling.splits")
    if s.branch_steps:
        _require(a.advantage == "tempflow", "sampling.branch_steps", "TempFlow branching needs algorithm.advantage=tempflow")
        _require(all(0 <= k < s.num_steps for k in s.branch_steps), "sampling.branch_steps", f"steps must be in [0, num_steps={s.num_steps})")
        _require(not s.splits and w.strategy == "none" and s.sde_window is None, "sampling.branch_steps",
                 "TempFlow branching cannot be combined with splits or SDE windows")
    if a.advantage == "tempflow":
        _require(bool(s.branch_steps), "algorithm.advantage", "tempflow needs sampling.branch_steps")
    if a.advantage in ("dense", "vgpo"):
        _require(not s.splits and not s.branch_steps, "algorithm.advantage", f"{a.advantage} trains flat groups; remove sampling.splits / branch_steps")
    _require(a.lookahead_steps >= 0, "algorithm.lookahead_steps", "must be >= 0")
    _require(not a.calibrate_noise or a.advantage == "dense", "algorithm.calibrate_noise", "needs algorithm.advantage=dense")
    _require(a.calibration_rate > 0 and a.calibration_margin > 0, "algorithm.calibration_rate", "rate and margin must be > 0")
    _require(0 <= a.discount <= 1, "algorithm.discount", "must be in [0, 1]")
    if cfg.recipe == "awm":
        _require(a.advantage == "group", "algorithm.advantage", "the awm recipe weights whole samples: use the 'group' estimator")


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


def _looks_like_hub_id(path: str) -> bool:
    return not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "/"))


def read_prompt_records(path: str, key: str = "prompts") -> list[dict[str, Any]]:
    """Prompt records of a prompt file, each ``{"prompt": str, **metadata}``.

    ``.txt``: one prompt per non-empty line (``#`` starts a comment line). ``.jsonl``: one JSON
    object per line with a ``"prompt"`` string; the other keys are the prompt's metadata, handed to
    rewards that need it (e.g. GenEval's ``{"tag": ..., "include": [...]}``). Errors name ``key``.
    """
    import json

    _require_file(path, key)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not path.endswith(".jsonl"):
                records.append({"prompt": line.strip()})
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{key}: {path}:{number} is not valid JSON ({err.msg})") from err
            _require(isinstance(record, dict) and isinstance(record.get("prompt"), str), key,
                     f"{path}:{number} needs a \"prompt\" string")
            records.append(record)
    _require(len(records) > 0, key, f"{path!r} contains no prompts")
    return records


def read_prompts(path: str, key: str = "prompts") -> list[str]:
    """The prompt strings of a prompt file (see :func:`read_prompt_records`)."""
    return [r["prompt"] for r in read_prompt_records(path, key)]


def explain(cls: type = RLConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, help)`` rows for every field, recursively (for ``validate --explain``)."""
    rows = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
        if is_dataclass(default):
            rows.append((key, "", f.metadata.get("help", "")))
            rows.extend(explain(type(default), key + "."))
        else:
            rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (saved beside every run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
