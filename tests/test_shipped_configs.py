"""Every shipped config loads, type-checks and passes validation (files, components, batch
arithmetic) for 1, 2, 4 and 8 processes, as its header's launch commands promise."""

from __future__ import annotations

import glob
import math
import os

import pytest

from flowalign.config import load_config
from tests.conftest import REPO

CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


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
    # BranchGRPO trees stay on one rank: each rank needs whole trees (prod(k) leaves per initial noise)
    splits = cfg.algorithm.branch_grpo.splits if cfg.algorithm.name == "branch_grpo" else []
    leaves_per_tree = math.prod(k for _, k in splits)
    for world in (2, 4, 8):
        if cfg.sampling.group_size % (world * leaves_per_tree) == 0:
            load_config(path, world_size=world, check_files=check_files)
