"""``python -m gcgd_jax.train``: the same as the ``gcgd-train`` command."""

import sys

from gcgd_jax.train.cli import main

sys.exit(main())
