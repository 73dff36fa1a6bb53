"""The ``deltaops`` command line.

Subcommands so far: ``info`` (backends, ISA, versions) and ``demo`` (the
sparse family on a generated delta: each backend's result checked against the
reference, and its speed). Whole-checkpoint ``merge``/``compress``/``apply``
arrive with the checkpoint pipeline.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="deltaops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends built and usable, CPU ISA, versions")
    demo = sub.add_parser("demo", help="run the sparse ops on a generated delta, every backend")
    demo.add_argument("--rows", type=int, default=1024)
    demo.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main

        info_main()
    elif args.command == "demo":
        from .demo import run

        run(rows=args.rows, cols=args.cols)
