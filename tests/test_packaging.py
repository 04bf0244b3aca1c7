"""The wheel maps rewards/ -> flowalign.rewards and pipelines/ -> flowalign.pipelines and installs
no top-level `rewards` / `pipelines` (docs/ARCHITECTURE.md: editable installs hide mistakes here, so build a
real wheel, install it into a fresh venv and import from outside the repo)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), REPO],
                   check=True, capture_output=True)
    (path,) = glob.glob(str(out / "flowalign-*.whl"))
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    # every package directory of the source tree ships (pyproject lists packages explicitly)
    for top, installed in (("flowalign", "flowalign"), ("rewards", "flowalign/rewards"), ("pipelines", "flowalign/pipelines")):
        for init in glob.glob(os.path.join(REPO, top, "**", "__init__.py"), recursive=True):
            relative = os.path.relpath(init, os.path.join(REPO, top))
            assert f"{installed}/{relative}" in names, f"{top}/{relative} is missing from the wheel (add it to pyproject packages)"
    assert "flowalign/rewards/registry.py" in names
    assert "flowalign/pipelines/toy.py" in names
    assert "flowalign/samplers/steps.py" in names
    assert not [n for n in names if n.startswith(("rewards/", "pipelines/", "tests/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "flowalign = flowalign.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_imports_from_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True, capture_output=True)
    # Dependencies (torch, diffusers, ...) come from this interpreter's site-packages, appended
    # *after* the fresh venv's own, so flowalign itself can only be the freshly installed wheel.
    fresh_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(fresh_site, "zz_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import flowalign, flowalign.rewards, flowalign.pipelines\n"
        "from flowalign.pipelines.toy import ToyAdapter\n"
        "from flowalign.rewards.registry import resolve_reward_class\n"
        "assert resolve_reward_class('jpeg_compressibility').__name__ == 'JpegCompressibility'\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('rewards') is None and importlib.util.find_spec('pipelines') is None\n"
        "print(flowalign.__file__); print(flowalign.rewards.__file__); print(flowalign.pipelines.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([py, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.split():
        assert line.startswith(fresh_site), f"imported {line} instead of the fresh install in {fresh_site}"
    cli = subprocess.run([str(env_dir / "bin" / "flowalign"), "ls", "samplers"], cwd=str(tmp_path), capture_output=True, text=True, env=env)
    assert cli.returncode == 0 and "flow_grpo" in cli.stdout, cli.stderr
