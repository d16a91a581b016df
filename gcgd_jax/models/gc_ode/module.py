"""The GC-ODE modules: one branch per pair of stage outputs, and the correction
(:class:`GCODE`) that joins the branches to a network's stages in its mode."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gcgd_jax.models.aux import AuxSpec
from gcgd_jax.models.gc_ode.config import GATED, GCODEConfig, GCODEMode, resolve_gc_ode
from gcgd_jax.models.gc_ode.field import ODEVectorField, field_group_norm
from gcgd_jax.models.gc_ode.routing import (
    gradient_ratios,
    matching_fork,
    measured_scale,
    routed_branch,
    scale_gradient,
    solve_pure,
)
from gcgd_jax.models.gc_ode.solve import odeint

__all__ = ["GCODE", "FrozenWeight", "GateFit", "ODEBranch", "aux_spec", "probe_metrics"]


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
            self.proj_norm = field_group_norm(out_channels, rngs=rngs)
        else:
            self.proj_conv = None
            self.proj_norm = None
        self.field = ODEVectorField(out_channels, config.width, rngs=rngs)
        if config.mode == "branch":
            self.gamma = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
        else:
            self.gamma = None
        self.fit = GateFit(jnp.zeros((), jnp.float32)) if config.mode in GATED else None
        if config.mode == "frozen_branch":
            _freeze(self)

    def project(self, h: jax.Array) -> jax.Array:
        if self.proj_conv is None:
            return h
        return self.proj_norm(self.proj_conv(h))

    def solve(self, h_prev: jax.Array) -> jax.Array:
        """``z(1)`` from ``h_{i-1}`` with the live parameters."""
        return odeint(self.field, self.project(h_prev), self.config)


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
        if self.config.mode not in GATED:
            return jnp.zeros((), jnp.float32)
        return jax.lax.stop_gradient(self.config.gate_max * self.branches[index].fit[...])

    def gates(self) -> jax.Array:
        """``s_t`` of every pair, shape ``(num_pairs,)``."""
        return jnp.stack([self.gate(i) for i in range(self.num_pairs)])

    def new_probe(self) -> jax.Array | None:
        """Zeros of shape ``(num_pairs, 2)`` to pass as ``probe`` and differentiate
        (gated modes; ``None`` otherwise): see :func:`gradient_ratios`."""
        if self.config.mode not in GATED:
            return None
        return jnp.zeros((self.num_pairs, 2), jnp.float32)

    def _measuring(self, probe: jax.Array | None) -> bool:
        return probe is not None and self.config.mode in GATED and not self.deterministic

    def fork(self, index: int, h_prev: jax.Array, probe: jax.Array | None = None) -> jax.Array:
        """``h_prev`` as both stage ``index`` and its branch read it (the same value).

        With a ``probe``, the squared norm of the gradient reaching ``h_prev`` (the
        mix) goes to ``probe[index, 1]``'s gradient; otherwise ``h_prev`` itself.
        """
        if not self._measuring(probe):
            return h_prev
        return measured_scale(h_prev, jnp.ones((), jnp.float32), probe[index, 1])

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
            return measured_scale(h_prev, factor, probe[index, 0])
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
            zhat = solve_pure(graphdef, h_prev, jax.lax.stop_gradient(params))
            return h + s * (zhat - jax.lax.stop_gradient(zhat)), zero
        target = jax.lax.stop_gradient(h).astype(jnp.float32)
        k = self.config.loss_subsample
        if mode == "gradient" and k == 1:  # one solve for both paths
            zhat, z = routed_branch(graphdef, h_prev, params)
            loss = jnp.mean(jnp.square(z.astype(jnp.float32) - target))
            aux = jax.lax.stop_gradient(loss)
        else:
            # The extra path's solve (live input) on the whole batch; the output loss
            # (live parameters) on every k-th example; a frozen branch has none to train.
            zhat = solve_pure(graphdef, h_prev, jax.lax.stop_gradient(params))
            aux = jnp.mean(jnp.square(jax.lax.stop_gradient(zhat).astype(jnp.float32) - target))
            loss = aux
            if mode == "gradient":
                z = solve_pure(graphdef, jax.lax.stop_gradient(h_prev[::k]), params)
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
                x_stage, h, zero = matching_fork(
                    graphdef, self.config.sobolev_weight, h, params, 1.0 - self.gate(i)
                )
                if probe is not None:
                    x_stage = measured_scale(x_stage, jnp.ones((), jnp.float32), probe[i, 0])
                h_next = stage(x_stage, **kwargs) + zero
                h, pair_loss = self(i, h, h_next, compute_loss=compute_loss)
                total = total + pair_loss
                continue
            h_next = stage(self.stage_input(i, h, probe), **kwargs)
            h, pair_loss = self(i, h, h_next, compute_loss=compute_loss)
            total = total + pair_loss
        return h, total


def aux_spec(config: GCODEConfig, *, probe: bool = True) -> AuxSpec:
    """How the train step uses a GC-ODE model's auxiliary outputs (:mod:`gcgd_jax.models.aux`).

    ``gc_ode_loss`` (the sum of the pairs' auxiliary losses) enters the objective
    with ``config.aux_weight`` and is logged as its epoch mean; ``gc_ode_gate``
    (the mean gate ``s_t`` over pairs) is logged at the epoch's last step. In
    the gated modes with ``probe`` (the train step turns it off under a
    gradient penalty, which differentiates the loss twice), the gradient probe
    adds ``gc_ode_grad_ratio`` (mean over pairs of :func:`gradient_ratios`),
    logged as its epoch mean.
    """
    measured = probe and config.mode in GATED
    metrics: tuple[tuple[str, Any], ...] = (("gc_ode_loss", "mean"), ("gc_ode_gate", "last"))
    if measured:
        metrics = (*metrics, ("gc_ode_grad_ratio", "mean"))
    return AuxSpec(
        loss_weights=(("gc_ode_loss", float(config.aux_weight)),), metrics=metrics, probe=measured
    )


def probe_metrics(probe_grad: jax.Array) -> dict[str, jax.Array]:
    """The named scalars of a probe's gradient (:meth:`GCODE.new_probe`): ``gc_ode_grad_ratio``."""
    return {"gc_ode_grad_ratio": jnp.mean(gradient_ratios(probe_grad))}
