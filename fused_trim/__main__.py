"""Command line: ``python -m fused_trim demo [flags]`` (also the ``fused-trim`` console script) and
``python -m fused_trim build`` (compile the native op ahead of time and print the library's path)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _build(args: argparse.Namespace) -> int:
    """Build (or find in the cache) and load the native op; print its path, or the reason it failed."""
    import torch

    from . import native

    try:
        path = native.build(force=args.force, verbose=args.verbose)
    except RuntimeError as exc:
        print(f"fused_trim: the native op could not be built: {exc}", file=sys.stderr)
        return 1
    reason = native.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        print(f"fused_trim: the native op was built ({path}) but does not load: {reason}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen command; returns the exit code."""
    from . import demo

    argv = list(sys.argv[1:] if argv is None else argv)
    # Each task has its own flags (the LM's steps and model size are not the classifier's epochs and
    # data set): --task is read first, then the demo's parser gets that task's flags.
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--task")
    task = peek.parse_known_args(argv[1:])[0].task if argv[:1] == ["demo"] else None
    if task == "lm":
        from .demo import lm as flags
    else:
        flags = demo
    parser = argparse.ArgumentParser(prog="fused-trim", description="fused_trim command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo_parser = commands.add_parser(
        "demo",
        help="train a model with and without mini-batch trimming over several seeds and compare",
        description=demo.__doc__.split("\n")[0],
    )
    flags.add_arguments(demo_parser)
    build_parser = commands.add_parser(
        "build",
        help="compile the native CPU (and CUDA) op ahead of time and print the cached library's path",
        description="Compile the native op (once per machine; later runs find it in the cache) and print the "
        "shared library's path. Exits non-zero with the reason when it cannot be built or loaded.",
    )
    build_parser.add_argument("--force", action="store_true", help="rebuild even when a cached library exists")
    build_parser.add_argument("--verbose", action="store_true", help="print the compiler commands")
    args = parser.parse_args(argv)
    if args.command == "build":
        return _build(args)
    try:
        demo.run_demo(flags.config_from_args(args))
    except ValueError as exc:
        demo_parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
