"""The three folders install as one distribution, also without an editable install."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_as_inkpipe_packages(tmp_path):
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
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("inkpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("pipeline/cli.py", "pipeline/store.py", "train/loop.py", "infer/predict.py"):
        assert f"inkpipe/{module}" in names
    assert not any(n.startswith(("pipeline/", "train/", "infer/", "tests/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "inkpipe = inkpipe.pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
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
        "import inkpipe.pipeline.cli, inkpipe.train.loop, inkpipe.infer.predict;"
        "print(inkpipe.pipeline.cli.__file__)"
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
