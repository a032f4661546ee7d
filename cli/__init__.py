"""inkpipe.cli: the ``inkpipe`` command line, a thin layer above the three stages.

It imports ``pipeline``, ``train`` and ``infer``; none of them imports it. Each command parses
its options into a stage's frozen config (defaults read from that config, see
:mod:`inkpipe.cli.options`) and calls one plain function. ``python -m inkpipe.cli`` runs the
same command line, e.g. under torchrun: ``torchrun --nproc-per-node 2 -m inkpipe.cli train …``.
"""

from .group import cli, main

__all__ = ["cli", "main"]
