import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.cli.group import COMMANDS, one_line
from inkpipe.pipeline.store import open_fragments


def test_help_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("synth", "ingest", "info", "train", "predict", "evaluate", "demo"):
        assert name in result.output
    result = CliRunner().invoke(cli, ["ingest", "--help"])
    assert (
        result.exit_code == 0 and "--manifest" in result.output and "--scheduler" in result.output
    )


def test_ingest_and_info(fragments_dir, tmp_path):
    out = tmp_path / "s.zarr"
    args = [
        "ingest",
        str(fragments_dir),
        "--out",
        str(out),
        "--quiet",
        "--chunk-px",
        "64",
        "--tile",
        "32",
        "--stride",
        "16",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "3 fragment(s) ingested" in result.output
    assert open_fragments(out)[0].volume.chunks == (4, 64, 64)
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["fragment", "split", "group"]
    assert any(line.startswith("1 ") and "96 x 80" in line for line in lines)
    assert lines[-1].startswith("total")


def test_errors_are_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: store not found")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path), "--out", str(tmp_path / "s.zarr")])
    assert result.exit_code == 1 and "no fragments found" in result.output


def test_every_command_loads_and_has_help():
    for name in ("synth", "ingest", "info", "train", "predict", "evaluate", "demo"):
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage: " in result.output and "--help" in result.output


def test_ctrl_c_is_a_short_message_and_exit_130(fragments_dir, tmp_path, monkeypatch):
    from inkpipe.pipeline import ingest as ingest_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_mod, "ingest", interrupted)
    result = CliRunner().invoke(cli, ["ingest", str(fragments_dir), "--out", str(tmp_path / "s")])
    assert result.exit_code == 130
    assert "interrupted; finished work is kept" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_listed_short_help_is_the_commands_own(name):
    cmd = cli.get_command(click.Context(cli), name)
    assert cmd is not None and cmd.get_short_help_str(limit=200) == COMMANDS[name][2]


def _python_stdout(code: str) -> str:
    """Run ``code`` in a fresh interpreter (so imports start from nothing); return its stdout."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_help_imports_no_stage():
    code = (
        "import sys; from click.testing import CliRunner; from inkpipe.cli import cli;"
        "assert CliRunner().invoke(cli, ['--help']).exit_code == 0;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'zarr', 'dask', "
        "'numpy') or m.startswith(('inkpipe.train', 'inkpipe.infer', 'inkpipe.cli.'))))"
    )
    assert _python_stdout(code).strip() == "['inkpipe.cli.group']"


def test_data_commands_import_no_torch(tmp_path):
    # synth, ingest, info and evaluate have no model: importing torch would add ~0.5 GB to ingest's
    # peak RSS (whose target is < 0.5 GB) and seconds to every start.
    (tmp_path / "sub.csv").write_text("Id,Predicted\n1,1 5\n")
    code = (
        "import sys; from click.testing import CliRunner; from inkpipe.cli import cli;"
        f"d = {str(tmp_path)!r};"
        "r = [CliRunner().invoke(cli, a) for a in (['synth', d + '/f', '--train', '1',"
        " '--test', '0', '--height', '64', '--width', '64', '--layers', '8'],"
        " ['ingest', d + '/f', '--out', d + '/s.zarr'], ['info', d + '/s.zarr'],"
        " ['evaluate', d + '/sub.csv', '--labels', d + '/f/train'])];"
        "assert all(x.exit_code == 0 for x in r), [x.output for x in r];"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'albumentations',"
        " 'segmentation_models_pytorch'}))"
    )
    assert _python_stdout(code).strip().splitlines()[-1] == "[]"


def test_one_line_keeps_the_last_line_of_a_worker_traceback():
    worker = ValueError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1\nValueError: chunk is damaged\n'
    )
    assert one_line(worker) == "chunk is damaged"
    assert one_line(ValueError("plain")) == "plain"
