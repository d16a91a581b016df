"""optax's own contrib test harness, run against every gcgd_jax transform chained before SGD.

optax ships its conformance tests for contributed optimizers in the wheel
(``optax/contrib/_common_test.py``): extra arguments accepted, no recompilation,
convergence on a parabola, Rosenbrock, a matrix parabola and a mixed 1-D/2-D
target inside ``lax.scan`` (30,000 steps), ``optax.tree.map_params`` on the
state, ``inject_hyperparams`` equivalence, dtype preservation, ``MultiSteps``,
state shape/dtype stability under ``lax.cond`` and learning-rate schedules.

We reuse those test bodies as they are (the undecorated functions behind
absl's parameterised methods) with our own parameter list: each entry is
``optax.chain(<our transform>, optax.sgd(learning_rate))``. Where a transform
cannot reach a target *by design*, the case is an expected failure with the
reason (e.g. ZNorm removes the mean of the gradient of a leaf, so a leaf whose
optimum needs a mean shift is never reached).
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from absl.testing import parameterized

import gcgd_jax

harness = pytest.importorskip("optax.contrib._common_test")


def _chained(correction, **fixed):
    def factory(learning_rate: optax.ScalarOrSchedule = 1e-3):
        return optax.chain(correction(**fixed), optax.sgd(learning_rate))

    factory.__name__ = f"{correction.__name__}_then_sgd"
    return factory


_TRANSFORMS = {
    "gcgd_centralize": _chained(gcgd_jax.centralize),
    "gcgd_channel_directed_h0": _chained(gcgd_jax.channel_directed, metric="h0"),
    "gcgd_channel_directed_sobolev": _chained(gcgd_jax.channel_directed, metric="sobolev"),
    "gcgd_znorm": _chained(gcgd_jax.znorm),
    "gcgd_agr": _chained(gcgd_jax.agr),
    "gcgd_agr_all_leaves": _chained(gcgd_jax.agr, leaves="all"),
}
for _name in ("gc_w_v2", "mars_correction", "grokfast_ema"):
    _TRANSFORMS[f"gcgd_{_name}"] = _chained(getattr(gcgd_jax, _name))


def _gc_w_on_kernels():
    """GC-W v1 rejects non-kernel leaves by design: it is meant to be masked."""
    return optax.masked(gcgd_jax.gc_w(), lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))


_gc_w_on_kernels.__name__ = "gc_w"
_TRANSFORMS["gcgd_gc_w"] = _chained(_gc_w_on_kernels)

_CASES = tuple(
    {
        "opt_name": name,
        "opt_kwargs": {"learning_rate": 1e-3},
        "wrapper_name": None,
        "wrapper_kwargs": None,
    }
    for name in _TRANSFORMS
)

# (transform, target) pairs that cannot converge by design, with the reason.
_SMALL_LEAF = (
    "AGR on a leaf of a few elements: the coordinate that dominates the gradient gets a "
    "coefficient 1 - share -> 0 as the others converge, and stalls"
)
_EXPECTED_NOT_TO_CONVERGE = {
    ("gcgd_znorm", "_setup_matrix_parabola"): "ZNorm projects out the leaf mean of the gradient",
    ("gcgd_znorm", "_setup_mixed_tensor_target"): "ZNorm projects out the leaf mean (2-D leaf)",
    ("gcgd_centralize", "_setup_matrix_parabola"): "centralization removes the fan-in mean",
    ("gcgd_centralize", "_setup_mixed_tensor_target"): "centralization removes the fan-in mean",
    ("gcgd_agr", "_setup_matrix_parabola"): _SMALL_LEAF + " (a 2x2 kernel)",
    ("gcgd_agr_all_leaves", "_setup_parabola"): _SMALL_LEAF,
    ("gcgd_agr_all_leaves", "_setup_rosenbrock"): _SMALL_LEAF,
    ("gcgd_agr_all_leaves", "_setup_matrix_parabola"): _SMALL_LEAF,
    ("gcgd_agr_all_leaves", "_setup_mixed_tensor_target"): _SMALL_LEAF,
}


def _raw(name: str):
    """The undecorated body of the harness's parameterised test ``name``."""
    pattern = re.compile(rf"^{name}\d+$")
    for attr, fn in vars(harness.ContribTest).items():
        if pattern.match(attr) and hasattr(fn, "__wrapped__"):
            return fn.__wrapped__
    raise LookupError(f"optax's harness has no parameterised test {name!r}")


class OurTransformsUnderOptaxHarness(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._original_factory = harness._get_opt_factory
        harness._get_opt_factory = lambda name: _TRANSFORMS.get(name) or cls._original_factory(name)

    @classmethod
    def tearDownClass(cls):
        harness._get_opt_factory = cls._original_factory
        super().tearDownClass()

    @contextlib.contextmanager
    def subTest(self, msg=None, **params):
        """Let a failing sub-check raise, so that an expected failure can be asserted."""
        del msg, params
        yield

    @parameterized.product(_CASES, wrap=[False])
    def test_accept_extra_args(self, **kw):
        _raw("test_optimizers_accept_extra_args")(self, **kw)

    @parameterized.product(
        _CASES,
        target=(
            harness._setup_parabola,
            harness._setup_rosenbrock,
            harness._setup_matrix_parabola,
            harness._setup_mixed_tensor_target,
        ),
        dtype=("float32",),
    )
    def test_converges(self, opt_name, target, **kw):
        reason = _EXPECTED_NOT_TO_CONVERGE.get((opt_name, target.__name__))
        if reason is None:
            _raw("test_optimizers")(self, opt_name=opt_name, target=target, **kw)
            return
        with pytest.raises(AssertionError):  # it must fail, or the entry is stale
            _raw("test_optimizers")(self, opt_name=opt_name, target=target, **kw)
        pytest.xfail(reason)

    @parameterized.product(_CASES)
    def test_inject_hyperparams(self, **kw):
        _raw("test_optimizers_can_be_wrapped_in_inject_hyperparams")(self, **kw)

    @parameterized.product(_CASES, dtype=("bfloat16", "float32"))
    def test_preserve_dtype(self, **kw):
        _raw("test_preserve_dtype")(self, **kw)

    @parameterized.product(_CASES, dtype=("bfloat16", "float32"))
    def test_gradient_accumulation(self, **kw):
        _raw("test_gradient_accumulation")(self, **kw)

    @parameterized.product(_CASES, dtype=(jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
    def test_state_shape_dtype_stability(self, **kw):
        _raw("test_state_shape_dtype_shard_stability")(self, **kw)

    @parameterized.product(_CASES)
    def test_learning_rate_schedule(self, **kw):
        _raw("test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such")(self, **kw)


def test_every_public_transform_is_under_the_harness():
    public = {
        "centralize",
        "channel_directed",
        "znorm",
        "agr",
        "gc_w",
        "gc_w_v2",
        "mars_correction",
        "grokfast_ema",
    }
    covered = {
        n.removeprefix("gcgd_")
        .removesuffix("_h0")
        .removesuffix("_sobolev")
        .removesuffix("_all_leaves")
        for n in _TRANSFORMS
    }
    assert public <= covered
