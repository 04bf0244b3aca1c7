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


def test_every_field_is_documented():
    rows = explain()
    assert len(rows) > 40
    undocumented = [key for key, _, doc in rows if not doc.strip()]
    assert not undocumented, undocumented


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
