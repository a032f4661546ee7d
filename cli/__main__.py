"""``python -m inkpipe.cli``: the ``inkpipe`` command line (torchrun launches it this way)."""

from .group import main

main()
