import os
import stat
from pathlib import Path

import pytest

from inkpipe.pipeline.files import atomic_target, atomic_write


def test_atomic_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.txt"  # parent folders are created
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write("first\n")
        assert not path.exists()  # nothing under the name before the write succeeds
    with atomic_write(path) as fh:
        fh.write(b"second\n")
    assert path.read_bytes() == b"second\n"
    assert os.listdir(path.parent) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_write(path, "w") as fh:
        fh.write("half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError), atomic_target(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.csv"]


def test_atomic_target_is_a_hidden_tmp_file_with_the_usual_permissions(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    with atomic_target(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.pt.")
        assert tmp.suffix == ".tmp" and tmp.is_file()
        tmp.write_bytes(b"weights")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert path.read_bytes() == b"weights"
