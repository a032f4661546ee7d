from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.infer.rle import read_submission


def test_demo_runs_end_to_end(tmp_path):
    work = tmp_path / "demo"
    args = ["demo", "--workdir", str(work), "--size", "128x96", "--minutes", "0.01", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "demo F0.5 = " in result.output
    score = float(result.output.split("demo F0.5 = ")[1].split()[0])
    assert 0.0 <= score <= 1.0
    assert set(read_submission(work / "prediction" / "submission.csv")) == {"a"}
    assert (work / "prediction" / "a_overlay.png").is_file()
    assert (work / "run" / "best.pt").is_file()
    # a second run reuses the data and the store and continues training
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "unchanged, skipped" in result.output and "resuming" in result.output
