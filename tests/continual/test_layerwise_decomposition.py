"""``layerwise_gradient_decomposition``: the promises of each case of the official rule,
groups, masks and options (the rule itself is checked against the authors' code in
``test_parity.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcgd_jax.transforms.layerwise_decomposition import layerwise_gradient_decomposition
from tests.continual.common import apply, pad, random_case, runner

MARGIN = 0.5


def _analyse(g: np.ndarray, memory: np.ndarray, margin: float) -> dict:
    """Our NumPy reading of one group: which case applies and its numbers (float64)."""
    g, memory = g.astype(np.float64).ravel(), memory.astype(np.float64).reshape(len(memory), -1)
    s = memory.sum(0)
    _, sigma, vt = np.linalg.svd(memory - memory.mean(0), full_matrices=False)
    rank = min(int((sigma > sigma[0] * 1e-6).sum()), len(memory) - 1)
    u = vt[:rank]
    pg, ps = g - u.T @ (u @ g), s - u.T @ (u @ s)
    a, r = s @ pg, (s @ pg) / (s @ ps)
    if len(memory) == 1:
        case = "single"
    elif a > 0:
        case = "null_space"
    else:
        case = "orthogonal" if r < -margin else "margin"
    return {"case": case, "s": s, "u": u, "a": a, "r": r, "memory": memory, "g": g}


def test_each_case_keeps_its_promise():
    """Per group: the null-space and orthogonal cases increase no old task's loss to
    first order; the margin case protects only the sum (g_k'x = (r + m) s'g_k); one old
    task: g_1'x >= 0, and an agreeing update gains m g_1 (never the identity)."""
    update = runner(layerwise_gradient_decomposition)  # one program: K padded to 5
    seen = set()
    for seed, (num_tasks, drift) in enumerate(
        [(k, d) for k in (1, 3, 5) for d in (1.0, -0.3, -1.0, -4.0)]
    ):
        grads, memory = random_case(seed, num_tasks, drift=drift)
        out = update(grads, *pad(memory, 5), MARGIN)
        for name in grads:
            info = _analyse(grads[name], memory[name], MARGIN)
            x = np.asarray(out[name], np.float64).ravel()
            scale = np.linalg.norm(x) * np.linalg.norm(info["memory"], axis=1).max()
            dots = info["memory"] @ x  # g_k'x, one per old task
            tol = 1e-5 * scale
            seen.add(info["case"])
            if info["case"] == "single":
                s = info["s"]
                assert s @ x >= -tol
                if info["g"] @ s >= 0:  # no conflict: g + m s
                    np.testing.assert_allclose(x, info["g"] + MARGIN * s, rtol=1e-5, atol=tol)
            elif info["case"] == "null_space":
                assert np.all(
                    np.abs(info["u"] @ x) <= tol / np.linalg.norm(info["memory"], axis=1).max()
                )
                np.testing.assert_allclose(dots, info["a"] / num_tasks, rtol=1e-4, atol=tol)
                assert np.all(dots > 0)
            elif info["case"] == "orthogonal":
                np.testing.assert_allclose(dots, 0.0, atol=tol)
            else:  # margin: the sum is protected, single tasks are not
                r, s = info["r"], info["s"]
                np.testing.assert_allclose(s @ x, (r + MARGIN) * (s @ s), rtol=1e-4, atol=tol)
                np.testing.assert_allclose(
                    dots, (r + MARGIN) * (info["memory"] @ s), rtol=1e-4, atol=tol
                )
    assert seen == {"single", "null_space", "orthogonal", "margin"}


def test_no_memory_or_no_valid_task_is_the_identity():
    grads, memory = random_case(0, 5)
    tx = layerwise_gradient_decomposition()
    for out in (
        tx.update(grads, tx.init(grads))[0],
        runner(layerwise_gradient_decomposition)(grads, memory, np.zeros(5, bool), MARGIN),
    ):
        for k in grads:
            np.testing.assert_array_equal(out[k], grads[k])


def test_padding_masked_rows_and_task_order_change_nothing():
    grads, memory = random_case(1, 3)
    update = runner(layerwise_gradient_decomposition)
    expected = update(grads, *pad(memory, 5), MARGIN)
    rng = np.random.default_rng(0)
    interleaved = {
        k: np.concatenate([m[:1], rng.normal(size=(2, *m.shape[1:])), m[1:]]).astype(np.float32)
        for k, m in memory.items()
    }
    mask = np.array([True, False, False, True, True])
    reordered = {k: m[::-1] for k, m in memory.items()}
    for out in (
        update(grads, interleaved, mask, MARGIN),
        update(grads, *pad(reordered, 5, 1.0), MARGIN),
    ):
        for k in grads:
            np.testing.assert_allclose(out[k], expected[k], rtol=2e-5, atol=2e-6)


def test_groups_as_labels_runs_or_the_whole_network():
    grads, memory = random_case(2, 3)
    g, m = list(grads.values()), list(memory.values())  # a list: flattening order is ours
    run = lambda **kw: apply(layerwise_gradient_decomposition(**kw), g, m)
    by_two = run(groups=2)
    for out in (run(groups=["a", "a", "b"]), run(groups=lambda tree: ["x", "x", 3])):
        for a, b in zip(out, by_two):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    whole, same_label = run(layerwise=False), run(groups=[0, 0, 0])
    per_leaf, runs_of_one = run(), run(groups=1)
    for a, b, c, d in zip(whole, same_label, per_leaf, runs_of_one):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(c, d, rtol=1e-6, atol=1e-7)
    assert not np.allclose(whole[0], per_leaf[0])


def test_a_transposed_leaf_gives_the_transposed_update():
    grads, memory = random_case(3, 3, shapes=((4, 6),))
    tx = layerwise_gradient_decomposition()
    out = apply(tx, grads, memory)["l0"]
    flipped = apply(tx, {"l0": grads["l0"].T}, {"l0": memory["l0"].transpose(0, 2, 1)})["l0"]
    np.testing.assert_allclose(flipped.T, out, rtol=1e-5, atol=1e-6)


def test_num_components_keeps_the_leading_directions_only():
    grads, memory = random_case(4, 5, shapes=((40,),), drift=2.0)  # the null-space case
    assert _analyse(grads["l0"], memory["l0"], MARGIN)["case"] == "null_space"
    out = apply(layerwise_gradient_decomposition(num_components=1), grads, memory)["l0"]
    specific = memory["l0"] - memory["l0"].mean(0)
    _, _, vt = np.linalg.svd(specific.astype(np.float64), full_matrices=False)
    along = vt[:4] @ np.asarray(out, np.float64)
    assert abs(along[0]) < 1e-5 * np.linalg.norm(out) and np.all(np.abs(along[1:]) > 1e-3)


def test_a_group_spanned_by_the_task_specific_parts_stays_finite():
    """Four tasks on a 3-entry bias: P g = P s = 0 and the code's a and r are rounding
    noise; ours are 0, so the update is m s."""
    grads, memory = random_case(5, 4, shapes=((3,),))
    out = apply(layerwise_gradient_decomposition(MARGIN), grads, memory)["l0"]
    np.testing.assert_allclose(out, MARGIN * memory["l0"].sum(0), rtol=1e-4, atol=1e-4)


def test_bf16_and_non_float_leaves():
    grads, memory = random_case(6, 3)
    tree = {"w": jnp.asarray(grads["l0"], jnp.bfloat16), "step": np.arange(3, dtype=np.int32)}
    mem = {"w": jnp.asarray(memory["l0"], jnp.bfloat16), "step": None}
    out = apply(layerwise_gradient_decomposition(), tree, mem)
    assert out["w"].dtype == jnp.bfloat16 and out["step"] is tree["step"]
    ref = apply(
        layerwise_gradient_decomposition(),
        {"w": tree["w"].astype(jnp.float32)},
        {"w": mem["w"].astype(jnp.float32)},
    )
    np.testing.assert_allclose(np.asarray(out["w"], np.float32), ref["w"], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"memory_strength": -1.0}, "memory_strength"),
        ({"num_components": 0}, "num_components"),
        ({"num_components": 1.5}, "num_components"),
        ({"groups": 0}, "groups"),
        ({"layerwise": False, "groups": 2}, "groups"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layerwise_gradient_decomposition(**kwargs)


def test_memory_of_the_wrong_shape_is_refused():
    grads, memory = random_case(7, 3)
    tx = layerwise_gradient_decomposition()
    with pytest.raises(ValueError, match="memory_grads"):
        apply(tx, grads, {"l0": memory["l0"]})
    with pytest.raises(ValueError, match="same K"):
        apply(tx, grads, {**memory, "l1": memory["l1"][:2]})
    with pytest.raises(ValueError, match="memory_mask"):
        apply(tx, grads, memory, mask=np.ones(2, bool))
    with pytest.raises(ValueError, match="memory_mask"):
        apply(tx, grads, memory, mask=np.ones(3, np.int32))
    assert jax.tree.structure(apply(tx, grads, memory)) == jax.tree.structure(grads)
