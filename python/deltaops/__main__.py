"""``python -m deltaops``: the command line (see :mod:`deltaops.cli`)."""

from .cli import main

main()
