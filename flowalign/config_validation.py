"""Semantic validation of a loaded config, the checks types cannot express: those every recipe
shares (:func:`validate_common`) and those of an image / video RL run (:func:`validate_config`)."""

from __future__ import annotations

from typing import Any

from flowalign.config_checks import _require, _require_choice, check_fields
from flowalign.config_components import _resolve_adapter, check_component_spec, optimizer_kwargs
from flowalign.config_files import _looks_like_hub_id, _require_file, check_output_dir, check_resume, read_prompts
from flowalign.config_schema import RECIPES, SCHEMAS, RLConfig, num_trained_steps


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def validate_common(cfg: Any, *, check_files: bool = True) -> None:
    """Checks every recipe's config shares: field ranges and choices (:func:`check_fields`), the
    optimizer and its arguments, ``train.resume`` and (with ``check_files``) ``output_dir``."""
    check_fields(cfg)
    o = cfg.train.optimizer
    _require(len(o.betas) == 2, "train.optimizer.betas", f"must be [beta1, beta2], got {o.betas}")
    optimizer_kwargs(o)
    check_resume(cfg.train.resume, check_files=check_files)
    if check_files:
        check_output_dir(cfg.output_dir)


def validate_config(cfg: RLConfig, *, check_files: bool = True, world_size: int = 1) -> None:
    """Semantic checks that types cannot express; each error names its key."""
    from flowalign.losses import LOSSES

    s, t, a, e = cfg.sampling, cfg.train, cfg.algorithm, cfg.eval
    _require_choice(cfg.recipe, list(RECIPES), "recipe", "recipe")
    _require(cfg.recipe not in SCHEMAS, "recipe", f"the {cfg.recipe!r} recipe has its own schema ({SCHEMAS.get(cfg.recipe)}): "
                                                  "load it with load_config")
    validate_common(cfg, check_files=check_files)
    if cfg.recipe == "awm":
        _require(a.loss == "awm", "algorithm.loss", f"the awm recipe trains the 'awm' loss, got {a.loss!r}")
    else:
        _require(a.loss != "awm", "algorithm.loss", "'awm' is the loss of the awm recipe: set recipe=awm, or loss=ppo_clip")
        _require_choice(a.loss, [n for n in LOSSES if n != "awm"], "algorithm.loss", "loss")
    if s.sde_window is not None:
        _require(len(s.sde_window) == 2 and 0 <= s.sde_window[0] < s.sde_window[1] <= s.num_steps,
                 "sampling.sde_window", f"must be [start, end) with 0 <= start < end <= num_steps={s.num_steps}, got {s.sde_window}")
    _validate_tree_sampling(cfg, world_size)
    _require(s.group_size % world_size == 0, "sampling.group_size",
             f"group_size={s.group_size} must be divisible by the number of processes ({world_size}): each rank samples group_size / world_size per prompt")
    # rl trains every trained step's edge; awm trains each sampled final once per iteration
    per_sample, unit = (1, "samples") if cfg.recipe == "awm" or s.branch_steps else (num_trained_steps(s), "edges")
    trained_per_rank = cfg.data.prompts_per_iter * (s.group_size // world_size) * per_sample
    _require(trained_per_rank >= t.steps_per_iter, "train.steps_per_iter",
             f"{t.steps_per_iter} optimizer steps but only {trained_per_rank} trained {unit} per rank per iteration "
             f"(prompts_per_iter x group_size / world_size" + (" x trained steps)" if unit == "edges" else ")"))
    _require(len(cfg.rewards) >= 1, "rewards", "at least one reward is needed")
    specs = [(f"rewards[{i}]", spec) for i, spec in enumerate(cfg.rewards)]
    specs += [(f"eval.judges[{i}]", spec) for i, spec in enumerate(e.judges)]
    for key, spec in specs:
        check_component_spec(spec, key, resolve=False)
    if not check_files:
        return
    from flowalign.pipelines import ADAPTERS

    _resolve_adapter(cfg.model._component_)
    for key, spec in specs:
        check_component_spec(spec, key, resolve=True)
    if cfg.model._component_ in ADAPTERS and not _looks_like_hub_id(cfg.model.pretrained):
        _require_file(cfg.model.pretrained, "model.pretrained")
    read_prompts(cfg.data.train_prompts, "data.train_prompts")
    n_eval = len(read_prompts(e.prompts, "eval.prompts")) * e.samples_per_prompt
    _require(n_eval % world_size == 0, "eval.samples_per_prompt",
             f"{n_eval} held-out samples cannot be split evenly over {world_size} processes")


def _validate_tree_sampling(cfg: RLConfig, world_size: int) -> None:
    """Checks of the tree / window presets (BranchGRPO, TempFlow-GRPO, MixGRPO, DenseGRPO, VGPO)."""
    from flowalign.advantages import ADVANTAGE_ESTIMATORS
    from flowalign.estimators.presets import EDGE_ESTIMATORS
    from flowalign.rollout.schedules import WINDOW_STRATEGIES

    s, a, w = cfg.sampling, cfg.algorithm, cfg.sampling.window
    _require_choice(a.advantage, sorted(ADVANTAGE_ESTIMATORS) + sorted(EDGE_ESTIMATORS), "algorithm.advantage", "estimator")
    _require(a.depth_prune_window < s.num_steps, "algorithm.depth_prune_window", f"must be in [0, num_steps={s.num_steps})")
    if a.prune == "fraction":
        _require(a.prune_keep <= 1, "algorithm.prune_keep", f"prune=fraction keeps a fraction in (0, 1], got {a.prune_keep}")
    _require_choice(w.strategy, list(WINDOW_STRATEGIES), "sampling.window.strategy", "strategy")
    if w.strategy != "none":
        _require(s.sde_window is None, "sampling.window.strategy", "a moving window replaces sampling.sde_window; set one of them")
        _require(w.size <= s.num_steps, "sampling.window.size", f"must be in [1, num_steps={s.num_steps}]")
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
        _require(all(k < s.num_steps for k in s.branch_steps), "sampling.branch_steps", f"steps must be in [0, num_steps={s.num_steps})")
        _require(not s.splits and w.strategy == "none" and s.sde_window is None, "sampling.branch_steps",
                 "TempFlow branching cannot be combined with splits or SDE windows")
    if a.advantage == "tempflow":
        _require(bool(s.branch_steps), "algorithm.advantage", "tempflow needs sampling.branch_steps")
    if a.advantage in ("dense", "vgpo"):
        _require(not s.splits and not s.branch_steps, "algorithm.advantage", f"{a.advantage} trains flat groups; remove sampling.splits / branch_steps")
    _require(not a.calibrate_noise or a.advantage == "dense", "algorithm.calibrate_noise", "needs algorithm.advantage=dense")
    if cfg.recipe == "awm":
        _require(a.advantage == "group", "algorithm.advantage", "the awm recipe weights whole samples: use the 'group' estimator")
