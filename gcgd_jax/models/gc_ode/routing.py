"""The custom VJPs that route GC-ODE's gradients.

- :func:`scale_gradient`: identity forward, the cotangent times a factor
  (the stage's share ``1 - s_t`` of the mixed gradient; the control's factor).
- ``measured_scale`` and :func:`gradient_ratios`: the same, and the squared
  norm of the incoming cotangent passed out through a probe's gradient (the
  gradient ratio the train step logs).
- ``routed_branch``: one ODE solve with two outputs whose cotangents go to
  the input only and to the branch parameters only (the extra backward path
  and the auxiliary loss share the forward solve).
- ``matching_fork``: the backward-matching (Sobolev) term's gradient, taken
  in the backward pass where ``J_stage^T g`` and ``g`` meet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["gradient_ratios", "scale_gradient"]


@jax.custom_vjp
def scale_gradient(x: jax.Array, factor: jax.Array) -> jax.Array:
    """Identity forward; the cotangent of ``x`` is multiplied by ``factor`` (which gets none)."""
    return x


def _scale_gradient_fwd(x, factor):
    return x, factor


def _scale_gradient_bwd(factor, g):
    return (g * factor.astype(g.dtype), jnp.zeros_like(factor))


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


@jax.custom_vjp
def measured_scale(x: jax.Array, factor: jax.Array, probe: jax.Array) -> jax.Array:
    """Identity forward; the cotangent of ``x`` is multiplied by ``factor``; the cotangent
    of the scalar ``probe`` is the squared norm of ``x``'s incoming cotangent (a
    measurement passed out through the gradient, not a derivative)."""
    del factor, probe
    return x


def _measured_scale_fwd(x, factor, probe):
    return x, (factor, probe)


def _measured_scale_bwd(res, g):
    factor, probe = res
    norm2 = jnp.sum(jnp.square(g.astype(jnp.float32))).astype(probe.dtype)
    return g * factor.astype(g.dtype), jnp.zeros_like(factor), norm2


measured_scale.defvjp(_measured_scale_fwd, _measured_scale_bwd)


def gradient_ratios(probe_grad: jax.Array) -> jax.Array:
    """Per pair ``||dL/dh_{i-1}|| / ||J_stage^T g||`` from the gradient of a probe.

    ``probe_grad`` is the gradient of :meth:`GCODE.new_probe`'s zeros, shape
    ``(num_pairs, 2)``: column 0 the squared norm of the stage-input gradient
    before the mix, column 1 that of the gradient reaching ``h_{i-1}`` (the
    mix). A pair whose stage-input gradient is zero reports 1.
    """
    plain, mixed = probe_grad[:, 0], probe_grad[:, 1]
    safe = jnp.where(plain > 0, plain, 1.0)
    return jnp.where(plain > 0, jnp.sqrt(mixed / safe), 1.0)


def solve_pure(graphdef, h_prev, params):
    return nnx.merge(graphdef, params).solve(h_prev)


def routed_branch(graphdef, h_prev, params):
    """One ODE solve, two outputs with separated gradients.

    Returns ``(zhat, z)``, both equal to ``z(1) = F(h_prev, params)``. The
    cotangent of ``zhat`` flows to ``h_prev`` only (as if ``params`` were under
    ``stop_gradient``); the cotangent of ``z`` flows to ``params`` only (as if
    ``h_prev`` were under ``stop_gradient``). Equivalent to two solves
    ``F(h_prev, sg(params))`` and ``F(sg(h_prev), params)`` (tested), at the cost
    of one forward solve. The backward calls the solve's VJP twice, once per
    cotangent (with the default unrolled solve both transpose one shared
    linearisation; nothing of the forward is recomputed).
    """
    fn = functools.partial(solve_pure, graphdef)

    @jax.custom_vjp
    def routed(x, p):
        y = fn(x, p)
        return y, y

    def routed_fwd(x, p):
        y, vjp = jax.vjp(fn, x, p)
        return (y, y), vjp

    def routed_bwd(vjp, cotangents):
        ct_input_path, ct_param_path = cotangents
        dx, _ = vjp(ct_input_path)  # (XLA drops each call's unused half)
        _, dp = vjp(ct_param_path)
        return dx, dp

    routed.defvjp(routed_fwd, routed_bwd)
    return routed(h_prev, params)


_FD_STEP = 1e-3  # finite-difference step of the backward matching, relative to ||h_{i-1}||


def _backward_matching_grad(fn, x, params, g, target):
    """Gradient w.r.t. ``params`` of ``||J^T g - target||^2 / ||target||^2``, ``J = dF/dx``.

    ``d/dp ||J^T g - t||^2 = 2 d/dp <g, J r>`` with ``r = J^T g - t`` held fixed, and
    ``<g, J r> ~ <g, F(x + e r) - F(x - e r)> / (2 e)`` (central difference).
    """
    b = jax.vjp(lambda x: fn(x, params), x)[1](g)[0]
    r = jax.lax.stop_gradient(b - target)
    f32 = lambda v: v.astype(jnp.promote_types(v.dtype, jnp.float32))
    r_norm = jnp.sqrt(jnp.sum(jnp.square(f32(r))))
    eps = _FD_STEP * jnp.sqrt(jnp.sum(jnp.square(f32(x)))) / jnp.maximum(r_norm, 1e-30)
    step = (eps * f32(r)).astype(x.dtype)
    diff = lambda p: fn(x + step, p) - fn(x - step, p)
    dp = jax.vjp(diff, params)[1](g)[0]
    scale = 1.0 / (eps * jnp.maximum(jnp.sum(jnp.square(f32(target))), 1e-30))
    return jax.tree.map(lambda d: (scale * f32(d)).astype(d.dtype), dp)


def matching_fork(graphdef, weight, h_prev, params, factor):
    """``h_prev`` for the stage, ``h_prev`` for the branch, and zeros of ``h_i``'s shape.

    Identity forward. Backward: the stage path's cotangent ``a = J_stage^T g`` is
    multiplied by ``factor`` (``1 - s``) and added to the branch path's (the
    convex mix, as :meth:`GCODE.stage_input` does); the zeros, added to ``h_i``
    by the caller, bring ``g = dL/dh_i`` here, so the branch parameters get
    ``weight`` times the gradient of the backward mismatch
    (:func:`_backward_matching_grad`).
    """
    fn = functools.partial(solve_pure, graphdef)
    out = jax.eval_shape(fn, h_prev, params)

    @jax.custom_vjp
    def fork(x, p, factor):
        del p, factor
        return x, x, jnp.zeros(out.shape, out.dtype)

    def fork_fwd(x, p, factor):
        return fork(x, p, factor), (x, p, factor)

    def fork_bwd(res, cotangents):
        x, p, factor = res
        ct_stage, ct_branch, g = cotangents
        dx = factor.astype(ct_stage.dtype) * ct_stage + ct_branch
        dp = _backward_matching_grad(fn, x, p, g, ct_stage)
        dp = jax.tree.map(lambda d: (weight * d).astype(d.dtype), dp)
        return dx, dp, jnp.zeros_like(factor)

    fork.defvjp(fork_fwd, fork_bwd)
    return fork(h_prev, params, factor)
