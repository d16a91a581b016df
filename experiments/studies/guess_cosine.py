"""How well each gradient guess points along the gradient: cosine with the true gradient,
per layer and per guess family, against the number of guesses K (Singhal et al.).

Issue #37. For a ReLU MLP (:class:`gcgd_jax.models.MLP`) on flattened MNIST and CIFAR-10,
at fixed, seeded states -- its initialisation and after ``--train-steps`` steps of
backpropagation -- and one fixed batch, every guess family of
:func:`gcgd_jax.estimators.gradient_guess` (``isotropic``, ``activation_perturbation``,
``transpose``, ``activation_mixing``) at every ``K`` of ``--directions`` gives an estimate
of the gradient of that batch's mean cross-entropy; we report its cosine similarity with
the true gradient (``jax.grad`` of the same loss, same batch), over all parameters
("overall") and per layer (the kernel of each Linear), as the mean over ``--draws``
independent draws (PRNG keys) with a Student-t 95% interval of that mean (the draws' values
are in the JSON).

What to expect: an isotropic guess over ``N`` parameters at ``K = 1`` has
``|cos| = |u . g| / |g|`` for ``u`` uniform on the sphere, whose mean is
``Gamma(N/2) / (sqrt(pi) Gamma((N+1)/2)) ~ sqrt(2 / (pi N))``: about ``1/sqrt(N)``
(:func:`expected_isotropic_k1`, in the tables); for ``K << N`` the isotropic cosine grows
like ``sqrt(K/N)`` (the dotted line of the plot). The structured families guess in the
pre-activations' space (per example), a much smaller one, and the two biased families
("transpose", "activation_mixing") add the next layer's structure; Singhal et al. report
that they point much closer to the gradient.

The setting is ours (the paper's exact networks and batch could not be checked here):
hidden widths ``--hidden`` (default 256, 256; Flax's LeCun-normal kernels, zero biases),
inputs scaled to [0, 1] and normalised per channel, then flattened; the probe batch is
``--batch`` training images drawn with ``--seed`` (default 256); training is plain SGD
with momentum 0.9, learning rate ``--lr`` (0.05), ``--train-batch`` (128) images per step
drawn with the seed. The guess families' details are the library's
(:func:`gcgd_jax.estimators.gradient_guess`: the output layer's guess is N(0, I), Wᵀ uses
fresh noise, mixed activations are rescaled per example). ``K`` guesses are drawn in
chunks of at most ``--chunk`` (32) and averaged, the same estimator as one call with ``K``
(the mean of ``K`` independent guesses) with bounded memory.

Usage::

    python -m experiments.studies.guess_cosine                       # mnist and cifar10
    python -m experiments.studies.guess_cosine --quick --out /tmp/gc  # a smoke run

Writes ``guess_cosine.json`` (every draw), ``RESULTS.md`` (tables, rebuilt from the JSON
alone: :func:`markdown`), ``guess_cosine.png`` (overall cosine against K, log-log, per
family) and ``guess_cosine_layers.png`` (per layer) to
``experiments/results/guess_cosine/``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the CPU convolution flag, before JAX starts (as gcgd-train)
    from gcgd_jax.ops import apply_cpu_flags

    apply_cpu_flags()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import RESULTS
from experiments.common.provenance import describe_machine, git_commit, machine
from experiments.common.results import command, utc_now
from experiments.suites.stats import t_mean_ci

OUT_DIR = RESULTS / "guess_cosine"
MODULE = "experiments.studies.guess_cosine"
FAMILIES = ("isotropic", "activation_perturbation", "transpose", "activation_mixing")
BIASED = {"transpose", "activation_mixing"}
COLORS = {
    "isotropic": "tab:gray",
    "activation_perturbation": "tab:blue",
    "transpose": "tab:red",
    "activation_mixing": "tab:green",
}


# ----------------------------------------------------------------------------
# Data, model, states
# ----------------------------------------------------------------------------


def load_flat(name: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, int, str]:
    """``(x, y, num_classes, source)``: the training split of ``name`` scaled to [0, 1],
    normalised per channel and flattened (float32 ``(n, H*W*C)``); ``"synthetic"`` is
    :func:`gcgd_jax.data.synthetic_dataset` (1024 images of 8x8x1, for tests)."""
    from gcgd_jax.data import load_dataset, normalization, synthetic_dataset

    if name == "synthetic":
        ds = synthetic_dataset(1024, image_shape=(8, 8, 1), seed=0)
    else:
        ds = load_dataset(name, "train", data_dir=data_dir)
    mean, std = normalization(ds.name)
    x = (ds.images.astype(np.float32) / 255.0 - mean) / std
    return x.reshape(len(x), -1).astype(np.float32), ds.labels, ds.num_classes, ds.source


def loss_fn(graphdef: nnx.GraphDef, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """The mean cross-entropy the estimators estimate the gradient of (the MLP's
    ``perturbed_loss(...).loss``, unperturbed)."""
    return nnx.merge(graphdef, params).perturbed_loss(x, y).loss


def train_states(
    graphdef: nnx.GraphDef,
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    steps: Sequence[int],
    *,
    lr: float,
    batch: int,
    seed: int,
) -> dict[int, tuple[Any, float]]:
    """``{s: (params after s steps, mean training loss of the last min(s, 50) steps)}`` for
    every ``s`` of ``steps``: SGD with momentum 0.9 and learning rate ``lr`` on minibatches
    of ``batch`` drawn (with replacement across steps) by ``seed``."""
    tx = optax.sgd(lr, momentum=0.9)

    @jax.jit
    def step(p, o, xb, yb):
        loss, g = jax.value_and_grad(lambda q: loss_fn(graphdef, q, xb, yb))(p)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    rng = np.random.default_rng((seed, 1))
    opt_state, done, recent = tx.init(params), 0, []
    states = {}
    for target in sorted({int(s) for s in steps}):
        while done < target:
            idx = rng.integers(0, len(x), batch)
            params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
            recent = ([*recent, float(loss)])[-50:]
            done += 1
        states[target] = (params, float(np.mean(recent)) if recent else None)
    return states


def layer_paths(params: Any) -> list[str]:
    """The kernels' paths (one per Linear, in order)."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return sorted((p for p in paths if "kernel" in p), key=_layer_index)


def _layer_index(path: str) -> int:
    digits = [int(t) for t in path.replace("[", " ").replace("]", " ").split() if t.isdigit()]
    return digits[0] if digits else 0


def _kernels(tree: Any, paths: Sequence[str]) -> list[jax.Array]:
    by_path = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}
    return [by_path[p] for p in paths]


def _cos(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32).ravel(), b.astype(jnp.float32).ravel()
    return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30)


# ----------------------------------------------------------------------------
# Cosines
# ----------------------------------------------------------------------------

_COMPILED: dict[tuple, Any] = {}


def cosine_fn(graphdef: nnx.GraphDef, family: str, k: int, chunk: int = 32):
    """``(params, x, y, true_grad, keys) -> (overall (R,), per_layer (R, L))``: for every
    key of ``keys`` (``(R,)``), the cosine with ``true_grad`` of the mean of ``k`` guesses of
    ``family`` (drawn ``min(k, chunk)`` at a time; ``k`` must then be a multiple of it),
    jitted, cached per graph, family, ``k`` and chunk."""
    from gcgd_jax.estimators import cosine_similarity, gradient_guess

    size = min(k, chunk)
    if k % size:
        raise ValueError(f"K={k} is not a multiple of the chunk {size}")
    cache_key = (graphdef, family, k, size)
    if cache_key in _COMPILED:
        return _COMPILED[cache_key]
    estimate = gradient_guess(family, size)
    n_chunks = k // size

    def one_draw(params, x, y, grad, key):
        model = nnx.merge(graphdef, params)

        def one_chunk(total, chunk_key):
            _, g = estimate(model, x, y, key=chunk_key)
            return jax.tree.map(jnp.add, total, g), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        total, _ = jax.lax.scan(one_chunk, zeros, jax.random.split(key, n_chunks))
        est = jax.tree.map(lambda t: t / n_chunks, total)
        paths = layer_paths(params)
        per_layer = jnp.stack(
            [_cos(e, t) for e, t in zip(_kernels(est, paths), _kernels(grad, paths))]
        )
        return cosine_similarity(est, grad), per_layer

    @jax.jit
    def fn(params, x, y, grad, keys):
        return jax.lax.map(lambda kk: one_draw(params, x, y, grad, kk), keys)

    _COMPILED[cache_key] = fn
    return fn


def true_gradient(graphdef: nnx.GraphDef, params: Any, x, y) -> tuple[float, Any]:
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(graphdef, p, x, y)))(params)


def cosine_draws(
    graphdef: nnx.GraphDef,
    params: Any,
    x,
    y,
    family: str,
    k: int,
    keys: jax.Array,
    *,
    grad: Any = None,
    chunk: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """``(overall (R,), per_layer (R, L))`` cosines of ``family``'s ``k``-guess estimate
    with the true gradient of ``(x, y)`` (computed here unless given), one per key."""
    if grad is None:
        _, grad = true_gradient(graphdef, params, x, y)
    overall, per_layer = cosine_fn(graphdef, family, k, chunk)(params, x, y, grad, keys)
    return np.asarray(overall, np.float64), np.asarray(per_layer, np.float64)


def expected_isotropic_k1(n: int) -> float:
    """``E|u_1|`` for ``u`` uniform on the unit sphere of R^n: the mean cosine of one
    isotropic guess with any fixed direction, ``Gamma(n/2) / (sqrt(pi) Gamma((n+1)/2))``
    (``~ sqrt(2 / (pi n))``)."""
    return math.exp(math.lgamma(n / 2) - math.lgamma((n + 1) / 2)) / math.sqrt(math.pi)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, Student-t 95% interval of the mean (``lo``, ``hi``; the mean itself with one
    value), standard deviation and count."""
    arr = np.asarray(values, np.float64)
    mean, lo, hi = t_mean_ci(arr) if arr.size > 1 else (float(arr.mean()),) * 3
    return {
        "mean": mean,
        "lo": lo,
        "hi": hi,
        "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "n": int(arr.size),
    }


# ----------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------


def run_dataset(name: str, settings: dict, *, data_dir: str | None, progress: bool = True):
    """Every state, family and K on one data set: the record's entry for it."""
    from gcgd_jax.models import MLP

    x, y, num_classes, source = load_flat(name, data_dir)
    seed = settings["seed"]
    probe = np.random.default_rng((seed, 0)).choice(len(x), settings["batch"], replace=False)
    xb, yb = jnp.asarray(x[probe]), jnp.asarray(y[probe])
    model = MLP(x.shape[1], tuple(settings["hidden"]), num_classes, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    paths = layer_paths(params)
    sizes = [int(np.prod(k.shape)) for k in _kernels(params, paths)]
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    states = train_states(
        graphdef,
        params,
        x,
        y,
        settings["train_steps"],
        lr=settings["lr"],
        batch=settings["train_batch"],
        seed=seed,
    )
    entry = {
        "dataset": name,
        "source": source,
        "in_features": int(x.shape[1]),
        "num_classes": int(num_classes),
        "num_params": n_params,
        "layers": [f"layer{_layer_index(p)}.kernel" for p in paths],
        "kernel_sizes": sizes,
        "expected_isotropic_k1": expected_isotropic_k1(n_params),
        "states": [],
    }
    base_key = jax.random.key(seed)
    for steps, (p, train_loss) in states.items():
        loss, grad = true_gradient(graphdef, p, xb, yb)
        logits = nnx.merge(graphdef, p)(xb)
        acc = float(jnp.mean(jnp.argmax(logits, -1) == yb))
        state = {
            "train_steps": steps,
            "train_loss": train_loss,
            "probe_loss": float(loss),
            "probe_accuracy": acc,
            "grad_norm": float(jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grad)))),
            "results": [],
        }
        for fi, family in enumerate(settings["families"]):
            for k in settings["directions"]:
                key = jax.random.fold_in(
                    jax.random.fold_in(jax.random.fold_in(base_key, steps), fi), k
                )
                keys = jax.random.split(key, settings["draws"])
                t0 = time.perf_counter()
                overall, per_layer = cosine_draws(
                    graphdef, p, xb, yb, family, k, keys, grad=grad, chunk=settings["chunk"]
                )
                seconds = time.perf_counter() - t0
                state["results"].append(
                    {
                        "family": family,
                        "K": k,
                        "overall": summarize(overall),
                        "layers": [summarize(per_layer[:, i]) for i in range(len(paths))],
                        "overall_draws": overall.tolist(),
                        "layer_draws": per_layer.T.tolist(),
                        "seconds": seconds,
                    }
                )
                if progress:
                    print(
                        f"[guess_cosine] {name} step {steps} {family} K={k}: "
                        f"cos {overall.mean():.4f} ({seconds:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
        entry["states"].append(state)
    return entry


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def _ci(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


#: Written before the full run (issue #37, part 5); the endpoint section is computed from
#: the JSON by :func:`endpoint` and put first in RESULTS.md.
PREREGISTRATION = """\
**Primary endpoint (pre-registered before the full run).** Singhal et al.'s claim that the \
structured guesses are far better aligned with the gradient than random directions. A \
cell is one data set (MNIST, CIFAR-10), one state (initialisation, after 1,000 steps) and \
one K (1, 4, 16, 64, 256): 20 cells. For a structured family F (activation perturbation, \
"Wᵀ", activation mixing), the claim holds in a cell if the lower end of the 95% interval \
of F's mean overall cosine is above the upper end of the isotropic guess's; it is \
supported for F if it holds in all 20 cells, and for the structured guesses if it is \
supported for all three. Reported beside, not criteria: the ratio of F's mean cosine to \
the isotropic guess's (its smallest over the cells), and the cells where it fails.

**Sanity check, read before the endpoint.** The isotropic guess at K = 1 has the mean \
cosine the theory gives (E|u_1| on the unit sphere of R^N, N the parameter count): in \
every (data set, state) its mean over the draws lies within 3.5 standard errors of it.

**Secondary (descriptive).** Per layer, the same comparison; the growth of each family's \
cosine from K = 64 to K = 256 (an unbiased estimate keeps growing towards 1 as K grows, \
a biased one levels off below 1; K up to 256 may not show where)."""

STRUCTURED = ("activation_perturbation", "transpose", "activation_mixing")
SANITY_Z = 3.5


def _cells(record: dict) -> list[tuple[str, int, int, dict[str, dict]]]:
    """``(data set, state's steps, K, family -> overall summary)`` of every cell."""
    cells = []
    for entry in record["datasets"]:
        for state in entry["states"]:
            for k in sorted({r["K"] for r in state["results"]}):
                by_family = {r["family"]: r["overall"] for r in state["results"] if r["K"] == k}
                cells.append((entry["dataset"], state["train_steps"], k, by_family))
    return cells


def endpoint(record: dict) -> list[str]:
    """The pre-registered endpoint (:data:`PREREGISTRATION`) and its sanity check, from the
    record alone."""
    cells = _cells(record)
    lines = [
        "## Endpoint (pre-registered)",
        "",
        (
            "Per structured family: the cells (data set, state, K) where the lower end of its "
            "95% interval of mean overall cosine is above the upper end of the isotropic "
            "guess's; its smallest ratio of mean cosines to the isotropic guess's; the cells "
            "where the comparison fails."
        ),
        "",
        "| family | cells where it holds | smallest ratio to isotropic | fails in | verdict |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for family in STRUCTURED:
        rows = [(d, t, k, f) for d, t, k, f in cells if family in f and "isotropic" in f]
        if not rows:
            continue
        holds = [f[family]["lo"] > f["isotropic"]["hi"] for _, _, _, f in rows]
        ratio = min(f[family]["mean"] / f["isotropic"]["mean"] for _, _, _, f in rows)
        fails = [f"{d} step {t} K={k}" for (d, t, k, _), ok in zip(rows, holds, strict=True)
                 if not ok]  # fmt: skip
        verdict = "supported" if all(holds) else "not supported"
        verdicts.append(all(holds))
        lines.append(
            f"| {family} | {sum(holds)} of {len(rows)} | {ratio:.3g}x | "
            f"{', '.join(fails) or '—'} | {verdict} |"
        )
    overall = "supported" if verdicts and all(verdicts) else "not supported"
    lines += ["", f"Structured guesses better aligned than random directions: **{overall}**.", ""]
    lines += ["## Sanity check", ""]
    ok = True
    checks = []
    for entry in record["datasets"]:
        expected = entry["expected_isotropic_k1"]
        for state in entry["states"]:
            for r in state["results"]:
                if r["family"] != "isotropic" or r["K"] != 1:
                    continue
                s = r["overall"]
                z = (s["mean"] - expected) / (s["sd"] / math.sqrt(s["n"])) if s["sd"] else 0.0
                ok &= abs(z) < SANITY_Z
                checks.append(
                    f"{entry['dataset']} step {state['train_steps']}: {s['mean']:.5f} vs "
                    f"{expected:.5f} (z = {z:+.2f})"
                )
    verdict = "passed" if ok else "FAILED: the isotropic guess is not what the theory says"
    lines += [
        (
            f"Isotropic guess at K = 1, mean cosine vs E|u_1| (criterion: |z| < {SANITY_Z:g} "
            f"in every state): {'; '.join(checks) or '—'}: {verdict}."
        ),
        "",
    ]
    return lines


def markdown(record: dict) -> str:
    """RESULTS.md: a pure function of the record."""
    s = record["settings"]
    lines = [
        (
            "# Gradient guesses: cosine with the true gradient against K "
            f"({'QUICK SMOKE RUN' if s['quick'] else 'full run'})"
        ),
        "",
    ]
    if s["quick"]:
        lines += ["**`--quick`: few draws and steps; a smoke test, not a result.**", ""]
    lines += [
        f"- command: `{record['command']}`",
        f"- date (UTC): {record['date']}",
        f"- code: commit {record.get('commit') or 'unknown'}",
        f"- machine: {describe_machine(record['machine'])}",
        f"- model: ReLU MLP, hidden {s['hidden']}, Flax default initialisation, seed {s['seed']}",
        (
            f"- probe batch: {s['batch']} training images (seeded); states after "
            f"{s['train_steps']} SGD steps (momentum 0.9, lr {s['lr']}, batch {s['train_batch']})"
        ),
        (
            f"- each cell: mean cosine over {s['draws']} draws [Student-t 95% interval of the "
            f"mean]; K guesses averaged (drawn {s['chunk']} at a time)"
        ),
        (
            "- families: isotropic (directional descent; unbiased), activation_perturbation "
            "(unbiased), transpose and activation_mixing (biased): "
            "`gcgd_jax.estimators.gradient_guess`"
        ),
        "",
    ]
    lines += endpoint(record)
    lines += [
        "## Plots",
        "",
        "![overall cosine against K](guess_cosine.png)",
        "",
        "![per-layer cosine against K](guess_cosine_layers.png)",
        "",
    ]
    for entry in record["datasets"]:
        lines += [
            (
                f"## {entry['dataset']} ({entry['in_features']} inputs, "
                f"{entry['num_params']:,} parameters)"
            ),
            "",
            (
                f"Isotropic guess at K = 1: expected mean |cos| = E|u_1| on the sphere of "
                f"R^{entry['num_params']} = {entry['expected_isotropic_k1']:.5f} "
                f"(1/sqrt(N) = {entry['num_params'] ** -0.5:.5f})."
            ),
            "",
        ]
        for state in entry["states"]:
            loss = state["train_loss"]
            lines += [
                f"### After {state['train_steps']} training steps",
                "",
                f"Probe batch: loss {state['probe_loss']:.4f}, accuracy "
                f"{state['probe_accuracy']:.3f}, gradient norm {state['grad_norm']:.4g}"
                + ("" if loss is None else f"; training loss (last steps) {loss:.4f}")
                + ".",
                "",
                "| family | K | overall | " + " | ".join(entry["layers"]) + " |",
                "|---|---:|---|" + "---|" * len(entry["layers"]),
            ]
            for r in state["results"]:
                cells = [_ci(r["overall"])] + [_ci(layer) for layer in r["layers"]]
                lines.append(f"| {r['family']} | {r['K']} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Pre-registration", "", PREREGISTRATION, ""]
    return "\n".join(lines)


def plot(record: dict, out: Path) -> list[Path]:
    """``guess_cosine.png`` (overall, rows: data sets, columns: states) and
    ``guess_cosine_layers.png`` (rows: data set and state, columns: layers); log-log, the
    95% intervals as error bars, the isotropic ``sqrt(K/N)`` dotted."""
    from experiments.suites.plots import finish, pyplot

    plt = pyplot()
    entries = record["datasets"]
    n_states = max(len(e["states"]) for e in entries)
    paths = []

    def draw(ax, rows, n_params=None):
        for family in record["settings"]["families"]:
            pts = [r for r in rows if r["family"] == family]
            if not pts:
                continue
            ks = np.array([p["K"] for p in pts], float)
            m = np.array([p["stat"]["mean"] for p in pts])
            lo = np.array([p["stat"]["lo"] for p in pts])
            hi = np.array([p["stat"]["hi"] for p in pts])
            label = family + (" (biased)" if family in BIASED else "")
            ax.errorbar(
                ks,
                m,
                yerr=np.abs(np.stack([m - lo, hi - m])),
                marker="o",
                ms=3,
                capsize=2,
                color=COLORS.get(family),
                label=label,
            )
        if n_params:
            ks = np.array(sorted({r["K"] for r in rows}), float)
            ax.plot(ks, np.sqrt(ks / n_params), ":", color="black", label="sqrt(K/N)")
        ax.set_xscale("log")
        if all(r["stat"]["mean"] > 0 for r in rows):
            ax.set_yscale("log")

    fig, axes = plt.subplots(
        len(entries), n_states, figsize=(4.2 * n_states, 3.4 * len(entries)), squeeze=False
    )
    for i, e in enumerate(entries):
        for j, state in enumerate(e["states"]):
            ax = axes[i][j]
            draw(ax, [{**r, "stat": r["overall"]} for r in state["results"]], e["num_params"])
            ax.set_xlabel("K (guesses averaged)")
            if (i, j) != (0, 0):
                ax.set_title(f"{e['dataset']}, after {state['train_steps']} steps")
                ax.set_ylabel("cosine with the gradient")
                ax.grid(alpha=0.3)
    path = out / "guess_cosine.png"
    first = entries[0]
    title = f"{first['dataset']}, after {first['states'][0]['train_steps']} steps"
    finish(fig, axes[0][0], path, ylabel="cosine with the gradient", title=title, legend_size=7)
    paths.append(path)

    rows_of_plot = [(e, s) for e in entries for s in e["states"]]
    n_layers = max(len(e["layers"]) for e in entries)
    fig, axes = plt.subplots(
        len(rows_of_plot), n_layers, figsize=(4 * n_layers, 3.2 * len(rows_of_plot)), squeeze=False
    )
    for i, (e, state) in enumerate(rows_of_plot):
        for j, layer in enumerate(e["layers"]):
            ax = axes[i][j]
            rows = [{**r, "stat": r["layers"][j]} for r in state["results"]]
            draw(ax, rows)
            ax.set_title(f"{e['dataset']}, step {state['train_steps']}: {layer}", fontsize=9)
            ax.set_xlabel("K")
            ax.set_ylabel("cosine (this kernel)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = out / "guess_cosine_layers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", default=None, help="mnist cifar10 (quick: mnist; synthetic)"
    )
    parser.add_argument("--data-dir", default=None, help="folder holding the data sets")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--batch", type=int, default=None, help="probe batch (256; quick 64)")
    parser.add_argument(
        "--train-steps", type=int, nargs="+", default=None, help="states (0 1000; quick 0 50)"
    )
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--directions", type=int, nargs="+", default=[1, 4, 16, 64, 256], help="K")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--draws", type=int, default=None, help="R keys per cell (16; quick 4)")
    parser.add_argument("--chunk", type=int, default=32, help="guesses drawn at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv_used)
    q = args.quick
    settings = {
        "quick": q,
        "datasets": args.datasets or (["mnist"] if q else ["mnist", "cifar10"]),
        "hidden": list(args.hidden),
        "batch": args.batch or (64 if q else 256),
        "train_steps": sorted(set(args.train_steps or ([0, 50] if q else [0, 1000]))),
        "lr": args.lr,
        "train_batch": args.train_batch,
        "directions": list(args.directions),
        "families": list(args.families),
        "draws": args.draws or (4 if q else 16),
        "chunk": args.chunk,
        "seed": args.seed,
    }
    record = {
        "command": command(MODULE, argv_used),
        "date": utc_now(),
        "commit": git_commit(),
        "machine": machine(),
        "settings": settings,
        "datasets": [],
    }
    t0 = time.perf_counter()
    for name in settings["datasets"]:
        record["datasets"].append(run_dataset(name, settings, data_dir=args.data_dir))
    record["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "guess_cosine.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "RESULTS.md").write_text(markdown(record).rstrip("\n") + "\n")
    if not args.no_plot:
        plot(record, args.out)
    print(markdown(record))
    print(f"[guess_cosine] wrote {args.out} in {record['seconds']:.0f} s", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
