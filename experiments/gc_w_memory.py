"""Extra memory of GC-W on the kernels it is meant for, from the state's arrays.

Selected kernels (the last conv of each stage's last block, i.e. the layer
before down-sampling): ResNet-20 (3, 3, 16, 16), (3, 3, 32, 32), (3, 3, 64, 64);
ResNet-18 (3, 3, 64, 64), (3, 3, 128, 128), (3, 3, 256, 256), (3, 3, 512, 512).
Sizes come from ``jax.eval_shape(gc_w(...).init, params)`` (nothing allocated),
via ``gcgd_jax.transforms.gc_w.gc_w_memory_floats``.

Usage: python experiments/gc_w_memory.py [--out experiments/results/gc_w_memory.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from gcgd_jax.transforms.gc_w import gc_w_memory_floats

NETWORKS = {
    "ResNet-20": [(3, 3, 16, 16), (3, 3, 32, 32), (3, 3, 64, 64)],
    "ResNet-18": [(3, 3, 64, 64), (3, 3, 128, 128), (3, 3, 256, 256), (3, 3, 512, 512)],
}
SETTINGS = [{"num_heads": 1, "head_size": 32}, {"num_heads": 4, "head_size": 32}]


def formula(shapes, h, d):
    n_sel = sum(math.prod(s) for s in shapes)
    pred = sum(4 * math.prod(s[:-1]) * h * d + 4 * h * d + 2 for s in shapes)
    return 4 * n_sel + 3 * pred + 4


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/gc_w_memory.md")
    args = parser.parse_args(argv)
    lines = [
        "# GC-W extra memory (float32 words, from the state's arrays)",
        "",
        (
            f"Command: `python {' '.join(['experiments/gc_w_memory.py', *(argv or sys.argv[1:])])}`; "
            f"machine: {platform.machine()} {platform.system()}, jax {jax.__version__}; "
            f"date: {datetime.date.today().isoformat()}."
        ),
        "",
        (
            "Formula (docstring of `gc_w`): `4 N + 3 Σ_l (4 n_l h d + 4 h d + 2) + 4` words, "
            "N = selected parameters, n_l = fan-in of kernel l, h heads of size d. "
            "Buffers = ema, stored_grad, stored_ema, target_sum (4 N); predictor = "
            "A_q, A_k, A_v, A_o, key/value source biases, 2 mixing weights; Adam = its mu and nu "
            "(+ a counter). The computed total is checked against the formula below."
        ),
        "",
        (
            "| network | h × d | selected params N | buffers | predictor | predictor Adam | "
            "total words | MiB (f32) | total / N |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for net, shapes in NETWORKS.items():
        params = {
            f"stage{i + 1}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)
        }
        n_sel = sum(math.prod(s) for s in shapes)
        for setting in SETTINGS:
            c = gc_w_memory_floats(params, **setting)
            h, d = setting["num_heads"], setting["head_size"]
            assert c["total"] == formula(shapes, h, d), (net, setting, c)
            lines.append(
                f"| {net} | {h} × {d} | {n_sel:,} | {c['buffers']:,} | {c['predictor']:,} | "
                f"{c['predictor_adam']:,} | {c['total']:,} | {c['bytes'] / 2**20:.2f} | "
                f"{c['total'] / n_sel:.2f} |"
            )
    lines += [
        "",
        (
            "For scale: ResNet-20 has about 0.27 M parameters and a CIFAR ResNet-18 about 11.2 M; "
            "an SGD-momentum state is 1 word per parameter, Adam's 2."
        ),
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
