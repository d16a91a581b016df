"""Parity of the LocalMixer and the forward-gradient estimators with the authors' JAX code.

Reference: Ren, Kornblith, Liao and Hinton, "Scaling Forward Gradient With Local Losses"
(ICLR 2023), google-research/google-research @ 8d8a4f1 (``local_forward_gradient/``).
``tests/parity/make_estimator_fixtures.py`` ran their ``loss`` and ``update_*`` functions
on a small LocalMixer (4x4x3 images, batch 4, 2 blocks, 2x2 patches, 32 channels in 4
groups, 10 classes, every LayerNorm on, patchwise and groupwise local losses,
``wd=0``, ``last_layer_lr=1``) and stored their inputs, parameters, outputs and the
noise their estimators drew in ``fixtures_estimators/local_forward_gradient.npz``. These tests
need none of their code: they write the same parameters into our
:class:`~gcgd_jax.models.LocalMixer`, feed the same directions to our estimators and
compare.

**Parameter map.** Their list of ``(w, b)``: block 0 dense and grouped, then per later
block token, dense and grouped; one head per block; the read-out. Kernels have our
(Flax) layout already: dense ``(in, out)``, grouped ``(G, in, out)``. Their ``linear``
adds the bias *twice* on 3-D inputs (``einsum(...) + bias``, then ``output + bias``):
the token-mixing and dense channel layers compute ``x W + 2 b`` (:data:`DOUBLED_BIAS`),
so our bias is twice theirs. Their backprop then returns the gradient with respect to
their ``b``, twice ours; their FG-W, given the same perturbation of the network (our
direction ``2 db`` where theirs is ``db``), returns half of ours; their FG-A computes
the effective bias's gradient by hand (``sum grad_z``), equal to ours, so inside their
code backprop and FG-A differ by a factor 2 on these biases. The images go through
their ``preprocess`` (CIFAR-10 mean and std); ours get them normalised the same way.

**Same noise.** FG-W: our :func:`~gcgd_jax.estimators.weight_perturbation` gets their
weight noise as its direction (the sampler ``normal_like`` is replaced for the call;
the direction of a doubled bias is doubled, so the perturbed network is theirs). FG-A:
our engine :func:`~gcgd_jax.estimators.fg_activity.activity_estimate` takes their
activation noise through its ``sample`` argument. With one direction
(``num_passes=1``, ``num_directions=1``) the estimates must agree to float32 rounding,
not just in expectation.

**Measure.** Per leaf, the largest absolute difference between theirs and ours
(transformed as the check says), and that over the leaf's largest reference
magnitude (over the case's where the leaf is zero up to rounding, :data:`ZERO`: the
token-mixing bias, whose gradient the LayerNorm after that layer cancels); the
largest over leaves. A check *matches* when the relative difference is at most
:data:`RTOL`; a documented difference is at least :data:`DIFFERS`.

**What differs (documented, not bugs of ours).**

* The doubled bias above (theirs).
* Global FG-A (``update_global_forward_grad_activations``): their per-example losses
  are not divided by the batch size (``avg_batch=False``), so the blocks' estimate is
  B times the gradient of the mean loss, while the read-out's exact gradient is that of
  the mean; ours estimates the gradient of the mean (``loss_b / B`` credits).
* Their global estimators (FG-W and FG-A) still train the block heads, with exact
  gradients of the heads' local losses, though the global objective does not use
  them; ours leaves them at zero (``local=False``: the heads are unused).
* ``spatial_loss=False`` averages each group's loss terms over the patches where ours
  (``patchwise=False``) sums them: their FG-A estimate of every block layer is ours
  over P; their local backprop (``update_local_stopgrad_backprop``) then scales every
  block and head gradient by 1/P too (the read-out excepted), while ours is unaffected
  (``jax.grad`` of the block losses).
* Their ``last_layer_lr`` (default 0.1) scales the read-out's gradient inside every
  update, and their SGD weight decay (``wd``, default 1e-4, on kernels) is added inside
  the update: both are the optimizer's business here (fixture: 1 and 0).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gcgd_jax.estimators import Credited, weight_perturbation
from gcgd_jax.estimators.fg_activity import activity_estimate
from gcgd_jax.models import LocalMixer
from tests.parity import table as table_module

FIXTURE = Path(__file__).resolve().parent / "fixtures_estimators" / "local_forward_gradient.npz"
#: A check that matches has a relative difference at most this (float32).
RTOL = 1e-5
#: A check that documents a difference has a relative difference at least this.
DIFFERS = 1e-2
#: A leaf whose reference is below this fraction of the case's largest magnitude is zero
#: up to rounding (the token-mixing bias's gradient: the LayerNorm after that layer
#: cancels it); its difference is measured against the case's largest magnitude.
ZERO = 1e-5
#: Layers whose bias their ``linear`` adds twice (3-D inputs).
DOUBLED_BIAS = ("token", "channel")


# --------------------------------------------------------------------------- fixture


@functools.cache
def fixture() -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(FIXTURE) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def config() -> dict:
    return fixture()[0]["config"]


def layer_names() -> list[str]:
    """Our name (``nnx.state`` path) of each entry of their parameter list."""
    blocks = config()["num_blocks"]
    names = ["blocks/0/channel", "blocks/0/group"]
    for k in range(1, blocks):
        names += [f"blocks/{k}/token", f"blocks/{k}/channel", f"blocks/{k}/group"]
    return names + [f"heads/{k}" for k in range(blocks)] + ["readout"]


def num_main_layers() -> int:
    return 2 + 3 * (config()["num_blocks"] - 1)


def theirs(case: str) -> dict[str, np.ndarray]:
    """Their arrays of ``case`` (params, a gradient or the weight noise) by our path."""
    arrays = fixture()[1]
    out = {}
    for i, name in enumerate(layer_names()):
        if f"{case}.{i}.w" in arrays:
            out[f"{name}/kernel"] = arrays[f"{case}.{i}.w"]
            out[f"{name}/bias"] = arrays[f"{case}.{i}.b"]
    return out


def doubled(path: str) -> bool:
    return path.endswith("/bias") and path.split("/")[-2] in DOUBLED_BIAS


def path_name(path: tuple) -> str:
    keys = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        if key != "value":
            keys.append(str(key))
    return "/".join(keys)


def batch() -> tuple[jax.Array, jax.Array]:
    """Their images normalised as their ``preprocess`` does, and the labels."""
    arrays = fixture()[1]
    mean = jnp.asarray(arrays["inputs.image_mean"]).reshape((1, 1, 1, 3))
    std = jnp.asarray(arrays["inputs.image_std"]).reshape((1, 1, 1, 3))
    x = (jnp.asarray(arrays["inputs.image"]) - mean) / std
    return x, jnp.asarray(arrays["inputs.label"])


def model(*, local: bool = True, patchwise: bool = True) -> LocalMixer:
    """Our LocalMixer with their parameters (a doubled bias is twice theirs)."""
    cfg = config()
    mixer = LocalMixer(
        cfg["image_shape"],
        cfg["num_classes"],
        features=cfg["features"],
        num_blocks=cfg["num_blocks"],
        patches_per_side=cfg["patches_per_side"],
        num_groups=cfg["num_groups"],
        local=local,
        patchwise=patchwise,
        rngs=nnx.Rngs(0),
    )
    values = theirs("params")

    def value(path: tuple, leaf: jax.Array) -> jax.Array:
        name = path_name(path)
        v = values[name] * (2.0 if doubled(name) else 1.0)
        assert v.shape == leaf.shape, (name, v.shape, leaf.shape)
        return jnp.asarray(v, leaf.dtype)

    params = nnx.state(mixer, nnx.Param)
    nnx.update(mixer, jax.tree_util.tree_map_with_path(value, params))
    return mixer


def by_name(tree) -> dict[str, np.ndarray]:
    return {path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------- ours


def ours_forward() -> dict[str, np.ndarray]:
    x, y = batch()
    out = model().losses(x, y)
    found = {"logits": out.logits, "final_loss": jnp.mean(out.final_loss)}
    for k, terms in enumerate(out.replicated):
        found[f"local.{k}"] = terms
    return {k: np.asarray(v) for k, v in found.items()}


def ours_backprop(*, local: bool) -> dict[str, np.ndarray]:
    x, y = batch()
    graphdef, params = nnx.split(model(local=local), nnx.Param)
    grads = jax.grad(lambda p: nnx.merge(graphdef, p).losses(x, y).loss)(params)
    return by_name(grads)


def their_weight_noise() -> list[np.ndarray]:
    """Their FG-W directions in the order of our parameter leaves (a doubled bias's
    direction doubled: the same perturbation of the network); zero on the heads."""
    noise = theirs("noise.weights")
    params = nnx.state(model(), nnx.Param)
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        v = noise.get(name, np.zeros(leaf.shape, np.float32))
        leaves.append(jnp.asarray(v * (2.0 if doubled(name) else 1.0)))
    return leaves


def ours_fgw(*, local: bool, channel_credit: str = "group") -> dict[str, np.ndarray]:
    x, y = batch()
    graphdef, params = nnx.split(model(local=local), nnx.Param)

    def loss_fn(p, x, y):
        mixer = nnx.merge(graphdef, p)
        out = mixer.losses(x, y)
        if not local:
            return out.loss
        return Credited(out.loss, mixer.weight_credits(out, channel_credit=channel_credit))

    estimate = weight_perturbation(loss_fn, 1, exact=LocalMixer.head_mask)
    noise = their_weight_noise()
    with pytest.MonkeyPatch.context() as patch:  # their directions instead of our draw
        patch.setattr("gcgd_jax.estimators._common.normal_like", lambda key, tree: noise)
        _, grads = estimate(params, x, y, key=jax.random.key(0))
    return by_name(grads)


def tap_name(layer: str) -> str:
    _, k, kind = layer.split("/")
    return f"block{k}/{kind}"


def ours_fga(
    *, local: bool, patchwise: bool = True, mask_inactive: bool = True
) -> dict[str, np.ndarray]:
    x, y = batch()
    arrays = fixture()[1]
    noise = {
        tap_name(name): arrays[f"noise.activations.{i}"]
        for i, name in enumerate(layer_names()[: num_main_layers()])
    }

    def their_noise(key, primal, mixer, args, kwargs):
        return {n: jnp.asarray(noise[n]).reshape(z.shape) for n, z in primal.preactivations.items()}

    _, grads = activity_estimate(
        model(local=local, patchwise=patchwise),
        (x, y),
        {},
        jax.random.key(0),
        num_directions=1,
        sample=their_noise,
        mask_inactive=mask_inactive,
        needs_primal=False,
    )
    return by_name(grads)


# --------------------------------------------------------------------------- checks


def main_layer(path: str) -> bool:
    return path.startswith("blocks/")


@dataclasses.dataclass(frozen=True)
class Check:
    id: str
    case: str  # the fixture's case: their output
    ours: Callable[[], dict[str, np.ndarray]]
    what: str  # ours, in words
    # (path, ours) -> what theirs should be, and that relation in words
    expected: Callable[[str, np.ndarray], np.ndarray] = lambda path, value: value
    relation: str = "theirs = ours"
    leaves: Callable[[str], bool] = lambda path: True
    expect: str = "match"


def patches() -> int:
    return config()["patches_per_side"] ** 2


def grad_of_their_bias(path: str, value: np.ndarray) -> np.ndarray:
    """Their backprop differentiates with respect to b where the layer adds 2 b."""
    return 2.0 * value if doubled(path) else value


def estimate_of_their_bias(path: str, value: np.ndarray) -> np.ndarray:
    """Same perturbation of the network: our direction 2 db, theirs db."""
    return 0.5 * value if doubled(path) else value


def local_backprop_nospatial(path: str, value: np.ndarray) -> np.ndarray:
    if path.startswith("readout"):
        return value
    return grad_of_their_bias(path, value) / patches()


def fga_global(path: str, value: np.ndarray) -> np.ndarray:
    return value * config()["batch"] if main_layer(path) else value


def fga_nospatial(path: str, value: np.ndarray) -> np.ndarray:
    return value / patches() if main_layer(path) else value


def not_heads(path: str) -> bool:
    return not path.startswith("heads")


def channel_layers(path: str) -> bool:
    return "/channel/" in path


BIAS_2X = "theirs = ours (doubled biases: theirs = 2 x ours)"
BIAS_HALF = "theirs = ours (doubled biases: theirs = ours / 2)"
CHECKS = [
    Check("backprop", "backprop", lambda: ours_backprop(local=False),
          "`jax.grad` of `losses(x, y).loss`, `local=False`", grad_of_their_bias, BIAS_2X),
    Check("local_backprop", "local_backprop", lambda: ours_backprop(local=True),
          "`jax.grad` of `losses(x, y).loss`, `local=True`", grad_of_their_bias, BIAS_2X),
    Check("local_backprop_nospatial", "local_backprop_nospatial",
          lambda: ours_backprop(local=True), "`jax.grad` of `losses(x, y).loss`, `local=True`",
          local_backprop_nospatial, "blocks and heads: theirs = ours / P; read-out: equal"),
    Check("local_backprop_nospatial_raw", "local_backprop_nospatial",
          lambda: ours_backprop(local=True), "`jax.grad` of `losses(x, y).loss`, `local=True`",
          grad_of_their_bias, BIAS_2X, expect="differ"),
    Check("fgw_local", "fgw_local", lambda: ours_fgw(local=True),
          "`weight_perturbation` of `Credited(loss, weight_credits(out))`, "
          "`exact=LocalMixer.head_mask`", estimate_of_their_bias, BIAS_HALF),
    Check("fgw_local_block_credit", "fgw_local",
          lambda: ours_fgw(local=True, channel_credit="block"),
          'the same with `weight_credits(out, channel_credit="block")`',
          estimate_of_their_bias, BIAS_HALF + ", dense channel layers", channel_layers,
          expect="differ"),
    Check("fgw_global", "fgw_global", lambda: ours_fgw(local=False),
          "`weight_perturbation` of `loss`, `exact=LocalMixer.head_mask`, `local=False`",
          estimate_of_their_bias, BIAS_HALF + "; heads excluded", not_heads),
    Check("fga_local", "fga_local", lambda: ours_fga(local=True),
          "FG-A (`activity_estimate` with their noise), `local=True`"),
    Check("fga_local_unmasked", "fga_local", lambda: ours_fga(local=True, mask_inactive=False),
          "the same with `mask_inactive=False`", leaves=main_layer,
          relation="theirs = ours, blocks", expect="differ"),
    Check("fga_global", "fga_global", lambda: ours_fga(local=False),
          "FG-A (their noise), `local=False`", fga_global,
          "blocks: theirs = B x ours; read-out: equal; heads excluded", not_heads),
    Check("fga_global_raw", "fga_global", lambda: ours_fga(local=False),
          "FG-A (their noise), `local=False`", leaves=main_layer,
          relation="theirs = ours, blocks", expect="differ"),
    Check("fga_local_nospatial", "fga_local_nospatial",
          lambda: ours_fga(local=True, patchwise=False),
          "FG-A (their noise), `local=True, patchwise=False`", fga_nospatial,
          "blocks: theirs = ours / P; heads, read-out: equal"),
]  # fmt: skip


@dataclasses.dataclass
class Result:
    abs: float
    rel: float
    worst: str


def measure(reference: dict[str, np.ndarray], ours: dict[str, np.ndarray]) -> Result:
    scale = max(float(np.max(np.abs(v))) for v in reference.values())
    result = Result(0.0, 0.0, "")
    for path, ref in reference.items():
        diff = float(np.max(np.abs(ours[path] - ref)))
        magnitude = float(np.max(np.abs(ref)))
        rel = diff / (magnitude if magnitude > ZERO * scale else max(scale, 1e-30))
        result.abs = max(result.abs, diff)
        if rel >= result.rel:
            result.rel, result.worst = rel, path
    return result


@functools.cache
def compare(check: Check) -> Result:
    ours = check.ours()
    reference = {p: v for p, v in theirs(check.case).items() if check.leaves(p)}
    assert set(reference) <= set(ours), set(reference) - set(ours)
    expected = {p: check.expected(p, ours[p]) for p in reference}
    return measure(reference, expected)


# --------------------------------------------------------------------------- tests


def test_the_fixture_names_its_reference():
    meta = fixture()[0]
    assert meta["repository"] == "google-research/google-research"
    assert len(meta["commit"]) == 40 and meta["folder"] == "local_forward_gradient"
    assert "tests/parity/make_estimator_fixtures.py" in meta["command"]
    assert meta["flags"]["wd"] == 0.0 and meta["flags"]["last_layer_lr"] == 1.0
    assert set(meta["cases"]) == {c.case for c in CHECKS}, "a case without a check"
    assert FIXTURE.stat().st_size < 200_000


def test_the_parameter_map_covers_their_list_and_our_state():
    arrays = fixture()[1]
    assert sum(k.startswith("params.") for k in arrays) == 2 * len(layer_names())
    ours = by_name(nnx.state(model(), nnx.Param))
    assert set(ours) == set(theirs("params"))


def test_forward_logits_and_local_losses():
    arrays = fixture()[1]
    ours = ours_forward()
    for key, value in ours.items():
        ref = arrays[f"forward.{key}"]
        diff = np.max(np.abs(value - ref)) / np.max(np.abs(ref))
        assert diff <= RTOL, (key, diff)


@pytest.mark.parametrize("check", CHECKS, ids=[c.id for c in CHECKS])
def test_ours_against_the_official_code(check):
    result = compare(check)
    if check.expect == "match":
        assert result.rel <= RTOL, f"{check.id}: rel {result.rel:.3g} ({result.worst})"
    else:
        assert result.rel >= DIFFERS, f"{check.id} no longer differs: {result.rel:.3g}"


def test_their_global_estimators_train_the_heads_ours_do_not():
    """Their global FG-W / FG-A give the heads the exact gradient of their local losses
    (the same as in their local backprop); ours, with ``local=False``, zero."""
    local_heads = {p: v for p, v in theirs("local_backprop").items() if p.startswith("heads")}
    for case, ours in (
        ("fgw_global", ours_fgw(local=False)),
        ("fga_global", ours_fga(local=False)),
    ):
        heads = {p: v for p, v in theirs(case).items() if p.startswith("heads")}
        assert measure(local_heads, heads).rel <= RTOL, case
        assert all(not np.any(ours[p]) for p in heads), case


def table() -> str:
    """The checks as markdown rows (``python -m tests.parity.test_estimator_parity``)."""
    meta = fixture()[0]
    header = (
        "| check | theirs (`train_mixer_supervised.py`) | ours | compared as "
        "| max abs diff | max rel diff | expected |"
    )
    rows = [header, "|---|---|---|---|---|---|---|"]
    for check in CHECKS:
        result = compare(check)
        overrides = meta.get("overrides", {}).get(check.case, {})
        function = ", ".join(
            [f"`{meta['cases'][check.case]}`"] + [f"`{k}={v}`" for k, v in overrides.items()]
        )
        if check.expect == "match":  # rounded up to a power of ten, as the main table
            diffs = f"{table_module._bound(result.abs)} | {table_module._bound(result.rel)}"
        else:
            diffs = f"{result.abs:.2g} | {result.rel:.2g}"
        rows.append(
            f"| {check.id} | {function} | {check.what} | {check.relation} "
            f"| {diffs} | {check.expect} |"
        )
    return "\n".join(rows)


def test_the_docs_page_shows_the_table():
    """docs/parity.md shows every row of :func:`table` (figures as ``table._within``)."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "parity.md").read_text()
    shown = {
        table_module._cells(line)[0]: table_module._cells(line)
        for line in page.splitlines()
        if line.startswith("|")
    }
    stale = []
    for line in table().splitlines()[2:]:
        cells = table_module._cells(line)
        doc = shown.get(cells[0])
        same = (
            doc is not None
            and len(doc) == len(cells)
            and all(
                table_module._within(d, c) if i in (4, 5) else d == c
                for i, (d, c) in enumerate(zip(doc, cells))
            )
        )
        if not same:
            stale.append(line)
    assert not stale, (
        "docs/parity.md is out of date; paste the output of "
        "`python -m tests.parity.test_estimator_parity`:\n" + "\n".join(stale)
    )


if __name__ == "__main__":
    print(table())
