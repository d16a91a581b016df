"""GC-ODE: hidden-state gradient correction with a neural-ODE branch (diffrax).

For every pair of adjacent stage outputs ``(h_{i-1}, h_i)`` of a network, a
branch maps ``h_{i-1}`` to ``h_i``'s shape and integrates a small convolutional
vector field from ``t = 0`` to ``t = 1``::

    z(0)  = P(h_{i-1})                       # identity, or strided 1x1 conv + GroupNorm
    dz/dt = phi(z, t)                        # GroupNorm -> ReLU -> conv3x3 on [z, t] -> ... -> GroupNorm
    z(1)  = diffeqsolve(phi, z(0), t: 0 -> 1)

and joins it to ``h_i`` in one of two modes:

``"branch"``
    ``h_i <- h_i + gamma * z(1)`` with a per-channel ``gamma`` (an ``nnx.Param``)
    initialised to zero, so a freshly built model computes exactly what the
    plain network computes. Everything is trained by the task loss. The branch
    also runs at inference.

``"gradient"``
    The forward value is unchanged, and the gradient that reaches ``h_{i-1}``
    becomes a **convex mix** of the stage's and the branch's backward maps::

        dL/dh_{i-1} = (1 - s_t) J_stage^T g + s_t J_branch^T g,    g = dL/dh_i

    so its scale is the plain network's wherever the two Jacobians agree. The
    stage's own parameters still get their plain gradient (only the signal
    passed on to ``h_{i-1}`` is mixed). Built from two exact pieces: the stage
    input ``h_{i-1}`` goes through :func:`scale_gradient` (identity forward,
    cotangent times ``1 - s_t``), and the join adds
    ``s_t * (zhat - stop_gradient(zhat))`` (value 0) where ``zhat`` is ``z(1)``
    from the live input and stop-gradient branch parameters.

    The gate opens only as far as the branch fits the stage::

        s_t = gate_max * fit_{t-1},   fit_t = m fit_{t-1} + (1 - m) clip(1 - aux_t / Var(h_i), 0, 1)

    ``aux_t = mean((z(1) - h_i)^2)`` is the branch's fit on the current batch,
    ``Var(h_i)`` the variance of the stage output (so ``1 - aux/Var`` is the
    fraction of ``h_i``'s variance the branch explains), ``m`` =
    ``gate_momentum``; ``fit`` starts at 0, so a fresh model's gradients are
    exactly the plain network's, and an untrained branch adds nothing. The
    gate is a non-trained state variable (:class:`GateFit`, updated in
    training mode like BatchNorm statistics); ``aux["gc_ode_gate"]`` reports
    the mean ``s_t`` over pairs.

    The branch is trained by an auxiliary loss::

        gc_ode_loss_i = mean((z(1) - stop_gradient(h_i))**2)

    where this ``z(1)`` is computed from **stop-gradient input** ``h_{i-1}`` and
    **live branch parameters**. So the auxiliary loss trains only the branch
    parameters (never the backbone), and the task loss trains only the backbone
    (never the branch): adding ``gc_ode_loss`` to the task loss, at any weight,
    changes no backbone gradient. Both paths share one ODE solve in the forward
    pass (a ``jax.custom_vjp`` routes the two cotangents; see
    :func:`_routed_branch`). With ``loss_subsample = k > 1`` the mean runs over
    every ``k``-th example only (a second, ``k`` times smaller solve), an
    unbiased estimate of the full-batch loss at about ``1/k`` of its gradient's
    cost; ``aux_t`` (the gate) still uses the whole batch.

    Optionally (``sobolev_weight = lam > 0``, with :meth:`GCODE.run_stages`)
    the branch is also trained to match the stage's *backward* map, on the
    cotangent the backward pass already carries::

        sobolev_i = lam * ||J_branch^T g - J_stage^T g||^2 / ||J_stage^T g||^2

    Its gradient with respect to the branch parameters is taken in the
    backward pass at the fork where both ``J_stage^T g`` and ``g`` (routed to
    the fork by a zero added to ``h_i``) arrive, with one input VJP of the
    branch (``J_branch^T g``) and a central finite difference of
    ``<g, J_branch r>`` along ``r = J_branch^T g - J_stage^T g`` (step
    ``1e-3 ||h_{i-1}|| / ||r||``), so no second derivative of the solve is
    needed. Like the output loss it trains only the branch; it is not part of
    the returned loss value (it acts through the gradient only).

    At inference (``model.eval()``, i.e. ``deterministic=True``) the branch is
    skipped entirely (the forward value does not depend on it).

Controls, for experiments that must tell the ODE's part from a rescaling:

``"scale_only"``
    No branch at all: the gradient passed on to ``h_{i-1}`` is only multiplied
    by ``control_scale`` (forward unchanged). Run it with the factor that
    gradient mode's mixed gradient has relative to the plain one: the train
    step logs it as ``gc_ode_grad_ratio`` (below), so a gradient-mode run's
    mean ratio is the control's ``control_scale`` (matched on average).
``"frozen_branch"``
    Gradient mode with a random branch that is never trained (its auxiliary
    loss has no gradient); the same gate, so it opens only as far as the
    random branch happens to fit.

The gradient ratio, measured in the backward pass (gated modes): with a
``probe`` (:meth:`GCODE.new_probe`, zeros) passed to :meth:`GCODE.run_stages`,
the gradient of the probe holds, per pair, the squared norms of the plain
stage-input gradient ``J_stage^T g`` and of the mixed gradient that reaches
``h_{i-1}``; :func:`gradient_ratios` turns them into
``||dL/dh_{i-1}|| / ||J_stage^T g||`` (1 while the gate is closed). The train
step does this and logs the mean over pairs (``gc_ode_grad_ratio``).

The time input of the vector field is fed as the constant channel ``1 + t``,
so that it contributes (and is trained) at every evaluation, ``t = 0``
included (a one-step Euler solve evaluates only there).

Solvers: ``"euler"``, ``"heun"``, ``"tsit5"`` (diffrax's solvers and their
Butcher tableaus); fixed steps by default, integrated as plain Python loops
over the steps and the tableau's stages (``adjoint="auto"`` -> ``"unrolled"``:
no ``while_loop``, so the backward pass reuses the forward's values instead of
recomputing them, and the routed branch's two VJP calls share one
linearisation); ``diffrax.diffeqsolve`` with a checkpointed or direct adjoint
on request, and for adaptive steps (``PIDController``). The vector field's
parameters go through diffrax's ``args`` (``nnx.split`` outside, ``nnx.merge``
inside the vector field); no mutable module is closed over.

diffrax is imported when the first solve is traced, not with this module.

This design is ours (the GCGD paper's GC-ODE section was withdrawn), written
from its public description: GC-ODE puts a neural ODE between adjacent
stage outputs to add a gradient path with dynamic-system properties. The
vector field's ``conv3x3`` (hand-written VJP) and ``GroupNorm`` are CPU-speed
workarounds, switchable: :mod:`gcgd_jax.cpu_speed`.

References:
  Li et al, `Gradient Correction beyond Gradient Descent
  <https://arxiv.org/abs/2203.08345>`_, 2022 (withdrawn).
  Kidger, `On Neural Differential Equations <https://arxiv.org/abs/2202.02435>`_, 2022.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gcgd_jax import cpu_speed
from gcgd_jax.cpu_speed import conv3x3, group_norm

__all__ = [
    "GCODE",
    "Adjoint",
    "FrozenWeight",
    "GCODEConfig",
    "GCODEMode",
    "GateFit",
    "ODEBranch",
    "ODEVectorField",
    "Solver",
    "TimeConv",
    "gradient_ratios",
    "odeint",
    "resolve_gc_ode",
    "scale_gradient",
]

GCODEMode = Literal["branch", "gradient", "scale_only", "frozen_branch"]
Solver = Literal["euler", "heun", "tsit5"]
Adjoint = Literal["auto", "unrolled", "recursive_checkpoint", "direct"]

_MODES: tuple[str, ...] = get_args(GCODEMode)
_GATED = ("gradient", "frozen_branch")
_SOLVERS: tuple[str, ...] = get_args(Solver)
_SOLVER_CLASSES = {"euler": "Euler", "heun": "Heun", "tsit5": "Tsit5"}  # diffrax names
_ADJOINTS: tuple[str, ...] = get_args(Adjoint)


@dataclasses.dataclass(frozen=True)
class GCODEConfig:
    """Configuration of a GC-ODE correction (validated on construction).

    Attributes:
      mode: ``"gradient"`` (forward value unchanged, extra backward path, branch
        trained by the auxiliary loss, skipped at inference) or ``"branch"``
        (``h_i + gamma * z(1)``, ``gamma`` zero-initialised, trained end to end).
      solver: ``"euler"``, ``"heun"`` or ``"tsit5"``.
      steps: number of fixed steps on ``[0, 1]`` (``dt = 1 / steps``); with
        ``adaptive=True`` only the initial step size is ``1 / steps``.
      width: hidden width of the vector field. ``None``: a single 3x3 conv at the
        channel count of ``h_i`` (``C + 1 -> C``, the extra input channel is
        ``t``). An int ``w``: two 3x3 convs through ``w`` channels
        (``C + 1 -> w``, ``w + 1 -> C``) -- use a small ``w`` for wide stages
        (e.g. ResNet-50, whose stage outputs have 256..2048 channels).
      adaptive: adaptive step sizes (``diffrax.PIDController``); needs a solver
        with an error estimate (``"heun"`` or ``"tsit5"``).
      rtol, atol: tolerances of the adaptive controller.
      max_steps: step budget of an adaptive solve (fixed steps use ``steps``).
      gate_max: the largest share ``s`` of the branch in the mixed gradient
        (gated modes), in ``[0, 1]``; the gate opens to it as the branch's fit
        to the stage reaches 1.
      gate_momentum: ``m`` of the fit's moving average, in ``[0, 1)``.
      control_scale: the factor of ``"scale_only"`` (the stage's input
        gradient is multiplied by it); must be finite and non-zero.
      sobolev_weight: weight of the backward-matching term of the branch's
        training (``"gradient"`` mode, through :meth:`GCODE.run_stages`; see
        the module doc); 0 (default) trains on the output loss alone.
      loss_subsample: ``k >= 1``: the branch's output loss (gated modes) is
        taken on every ``k``-th example of the batch (examples ``0, k, 2k, ...``;
        the rows of every device's shard under batch sharding when its local
        batch is a multiple of ``k``), so its gradient -- the branch's training
        signal -- costs about ``1/k`` of the full batch's. The extra backward
        path and the gate's fit use the whole batch. 4 (default; the branch's
        training costs a quarter, which brings the default within 1.25x of a
        plain ResNet-20 step on a 2-core CPU; its effect on the branch's fit:
        the results page *GC-ODE branch loss on every 4th example*);
        1: every example.
      adjoint: how the solve is differentiated. ``"auto"`` (default):
        ``"unrolled"`` for fixed steps, ``"recursive_checkpoint"`` when
        adaptive. ``"unrolled"``: the fixed steps as plain Python loops over the
        steps and stages of the solver's Runge-Kutta tableau (diffrax's
        coefficients), differentiated like feed-forward code -- nothing is
        recomputed in the backward pass, memory grows with ``steps``; fastest
        on the CPU (the GC-ODE cost rows of the results pages).
        ``"recursive_checkpoint"``: ``diffeqsolve`` with
        ``diffrax.RecursiveCheckpointAdjoint(checkpoints=steps)`` for fixed
        steps, ``RecursiveCheckpointAdjoint()`` when adaptive (the backward
        recomputes each step's internals). ``"direct"``:
        ``diffrax.DirectAdjoint`` (keeps the internals, more memory).
    The default (gradient mode, one Euler step, ``width=None``) is the cheapest
    configuration: per pair one 3x3 conv and two GroupNorms forward (its
    measured cost: the GC-ODE rows of the results pages). In the gated modes inference
    costs the same as the plain model (branch skipped).
    """

    mode: GCODEMode = "gradient"
    solver: Solver = "euler"
    steps: int = 1
    width: int | None = None
    adaptive: bool = False
    rtol: float = 1e-3
    atol: float = 1e-4
    max_steps: int = 64
    gate_max: float = 0.5
    gate_momentum: float = 0.9
    control_scale: float = 1.0
    adjoint: Adjoint = "auto"
    sobolev_weight: float = 0.0
    loss_subsample: int = 4

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"GCODEConfig.mode must be one of {_MODES}, got {self.mode!r}.")
        if self.solver not in _SOLVERS:
            raise ValueError(f"GCODEConfig.solver must be one of {_SOLVERS}, got {self.solver!r}.")
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"GCODEConfig.steps must be an int >= 1, got {self.steps!r}.")
        if self.width is not None and (not _is_int(self.width) or self.width < 1):
            raise ValueError(f"GCODEConfig.width must be None or an int >= 1, got {self.width!r}.")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"GCODEConfig.adaptive must be a bool, got {self.adaptive!r}.")
        if self.adaptive and self.solver == "euler":
            raise ValueError(
                "GCODEConfig: adaptive=True needs a solver with an error estimate "
                "('heun' or 'tsit5'); 'euler' has none."
            )
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ValueError(f"GCODEConfig.{name} must be a positive number, got {value!r}.")
        if not _is_int(self.max_steps) or self.max_steps < 1:
            raise ValueError(f"GCODEConfig.max_steps must be an int >= 1, got {self.max_steps!r}.")
        if self.adjoint not in _ADJOINTS:
            raise ValueError(
                f"GCODEConfig.adjoint must be one of {_ADJOINTS}, got {self.adjoint!r}."
            )
        if self.adjoint == "unrolled" and self.adaptive:
            raise ValueError(
                "GCODEConfig: adjoint='unrolled' integrates a fixed number of steps; "
                "adaptive=True needs 'recursive_checkpoint' or 'direct'."
            )
        for name, lo, hi, closed in (
            ("gate_max", 0.0, 1.0, True),
            ("gate_momentum", 0.0, 1.0, False),
        ):
            v = getattr(self, name)
            if not _is_real(v) or not (lo <= v <= hi) or (not closed and v == hi):
                bound = "]" if closed else ")"
                raise ValueError(
                    f"GCODEConfig.{name} must be in [{lo:g}, {hi:g}{bound}, got {v!r}."
                )
        c = self.control_scale
        if not _is_real(c) or not math.isfinite(c) or c == 0:
            raise ValueError(
                f"GCODEConfig.control_scale must be a finite non-zero number, got {c!r}."
            )
        if not _is_int(self.loss_subsample) or self.loss_subsample < 1:
            raise ValueError(
                f"GCODEConfig.loss_subsample must be an int >= 1, got {self.loss_subsample!r}."
            )
        w = self.sobolev_weight
        if not _is_real(w) or not math.isfinite(w) or w < 0:
            raise ValueError(f"GCODEConfig.sobolev_weight must be a finite number >= 0, got {w!r}.")
        if w > 0 and self.mode != "gradient":
            raise ValueError(
                "GCODEConfig.sobolev_weight trains the branch of 'gradient' mode; "
                f"mode {self.mode!r} has no trained gated branch."
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_gc_ode(spec: GCODEMode | GCODEConfig | None) -> GCODEConfig | None:
    """``None`` -> ``None``; a mode name (``"gradient"``, ``"branch"``, ``"scale_only"``,
    ``"frozen_branch"``) -> ``GCODEConfig(mode=spec)``; a ``GCODEConfig`` -> itself;
    anything else -> ``ValueError``."""
    if spec is None or isinstance(spec, GCODEConfig):
        return spec
    if isinstance(spec, str) and spec in _MODES:
        return GCODEConfig(mode=spec)
    raise ValueError(
        f"gc_ode must be None, one of {_MODES} or a gcgd_jax.GCODEConfig, got {spec!r}."
    )


def _num_groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` that is at most
    ``min(32, channels // 2)`` (groups of >= 2 channels where possible)."""
    cap = max(1, min(32, channels // 2))
    return max(g for g in range(1, cap + 1) if channels % g == 0)


def _group_norm(channels: int, *, rngs: nnx.Rngs, zero_scale: bool = False) -> nnx.Module:
    return group_norm(channels, _num_groups(channels), zero_scale=zero_scale, rngs=rngs)


class TimeConv(nnx.Module):
    """3x3 convolution of ``[a, t]`` (``t`` as an extra constant input channel).

    The kernel has shape ``(3, 3, C_in + 1, C_out)`` exactly as a convolution of
    the concatenation would; the time channel holds ``1 + t`` (so that it is
    used, and trained, at ``t = 0`` too). By linearity it is evaluated as
    ``conv(a, K[..., :C_in, :]) + (1 + t) * conv(1, K[..., C_in:, :])`` -- identical
    values (zero padding included), but the big convolution keeps ``C_in``
    input channels instead of ``C_in + 1`` and no concatenated copy is made.
    Both use :func:`gcgd_jax.cpu_speed.conv3x3` (its hand-written VJP unless
    ``cpu_speed.CUSTOM_CONV_VJP`` was off when the module was built).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.custom_vjp = cpu_speed.CUSTOM_CONV_VJP
        init = nnx.initializers.he_normal()
        self.kernel = nnx.Param(init(rngs.params(), (3, 3, in_features + 1, out_features)))

    def __call__(self, a: jax.Array, t: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(a.dtype)
        y = conv3x3(a, kernel[:, :, : self.in_features, :], custom_vjp=self.custom_vjp)
        ones = jnp.ones((1, *a.shape[1:3], 1), a.dtype)
        y_t = conv3x3(ones, kernel[:, :, self.in_features :, :], custom_vjp=self.custom_vjp)
        return y + (1 + jnp.asarray(t, a.dtype)) * y_t


class ODEVectorField(nnx.Module):
    """``phi(z, t)``: GroupNorm -> ReLU -> conv3x3[z, t] (-> GroupNorm -> ReLU ->
    conv3x3[., t]) -> GroupNorm. One conv when ``width is None``, two through
    ``width`` channels otherwise. The last GroupNorm's scale starts at zero, so
    ``phi = 0`` and ``z(1) = z(0)`` at initialisation (a smooth start: the
    branch's Jacobian is the projection's). No BatchNorm inside the solve."""

    def __init__(self, channels: int, width: int | None, *, rngs: nnx.Rngs):
        self.norm_in = _group_norm(channels, rngs=rngs)
        if width is None:
            self.conv1 = TimeConv(channels, channels, rngs=rngs)
            self.norm_mid = None
            self.conv2 = None
        else:
            self.conv1 = TimeConv(channels, width, rngs=rngs)
            self.norm_mid = _group_norm(width, rngs=rngs)
            self.conv2 = TimeConv(width, channels, rngs=rngs)
        self.norm_out = _group_norm(channels, rngs=rngs, zero_scale=True)

    def __call__(self, z: jax.Array, t: jax.Array) -> jax.Array:
        a = self.conv1(jax.nn.relu(self.norm_in(z)), t)
        if self.conv2 is not None:
            a = self.conv2(jax.nn.relu(self.norm_mid(a)), t)
        return self.norm_out(a)


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
    solver = getattr(diffrax, _SOLVER_CLASSES[config.solver])()
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
def _measured_scale(x: jax.Array, factor: jax.Array, probe: jax.Array) -> jax.Array:
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


_measured_scale.defvjp(_measured_scale_fwd, _measured_scale_bwd)


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


class GateFit(nnx.BatchStat):
    """The moving average of a branch's fit to its stage (a statistic, not trained)."""


class FrozenWeight(nnx.Variable):
    """A weight of a ``"frozen_branch"`` branch: not an ``nnx.Param``, so never optimised
    (no gradient, no weight decay) -- the control keeps its random initialisation."""


def _freeze(module: nnx.Module) -> None:
    """Turns every ``nnx.Param`` inside ``module`` into a :class:`FrozenWeight`."""
    for _, sub in nnx.iter_modules(module):
        for name, value in list(vars(sub).items()):
            if isinstance(value, nnx.Param):
                setattr(sub, name, FrozenWeight(value[...]))


class ODEBranch(nnx.Module):
    """One GC-ODE branch ``h_{i-1} -> z(1)`` (shape of ``h_i``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        config: GCODEConfig,
        *,
        rngs: nnx.Rngs,
    ):
        self.config = config
        if in_channels != out_channels or stride != 1:
            self.proj_conv = nnx.Conv(
                in_channels,
                out_channels,
                (1, 1),
                strides=stride,
                padding="VALID",
                use_bias=False,
                kernel_init=nnx.initializers.he_normal(),
                rngs=rngs,
            )
            self.proj_norm = _group_norm(out_channels, rngs=rngs)
        else:
            self.proj_conv = None
            self.proj_norm = None
        self.field = ODEVectorField(out_channels, config.width, rngs=rngs)
        if config.mode == "branch":
            self.gamma = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
        else:
            self.gamma = None
        self.fit = GateFit(jnp.zeros((), jnp.float32)) if config.mode in _GATED else None
        if config.mode == "frozen_branch":
            _freeze(self)

    def project(self, h: jax.Array) -> jax.Array:
        if self.proj_conv is None:
            return h
        return self.proj_norm(self.proj_conv(h))

    def solve(self, h_prev: jax.Array) -> jax.Array:
        """``z(1)`` from ``h_{i-1}`` with the live parameters."""
        return odeint(self.field, self.project(h_prev), self.config)


def _solve_pure(graphdef, h_prev, params):
    return nnx.merge(graphdef, params).solve(h_prev)


def _routed_branch(graphdef, h_prev, params):
    """One ODE solve, two outputs with separated gradients.

    Returns ``(zhat, z)``, both equal to ``z(1) = F(h_prev, params)``. The
    cotangent of ``zhat`` flows to ``h_prev`` only (as if ``params`` were under
    ``stop_gradient``); the cotangent of ``z`` flows to ``params`` only (as if
    ``h_prev`` were under ``stop_gradient``). Equivalent to two solves
    ``F(h_prev, sg(params))`` and ``F(sg(h_prev), params)`` (tested), at the cost
    of one forward solve. The backward calls the solve's VJP twice, once per
    cotangent (with the default unrolled solve both transpose one shared
    linearisation; nothing of the forward is recomputed). One call batched over
    the two stacked cotangents (``jax.vmap``: the checkpointed solve recomputed
    once instead of twice) was tried and was slower on the ResNet-20 train step
    on the CPU (the batched kernel-gradient convolution costs more than two
    plain ones).
    """
    fn = functools.partial(_solve_pure, graphdef)

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


def _matching_fork(graphdef, weight, h_prev, params, factor):
    """``h_prev`` for the stage, ``h_prev`` for the branch, and zeros of ``h_i``'s shape.

    Identity forward. Backward: the stage path's cotangent ``a = J_stage^T g`` is
    multiplied by ``factor`` (``1 - s``) and added to the branch path's (the
    convex mix, as :meth:`GCODE.stage_input` does); the zeros, added to ``h_i``
    by the caller, bring ``g = dL/dh_i`` here, so the branch parameters get
    ``weight`` times the gradient of the backward mismatch
    (:func:`_backward_matching_grad`).
    """
    fn = functools.partial(_solve_pure, graphdef)
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


class GCODE(nnx.Module):
    """GC-ODE branches between adjacent stage outputs ``h_0, ..., h_S``.

    Args:
      channels: channel counts of ``h_0, ..., h_S`` (``S + 1`` entries; ``S`` pairs).
      strides: spatial stride between ``h_{i-1}`` and ``h_i`` for ``i = 1..S``.
      config: a :class:`GCODEConfig` (or ``"branch"`` / ``"gradient"``).
      rngs: ``nnx.Rngs``.

    A network with stages ``f_1 ... f_S`` uses it as :meth:`run_stages` does::

        h = h_0
        for i, f in enumerate(stages):
            h_next = f(gc_ode.stage_input(i, h))        # the stage's input gradient is mixed
            h, pair_loss = gc_ode(i, h, h_next)          # the branch joins h_{i+1}

    ``gc_ode(i, h_prev, h, compute_loss=True)`` (pair ``i`` is 0-based: it joins
    ``h_i`` and ``h_{i+1}``) returns ``(h_corrected, pair_loss)``, ``pair_loss`` a
    float32 scalar (0 in branch and scale-only mode, in eval mode, or when
    ``compute_loss`` is False); in training mode with ``compute_loss`` it also
    updates the gate's fit statistic. :meth:`gates` returns the current
    ``s_t`` of every pair.

    Train/eval: the attribute ``deterministic`` (set by ``model.train()`` /
    ``model.eval()``, or ``nnx.view(model, deterministic=...)`` /
    ``nnx.view(model, use_running_average=...)``). In the gated modes with
    ``deterministic=True`` the branch is skipped.

    Example (any NNX model: name its stages):
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from gcgd_jax.models import GCODE, GCODEConfig
      >>> class TwoStages(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.s1 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
      ...         self.s2 = nnx.Conv(16, 16, (3, 3), rngs=rngs)
      ...         self.gc_ode = GCODE((8, 16, 16), (2, 1), GCODEConfig(), rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.gc_ode.run_stages([self.s1, self.s2], x)
      >>> model = TwoStages(nnx.Rngs(0))
      >>> h, aux_loss = model(jnp.ones((2, 8, 8, 8)))
      >>> h.shape, aux_loss.dtype
      ((2, 4, 4, 16), dtype('float32'))
    """

    def __init__(
        self,
        channels: Sequence[int],
        strides: Sequence[int],
        config: GCODEMode | GCODEConfig = "gradient",
        *,
        rngs: nnx.Rngs,
    ):
        config = resolve_gc_ode(config)
        if config is None:
            raise ValueError("GCODE needs a configuration, got None.")
        channels, strides = tuple(channels), tuple(strides)
        if len(channels) < 2 or len(strides) != len(channels) - 1:
            raise ValueError(
                f"GCODE needs S + 1 channel counts and S strides, got {channels} and {strides}."
            )
        self.config = config
        self.channels = channels
        self.strides = strides
        self.deterministic = False
        self.branches = nnx.List(
            []
            if config.mode == "scale_only"
            else [
                ODEBranch(channels[i], channels[i + 1], strides[i], config, rngs=rngs)
                for i in range(len(strides))
            ]
        )

    def set_view(
        self, deterministic: bool | None = None, use_running_average: bool | None = None
    ) -> None:
        """Used by ``nnx.view``: ``deterministic`` or ``use_running_average`` set eval mode."""
        if deterministic is not None:
            self.deterministic = deterministic
        elif use_running_average is not None:
            self.deterministic = use_running_average

    @property
    def num_pairs(self) -> int:
        return len(self.strides)

    def gate(self, index: int) -> jax.Array:
        """``s_t`` of pair ``index`` (float32; 0 outside the gated modes)."""
        if self.config.mode not in _GATED:
            return jnp.zeros((), jnp.float32)
        return jax.lax.stop_gradient(self.config.gate_max * self.branches[index].fit[...])

    def gates(self) -> jax.Array:
        """``s_t`` of every pair, shape ``(num_pairs,)``."""
        return jnp.stack([self.gate(i) for i in range(self.num_pairs)])

    def new_probe(self) -> jax.Array | None:
        """Zeros of shape ``(num_pairs, 2)`` to pass as ``probe`` and differentiate
        (gated modes; ``None`` otherwise): see :func:`gradient_ratios`."""
        if self.config.mode not in _GATED:
            return None
        return jnp.zeros((self.num_pairs, 2), jnp.float32)

    def _measuring(self, probe: jax.Array | None) -> bool:
        return probe is not None and self.config.mode in _GATED and not self.deterministic

    def fork(self, index: int, h_prev: jax.Array, probe: jax.Array | None = None) -> jax.Array:
        """``h_prev`` as both stage ``index`` and its branch read it (the same value).

        With a ``probe``, the squared norm of the gradient reaching ``h_prev`` (the
        mix) goes to ``probe[index, 1]``'s gradient; otherwise ``h_prev`` itself.
        """
        if not self._measuring(probe):
            return h_prev
        return _measured_scale(h_prev, jnp.ones((), jnp.float32), probe[index, 1])

    def stage_input(
        self, index: int, h_prev: jax.Array, probe: jax.Array | None = None
    ) -> jax.Array:
        """What stage ``index`` should read instead of ``h_prev`` (the same value).

        Gated modes: the stage's input gradient is scaled by ``1 - s_t`` (the
        branch adds the other ``s_t``); ``"scale_only"``: by ``control_scale``;
        branch mode and eval mode: ``h_prev`` itself. With a ``probe`` (gated
        modes), the squared norm of the stage's input gradient before the
        scaling goes to ``probe[index, 0]``'s gradient.
        """
        mode = self.config.mode
        if self.deterministic or mode == "branch":
            return h_prev
        if mode == "scale_only":
            factor = jnp.asarray(self.config.control_scale, jnp.float32)
        else:
            factor = 1.0 - self.gate(index)
        if self._measuring(probe):
            return _measured_scale(h_prev, factor, probe[index, 0])
        return scale_gradient(h_prev, factor)

    def __call__(
        self, index: int, h_prev: jax.Array, h: jax.Array, *, compute_loss: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        zero = jnp.zeros((), jnp.float32)
        mode = self.config.mode
        if mode == "scale_only":
            return h, zero
        branch = self.branches[index]
        if mode == "branch":
            z1 = branch.solve(h_prev)
            return h + branch.gamma[...].astype(h.dtype) * z1, zero

        # Gated modes ("gradient", "frozen_branch").
        if self.deterministic:
            return h, zero  # inference: the branch does not change the value; skip it.
        s = self.gate(index).astype(h.dtype)
        graphdef, params = nnx.split(branch)
        if not compute_loss:
            # Only the extra backward path: stop-gradient parameters, live input.
            zhat = _solve_pure(graphdef, h_prev, jax.lax.stop_gradient(params))
            return h + s * (zhat - jax.lax.stop_gradient(zhat)), zero
        target = jax.lax.stop_gradient(h).astype(jnp.float32)
        k = self.config.loss_subsample
        if mode == "gradient" and k == 1:  # one solve for both paths
            zhat, z = _routed_branch(graphdef, h_prev, params)
            loss = jnp.mean(jnp.square(z.astype(jnp.float32) - target))
            aux = jax.lax.stop_gradient(loss)
        else:
            # The extra path's solve (live input) on the whole batch; the output loss
            # (live parameters) on every k-th example; a frozen branch has none to train.
            zhat = _solve_pure(graphdef, h_prev, jax.lax.stop_gradient(params))
            aux = jnp.mean(jnp.square(jax.lax.stop_gradient(zhat).astype(jnp.float32) - target))
            loss = aux
            if mode == "gradient":
                z = _solve_pure(graphdef, jax.lax.stop_gradient(h_prev[::k]), params)
                loss = jnp.mean(jnp.square(z.astype(jnp.float32) - target[::k]))
        h_out = h + s * (zhat - jax.lax.stop_gradient(zhat))
        explained = 1.0 - aux / (jnp.var(target) + 1e-12)
        m = self.config.gate_momentum
        branch.fit[...] = m * branch.fit[...] + (1.0 - m) * jnp.clip(explained, 0.0, 1.0)
        return h_out, loss

    def run_stages(
        self,
        stages: Sequence[Callable[..., jax.Array]],
        h0: jax.Array,
        *,
        compute_loss: bool = True,
        stage_kwargs: dict[str, Any] | None = None,
        probe: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Runs ``h_{i+1} = stages[i](h_i)`` with this GC-ODE between every pair.

        ``stages``: ``num_pairs`` callables (NNX modules or functions), each
        mapping the previous stage output to the next; ``h0`` the first stage
        output (e.g. the stem's). Returns ``(h_S, total_pair_loss)``.
        ``probe``: :meth:`new_probe`'s zeros, to measure the gradient ratio
        (:func:`gradient_ratios` of the probe's gradient).
        """
        if len(stages) != self.num_pairs:
            raise ValueError(f"GCODE has {self.num_pairs} pairs but got {len(stages)} stages.")
        if probe is not None and probe.shape != (self.num_pairs, 2):
            raise ValueError(
                f"probe must have shape ({self.num_pairs}, 2) (GCODE.new_probe), got {probe.shape}."
            )
        kwargs = stage_kwargs or {}
        h, total = h0, jnp.zeros((), jnp.float32)
        matching = (
            self.config.sobolev_weight > 0
            and self.config.mode == "gradient"
            and compute_loss
            and not self.deterministic
        )
        for i, stage in enumerate(stages):
            h = self.fork(i, h, probe)
            if matching:  # the stage's and the branch's inputs from one fork (module doc)
                graphdef, params = nnx.split(self.branches[i])
                x_stage, h, zero = _matching_fork(
                    graphdef, self.config.sobolev_weight, h, params, 1.0 - self.gate(i)
                )
                if probe is not None:
                    x_stage = _measured_scale(x_stage, jnp.ones((), jnp.float32), probe[i, 0])
                h_next = stage(x_stage, **kwargs) + zero
                h, pair_loss = self(i, h, h_next, compute_loss=compute_loss)
                total = total + pair_loss
                continue
            h_next = stage(self.stage_input(i, h, probe), **kwargs)
            h, pair_loss = self(i, h, h_next, compute_loss=compute_loss)
            total = total + pair_loss
        return h, total
