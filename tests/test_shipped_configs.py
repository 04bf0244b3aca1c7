"""Every shipped config loads, type-checks and passes validation (files, components, batch
arithmetic) for 1, 2, 4 and 8 processes, as its header's launch commands promise."""

from __future__ import annotations

import glob
import os

import pytest

from flowalign.algorithms import get_algorithm
from flowalign.config import ConfigError, load_config
from tests.conftest import REPO

CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
                 if not p.startswith(os.path.join(REPO, "configs", "accelerate", "")))  # launch configs: test_shipped_accelerate_configs


def test_there_are_configs_for_every_family():
    names = " ".join(CONFIGS)
    for family in ("quickstart", "sd15", "sdxl", "sd35", "flux", "wan"):
        assert family in names, f"no config for {family}"


@pytest.mark.parametrize("path", CONFIGS)
def test_config_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    with open(path) as f:
        header = f.read().split("\n", 1)[0]
    assert header.startswith("#"), f"{path} must start with a header comment (launch command, batch arithmetic)"
    # dLLM configs for real models name a hub id and data files a user provides; check them without files
    check_files = not (path.startswith("configs/dllm/") and "assets/dllm_quickstart" not in open(path).read())
    cfg = load_config(path, check_files=check_files)
    # a group split over ranks needs group_size % W == 0; algorithms placing whole groups per rank
    # (trees, pairwise judges: shard_by "prompt") need prompts_per_iter % W == 0
    by_prompt = getattr(get_algorithm(cfg.algorithm.name), "shard_by", "group") == "prompt"
    for world in (2, 4, 8):
        if (cfg.data.prompts_per_iter if by_prompt else cfg.sampling.group_size) % world == 0:
            load_config(path, world_size=world, check_files=check_files)
        elif by_prompt:
            with pytest.raises(ConfigError, match="data.prompts_per_iter"):
                load_config(path, world_size=world, check_files=check_files)
