"""What the command lines ``gcgd-train`` and ``gcgd-continual`` share: exit codes, the
one-line failure, the run-folder options, and finding the configuration ``--resume`` reuses.

Light on purpose: nothing here imports JAX, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_NONFINITE",
    "EXIT_OK",
    "BadInput",
    "add_config_options",
    "add_run_options",
    "config_to_load",
    "fail",
    "parse_arguments",
]

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_INTERRUPTED = 0, 2, 3, 130


class BadInput(Exception):
    """A command line that cannot run (exit 2); the message is the one line it prints."""


def fail(prog: str, message: object, code: int = EXIT_BAD_INPUT, *, one_line: bool = False) -> int:
    """Writes ``<prog>: error: <message>`` to stderr and returns ``code``, the exit code.

    ``one_line`` folds the message's white space (line breaks included) to single spaces.
    """
    text = " ".join(str(message).split()) if one_line else message
    sys.stderr.write(f"{prog}: error: {text}\n")
    return code


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, no_arguments: str
) -> argparse.Namespace | None:
    """The parsed command line (``sys.argv`` when ``argv`` is None), JAX's CPU flags set.

    With no arguments at all nothing runs: the usage and ``no_arguments`` go to stderr and
    the result is None (exit 2). ``--help`` answers while parsing, before JAX is imported;
    the flags are set after it, before anything initialises JAX's backends.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_usage(sys.stderr)
        sys.stderr.write(no_arguments)
        return None
    args = parser.parse_args(argv)
    from gcgd_jax.ops.xla_flags import apply_cpu_flags

    apply_cpu_flags()
    return args


def add_config_options(parser: argparse.ArgumentParser, config_help: str) -> None:
    """``--config``/``-c`` (its help: ``config_help``), ``--set``/``-s`` (repeatable
    ``section.key=value`` overrides, into ``overrides``) and ``--out``/``-o``."""
    parser.add_argument("--config", "-c", help=config_help)
    parser.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting (repeatable)",
    )
    parser.add_argument("--out", "-o", help="output folder (default: run.out_dir)")


def add_run_options(parser: argparse.ArgumentParser, data_dir_help: str) -> None:
    """``--data-dir`` (its help: ``data_dir_help``), ``--resume``, ``--overwrite`` and
    ``--print-config``."""
    parser.add_argument("--data-dir", help=data_dir_help)
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration and exit"
    )


def config_to_load(args: argparse.Namespace, default_out: str) -> str | None:
    """The configuration a run starts from: ``--config``; else, with ``--resume``, the
    ``config.toml`` the run wrote into its folder (``--out``, else ``default_out``).

    Raises:
        BadInput: ``--out`` names a file, or ``--resume`` finds no run to continue.
    """
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise BadInput(f"output folder {args.out} is a file; choose another --out")
    if args.config is not None or not args.resume:
        return args.config
    saved = Path(args.out or default_out) / "config.toml"
    if not saved.is_file():
        raise BadInput(
            f"nothing to resume in {saved.parent}: it holds no config.toml of an earlier run "
            "(give --out the run's folder, or --config to start one there)"
        )
    return str(saved)
