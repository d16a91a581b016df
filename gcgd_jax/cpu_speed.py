"""Everything that exists only to make XLA's CPU backend fast.

On CPUs, XLA's default handling of a convolutional network's train step is far
from what the hardware allows (``docs/cpu_performance.md``). The package ships
five workarounds, all here, each measured on a 2-core CPU with jax/jaxlib
0.10.2 (the figures, machines and dates: ``docs/cpu_performance.md``), each
switchable. The models import them from
here; nothing else in the package depends on XLA's CPU heuristics.

1. **The XLA convolution flag** (:data:`CPU_CONV_FLAG`, :func:`apply_cpu_flags`).
   ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` takes
   individual convolutions off XLA's YNNPACK fusion path.

   *Buys*: with default flags 58% of a CIFAR ResNet-20 train step (batch 128)
   was YNN weight-gradient convolutions; with the flag the step ran about
   2.3x faster on the first machine measured; side by side in the
   ``gcgd-train`` loop later, 1.15x on one 2-core CPU and 1.08x on another
   -- the gain depends on the CPU, so measure it on yours.
   *Costs*: another convolution algorithm, so other rounding: after 5 SGD steps
   at lr 0.1 the parameters differed from the default flags' by relative L2
   4e-3.
   *Off*: set ``XLA_FLAGS`` yourself, to anything (even empty); a user's own
   ``XLA_FLAGS`` are never touched. :func:`apply_cpu_flags` also leaves the
   environment alone on accelerators, with jaxlib older than 0.10, and once
   JAX's backends are initialised.

2. **The fusion breaker** (:func:`fusion_break`). Every residual block's input
   is divided by a runtime ``1.0`` (an argument of the jitted step).

   *Buys*: stops XLA copying each block's forward BatchNorm/ReLU/residual chain
   into the weight-gradient transposes: 1.24-1.4x on top of the flag on one
   2-core CPU, 1.04x on another.
   *Costs*: nothing numerically (``x / 1.0`` is exact; bit-identical, tested).
   It relies on XLA's fusion heuristics, so it is measured, not assumed.
   *Off*: ``--set run.fusion_breaker=off`` (``"auto"``, the default, turns it on
   for CPU devices only), or pass ``fusion_breaker=None`` to the model.

3. **GC-ODE's 3x3 convolution VJP** (:func:`conv3x3`). Inside a ``while`` loop
   body (where diffrax's solve and its checkpointed backward run) XLA's CPU
   backend left the weight-gradient convolution in a non-canonical layout and
   ran it through a slow generic kernel; the hand-written VJP writes both
   backward convolutions in the canonical NHWC/HWIO form.

   *Buys*: that convolution was about 40x slower per call without it (jax
   0.10.2; cf. jax-ml/jax#12868).
   *Costs*: values and gradients equal ``jax.lax.conv_general_dilated``'s up to
   float rounding (another summation order; tested to 1e-5).
   *Off*: ``gcgd_jax.cpu_speed.CUSTOM_CONV_VJP = False`` before building the
   model (GC-ODE then uses XLA's own VJP), or ``conv3x3(..., custom_vjp=False)``.

4. **GC-ODE's GroupNorm** (:class:`GroupNorm`): a two-stage reduction
   (per-(sample, channel) sums over ``H, W``, then over each group's channels).

   *Buys*: forward + backward about 2x faster than ``nnx.GroupNorm`` for small
   groups.
   *Costs*: the same maths and parameters as ``nnx.GroupNorm`` with
   ``use_fast_variance`` (statistics in at least float32), another summation
   order: equal to it within 1e-4 (tested).
   *Off*: ``gcgd_jax.cpu_speed.FAST_GROUP_NORM = False`` before building the
   model (GC-ODE then builds ``nnx.GroupNorm`` with the same parameters,
   ``scale`` and ``bias``, so checkpoints fit either).

5. **Weight gradients in batch chunks** (:func:`chunked_wgrad_conv`). Every
   ResNet convolution computes its weight gradient as the sum of
   :data:`WGRAD_CHUNKS` (8) partial weight gradients over batch chunks.

   *Buys*: XLA's CPU backend runs a weight-gradient convolution on one core
   (measured for the 32x32x16 shape: 14.0 ms on two cores, 13.4 ms on one,
   while forward and input-gradient convolutions halve); independent chunks
   run on both (7.1 ms). The whole ResNet-20 train step: 1.09x
   (399 -> 367 ms median).
   *Costs*: another summation order of the weight gradient (equal to XLA's
   within float rounding, tested to 1e-5); the first step compiles about 1.5 s
   longer; forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) through
   the model is not available (``jax.custom_vjp``).
   GC-ODE's vector-field convolution does not chunk: inside the solve's loop it
   bought nothing on the whole step (measured, then removed).
   *Off*: ``gcgd_jax.cpu_speed.CHUNKED_WGRAD = False`` before building the
   model. Only active on the CPU backend with a single device (checked when
   the step is traced: with two fake CPU devices and a batch-sharded GC-ODE
   step, XLA aborted in 3 of 5 runs; with one device, never) and when the
   batch has a divisor > 1 among ``1..WGRAD_CHUNKS``.

The three model switches (items 3 to 5) are read when a model is built (a
built model keeps what it was built with); all default to ``True``.

This module imports JAX only when a function that needs it runs, so
``apply_cpu_flags`` can be imported (and called) before anything starts JAX.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import os
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jax
    from flax import nnx

__all__ = [
    "CHUNKED_WGRAD",
    "CPU_CONV_FLAG",
    "CUSTOM_CONV_VJP",
    "FAST_GROUP_NORM",
    "WGRAD_CHUNKS",
    "GroupNorm",
    "apply_cpu_flags",
    "chunked_wgrad_conv",
    "conv3x3",
    "conv3x3_xla",
    "fusion_break",
    "group_norm",
]

# ----------------------------------------------------------------------------- 1. XLA flag

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"

_MIN_JAXLIB = (0, 10)
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def _jaxlib_version() -> tuple[int, ...] | None:
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _accelerator_plugin_installed() -> bool:
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name.startswith(_ACCELERATOR_PLUGINS):
            return True
    return False


def _backends_initialised() -> bool:
    """Whether XLA has read ``XLA_FLAGS`` already. Importing ``jax`` does not start
    its backends (the first computation or ``jax.devices()`` does), so an imported
    but idle JAX still takes the flag."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - private module moved
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


def apply_cpu_flags(environ: MutableMapping[str, str] | None = None) -> bool:
    """Sets ``XLA_FLAGS`` to :data:`CPU_CONV_FLAG` when it is safe.

    When all of: the user has not set ``XLA_FLAGS`` (a user's own flags are
    never touched, not even appended to); JAX's backends are not initialised
    yet (XLA reads ``XLA_FLAGS`` once; an imported JAX that has not computed
    anything is fine); ``JAX_PLATFORMS`` is unset or names ``cpu`` and no
    accelerator plugin (``jax-cuda*-plugin``, ``jax-rocm*-plugin``, ``libtpu``)
    is installed (the flag only affects CPU compilation, but it has not been
    measured on a machine with an accelerator); jaxlib is at least 0.10 (the
    version it was measured on: XLA aborts on a flag it does not know). The
    flag is experimental in XLA; if a future jaxlib rejects it, set
    ``XLA_FLAGS`` yourself (even empty) to switch this off.

    Args:
        environ: the environment to edit; ``os.environ`` by default.

    Returns:
        True when the flag was added, False when the environment was left alone.
    """
    env = os.environ if environ is None else environ
    if "XLA_FLAGS" in env:
        return False
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms and "cpu" not in platforms.split(","):
        return False
    version = _jaxlib_version()
    if version is None or version < _MIN_JAXLIB:
        return False
    if _accelerator_plugin_installed() or _backends_initialised():
        return False
    env["XLA_FLAGS"] = CPU_CONV_FLAG
    return True


# ----------------------------------------------------------------------------- 2. fusion breaker


def fusion_break(x: jax.Array, fusion_breaker: jax.Array | None) -> jax.Array:
    """Divides ``x`` by the runtime scalar ``fusion_breaker`` (no-op when ``None``).

    The **only** implementation of the fusion breaker, applied at the input of
    every residual block (not inside the GC-ODE branches: measured there, it
    made no difference). The training step passes ``jnp.float32(1.0)`` as an
    argument of the jitted step; ``x / 1.0`` is exact, but XLA cannot see that
    the divisor is 1, so it cannot fold it, and the division stops XLA's CPU
    backend from copying each block's forward BatchNorm/ReLU/residual chain
    into the weight-gradient transposes -- about 1.4x on a CPU ResNet-20 train
    step (see the module doc). A Python constant would be folded away and the
    gain lost. It relies on XLA fusion heuristics: keep it switchable
    (``None``) and measured.
    """
    if fusion_breaker is None:
        return x
    import jax.numpy as jnp

    return x / jnp.asarray(fusion_breaker, x.dtype)


# ----------------------------------------------------------------------------- 3. conv3x3 VJP

#: GC-ODE's 3x3 convolutions use the hand-written VJP of :func:`conv3x3` (read
#: when a GC-ODE model is built). ``False``: XLA's own VJP.
CUSTOM_CONV_VJP: bool = True

_DN = ("NHWC", "HWIO", "NHWC")
_PAD = ((1, 1), (1, 1))


def conv3x3_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 convolution, stride 1, zero padding 1, NHWC / HWIO, differentiated by XLA."""
    import jax

    return jax.lax.conv_general_dilated(x, kernel, (1, 1), _PAD, dimension_numbers=_DN)


def _conv3x3_fwd(x, kernel):
    return conv3x3_xla(x, kernel), (x, kernel)


def _conv3x3_kernel_grad(x, dy):
    import jax

    # dk[a, b, i, o] = sum_{n,h,w} xpad[n, h + a, w + b, i] dy[n, h, w, o]: a convolution
    # with C_in as "batch", N as "features" and dy as an (H, W, N, C_out) kernel.
    return jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), _PAD, dimension_numbers=_DN
    ).transpose(1, 2, 0, 3)


def _conv3x3_bwd(res, dy):
    import jax.numpy as jnp

    x, kernel = res
    # dx: correlate dy with the spatially flipped kernel, in/out swapped.
    dx = conv3x3_xla(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
    return dx, _conv3x3_kernel_grad(x, dy).astype(kernel.dtype)


@functools.cache
def _conv3x3_custom_vjp():
    import jax

    conv = jax.custom_vjp(conv3x3_xla)
    conv.defvjp(_conv3x3_fwd, _conv3x3_bwd)
    return conv


def conv3x3(x: jax.Array, kernel: jax.Array, *, custom_vjp: bool = True) -> jax.Array:
    """3x3 convolution, stride 1, zero padding 1, NHWC / HWIO, with a hand-written VJP.

    Values and gradients are those of ``jax.lax.conv_general_dilated`` (tested).
    The VJP writes both backward convolutions in the canonical NHWC/HWIO form
    (explicit transposes, as XLA itself produces outside loops). Reason: inside a
    ``while`` loop body -- where diffrax's solve and its checkpointed backward
    run -- XLA's CPU backend leaves the weight-gradient convolution in a
    non-canonical layout and runs it through a slow generic kernel (measured
    ~40x slower per conv here, jax 0.10.2; cf. jax-ml/jax#12868).
    ``custom_vjp=False`` is :func:`conv3x3_xla` (XLA's own VJP).
    """
    if not custom_vjp:
        return conv3x3_xla(x, kernel)
    return _conv3x3_custom_vjp()(x, kernel)


# ----------------------------------------------------------------------------- 4. GroupNorm

#: GC-ODE builds its group norms as :class:`GroupNorm` (read when a GC-ODE model
#: is built). ``False``: ``nnx.GroupNorm`` with the same parameters.
FAST_GROUP_NORM: bool = True

GN_EPSILON = 1e-5


@functools.cache
def _group_norm_class() -> type:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class GroupNorm(nnx.Module):
        """Group normalisation over ``(H, W, channels of a group)`` for NHWC inputs.

        Same maths and parameters (``scale``, ``bias``) as ``nnx.GroupNorm`` with
        ``use_fast_variance`` (tested against it), computed as a two-stage
        reduction -- per-(sample, channel) sums over ``H, W`` first, then over the
        channels of each group -- with statistics in (at least) float32. On the
        CPU its forward + backward is about 2x faster than ``nnx.GroupNorm`` for
        small groups.
        """

        def __init__(
            self,
            num_features: int,
            num_groups: int,
            *,
            epsilon: float = GN_EPSILON,
            zero_scale: bool = False,
            rngs: nnx.Rngs | None = None,
        ):
            del rngs  # deterministic initialisation
            if num_features % num_groups:
                raise ValueError(
                    f"num_groups={num_groups} must divide num_features={num_features}."
                )
            self.num_features, self.num_groups, self.epsilon = num_features, num_groups, epsilon
            init = jnp.zeros if zero_scale else jnp.ones
            self.scale = nnx.Param(init((num_features,), jnp.float32))
            self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

        def __call__(self, x: jax.Array) -> jax.Array:
            n, c, g = x.shape[0], x.shape[-1], self.num_groups
            xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # f32 statistics (f64 kept)
            axes = tuple(range(1, x.ndim - 1))
            count = math.prod(x.shape[1:-1]) * (c // g)
            s1 = jnp.sum(xf, axis=axes).reshape(n, g, c // g).sum(-1)  # (N, G)
            s2 = jnp.sum(jnp.square(xf), axis=axes).reshape(n, g, c // g).sum(-1)
            mean = s1 / count
            var = jnp.maximum(s2 / count - jnp.square(mean), 0.0)
            inv = jax.lax.rsqrt(var + self.epsilon)
            mean, inv = jnp.repeat(mean, c // g, axis=1), jnp.repeat(inv, c // g, axis=1)  # (N, C)
            mul = inv * self.scale[...].astype(xf.dtype)
            add = self.bias[...].astype(xf.dtype) - mean * mul
            bshape = (n,) + (1,) * (x.ndim - 2) + (c,)
            return (xf * mul.reshape(bshape) + add.reshape(bshape)).astype(x.dtype)

    GroupNorm.__module__, GroupNorm.__qualname__ = __name__, "GroupNorm"
    return GroupNorm


def group_norm(
    num_features: int,
    num_groups: int,
    *,
    zero_scale: bool = False,
    fast: bool | None = None,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A group norm over NHWC inputs: :class:`GroupNorm` (``fast``), else ``nnx.GroupNorm``.

    ``fast=None`` reads :data:`FAST_GROUP_NORM`. Both have the parameters
    ``scale`` (ones, or zeros with ``zero_scale``) and ``bias`` (zeros), float32,
    and epsilon ``1e-5``. Neither draws from ``rngs`` (their initialisation is
    constant), so the choice leaves every other parameter's initialisation as it is.
    """
    if FAST_GROUP_NORM if fast is None else fast:
        return _group_norm_class()(num_features, num_groups, zero_scale=zero_scale, rngs=rngs)
    from flax import nnx

    init = nnx.initializers.zeros_init() if zero_scale else nnx.initializers.ones_init()
    return nnx.GroupNorm(
        num_features,
        num_groups=num_groups,
        epsilon=GN_EPSILON,
        scale_init=init,
        rngs=nnx.Rngs(0),  # not `rngs`: nnx.GroupNorm would draw (and not use) a key from it
    )


# ----------------------------------------------------------------------------- 5. chunked wgrad

#: ResNet convolutions use :func:`chunked_wgrad_conv` (read when a ResNet is
#: built). ``False``: ``jax.lax.conv_general_dilated`` and XLA's own VJP.
CHUNKED_WGRAD: bool = True
#: How many batch chunks the weight gradient is split into (at most).
WGRAD_CHUNKS: int = 8


def _chunks(batch: int) -> int:
    """The largest divisor of ``batch`` that is at most :data:`WGRAD_CHUNKS`."""
    return max(k for k in range(1, max(WGRAD_CHUNKS, 1) + 1) if batch % k == 0)


def _chunking_applies() -> bool:
    """One CPU device only: with two (fake) CPU devices and a batch-sharded step,
    XLA aborted intermittently (3 of 5 GC-ODE runs, jaxlib 0.10.2); one device never did."""
    import jax

    return jax.default_backend() == "cpu" and jax.device_count() == 1


def chunked_wgrad_conv(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """``jax.lax.conv_general_dilated`` whose weight gradient is summed over batch chunks.

    A drop-in for the ``conv_general_dilated`` argument of ``nnx.Conv``: the
    same arguments, the same values. Its VJP gives the input gradient as XLA
    does and the kernel gradient as the sum, over ``k`` equal chunks of the
    batch (``k`` the largest divisor of the batch size up to
    :data:`WGRAD_CHUNKS`), of each chunk's kernel gradient -- mathematically
    the same sum, in another order. Why: XLA's CPU backend runs one
    weight-gradient convolution on a single core, ``k`` independent ones on
    all of them (see the module doc, item 5). On other backends, with more
    than one device (a data-parallel step on several CPU devices made XLA abort
    intermittently), or when ``k == 1``, it is ``jax.lax.conv_general_dilated``
    itself. The batch is the leading dimension of ``lhs`` (NHWC, as
    ``nnx.Conv`` calls it).
    """
    import jax

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x, w, *args, **kwargs)

    k = _chunks(lhs.shape[0]) if _chunking_applies() else 1
    if k == 1:
        return conv(lhs, rhs)

    @jax.custom_vjp
    def chunked(x: jax.Array, w: jax.Array) -> jax.Array:
        return conv(x, w)

    def fwd(x: jax.Array, w: jax.Array):
        return conv(x, w), (x, w)

    def bwd(res, dy):
        import jax.numpy as jnp

        x, w = res
        dx = jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]
        dw = None
        for xc, dyc in zip(jnp.split(x, k), jnp.split(dy, k), strict=True):
            part = jax.vjp(lambda w, xc=xc: conv(xc, w), w)[1](dyc)[0]
            dw = part if dw is None else dw + part
        return dx, dw

    chunked.defvjp(fwd, bwd)
    return chunked(lhs, rhs)


def __getattr__(name: str) -> Any:
    # GroupNorm is an nnx.Module: defined on first use, so that importing this
    # module (for apply_cpu_flags) does not import JAX and Flax.
    if name == "GroupNorm":
        globals()["GroupNorm"] = _group_norm_class()
        return globals()["GroupNorm"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # static analysers see the class
    GroupNorm: type[nnx.Module]
