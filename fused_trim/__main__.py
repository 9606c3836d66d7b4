"""Command line: ``python -m fused_trim demo [flags]`` (also the ``fused-trim`` console script)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen command; returns the exit code."""
    from . import demo

    parser = argparse.ArgumentParser(prog="fused-trim", description="fused_trim command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo_parser = commands.add_parser(
        "demo",
        help="train a model with and without mini-batch trimming over several seeds and compare",
        description=demo.__doc__.split("\n")[0],
    )
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    try:
        demo.run_demo(demo.config_from_args(args))
    except ValueError as exc:
        demo_parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
