"""Our outputs on the parity fixtures' inputs, compared with the authors' outputs.

The fixtures (``tests/parity/fixtures/*.npz``, written by ``make_fixtures.py``) hold
gradient streams in PyTorch layout and what the reference implementation made of
them (for the gradient-norm penalty: parameters and batches of a small MLP, and the
gradients the official JAX code computed from them). Every :class:`Check` here runs
our JAX counterpart on the same inputs, in Flax layout, and measures the difference.
``docs/parity.md`` shows :func:`table`; print it with (from the repository root)::

    python -m tests.parity.table

Differences are in float32. Per leaf and step, ``abs`` is the largest absolute
difference and ``rel`` that divided by the largest magnitude of the reference (a
norm-wise relative difference); the table gives the largest over leaves and steps,
rounded up to a power of ten for the checks that match (exact figures depend on the
JAX version's float32 rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gcgd_jax.gradients.gradient_norm_penalty import gradient_norm_penalty
from gcgd_jax.transforms.agr import agr
from gcgd_jax.transforms.centralize import centralize
from gcgd_jax.transforms.grokfast_ema import grokfast_ema
from gcgd_jax.transforms.mars_correction import mars_correction
from tests.parity.make_fixtures import GNP_LEAVES, gnp_logits

FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: A check that matches has a norm-wise relative difference at most this (float32).
RTOL = 1e-5
#: A check that differs has a norm-wise relative difference at least this.
DIFFERS = 1e-2

# --------------------------------------------------------------------------- layout


def to_flax(name: str, x: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout for one step (conv (O,I,kh,kw) -> (kh,kw,I,O))."""
    return {4: lambda: x.transpose(2, 3, 1, 0), 2: lambda: x.T}.get(x.ndim, lambda: x)()


def to_torch(name: str, x: np.ndarray) -> np.ndarray:
    """Flax layout -> PyTorch layout for one step."""
    return {4: lambda: x.transpose(3, 2, 0, 1), 2: lambda: x.T}.get(x.ndim, lambda: x)()


@functools.cache
def fixture(method: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{method}.npz") as data:
        return {k: data[k] for k in data.files}


def meta(method: str) -> dict:
    return json.loads(str(fixture(method)["meta"]))


def leaves(method: str, prefix: str) -> dict[str, np.ndarray]:
    return {k.split(".", 1)[1]: v for k, v in fixture(method).items() if k.startswith(prefix + ".")}


# --------------------------------------------------------------------------- checks


@dataclasses.dataclass(frozen=True)
class Check:
    """One comparison of ours with one case of a fixture."""

    method: str  # fixture name (our module)
    case: str  # the fixture's case
    ours: str  # our call, as shown in the table
    build: Callable[[], optax.GradientTransformation]  # or the gradient function's kwargs
    expect: str  # "match" or "differs"
    verdict: str
    inputs: str = "grads"  # the fixture's input stream
    only: tuple[str, ...] = ("conv", "dense", "bias")  # leaves compared

    @property
    def kind(self) -> str:
        return meta(self.method)["cases"][self.case]["kind"]

    @property
    def id(self) -> str:
        return f"{self.method}-{self.case}-{self.ours}"


def _labels_2d(params):
    return jax.tree.map(lambda p: "2d" if p.ndim == 2 else "other", params)


def _mars_adamw(case: str, correct: bool, **kw) -> Callable[[], optax.GradientTransformation]:
    """MARS-AdamW as the official code splits it: the correction and AdamW(betas) on 2-D
    tensors, plain AdamW(betas_1d, lr_1d, weight_decay_1d) on the others."""

    def build():
        s = meta("mars_correction")["cases"][case]["settings"]
        b1, b2 = s["betas"]
        main = optax.adamw(s["lr"], b1=b1, b2=b2, eps=s["eps"], weight_decay=s["weight_decay"])
        if correct:
            main = optax.chain(mars_correction(s["gamma"], b1, **kw), main)
        c1, c2 = s["betas_1d"]
        other = optax.adamw(
            s["lr_1d"], b1=c1, b2=c2, eps=s["eps"], weight_decay=s["weight_decay_1d"]
        )
        return optax.partition({"2d": main, "other": other}, _labels_2d)

    return build


def _mars_all(**mars_kw) -> optax.GradientTransformation:
    s = meta("mars_correction")["cases"]["mars_adamw_optimize_1d"]["settings"]
    b1, b2 = s["betas"]
    return optax.chain(
        mars_correction(s["gamma"], b1, **mars_kw),
        optax.adamw(s["lr"], b1=b1, b2=b2, eps=s["eps"], weight_decay=s["weight_decay"]),
    )


def _gc_settings(case: str) -> dict:
    return meta("centralize")["cases"][case]["settings"]


def _sgd_gc() -> optax.GradientTransformation:
    s = _gc_settings("sgd_gc")
    return optax.chain(
        optax.add_decayed_weights(s["weight_decay"]),
        centralize(),
        optax.sgd(s["lr"], momentum=s["momentum"]),
    )


def _adam_gc(after_adam: bool) -> Callable[[], optax.GradientTransformation]:
    def build():
        s = _gc_settings("adam_gc2" if after_adam else "adam_gc")
        b1, b2 = s["betas"]
        decay = optax.add_decayed_weights(s["weight_decay"])
        adam = optax.scale_by_adam(b1=b1, b2=b2, eps=s["eps"])
        if after_adam:
            return optax.chain(decay, adam, centralize(), optax.scale(-s["lr"]))
        return optax.chain(decay, centralize(), adam, optax.scale(-s["lr"]))

    return build


CHECKS: tuple[Check, ...] = (
    # ----------------------------------------------------------------- centralization
    Check("centralize", "sgd_gc_gradient", "centralize()", centralize, "match",
          "matches (conv + dense centred, bias untouched)"),
    Check("centralize", "sgd_gcc_gradient", "centralize(conv_only=True)",
          lambda: centralize(conv_only=True), "match", "matches (conv only)"),
    Check("centralize", "sgd_gc_gradient", "optax.centralize()", optax.centralize, "differs",
          "optax's own transform on Flax kernels centres across output units (the layout "
          "defect ours avoids)"),
    Check("centralize", "sgd_gc", "chain(add_decayed_weights, centralize(), sgd(momentum))",
          _sgd_gc, "match", "matches"),
    Check("centralize", "adam_gc", "chain(add_decayed_weights, centralize(), adam)",
          _adam_gc(False), "match", "matches"),
    Check("centralize", "adam_gc2", "chain(add_decayed_weights, scale_by_adam, centralize(), "
          "scale(-lr))", _adam_gc(True), "match",
          "matches (the authors' Adam_GC2: centre the final update)"),
    # ----------------------------------------------------------------- Grokfast-EMA
    Check("grokfast_ema", "defaults", "grokfast_ema()", grokfast_ema, "match",
          "matches (h_1 = g_1 as in the official code)"),
    Check("grokfast_ema", "fast", "grokfast_ema(alpha=0.8, lamb=0.5)",
          lambda: grokfast_ema(alpha=0.8, lamb=0.5), "match", "matches"),
    # ----------------------------------------------------------------- MARS
    Check("mars_correction", "mars_adamw",
          'partition(2-D: chain(mars_correction(initial_prev_grad="zeros"), adamw); '
          "other: adamw(betas_1d))",
          _mars_adamw("mars_adamw", True, initial_prev_grad="zeros"), "match", "matches"),
    Check("mars_correction", "mars_adamw",
          "partition(2-D: chain(mars_correction(), adamw); other: adamw(betas_1d))",
          _mars_adamw("mars_adamw", True), "differs",
          'differs from step 1 on: our default takes g_0 = g_1 (c_1 = g_1), the official '
          'code g_0 = 0 (c_1 = 1.475 g_1 before the clip); deliberate, '
          '`initial_prev_grad="zeros"` is the official behaviour'),
    Check("mars_correction", "mars_adamw", "partition(2-D: adamw; other: adamw(betas_1d))",
          _mars_adamw("mars_adamw", False), "differs",
          "control (no correction): the correction is visible in the trajectory"),
    Check("mars_correction", "mars_adamw_gamma_0.1",
          'partition(2-D: chain(mars_correction(gamma=0.1, initial_prev_grad="zeros"), adamw); '
          "other: adamw(betas_1d))",
          _mars_adamw("mars_adamw_gamma_0.1", True, initial_prev_grad="zeros"), "match",
          "matches"),
    Check("mars_correction", "mars_adamw_optimize_1d",
          'chain(mars_correction(initial_prev_grad="zeros"), adamw) on every leaf',
          lambda: _mars_all(initial_prev_grad="zeros"), "match",
          "matches (official optimize_1d=True: every tensor corrected)"),
    # ----------------------------------------------------------------- AGR
    Check("agr", "agr", 'agr(eps=0.0, leaves="all")', lambda: agr(eps=0.0, leaves="all"),
          "match", "matches"),
    Check("agr", "agr", "agr() on the kernels", agr, "match",
          "matches (eps = 1e-12 is below float32 resolution here)", only=("conv", "dense")),
    Check("agr", "agr", "agr() on the bias", agr, "differs",
          'deliberate: by default 1-D leaves pass through (the official code regularises '
          'every tensor; `leaves="all"` does)', only=("bias",)),
    Check("agr", "agr_zero_leaf", 'agr(eps=0.0, leaves="all"), an all-zero leaf',
          lambda: agr(eps=0.0, leaves="all"), "match",
          "matches where the official output is finite; on an all-zero leaf it is NaN "
          "(0/0), ours 0", inputs="grads_zero"),
    # ----------------------------------------------------------------- gradient-norm penalty
    Check("gradient_norm_penalty", "paper_recipe",
          "gradient_norm_penalty(radius=0.1, alpha=0.8)", lambda: {"radius": 0.1, "alpha": 0.8},
          "differs",
          "differs: ours is the paper's formula, (1 - α)∇L + α∇L(θ + r∇L/‖∇L‖); the "
          "official code's default mixes the normalized gradient, (1 - α)∇L/‖∇L‖ + …; "
          '`unperturbed_term="normalized"` reproduces it', only=GNP_LEAVES),
    Check("gradient_norm_penalty", "paper_recipe",
          'gradient_norm_penalty(radius=0.1, alpha=0.8, unperturbed_term="normalized")',
          lambda: {"radius": 0.1, "alpha": 0.8, "unperturbed_term": "normalized"}, "match",
          "matches", only=GNP_LEAVES),
    Check("gradient_norm_penalty", "paper_recipe_raw_first_term",
          "gradient_norm_penalty(radius=0.1, alpha=0.8)", lambda: {"radius": 0.1, "alpha": 0.8},
          "match", "matches (the official code with norm_perturbations=False)", only=GNP_LEAVES),
    Check("gradient_norm_penalty", "sam", "gradient_norm_penalty(radius=0.05, alpha=1.0)",
          lambda: {"radius": 0.05, "alpha": 1.0}, "match", "matches (α = 1: SAM)",
          only=GNP_LEAVES),
)  # fmt: skip


# --------------------------------------------------------------------------- running


def _run_gradient(check: Check) -> dict[str, np.ndarray]:
    """Our gradient-norm-penalty gradients of the fixture's MLP loss, one per draw."""
    inputs = leaves(check.method, "inputs")

    def loss(params, x, labels):
        return optax.softmax_cross_entropy_with_integer_labels(gnp_logits(params, x), labels).mean()

    grad_fn = jax.jit(gradient_norm_penalty(loss, **check.build()))
    out = {k: [] for k in GNP_LEAVES}
    for t in range(len(inputs["x"])):
        params = {k: jnp.asarray(inputs[f"params.{k}"][t]) for k in GNP_LEAVES}
        _, grads = grad_fn(params, jnp.asarray(inputs["x"][t]), jnp.asarray(inputs["labels"][t]))
        for k in out:
            out[k].append(np.asarray(grads[k]))
    return {k: np.stack(v) for k, v in out.items()}


def run(check: Check) -> dict[str, np.ndarray]:
    """Our outputs on the check's inputs, stacked over steps, in PyTorch layout."""
    if check.kind == "gradient":
        return _run_gradient(check)
    grads = leaves(check.method, check.inputs)
    steps = len(next(iter(grads.values())))
    tx = check.build()
    update = jax.jit(tx.update)
    out = {k: [] for k in grads}
    if check.kind == "trajectory":
        params = {k: jnp.asarray(to_flax(k, v)) for k, v in leaves(check.method, "params0").items()}
        state = tx.init(params)
        for t in range(steps):
            g = {k: jnp.asarray(to_flax(k, v[t])) for k, v in grads.items()}
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
            for k in out:
                out[k].append(to_torch(k, np.asarray(params[k])))
    else:
        state = tx.init({k: jnp.asarray(to_flax(k, v[0])) for k, v in grads.items()})
        for t in range(steps):
            g = {k: jnp.asarray(to_flax(k, v[t])) for k, v in grads.items()}
            corrected, state = update(g, state)
            for k in out:
                out[k].append(to_torch(k, np.asarray(corrected[k])))
    return {k: np.stack(v) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class Result:
    check: Check
    abs: float  # largest absolute difference (finite reference entries)
    rel: float  # largest norm-wise relative difference
    nan_reference_zero: bool  # where the reference is NaN, ours is exactly 0 (or no NaN)

    @property
    def ok(self) -> bool:
        if self.check.expect == "match":
            return self.rel <= RTOL and self.nan_reference_zero
        return self.rel >= DIFFERS


@functools.cache
def compare(check: Check) -> Result:
    ours = run(check)
    worst_abs = worst_rel = 0.0
    nan_ok = True
    for k in check.only:
        ref = fixture(check.method)[f"{check.case}.{k}"]
        for r, o in zip(ref, ours[k]):
            finite = np.isfinite(r)
            nan_ok &= bool(np.all(o[~finite] == 0))
            if not finite.any():
                continue
            diff = float(np.max(np.abs(o[finite].astype(np.float64) - r[finite])))
            scale = float(np.max(np.abs(r[finite])))
            worst_abs = max(worst_abs, diff)
            worst_rel = max(
                worst_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
            )
    return Result(check, worst_abs, worst_rel, nan_ok)


# --------------------------------------------------------------------------- the table

#: Methods without a parity fixture, and why.
NO_FIXTURE: tuple[tuple[str, str], ...] = (
    ("GC-W (`gc_w`, `gc_w_v2`)",
     "no public code: the source paper (arXiv 2203.08345) was withdrawn; our design"),
    ("GC-ODE (`GCODE`)", "no public code (as GC-W)"),
    ("gradient guessing", "no official code (Singhal et al., arXiv 2312.04709)"),
    ("ZNorm (`znorm`)", "no official code or registry implementation found"),
    ("channel-directed gradients (`channel_directed`)", "no official code found"),
    ("PowerGrad (`powergrad_cross_entropy`)", "no official code found"),
    ("backward gradient normalization (`backward_grad_norm`)",
     "no official code found (third-party re-implementations only)"),
)  # fmt: skip


def _bound(x: float) -> str:
    """``x`` rounded up to a power of ten: ``< 1e-6``; exactly ``0`` as ``0``."""
    if x == 0:
        return "0"
    return f"< 1e{math.floor(math.log10(x)) + 1}"


def _figure(result: Result, x: float) -> str:
    return _bound(x) if result.check.expect == "match" else f"{x:.2g}"


def _reference(method: str, case: str) -> str:
    m = meta(method)
    ref = m["cases"][case]["reference"]
    return f"{m['repository']} @ {m['commit'][:7]}, `{ref}`"


def _inputs(check: Check) -> str:
    if check.kind == "gradient":
        draws = len(leaves(check.method, "inputs")["x"])
        return f"{draws} (parameters, batch) draws of a 6-8-4 MLP; mixed gradients"
    steps = len(next(iter(leaves(check.method, check.inputs).values())))
    what = "parameters after each step" if check.kind == "trajectory" else "corrected gradients"
    return f"{steps} step{'s' * (steps > 1)}, {'/'.join(check.only)}; {what}"


def table() -> str:
    """The Markdown table of docs/parity.md."""
    columns = (
        "method", "reference @ commit, what was called", "inputs, compared", "ours",
        "max abs diff", "max rel diff", "verdict",
    )  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for check in CHECKS:
        r = compare(check)
        lines.append(
            f"| `{check.method}` | {_reference(check.method, check.case)} | {_inputs(check)} "
            f"| `{check.ours}` | {_figure(r, r.abs)} | {_figure(r, r.rel)} | {check.verdict} |"
        )
    for name, why in NO_FIXTURE:
        lines.append(f"| {name} | {why} | | | | | no parity fixture |")
    return "\n".join(lines) + "\n"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _within(documented: str, measured: str) -> bool:
    """Whether a figure in the page still describes today's measurement: the same text,
    or a bound ``< 1eK`` within one power of ten of today's either way (float32 rounding
    differs between JAX versions), or a figure within 5%."""
    if documented == measured:
        return True
    if documented.startswith("< 1e") and (measured.startswith("< 1e") or measured == "0"):
        k = int(documented[4:])
        return measured == "0" or k - 1 <= int(measured[4:]) <= k + 1
    try:
        return abs(float(measured) - float(documented)) <= 0.05 * abs(float(documented))
    except ValueError:
        return False


def _first_table(page: str) -> list[str]:
    """The first run of consecutive lines of ``page`` that start with ``|``."""
    block: list[str] = []
    for line in page.splitlines():
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    return block


def mismatches(page: str) -> list[str]:
    """The rows of :func:`table` that the first table of ``page`` does not show (numeric
    cells compared with :func:`_within`); empty when the page is current. (Later tables of
    the page, e.g. the estimators' of ``tests/parity/test_estimator_parity.py``, are
    checked by their own tests.)"""
    lines = table().splitlines()
    shown = _first_table(page)
    documented = {"|".join(_cells(line)[:4]): _cells(line) for line in shown}
    problems = []
    for line in lines:
        cells = _cells(line)
        doc = documented.get("|".join(cells[:4]))
        same = (
            doc is not None
            and len(doc) == len(cells)
            and all(
                _within(d, c) if i in (4, 5) else d == c for i, (d, c) in enumerate(zip(doc, cells))
            )
        )
        if not same:
            problems.append(line)
    if len(shown) != len(lines):
        problems.append(f"the page shows {len(shown)} table lines, the table has {len(lines)}")
    return problems


if __name__ == "__main__":
    print(table(), end="")
