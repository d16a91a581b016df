"""Our continual-learning corrections against the authors' own functions.

The fixtures (``parity/fixtures/*.npz``, made by ``parity/make_fixtures.py`` with the
command in its docstring) hold the results of grad-cl's ``project5cone5`` (and its
``pca1``/``pca3`` variants) on three block layouts, of GEM's ``project2cone2`` (quadprog)
and of grad-cl's ``agem`` and A-GEM baseline, on fixed float32 vectors: K = 1, 3, 5 old
tasks, conflicting and agreeing gradients, the six tensors of a small MLP.

Every case runs with five memory rows, those past its K filled with large noise and
masked out (so the mask is checked too). The references compute in float64: float32 runs
match to a few float32 rounding errors relative to the largest entry; float64 runs
(``jax.enable_x64``; the per-tensor layout, GEM and A-GEM) to a few float64 ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcgd_jax.transforms.agem import agem
from gcgd_jax.transforms.gem import gem
from gcgd_jax.transforms.layerwise_decomposition import layerwise_gradient_decomposition
from tests.continual.common import flat, load_fixture, runner, split

FIXTURES = {name: load_fixture(name) for name in ("layerwise_decomposition", "gem", "agem")}
TOLERANCE = {np.float32: 5e-6, np.float64: 1e-13}  # max |ours - theirs| / max |theirs|
K_MAX = 5
GROUPINGS = {"leaf": (), "group5": (("groups", 5),), "whole": (("layerwise", False),)}


def _setup(name: str, case: dict):
    """The factory, its static keywords and its (traced) numbers for one case."""
    if name == "layerwise_decomposition":
        static = GROUPINGS[case["grouping"]] + (("num_components", case["num_components"]),)
        return layerwise_gradient_decomposition, static, (case["memory_strength"],)
    return {"gem": gem, "agem": agem}[name], (), (case["memory_strength"], case["eps"])


def _padded(memory: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    num_tasks = memory.shape[0]
    noise = np.random.default_rng(num_tasks).normal(size=(K_MAX - num_tasks, memory.shape[1]))
    return np.concatenate([memory, (100 * noise).astype(memory.dtype)]), np.arange(
        K_MAX
    ) < num_tasks


def _errors(name: str, dtype, keep=lambda case: True) -> dict[str, float]:
    """Relative error of every (kept) case."""
    meta, arrays = FIXTURES[name]
    errors = {}
    for case_name, case in meta["cases"].items():
        if not keep(case):
            continue
        factory, static, numbers = _setup(name, case)
        grads = split(arrays[f"{case['input']}.grad"].astype(dtype), meta["shapes"])
        memory, mask = _padded(arrays[f"{case['input']}.memory"].astype(dtype))
        numbers = tuple(jnp.asarray(x, dtype) for x in numbers)
        out = runner(factory, static)(grads, split(memory, meta["shapes"]), mask, *numbers)
        assert all(o.dtype == dtype for o in out)
        expected = arrays[f"{case_name}.out"]
        errors[case_name] = float(np.max(np.abs(flat(out) - expected)) / np.max(np.abs(expected)))
    return errors


@pytest.mark.parametrize("name", list(FIXTURES))
def test_matches_the_official_code_in_float32(name):
    errors = _errors(name, np.float32)
    assert len(errors) == len(FIXTURES[name][0]["cases"])
    assert {k: e for k, e in errors.items() if not e <= TOLERANCE[np.float32]} == {}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_matches_the_official_code_in_float64(name):
    keep = functools.partial(_per_tensor, name)
    with jax.enable_x64(True):
        errors = _errors(name, np.float64, keep)
    assert errors and {k: e for k, e in errors.items() if not e <= TOLERANCE[np.float64]} == {}


def _per_tensor(name: str, case: dict) -> bool:
    """float64 runs: every GEM and A-GEM case, the layerwise ones with a block per tensor."""
    return name != "layerwise_decomposition" or (
        case["grouping"] == "leaf" and case["num_components"] is None
    )


def test_the_fixtures_cover_every_case_of_the_rules():
    layer = FIXTURES["layerwise_decomposition"][0]["cases"].values()
    branches = {b for case in layer for b in case["branches"]}
    assert branches == {"single_small", "single_large", "null_space", "margin", "orthogonal"}
    assert {c["num_tasks"] for c in layer} == {1, 3, 5}
    assert {c["grouping"] for c in layer} == {"leaf", "group5", "whole"}
    for name in ("gem", "agem"):
        cases = FIXTURES[name][0]["cases"].values()
        assert {c["conflict"] for c in cases} == {True, False}
        assert {c["num_tasks"] for c in cases} == {1, 3, 5}


def test_fixtures_name_their_command_and_commits():
    meta = FIXTURES["layerwise_decomposition"][0]
    assert meta["command"].endswith("make_fixtures.py --mirrors /work/.mirror")
    assert meta["references"]["grad-cl"]["commit"] == "dd0a1543c0defe6f41aeca481aa9859522d00689"
    assert meta["references"]["gem"]["commit"] == "34c6b8e9a0607db7567301c48b727430d20bee7e"
