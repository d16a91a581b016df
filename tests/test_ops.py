"""gcgd_jax.ops: the XLA CPU flag, the fusion breaker, conv3x3's VJP, GroupNorm, chunked
weight gradients."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gcgd_jax.ops import CPU_CONV_FLAG, GroupNorm, apply_cpu_flags, conv3x3, fusion_break, xla_flags
from gcgd_jax.ops import conv as conv_ops
from gcgd_jax.ops import norm as norm_ops


def _x(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


# ----------------------------------------------------------------------------- XLA flag


def test_xla_flag_helper(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backends_initialised", lambda: False)
    env = {}
    assert apply_cpu_flags(env) is True and env["XLA_FLAGS"] == CPU_CONV_FLAG
    env = {"JAX_PLATFORMS": "cpu"}
    assert apply_cpu_flags(env) is True
    # A user's own XLA_FLAGS (even empty) are never touched.
    user = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert apply_cpu_flags(user) is False and user["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
    assert apply_cpu_flags({"XLA_FLAGS": ""}) is False
    # Not for accelerators, not for jaxlib versions it was not measured on, not once JAX runs.
    assert apply_cpu_flags({"JAX_PLATFORMS": "cuda"}) is False
    monkeypatch.setattr(xla_flags, "_accelerator_plugin_installed", lambda: True)
    assert apply_cpu_flags({}) is False
    monkeypatch.setattr(xla_flags, "_accelerator_plugin_installed", lambda: False)
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 9))
    assert apply_cpu_flags({}) is False
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.setattr(xla_flags, "_backends_initialised", lambda: True)
    env = {}
    assert apply_cpu_flags(env) is False and env == {}
    assert CPU_CONV_FLAG == "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


_FRESH_PROCESS = """
import sys
import gcgd_jax
jax_before = "jax" in sys.modules
from gcgd_jax.ops import apply_cpu_flags
import gcgd_jax.ops.xla_flags as c
assert ("jax" in sys.modules) == jax_before  # the flag helper imports no JAX
c._accelerator_plugin_installed = lambda: False  # whatever this machine has
c._jaxlib_version = lambda: (0, 10)
import jax, jax.numpy as jnp
from flax import nnx
from gcgd_jax.models import resnet20
env = {}
assert c.apply_cpu_flags(env) is True, "imported JAX, backends not started: flag applies"
jnp.ones(1) + 1  # starts the backends
env = {}
assert c.apply_cpu_flags(env) is False and env == {}, "backends started: too late"
print("ok")
"""


def test_flag_applies_after_importing_jax_until_its_backends_start():
    """The real detection (no monkeypatched ``_backends_initialised``), in a fresh process:
    importing JAX, Flax and the models starts no backend, the first computation does."""
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ----------------------------------------------------------------------------- fusion breaker


def test_fusion_break_divides_by_the_runtime_scalar_and_is_a_noop_without_it():
    x = _x((2, 3))
    assert fusion_break(x, None) is x
    np.testing.assert_array_equal(fusion_break(x, jnp.float32(1.0)), x)
    np.testing.assert_array_equal(fusion_break(x, jnp.float32(2.0)), x / 2)
    assert fusion_break(x.astype(jnp.bfloat16), jnp.float32(1.0)).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- conv3x3


def _lax_conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize("custom_vjp", [True, False])
def test_conv3x3_matches_lax_conv_values_and_gradients(custom_vjp):
    x, k = _x((2, 5, 6, 3)), _x((3, 3, 3, 4), 1)
    conv = lambda x, k: conv3x3(x, k, custom_vjp=custom_vjp)
    ct = _x((2, 5, 6, 4), 2)
    np.testing.assert_allclose(conv(x, k), _lax_conv(x, k), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x, k: jnp.sum(conv(x, k) * ct), argnums=(0, 1))(x, k)
    g_ref = jax.grad(lambda x, k: jnp.sum(_lax_conv(x, k) * ct), argnums=(0, 1))(x, k)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GroupNorm


def test_group_norm_matches_flax():
    x = 3 * _x((2, 4, 5, 16)) + 1
    ours = GroupNorm(16, 8)
    ref = nnx.GroupNorm(16, num_groups=8, epsilon=1e-5, rngs=nnx.Rngs(0))
    for norm in (ours, ref):
        norm.scale[...] = jnp.linspace(-1, 2, 16)
        norm.bias[...] = jnp.linspace(0, 1, 16)
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("zero_scale", [False, True])
def test_group_norm_factory_builds_either_with_the_same_parameters(zero_scale):
    rngs = nnx.Rngs(0)
    fast = norm_ops.group_norm(12, 4, zero_scale=zero_scale, rngs=rngs)
    plain = norm_ops.group_norm(12, 4, zero_scale=zero_scale, fast=False, rngs=rngs)
    assert type(fast) is GroupNorm and type(plain) is nnx.GroupNorm
    # Neither drew a key: the parameters built after them initialise as they would anyway.
    same = jax.random.key_data(rngs.params()) == jax.random.key_data(nnx.Rngs(0).params())
    assert bool(jnp.all(same))
    a, b = nnx.state(fast, nnx.Param), nnx.state(plain, nnx.Param)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert u.dtype == v.dtype == jnp.float32
        np.testing.assert_array_equal(u, v)
    x = _x((2, 3, 3, 12))
    np.testing.assert_allclose(fast(x), plain(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- GC-ODE switches


def test_gc_ode_without_the_cpu_workarounds_computes_the_same(monkeypatch):
    """The GC-ODE switches off (custom VJP, fast GroupNorm): the same parameters (paths, values), and the same loss and gradients
    up to float rounding; the switches are read when the model is built."""
    from gcgd_jax.models import GCODE, GCODEConfig

    class TwoStages(nnx.Module):
        def __init__(self, rngs):
            self.s1 = nnx.Conv(4, 8, (3, 3), strides=2, rngs=rngs)
            self.s2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
            self.gc_ode = GCODE((4, 8, 8), (2, 1), GCODEConfig(mode="branch"), rngs=rngs)

        def __call__(self, x):
            return self.gc_ode.run_stages([self.s1, self.s2], x)

    def build():
        model = TwoStages(nnx.Rngs(0))
        for branch in model.gc_ode.branches:  # phi != 0 and the branch joins
            norm = branch.field.norm_out
            norm.scale[...] = jnp.linspace(-1.0, 1.0, norm.scale.shape[0])
            branch.gamma[...] = jnp.full(branch.gamma.shape, 0.5)
        return model

    fast = build()
    monkeypatch.setattr(conv_ops, "CUSTOM_CONV_VJP", False)
    monkeypatch.setattr(norm_ops, "FAST_GROUP_NORM", False)
    plain = build()
    field = plain.gc_ode.branches[0].field
    assert type(field.norm_in) is nnx.GroupNorm and field.conv1.custom_vjp is False
    assert type(fast.gc_ode.branches[0].field.norm_in) is GroupNorm

    x = _x((2, 8, 8, 4))
    results = []
    for model in (fast, plain):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, graphdef=graphdef, rest=rest):
            h, _ = nnx.merge(graphdef, p, rest)(x)
            return jnp.sum(jnp.square(h))

        results.append((params, *jax.value_and_grad(loss)(params)))
    (p_fast, l_fast, g_fast), (p_plain, l_plain, g_plain) = results
    assert jax.tree.structure(p_fast) == jax.tree.structure(p_plain)
    for u, v in zip(jax.tree.leaves(p_fast), jax.tree.leaves(p_plain)):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_allclose(l_fast, l_plain, rtol=1e-5)
    for u, v in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- chunked wgrad


def _conv_args(stride):
    return {"window_strides": (stride, stride), "padding": ((1, 1), (1, 1)),
                "dimension_numbers": ("NHWC", "HWIO", "NHWC")}  # fmt: skip


@pytest.mark.parametrize(
    ("batch", "stride", "chunks"), [(16, 1, 8), (12, 2, 6), (7, 1, 7), (11, 1, 1)]
)
def test_chunked_wgrad_conv_matches_lax_values_and_gradients(batch, stride, chunks, monkeypatch):
    monkeypatch.setattr(conv_ops, "_chunking_applies", lambda: True)
    assert conv_ops._chunks(batch) == chunks  # the largest divisor <= WGRAD_CHUNKS (8)
    x, k = _x((batch, 6, 6, 3)), _x((3, 3, 3, 4), 1)
    ours = lambda x, k: conv_ops.chunked_wgrad_conv(x, k, **_conv_args(stride))
    ref = lambda x, k: jax.lax.conv_general_dilated(x, k, **_conv_args(stride))
    ct = _x(ref(x, k).shape, 2)
    np.testing.assert_array_equal(ours(x, k), ref(x, k))  # the forward is XLA's own
    g = jax.jit(jax.grad(lambda x, k: jnp.sum(ours(x, k) * ct), argnums=(0, 1)))(x, k)
    g_ref = jax.jit(jax.grad(lambda x, k: jnp.sum(ref(x, k) * ct), argnums=(0, 1)))(x, k)
    np.testing.assert_array_equal(g[0], g_ref[0])  # input gradient: XLA's own
    np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-5, atol=1e-5)  # another summation order
    hlo = jax.jit(jax.grad(lambda k: jnp.sum(ours(x, k) * ct))).lower(k).as_text()
    # One kernel-gradient convolution per chunk, or XLA's single one (the rest is dead code).
    assert hlo.count("stablehlo.convolution") == chunks


def test_chunking_needs_a_single_cpu_device():
    assert jax.device_count() == 2  # conftest's two fake CPU devices
    assert conv_ops._chunking_applies() is False
    x, k = _x((16, 6, 6, 3)), _x((3, 3, 3, 4), 1)
    args = _conv_args(1)
    hlo = jax.jit(jax.grad(lambda k: jnp.sum(conv_ops.chunked_wgrad_conv(x, k, **args))))
    assert hlo.lower(k).as_text().count("stablehlo.convolution") == 1


def test_resnet_convs_chunk_their_weight_gradient_unless_switched_off(monkeypatch):
    from gcgd_jax.models import resnet20

    monkeypatch.setattr(conv_ops, "_chunking_applies", lambda: True)

    x, y = _x((16, 8, 8, 3)), jnp.arange(16) % 10

    def grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            logits = nnx.merge(graphdef, params, rest, copy=True)(x)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), y])

        return jax.jit(jax.value_and_grad(loss))(params)

    chunked = resnet20(10, in_channels=3, rngs=nnx.Rngs(0))
    assert chunked.stem.conv.conv_general_dilated is conv_ops.chunked_wgrad_conv
    monkeypatch.setattr(conv_ops, "CHUNKED_WGRAD", False)
    plain = resnet20(10, in_channels=3, rngs=nnx.Rngs(0))
    assert plain.stem.conv.conv_general_dilated is jax.lax.conv_general_dilated
    (la, ga), (lb, gb) = grads(chunked), grads(plain)
    np.testing.assert_array_equal(la, lb)  # the same forward
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))
