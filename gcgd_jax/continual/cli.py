"""``gcgd-continual``: a continual-learning run (GEM's protocol by default) from the command line.

With no arguments at all it runs nothing: it prints its usage and an example and exits
with 2, as ``gcgd-train`` does.

Exit codes: 0 done; 2 bad input (no arguments, configuration, data, output folder,
``--resume`` with no readable checkpoint), one line naming the problem; 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

from gcgd_jax._cli import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    BadInput,
    add_config_options,
    add_run_options,
    config_to_load,
    fail,
    parse_arguments,
)

__all__ = ["main"]

_NO_ARGUMENTS = """gcgd-continual: nothing to run: give an output folder, e.g.

  gcgd-continual --out runs/pmnist-sgd

gcgd-continual --help shows every option.
"""

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
    add_config_options(p, "a TOML configuration file (default: GEM's protocol)")
    add_run_options(p, "folder holding MNIST's IDX files (sets tasks.data_dir)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    return p


_fail = functools.partial(fail, "gcgd-continual", one_line=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (the console script exits with it)."""
    args = parse_arguments(_parser(), argv, _NO_ARGUMENTS)
    if args is None:
        return EXIT_BAD_INPUT
    from gcgd_jax.continual.config import RunSection, load_config, to_toml
    from gcgd_jax.train.config import ConfigError

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.data_dir:
        overrides.append(f"tasks.data_dir={args.data_dir}")
    try:
        cfg = load_config(config_to_load(args, RunSection().out_dir), overrides)
    except (BadInput, ConfigError) as err:
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
