"""Parity with the authors' code: ours against the committed outputs of their implementations.

The fixtures come from ``tests/parity/make_fixtures.py`` (PyTorch, the reference code at
pinned commits); these tests need no PyTorch. A check that "matches" has a norm-wise
relative difference (largest absolute difference over the reference's largest
magnitude, per leaf and step) of at most ``table.RTOL`` = 1e-5 in float32; a check
that documents a difference has one of at least ``table.DIFFERS`` = 1e-2.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gcgd_jax.gradients.gradient_norm_penalty import gradient_norm_penalty
from gcgd_jax.transforms.mars_correction import mars_correction
from tests.parity import table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("check", table.CHECKS, ids=[c.id for c in table.CHECKS])
def test_ours_against_the_reference(check):
    result = table.compare(check)
    if check.expect == "match":
        assert result.rel <= table.RTOL, f"{check.ours}: rel {result.rel:.3g} abs {result.abs:.3g}"
        assert result.nan_reference_zero, f"{check.ours}: not 0 where the reference is NaN"
    else:
        assert result.rel >= table.DIFFERS, f"{check.ours} no longer differs: {result.rel:.3g}"


@pytest.mark.parametrize("method", sorted(p.stem for p in table.FIXTURES.glob("*.npz")))
def test_every_fixture_names_its_reference_and_is_checked(method):
    meta = table.meta(method)
    assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"]), meta["commit"]
    assert meta["repository"].count("/") == 1 and meta["files"]
    assert "tests/parity/make_fixtures.py --mirrors /work/.mirror" in meta["command"]
    if method == "gradient_norm_penalty":  # the official code is JAX
        assert meta["jax"] and len(table.leaves(method, "inputs")["x"]) >= 10
    else:
        assert meta["torch"] and meta["layout"] == "pytorch"
        assert meta["steps"] >= 10 and min(meta["scales"]) < 0.01 and max(meta["scales"]) > 1
    checked = {c.case for c in table.CHECKS if c.method == method}
    assert checked == set(meta["cases"]), "a fixture case without a check, or the reverse"


def test_the_layout_translation_round_trips():
    for x in (np.arange(6 * 4 * 9.0).reshape(6, 4, 3, 3), np.arange(10.0).reshape(5, 2)):
        flax = table.to_flax("w", x)
        assert flax.shape[-1] == x.shape[0]  # output units last
        np.testing.assert_array_equal(table.to_torch("w", flax), x)


def test_mars_initial_prev_grad_zeros_is_the_official_first_step():
    g = {"w": jnp.array([[0.3, -0.1], [0.2, 0.05]])}  # norm < 1 before and after
    coef = 0.025 * 0.95 / 0.05
    official, _ = mars_correction(initial_prev_grad="zeros").update(
        g, mars_correction(initial_prev_grad="zeros").init(g)
    )
    ours, _ = mars_correction().update(g, mars_correction().init(g))
    np.testing.assert_allclose(official["w"], (1 + coef) * g["w"], rtol=1e-6)
    np.testing.assert_allclose(ours["w"], g["w"], rtol=1e-6)


def test_mars_initial_prev_grad_is_checked():
    with pytest.raises(ValueError, match="initial_prev_grad"):
        mars_correction(initial_prev_grad="zero")


def test_gradient_norm_penalty_normalized_unperturbed_term():
    loss = lambda w: 0.5 * jnp.sum(w**2)  # gradient w, Hessian identity
    w = jnp.array([3.0, 4.0])
    _, g = gradient_norm_penalty(loss, radius=0.1, alpha=0.5, unperturbed_term="normalized")(w)
    unit = w / 5.0
    np.testing.assert_allclose(g, 0.5 * unit + 0.5 * (w + 0.1 * unit), rtol=1e-6)
    _, zero = gradient_norm_penalty(loss, unperturbed_term="normalized")(jnp.zeros(2))
    np.testing.assert_array_equal(zero, 0.0)  # no NaN at a zero gradient
    with pytest.raises(ValueError, match="unperturbed_term"):
        gradient_norm_penalty(loss, unperturbed_term="unit")


def test_the_docs_page_shows_the_table():
    page = (ROOT / "docs" / "parity.md").read_text()
    problems = table.mismatches(page)
    assert not problems, (
        "docs/parity.md is out of date; paste the output of `python -m tests.parity.table`:\n"
        + "\n".join(problems)
    )
