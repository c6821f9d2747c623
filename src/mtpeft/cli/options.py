"""Options several commands share (same flags, same help text everywhere)."""

from __future__ import annotations

import argparse

SET_HELP = "Override a run-config key, e.g. --set train.lr=1e-4 --set method.r=16 (repeatable)."


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): run-config overrides, collected in ``args.set``."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bars."""
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
