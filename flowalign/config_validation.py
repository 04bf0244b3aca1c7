"""Semantic validation of a loaded config, the checks types cannot express: those every recipe
shares (:func:`validate_common`) and those of an image / video RL run (:func:`validate_config`)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from flowalign.config_checks import _require, _require_choice, check_fields
from flowalign.config_components import _resolve_adapter, check_component_spec, optimizer_kwargs
from flowalign.config_files import _looks_like_hub_id, _require_file, check_output_dir, check_resume, read_prompts
from flowalign.config_schema import RECIPES, SCHEMAS, RLConfig
from flowalign.errors import ConfigError


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def validate_common(cfg: Any, *, check_files: bool = True, optimizer_steps: int | None = None) -> None:
    """Checks every recipe's config shares: field ranges and choices (:func:`check_fields`), the
    optimizer and its arguments, the LR schedule (over ``optimizer_steps`` steps in all),
    ``train.resume`` and (with ``check_files``) ``output_dir``."""
    from flowalign.training.lr_schedules import check_lr_scheduler

    check_fields(cfg)
    o = cfg.train.optimizer
    _require(len(o.betas) == 2, "train.optimizer.betas", f"must be [beta1, beta2], got {o.betas}")
    optimizer_kwargs(o)
    s = cfg.train.lr_scheduler
    check_lr_scheduler(s._component_, warmup_steps=s.warmup_steps, min_lr_ratio=s.min_lr_ratio, kwargs=s.kwargs,
                       total_steps=optimizer_steps if optimizer_steps is not None else cfg.train.iterations)
    check_resume(cfg.train.resume, check_files=check_files)
    if check_files:
        check_output_dir(cfg.output_dir)


def check_algorithm_nodes(algorithm: Any, name: str) -> None:
    """Only the chosen algorithm's own node may differ from its defaults: a field set under another
    algorithm's node would be silently ignored.

    Raises:
        ConfigError: naming the first such field, e.g. ``algorithm.branch_grpo.prune``.
    """
    for f in fields(algorithm):
        node = getattr(algorithm, f.name)
        if f.name == name or not is_dataclass(node):
            continue
        default = type(node)()
        for sub in fields(node):
            if getattr(node, sub.name) != getattr(default, sub.name):
                raise ConfigError(f"algorithm.{f.name}.{sub.name}: only used by algorithm.name={f.name}, but the run's "
                                  f"algorithm is {name!r}; set algorithm.name={f.name} or remove the key")


def _check_flat_rollout_options(cfg: RLConfig, algorithm: Any) -> None:
    """DanceGRPO's rollout options (``sampling.train_steps: random_subset``, ``init_same_noise``,
    ``final_sample: predicted_x0``) shape the flat groups of :meth:`FlowAlgorithm.rollout_spec`; an
    algorithm that builds its own rollouts (TempFlow-GRPO) would ignore them, and a per-sample step
    subset has no meaning on shared-prefix trees (BranchGRPO's splits)."""
    from flowalign.algorithms.flow import FlowAlgorithm

    s = cfg.sampling
    if not issubclass(algorithm, FlowAlgorithm):
        return
    used = [key for key, on in (("sampling.train_steps", s.train_steps != "first"),
                                ("sampling.init_same_noise", bool(s.init_same_noise)),
                                ("sampling.final_sample", s.final_sample != "sde")) if on]
    if used and algorithm.rollout_spec is not FlowAlgorithm.rollout_spec:
        _require(False, used[0], f"{algorithm.name} builds its own rollouts and would ignore {', '.join(used)}; "
                                 "these DanceGRPO options apply to flat groups (grpo, mix_grpo, dense_grpo, ...)")
    if s.train_steps == "random_subset":
        _require(algorithm.splits is FlowAlgorithm.splits, "sampling.train_steps",
                 f"random_subset draws steps per sample of a flat group; {algorithm.name} samples shared-prefix trees")


def validate_config(cfg: RLConfig, *, check_files: bool = True, world_size: int = 1) -> None:
    """Semantic checks that types cannot express; each error names its key."""
    from flowalign.algorithms import get_algorithm

    s, t, a, e = cfg.sampling, cfg.train, cfg.algorithm, cfg.eval
    _require_choice(cfg.recipe, list(RECIPES), "recipe", "recipe")
    _require(cfg.recipe not in SCHEMAS, "recipe", f"the {cfg.recipe!r} recipe has its own schema ({SCHEMAS.get(cfg.recipe)}): "
                                                  "load it with load_config")
    algorithm = get_algorithm(a.name, recipes=(cfg.recipe,))
    validate_common(cfg, check_files=check_files, optimizer_steps=t.iterations * t.steps_per_iter)
    check_algorithm_nodes(a, a.name)
    if s.sde_window is not None:
        _require(len(s.sde_window) == 2 and 0 <= s.sde_window[0] < s.sde_window[1] <= s.num_steps,
                 "sampling.sde_window", f"must be [start, end) with 0 <= start < end <= num_steps={s.num_steps}, got {s.sde_window}")
    by_prompt = getattr(algorithm, "shard_by", "group") == "prompt"
    if by_prompt:  # whole groups per rank (flowalign.rollout.Shard)
        _require(cfg.data.prompts_per_iter % world_size == 0, "data.prompts_per_iter",
                 f"prompts_per_iter={cfg.data.prompts_per_iter} must be divisible by the number of processes ({world_size}): "
                 f"{a.name} places each prompt's whole group on one rank")
    else:
        _require(s.group_size % world_size == 0, "sampling.group_size",
                 f"group_size={s.group_size} must be divisible by the number of processes ({world_size}): each rank samples group_size / world_size per prompt")
    algorithm.check(cfg, world_size)
    _check_flat_rollout_options(cfg, algorithm)
    per_sample, unit = algorithm.trained_units(cfg)
    trained_per_rank = (cfg.data.prompts_per_iter // (world_size if by_prompt else 1)) * (s.group_size // (1 if by_prompt else world_size)) * per_sample
    _require(trained_per_rank >= t.steps_per_iter, "train.steps_per_iter",
             f"{t.steps_per_iter} optimizer steps but only {trained_per_rank} trained {unit} per rank per iteration "
             + ("(prompts_per_iter / world_size x group_size" if by_prompt else "(prompts_per_iter x group_size / world_size")
             + (" x trained steps)" if unit == "edges" else ")"))
    _require(len(cfg.rewards) >= 1, "rewards", "at least one reward is needed")
    specs = [(f"rewards[{i}]", spec) for i, spec in enumerate(cfg.rewards)]
    specs += [(f"eval.judges[{i}]", spec) for i, spec in enumerate(e.judges)]
    for key, spec in specs:
        check_component_spec(spec, key, resolve=False)
    if not check_files:
        return
    from flowalign.pipelines import ADAPTERS

    adapter_cls = _resolve_adapter(cfg.model._component_)
    for key, spec in specs:
        check_component_spec(spec, key, resolve=True)
    if cfg.model._component_ in ADAPTERS and not _looks_like_hub_id(cfg.model.pretrained):
        _require_file(cfg.model.pretrained, "model.pretrained")
    read_prompts(cfg.data.train_prompts, "data.train_prompts")
    n_eval = len(read_prompts(e.prompts, "eval.prompts")) * e.samples_per_prompt
    _require(n_eval % world_size == 0, "eval.samples_per_prompt",
             f"{n_eval} held-out samples cannot be split evenly over {world_size} processes")
    if getattr(adapter_cls, "source_images", 0):  # an editing model: JSONL records with existing source image(s)
        from flowalign.data.images import check_image_records

        for key, path in (("data.train_prompts", cfg.data.train_prompts), ("eval.prompts", e.prompts)):
            check_image_records(path, key, adapter_cls.source_images, cfg.model._component_)

