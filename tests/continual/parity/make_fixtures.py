"""Writes the continual-learning parity fixtures: the authors' projections on fixed vectors.

Run from the repository root with a Python that has PyTorch, NumPy, quadprog, SciPy and
scikit-learn (no JAX needed)::

    /work/torchvenv/bin/python -m pip install quadprog scipy scikit-learn
    /work/torchvenv/bin/python tests/continual/parity/make_fixtures.py --mirrors /work/.mirror

``--mirrors`` holds a git clone of each reference repository. The functions named below
are read from it at the pinned commit, cut out of their file (its imports of the models
and of scikit-learn are not needed for them) and executed at run time
(:mod:`tests.parity.mirrors`); none of their code is copied into this project.

The committed fixtures were made with Python 3.11.7, torch 2.13.0+cpu, numpy 2.4.6,
quadprog 0.1.14, scipy 1.17.1 and scikit-learn 1.9.1 (recorded in every fixture's
``meta``), from:

==========================  ============================================  ===============================
method                      repository @ commit                           file (function called)
==========================  ============================================  ===============================
layerwise decomposition     tangshixiang/grad-cl                          model/newblockgem_group5_pca_
                            @ dd0a1543c0defe6f41aeca481aa9859522d00689    partmargin.py (project5cone5);
                                                                          ..._pca1_/_pca3_partmargin.py
GEM                         facebookresearch/GradientEpisodicMemory       model/gem.py (project2cone2)
                            @ 34c6b8e9a0607db7567301c48b727430d20bee7e
A-GEM (paper rule)          tangshixiang/grad-cl @ dd0a1543...            model/agem.py (agem)
A-GEM (grad-cl's baseline)  GEM's project2cone2 on the mean memory        as grad-cl's model/agem.py
                            gradient, margin 0.5                          ``Net.observe`` calls it
==========================  ============================================  ===============================

What is ours here (glue, written from the callers in the same files): the conflict checks
before GEM's and A-GEM's projections (``(dotp < 0).sum() != 0`` in GEM's and grad-cl's
``Net.observe``; ``tf.cond(dotp >= 0, ...)`` in facebookresearch/agem), the block
boundaries (``Net.__init__`` of the layerwise file: five consecutive tensors per block;
also one block per tensor and one for the whole network) and the branch labels in
``meta`` (from a NumPy reading of ``project5cone5``, to show which of its cases each block
exercises). PyTorch's default dtype is set to float64, so that the float64 results of the
authors' functions reach the fixture without a float32 round trip; inputs are float32.

Each ``<method>.npz`` holds ``meta`` (JSON: references, versions, command, the tensor
shapes and every case's settings, with the name of its input), per input ``<input>.grad``
``(P,)`` and ``<input>.memory`` ``(K, P)`` (float32, the tensors of ``SHAPES`` flattened
and concatenated in order) and per case ``<case>.out`` ``(P,)`` (float64, the reference's
result).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import sys
import tempfile
import types
from importlib.metadata import version
from pathlib import Path

import numpy as np
import quadprog
import torch
from scipy.linalg import orth
from sklearn.decomposition import PCA

if (root := str(Path(__file__).resolve().parents[3])) not in sys.path:
    sys.path.insert(0, root)  # run as a script: the repository's root, for `tests`
from tests.parity.mirrors import add_mirrors_argument, load_module

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COMMAND = (
    "/work/torchvenv/bin/python tests/continual/parity/make_fixtures.py --mirrors /work/.mirror"
)

#: The "network": the six tensors of an MLP 4-6-5-6 in PyTorch registration order (the
#: shape of grad-cl's MNIST MLP, smaller), 101 numbers, every tensor larger than the 4
#: task-specific directions of 5 tasks. Blocks of five (the layerwise file's grouping):
#: tensors 0-4 and 5, as for grad-cl's MLP.
SHAPES = [(6, 4), (6,), (5, 6), (5,), (6, 5), (6,)]
SIZES = [int(np.prod(s)) for s in SHAPES]
BOUNDS = np.cumsum([0, *SIZES])

REFERENCES = {
    "grad-cl": ("tangshixiang/grad-cl", "dd0a1543c0defe6f41aeca481aa9859522d00689"),
    "gem": ("facebookresearch/GradientEpisodicMemory", "34c6b8e9a0607db7567301c48b727430d20bee7e"),
}
LAYERWISE_FILE = "model/newblockgem_group5_pca_partmargin.py"
PCA_FILES = {
    1: "model/newblockgem_group5_pca1_partmargin.py",
    3: "model/newblockgem_group5_pca3_partmargin.py",
}


# --------------------------------------------------------------------------- references


def load_functions(mirrors: Path, key: str, path: str, names: tuple[str, ...]) -> types.ModuleType:
    """The named top-level functions of a reference file at its pinned commit."""
    return load_module(
        mirrors,
        REFERENCES[key],
        path,
        f"reference_{Path(path).stem}",
        functions=names,
        namespace={"np": np, "torch": torch, "quadprog": quadprog, "orth": orth, "PCA": PCA},
    )


# --------------------------------------------------------------------------- glue


def as_columns(grad: np.ndarray, memory: np.ndarray):
    """Net.observe's layout: the current gradient as a (P, 1) column, memories (P, K)."""
    return torch.from_numpy(grad.astype(np.float64)).view(-1, 1).clone(), torch.from_numpy(
        memory.astype(np.float64).T.copy()
    )


def run_blocks(project, grad, memory, blocks, **kwargs) -> np.ndarray:
    g, mem = as_columns(grad, memory)
    with contextlib.redirect_stdout(io.StringIO()):  # project5cone5 prints "task length"
        for beg, en in blocks:
            project(g, mem, int(beg), int(en), **kwargs)
    return g.view(-1).numpy().copy()


def blocks_of(grouping: str) -> list[tuple[int, int]]:
    if grouping == "leaf":
        return list(itertools.pairwise(BOUNDS))
    if grouping == "group5":
        return [(BOUNDS[0], BOUNDS[5]), (BOUNDS[5], BOUNDS[6])]
    return [(0, BOUNDS[-1])]


def branch(grad, memory, beg, en, margin, components=None) -> str:
    """Which case of project5cone5 a block takes, and how far from its boundary (ours)."""
    g, m = grad[beg:en].astype(np.float64), memory[:, beg:en].astype(np.float64)
    s = m.sum(0)
    if len(m) == 1:
        r = s @ g / (s @ s)
        return ("single_small" if r >= -margin else "single_large"), abs(r + margin)
    _, sig, vt = np.linalg.svd(m - m.mean(0), full_matrices=False)
    k = min(int((sig > sig[0] * np.finfo(float).eps * max(m.shape)).sum()), len(m) - 1)
    u = vt[: k if components is None else min(k, components)]
    pg, ps = g - u.T @ (u @ g), s - u.T @ (u @ s)
    if s @ pg > 0:
        return "null_space", (s @ pg) / (np.linalg.norm(s) * np.linalg.norm(pg))
    r = (s @ pg) / (s @ ps)
    return ("margin" if r >= -margin else "orthogonal"), min(
        abs(r + margin), -(s @ pg) / (np.linalg.norm(s) * np.linalg.norm(pg))
    )


def case_vectors(rng, num_tasks: int, drift: float, noise: float):
    """Memories g_k = shared + specific; the current gradient drift * shared + noise.

    Per tensor, a scale between 1e-2 and 10 and a drift drawn around ``drift``, so that
    the blocks of one case take different branches."""
    grad, memory = [], []
    for size in SIZES:
        scale = 10 ** rng.uniform(-2, 1)
        shared = rng.normal(size=size)
        specific = rng.normal(size=(num_tasks, size)) * rng.uniform(0.3, 1.5)
        memory.append(scale * (shared + specific))
        d = drift * rng.uniform(0.3, 1.7) * rng.choice([1, 1, 1, -1])
        grad.append(scale * (d * shared + noise * rng.normal(size=size)))
    return (
        np.concatenate(grad).astype(np.float32),
        np.concatenate(memory, axis=1).astype(np.float32),
    )


def pick(rng, num_tasks, drift, noise, check, tries: int = 200):
    """Vectors whose every decision is clear of its boundary (a relative 1e-3)."""
    for _ in range(tries):
        grad, memory = case_vectors(rng, num_tasks, drift, noise)
        if check(grad, memory) > 1e-3:
            return grad, memory
    raise SystemExit("no clear case found")


# --------------------------------------------------------------------------- fixtures


def layerwise_cases(mirrors: Path) -> tuple[dict, dict]:
    main = load_functions(mirrors, "grad-cl", LAYERWISE_FILE, ("project5cone5",))
    pca = {
        c: load_functions(mirrors, "grad-cl", f, ("project5cone5",)) for c, f in PCA_FILES.items()
    }
    rng = np.random.default_rng(38)
    inputs, cases = {}, {}
    # (input, K, drift, margin, components, groupings)
    specs = [
        (f"k{k}_d{d:g}", k, d, 0.5, None, ("leaf", "group5", "whole"))
        for k in (1, 3, 5)
        for d in (1.0, -0.2, -1.0, -4.0)
    ]
    specs += [
        ("k3_d-1_m0", 3, -1.0, 0.0, None, ("leaf",)),
        ("k5_d-0.5_m2", 5, -0.5, 2.0, None, ("leaf",)),
        ("k3_d-1_pca1", 3, -1.0, 0.5, 1, ("leaf",)),
        ("k5_d-1_pca1", 5, -1.0, 0.5, 1, ("leaf",)),
        ("k5_d-1_pca3", 5, -1.0, 0.5, 3, ("leaf",)),
        ("k5_d-4_pca3", 5, -4.0, 0.5, 3, ("leaf",)),
    ]
    for name, num_tasks, drift, margin, components, groupings in specs:

        def clearance(grad, memory):
            return min(
                branch(grad, memory, b, e, margin, components)[1]
                for grouping in groupings
                for b, e in blocks_of(grouping)
            )

        grad, memory = pick(rng, num_tasks, drift, 1.0, clearance)
        inputs[name] = (grad, memory)
        module = main if components is None else pca[components]
        for grouping in groupings:
            blocks = blocks_of(grouping)
            cases[f"{name}_{grouping}"] = {
                "input": name,
                "num_tasks": num_tasks,
                "grouping": grouping,
                "blocks": [[int(b), int(e)] for b, e in blocks],
                "memory_strength": margin,
                "num_components": components,
                "file": LAYERWISE_FILE if components is None else PCA_FILES[components],
                "branches": [branch(grad, memory, b, e, margin, components)[0] for b, e in blocks],
                "out": run_blocks(module.project5cone5, grad, memory, blocks, margin=margin),
            }
    return inputs, cases


def gem_cases(mirrors: Path) -> tuple[dict, dict]:
    gem = load_functions(mirrors, "gem", "model/gem.py", ("project2cone2",))
    rng = np.random.default_rng(7)
    inputs, cases = {}, {}
    # (input, K, drift, memories' common part, [(margin, eps), ...])
    specs = [
        (f"k{k}_d{d:g}", k, d, 0.0, ((0.5, 1e-3), (0.0, 1e-3)))
        for k in (1, 3, 5)
        for d in (1.0, -0.5, -2.0)
    ]
    specs += [
        ("k5_collinear", 5, -1.0, 0.9, ((0.5, 1e-3), (0.0, 0.0))),
        ("k5_d-8", 5, -8.0, 0.0, ((0.5, 1e-3), (0.1, 1e-3))),  # multipliers above the margin
    ]
    for name, num_tasks, drift, common, settings in specs:
        grad, memory = case_vectors(rng, num_tasks, drift, 1.0)
        if common:  # memories that are nearly one direction: many constraints at once
            memory = (common * memory[:1] + (1 - common) * memory).astype(np.float32)
        inputs[name] = (grad, memory)
        dots = memory.astype(np.float64) @ grad.astype(np.float64)
        for margin, eps in settings:
            g, mem = as_columns(grad, memory)
            if np.any(dots < 0):
                gem.project2cone2(g, mem, margin=margin, eps=eps)
            cases[f"{name}_m{margin:g}_eps{eps:g}"] = {
                "input": name,
                "num_tasks": num_tasks,
                "memory_strength": margin,
                "eps": eps,
                "conflict": bool(np.any(dots < 0)),
                "out": g.view(-1).numpy().copy(),
            }
    return inputs, cases


def agem_cases(mirrors: Path) -> tuple[dict, dict]:
    paper = load_functions(mirrors, "grad-cl", "model/agem.py", ("agem",))
    gem = load_functions(mirrors, "gem", "model/gem.py", ("project2cone2",))
    rng = np.random.default_rng(11)
    inputs, cases = {}, {}
    for num_tasks in (1, 3, 5):
        for drift in (1.0, -0.3, -2.0):
            name = f"k{num_tasks}_d{drift:g}"
            grad, memory = case_vectors(rng, num_tasks, drift, 1.0)
            inputs[name] = (grad, memory)
            ref = memory.astype(np.float64).mean(0)
            conflict = bool(ref @ grad.astype(np.float64) < 0)
            for variant in ("paper", "gradcl"):
                g, mean = as_columns(grad, ref[None])
                if conflict and variant == "paper":
                    paper.agem(g, mean)
                elif conflict:
                    gem.project2cone2(g, mean, 0.5)
                cases[f"{name}_{variant}"] = {
                    "input": name,
                    "num_tasks": num_tasks,
                    "memory_strength": 0.0 if variant == "paper" else 0.5,
                    "eps": 0.0 if variant == "paper" else 1e-3,
                    "conflict": conflict,
                    "out": g.view(-1).numpy().copy(),
                }
    return inputs, cases


def write(name: str, inputs: dict, cases: dict) -> None:
    meta = {
        "references": {k: {"repository": r, "commit": c} for k, (r, c) in REFERENCES.items()},
        "command": COMMAND,
        "versions": {
            "python": platform.python_version(),
            **{p: version(p) for p in ("torch", "numpy", "quadprog", "scipy", "scikit-learn")},
        },
        "shapes": [list(s) for s in SHAPES],
        "cases": {case: {k: v for k, v in c.items() if k != "out"} for case, c in cases.items()},
    }
    out = {"meta": np.array(json.dumps(meta))}
    for key, (grad, memory) in inputs.items():
        out[f"{key}.grad"], out[f"{key}.memory"] = grad, memory
    for case, c in cases.items():
        out[f"{case}.out"] = c["out"]
    FIXTURES.mkdir(exist_ok=True)
    np.savez_compressed(FIXTURES / f"{name}.npz", **out)
    print(f"{name}: {len(inputs)} inputs, {len(cases)} cases")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mirrors_argument(parser)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)  # the references' torch.Tensor(x) keeps float64
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # nothing of theirs writes files, but keep the repository clean
        try:
            results = {
                "layerwise_decomposition": layerwise_cases(args.mirrors.resolve()),
                "gem": gem_cases(args.mirrors.resolve()),
                "agem": agem_cases(args.mirrors.resolve()),
            }
        finally:
            os.chdir(here)
    for name, (inputs, cases) in results.items():
        write(name, inputs, cases)
    layer = results["layerwise_decomposition"][1]
    counts: dict[str, int] = {}
    for case in layer.values():
        for b in case["branches"]:
            counts[b] = counts.get(b, 0) + 1
    print("layerwise branches (blocks):", counts)


if __name__ == "__main__":
    main()
