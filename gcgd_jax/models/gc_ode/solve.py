"""Integrating a branch's ODE from ``t = 0`` to ``t = 1`` with diffrax's solvers.

Fixed steps (the default) run as plain Python loops over the steps and the
Butcher tableau's stages (:func:`_unrolled_solve`): no ``while_loop``, so the
backward pass reuses the forward's values instead of recomputing them.
``diffrax.diffeqsolve`` runs on request (checkpointed or direct adjoint) and
for adaptive steps (``PIDController``). The vector field's parameters travel
through diffrax's ``args`` (``nnx.split`` outside, ``nnx.merge`` inside); no
mutable module is closed over. diffrax is imported when the first solve is
traced, not with this module.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from gcgd_jax.models.gc_ode.config import SOLVER_CLASSES, GCODEConfig
from gcgd_jax.models.gc_ode.field import ODEVectorField

__all__ = ["odeint"]


def _vector_field(t, z, args):
    """diffrax vector field. ``args = (graphdef, params)`` from ``nnx.split``; the
    module is rebuilt here with ``nnx.merge`` (no mutable module is closed over).
    A fixed module-level function with the (hashable, static) graphdef in
    ``args`` lets diffrax's internal ``filter_jit`` cache hit on repeated eager
    calls instead of recompiling."""
    graphdef, params = args
    return nnx.merge(graphdef, params)(z, t)


def odeint(field: ODEVectorField, z0: jax.Array, config: GCODEConfig) -> jax.Array:
    """Integrates ``dz/dt = field(z, t)`` from 0 to 1 with diffrax; returns ``z(1)``."""
    import diffrax  # here, not at module import: it is most of `import gcgd_jax.models`

    graphdef, params = nnx.split(field)
    term = diffrax.ODETerm(_vector_field)
    solver = getattr(diffrax, SOLVER_CLASSES[config.solver])()
    if config.adjoint == "unrolled" or (config.adjoint == "auto" and not config.adaptive):
        return _unrolled_solve(solver, term, z0, (graphdef, params), config.steps)
    dt0 = 1.0 / config.steps
    if config.adaptive:
        controller = diffrax.PIDController(rtol=config.rtol, atol=config.atol)
        max_steps = config.max_steps
        adjoint = diffrax.RecursiveCheckpointAdjoint()
    else:
        controller = diffrax.ConstantStepSize()
        max_steps = config.steps
        adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=config.steps)
    if config.adjoint == "direct":
        adjoint = diffrax.DirectAdjoint()
    solution = diffrax.diffeqsolve(
        term,
        solver,
        t0=0.0,
        t1=1.0,
        dt0=dt0,
        y0=z0,
        args=(graphdef, params),
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=max_steps,
    )
    return solution.ys[0]


def _unrolled_solve(solver: Any, term: Any, z0: jax.Array, args: Any, steps: int) -> jax.Array:
    """``steps`` fixed steps of an explicit Runge-Kutta method, as plain Python
    loops over steps and stages with the coefficients of the diffrax ``solver``
    (``solver.tableau``; Euler is the one-stage case). No ``while_loop`` (diffrax
    runs its stages in one), so JAX differentiates it like feed-forward code:
    the forward pass keeps what the backward pass needs, nothing is recomputed,
    and the routed branch's two VJP calls share one linearisation. Same values
    as ``diffeqsolve`` with ``ConstantStepSize`` (tested); an FSAL method
    (Tsit5) reuses its last stage as the next step's first."""
    import diffrax

    if isinstance(solver, diffrax.Euler):
        c, a_lower, b = np.zeros(0), (), np.ones(1)
        fsal = False
    else:
        tableau = solver.tableau
        c, a_lower, b, fsal = tableau.c, tableau.a_lower, tableau.b_sol, tableau.fsal

    def f(t: float, z: jax.Array) -> jax.Array:
        return term.vf(t, z, args)

    def combine(z: jax.Array, dt: float, coeffs: Any, ks: list[jax.Array]) -> jax.Array:
        out = z
        for coeff, k in zip(coeffs, ks):
            if coeff != 0:
                out = out + (dt * float(coeff)) * k
        return out

    dt = 1.0 / steps
    z, k_first = z0, None
    for n in range(steps):
        t0 = n * dt
        ks = [f(t0, z) if k_first is None else k_first]
        for i, row in enumerate(a_lower):
            ks.append(f(t0 + float(c[i]) * dt, combine(z, dt, row, ks)))
        z = combine(z, dt, b, ks)
        k_first = ks[-1] if fsal else None
    return z
