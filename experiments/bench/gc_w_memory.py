"""Extra memory of GC-W on the kernels it is meant for, from the state's arrays.

Selected kernels (the last conv of each stage's last block, i.e. the layer
before down-sampling): ResNet-20 (3, 3, 16, 16), (3, 3, 32, 32), (3, 3, 64, 64);
ResNet-18 (3, 3, 64, 64), (3, 3, 128, 128), (3, 3, 256, 256), (3, 3, 512, 512).
Sizes come from ``jax.eval_shape(gc_w(...).init, params)`` (nothing allocated),
via ``gcgd_jax.transforms.gc_w.gc_w_memory_floats``.

GC-W v2 (``gc_w_v2``) is counted too, per kernel and for every kernel of both
networks, via ``gcgd_jax.transforms.gc_w_v2.gc_w_v2_memory_floats``.

Usage: python -m experiments.bench.gc_w_memory [--out experiments/results/gc_w_memory/gc_w_memory.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.common.provenance import describe_machine, machine
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


def v2_formula(shapes, decays=3, horizon=1, h=2, d=8):
    """Words of gc_w_v2's state: (K + 2 + (k - 1) T) n + k per kernel, 3 predictor-sized
    parts (weights, Adam mu, nu) of h (2 T d + 2 d + T) + T per kernel, Adam's count,
    and 3 scalars."""
    t = decays + 2
    per_kernel_pred = h * (2 * t * d + 2 * d + t) + t
    bufs = sum((decays + 2 + (horizon - 1) * t) * math.prod(s) + horizon for s in shapes)
    return bufs + 3 * per_kernel_pred * len(shapes) + 1 + 3


def v2_lines():
    """GC-W v2 (defaults: decays (0.5, 0.9, 0.99), horizon 1, 2 heads x 8): per kernel and totals."""
    from experiments.bench.bench_transforms import resnet18_shapes, resnet20_shapes
    from gcgd_jax.transforms.gc_w_v2 import gc_w_v2_memory_floats

    lines = [
        "",
        "## GC-W v2 (`gc_w_v2`, defaults: 3 decays, horizon 1, 2 heads × 8)",
        "",
        (
            "Per selected kernel of n entries: `(K + 2 + (k - 1)·T)·n + k` buffer words (K = 3 "
            "EMAs, the previous gradient, the previous difference token, k - 1 = 0 stored feature "
            "sets of T = 5 tokens: the last step's features are rebuilt from the others, bit for "
            "bit; k = 1 scale) = **5 n + 1**, plus a predictor of `h(2Td + 2d + T) + T` = 207 weights, ×3 with its "
            "Adam state (621 words; 622 with Adam's step count), whatever n. Checked against `gc_w_v2_memory_floats` "
            "(the state's arrays) below."
        ),
        "",
        "| kernel | n | buffers | predictor + Adam | total words | KiB (f32) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for shape in NETWORKS["ResNet-20"] + NETWORKS["ResNet-18"][1:]:
        c = gc_w_v2_memory_floats({"k": jax.ShapeDtypeStruct(shape, jnp.float32)})
        assert c["total"] == v2_formula([shape]), (shape, c)
        lines.append(
            f"| {shape} | {math.prod(shape):,} | {c['buffers']:,} | "
            f"{c['predictor'] + c['predictor_adam']:,} | {c['total']:,} | {c['bytes'] / 2**10:.1f} |"
        )
    lines += [
        "",
        "| network | kernels | selected params N | total words | MiB (f32) | total / N |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    every = {
        "ResNet-20": resnet20_shapes(),
        "ResNet-18": resnet18_shapes(),
    }
    for net, shapes in NETWORKS.items():
        rows = [("3 pre-down-sampling" if net == "ResNet-20" else "4 pre-down-sampling", shapes)]
        is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)
        kernels = [s for s in jax.tree.leaves(every[net], is_leaf=is_shape) if len(s) >= 2]
        rows.append((f"every kernel ({len(kernels)})", kernels))
        for label, sel in rows:
            params = {f"k{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(sel)}
            c = gc_w_v2_memory_floats(params)
            assert c["total"] == v2_formula(sel), (net, label, c)
            n_sel = sum(math.prod(s) for s in sel)
            lines.append(
                f"| {net} | {label} | {n_sel:,} | {c['total']:,} | {c['bytes'] / 2**20:.2f} | "
                f"{c['total'] / n_sel:.2f} |"
            )
    lines.append("")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/gc_w_memory/gc_w_memory.md")
    args = parser.parse_args(argv)
    lines = [
        "# GC-W extra memory (float32 words, from the state's arrays)",
        "",
        (
            f"Command: `python -m {' '.join(['experiments.bench.gc_w_memory', *(argv or sys.argv[1:])])}`; "
            f"machine: {describe_machine(machine())}; "
            f"date: {datetime.date.today().isoformat()}."
        ),
        "",
        "## GC-W v1 (`gc_w`)",
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
    lines += v2_lines()
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
