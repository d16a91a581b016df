"""The configuration of a GC-ODE correction: its mode, solver and gate settings."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, get_args

__all__ = ["Adjoint", "GCODEConfig", "GCODEMode", "Solver", "resolve_gc_ode"]

GCODEMode = Literal["branch", "gradient", "scale_only", "frozen_branch"]
Solver = Literal["euler", "heun", "tsit5"]
Adjoint = Literal["auto", "unrolled", "recursive_checkpoint", "direct"]

_MODES: tuple[str, ...] = get_args(GCODEMode)
GATED = ("gradient", "frozen_branch")
_SOLVERS: tuple[str, ...] = get_args(Solver)
SOLVER_CLASSES = {"euler": "Euler", "heun": "Heun", "tsit5": "Tsit5"}  # diffrax names
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
      aux_weight: the weight :mod:`gcgd_jax.train` gives the branch's auxiliary
        loss (``aux["gc_ode_loss"]``) in the training objective, ``>= 0``. The
        model never applies it (a hand-written loop chooses its own); in the
        gated modes the auxiliary loss trains only the branch, so the weight
        scales the branch's learning signal and no backbone gradient.
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
    aux_weight: float = 1.0

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
        a = self.aux_weight
        if not _is_real(a) or not math.isfinite(a) or a < 0:
            raise ValueError(f"GCODEConfig.aux_weight must be a finite number >= 0, got {a!r}.")
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
