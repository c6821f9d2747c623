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


def add_trust_remote_code_option(parser: argparse.ArgumentParser) -> None:
    """``--trust-remote-code``: let a run folder whose config sets ``model.trust_remote_code`` run its model's code."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Allow a run whose run_config.yaml sets model.trust_remote_code: true to run its model "
                        "repository's code (refused otherwise: opening a run folder never runs code by itself).")


def add_overwrite_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite``: write into a non-empty folder that is not mtpeft's own output of this kind."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"Write into {what} even when it is a non-empty folder that is not mtpeft's own output "
                        "(or, for train, restart a run that has checkpoints); only the files mtpeft writes are "
                        "replaced, every other file is kept.")
