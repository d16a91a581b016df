"""``gcgd-continual``: a continual-learning run (GEM's protocol by default) from the command line.

With no arguments at all it runs nothing: it prints its usage and an example and exits
with 2, as ``gcgd-train`` does.

Exit codes: 0 done; 2 bad input (no arguments, configuration, data, output folder,
``--resume`` with no readable checkpoint), one line naming the problem; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 2, 130

_EPILOG = """\
examples:
  gcgd-continual --out runs/pmnist-sgd                      # GEM's protocol, plain SGD
  gcgd-continual --set method.name=layerwise_decomposition --set tasks.benchmark=rotated_mnist \\
      --set run.seed=1 --out runs/rmnist-lgd-s1
  gcgd-continual --out runs/pmnist-sgd --resume             # continue (its config.toml is reused)
  gcgd-continual --set method.name=gem --print-config

The defaults are GEM's protocol on Permuted MNIST: 20 tasks of 1,000 training images,
MLP 2 x 100, batch 10, one epoch a task, SGD lr 0.1, 256 memories a task. Overrides are
section.key=value (method.options.memory_strength=0.3 for a method's option); methods:
sgd, and the continual methods of gcgd_jax.methods. MNIST's IDX files are read from
--data-dir, else $GCGD_DATA_DIR, else ../shared/data (never downloaded).

exit codes:
  0    done
  2    bad input: no arguments, configuration, data, an occupied output folder, --resume
       with no readable checkpoint (one line naming the problem)
  130  interrupted (--resume continues from the last finished task)
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gcgd-continual",
        description="Continual learning (Permuted / Rotated MNIST) with gradient corrections "
        "fed the old tasks' memory gradients: plain SGD, A-GEM, GEM, layerwise decomposition.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", help="a TOML configuration file (default: GEM's protocol)")
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting (repeatable)",
    )
    p.add_argument("--out", "-o", help="output folder (default: run.out_dir)")
    p.add_argument("--data-dir", help="folder holding MNIST's IDX files (sets tasks.data_dir)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration and exit"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    return p


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    one_line = " ".join(str(message).split())
    sys.stderr.write(f"gcgd-continual: error: {one_line}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (the console script exits with it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        _parser().print_usage(sys.stderr)
        sys.stderr.write(
            "gcgd-continual: nothing to run: give an output folder, e.g.\n\n"
            "  gcgd-continual --out runs/pmnist-sgd\n\n"
            "gcgd-continual --help shows every option.\n"
        )
        return EXIT_BAD_INPUT
    args = _parser().parse_args(argv)  # --help answers here, before JAX is imported
    from gcgd_jax.ops.xla_flags import apply_cpu_flags

    apply_cpu_flags()  # before anything initialises JAX's backends
    from gcgd_jax.continual.config import load_config, to_toml
    from gcgd_jax.train.config import ConfigError

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.data_dir:
        overrides.append(f"tasks.data_dir={args.data_dir}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        return _fail(f"output folder {args.out} is a file; choose another --out")
    config = args.config
    if config is None and args.resume:
        saved = Path(args.out or "runs/continual") / "config.toml"
        if not saved.is_file():
            return _fail(
                f"nothing to resume in {saved.parent}: it holds no config.toml of an earlier run "
                "(give --out the run's folder, or --config to start one there)"
            )
        config = str(saved)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        return _fail(str(err))
    if args.print_config:
        print(to_toml(cfg), end="")
        return EXIT_OK

    from gcgd_jax.continual.runner import ContinualRunner
    from gcgd_jax.data import DataFormatError, DatasetNotFoundError

    try:
        runner = ContinualRunner(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            stream=None if args.quiet else sys.stderr,
        )
        summary = runner.run()
    except ConfigError as err:
        return _fail(str(err))
    except (DataFormatError, DatasetNotFoundError) as err:
        return _fail(f"data: {err}")
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    assert summary is not None
    print(
        f"ACC = {summary['acc']:.4f}, BWT = {summary['bwt']:+.4f}, FWT = {summary['fwt']:+.4f}; "
        f"metrics in {runner.out / 'metrics.jsonl'}"
    )
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
