"""One process of the two-process test (``test_multiprocess.py``); not a test module itself.

Usage: ``python -m tests.train.multiprocess_worker PROCESS_ID NUM_PROCESSES PORT OUT [KEY=VALUE ...]``.
With one process it is the reference run (give it as many devices, via XLA_FLAGS, as the
multi-process run has in all).
"""

import sys


def main() -> None:
    pid, count, port, out, *overrides = sys.argv[1:]
    import jax

    if int(count) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{port}",
            num_processes=int(count),
            process_id=int(pid),
            initialization_timeout=120,
        )
    from gcgd_jax.train import Trainer, load_config

    cfg = load_config(None, overrides)
    Trainer(cfg, out_dir=out).run()


if __name__ == "__main__":
    main()
