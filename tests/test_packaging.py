"""The built wheel carries what a user needs outside a checkout: the recipes and the C++ sources."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str | Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.slow
def test_wheel_installs_and_trains_from_its_own_recipes(tmp_path):
    dist = tmp_path / "dist"
    r = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dist.glob("seqvision-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    recipes = {Path(n).stem for n in names if n.startswith("seqvision/configs/") and n.endswith(".yaml")}
    assert {"digits", "imagenet_s", "imagenet_l_392", "cifar10"} <= recipes
    assert "seqvision/ops/csrc/rnn2d.cpp" in names

    # A fresh environment with the wheel installed by pip; its dependencies are this environment's packages.
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    assert r.returncode == 0, r.stderr[-2000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    r = _run(python, "-c", "import seqvision; print(seqvision.__file__)", cwd=outside)
    assert r.stdout.strip().startswith(site)  # the wheel's copy, not the checkout
    r = _run(env / "bin" / "seqvision", "train", "-c", "imagenet_s", "--print-config", cwd=outside)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lr: 0.002" in r.stdout and "lr_base_batch: 2048" in r.stdout and "epochs: 300" in r.stdout
