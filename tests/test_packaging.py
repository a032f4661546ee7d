"""The four folders install as one distribution, also without an editable install."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_as_inkpipe_packages(tmp_path):
    # Build from a copy without build/: setuptools reuses build/lib, where modules deleted from
    # the source tree (e.g. the old pipeline/cli.py) would survive into the wheel.
    source = tmp_path / "source"
    junk = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*junk, ".hypothesis", "*.zarr"))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("inkpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "cli/__init__.py",
        "cli/__main__.py",
        "cli/train.py",
        "pipeline/store.py",
        "numerics/metrics.py",
        "train/loop.py",
        "infer/predict.py",
    ):
        assert f"inkpipe/{module}" in names
    assert not any(
        n.startswith(("pipeline/", "numerics/", "train/", "infer/", "cli/", "tests/"))
        for n in names
    )
    assert not any(n.endswith(("pipeline/cli.py", "train/cli.py", "infer/cli.py")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "inkpipe = inkpipe.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    target = tmp_path / "site"
    inst = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    # -S: no site hooks, so the editable finder of the dev install cannot answer the imports
    site = sysconfig.get_paths()["purelib"]
    code = (
        "import inkpipe.cli.train, inkpipe.train.loop, inkpipe.infer.predict;"
        "print(inkpipe.cli.__file__)"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": f"{target}:{site}"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(target))
    # the module torchrun launches (python -m inkpipe.cli train …)
    run = subprocess.run(
        [sys.executable, "-S", "-m", "inkpipe.cli", "train", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": f"{target}:{site}"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Usage: python -m inkpipe.cli train" in run.stdout
