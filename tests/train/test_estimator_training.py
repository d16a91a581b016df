"""Training with a forward-mode gradient estimate (``gradient.estimator``): the step's
estimate is the estimator's (unbiased where it should be), runs from the command line with
every estimator, resumes exactly, runs on two devices and seed-parallel like one run, and
bad settings fail before any data is read.

Models are tiny (an MLP on 4x4 or 8x8 synthetic images, a LocalMixer of 8 features), so a
run costs a compile and a second.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gcgd_jax import methods
from gcgd_jax.models import MLP, LocalMixer
from gcgd_jax.train import Trainer, load_config
from gcgd_jax.train.cli import main
from gcgd_jax.train.config import ConfigError
from gcgd_jax.train.optim import build_optimizer
from gcgd_jax.train.report import read_metrics
from gcgd_jax.train.step import StepOptions, TrainState, make_grad_fn
from tests.devices import rerun_with_two_devices
from tests.train.test_trainer import _strip_timing

ESTIMATORS = methods.config_values("estimator")
TINY = [
    "data.name=synthetic",
    "data.synthetic_image_shape=[8, 8, 1]",
    "data.synthetic_train_size=32",
    "data.synthetic_test_size=16",
    "data.batch_size=8",
    "optim.lr=0.01",
    "optim.momentum=0",
    "log.progress=false",
    "model.name=mlp",
    "model.hidden_features=[16, 16]",
]


# ----------------------------------------------------------------------------- the step


def _state(model: nnx.Module, rng: jax.Array) -> TrainState:
    _, params, rest = nnx.split(model, nnx.Param, ...)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(params, rest, (), zero, rng, zero, jnp.zeros((), bool))


def _estimates(model, opts: StepOptions, images, labels, draws: int):
    """The backprop gradient of the step's loss and ``draws`` estimates of it by the step's
    gradient function, each with another run key (as successive runs would draw)."""
    graphdef = nnx.graphdef(model)
    exact_fn = make_grad_fn(graphdef, dataclasses.replace(opts, estimator="backprop"))
    estimate_fn = make_grad_fn(graphdef, opts)
    exact, _ = exact_fn(_state(model, jax.random.PRNGKey(0)), images, labels, None)

    def one(i):
        grads, aux = estimate_fn(_state(model, jax.random.PRNGKey(i)), images, labels, None)
        return grads, aux.total_loss

    grads, losses = jax.jit(jax.vmap(one))(jnp.arange(draws))
    return exact, grads, losses


def _z_scores(exact, draws) -> dict[str, np.ndarray]:
    """Per element: (mean of the estimates - gradient) / (their standard error); N(0, 1)
    for an unbiased estimator (an element with no noise at all: 0 when exact, inf if not)."""
    out = {}
    for path, e in jax.tree_util.tree_leaves_with_path(exact):
        g = np.asarray(_leaf(draws, path), np.float64)
        err = g.mean(0) - np.asarray(e, np.float64)
        se = g.std(0) / np.sqrt(len(g))
        out[jax.tree_util.keystr(path)] = np.where(
            se > 0, err / np.where(se > 0, se, 1), np.where(np.abs(err) < 1e-6, 0, np.inf)
        )
    return out


def _assert_standard_normal(z: dict[str, np.ndarray]) -> None:
    pooled = np.concatenate([s.ravel() for s in z.values()])
    rms = float(np.sqrt(np.mean(pooled**2)))
    worst = max(z, key=lambda n: np.abs(z[n]).max())
    assert 0.8 < rms < 1.25, rms
    assert np.abs(z[worst]).max() < 5, (worst, np.abs(z[worst]).max())


def _leaf(tree, path):
    return dict(jax.tree_util.tree_leaves_with_path(tree))[path]


def _batch(shape, classes, n=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    return jnp.asarray(images), jnp.asarray(rng.integers(0, classes, n), jnp.int32)


@pytest.mark.parametrize("estimator", ["weight_perturbation", "activity_perturbation"])
def test_the_steps_estimate_is_unbiased_on_an_mlp(estimator):
    """The train step's gradient under FG-W / FG-A is unbiased for the backprop gradient of
    the same loss: over 4,000 run keys, every element's z-score (error of the mean over its
    standard error) is a standard normal draw: their root mean square over the model's 403
    elements within [0.8, 1.25] and none beyond 5 (a bias of a tenth of an element's
    standard deviation would put its z-score near 6)."""
    model = MLP(16, (16,), 3, rngs=nnx.Rngs(0))
    opts = StepOptions(mean=(0.5,), std=(0.25,), estimator=estimator)
    images, labels = _batch((4, 4, 1), 3)
    exact, draws, losses = _estimates(model, opts, images, labels, 4000)
    _assert_standard_normal(_z_scores(exact, draws))
    np.testing.assert_allclose(losses, losses[0], rtol=1e-6)  # the unperturbed loss


def test_local_mixer_weight_perturbation_uses_its_credits_and_exact_heads():
    """LG-FG-W through the step: with the unbiased block credit (``gradient.channel_credit =
    "block"``) the estimate is unbiased for local backprop's gradient (z-scores as for the
    MLP), the heads and the read-out are trained by their exact local gradient (no noise);
    the official per-group credit of the dense channel layer is biased (its z-scores
    beyond a standard normal's; 2.2 measured)."""
    model = LocalMixer(
        (4, 4, 1), 3, features=8, num_blocks=2, patches_per_side=2, num_groups=2,
        rngs=nnx.Rngs(1),
    )  # fmt: skip
    images, labels = _batch((4, 4, 1), 3)
    z = {}
    for credit in ("block", "group"):
        opts = StepOptions(
            mean=(0.5,), std=(0.25,), estimator="weight_perturbation", channel_credit=credit
        )
        exact, draws, _ = _estimates(model, opts, images, labels, 3000)
        z[credit] = _z_scores(exact, draws)
    heads = {n: s for n, s in z["block"].items() if "heads" in n or "readout" in n}
    assert heads and all(np.all(s == 0) for s in heads.values())  # exact
    _assert_standard_normal({n: s for n, s in z["block"].items() if n not in heads})
    channel = [s for name, s in z["group"].items() if "channel" in name and "kernel" in name]
    # 64 elements a kernel: an unbiased estimate's rms z-score is 1 +- 0.09 (one sd)
    assert channel and max(float(np.sqrt(np.mean(s**2))) for s in channel) > 1.6, channel


def test_the_estimators_directions_change_every_step_and_leave_augmentation_alone():
    """Two steps of one run draw different directions; a backprop run's augmentation key is
    unchanged by the estimator stream (its key is folded from it, not split off)."""
    model = MLP(16, (8,), 3, rngs=nnx.Rngs(0))
    opts = StepOptions(mean=(0.5,), std=(0.25,), estimator="activity_perturbation")
    grad_fn = jax.jit(make_grad_fn(nnx.graphdef(model), opts))
    images, labels = _batch((4, 4, 1), 3)
    state = _state(model, jax.random.PRNGKey(0))
    g0, _ = grad_fn(state, images, labels, None)
    g1, _ = grad_fn(state._replace(step=jnp.ones((), jnp.int32)), images, labels, None)
    g0_again, _ = grad_fn(state, images, labels, None)
    leaves = zip(jax.tree.leaves(g0), jax.tree.leaves(g1), jax.tree.leaves(g0_again))
    for a, b, c in leaves:
        np.testing.assert_array_equal(a, c)
        assert not np.allclose(a, b)


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_estimator_trains_from_the_command_line(estimator, tmp_path, capsys):
    out = tmp_path / estimator
    args = [a for s in TINY for a in ("--set", s)]
    code = main(
        [*args, "--set", f"gradient.estimator={estimator}", "--set", "gradient.num_directions=2",
         "--set", "train.epochs=2", "--set", "checkpoint.enabled=false", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    first, second, summary = read_metrics(out / "metrics.jsonl")
    assert summary["status"] == "completed" and summary["nonfinite_steps"] == 0
    assert second["train_loss"] < first["train_loss"], (first, second)
    assert (out / "config.toml").read_text().count(f'estimator = "{estimator}"') == 1


def test_local_mixer_runs_with_the_official_optimizer_settings(tmp_path):
    """LG-FG-A on a LocalMixer with Ren et al.'s optimizer choices: the read-out's gradient
    times 0.1, weight decay on every kernel (the grouped 3-D ones included), linear decay."""
    cfg = load_config(
        None,
        [
            *TINY[:-2],
            "model.name=local_mixer",
            "model.mixer=M/1/16",
            "gradient.estimator=activity_perturbation",
            'optim.gradient_scale_params=["readout"]',
            "optim.gradient_scale=0.1",
            "optim.weight_decay=1e-4",
            "optim.weight_decay_on=kernels",
            "optim.schedule=linear",
            "train.epochs=2",
            "checkpoint.enabled=false",
        ],
    )
    trainer = Trainer(cfg, out_dir=tmp_path / "run")
    (summary,) = trainer.run().values()
    assert summary["status"] == "completed"
    epochs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["lr"] == pytest.approx(0.01 / 8)  # linear decay to 0: the last step's


def test_gradient_scale_multiplies_the_named_parameters_gradient_only():
    cfg = load_config(
        None,
        ["optim.momentum=0", 'optim.gradient_scale_params=["readout"]', "optim.gradient_scale=0.1",
         "optim.schedule=constant", "optim.lr=1.0"],
    )  # fmt: skip
    model = LocalMixer.from_config("S/1/1", image_shape=(4, 4, 1), num_classes=3, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx = build_optimizer(cfg, params=params, model=model, total_steps=10, steps_per_epoch=5).tx
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        expected = -0.1 if "readout" in jax.tree_util.keystr(path) else -1.0
        np.testing.assert_allclose(u, expected, rtol=1e-6)
    bad = load_config(None, ['optim.gradient_scale_params=["head"]', "optim.gradient_scale=0.1"])
    with pytest.raises(ConfigError, match=r"no parameters named \['head'\].*'readout'"):
        build_optimizer(bad, params=params, model=model, total_steps=10, steps_per_epoch=5)


def test_weight_decay_on_kernels_includes_grouped_kernels():
    cfg = load_config(None, ["optim.weight_decay=0.5", "optim.weight_decay_on=kernels",
                             "optim.momentum=0", "optim.lr=1.0", "optim.schedule=constant"])  # fmt: skip
    model = LocalMixer.from_config("M/1/16", image_shape=(4, 4, 1), num_classes=3, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tx = build_optimizer(cfg, params=params, model=model, total_steps=10, steps_per_epoch=5).tx
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params)):
        expected = -0.5 * p if p.ndim >= 2 else jnp.zeros_like(p)
        np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert any(p.ndim == 3 for p in jax.tree.leaves(params))  # the grouped layers


def test_linear_schedule_decays_to_the_final_fraction():
    from gcgd_jax.train.optim import build_schedule

    optim = load_config(None, ["optim.schedule=linear", "optim.final_lr_fraction=0.1"]).optim
    schedule = build_schedule(optim, total_steps=11, warmup_steps=1)
    assert float(schedule(0)) == 0.0 and float(schedule(1)) == pytest.approx(0.1)
    assert float(schedule(6)) == pytest.approx(0.055) and float(schedule(11)) == pytest.approx(0.01)


def test_an_estimator_run_resumes_exactly(tmp_path):
    """Killed after step 5 of 8 (newest checkpoint at step 4), resumed: the same metrics and
    parameters as an uninterrupted run (the directions are keyed by the run key and step)."""
    overrides = [*TINY, "gradient.estimator=activity_perturbation", "train.epochs=2",
                 "checkpoint.every_steps=2"]  # fmt: skip
    cfg = load_config(None, overrides)
    a = Trainer(cfg, out_dir=tmp_path / "a")
    a.run()
    b = Trainer(cfg, out_dir=tmp_path / "b")
    b.run(stop_at_step=5)
    c = Trainer(cfg, out_dir=tmp_path / "b", resume=True)
    (summary,) = c.run().values()
    assert summary["resumed_from_step"] == 4
    a_records = read_metrics(tmp_path / "a" / "metrics.jsonl")
    c_records = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert _strip_timing(c_records) == _strip_timing(a_records)
    for x, y in zip(
        jax.tree.leaves(a.replica_state().params), jax.tree.leaves(c.replica_state().params)
    ):
        np.testing.assert_array_equal(x, y)


def test_seed_parallel_estimator_runs_equal_single_runs(tmp_path):
    """run.seeds = [0, 1] (one jitted step, unrolled replicas) gives each seed the run it gets
    alone: the same per-epoch metrics to float32 rounding (rel. 1e-5)."""
    overrides = [*TINY, "gradient.estimator=guess_activation_mixing", "checkpoint.enabled=false"]
    Trainer(load_config(None, [*overrides, "run.seeds=[0, 1]"]), out_dir=tmp_path / "g").run()
    for seed in (0, 1):
        Trainer(
            load_config(None, [*overrides, f"run.seed={seed}"]), out_dir=tmp_path / f"s{seed}"
        ).run()
        group = _strip_timing(read_metrics(tmp_path / "g" / f"s{seed}" / "metrics.jsonl"))
        alone = _strip_timing(read_metrics(tmp_path / f"s{seed}" / "metrics.jsonl"))
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            np.testing.assert_allclose(group[0][key], alone[0][key], rtol=1e-5, err_msg=key)


def test_two_devices_estimate_like_one(tmp_path):
    """The batch split over 2 devices, the state replicated: the same directions (one key) and
    the same estimate up to the order of float32 sums (metrics within rel. 1e-5)."""
    if rerun_with_two_devices(
        __file__, "test_two_devices_estimate_like_one"
    ):  # e.g. the user set XLA_FLAGS
        return
    records = {}
    for n in (1, 2):
        cfg = load_config(
            None,
            [*TINY, f"run.num_devices={n}", "gradient.estimator=weight_perturbation",
             "gradient.num_directions=3", "checkpoint.enabled=false"],
        )  # fmt: skip
        trainer = Trainer(cfg, out_dir=tmp_path / f"d{n}")
        trainer.run()
        assert len(trainer.devices) == n
        records[n] = read_metrics(tmp_path / f"d{n}" / "metrics.jsonl")[0]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        np.testing.assert_allclose(records[2][key], records[1][key], rtol=1e-5, err_msg=key)


def test_a_resnet_trains_with_weight_perturbation(tmp_path):
    """FG-W works on any model: a ResNet-20 (built with XLA's own convolutions, which jax.jvp
    can differentiate) with BatchNorm statistics updated by the unperturbed pass."""
    cfg = load_config(
        None,
        [*TINY[:-2], "gradient.estimator=weight_perturbation", "checkpoint.enabled=false",
         "corrections.chain=centralize"],
    )  # fmt: skip
    trainer = Trainer(cfg, out_dir=tmp_path / "r")
    before = jax.tree.leaves(trainer.replica_state().rest)
    (summary,) = trainer.run().values()
    assert summary["status"] == "completed" and summary["nonfinite_steps"] == 0
    after = jax.tree.leaves(trainer.replica_state().rest)
    assert any(not np.allclose(a, b) for a, b in zip(before, after))  # BatchNorm moved


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["gradient.estimator=activity_perturbation"],
         "perturbs pre-activations, which resnet20 does not expose"),
        (["gradient.estimator=forward"], "gradient.estimator: unknown value 'forward'"),
        (["model.name=mlp", "gradient.estimator=weight_perturbation", "gradient.num_directions=0"],
         "gradient.num_directions: must be >= 1"),
        (["model.name=local_mixer", "gradient.estimator=guess_transpose"],
         "only model.name = 'mlp' has, not local_mixer"),
        (["gradient.estimator=weight_perturbation", "loss.penalty=gradient_norm"],
         "cannot be combined with loss.penalty"),
        (["gradient.estimator=weight_perturbation", "model.gc_ode.mode=gradient"],
         "GC-ODE and model.backward_grad_norm"),
        (["data.name=mnist", "model.name=local_mixer", "model.mixer=M/8/16"],
         "its 8 x 8 patches do not tile mnist's 28 x 28 images"),
        (["model.name=local_mixer", "model.mixer=M/2/16"], "model.mixer: unknown value"),
        (["model.name=mlp", "model.gc_ode.mode=gradient"], "model.gc_ode: only for the ResNets"),
        (["model.name=mlp", "run.fusion_breaker=on"], "only the ResNets place it"),
        (["model.name=local_mixer", "loss.name=powergrad"], "trains on its own"),
        (["optim.gradient_scale=0.1"], "optim.gradient_scale_params, which is empty"),
    ],
)  # fmt: skip
def test_bad_estimator_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_bad_estimator_setting_fails_before_any_data_is_read(tmp_path, capsys):
    """The CLI exits 2 with the error; the data folder it names does not even exist."""
    code = main(
        ["--set", "data.name=mnist", "--set", f"data.data_dir={tmp_path / 'missing'}",
         "--set", "gradient.estimator=activity_perturbation", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "perturbs pre-activations" in err and "missing" not in err
    assert not (tmp_path / "o").exists()


def test_estimator_registry_entries_name_their_calling_convention():
    for method in methods.methods_of_kind("estimator"):
        assert method.perturbs in ("weights", "activities"), method
        assert method.config_key == "gradient.estimator"
