"""The ``inkpipe`` click group: lazily loaded commands and one-line errors.

Every command lives in a module of this package and is imported on first use, so
``inkpipe --help`` imports neither torch nor zarr. Any :class:`InkpipeError` becomes a one-line
``Error: …`` and exit code 1, never a traceback, and so does a full disk met anywhere (the
stages name what they were writing; this is the net under them); Ctrl-C becomes a short
message and exit 130.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from inkpipe.pipeline.disk import disk_full_message, is_disk_full
from inkpipe.pipeline.errors import InkpipeError

__all__ = ["COMMANDS", "InkpipeGroup", "Interrupted", "cli", "main", "one_line"]

# name -> (module, attribute, short help). The short help is listed by ``inkpipe --help``
# without importing the module; tests/cli/test_group.py checks it equals the command's own.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": (
        "inkpipe.cli.pipeline",
        "synth_command",
        "Write synthetic fragments in the real Kaggle layout to OUT.",
    ),
    "ingest": (
        "inkpipe.cli.pipeline",
        "ingest_command",
        "Turn fragment folders into one chunked, compressed Zarr store.",
    ),
    "info": (
        "inkpipe.cli.pipeline",
        "info_command",
        "Show the fragments of a store: shapes, windows, size on disk, compression.",
    ),
    "train": (
        "inkpipe.cli.train",
        "train_command",
        "Train a model on crops streamed from a store.",
    ),
    "predict": (
        "inkpipe.cli.infer",
        "predict_command",
        "Predict ink on fragments; write submission.csv and pictures.",
    ),
    "evaluate": (
        "inkpipe.cli.evaluate",
        "evaluate_command",
        "Score a submission CSV against ink labels (F0.5).",
    ),
    "demo": (
        "inkpipe.cli.demo",
        "demo_command",
        "Synthesize data, ingest, train, predict and score: the whole job on CPU.",
    ),
}


class Interrupted(click.ClickException):
    """Ctrl-C: a short message and exit code 130."""

    exit_code = 130


def one_line(exc: BaseException) -> str:
    """Return the message of ``exc`` without a DataLoader worker's traceback.

    PyTorch re-raises an error from a DataLoader worker process as the same type, with the
    worker's whole traceback as the message; the last line holds the original message.
    """
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return last.removeprefix(prefix).removeprefix(f"{type(exc).__qualname__}: ")


class InkpipeGroup(click.Group):
    """A click group with lazily imported commands and one-line errors."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """All command names, loaded and lazy, in a stable order."""
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Return a command, importing it on first use."""
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            module, attr, _ = COMMANDS[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands without importing the lazy ones (keeps ``--help`` fast)."""
        rows = [(n, c.get_short_help_str(60)) for n, c in sorted(self.commands.items())]
        rows += [(n, h) for n, (_, _, h) in COMMANDS.items() if n not in self.commands]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; turn inkpipe errors, a full disk and Ctrl-C into one-line messages."""
        try:
            return super().invoke(ctx)
        except InkpipeError as exc:
            raise click.ClickException(one_line(exc)) from None
        except OSError as exc:
            if is_disk_full(exc):
                raise click.ClickException(disk_full_message(exc)) from None
            raise
        except KeyboardInterrupt:
            raise Interrupted(
                "interrupted; finished work is kept — run the same command again to resume "
                "(for train, add --resume)"
            ) from None


@click.group(cls=InkpipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="inkpipe")
def cli() -> None:
    """Find ink in CT scans of the Herculaneum papyri.

    \b
    A typical run:
      inkpipe synth data/                          # synthetic fragments (or use real ones)
      inkpipe ingest data/ --out store.zarr        # TIFF slices -> chunked Zarr + windows
      inkpipe info store.zarr                      # what the store holds
      inkpipe train --store store.zarr --layers 28:38 --out runs/a
      inkpipe predict --checkpoint runs/a/best.pt data/test/a --out pred/
      inkpipe evaluate pred/submission.csv --labels data/truth

    Or run everything on built-in synthetic data with: inkpipe demo
    """


def main() -> None:
    """Entry point of the ``inkpipe`` console script and of ``python -m inkpipe.cli``."""
    cli()
