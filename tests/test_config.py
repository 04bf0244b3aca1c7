"""Config loading, overrides, validation errors naming the key, and the CLI's front door."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

import flowalign.config as config_module
from flowalign.config import ConfigError, RLConfig, explain, load_config
from tests.conftest import REPO


def test_quickstart_config_loads_and_overrides_apply():
    os.chdir(REPO)
    cfg = load_config("configs/quickstart.yaml", ["train.iterations=3", "sampling.noise_level=0.5", "rewards.0.weight=2"])
    assert isinstance(cfg, RLConfig)
    assert cfg.train.iterations == 3 and cfg.sampling.noise_level == 0.5 and cfg.rewards[0]["weight"] == 2


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.iteratons=3"], "train.iteratons"),
        (["train.iterations=many"], "train.iterations"),
        (["sampling.noise_level=0"], "sampling.noise_level"),
        (["sampling.sampler=euler"], "sampling.sampler"),
        (["sampling.timestep_fraction=1.5"], "sampling.timestep_fraction"),
        (["sampling.sde_window=[4,2]"], "sampling.sde_window"),
        (["model.pretrained=/does/not/exist"], "model.pretrained"),
        (["model._component_=nosuchfamily"], "model._component_"),
        (["rewards.0._component_=nosuchreward"], "rewards[0]._component_"),
        (["rewards.0.path=/missing/classifier"], "rewards[0].path"),
        (["data.train_prompts=/missing.txt"], "data.train_prompts"),
        (["train.steps_per_iter=100000"], "train.steps_per_iter"),
    ],
)
def test_bad_config_errors_name_the_key(overrides, key, tiny_config):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config, overrides)
    assert str(err.value).startswith(key), str(err.value)


def test_impossible_batch_arithmetic_names_group_size(tiny_config):
    with pytest.raises(ConfigError, match=r"^sampling.group_size: .*divisible by the number of processes \(3\)"):
        load_config(tiny_config, world_size=3)


def test_unknown_yaml_key_names_its_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  optimizer:\n    learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"^train.optimizer.learning_rate: "):
        load_config(str(bad), check_files=False)


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("nope.yaml")


@pytest.mark.parametrize("schema", ["flowalign.config:RLConfig", "flowalign.dllm.config:DLLMConfig"])
def test_every_field_is_documented(schema):
    from flowalign.config import import_path

    rows = explain(import_path(schema, "schema"))
    assert len(rows) > 40
    undocumented = [row.key for row in rows if not row.doc.strip()]
    assert not undocumented, undocumented
    assert all(row.value == row.default and not row.changed for row in rows)  # a class: its defaults


def test_cli_validate_reports_key_and_exit_code(tiny_config, tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    ok = subprocess.run([sys.executable, "-m", "flowalign", "validate", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "flowalign", "validate", str(path), "algorithm.clip_range=-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "algorithm.clip_range" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_ls_lists_components():
    out = subprocess.run([sys.executable, "-m", "flowalign", "ls", "rewards"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for name in ("digit_classifier", "digit_judge", "jpeg_compressibility"):
        assert name in out.stdout
    samplers = subprocess.run([sys.executable, "-m", "flowalign", "ls", "samplers"], capture_output=True, text=True)
    assert "flow_grpo" in samplers.stdout and "cps" in samplers.stdout


@dataclasses.dataclass
class _OtherSchema:
    """A second recipe's config schema, to test dispatch on ``recipe``."""

    recipe: str = "other"
    steps: int = 3

    def validate(self, *, check_files: bool = True, world_size: int = 1) -> None:
        if self.steps < 1:
            raise ConfigError("steps: must be >= 1")


def test_recipe_key_selects_the_config_schema(monkeypatch, tmp_path):
    monkeypatch.setitem(config_module.SCHEMAS, "other", f"{__name__}:_OtherSchema")
    path = tmp_path / "other.yaml"
    path.write_text("recipe: other\nsteps: 5\n")
    cfg = load_config(str(path), ["steps=7"])
    assert isinstance(cfg, _OtherSchema) and cfg.steps == 7
    with pytest.raises(ConfigError, match=r"^steps: must be >= 1"):
        load_config(str(path), ["steps=0"])
    with pytest.raises(ConfigError, match="num_steps"):  # a key of RLConfig is unknown to the other schema
        load_config(str(path), ["sampling.num_steps=3"])
    # an override of `recipe` switches the schema too; without one the default schema is RLConfig
    assert isinstance(load_config({"steps": 2}, ["recipe=other"]), _OtherSchema)
    assert isinstance(load_config({}, check_files=False), RLConfig)


def test_import_path_resolves_both_spellings_and_names_the_key():
    import torch

    from flowalign.config import import_path

    assert import_path("torch.optim:AdamW", "train.optimizer._component_") is torch.optim.AdamW
    assert import_path("torch.optim.AdamW", "train.optimizer._component_") is torch.optim.AdamW
    with pytest.raises(ValueError, match=r"^train.optimizer._component_: cannot import 'torch.optim.Nope'"):
        import_path("torch.optim.Nope", "train.optimizer._component_")
    with pytest.raises(ValueError, match=r"^recipe: cannot import 'no_such_module:X'"):
        import_path("no_such_module:X", "recipe")


# ------------------------------------------------------------------------------------------------
# ranges, paths, optimizer, explain
# ------------------------------------------------------------------------------------------------
def _numeric_fields(cls: type, prefix: str = ""):
    """``(key, field)`` of every field whose type holds an int or a float (lists and optionals too)."""
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        text = str(tp)
        if tp in (int, float) or "int" in text or "float" in text:
            yield prefix + f.name, f


@pytest.mark.parametrize("schema", ["flowalign.config:RLConfig", "flowalign.dllm.config:DLLMConfig"])
def test_every_numeric_field_has_a_range(schema):
    from flowalign.config import import_path

    fields = list(_numeric_fields(import_path(schema, "schema")))
    assert len(fields) > 20
    unbounded = [key for key, f in fields if not {"ge", "gt", "le", "lt"} & set(f.metadata)]
    assert not unbounded, unbounded


def test_dllm_choices_match_the_decoder():
    from flowalign.dllm import config as dllm_config
    from flowalign.dllm import sampling

    assert dllm_config.REMASKING == sampling.REMASKING
    assert dllm_config.ORDERS == sampling.ORDERS
    assert dllm_config.STEP_SCHEDULES == sampling.STEP_SCHEDULES


def test_range_errors_reject_non_finite_values_and_name_the_range(tiny_config):
    for override, message in [
        ("train.optimizer.lr=.inf", "train.optimizer.lr: must be a finite number > 0, got inf"),
        ("sampling.noise_level=nan", "sampling.noise_level: must be a finite number > 0, got nan"),
        ("train.ema_decay=1", "train.ema_decay: must be a finite number in [0, 1), got 1.0"),
        ("num_threads=-1", "num_threads: must be an integer >= 0, got -1"),
        ("model.options.shift=-.inf", "model.options.shift: must be a finite number, got -inf"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(tiny_config, [override])
        assert str(err.value).startswith(message), str(err.value)


def test_rl_config_has_num_threads_like_the_dllm_config():
    from flowalign.dllm.config import DLLMConfig

    assert RLConfig().num_threads == 0
    rl_help = {f.name: f.metadata["help"] for f in dataclasses.fields(RLConfig)}["num_threads"]
    dllm_help = {f.name: f.metadata["help"] for f in dataclasses.fields(DLLMConfig)}["num_threads"]
    assert "0 = automatic" in rl_help and dllm_help.startswith(rl_help)


def test_project_root_and_resolve_path(tmp_path, monkeypatch):
    from flowalign.config import project_root, resolve_path

    assert project_root() == REPO
    monkeypatch.chdir(tmp_path)
    assert resolve_path("configs/quickstart.yaml") == os.path.join(REPO, "configs", "quickstart.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text("seed: 1\n")
    assert resolve_path("configs/quickstart.yaml") == "configs/quickstart.yaml"  # the current directory wins
    for unchanged in ("no/such/file.txt", "stabilityai/stable-diffusion-3.5-medium", "/abs/missing", ""):
        assert resolve_path(unchanged) == unchanged


def test_relative_paths_of_a_config_resolve_against_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/pref_grpo/quickstart.yaml")
    assert cfg.data.train_prompts == os.path.join(REPO, "assets", "prompts", "digits_train.txt")
    assert cfg.eval.prompts == os.path.join(REPO, "assets", "prompts", "digits_eval.txt")
    assert cfg.model.pretrained == os.path.join(REPO, "assets", "quickstart", "digits-flow")
    assert cfg.rewards[0]["judge"]["path"] == os.path.join(REPO, "assets", "quickstart", "digit-classifier")
    assert cfg.output_dir == "runs/pref_grpo"  # always relative to the current directory
    dllm = load_config("configs/dllm/quickstart.yaml")
    assert dllm.task.train == os.path.join(REPO, "assets", "dllm_quickstart", "train.jsonl")
    with pytest.raises(ConfigError, match=rf"data.train_prompts: .*'{tmp_path}'.*'{REPO}'"):
        load_config("configs/quickstart.yaml", ["data.train_prompts=prompts/none.txt"])


@pytest.mark.parametrize("content, match", [
    ("- 1\n- 2\n", "top level of a config must be a mapping.*got a list"),
    ("7\n", "top level of a config must be a mapping.*got a single value"),
    ("seed: 1\ntrain: {iterations: [\n", r":3:1: invalid YAML"),
    (b"seed: 1\n\xff\n", r"not UTF-8 text: byte 0xff at offset 8 \(line 2, column 1\)"),
])
def test_unreadable_config_files_are_named(tmp_path, content, match):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=f"^{str(path)}.*{match}"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=f"^{str(tmp_path)}: .*is a directory"):
        load_config(str(tmp_path))


def test_optimizer_kwargs_follow_the_optimizer_signature():
    import torch

    from flowalign.config import OptimizerConfig, build_optimizer, optimizer_kwargs

    adamw = OptimizerConfig(lr=1e-3, weight_decay=0.0)
    assert optimizer_kwargs(adamw) == {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8}
    sgd = OptimizerConfig(_component_="torch.optim.SGD", lr=0.1, kwargs={"momentum": 0.9, "nesterov": True})
    assert optimizer_kwargs(sgd) == {"lr": 0.1, "weight_decay": 1e-4, "momentum": 0.9, "nesterov": True}
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(sgd, params)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]
    assert isinstance(build_optimizer(adamw, params), torch.optim.AdamW)
    with pytest.raises(ConfigError, match=r"^train.optimizer.eps: torch.optim.SGD takes no 'eps'"):
        optimizer_kwargs(OptimizerConfig(_component_="torch.optim.SGD", eps=1e-6))
    with pytest.raises(ConfigError, match=r"^train.optimizer.kwargs.momentun: .*did you mean 'momentum'"):
        optimizer_kwargs(OptimizerConfig(_component_="torch.optim.SGD", kwargs={"momentun": 0.9}))
    with pytest.raises(ConfigError, match=r"^train.optimizer._component_: .*not a torch.optim.Optimizer subclass"):
        optimizer_kwargs(OptimizerConfig(_component_="torch.nn.Linear"))


def test_explain_shows_effective_values_beside_defaults(tiny_config):
    from flowalign.config import format_explain

    cfg = load_config(tiny_config, ["sampling.noise_level=0.5"])
    rows = {row.key: row for row in explain(cfg)}
    assert rows["sampling.noise_level"].value == "0.5" and rows["sampling.noise_level"].default == "0.7"
    assert rows["sampling.noise_level"].changed and not rows["sampling.sampler"].changed
    table = format_explain(explain(cfg))
    assert any(line.startswith("* sampling.noise_level") for line in table.splitlines())
    assert any(line.startswith("  sampling.sampler") for line in table.splitlines())


def test_explain_of_a_dllm_config_shows_the_preset_values(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/dllm/quickstart.yaml", ["algorithm.name=gdpo"])
    rows = {row.key: row for row in explain(cfg)}
    assert rows["algorithm.inner_steps"].value != "None" and not rows["algorithm.inner_steps"].changed  # the preset's
    assert rows["algorithm.name"].value == "'gdpo'" and rows["algorithm.name"].changed


def test_cli_validate_explain_lists_values_and_defaults(monkeypatch, capsys):
    from flowalign.cli import main

    monkeypatch.chdir(REPO)
    assert main(["validate", "configs/quickstart.yaml", "train.iterations=7", "--explain"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["key", "value", "default", "doc"]
    line = next(line for line in out.splitlines() if "train.iterations" in line)
    assert line.startswith("*") and line.split()[2:4] == ["7", "100"]


def test_component_nodes_take_the_keyword_arguments_of_their_class(tmp_path):
    """`train.optimizer` / `train.lr_scheduler` hold any keyword argument of the class they name
    (folded into `kwargs`, checked against the signature); other unknown keys stay unknown keys."""
    import torch

    from flowalign.config import build_optimizer

    path = tmp_path / "sgd.yaml"
    path.write_text("train:\n  optimizer:\n    _component_: torch.optim.SGD\n    lr: 0.1\n    momentum: 0.9\n"
                    "  lr_scheduler:\n    _component_: torch.optim.lr_scheduler.StepLR\n    step_size: 3\n")
    cfg = load_config(str(path), ["train.optimizer.nesterov=true", "train.lr_scheduler.gamma=0.5"], check_files=False)
    assert cfg.train.optimizer.kwargs == {"momentum": 0.9, "nesterov": True}
    assert cfg.train.lr_scheduler.kwargs == {"step_size": 3, "gamma": 0.5}
    opt = build_optimizer(cfg.train.optimizer, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]
    with pytest.raises(ConfigError, match=r"^train.optimizer.momentun: unknown key"):
        load_config(str(path), ["train.optimizer.momentun=0.5"], check_files=False)
