"""Statistics of many independent estimates, shared by the estimator tests.

An estimator is unbiased when the mean of n estimates converges to the gradient:
per element, z = (mean - g) / (standard error of the mean) is then about N(0, 1)
whatever n, and the relative error of the mean, |mean - g| / |g|, shrinks like
1/sqrt(n). A biased one has |z| growing like sqrt(n) and an error that levels off.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def draw(estimate_one, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` estimates, ``estimate_one(key) -> tree``, as leaves with a leading axis."""
    keys = jax.random.split(jax.random.key(seed), n)
    # vmapped in chunks of 250: jaxlib 0.10.2 miscompiles some VJPs vmapped over more
    # than about 256 items on the CPU (see the LocalMixer's LayerNorm)
    samples = jax.jit(lambda k: jax.lax.map(estimate_one, k, batch_size=250))(keys)
    return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(samples)]


class Check(NamedTuple):
    mean_z2: float  # mean over elements of z^2 (about 1 when unbiased)
    max_abs_z: float
    relative_error: float  # |mean - g| / |g| over the whole tree
    cosine: float  # cos(mean, g)


def check(samples: list[np.ndarray], gradient: Any, n: int | None = None) -> Check:
    """Compare the mean of the first ``n`` samples with ``gradient`` (a tree)."""
    grads = [np.asarray(g, np.float64) for g in jax.tree.leaves(gradient)]
    n = n or samples[0].shape[0]
    scale = np.sqrt(np.mean(np.concatenate([np.ravel(g) ** 2 for g in grads])))
    z, err2, norm2, dot, mean2 = [], 0.0, 0.0, 0.0, 0.0
    for s, g in zip(samples, grads):
        mean = s[:n].mean(0)
        se = s[:n].std(0) / np.sqrt(n)
        # a structurally zero gradient (a bias that a LayerNorm removes) is estimated
        # as float32 rounding noise, with se ~ 0: errors below 1e-5 of the gradient's
        # scale count as nothing
        z.append(np.ravel((mean - g) / np.sqrt(se**2 + (1e-5 * scale) ** 2)))
        err2 += np.sum((mean - g) ** 2)
        norm2 += np.sum(g**2)
        dot += np.sum(mean * g)
        mean2 += np.sum(mean**2)
    z = np.concatenate(z)
    return Check(
        float(np.mean(z**2)),
        float(np.max(np.abs(z))),
        float(np.sqrt(err2 / norm2)),
        float(dot / np.sqrt(norm2 * mean2)),
    )


def assert_unbiased(samples: list[np.ndarray], gradient: Any) -> Check:
    """z ~ N(0, 1) per element: mean z^2 within 4 standard deviations of a chi-square's
    mean (1 +- 4 sqrt(2/m) over m elements, plus 0.1 for the estimates' heavy tails),
    and no |z| above 5.5. (That the error then shrinks like 1/sqrt(n) is checked on its
    own in test_weight_perturbation.)"""
    m = sum(s[0].size for s in samples)
    full = check(samples, gradient)
    assert abs(full.mean_z2 - 1.0) < 4.0 * np.sqrt(2.0 / m) + 0.1, full
    assert full.max_abs_z < 5.5, full
    return full


def assert_biased(samples: list[np.ndarray], gradient: Any) -> Check:
    """The mean does not converge: z^2 far above 1 and growing with n, and the
    relative error levels off (shrinks by < 1.3 from n/4 to n)."""
    n = samples[0].shape[0]
    full, quarter = check(samples, gradient), check(samples, gradient, n // 4)
    assert full.mean_z2 > 10.0, full
    assert full.mean_z2 > 2.5 * quarter.mean_z2, (quarter, full)
    assert quarter.relative_error / full.relative_error < 1.3, (quarter, full)
    return full


def tree_allclose(a: Any, b: Any, **kw: Any) -> bool:
    return all(
        np.allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **kw)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def forward_only_relu(z: jax.Array) -> jax.Array:
    """A ReLU with a JVP and no VJP: reverse-mode through a while_loop raises."""
    return jax.lax.while_loop(lambda c: c[0] < 1, lambda c: (c[0] + 1, jax.nn.relu(c[1])), (0, z))[
        1
    ]


def leaf_dtypes(tree: Any) -> list:
    return [jnp.result_type(x) for x in jax.tree.leaves(tree)]
