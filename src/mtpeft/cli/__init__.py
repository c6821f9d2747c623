"""Command line: ``mtpeft train | eval | export | predict | validate | demo | bench | analyze | methods``.

One module per command, each with ``add_parser(subparsers)`` and ``run(args)``. Commands raise mtpeft errors
for bad input; :func:`main` prints them, and the operating system's errors (a missing path, a read-only folder, a
full disk), as one line and returns 2; 130 for an interrupt; 1 only for a bug (an unexpected exception, with its
traceback). Nothing in the library imports this package.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import MtpeftError, TrainingInterrupted
from . import analyze, bench, demo, export, methods, predict, train, validate
from . import eval as eval_command  # imported under another name: `eval` would shadow the builtin here

#: The commands, in the order ``mtpeft --help`` lists them.
COMMANDS = (train, validate, eval_command, export, predict, demo, methods, bench, analyze)


def version_text() -> str:
    """``mtpeft X (python, torch, transformers, peft versions)``: what a bug report needs."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers", "peft", "accelerate"))
    return f"mtpeft {__version__} (python {sys.version.split()[0]}, {libraries})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every option has help text)."""
    parser = argparse.ArgumentParser(prog="mtpeft", description="Multi-task low-rank adaptation of transformers "
                                     "models: train, evaluate, export, benchmark.")
    parser.add_argument("--version", action="version", version=version_text(),
                        help="Print the versions of mtpeft and of the libraries it runs on, and exit.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def one_line(exc: BaseException) -> str:
    """The message of an error on one line (a library's multi-line message too)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mtpeft`` command."""
    args = build_parser().parse_args(argv)
    # bitsandbytes (imported by PEFT when installed) warns at import on CPUs with AVX512-BF16 that an optional
    # 4-bit CPU kernel package is missing, in every command, quantized or not; its own fallback runs instead
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as exc:  # 128 + SIGINT, as shells report an interrupted command
        print(f"error: {exc}", file=sys.stderr)
        return 130
    except (MtpeftError, OSError, ValueError) as exc:  # a user error: bad input, or a path the user gave
        if os.environ.get("MTPEFT_DEBUG"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        print("(set MTPEFT_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
