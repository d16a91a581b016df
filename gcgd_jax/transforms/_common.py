"""Small helpers shared by the gradient transforms in :mod:`gcgd_jax.transforms`.

Conventions every transform here follows:

* Layout is Flax's: conv kernels ``(kh, kw, in, out)``, dense kernels
  ``(in, out)``. The *output-unit axis* defaults to the last axis; every other
  axis is *fan-in*.
* Only leaves with a real floating dtype (bf16, f16, f32, f64) are
  transformed. Every other leaf (integer or boolean arrays, the
  ``jax.dtypes.float0`` gradients ``jax.grad`` returns for integer inputs,
  complex arrays) passes through untouched.
* Statistics are computed in at least float32 and the result is cast back to
  the leaf's dtype, so bf16 in gives bf16 out.
* Numeric hyperparameters may be traced (``optax.inject_hyperparams``), so
  they are validated only when their value is known at construction time.

Tree arithmetic uses :mod:`optax.tree` (``where``, ``zeros_like``, ``cast``,
``add_scale``, ``bias_correction``, ``norm``). What stays here has no
optax counterpart: the float-leaves-only map with its at-least-float32
promotion (:func:`map_float_leaves`), zeros in each leaf's accumulation dtype
(:func:`acc_zeros_like`: ``optax.tree.zeros_like`` takes one dtype for the whole
tree), the NaN-free division, argument checks and the element and byte counts of
abstract states (``optax.tree.size`` takes arrays only on jax >= 0.12). The EMAs stay
written out (``beta * m + (1 - beta) * g``) rather than
``optax.tree.update_moment``, which adds the two terms in the other order: under
``jax.jit`` XLA's CPU backend contracts the sum into a fused multiply-add, so
the order changes the last bit (measured on GC-W).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_value(value: Any) -> float | None:
    """``value`` as a Python float when it is a concrete scalar, else ``None``.

    Tracers (a hyperparameter injected by ``optax.inject_hyperparams`` and used
    under ``jax.jit``) return ``None``: their value is unknown at trace time.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(np.asarray(value))
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return None


def check_number(name: str, value: Any, *, lower: float, inclusive: bool = True) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value >= lower`` (or ``>``).

    NaN and non-numbers (strings, ``None``, booleans, arrays of more than one
    element) are rejected too. A traced ``value`` is not checked.
    """
    if isinstance(value, jax.core.Tracer):
        return
    v = None if isinstance(value, (bool, np.bool_, str, bytes)) else concrete_value(value)
    ok = v is not None and not math.isnan(v) and (v >= lower if inclusive else v > lower)
    if not ok:
        op = ">=" if inclusive else ">"
        raise ValueError(f"`{name}` must be a real number {op} {lower}, got {value!r}.")


def check_axis(axis: Any) -> int:
    """``axis`` as a Python int; ``TypeError`` naming ``axis`` otherwise.

    The axis is static (it decides shapes): with ``optax.inject_hyperparams``
    pass ``static_args=("axis",)``.
    """
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"`axis` must be an int, got {axis!r}.")
    try:
        return operator.index(axis)
    except TypeError:
        raise TypeError(
            "`axis` must be an int (it is static; with optax.inject_hyperparams pass "
            f"static_args=('axis',)), got {axis!r}."
        ) from None


def normalize_axis(axis: int, ndim: int, path: str) -> int:
    """Maps ``axis`` into ``[0, ndim)``; ``ValueError`` naming the leaf otherwise."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"`axis`={axis} is out of range for the leaf {path} with ndim={ndim}.")
    return axis % ndim


def fan_in_axes(ndim: int, axis: int, path: str) -> tuple[int, ...]:
    """Every axis of an ``ndim``-dimensional leaf except the output-unit ``axis``."""
    out = normalize_axis(axis, ndim, path)
    return tuple(a for a in range(ndim) if a != out)


def is_float(x: Any) -> bool:
    """Whether ``x`` is an array with a real floating dtype."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def map_float_leaves(
    fn: Callable[[str, jax.Array], jax.Array], tree: Any, *, min_ndim: int = 0
) -> Any:
    """Applies ``fn(path, x)`` to the float leaves of ``tree`` with ``ndim >= min_ndim``.

    ``path`` is ``jax.tree_util.keystr`` of the leaf's key path (for error
    messages); ``x`` is the leaf promoted to at least float32, and ``fn``'s
    result is cast back to the leaf's dtype. Other leaves are returned as they
    are; ``None`` and ``optax.MaskedNode`` hold no leaves and are kept.
    """

    def visit(key_path, leaf):
        if not is_float(leaf) or jnp.ndim(leaf) < min_ndim:
            return leaf
        x = jnp.asarray(leaf)  # float64 becomes float32 unless jax_enable_x64
        out = fn(jax.tree_util.keystr(key_path), x.astype(jnp.promote_types(x.dtype, jnp.float32)))
        return out.astype(x.dtype)

    return jax.tree_util.tree_map_with_path(visit, tree)


def acc_dtype(x: Any) -> jnp.dtype:
    """The dtype state about leaf ``x`` accumulates in: at least float32 for a float
    leaf (bf16 -> f32, f64 kept), the leaf's own dtype otherwise."""
    dtype = jnp.result_type(x)
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def acc_zeros_like(tree: Any) -> Any:
    """Zeros shaped like every leaf of ``tree``, each in :func:`acc_dtype` of its leaf.

    (``optax.tree.zeros_like(tree, jnp.float32)`` would also turn integer leaves
    into float32 and float64 ones into float32.)
    """
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), acc_dtype(p)), tree)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den > 0``, else 0: no NaN or inf from a zero ``den``."""
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1), 0)


def memory_parts(state: Any, parts: dict[str, Any]) -> dict[str, int]:
    """Element counts of the named parts of an (abstract) optimizer state.

    Returns ``parts``' counts, their ``"total"`` and ``"bytes"`` (the whole
    ``state``'s size); leaves may be arrays or ``jax.ShapeDtypeStruct``.
    """
    # Shapes are read directly: jax (>= 0.12) deprecates handing ShapeDtypeStructs to
    # jnp.size, which optax.tree.size calls.
    leaves = jax.tree.leaves
    out = {name: sum(math.prod(x.shape) for x in leaves(tree)) for name, tree in parts.items()}
    out["total"] = sum(out.values())
    out["bytes"] = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves(state))
    return out
