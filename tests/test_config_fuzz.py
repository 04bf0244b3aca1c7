"""Config fuzzing through the CLI: well over 100 invalid mutations of the shipped quickstart configs
(``configs/quickstart.yaml`` and ``configs/dllm/quickstart.yaml``), made with overrides and with
edited YAML files, each exit ``flowalign validate`` with status 2 and one line that starts with the
offending key (or file) -- never a traceback. Every shipped config validates, or fails the same
clean way naming a data file a user must provide.

The tests run from an empty temporary directory, so the relative config names (and their
``assets/...`` paths) are found through the project root (:func:`flowalign.config.resolve_path`),
and ``output_dir`` checks never touch the repository.
"""

from __future__ import annotations

import glob
import logging
import os
import re

import pytest
import yaml

from flowalign.cli import main
from flowalign.config import resolve_path
from tests.conftest import REPO

QUICK = "configs/quickstart.yaml"
DLLM = "configs/dllm/quickstart.yaml"
ERROR = "flowalign: config error: "

#: (config, overrides, the key the error must start with). ``{dir}``, ``{latin1}``, ``{empty}``,
#: ``{notjson}``, ``{file}`` are replaced by special files made in the temporary directory.
OVERRIDE_CASES: list[tuple[str, list[str], str]] = [
    # --- the examples of the issue
    (QUICK, ["train.optimizer.lr=.inf"], "train.optimizer.lr"),
    (QUICK, ["train.optimizer.weight_decay=-1"], "train.optimizer.weight_decay"),
    (QUICK, ["train.optimizer.betas=[2.0,0.5]"], "train.optimizer.betas[0]"),
    (QUICK, ["train.optimizer._component_=torch.optim.Banana"], "train.optimizer._component_"),
    (QUICK, ["train.keep_checkpoints=0"], "train.keep_checkpoints"),
    (QUICK, ["train.checkpoint_every=-1"], "train.checkpoint_every"),
    (QUICK, ["eval.every=-1"], "eval.every"),
    (QUICK, ["train.resume=banana"], "train.resume"),
    (QUICK, ["sampling.guidance_scale=-5"], "sampling.guidance_scale"),
    (QUICK, ["sampling.noise_level=.inf"], "sampling.noise_level"),
    (QUICK, ["algorithm.clip_range=.inf"], "algorithm.clip_range"),
    (QUICK, ["algorithm.adv_clip=-5"], "algorithm.adv_clip"),
    (QUICK, ["algorithm.ratio_tolerance=-1"], "algorithm.ratio_tolerance"),
    (QUICK, ["model.lora_alpha=-4"], "model.lora_alpha"),
    (QUICK, ["rewards.0.bogus_kw=3"], "rewards[0].bogus_kw"),
    (QUICK, ["rewards.0.weight=abc"], "rewards[0].weight"),
    (QUICK, ["output_dir=/proc/x"], "output_dir"),
    (QUICK, ["data.train_prompts={dir}"], "data.train_prompts"),
    (QUICK, ["data.train_prompts={latin1}"], "data.train_prompts"),
    # --- optimizer
    (QUICK, ["train.optimizer.lr=nan"], "train.optimizer.lr"),
    (QUICK, ["train.optimizer.lr=0"], "train.optimizer.lr"),
    (QUICK, ["train.optimizer.lr=-1e-4"], "train.optimizer.lr"),
    (QUICK, ["train.optimizer.weight_decay=.inf"], "train.optimizer.weight_decay"),
    (QUICK, ["train.optimizer.betas=[0.9]"], "train.optimizer.betas"),
    (QUICK, ["train.optimizer.betas=[0.9,-0.1]"], "train.optimizer.betas[1]"),
    (QUICK, ["train.optimizer.betas=[0.9,.nan]"], "train.optimizer.betas[1]"),
    (QUICK, ["train.optimizer.betas=0.9"], "train.optimizer.betas"),
    (QUICK, ["train.optimizer.eps=0"], "train.optimizer.eps"),
    (QUICK, ["train.optimizer.eps=-.inf"], "train.optimizer.eps"),
    (QUICK, ["train.optimizer._component_=torch.optim.adamw"], "train.optimizer._component_"),
    (QUICK, ["train.optimizer._component_=no_such_module.Opt"], "train.optimizer._component_"),
    (QUICK, ["train.optimizer._component_=collections.OrderedDict"], "train.optimizer._component_"),
    (QUICK, ["train.optimizer._component_=torch.optim.SGD", "train.optimizer.eps=1e-6"], "train.optimizer.eps"),
    (QUICK, ["train.optimizer._component_=torch.optim.SGD", "train.optimizer.betas=[0.8,0.9]"], "train.optimizer.betas"),
    (QUICK, ["train.optimizer.kwargs.momentum=0.9"], "train.optimizer.kwargs.momentum"),
    (QUICK, ["train.optimizer.kwargs.lr=0.1"], "train.optimizer.kwargs.lr"),
    (QUICK, ["train.optimizer.kwargs.amsgrad=.inf"], "train.optimizer.kwargs.amsgrad"),
    (QUICK, ["train.optimizer.learning_rate=0.1"], "train.optimizer.learning_rate"),
    # --- train
    (QUICK, ["train.resume=nevr"], "train.resume"),
    (QUICK, ["train.resume=."], "train.resume"),
    (QUICK, ["train.iterations=0"], "train.iterations"),
    (QUICK, ["train.iterations=many"], "train.iterations"),
    (QUICK, ["train.iteratons=3"], "train.iteratons"),
    (QUICK, ["train.steps_per_iter=0"], "train.steps_per_iter"),
    (QUICK, ["train.steps_per_iter=100000"], "train.steps_per_iter"),
    (QUICK, ["train.micro_batch_size=0"], "train.micro_batch_size"),
    (QUICK, ["train.grad_clip=-1"], "train.grad_clip"),
    (QUICK, ["train.grad_clip=.inf"], "train.grad_clip"),
    (QUICK, ["train.mixed_precision=bf17"], "train.mixed_precision"),
    (QUICK, ["train.ema_decay=1"], "train.ema_decay"),
    (QUICK, ["train.ema_decay=-0.5"], "train.ema_decay"),
    (QUICK, ["train=[1]"], "train"),
    # --- eval
    (QUICK, ["eval.samples_per_prompt=0"], "eval.samples_per_prompt"),
    (QUICK, ["eval.num_steps=0"], "eval.num_steps"),
    (QUICK, ["eval.grid_prompts=0"], "eval.grid_prompts"),
    (QUICK, ["eval.prompts=/missing.txt"], "eval.prompts"),
    (QUICK, ["eval.prompts={dir}"], "eval.prompts"),
    (QUICK, ["eval.prompts={latin1}"], "eval.prompts"),
    (QUICK, ["eval.prompts={empty}"], "eval.prompts"),
    (QUICK, ["eval.judges.0._component_=nosuchjudge"], "eval.judges[0]._component_"),
    (QUICK, ["eval.judges.0.bogus=1"], "eval.judges[0].bogus"),
    (QUICK, ["eval.judges.0.weight=.nan"], "eval.judges[0].weight"),
    (QUICK, ["eval.judges=[5]"], "eval.judges[0]"),
    # --- sampling
    (QUICK, ["sampling.guidance_scale=.inf"], "sampling.guidance_scale"),
    (QUICK, ["sampling.noise_level=0"], "sampling.noise_level"),
    (QUICK, ["sampling.noise_level=nan"], "sampling.noise_level"),
    (QUICK, ["sampling.sampler=flowgrpo"], "sampling.sampler"),
    (QUICK, ["sampling.sampler=euler"], "sampling.sampler"),
    (QUICK, ["sampling.num_steps=0"], "sampling.num_steps"),
    (QUICK, ["sampling.group_size=1"], "sampling.group_size"),
    (QUICK, ["sampling.timestep_fraction=1.5"], "sampling.timestep_fraction"),
    (QUICK, ["sampling.timestep_fraction=0"], "sampling.timestep_fraction"),
    (QUICK, ["sampling.sde_window=[4,2]"], "sampling.sde_window"),
    (QUICK, ["sampling.sde_window=[0,11]"], "sampling.sde_window"),
    (QUICK, ["sampling.sde_window=[-1,4]"], "sampling.sde_window[0]"),
    (QUICK, ["algorithm.name=branch_grpo", "algorithm.branch_grpo.split_noise_level=-1"], "algorithm.branch_grpo.split_noise_level"),
    (QUICK, ["algorithm.name=branch_grpo", "algorithm.branch_grpo.splits=[[12,2]]"], "algorithm.branch_grpo.splits[0]"),
    (QUICK, ["algorithm.name=branch_grpo", "algorithm.branch_grpo.splits=[[2,3]]"], "sampling.group_size"),
    (QUICK, ["algorithm.name=branch_grpo", "algorithm.branch_grpo.splits=[5]"], "algorithm.branch_grpo.splits[0]"),
    (QUICK, ["algorithm.tempflow_grpo.branch_steps=[1]"], "algorithm.tempflow_grpo.branch_steps"),
    (QUICK, ["algorithm.name=tempflow_grpo", "algorithm.tempflow_grpo.branch_steps=[10]"], "algorithm.tempflow_grpo.branch_steps"),
    (QUICK, ["algorithm.name=mix_grpo", "algorithm.mix_grpo.strategy=sideways"], "algorithm.mix_grpo.strategy"),
    (QUICK, ["algorithm.name=mix_grpo", "algorithm.mix_grpo.size=0"], "algorithm.mix_grpo.size"),
    (QUICK, ["algorithm.name=mix_grpo", "algorithm.mix_grpo.size=11"], "algorithm.mix_grpo.size"),
    (QUICK, ["algorithm.name=mix_grpo", "algorithm.mix_grpo.decay_rate=-1"], "algorithm.mix_grpo.decay_rate"),
    (QUICK, ["algorithm.name=mix_grpo", "algorithm.mix_grpo.stride=0"], "algorithm.mix_grpo.stride"),
    (QUICK, ["algorithm.name=mix_grpo", "algorithm.mix_grpo.sizee=2"], "algorithm.mix_grpo.sizee"),
    (QUICK, ["sampling.splits=[[2,2]]"], "sampling.splits"),
    (QUICK, ["sampling.window.size=2"], "sampling.window.size"),
    (QUICK, ["sampling.noise_lvl=0.3"], "sampling.noise_lvl"),
    (QUICK, ["noise_level=0.3"], "noise_level"),
    # --- algorithm
    (QUICK, ["algorithm.clip_range=-1"], "algorithm.clip_range"),
    (QUICK, ["algorithm.kl_beta=-0.1"], "algorithm.kl_beta"),
    (QUICK, ["algorithm.std_mode=batch"], "algorithm.std_mode"),
    (QUICK, ["algorithm.name=nope"], "algorithm.name"),
    (QUICK, ["algorithm.advantage=nope"], "algorithm.advantage"),
    (QUICK, ["algorithm.loss=ppo"], "algorithm.loss"),
    (QUICK, ["algorithm.reward_normalization=mean"], "algorithm.reward_normalization"),
    (QUICK, ["algorithm.name=branch_grpo", "algorithm.branch_grpo.fusion=max"], "algorithm.branch_grpo.fusion"),
    (QUICK, ["algorithm.name=branch_grpo", "algorithm.branch_grpo.prune=some"], "algorithm.branch_grpo.prune"),
    (QUICK, ["algorithm.name=branch_grpo", "algorithm.branch_grpo.prune=fraction", "algorithm.branch_grpo.prune_keep=2"], "algorithm.branch_grpo.prune_keep"),
    (QUICK, ["algorithm.name=branch_grpo", "algorithm.branch_grpo.fusion_temperature=0"], "algorithm.branch_grpo.fusion_temperature"),
    (QUICK, ["algorithm.name=branch_grpo", "algorithm.branch_grpo.depth_prune_window=10"], "algorithm.branch_grpo.depth_prune_window"),
    (QUICK, ["algorithm.name=vgpo", "algorithm.vgpo.discount=1.5"], "algorithm.vgpo.discount"),
    (QUICK, ["algorithm.name=vgpo", "algorithm.vgpo.value_anchor=-1"], "algorithm.vgpo.value_anchor"),
    (QUICK, ["algorithm.name=vgpo", "algorithm.vgpo.anchor_steps=-1"], "algorithm.vgpo.anchor_steps"),
    (QUICK, ["algorithm.dense_grpo.calibrate_noise=true"], "algorithm.dense_grpo.calibrate_noise"),
    (QUICK, ["algorithm.name=dense_grpo", "algorithm.dense_grpo.calibration_rate=0"], "algorithm.dense_grpo.calibration_rate"),
    (QUICK, ["algorithm.name=dense_grpo", "algorithm.dense_grpo.lookahead_steps=-1"], "algorithm.dense_grpo.lookahead_steps"),
    (QUICK, ["algorithm.calibrate_noise=true"], "algorithm.calibrate_noise"),
    (QUICK, ["train.lr_scheduler._component_=cosin"], "train.lr_scheduler._component_"),
    (QUICK, ["train.lr_scheduler.warmup_steps=-1"], "train.lr_scheduler.warmup_steps"),
    (QUICK, ["train.lr_scheduler.warmup_steps=1000"], "train.lr_scheduler.warmup_steps"),
    (QUICK, ["train.lr_scheduler.min_lr_ratio=2"], "train.lr_scheduler.min_lr_ratio"),
    (QUICK, ["train.lr_scheduler._component_=torch.optim.lr_scheduler.StepLR", "train.lr_scheduler.kwargs={step_sise: 2}"],
     "train.lr_scheduler.kwargs.step_sise"),
    (QUICK, ["train.time_budget_s=-1"], "train.time_budget_s"),
    # --- model
    (QUICK, ["model.lora_rank=-1"], "model.lora_rank"),
    (QUICK, ["model.dtype=fp32"], "model.dtype"),
    (QUICK, ["model._component_=nosuchfamily"], "model._component_"),
    (QUICK, ["model._component_=tyo"], "model._component_"),
    (QUICK, ["model._component_=no_such_pkg.mod:Adapter"], "model._component_"),
    (QUICK, ["model.pretrained=/does/not/exist"], "model.pretrained"),
    (QUICK, ["model.options.shift=.inf"], "model.options.shift"),
    (QUICK, ["model.options=5"], "model.options"),
    (QUICK, ["model=null"], "model"),
    # --- rewards
    (QUICK, ["rewards.0.weight=.inf"], "rewards[0].weight"),
    (QUICK, ["rewards.0.weight=true"], "rewards[0].weight"),
    (QUICK, ["rewards.0._component_=nosuchreward"], "rewards[0]._component_"),
    (QUICK, ["rewards.0._component_=digit_clasifier"], "rewards[0]._component_"),
    (QUICK, ["rewards.0._component_=5"], "rewards[0]._component_"),
    (QUICK, ["rewards.0.path=/missing/classifier"], "rewards[0].path"),
    (QUICK, ["rewards.0.path=null"], "rewards[0].path"),
    (QUICK, ["rewards.0.name=[1]"], "rewards[0].name"),
    (QUICK, ["rewards.3.weight=1"], "rewards[3]"),
    (QUICK, ["rewards=[]"], "rewards"),
    (QUICK, ["rewards=5"], "rewards"),
    (QUICK, ["rewards=[5]"], "rewards[0]"),
    (QUICK, ["rewards=[{weight: 1.0}]"], "rewards[0]._component_"),
    (QUICK, ["rewards=[{_component_: jpeg_compressibility, quality: 95, qualty: 3}]"], "rewards[0].qualty"),
    (QUICK, ["rewards=[{_component_: pairwise_winrate, judge: {_component_: digit_judge, bogus: 1}}]"], "rewards[0].judge.bogus"),
    (QUICK, ["rewards=[{_component_: video_frames, reward: no_such_reward}]"], "rewards[0].reward"),
    (QUICK, ["rewards=[{_component_: groupwise_rank}]"], "rewards[0].reward"),
    # --- top level, data, files
    (QUICK, ["output_dir={file}/run"], "output_dir"),
    (QUICK, ["data.train_prompts=/missing.txt"], "data.train_prompts"),
    (QUICK, ["data.train_prompts={empty}"], "data.train_prompts"),
    (QUICK, ["data.train_prompts={notjson}"], "data.train_prompts"),
    (QUICK, ["data.prompts_per_iter=0"], "data.prompts_per_iter"),
    (QUICK, ["seed=-1"], "seed"),
    (QUICK, ["seed=abc"], "seed"),
    (QUICK, ["seed.x=1"], "seed.x"),
    (QUICK, ["num_threads=-1"], "num_threads"),
    (QUICK, ["device=gpu"], "device"),
    (QUICK, ["recipe=dlm"], "recipe"),
    (QUICK, ["recipe=awm"], "algorithm.name"),
    (QUICK, ["logging.progress=maybe"], "logging.progress"),
    (QUICK, ["logging.wandb_project=[1]"], "logging.wandb_project"),
    (QUICK, ["train.iterations"], "override 'train.iterations'"),
    # --- the dLLM schema
    (DLLM, ["algorithm.nam=gdpo"], "algorithm.nam"),
    (DLLM, ["algorithm.name=gdpoo"], "algorithm.name"),
    (DLLM, ["algorithm.estimator=two_step"], "algorithm.estimator"),
    (DLLM, ["sampling.block_length=2"], "sampling.block_length"),
    (DLLM, ["sampling.steps=7"], "sampling.steps"),
    (DLLM, ["sampling.temperature=0"], "sampling.temperature"),
    (DLLM, ["sampling.temperature=.inf"], "sampling.temperature"),
    (DLLM, ["sampling.group_size=1"], "sampling.group_size"),
    (DLLM, ["sampling.remasking=rand"], "sampling.remasking"),
    (DLLM, ["sampling.order=sideways"], "sampling.order"),
    (DLLM, ["sampling.eos_early_rejection=1.5"], "sampling.eos_early_rejection"),
    (DLLM, ["sampling.prompts_per_iter=0"], "sampling.prompts_per_iter"),
    (DLLM, ["task.name=chess"], "task.name"),
    (DLLM, ["task.train=nowhere/train.jsonl"], "task.train"),
    (DLLM, ["task.train={latin1}"], "task.train"),
    (DLLM, ["task.eval={dir}"], "task.eval"),
    (DLLM, ["task.train={empty}"], "task.train"),
    (DLLM, ["task.train={notjson}"], "task.train"),
    (DLLM, ["task.kwargs={timeout: 3}"], "task.kwargs"),
    (DLLM, ["model.pretrained=./no_model_here"], "model.pretrained"),
    (DLLM, ["model.dtype=fp16"], "model.dtype"),
    (DLLM, ["model.lora_target_modules=[q]"], "model.lora_target_modules"),
    (DLLM, ["train.optimizer.lr=nan"], "train.optimizer.lr"),
    (DLLM, ["train.optimizer._component_=torch.optim.Banana"], "train.optimizer._component_"),
    (DLLM, ["train.resume=banana"], "train.resume"),
    (DLLM, ["train.keep_checkpoints=0"], "train.keep_checkpoints"),
    (DLLM, ["train.time_budget_s=.inf"], "train.time_budget_s"),
    (DLLM, ["output_dir=/proc/x"], "output_dir"),
    (DLLM, ["algorithm.name=igpo", "algorithm.igpo.hint_fraction=[0.6,0.2]"], "algorithm.igpo.hint_fraction"),
    (DLLM, ["algorithm.name=igpo", "algorithm.igpo.hint_fraction=[0,0.5]"], "algorithm.igpo.hint_fraction[0]"),
    (DLLM, ["algorithm.hint_fraction=[0.2,0.5]"], "algorithm.hint_fraction"),
    (DLLM, ["algorithm.igpo.hinted_rollouts=0.3"], "algorithm.igpo.hinted_rollouts"),
    (DLLM, ["algorithm.p_mask_prompt=1"], "algorithm.p_mask_prompt"),
    (DLLM, ["algorithm.inner_steps=0"], "algorithm.inner_steps"),
    (DLLM, ["algorithm.correct_threshold=2"], "algorithm.correct_threshold"),
    (DLLM, ["algorithm.std_mode=grp"], "algorithm.std_mode"),
    (DLLM, ["eval.batch_size=0"], "eval.batch_size"),
    (DLLM, ["eval.temperature=-1"], "eval.temperature"),
    (DLLM, ["eval.every=-1"], "eval.every"),
    (DLLM, ["num_threads=-2"], "num_threads"),
    (DLLM, ["sampling.noise_level=0.5"], "sampling.noise_level"),
]


def _with(base: str, edit) -> dict:
    """The parsed YAML of a shipped config, changed by ``edit(cfg)`` (in place)."""
    with open(os.path.join(REPO, base), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    edit(cfg)
    return cfg


def _set(path: str, value):
    def edit(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return edit


#: (id, config text / bytes / dict, the key -- or "{path}" for the config file itself -- the error starts with)
YAML_CASES: list[tuple[str, object, str]] = [
    ("top-level list", "- 1\n- 2\n", "{path}"),
    ("top-level scalar", "just a string\n", "{path}"),
    ("top-level number", "42\n", "{path}"),
    ("syntax error", "seed: [1\n", "{path}:2"),
    ("bad indentation", "train:\n  iterations: 2\n optimizer: 1\n", "{path}:3"),
    ("tab indentation", "train:\n\titerations: 2\n", "{path}:2"),
    ("duplicate key", "seed: 1\nseed: 2\n", "{path}"),
    ("non-utf8", b"seed: 1\n# caf\xe9\n", "{path}"),
    ("unknown top-level key", _with(QUICK, _set("sede", 1)), "sede"),
    ("unknown nested key", _with(QUICK, _set("train.optimizer.learning_rate", 0.1)), "train.optimizer.learning_rate"),
    ("section as scalar", _with(QUICK, _set("sampling", 5)), "sampling"),
    ("list field as mapping", _with(QUICK, _set("rewards", {"a": 1})), "rewards"),
    ("reward unknown keyword", _with(QUICK, lambda c: c["rewards"][0].update(bogus_kw=3)), "rewards[0].bogus_kw"),
    ("reward weight text", _with(QUICK, lambda c: c["rewards"][0].update(weight="abc")), "rewards[0].weight"),
    ("reward without component", _with(QUICK, lambda c: c["rewards"][0].pop("_component_")), "rewards[0]._component_"),
    ("reward missing path", _with(QUICK, lambda c: c["rewards"][0].pop("path")), "rewards[0].path"),
    ("lr infinite", _with(QUICK, _set("train.optimizer.lr", float("inf"))), "train.optimizer.lr"),
    ("interpolation to nothing", _with(QUICK, _set("seed", "${nope}")), "seed"),
    ("float as text", _with(QUICK, _set("sampling.noise_level", "abc")), "sampling.noise_level"),
    ("output_dir in /proc", _with(QUICK, _set("output_dir", "/proc/x")), "output_dir"),
    ("judge not a mapping", _with(QUICK, _set("eval.judges", [5])), "eval.judges[0]"),
    ("options as list", _with(QUICK, _set("model.options", [1, 2])), "model.options"),
    ("integer key", _with(QUICK, lambda c: c.update({1: 2})), "1"),
    ("sampler typo", _with(QUICK, _set("sampling.sampler", "flowgrpo")), "sampling.sampler"),
    ("window strategy typo", _with(QUICK, lambda c: c["algorithm"].update(name="mix_grpo", mix_grpo={"strategy": "progresive"})),
     "algorithm.mix_grpo.strategy"),
    ("dllm unknown task key", _with(DLLM, _set("task.nme", "addition")), "task.nme"),
    ("dllm with an rl key", _with(DLLM, _set("sampling.noise_level", 0.5)), "sampling.noise_level"),
    ("dllm name as list", _with(DLLM, _set("algorithm.name", ["x"])), "algorithm.name"),
    ("dllm recipe typo", _with(DLLM, _set("recipe", "dlm")), "recipe"),
    ("dllm negative seed", _with(DLLM, _set("seed", -3)), "seed"),
]


@pytest.fixture(autouse=True)
def _no_library_warnings():
    """transformers / diffusers log through a handler bound to the ``sys.stderr`` of their first use,
    possibly the capsys stream of an earlier, finished test; an import-time warning (e.g. "requires
    torchvision" while a flux adapter imports) then prints a "Logging error" traceback that is not
    flowalign's. Their warnings are not what these tests check: silence them meanwhile."""
    loggers = [logging.getLogger(name) for name in ("transformers", "diffusers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> dict[str, str]:
    """An empty current directory with the special files the cases refer to."""
    monkeypatch.chdir(tmp_path)
    files = {"dir": tmp_path / "a_folder", "latin1": tmp_path / "latin1.txt", "empty": tmp_path / "empty.txt",
             "notjson": tmp_path / "prompts.jsonl", "file": tmp_path / "a_file"}
    files["dir"].mkdir()
    files["latin1"].write_bytes("a handwritten seven\nun caf\u00e9\n".encode("latin-1"))
    files["empty"].write_text("# only a comment\n\n")
    files["notjson"].write_text("a handwritten seven\n")
    files["file"].write_text("not a folder\n")
    return {name: str(path) for name, path in files.items()}


def fill(override: str, files: dict[str, str]) -> str:
    """``override`` with ``{dir}``, ``{latin1}``, ... replaced by the special files' paths."""
    for name, path in files.items():
        override = override.replace("{" + name + "}", path)
    return override


def validate(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["validate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_config_error(rc: int, out: str, err: str, key: str) -> None:
    """Exit status 2, one error line starting with ``key``, no traceback."""
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err, err
    first = err.strip().splitlines()[0]
    assert first.startswith(ERROR + key), first


def test_there_are_at_least_100_distinct_invalid_configs():
    keys = [(config, tuple(overrides)) for config, overrides, _ in OVERRIDE_CASES] + [case[0] for case in YAML_CASES]
    assert len(set(keys)) == len(keys) >= 100


@pytest.mark.parametrize("config, overrides, key", OVERRIDE_CASES, ids=[" ".join(c[1]) for c in OVERRIDE_CASES])
def test_invalid_override_is_a_clean_error_naming_the_key(config, overrides, key, workdir, capsys):
    rc, out, err = validate(capsys, config, *(fill(o, workdir) for o in overrides))
    assert_config_error(rc, out, err, key)


@pytest.mark.parametrize("name, content, key", YAML_CASES, ids=[c[0] for c in YAML_CASES])
def test_invalid_yaml_file_is_a_clean_error_naming_the_key(name, content, key, workdir, tmp_path, capsys):
    path = tmp_path / "mutated.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(yaml.safe_dump(content))
    rc, out, err = validate(capsys, str(path))
    assert_config_error(rc, out, err, key.format(path=path))


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_unusable_config_file_is_named(what, workdir, capsys):
    path = "no_such_config.yaml" if what == "missing" else workdir["dir"]
    rc, out, err = validate(capsys, path)
    assert_config_error(rc, out, err, "config file not found" if what == "missing" else path)
    assert path in err
    if what == "missing":  # both places a relative name is looked up in
        assert os.getcwd() in err and REPO in err


@pytest.mark.parametrize("overrides, hint", [
    (["sampling.noise_lvl=0.3"], "did you mean 'sampling.noise_level'?"),
    (["noise_level=0.3"], "did you mean 'sampling.noise_level'?"),
    (["train.lr=0.1"], "did you mean 'train.optimizer.lr'?"),
    (["train.iteratons=3"], "did you mean 'train.iterations'?"),
    (["sampling.sampler=flowgrpo"], "did you mean 'flow_grpo'?"),
    (["train.mixed_precision=BF16"], "did you mean 'bf16'?"),
    (["algorithm.std_mode=globl"], "did you mean 'global'?"),
    (["train.resume=nevr"], "did you mean 'never'?"),
    (["recipe=dlm"], "did you mean 'dllm'?"),
    (["model._component_=tyo"], "did you mean 'toy'?"),
    (["rewards.0._component_=digit_clasifier"], "did you mean 'digit_classifier'?"),
    (["train.optimizer._component_=torch.optim.adamw"], "did you mean 'torch.optim.AdamW'?"),
    (["train.optimizer._component_=torch.optim.SGD", "train.optimizer.kwargs.momentun=0.9"], "did you mean 'momentum'?"),
])
def test_typos_get_a_did_you_mean(overrides, hint, workdir, capsys):
    rc, out, err = validate(capsys, QUICK, *overrides)
    assert rc == 2 and hint in err, err


def test_typos_in_yaml_and_dllm_keys_get_a_did_you_mean(workdir, tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(_with(QUICK, _set("sampling.noise_lvl", 0.3))))
    rc, _, err = validate(capsys, str(path))
    assert rc == 2 and "sampling.noise_lvl: unknown key; did you mean 'sampling.noise_level'?" in err, err
    rc, _, err = validate(capsys, DLLM, "algorithm.nam=gdpo")
    assert rc == 2 and "did you mean 'algorithm.name'?" in err, err
    rc, _, err = validate(capsys, DLLM, "sampling.remasking=rand")
    assert rc == 2 and "did you mean 'random'?" in err, err


def test_error_messages_say_what_is_wrong(workdir, capsys):
    """The issue's examples, spelled out: the value, the range, the file position, the accepted names."""
    expected = [
        (["train.optimizer.lr=.inf"], "train.optimizer.lr: must be a finite number > 0, got inf"),
        (["train.optimizer.betas=[2.0,0.5]"], "train.optimizer.betas[0]: must be a finite number in [0, 1), got 2.0"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints: must be an integer >= 1, got 0"),
        (["rewards.0.bogus_kw=3"], "rewards[0].bogus_kw: reward 'digit_classifier' takes no argument 'bogus_kw'; it takes: path, device"),
        (["rewards.0.weight=abc"], "rewards[0].weight: must be a finite number, got 'abc'"),
        (["data.train_prompts={latin1}"], "is not UTF-8 text: byte 0xe9 at offset 26 (line 2, column 7)"),
        (["data.train_prompts={dir}"], "is a directory, not a file"),
        (["output_dir=/proc/x"], "output_dir: cannot create '/proc/x'"),
    ]
    for overrides, text in expected:
        rc, _, err = validate(capsys, QUICK, *(fill(o, workdir) for o in overrides))
        assert rc == 2 and text in err, (text, err)


# ------------------------------------------------------------------------------------------------
# every shipped config
# ------------------------------------------------------------------------------------------------
SHIPPED = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
                 if not p.startswith(os.path.join(REPO, "configs", "accelerate", "")))  # launch configs: test_shipped_accelerate_configs


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_config_validates_or_names_a_missing_data_file(path, workdir, capsys):
    """Run from another directory: the config and its assets are found through the project root.
    Configs of GPU runs that name data files a user downloads (``data/...``) fail cleanly naming it."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        text = f.read()
    missing = [p for p in re.findall(r"\bdata/\S+", text) if not os.path.exists(resolve_path(p))]
    rc, out, err = validate(capsys, path)
    assert "Traceback" not in out + err
    if missing:
        assert rc == 2 and len(err.strip().splitlines()[0].split(ERROR)) == 2, err
        assert "file not found" in err and any(m in err for m in missing), err
    else:
        assert rc == 0, err
        assert out.rstrip().endswith(f"# {path}: OK")


def test_shipped_configs_validate_from_the_repository_too(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    for path in (QUICK, DLLM):
        rc, out, err = validate(capsys, path)
        assert rc == 0, err
