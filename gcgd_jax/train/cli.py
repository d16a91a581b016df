"""``gcgd-train``: train a configuration from ``gcgd_jax/configs`` (or a TOML file).

With no arguments at all it trains nothing: it prints its usage and the
quickstart command and exits with 2 (a job that decodes a data set and writes
a run folder nobody named is not what a first try should start).

Exit codes: 0 done; 2 bad input (no arguments, configuration, data, output
folder, ``--resume`` with no readable checkpoint); 3 stopped on a non-finite
loss (a checkpoint of the last good state is kept); 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

from gcgd_jax._cli import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_OK,
    BadInput,
    add_config_options,
    add_run_options,
    config_to_load,
    fail,
    parse_arguments,
)

__all__ = ["main"]

_EPILOG = """\
examples:
  gcgd-train --config quickstart --out runs/quickstart
  gcgd-train --config cifar10_resnet20 --set optim.lr=0.05 --set train.budget=0.5 --out runs/b05
  gcgd-train --out runs/b05 --resume          # continue a run (its config.toml is reused)
  gcgd-train --config cifar10_resnet20 --seeds 0,1,2,3 --out runs/r20   # 4 seeds, one step
  gcgd-train --config quickstart --print-config

Overrides are section.key=value (corrections.gc_w.rho=0.3 for a correction's
option); --list-configs shows the configurations found. Every configuration key,
with its value: --print-config; what each key means: the docs' CLI guide
(docs/guides/cli.md) and the API page of gcgd_jax.train.TrainConfig.

exit codes:
  0    done
  2    bad input: no arguments, configuration, data, an occupied output folder
       (an earlier run, or a live one writing it), --resume with no readable
       checkpoint (one line naming the problem)
  3    stopped on a non-finite loss (the last good state is checkpointed)
  130  interrupted
"""

_NO_ARGUMENTS = """gcgd-train: nothing to train: give a configuration. To train the quickstart (ResNet-20
with GC-W on Fashion-MNIST, one epoch, offline; about 40 s on a 2-core CPU):

  gcgd-train --config quickstart --out runs/quickstart

gcgd-train --list-configs shows the configurations; gcgd-train --help, every option.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gcgd-train",
        description="Train an image classifier with gradient corrections (JAX / Flax NNX / optax).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=_version())
    add_config_options(p, "configuration name in gcgd_jax/configs, or a TOML path")
    p.add_argument(
        "--seeds",
        metavar="S1,S2,...",
        help="train one replica per seed in one jitted step, into <out>/s<seed>/ "
        "(sets run.seeds; see gcgd_jax.train.trainer)",
    )
    add_run_options(p, "folder holding the data set files (sets data.data_dir)")
    p.add_argument(
        "--list-configs", action="store_true", help="list the configurations found and exit"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (sets log.progress=false)"
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to <out>/tensorboard (sets log.tensorboard=true; "
        "needs pip install 'gcgd-jax[tensorboard]')",
    )
    return p


def _version() -> str:
    """``gcgd-train X (jax X, jaxlib X, flax X, optax X; Python X)``, read from the installed
    distributions' metadata, so ``--version`` answers without starting JAX."""
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    from gcgd_jax import __version__

    deps = ", ".join(f"{n} {version(n)}" for n in ("jax", "jaxlib", "flax", "optax"))
    return f"gcgd-train {__version__} ({deps}; Python {sys.version.split()[0]})"


_fail = functools.partial(fail, "gcgd-train")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (the console script exits with it)."""
    args = parse_arguments(_parser(), argv, _NO_ARGUMENTS)
    if args is None:
        return EXIT_BAD_INPUT

    from gcgd_jax.train.config import CONFIG_DIRS, ConfigError, RunConfig, load_config

    if args.list_configs:
        seen = set()
        for folder in CONFIG_DIRS:
            for path in sorted(Path(folder).glob("*.toml")) if Path(folder).is_dir() else ():
                if path.resolve() not in seen:
                    seen.add(path.resolve())
                    print(f"{path.stem:32s} {path}")
        return EXIT_OK

    overrides = list(args.overrides)
    if args.no_progress:
        overrides.append("log.progress=false")
    if args.tensorboard:
        overrides.append("log.tensorboard=true")
    if args.seeds is not None:
        try:
            seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            return _fail(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
        overrides.append(f"run.seeds={seeds}")
    try:
        cfg = load_config(config_to_load(args, RunConfig().out_dir), overrides)
    except (BadInput, ConfigError) as err:
        return _fail(str(err))
    if args.out:
        cfg = cfg.replace(run={"out_dir": args.out})
    if args.data_dir:
        cfg = cfg.replace(data={"data_dir": args.data_dir})
    if args.print_config:
        from gcgd_jax.train.config import ignored_options_note, to_toml

        note = ignored_options_note(cfg)
        if note is not None:
            sys.stderr.write(note + "\n")
        print(to_toml(cfg), end="")
        return EXIT_OK

    from gcgd_jax.train.trainer import CheckpointError, NonFiniteLossError, Trainer, replica_dir

    try:
        from gcgd_jax.data import DataFormatError, DatasetNotFoundError

        data_errors: tuple[type[BaseException], ...] = (DataFormatError, DatasetNotFoundError)
    except ImportError:  # pragma: no cover - data package without these names
        data_errors = (FileNotFoundError,)
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
        summaries = trainer.run()
    except (ConfigError, CheckpointError) as err:
        return _fail(str(err))
    except data_errors as err:
        return _fail(f"data: {err}")
    except NonFiniteLossError as err:
        return _fail(str(err), EXIT_NONFINITE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    print(trainer.summary_table())
    for seed, record in summaries.items():
        if cfg.run.seeds:
            _print_final(record, replica_dir(trainer.out, seed), f"s{seed}: ")
        else:
            _print_final(record, trainer.out)
    return EXIT_OK


def _print_final(summary: dict, out: Path, label: str = "") -> None:
    key = next((k for k in ("final_test_acc", "final_val_acc") if summary.get(k) is not None), None)
    if key is not None:
        print(f"{label}{key} = {summary[key]:.4f}; metrics in {out / 'metrics.jsonl'}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
