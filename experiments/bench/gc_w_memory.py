"""Extra memory of GC-W on the kernels it is meant for, from the state's arrays.

Selected kernels (the last conv of each stage's last block, i.e. the layer
before down-sampling): ResNet-20 (3, 3, 16, 16), (3, 3, 32, 32), (3, 3, 64, 64);
ResNet-18 (3, 3, 64, 64), (3, 3, 128, 128), (3, 3, 256, 256), (3, 3, 512, 512).
Sizes come from ``jax.eval_shape(gc_w(...).init, params)`` (nothing allocated),
via ``gcgd_jax.transforms.gc_w.gc_w_memory_floats``.

GC-W v2 (``gc_w_v2``) is counted too, per kernel and for every kernel of both
networks, via ``gcgd_jax.transforms.gc_w_v2.gc_w_v2_memory_floats``.

The counts are exact (from the shapes), not measured: nothing is timed, so there is no
alternation; the record and its table go through the shared writer
(``experiments.common.results``: JSON + markdown with command, machine, date and commit).

Usage: python -m experiments.bench.gc_w_memory [--out experiments/results/gc_w_memory/gc_w_memory.md]
(the markdown file; the JSON record goes beside it).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments import RESULTS
from experiments.common.provenance import describe_machine, git_commit, machine
from experiments.common.results import command, utc_now, write
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


def v1_rows() -> list[dict]:
    """GC-W v1 per network and predictor setting, checked against :func:`formula`."""
    rows = []
    for net, shapes in NETWORKS.items():
        params = {
            f"stage{i + 1}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)
        }
        for setting in SETTINGS:
            c = gc_w_memory_floats(params, **setting)
            h, d = setting["num_heads"], setting["head_size"]
            assert c["total"] == formula(shapes, h, d), (net, setting, c)
            rows.append({"network": net, "num_heads": h, "head_size": d,
                         "selected": sum(math.prod(s) for s in shapes), **c})  # fmt: skip
    return rows


def v2_rows() -> dict[str, list[dict]]:
    """GC-W v2 (defaults: decays (0.5, 0.9, 0.99), horizon 1, 2 heads x 8): ``kernels``
    (one selected kernel each) and ``networks`` (the pre-down-sampling kernels, every
    kernel), checked against :func:`v2_formula`."""
    from experiments.bench.bench_transforms import resnet18_shapes, resnet20_shapes
    from gcgd_jax.transforms.gc_w_v2 import gc_w_v2_memory_floats

    kernels = []
    for shape in NETWORKS["ResNet-20"] + NETWORKS["ResNet-18"][1:]:
        c = gc_w_v2_memory_floats({"k": jax.ShapeDtypeStruct(shape, jnp.float32)})
        assert c["total"] == v2_formula([shape]), (shape, c)
        kernels.append({"shape": list(shape), "n": math.prod(shape), **c})
    networks = []
    every = {"ResNet-20": resnet20_shapes(), "ResNet-18": resnet18_shapes()}
    for net, shapes in NETWORKS.items():
        rows = [("3 pre-down-sampling" if net == "ResNet-20" else "4 pre-down-sampling", shapes)]
        is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)
        all_kernels = [s for s in jax.tree.leaves(every[net], is_leaf=is_shape) if len(s) >= 2]
        rows.append((f"every kernel ({len(all_kernels)})", all_kernels))
        for label, sel in rows:
            params = {f"k{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(sel)}
            c = gc_w_v2_memory_floats(params)
            assert c["total"] == v2_formula(sel), (net, label, c)
            networks.append({"network": net, "kernels": label,
                             "selected": sum(math.prod(s) for s in sel), **c})  # fmt: skip
    return {"kernels": kernels, "networks": networks}


def _markdown(record: dict) -> str:
    lines = [
        "# GC-W extra memory (float32 words, from the state's arrays)",
        "",
        (
            f"Command: `{record['command']}`; machine: {describe_machine(record['machine'])}; "
            f"date: {record['date']}; commit {record.get('commit') or 'unknown'}."
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
    for r in record["v1"]:
        lines.append(
            f"| {r['network']} | {r['num_heads']} × {r['head_size']} | {r['selected']:,} | "
            f"{r['buffers']:,} | {r['predictor']:,} | {r['predictor_adam']:,} | {r['total']:,} | "
            f"{r['bytes'] / 2**20:.2f} | {r['total'] / r['selected']:.2f} |"
        )
    lines += [
        "",
        (
            "For scale: ResNet-20 has about 0.27 M parameters and a CIFAR ResNet-18 about 11.2 M; "
            "an SGD-momentum state is 1 word per parameter, Adam's 2."
        ),
        "",
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
    for r in record["v2"]["kernels"]:
        lines.append(
            f"| {tuple(r['shape'])} | {r['n']:,} | {r['buffers']:,} | "
            f"{r['predictor'] + r['predictor_adam']:,} | {r['total']:,} | {r['bytes'] / 2**10:.1f} |"
        )
    lines += [
        "",
        "| network | kernels | selected params N | total words | MiB (f32) | total / N |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in record["v2"]["networks"]:
        lines.append(
            f"| {r['network']} | {r['kernels']} | {r['selected']:,} | {r['total']:,} | "
            f"{r['bytes'] / 2**20:.2f} | {r['total'] / r['selected']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "gc_w_memory" / "gc_w_memory.md",
        help="the markdown file (its JSON record goes beside it)",
    )
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv_used)
    record = {
        "command": command("experiments.bench.gc_w_memory", argv_used),
        "date": utc_now(),
        "commit": git_commit(),
        "machine": machine(),
        "v1": v1_rows(),
        "v2": v2_rows(),
    }
    text = _markdown(record)
    write(args.out.parent, args.out.name.removesuffix(".md"), record, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
