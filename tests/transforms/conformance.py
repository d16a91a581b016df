"""A reusable conformance suite for optax gradient transforms.

In the spirit of optax's own ``optax/contrib/_common_test.py``: every transform
of the package goes through the same checks. This module holds no tests
itself; ``tests/transforms/test_conformance.py`` parametrises the checks over
its ``CASES`` list. To add a transform, append a :class:`ConformanceCase` there.

A case names a *factory*: a zero-argument callable returning a fresh
``optax.GradientTransformation``. Each check builds what it needs from it:

=========================  ====================================================
``check_jit``              init/update under ``jax.jit`` equal the eager ones
``check_extra_args``       ``update(g, s, p, unknown_kw=1)`` is accepted and
                           ignored (via ``optax.with_extra_args_support`` for a
                           plain ``GradientTransformation``; and inside
                           ``optax.chain``)
``check_no_recompilation`` a jitted train step is traced once over two calls
``check_convergence``      ``chain(transform, sgd)`` inside ``lax.scan``
                           reaches the optimum of a problem (see below)
``check_inject``           ``optax.inject_hyperparams`` gives the same updates
                           and inner state as the plain transform
``check_dtype``            bf16/f32 updates keep the params' dtype; state
                           shapes/dtypes are stable across updates
``check_masked``           inside ``optax.masked`` masked-out leaves are
                           unchanged, masked-in ones equal the transform on
                           those leaves alone
``check_multi_steps``      inside ``optax.MultiSteps`` the first k-1 updates are
                           zero and the k-th is the transform of the mean grad
``check_cond``             the state survives ``lax.cond`` (same structure,
                           shapes and dtypes in both branches); the true branch
                           equals the plain update, the false one is a no-op
``check_map_params``       ``optax.tree.map_params`` maps the params-shaped part
                           of the state by f (and only by f), round-trips, and
                           the mapped state stays usable
=========================  ====================================================

``CHECKS`` maps these names to the functions; :func:`run_all` runs them all.
A check that does not apply to a case (no injectable hyperparameters) calls
``pytest.skip``.

Problems for ``check_convergence``. The parameters are a pytree shaped by
``case.param_shapes`` (default :data:`DEFAULT_PARAM_SHAPES`: a conv kernel
``(2, 2, 3, 4)``, a dense kernel ``(3, 4)`` and a bias ``(4,)``, Flax layout,
so that transforms acting on ndim >= 2 or on ndim >= 4 leaves really act).
From a fixed seed, a target ``T`` uniform in ``[-1, 1]`` and a start ``T + D``
are drawn: ``D`` uniform in ``[-0.5, 0.5]`` and then, for every leaf with
ndim >= 2, centred to **zero mean over the fan-in axes of each output unit**
(hence zero leaf mean; ``max|D|`` = 0.64 for the default shapes). Gradient
centralization and ZNorm remove exactly those components from every update,
so they can reach the optimum only from such a start; every transform here
(and an identity) can.

* ``parabola``: ``sum(c * (p - T)**2)`` with fixed weights ``c`` uniform in
  ``[0.5, 2]``: the gradient ``2c(p - T)`` has a non-zero fan-in mean although
  ``D`` has none, so centralization changes every step.
* ``rosenbrock``: all leaves raveled into one vector ``z = p - T + 1``,
  consecutive entries paired as ``(x, y)``, ``sum((1 - x)**2 + 100 (y -
  x**2)**2)`` (an odd last entry adds ``(1 - x)**2``). Minimum at ``p = T``.

Both run ``optax.chain(transform, optax.sgd(cosine_decay(lr, steps),
momentum))`` for ``steps`` steps inside ``lax.scan``, and pass when
``max|p - T| <= atol`` **and** ``loss <= loss_rtol * initial loss`` (and the
loss is finite). Defaults: ``lr = 1e-3``, ``momentum = 0.9``,
``steps = 10_000``, ``atol = 3e-2`` (optax's own bar), ``loss_rtol = 1e-3``.
The decaying learning rate lets a scale-free transform (ZNorm) settle.

Calibration (measured with these defaults, float32, CPU): the identity ends
within 4e-6 of ``T`` on both problems (loss ratio < 1e-11); centralize,
channel-directed and ZNorm within 5e-5. AGR ends 3.5e-2 from the parabola's
optimum (it stalls; its case documents a looser ``atol``). A transform
returning zeros stays 0.64 away (loss ratio 1), a sign flip diverges, and
``optax.centralize`` (PyTorch layout) on these Flax kernels ends 0.18-0.21
away. Those negative controls are tests in ``test_conformance.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

PyTree = Any
Factory = Callable[[], optax.GradientTransformation]

#: Default parameter shapes: Flax conv kernel (kh, kw, in, out), dense kernel
#: (in, out) and a bias, so that ndim >= 4, ndim >= 2 and 1-D rules all apply.
DEFAULT_PARAM_SHAPES: PyTree = {
    "conv": {"kernel": (2, 2, 3, 4)},
    "dense": {"kernel": (3, 4), "bias": (4,)},
}

_RTOL, _ATOL = 1e-5, 1e-6  # float32 equality of two routes to the same update


@dataclasses.dataclass(frozen=True)
class Problem:
    """An optimisation target: start, optimum and loss over a params pytree."""

    name: str
    init_params: PyTree
    target: PyTree
    loss: Callable[[PyTree], jax.Array]


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _shape_leaves(shapes: PyTree):
    return jax.tree.flatten(shapes, is_leaf=_is_shape)


def random_tree(shapes: PyTree, dtype=jnp.float32, *, seed: int = 0, scale: float = 1.0):
    """A pytree of N(0, scale^2) arrays with the given shapes (a pytree of tuples)."""
    leaves, treedef = _shape_leaves(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            (scale * jax.random.normal(k, s, jnp.float32)).astype(dtype)
            for k, s in zip(keys, leaves)
        ],
    )


def _start_and_target(shapes: PyTree, dtype, seed: int):
    """Target T, offset D (zero fan-in mean per output unit) and weights c."""
    leaves, treedef = _shape_leaves(shapes)
    keys = jax.random.split(jax.random.key(seed), 3 * len(leaves))
    target, offset, weight = [], [], []
    for i, shape in enumerate(leaves):
        kt, kd, kc = keys[3 * i : 3 * i + 3]
        target.append(jax.random.uniform(kt, shape, minval=-1.0, maxval=1.0))
        d = jax.random.uniform(kd, shape, minval=-0.5, maxval=0.5)
        if len(shape) >= 2:  # zero mean over the fan-in axes of each output unit
            d = d - d.mean(axis=tuple(range(len(shape) - 1)), keepdims=True)
        offset.append(d)
        weight.append(jax.random.uniform(kc, shape, minval=0.5, maxval=2.0))
    build = lambda xs: jax.tree.unflatten(treedef, [x.astype(dtype) for x in xs])
    return build(target), build(offset), build(weight)


def make_parabola(shapes: PyTree = DEFAULT_PARAM_SHAPES, dtype=jnp.float32, *, seed: int = 0):
    """Weighted quadratic ``sum(c * (p - T)**2)``; see the module docstring."""
    target, offset, weight = _start_and_target(shapes, dtype, seed)

    def loss(params):
        terms = jax.tree.map(lambda p, t, c: jnp.sum(c * (p - t) ** 2), params, target, weight)
        return sum(jax.tree.leaves(terms))

    init = jax.tree.map(jnp.add, target, offset)
    return Problem("parabola", init, target, loss)


def make_rosenbrock(shapes: PyTree = DEFAULT_PARAM_SHAPES, dtype=jnp.float32, *, seed: int = 0):
    """Paired Rosenbrock over all raveled leaves, minimum at ``T``; see the module docstring."""
    target, offset, _ = _start_and_target(shapes, dtype, seed)

    def loss(params):
        z = jnp.concatenate(
            [jnp.ravel(p - t + 1) for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(target))]
        )
        n = z.shape[0] // 2
        x, y = z[0 : 2 * n : 2], z[1 : 2 * n : 2]
        value = jnp.sum((1 - x) ** 2 + 100 * (y - x**2) ** 2)
        return value + jnp.sum((1 - z[2 * n :]) ** 2)

    init = jax.tree.map(jnp.add, target, offset)
    return Problem("rosenbrock", init, target, loss)


PROBLEMS: Mapping[str, Callable[..., Problem]] = {
    "parabola": make_parabola,
    "rosenbrock": make_rosenbrock,
}


def max_ndim_mask(params: PyTree) -> PyTree:
    """Default mask for ``check_masked``: the leaves of the largest ndim."""
    top = max(jnp.ndim(x) for x in jax.tree.leaves(params))
    return jax.tree.map(lambda x: jnp.ndim(x) == top, params)


@dataclasses.dataclass(frozen=True)
class ConformanceCase:
    """One transform under test.

    Attributes:
      name: the pytest id.
      factory: zero-argument callable returning a fresh transform. ``None``
        means ``inject_factory(**inject_kwargs)``.
      inject_factory: the transform's public factory, for ``check_inject``
        (``optax.inject_hyperparams(inject_factory, static_args)``). ``None``
        skips that check.
      inject_kwargs: arguments for ``inject_factory``; the numeric ones are
        injected as hyperparameters.
      static_args: arguments of ``inject_factory`` that must stay static (shape
        arguments such as ``axis``; the default of every such argument is
        bound by ``inject_hyperparams`` too, so list them even when omitted).
      param_shapes: pytree of shape tuples for every check's params/grads.
      mask: ``params -> bool pytree`` for ``check_masked`` (default
        :func:`max_ndim_mask`); the check also runs its complement unless
        ``check_mask_complement`` is False.
      check_mask_complement: see ``mask``.
      leafwise: the transform treats every leaf independently, so masked-in
        leaves must equal the transform applied to those leaves alone.
      problems: names in :data:`PROBLEMS` for ``check_convergence``.
      learning_rate, momentum, steps, atol, loss_rtol: ``check_convergence``
        settings (see the module docstring). Loosen only with a documented
        reason.
    """

    name: str
    factory: Factory | None = None
    inject_factory: Callable[..., optax.GradientTransformation] | None = None
    inject_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    static_args: tuple[str, ...] = ()
    param_shapes: PyTree = dataclasses.field(default_factory=lambda: DEFAULT_PARAM_SHAPES)
    mask: Callable[[PyTree], PyTree] | None = None
    check_mask_complement: bool = True
    leafwise: bool = True
    problems: tuple[str, ...] = tuple(PROBLEMS)
    learning_rate: float = 1e-3
    momentum: float = 0.9
    steps: int = 10_000
    atol: float = 3e-2
    loss_rtol: float = 1e-3

    def __post_init__(self):
        if self.factory is None:
            if self.inject_factory is None:
                raise ValueError(f"case {self.name!r}: give `factory` or `inject_factory`.")
            kwargs = dict(self.inject_kwargs)
            object.__setattr__(self, "factory", lambda: self.inject_factory(**kwargs))

    def __str__(self) -> str:
        return self.name

    def params(self, dtype=jnp.float32, seed: int = 0) -> PyTree:
        return random_tree(self.param_shapes, dtype, seed=seed)

    def grads(self, dtype=jnp.float32, seed: int = 1) -> PyTree:
        return random_tree(self.param_shapes, dtype, seed=seed, scale=0.1)


def apply_once(tx: optax.GradientTransformation, grads: PyTree, params: PyTree = None):
    """The updates of one ``tx.update`` from a fresh state (params default to grads)."""
    params = grads if params is None else params
    return tx.update(grads, tx.init(params), params)[0]


# ----------------------------------------------------------------------------
# Assertions
# ----------------------------------------------------------------------------


def assert_non_float_leaves_pass_through(
    tx: optax.GradientTransformation, shape: tuple[int, ...] = (1, 2, 2, 4)
) -> None:
    """Integer and ``float0`` leaves come back as the very same objects."""
    tree = {
        "ints": np.arange(math.prod(shape), dtype=np.int32).reshape(shape),
        "float0": np.zeros(shape, jax.dtypes.float0),  # jax.grad of an integer input
    }
    out = apply_once(tx, tree)
    assert out["ints"] is tree["ints"] and out["float0"] is tree["float0"]


def assert_trees_close(actual, expected, *, rtol=_RTOL, atol=_ATOL, what=""):
    assert jax.tree.structure(actual) == jax.tree.structure(expected), (
        f"{what}: tree structures differ: {jax.tree.structure(actual)} vs "
        f"{jax.tree.structure(expected)}"
    )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            np.asarray(b, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=f"{what} at {jax.tree_util.keystr(path)}",
        )


def assert_same_avals(actual, expected, *, what=""):
    """Same tree structure, shapes and dtypes (what lax.cond and jit caching need)."""
    aval = lambda t: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), t)
    assert jax.tree.structure(actual) == jax.tree.structure(expected), (
        f"{what}: tree structures differ: {jax.tree.structure(actual)} vs "
        f"{jax.tree.structure(expected)}"
    )
    assert aval(actual) == aval(expected), f"{what}: shapes/dtypes differ"


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------


def check_jit(case: ConformanceCase) -> None:
    """Two updates under ``jax.jit`` equal the eager ones (init too)."""
    params, tx = case.params(), case.factory()
    grads = [case.grads(seed=1), case.grads(seed=2)]
    eager_state, jit_state = tx.init(params), jax.jit(tx.init)(params)
    assert_trees_close(jit_state, eager_state, what="init under jit")
    update = jax.jit(tx.update)
    for i, g in enumerate(grads):
        eager_updates, eager_state = tx.update(g, eager_state, params)
        jit_updates, jit_state = update(g, jit_state, params)
        assert_trees_close(jit_updates, eager_updates, what=f"updates, step {i}")
        assert_trees_close(jit_state, eager_state, what=f"state, step {i}")


def check_donation(case: ConformanceCase) -> None:
    """The state can be donated to a jitted update (as a train step does): no two state
    leaves share one buffer, and donated updates equal undonated ones."""
    params, tx = case.params(), case.factory()
    g = case.grads(seed=1)
    state = tx.init(params)
    ids = [id(x) for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    assert len(ids) == len(set(ids)), "init returns the same array in several state leaves"
    expected = jax.jit(tx.update)(g, tx.init(params), params)
    donated = jax.jit(tx.update, donate_argnums=1)(g, state, params)
    assert_trees_close(donated, expected, what="update with the state donated")


def check_extra_args(case: ConformanceCase) -> None:
    """Unknown keyword arguments are accepted and ignored (alone and in a chain)."""
    params, tx = case.params(), case.factory()
    wrapped = optax.with_extra_args_support(tx)
    chained = optax.chain(case.factory(), optax.sgd(0.1))

    @jax.jit
    def step(grads, state, chained_state):
        expected = tx.update(grads, state, params)
        got = wrapped.update(grads, state, params, unknown_kw=1)
        _, chained_state = chained.update(grads, chained_state, params, unknown_kw=1, value=1.0)
        return expected, got, chained_state

    state, chained_state = tx.init(params), chained.init(params)
    for seed in (1, 2):
        expected, got, chained_state = step(case.grads(seed=seed), state, chained_state)
        assert_trees_close(got, expected, what="(updates, state) with an unknown kwarg")
        state = expected[1]


def check_no_recompilation(case: ConformanceCase) -> None:
    """A jitted train step is traced once for two calls (state types are stable)."""
    problem = make_parabola(case.param_shapes)
    tx = optax.chain(case.factory(), optax.sgd(case.learning_rate, momentum=case.momentum))
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)
        grads = jax.grad(problem.loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = problem.init_params, tx.init(problem.init_params)
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1, f"the train step was traced {len(traces)} times for 3 calls"
    assert step._cache_size() == 1


def run_convergence(case: ConformanceCase, problem: Problem, factory: Factory | None = None):
    """Runs ``chain(transform, sgd)`` in ``lax.scan``; returns final params and losses."""
    schedule = optax.cosine_decay_schedule(case.learning_rate, case.steps)
    tx = optax.chain((factory or case.factory)(), optax.sgd(schedule, momentum=case.momentum))

    def body(carry, _):
        params, state = carry
        grads = jax.grad(problem.loss)(params)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    @jax.jit
    def run(params):
        (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), length=case.steps)
        return params

    final = run(problem.init_params)
    return final, float(problem.loss(problem.init_params)), float(problem.loss(final))


def check_convergence(case: ConformanceCase, problem_name: str, factory: Factory | None = None):
    """``chain(transform, sgd)`` reaches the problem's optimum (module docstring)."""
    problem = PROBLEMS[problem_name](case.param_shapes)
    final, loss0, loss1 = run_convergence(case, problem, factory)
    errors = jax.tree.map(lambda p, t: float(jnp.max(jnp.abs(p - t))), final, problem.target)
    worst = max(jax.tree.leaves(errors))
    assert math.isfinite(loss1) and worst <= case.atol and loss1 <= case.loss_rtol * loss0, (
        f"{case.name} on {problem_name}: max|p - target| per leaf {errors} (atol {case.atol}), "
        f"loss {loss0:.3g} -> {loss1:.3g} (needs <= {case.loss_rtol:g} x initial)"
    )


def check_inject(case: ConformanceCase) -> None:
    """``optax.inject_hyperparams`` gives the same updates and inner state."""
    if case.inject_factory is None:
        pytest.skip(f"{case.name}: no inject_factory")
    params = case.params()
    plain = case.inject_factory(**case.inject_kwargs)
    injected = optax.inject_hyperparams(case.inject_factory, static_args=case.static_args)(
        **case.inject_kwargs
    )
    state, istate = plain.init(params), injected.init(params)
    numeric = {
        k
        for k, v in case.inject_kwargs.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    } - set(case.static_args)
    assert numeric <= set(istate.hyperparams), f"not injected: {numeric - set(istate.hyperparams)}"

    @jax.jit
    def step(grads, state, istate):
        return plain.update(grads, state, params), injected.update(grads, istate, params)

    for seed in (1, 2):
        (updates, state), (iupdates, istate) = step(case.grads(seed=seed), state, istate)
        assert_trees_close(iupdates, updates, what=f"injected updates (seed {seed})")
        assert_trees_close(istate.inner_state, state, what=f"injected inner state (seed {seed})")


def check_dtype(case: ConformanceCase, dtype) -> None:
    """Updates keep the params' dtype; state avals are stable; a chained step too."""
    dtype = jnp.dtype(dtype)
    params, grads, tx = case.params(dtype), case.grads(dtype), case.factory()
    state = jax.jit(tx.init)(params)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    assert_same_avals(updates, params, what=f"{dtype} updates vs params")
    assert_same_avals(new_state, state, what=f"{dtype} state after update vs init")
    chained = optax.chain(case.factory(), optax.sgd(0.1, momentum=0.9))
    cstate = chained.init(params)

    @jax.jit
    def step(p, s):
        u, s = chained.update(grads, s, p)
        return optax.apply_updates(p, u), s

    p, s = step(params, cstate)
    p, s = step(p, s)
    assert_same_avals(p, params, what=f"{dtype} params after two chained steps")
    assert_same_avals(s, cstate, what=f"{dtype} chained state")
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


def _select(tree, mask, keep: bool):
    return jax.tree.map(lambda x, m: x if bool(m) == keep else None, tree, mask)


def _masked_and_alone(tx, alone, mask, params, sub_params):
    """Two updates of ``optax.masked(tx)`` and of ``alone`` on the masked-in leaves."""

    def run(grads, state, alone_state):
        out = []
        for g in grads:  # two steps, so that a stateful transform's state is used
            updates, state = tx.update(g, state, params)
            expected, alone_state = alone.update(_select(g, mask, True), alone_state, sub_params)
            out.append((updates, expected))
        return out

    return run


def check_masked(case: ConformanceCase) -> None:
    """In ``optax.masked``: masked-out leaves unchanged; masked-in as the transform alone."""
    params = case.params()
    grads = [case.grads(seed=1), case.grads(seed=2)]
    mask = (case.mask or max_ndim_mask)(params)
    masks = [mask]
    if case.check_mask_complement:
        masks.append(jax.tree.map(lambda m: not bool(m), mask))
    for m in masks:
        assert any(jax.tree.leaves(m)), "the mask selects no leaf"
        tx, alone = optax.masked(case.factory(), m), case.factory()
        sub_params = _select(params, m, True)
        run = jax.jit(_masked_and_alone(tx, alone, m, params, sub_params))
        for i, (g, (updates, expected)) in enumerate(
            zip(grads, run(grads, tx.init(params), alone.init(sub_params)))
        ):
            for (path, u), gi, mi in zip(
                jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(g), jax.tree.leaves(m)
            ):
                where = jax.tree_util.keystr(path)
                assert u.dtype == gi.dtype, f"dtype changed at {where}"
                if not mi:
                    np.testing.assert_array_equal(u, gi, err_msg=f"masked-out leaf {where} changed")
            if case.leafwise:
                assert_trees_close(
                    _select(updates, m, True), expected, what=f"masked-in leaves, step {i}"
                )


def check_multi_steps(case: ConformanceCase, k: int = 3) -> None:
    """In ``optax.MultiSteps``: k-1 zero updates, then the transform of the mean gradient."""
    for dtype in (jnp.float32, jnp.bfloat16):
        params = case.params(dtype)
        grads = [case.grads(dtype, seed=s) for s in range(1, k + 1)]
        inner = lambda: optax.chain(case.factory(), optax.sgd(0.1))
        tx = optax.MultiSteps(inner(), every_k_schedule=k)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for i, g in enumerate(grads):
            updates, state = update(g, state, params)
            assert_same_avals(updates, params, what=f"MultiSteps {dtype} update {i}")
            if i < k - 1:
                assert all(not bool(jnp.any(u)) for u in jax.tree.leaves(updates))
        if dtype == jnp.float32:
            mean = jax.tree.map(lambda *gs: sum(gs) / k, *grads)
            fresh = inner()
            expected, _ = jax.jit(fresh.update)(mean, fresh.init(params), params)
            assert_trees_close(
                updates, expected, rtol=1e-4, atol=1e-6, what="k-th MultiSteps update"
            )


def check_cond(case: ConformanceCase) -> None:
    """The state has the same avals before and after ``update``; ``lax.cond`` over it works.

    The true branch must give the plain (jitted) update's updates and state,
    the false branch the gradients and the state unchanged, along a sequence
    of both.
    """
    params, tx = case.params(), case.factory()
    state = tx.init(params)
    _, after = tx.update(case.grads(), state, params)
    assert_same_avals(after, state, what="state after update vs init")

    @jax.jit
    def step(grads, state, pred):
        updates, new_state = jax.lax.cond(
            pred, lambda: tx.update(grads, state, params), lambda: (grads, state)
        )
        return updates, jax.lax.cond(pred, lambda: new_state, lambda: state)

    plain = jax.jit(lambda g, s: tx.update(g, s, params))
    for i, pred in enumerate([True, False, True, True]):
        grads = case.grads(seed=i + 1)
        expected_updates, expected_state = plain(grads, state)
        updates, new_state = step(grads, state, jnp.asarray(pred))
        if pred:
            assert_trees_close(
                updates, expected_updates, what=f"cond true branch updates, step {i}"
            )
            assert_trees_close(new_state, expected_state, what=f"cond true branch state, step {i}")
        else:
            assert_trees_close(updates, grads, rtol=0, atol=0, what="cond false branch updates")
            assert_trees_close(new_state, state, rtol=0, atol=0, what="cond false branch state")
        state = new_state


def _params_shaped_subtrees(state: PyTree, params: PyTree) -> list:
    """Subtrees of ``state`` with the structure of ``params`` (what map_params maps)."""
    target = jax.tree.structure(params)
    is_match = lambda x: jax.tree.structure(x) == target
    return [x for x in jax.tree.leaves(state, is_leaf=is_match) if is_match(x)]


def check_map_params(case: ConformanceCase) -> None:
    """``optax.tree.map_params`` maps exactly the params-shaped parts of the state.

    Mapping ``v -> v + 1`` then ``v -> v - 1`` restores the state; after the
    first map every leaf is either unchanged or shifted by exactly one, at
    least one leaf is shifted when the state holds a params-shaped subtree,
    and the mapped state is still a valid state (updates keep their avals).
    """
    params, tx = case.params(), case.factory()
    state = tx.update(case.grads(), tx.init(params), params)[1]  # a non-trivial state
    shift = lambda d: lambda v: v + jnp.asarray(d, v.dtype)
    mapped = optax.tree.map_params(tx, shift(1), state)
    assert_same_avals(mapped, state, what="map_params(v + 1)")
    changed = 0
    for (path, m), s in zip(jax.tree_util.tree_leaves_with_path(mapped), jax.tree.leaves(state)):
        m, s = np.asarray(m), np.asarray(s)
        if m.dtype == s.dtype and np.array_equal(m, s, equal_nan=True):
            continue
        np.testing.assert_allclose(
            m.astype(np.float64),
            s.astype(np.float64) + 1,
            rtol=1e-6,
            atol=1e-6,
            err_msg=f"map_params changed {jax.tree_util.keystr(path)} by something other than f",
        )
        changed += 1
    if _params_shaped_subtrees(state, params):
        assert changed > 0, "map_params(v + 1) changed no leaf of a state with params-shaped parts"
    back = optax.tree.map_params(tx, shift(-1), mapped)
    assert_trees_close(back, state, rtol=1e-6, atol=1e-6, what="map_params round trip")
    updates, _ = tx.update(case.grads(), mapped, params)
    assert_same_avals(updates, params, what="updates from the mapped state")


CHECKS: Mapping[str, Callable[[ConformanceCase], None]] = {
    "jit": check_jit,
    "donation": check_donation,
    "extra_args": check_extra_args,
    "no_recompilation": check_no_recompilation,
    "inject": check_inject,
    "masked": check_masked,
    "multi_steps": check_multi_steps,
    "cond": check_cond,
    "map_params": check_map_params,
}


def run_all(case: ConformanceCase, *, dtypes: Sequence[Any] = (jnp.bfloat16, jnp.float32)):
    """Runs every check on ``case`` (skips raise ``pytest.skip.Exception``)."""
    for check in CHECKS.values():
        check(case)
    for dtype in dtypes:
        check_dtype(case, dtype)
    for name in case.problems:
        check_convergence(case, name)
