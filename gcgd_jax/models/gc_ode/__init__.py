"""GC-ODE: hidden-state gradient correction with a neural-ODE branch (diffrax).

For every pair of adjacent stage outputs ``(h_{i-1}, h_i)`` of a network, a
branch maps ``h_{i-1}`` to ``h_i``'s shape and integrates a small convolutional
vector field from ``t = 0`` to ``t = 1``::

    z(0) = P(h_{i-1})             # identity, or strided 1x1 conv + GroupNorm
    dz/dt = phi(z, t)             # GroupNorm -> ReLU -> conv3x3 on [z, t] -> GroupNorm
    z(1) = diffeqsolve(phi, z(0), t: 0 -> 1)

and joins it to ``h_i`` in one of two modes:

``"branch"``
    ``h_i <- h_i + gamma * z(1)``, ``gamma`` per channel and zero-initialised
    (a fresh model computes what the plain network computes); trained by the
    task loss; the branch also runs at inference.
``"gradient"``
    The forward value is unchanged; the gradient reaching ``h_{i-1}`` is a
    convex mix of the stage's and the branch's backward maps::

        dL/dh_{i-1} = (1 - s_t) J_stage^T g + s_t J_branch^T g,    g = dL/dh_i

    with a gate ``s_t = gate_max * fit_{t-1}`` that opens only as far as the
    branch explains the variance of ``h_i`` (a moving average, starting at 0:
    a fresh model's gradients are the plain network's). The branch is trained
    by an auxiliary loss ``mean((z(1) - stop_gradient(h_i))**2)`` that reaches
    only the branch (never the backbone); optionally also to match the stage's
    backward map (``sobolev_weight``). Skipped at inference.

Controls: ``"scale_only"`` (no branch; the stage-input gradient times
``control_scale``) and ``"frozen_branch"`` (gradient mode with a random,
never-trained branch).

The package, one concern per module: :mod:`~gcgd_jax.models.gc_ode.config`
(:class:`GCODEConfig`), :mod:`~gcgd_jax.models.gc_ode.field` (the vector
field), :mod:`~gcgd_jax.models.gc_ode.solve` (the ODE solve),
:mod:`~gcgd_jax.models.gc_ode.routing` (the custom VJPs that route the
gradients), :mod:`~gcgd_jax.models.gc_ode.module` (:class:`ODEBranch`,
:class:`GCODE`, and :func:`aux_spec`, the model's entries in the train step's
auxiliary seam, :mod:`gcgd_jax.models.aux`). The full design -- every path's
gradient, the gate, the backward matching, the gradient-ratio probe, the
solver choices -- is the documentation's *GC-ODE design* page.

This design is ours (the GCGD paper's GC-ODE section was withdrawn), written
from its public description: GC-ODE puts a neural ODE between adjacent stage
outputs to add a gradient path with dynamic-system properties.

References:
  Li et al, `Gradient Correction beyond Gradient Descent
  <https://arxiv.org/abs/2203.08345>`_, 2022 (withdrawn).
  Kidger, `On Neural Differential Equations <https://arxiv.org/abs/2202.02435>`_, 2022.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gcgd_jax._lazy import lazy_exports

_CONFIG = ("Adjoint", "GCODEConfig", "GCODEMode", "Solver", "resolve_gc_ode")
_MODULE = ("GCODE", "FrozenWeight", "GateFit", "ODEBranch", "aux_spec", "probe_metrics")
# public name -> the module that defines it (imported on first use: the configuration
# reads GCODEConfig's fields without importing JAX)
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(_CONFIG, "gcgd_jax.models.gc_ode.config"),
    **dict.fromkeys(("ODEVectorField", "TimeConv"), "gcgd_jax.models.gc_ode.field"),
    **dict.fromkeys(_MODULE, "gcgd_jax.models.gc_ode.module"),
    **dict.fromkeys(("gradient_ratios", "scale_gradient"), "gcgd_jax.models.gc_ode.routing"),
    "odeint": "gcgd_jax.models.gc_ode.solve",
}
__all__ = sorted(_EXPORTS, key=lambda n: (not n.isupper(), n))
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # static analysers see the eager imports
    from gcgd_jax.models.gc_ode.config import (
        Adjoint,
        GCODEConfig,
        GCODEMode,
        Solver,
        resolve_gc_ode,
    )
    from gcgd_jax.models.gc_ode.field import ODEVectorField, TimeConv
    from gcgd_jax.models.gc_ode.module import (
        GCODE,
        FrozenWeight,
        GateFit,
        ODEBranch,
        aux_spec,
        probe_metrics,
    )
    from gcgd_jax.models.gc_ode.routing import gradient_ratios, scale_gradient
    from gcgd_jax.models.gc_ode.solve import odeint
