"""GC-ODE: configuration, exactness at initialisation, gradient routing, solvers, gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import gcgd_jax.models.gc_ode as gc_ode_module
import gcgd_jax.models.gc_ode.module as gc_ode_modules  # where ODEBranch.solve looks up odeint
from gcgd_jax.models import GCODE, GCODEConfig, resnet18, resnet20, resnet50
from gcgd_jax.models.gc_ode import ODEBranch, TimeConv, resolve_gc_ode
from gcgd_jax.models.gc_ode.routing import routed_branch, solve_pure


def _x(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _randomise_field(branch: ODEBranch, seed: int = 3, size: float = 1.0) -> None:
    """Gives the zero-initialised last GroupNorm a random scale, so phi != 0."""
    norm = branch.field.norm_out
    shape, dtype = norm.scale.shape, norm.scale[...].dtype
    norm.scale[...] = size * jax.random.normal(jax.random.key(seed), shape, dtype)
    norm.bias[...] = 0.1 * size * jax.random.normal(jax.random.key(seed + 1), shape, dtype)


# ----------------------------------------------------------------------------- configuration


def test_config_defaults_and_shorthands():
    cfg = GCODEConfig()
    assert (cfg.mode, cfg.solver, cfg.steps, cfg.width, cfg.adaptive) == (
        "gradient",
        "euler",
        1,
        None,
        False,
    )
    assert cfg.adjoint == "auto"
    assert (cfg.gate_max, cfg.gate_momentum, cfg.control_scale) == (0.5, 0.9, 1.0)
    for mode in ("scale_only", "frozen_branch"):
        assert GCODEConfig(mode=mode).mode == mode
    assert resolve_gc_ode("branch") == GCODEConfig(mode="branch")
    assert resolve_gc_ode("gradient") == GCODEConfig(mode="gradient")
    assert resolve_gc_ode(None) is None and resolve_gc_ode(cfg) is cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"solver": "rk4"}, "solver"),
        ({"steps": 0}, "steps"),
        ({"steps": -1}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"mode": "gradients"}, "mode"),
        ({"mode": "Branch"}, "mode"),
        ({"width": 0}, "width"),
        ({"adaptive": True}, "error estimate"),  # euler has none
        ({"adaptive": 1, "solver": "heun"}, "adaptive"),
        ({"rtol": 0.0, "adaptive": True, "solver": "tsit5"}, "rtol"),
        ({"atol": -1.0}, "atol"),
        ({"max_steps": 0}, "max_steps"),
        ({"gate_max": 1.5}, "gate_max"),
        ({"gate_max": -0.1}, "gate_max"),
        ({"gate_momentum": 1.0}, "gate_momentum"),
        ({"control_scale": 0.0}, "control_scale"),
        ({"control_scale": float("nan")}, "control_scale"),
        ({"adjoint": "backsolve"}, "adjoint"),
        ({"loss_subsample": 0}, "loss_subsample"),
        ({"loss_subsample": 1.5}, "loss_subsample"),
        ({"adjoint": "unrolled", "solver": "heun", "adaptive": True}, "unrolled"),
    ],
)
def test_bad_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GCODEConfig(**kwargs)


def test_bad_gc_ode_argument_raises_value_error():
    for spec in ("gradeint", "ode", 3, {"mode": "branch"}):
        with pytest.raises(ValueError, match="gc_ode"):
            resolve_gc_ode(spec)


def test_pairs_and_shapes_per_architecture():
    r20 = nnx.eval_shape(lambda: resnet20(gc_ode="branch", rngs=nnx.Rngs(0)))
    assert r20.gc_ode.num_pairs == 3 and r20.gc_ode.channels == (16, 16, 32, 64)
    r18 = nnx.eval_shape(lambda: resnet18(gc_ode="gradient", rngs=nnx.Rngs(0)))
    assert r18.gc_ode.num_pairs == 4 and r18.gc_ode.strides == (1, 2, 2, 2)
    cfg = GCODEConfig(width=32)
    r50 = nnx.eval_shape(lambda: resnet50(gc_ode=cfg, rngs=nnx.Rngs(0)))
    assert r50.gc_ode.num_pairs == 4 and r50.gc_ode.channels == (64, 256, 512, 1024, 2048)
    last = r50.gc_ode.branches[3]
    assert last.field.conv1.kernel.shape == (3, 3, 2049, 32)
    assert last.field.conv2.kernel.shape == (3, 3, 33, 2048)
    assert last.proj_conv.kernel.shape == (1, 1, 1024, 2048)
    assert r20.gc_ode.branches[0].proj_conv is None  # same shape: identity projection


# ----------------------------------------------------------------------------- building blocks


def test_time_conv_equals_convolution_of_concatenation():
    conv = TimeConv(3, 4, rngs=nnx.Rngs(0))
    a, t = _x((2, 5, 5, 3)), 0.37
    cat = jnp.concatenate([a, jnp.full((2, 5, 5, 1), 1 + t)], axis=-1)  # the channel is 1 + t
    expected = jax.lax.conv_general_dilated(
        cat, conv.kernel[...], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(conv(a, jnp.float32(t)), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- solvers


SOLVER_CONFIGS = [
    GCODEConfig(solver="euler", steps=1),
    GCODEConfig(solver="heun", steps=2),
    GCODEConfig(solver="tsit5", steps=1),
    GCODEConfig(solver="heun", adaptive=True),
    GCODEConfig(solver="tsit5", adaptive=True),
    GCODEConfig(solver="euler", steps=1, adjoint="direct", width=3),
    GCODEConfig(solver="heun", steps=2, adjoint="unrolled"),
]


@pytest.fixture(scope="module")
def fine_euler_solution():
    """z(1) with 128 Euler steps: the reference the solvers must approach."""
    branch = ODEBranch(4, 6, 2, GCODEConfig(solver="euler", steps=128), rngs=nnx.Rngs(1))
    _randomise_field(branch, size=0.3)
    return jax.jit(branch.solve)(_x((2, 6, 6, 4)))


@pytest.mark.parametrize(
    "config",
    SOLVER_CONFIGS,
    ids=lambda c: (
        f"{c.solver}-{c.steps}-{'adaptive' if c.adaptive else 'fixed'}-{c.adjoint}-{c.width}"
    ),
)
def test_solvers_run_under_jit_with_gradients(config, fine_euler_solution):
    branch = ODEBranch(4, 6, 2, config, rngs=nnx.Rngs(1))
    _randomise_field(branch, size=0.3)
    graphdef, params = nnx.split(branch)
    x = _x((2, 6, 6, 4))

    @jax.jit
    def loss_and_grads(params, x):
        return jax.value_and_grad(
            lambda p, x: jnp.sum(solve_pure(graphdef, x, p) ** 2), argnums=(0, 1)
        )(params, x)

    loss, (g_params, g_x) = loss_and_grads(params, x)
    assert np.isfinite(float(loss))
    assert g_x.shape == x.shape and bool(jnp.all(jnp.isfinite(g_x)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g_params))
    if config.width is None and (config.adaptive or config.solver != "euler"):
        # Higher-order / adaptive solvers land near the fine Euler solution.
        z1 = jax.jit(lambda p, x: solve_pure(graphdef, x, p))(params, x)
        np.testing.assert_allclose(z1, fine_euler_solution, atol=0.02, rtol=0.02)


@pytest.mark.parametrize(("solver", "steps"), [("euler", 3), ("heun", 2), ("tsit5", 2)])
def test_unrolled_solve_equals_diffeqsolve_values_and_gradients(solver, steps):
    """The default for fixed steps, adjoint="auto" -> "unrolled" (Python loops over
    the solver's steps and stages), is the same integrator as diffeqsolve with
    constant steps: values and both gradients."""
    with jax.enable_x64(True):
        config = GCODEConfig(solver=solver, steps=steps, adjoint="recursive_checkpoint")
        branch = ODEBranch(2, 3, 2, config, rngs=nnx.Rngs(0))
        _randomise_field(branch)
        graphdef, params = nnx.split(branch)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nnx.as_pure(params))
        graphdef_u = nnx.graphdef(ODEBranch(2, 3, 2, GCODEConfig(solver=solver, steps=steps),
                                            rngs=nnx.Rngs(0)))  # fmt: skip
        x = _x((2, 4, 4, 2), dtype=jnp.float64)
        ct = _x((2, 2, 2, 3), 5, dtype=jnp.float64)

        def f(graphdef, x, p):
            return jnp.sum(solve_pure(graphdef, x, p) * ct)

        ref, ref_grads = jax.value_and_grad(f, argnums=(1, 2))(graphdef, x, params)
        got, got_grads = jax.value_and_grad(f, argnums=(1, 2))(graphdef_u, x, params)
        # The unrolled solve really is feed-forward code (no loop), the default is not.
        assert "while" not in str(jax.make_jaxpr(f, static_argnums=0)(graphdef_u, x, params))
        assert "while" in str(jax.make_jaxpr(f, static_argnums=0)(graphdef, x, params))
        np.testing.assert_allclose(got, ref, rtol=1e-12)
        for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


def test_branch_gradient_matches_finite_differences_float64():
    with jax.enable_x64(True):
        branch = ODEBranch(2, 3, 2, GCODEConfig(solver="euler", steps=2), rngs=nnx.Rngs(0))
        _randomise_field(branch)
        graphdef, params = nnx.split(branch)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nnx.as_pure(params))
        x = _x((2, 4, 4, 2), dtype=jnp.float64)
        ct = _x((2, 2, 2, 3), 5, dtype=jnp.float64)

        def f(x, params):
            return jnp.sum(solve_pure(graphdef, x, params) * ct)

        f = jax.jit(f)
        assert f(x, params).dtype == jnp.float64
        check_grads(f, (x, params), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_routed_gradients_equal_two_stop_gradient_solves():
    branch = ODEBranch(2, 4, 2, GCODEConfig(solver="euler", steps=2), rngs=nnx.Rngs(1))
    _randomise_field(branch)
    graphdef, params = nnx.split(branch)
    x = _x((2, 4, 4, 2))
    c1, c2 = _x((2, 2, 2, 4), 1), _x((2, 2, 2, 4), 2)

    def routed(x, p):
        zhat, z = routed_branch(graphdef, x, p)
        return jnp.sum(zhat * c1) + jnp.sum(z * c2)

    def reference(x, p):
        zhat = solve_pure(graphdef, x, jax.lax.stop_gradient(p))
        z = solve_pure(graphdef, jax.lax.stop_gradient(x), p)
        return jnp.sum(zhat * c1) + jnp.sum(z * c2)

    g = jax.jit(jax.grad(routed, argnums=(0, 1)))(x, params)
    g_ref = jax.jit(jax.grad(reference, argnums=(0, 1)))(x, params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- GCODE module


def _pair_gradient(gc, stage, h0, w):
    """d/dh0 of sum(w * h1_out) through ``stage`` and GC-ODE pair 0 (one jit)."""
    graphdef, state = nnx.split(gc)

    @jax.jit
    def run(state, h0):
        def f(h0):
            g = nnx.merge(graphdef, state, copy=True)  # merged inside the trace it mutates
            out, loss = g(0, h0, stage(g.stage_input(0, h0)))
            return jnp.sum(out * w), (out, loss)

        return jax.grad(f, has_aux=True)(h0)

    return run(state, h0)


def _open(gc, fit=1.0):
    for branch in gc.branches:
        branch.fit[...] = jnp.float32(fit)


def test_gradient_mode_mixes_stage_and_branch_jacobians_convexly():
    gc = GCODE((2, 4), (2,), GCODEConfig(mode="gradient", gate_max=0.8), rngs=nnx.Rngs(0))
    _randomise_field(gc.branches[0])
    h0, w = _x((2, 4, 4, 2)), _x((2, 2, 2, 4), 2)
    kernel = _x((1, 1, 2, 4), 5)

    def stage(h):  # a stride-2 1x1 conv: not the branch
        return jax.lax.conv_general_dilated(
            h, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    stage_vjp = jax.vjp(stage, h0)[1](w)[0]
    branch_vjp = jax.vjp(gc.branches[0].solve, h0)[1](w)[0]
    # Closed gate (fit 0, as at init): exactly the plain gradient.
    g, (out, _) = _pair_gradient(gc, stage, h0, w)
    np.testing.assert_allclose(g, stage_vjp, rtol=1e-6, atol=1e-7)  # jit vs eager rounding
    np.testing.assert_array_equal(out, stage(h0))  # forward value unchanged
    # Gate at s = 0.8 * 0.5 = 0.4: (1 - s) J_stage^T w + s J_branch^T w.
    _open(gc, 0.5)
    assert float(gc.gate(0)) == pytest.approx(0.4)
    g, (out, loss) = _pair_gradient(gc, stage, h0, w)
    np.testing.assert_array_equal(out, stage(h0))
    expected = 0.6 * stage_vjp + 0.4 * branch_vjp
    assert float(jnp.max(jnp.abs(branch_vjp - stage_vjp))) > 1e-2  # the two maps differ
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-6)
    assert loss.dtype == jnp.float32


def test_probe_measures_the_mixed_and_the_plain_input_gradient():
    gc = GCODE((2, 4), (2,), GCODEConfig(mode="gradient", gate_max=0.8), rngs=nnx.Rngs(0))
    _randomise_field(gc.branches[0])
    h0, w = _x((2, 4, 4, 2)), _x((2, 2, 2, 4), 2)
    kernel = _x((1, 1, 2, 4), 5)

    def stage(h):
        return jax.lax.conv_general_dilated(
            h, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    stage_vjp = jax.vjp(stage, h0)[1](w)[0]
    graphdef, state = nnx.split(gc)

    def grads(state):
        def f(h0, probe):
            out, _ = nnx.merge(graphdef, state, copy=True).run_stages([stage], h0, probe=probe)
            return jnp.sum(out * w)

        return jax.jit(jax.grad(f, argnums=(0, 1)))(h0, gc.new_probe())

    g_h, g_probe = grads(state)  # closed gate: the plain gradient, ratio 1
    np.testing.assert_allclose(g_h, stage_vjp, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g_probe[0], [jnp.sum(stage_vjp**2)] * 2, rtol=1e-5)
    assert float(gc_ode_module.gradient_ratios(g_probe)[0]) == pytest.approx(1.0)
    _open(gc, 0.5)  # s = 0.4
    graphdef, state = nnx.split(gc)
    g_h, g_probe = grads(state)
    g_plain, _ = _pair_gradient(gc, stage, h0, w)
    np.testing.assert_allclose(g_h, g_plain, rtol=1e-6, atol=1e-7)  # measuring changes no gradient
    mixed = float(jnp.linalg.norm(g_plain)) / float(jnp.linalg.norm(stage_vjp))
    assert abs(mixed - 1.0) > 1e-2  # the mix is not scale-free here: a ratio to measure
    np.testing.assert_allclose(g_probe[0, 0], jnp.sum(stage_vjp**2), rtol=1e-5)
    np.testing.assert_allclose(g_probe[0, 1], jnp.sum(g_plain**2), rtol=1e-5)
    assert float(gc_ode_module.gradient_ratios(g_probe)[0]) == pytest.approx(mixed, rel=1e-5)
    assert gc_ode_module.gradient_ratios(jnp.zeros((1, 2))).tolist() == [1.0]  # no signal
    with pytest.raises(ValueError, match="probe must have shape"):
        gc.run_stages([stage], h0, probe=jnp.zeros((2, 2)))
    for mode in ("branch", "scale_only"):
        assert GCODE((2, 4), (2,), mode, rngs=nnx.Rngs(0)).new_probe() is None


def _matching_problem(sobolev_weight, dtype=jnp.float32):
    cfg = GCODEConfig(mode="gradient", gate_max=0.8, sobolev_weight=sobolev_weight)
    gc = GCODE((2, 4), (2,), cfg, rngs=nnx.Rngs(0))
    _randomise_field(gc.branches[0])
    _open(gc, 0.5)
    graphdef, params, rest = nnx.split(gc, nnx.Param, ...)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), nnx.as_pure(params))
    h0, w = _x((2, 4, 4, 2), dtype=dtype), _x((2, 2, 2, 4), 2, dtype=dtype)
    kernel = _x((1, 1, 2, 4), 5, dtype=dtype)

    def stage(h, kernel):
        return jax.lax.conv_general_dilated(
            h, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def f(h0, kernel, params):
        m = nnx.merge(graphdef, params, rest, copy=True)
        out, loss = m.run_stages([lambda h: stage(h, kernel)], h0)
        return jnp.sum(out * w) + loss

    return f, (h0, kernel, params), stage, w, gc


def test_backward_matching_changes_only_the_branch_gradient_by_the_mismatch_gradient():
    with jax.enable_x64(True):
        f0, args, stage, w, gc = _matching_problem(0.0, jnp.float64)
        f1, _, _, _, _ = _matching_problem(2.0, jnp.float64)
        g0 = jax.jit(jax.grad(f0, argnums=(0, 1, 2)))(*args)
        g1 = jax.jit(jax.grad(f1, argnums=(0, 1, 2)))(*args)
        np.testing.assert_allclose(g1[0], g0[0], rtol=1e-12, atol=1e-14)  # backbone input
        np.testing.assert_allclose(g1[1], g0[1], rtol=1e-12, atol=1e-14)  # stage weights
        h0, kernel, params = args
        a = jax.vjp(lambda h: stage(h, kernel), h0)[1](w)[0]  # J_stage^T g, g = w here
        reference = nnx.clone(gc.branches[0])  # DirectAdjoint: second derivatives work
        reference.config = dataclasses.replace(reference.config, adjoint="direct")
        bgd, _, brest = nnx.split(reference, nnx.Param, ...)
        branch_params = params["branches"][0]

        def mismatch(p):  # ||J_branch^T g - J_stage^T g||^2 / ||J_stage^T g||^2, exactly
            b = jax.vjp(lambda x: nnx.merge(bgd, p, brest).solve(x), h0)[1](w)[0]
            return jnp.sum((b - a) ** 2) / jnp.sum(a**2)

        assert float(mismatch(branch_params)) > 0.1  # a real mismatch to learn
        expected = jax.grad(mismatch)(branch_params)  # second derivatives through the solve
        got = jax.tree.map(lambda u, v: (u - v) / 2.0, g1[2]["branches"][0], g0[2]["branches"][0])
        got, expected = (
            jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(t)]) for t in (got, expected)
        )
        # A central difference (step 1e-3 of ||h||) across ReLU kinks: first-order accurate.
        error = float(jnp.linalg.norm(got - expected) / jnp.linalg.norm(expected))
        assert float(jnp.linalg.norm(expected)) > 1.0 and error < 5e-3, error


def test_backward_matching_reduces_the_mismatch_and_is_checked():
    f, (h0, kernel, params), stage, w, gc = _matching_problem(1.0)
    a = jax.vjp(lambda h: stage(h, kernel), h0)[1](w)[0]
    bgd, _, brest = nnx.split(gc.branches[0], nnx.Param, ...)

    def mismatch(p):
        b = jax.vjp(lambda x: nnx.merge(bgd, p, brest).solve(x), h0)[1](w)[0]
        return float(jnp.sum((b - a) ** 2) / jnp.sum(a**2))

    f_plain, *_ = _matching_problem(0.0)
    grad = jax.jit(lambda p: jax.tree.map(jnp.subtract, jax.grad(f, 2)(h0, kernel, p),
                                          jax.grad(f_plain, 2)(h0, kernel, p)))  # fmt: skip
    before = mismatch(params["branches"][0])
    for _ in range(30):  # gradient descent on the matching term alone
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grad(params))
    assert mismatch(params["branches"][0]) < 0.5 * before
    with pytest.raises(ValueError, match="sobolev_weight"):
        GCODEConfig(mode="branch", sobolev_weight=1.0)
    with pytest.raises(ValueError, match="sobolev_weight"):
        GCODEConfig(sobolev_weight=-1.0)


def test_a_branch_that_fits_the_stage_exactly_preserves_the_gradient():
    gc = GCODE((2, 4), (2,), GCODEConfig(mode="gradient", gate_max=1.0), rngs=nnx.Rngs(0))
    _randomise_field(gc.branches[0])
    twin = nnx.clone(gc.branches[0])  # the stage *is* the branch's function
    h0, w = _x((2, 4, 4, 2)), _x((2, 2, 2, 4), 2)
    plain = jax.vjp(twin.solve, h0)[1](w)[0]
    _open(gc, 1.0)  # s = 1: all of the gradient through the branch
    g, (_, loss) = _pair_gradient(gc, twin.solve, h0, w)
    np.testing.assert_allclose(g, plain, rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(0.0, abs=1e-10)


def test_loss_subsample_trains_the_branch_on_every_kth_example():
    h0, w = _x((4, 4, 4, 2)), _x((4, 2, 2, 4), 2)
    kernel = _x((1, 1, 2, 4), 5)

    def stage(h):
        return jax.lax.conv_general_dilated(
            h, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def build(k):
        cfg = GCODEConfig(mode="gradient", gate_max=0.8, loss_subsample=k)
        gc = GCODE((2, 4), (2,), cfg, rngs=nnx.Rngs(0))
        _randomise_field(gc.branches[0])
        _open(gc, 0.5)
        return gc

    # The forward value and the extra backward path use the whole batch.
    g_full, (out_full, _) = _pair_gradient(build(1), stage, h0, w)
    g_sub, (out_sub, _) = _pair_gradient(build(2), stage, h0, w)
    np.testing.assert_array_equal(out_sub, out_full)
    np.testing.assert_allclose(g_sub, g_full, rtol=1e-5, atol=1e-7)

    # The output loss and its parameter gradient: the full loss on examples 0 and 2.
    def loss_and_grad(gc, h):
        return nnx.value_and_grad(lambda g: g(0, h, stage(h))[1])(gc)

    reference, sub = build(1), build(2)
    ref_loss, ref_grad = loss_and_grad(reference, h0[::2])
    sub_loss, sub_grad = loss_and_grad(sub, h0)
    np.testing.assert_allclose(sub_loss, ref_loss, rtol=1e-6)
    ref_leaves = jax.tree.leaves(nnx.state(ref_grad, nnx.Param))
    sub_leaves = jax.tree.leaves(nnx.state(sub_grad, nnx.Param))
    assert len(sub_leaves) == len(ref_leaves) > 0
    for got, want in zip(sub_leaves, ref_leaves, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    # The gate's fit is the whole batch's, as with loss_subsample = 1 (a target the
    # branch partly explains, on the sub-sampled examples better than on the others).
    full, sub, half = build(1), build(2), build(1)
    h1 = (
        full.branches[0].solve(h0)
        + 0.5 * _x((4, 2, 2, 4), 7) * jnp.array([0, 1, 0, 1.0])[:, None, None, None]
    )
    for gc in (full, sub):
        gc(0, h0, h1)
    half(0, h0[::2], h1[::2])
    fits = [float(gc.branches[0].fit[...]) for gc in (full, sub, half)]
    assert fits[1] == pytest.approx(fits[0], rel=1e-6)
    assert fits[2] > fits[0] + 1e-3  # examples 0, 2 alone would have given another fit


def test_gate_follows_the_branch_fit():
    # Every example in the loss, so that the loss is the fit's aux (loss_subsample: below).
    cfg = GCODEConfig(mode="gradient", gate_max=0.5, gate_momentum=0.75, loss_subsample=1)
    gc = GCODE((4, 4), (1,), cfg, rngs=nnx.Rngs(0))
    h0 = _x((2, 4, 4, 4))
    h1 = h0 + 0.5 * _x((2, 4, 4, 4), 1)  # the fresh branch (z(1) = h0) explains most of h1
    _, loss = gc(0, h0, h1)
    explained = 1.0 - float(loss) / float(jnp.var(h1))
    assert 0.0 < explained < 1.0
    assert float(gc.branches[0].fit[...]) == pytest.approx(0.25 * explained, rel=1e-5)
    assert float(gc.gates()[0]) == pytest.approx(0.5 * 0.25 * explained, rel=1e-5)
    gc(0, h0, -h1)  # a branch that explains nothing: the fit decays towards 0
    assert float(gc.branches[0].fit[...]) == pytest.approx(0.75 * 0.25 * explained, rel=1e-5)
    gc(0, h0, h1, compute_loss=False)  # no statistics without the loss
    assert float(gc.branches[0].fit[...]) == pytest.approx(0.75 * 0.25 * explained, rel=1e-5)


def test_time_input_is_used_and_trained_at_every_solver_stage():
    for solver, steps in (("euler", 1), ("heun", 2)):
        branch = ODEBranch(4, 4, 1, GCODEConfig(solver=solver, steps=steps), rngs=nnx.Rngs(0))
        _randomise_field(branch)
        h = _x((2, 4, 4, 4))
        g = nnx.grad(lambda b, h=h: jnp.sum(b.solve(h) ** 2))(branch)
        time_slice = g.field.conv1.kernel[...][:, :, -1, :]
        assert float(jnp.max(jnp.abs(time_slice))) > 1e-4, solver


def test_scale_only_control_rescales_the_input_gradient_and_has_no_branch():
    gc = GCODE((2, 4), (2,), GCODEConfig(mode="scale_only", control_scale=1.7), rngs=nnx.Rngs(0))
    assert gc.num_pairs == 1 and len(gc.branches) == 0
    assert not jax.tree.leaves(nnx.state(gc, nnx.Param))
    h0, w = _x((2, 4, 4, 2)), _x((2, 2, 2, 4), 2)
    kernel = _x((1, 1, 2, 4), 5)

    def stage(h):
        return jax.lax.conv_general_dilated(
            h, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    g, (out, loss) = _pair_gradient(gc, stage, h0, w)
    np.testing.assert_array_equal(out, stage(h0))
    np.testing.assert_allclose(g, 1.7 * jax.vjp(stage, h0)[1](w)[0], rtol=1e-6)
    assert float(loss) == 0.0
    gc.eval()
    assert gc.stage_input(0, h0) is h0


def test_frozen_branch_control_is_never_trained():
    gc = GCODE((2, 4), (2,), GCODEConfig(mode="frozen_branch"), rngs=nnx.Rngs(0))
    assert not jax.tree.leaves(nnx.state(gc, nnx.Param))  # nothing for an optimizer
    h0, h1 = _x((2, 4, 4, 2)), _x((2, 2, 2, 4), 1)
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(gc, gc_ode_module.FrozenWeight))]
    _, loss = gc(0, h0, h1)
    assert float(loss) > 0  # still measured, for the gate
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(gc, gc_ode_module.FrozenWeight))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    # Its auxiliary loss has no gradient with respect to the input either.
    graphdef, state = nnx.split(gc)
    g = jax.grad(lambda h: nnx.merge(graphdef, state, copy=True)(0, h, h1)[1])(h0)
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_run_stages_on_a_user_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
            self.b = nnx.Conv(8, 8, (3, 3), rngs=rngs)
            self.gc_ode = GCODE((3, 8, 8), (2, 1), "gradient", rngs=rngs)

        def __call__(self, x):
            return self.gc_ode.run_stages([self.a, self.b], x)

    net = Net(nnx.Rngs(0))
    x = _x((2, 8, 8, 3))
    h, loss = net(x)
    np.testing.assert_allclose(h, net.b(net.a(x)), rtol=1e-6)  # forward = the plain network
    assert float(loss) > 0
    with pytest.raises(ValueError, match="2 pairs but got 1 stages"):
        net.gc_ode.run_stages([net.a], x)


def test_branch_mode_is_exact_at_init_and_trains_gamma():
    gc = GCODE((2, 4), (2,), "branch", rngs=nnx.Rngs(0))
    _randomise_field(gc.branches[0])
    h0, h1 = _x((2, 4, 4, 2)), _x((2, 2, 2, 4), 1)
    out, loss = gc(0, h0, h1)
    np.testing.assert_array_equal(out, h1)
    assert float(loss) == 0.0
    g = nnx.grad(lambda gc: jnp.sum(gc(0, h0, h1)[0] ** 3))(gc)
    assert float(jnp.sum(jnp.abs(g.branches[0].gamma[...]))) > 0


def test_eval_mode_and_views_toggle_the_branch(monkeypatch):
    gc = GCODE((4, 4), (1,), "gradient", rngs=nnx.Rngs(0))
    calls = []
    real = gc_ode_module.odeint
    monkeypatch.setattr(gc_ode_modules, "odeint", lambda *a: calls.append(1) or real(*a))
    h = _x((1, 4, 4, 4))
    gc(0, h, h)
    assert calls == [1, 1]  # training: the extra path's solve and the sub-sampled loss's
    gc.eval()
    out, loss = gc(0, h, 2 * h)
    assert calls == [1, 1] and float(loss) == 0.0  # eval: no solve
    np.testing.assert_array_equal(out, 2 * h)
    assert nnx.view(gc, deterministic=False).deterministic is False
    gc.train()
    assert nnx.view(gc, use_running_average=True).deterministic is True
    assert gc.deterministic is False


# ----------------------------------------------------------------------------- in the ResNet


@pytest.fixture(scope="module")
def models():
    """A plain ResNet-20 and GC-ODE ResNet-20s built from the same seed (train mode)."""
    out = {"plain": resnet20(rngs=nnx.Rngs(0))}
    for mode in ("branch", "gradient"):
        out[mode] = resnet20(gc_ode=mode, rngs=nnx.Rngs(0))
        for branch in out[mode].gc_ode.branches:  # a non-trivial vector field
            _randomise_field(branch)
    out["fresh_gradient"] = resnet20(gc_ode="gradient", rngs=nnx.Rngs(0))  # gate closed
    _open(out["gradient"].gc_ode, 1.0)  # gate open (s = 0.5) as if the branches fitted
    return out


X, W = _x((4, 8, 8, 3)), _x((4, 10), 7)


def _forward(model, train: bool):
    """Jitted forward (logits, aux) in train or eval mode; the model is not modified."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        m.train() if train else m.eval()
        return m(x, return_aux=True)

    return run(nnx.as_pure(state), X)


def _gradients(model):
    """One jit: logits, aux loss, d(task)/d(params, x), d(aux)/d(params), flattened."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, rest, x):
        def task(params, x):
            logits, aux = nnx.merge(graphdef, params, rest)(x, return_aux=True)
            return jnp.sum(logits * W), (logits, aux["gc_ode_loss"])

        def aux_loss(params):
            return nnx.merge(graphdef, params, rest)(x, return_aux=True)[1]["gc_ode_loss"]

        (_, (logits, aux)), (g_task, g_x) = jax.value_and_grad(task, (0, 1), has_aux=True)(
            params, x
        )
        return logits, aux, g_task, g_x, jax.grad(aux_loss)(params)

    logits, aux, g_task, g_x, g_aux = run(nnx.as_pure(params), nnx.as_pure(rest), X)
    flat = lambda state: dict(nnx.to_flat_state(state))
    return {"logits": logits, "aux": aux, "task": flat(g_task), "x": g_x, "aux_grad": flat(g_aux)}


@pytest.fixture(scope="module")
def grads(models):
    return {name: _gradients(models[name]) for name in ("plain", "gradient", "fresh_gradient")}


def test_fresh_gradient_mode_changes_no_gradient(grads):
    """At initialisation the gate is closed: every backbone gradient is the plain one."""
    plain, fresh = grads["plain"], grads["fresh_gradient"]
    np.testing.assert_array_equal(fresh["logits"], plain["logits"])
    np.testing.assert_allclose(fresh["x"], plain["x"], rtol=1e-6, atol=1e-8)
    for key, g in plain["task"].items():
        np.testing.assert_allclose(fresh["task"][key], g, rtol=1e-6, atol=1e-8)


def _backbone(model):
    return {k: v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if k[0] != "gc_ode"}


def test_backbone_weights_do_not_depend_on_gc_ode(models):
    plain, gradient = _backbone(models["plain"]), _backbone(models["gradient"])
    assert plain.keys() == gradient.keys()
    assert all(bool(jnp.all(plain[k][...] == gradient[k][...])) for k in plain)


@pytest.mark.parametrize("train", [True, False])
def test_fresh_branch_mode_equals_plain_model(models, train):
    logits_plain, _ = _forward(models["plain"], train)
    logits_branch, aux = _forward(models["branch"], train)
    np.testing.assert_array_equal(logits_branch, logits_plain)  # gamma = 0 exactly
    assert float(aux["gc_ode_loss"]) == 0.0


def test_gradient_mode_same_logits_different_hidden_gradients(grads):
    plain, gradient = grads["plain"], grads["gradient"]
    np.testing.assert_allclose(gradient["logits"], plain["logits"], rtol=1e-6, atol=1e-6)
    # With the gates open, input (and hence hidden-state) gradients differ: the branches
    # contribute.
    diff = float(jnp.max(jnp.abs(gradient["x"] - plain["x"])))
    assert diff > 1e-2 * float(jnp.max(jnp.abs(plain["x"])))
    stem = ("stem", "conv", "kernel")
    assert not np.allclose(gradient["task"][stem], plain["task"][stem], rtol=1e-3, atol=1e-6)
    # Parameters downstream of the last pair's input (stage 3, head): same gradient.
    for key, g in plain["task"].items():
        if key[0] == "head" or key[:2] == ("stages", 2):
            np.testing.assert_allclose(gradient["task"][key], g, rtol=1e-4, atol=1e-6)
    # The task loss never trains the branches.
    for key, g in gradient["task"].items():
        if key[0] == "gc_ode":
            assert bool(jnp.all(g == 0)), key


def test_gradient_mode_aux_loss_trains_only_the_branches(grads):
    gradient = grads["gradient"]
    assert gradient["aux"].dtype == jnp.float32 and float(gradient["aux"]) > 0
    branch = [float(jnp.sum(g**2)) for k, g in gradient["aux_grad"].items() if k[0] == "gc_ode"]
    assert sum(branch) > 0
    for key, g in gradient["aux_grad"].items():
        if key[0] != "gc_ode":
            assert bool(jnp.all(g == 0)), key
    assert float(grads["plain"]["aux"]) == 0.0


def test_gradient_mode_eval_skips_branches(models, monkeypatch):
    monkeypatch.setattr(gc_ode_modules, "odeint", lambda *a: pytest.fail("branch ran in eval"))
    logits, aux = _forward(models["gradient"], train=False)
    assert logits.shape == (4, 10) and float(aux["gc_ode_loss"]) == 0.0
