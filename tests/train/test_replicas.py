"""Seed-parallel training (``run.seeds``): N replicas in one jitted step equal N single runs.

Tolerance: the replicas are batched (``replica_strategy = "vmap"``, grouped
convolutions), so their float sums are ordered differently from a single
run's: every loss and GC-ODE/GC-W metric of every epoch within relative 1e-4
(the difference measured over these 8 steps is ~1e-6), every accuracy within
one example. ``"unroll"`` runs the single run's kernels (slow test).
"""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcgd_jax.train import NonFiniteLossError, Trainer, load_config
from gcgd_jax.train.cli import main
from gcgd_jax.train.config import ConfigError
from gcgd_jax.train.report import read_metrics
from gcgd_jax.train.trainer import replica_config, replica_dir
from tests.train import test_trainer

TINY = [
    *test_trainer.TINY,  # ResNet-20 on 8x8 synthetic images, batch 8, 4 steps per epoch
    "optim.lr=0.01",  # at 0.05 one seed of this tiny problem amplifies rounding to 1e-3
    "train.epochs=2",
]
# GC-W (seeded predictor, per-replica state) + GC-ODE gradient mode (per-replica gates).
GCGD = ["corrections.chain=['gc_w']", "corrections.gc_w.warmup=2", "model.gc_ode.mode=gradient"]
COMPARED = ("train_loss", "test_loss", "gc_ode_loss", "gc_ode_gate", "gc_w_predictor_loss")
EXAMPLE = 1 / 16


def _cfg(*extra, seeds=(0, 1)):
    return load_config("quickstart", [*TINY, *extra, f"run.seeds={list(seeds)}"])


def _epochs(path):
    return [r for r in read_metrics(path / "metrics.jsonl") if r["kind"] == "epoch"]


def _assert_same_records(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a["skipped_steps"] == b["skipped_steps"]
        for key in COMPARED:
            assert (a.get(key) is None) == (b.get(key) is None), key
            if b.get(key) is not None:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-7, err_msg=key)
        for key in ("train_acc", "test_acc"):
            if b.get(key) is not None:
                assert abs(a[key] - b[key]) <= EXAMPLE + 1e-9, key


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """Two single GCGD runs, seeds 0 and 1."""
    root = tmp_path_factory.mktemp("sequential")
    cfg = _cfg(*GCGD)
    for seed in (0, 1):
        Trainer(replica_config(cfg, seed, root), stream=io.StringIO()).run()
    return root


def test_two_replicas_equal_two_sequential_runs(sequential, tmp_path):
    cfg = _cfg(*GCGD, "run.replica_strategy=vmap")
    summaries = Trainer(cfg, out_dir=tmp_path, stream=io.StringIO()).run()
    assert sorted(summaries) == [0, 1]
    for seed in (0, 1):
        got, want = replica_dir(tmp_path, seed), replica_dir(sequential, seed)
        _assert_same_records(_epochs(got), _epochs(want))
        assert summaries[seed]["replicas"] == 2 and summaries[seed]["status"] == "completed"
        # The replica's folder is a single run of its own seed.
        own = load_config(str(got / "config.toml"))
        assert own.run.seed == seed and own.run.seeds == ()
        assert (got / "run.log").read_text().count("epoch 2/2") == 1
    # The seeds really differ (not one replica copied).
    a, b = _epochs(replica_dir(tmp_path, 0)), _epochs(replica_dir(tmp_path, 1))
    assert a[-1]["train_loss"] != b[-1]["train_loss"]
    assert load_config(str(tmp_path / "config.toml")).run.seeds == (0, 1)


@pytest.mark.slow
def test_unrolled_replicas_equal_sequential_runs(sequential, tmp_path):
    cfg = _cfg(*GCGD, "run.replica_strategy=unroll")
    Trainer(cfg, out_dir=tmp_path, stream=io.StringIO()).run()
    for seed in (0, 1):
        _assert_same_records(
            _epochs(replica_dir(tmp_path, seed)), _epochs(replica_dir(sequential, seed))
        )


def _poison(trainer, i):
    """Makes the i-th replica's first kernel NaN, so every one of its steps is non-finite."""
    leaves, treedef = jax.tree.flatten(trainer.state.params)
    leaves[0] = leaves[0].at[i].set(jnp.nan)
    trainer.state = trainer.state._replace(params=jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_replica_does_not_touch_the_others(sequential, tmp_path, policy):
    cfg = _cfg(*GCGD, f"train.nan_policy={policy}", "run.replica_strategy=vmap")
    group = Trainer(cfg, out_dir=tmp_path, stream=io.StringIO())
    _poison(group, 1)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="seed\\(s\\) 1 stopped"):
            group.run()
    else:
        group.run()
    # Seed 0 trained exactly as alone.
    _assert_same_records(_epochs(replica_dir(tmp_path, 0)), _epochs(replica_dir(sequential, 0)))
    bad = read_metrics(replica_dir(tmp_path, 1) / "metrics.jsonl")
    if policy == "stop":
        assert bad[-1]["kind"] == "summary" and bad[-1]["status"] == "nonfinite"
        assert bad[-1]["step"] == 0
        assert (replica_dir(tmp_path, 1) / "checkpoints" / "0").is_dir()
        assert read_metrics(replica_dir(tmp_path, 0) / "metrics.jsonl")[-1]["status"] == "completed"
    else:
        epochs = [r for r in bad if r["kind"] == "epoch"]
        assert [r["skipped_steps"] for r in epochs] == [4, 4]
        assert all(r["train_loss"] is None for r in epochs)
        assert bad[-1]["nonfinite_steps"] == 8


def test_resume_after_a_stop_equals_an_uninterrupted_group(sequential, tmp_path):
    cfg = _cfg(*GCGD, "checkpoint.every_steps=2", "run.replica_strategy=vmap")
    Trainer(cfg, out_dir=tmp_path, stream=io.StringIO()).run(stop_at_step=5)
    assert all((replica_dir(tmp_path, s) / "checkpoints" / "4").is_dir() for s in (0, 1))
    stream = io.StringIO()
    Trainer(cfg, out_dir=tmp_path, resume=True, stream=stream).run()
    assert "resumed from checkpoint at step 4" in stream.getvalue()
    for seed in (0, 1):
        _assert_same_records(
            _epochs(replica_dir(tmp_path, seed)), _epochs(replica_dir(sequential, seed))
        )
    # Resuming a finished group does nothing and says so.
    stream = io.StringIO()
    again = Trainer(cfg, out_dir=tmp_path, resume=True, stream=stream)
    assert sorted(again.run()) == [0, 1]
    assert "already finished" in stream.getvalue()


def test_replicas_resume_from_their_common_checkpoint(tmp_path):
    cfg = _cfg("checkpoint.every_steps=2", "checkpoint.keep=3", "run.replica_strategy=vmap")
    Trainer(cfg, out_dir=tmp_path, stream=io.StringIO()).run(stop_at_step=7)
    # As if killed while seed 1's checkpoint of step 6 was being written.
    import shutil

    shutil.rmtree(replica_dir(tmp_path, 1) / "checkpoints" / "6")
    stream = io.StringIO()
    group = Trainer(cfg, out_dir=tmp_path, resume=True, stream=stream)
    group.run()
    assert "resuming all from step 4" in stream.getvalue()
    for seed in (0, 1):
        records = read_metrics(replica_dir(tmp_path, seed) / "metrics.jsonl")
        assert records[-1]["status"] == "completed" and records[-1]["resumed_from_step"] == 4


def test_one_replica_resumes_alone_as_a_single_run(tmp_path):
    cfg = _cfg("checkpoint.every_steps=2", "run.replica_strategy=vmap")
    Trainer(cfg, out_dir=tmp_path, stream=io.StringIO()).run(stop_at_step=5)
    assert main(["--out", str(replica_dir(tmp_path, 1)), "--resume", "--no-progress"]) == 0
    done = read_metrics(replica_dir(tmp_path, 1) / "metrics.jsonl")
    assert done[-1]["status"] == "completed" and done[-1]["resumed_from_step"] == 4


def test_cli_seeds(tmp_path, capsys):
    args = ["--config", "quickstart", *[f"--set={o}" for o in TINY]]
    assert main([*args, "--seeds", "3,5", "--print-config"]) == 0
    assert "seeds = [3, 5]" in capsys.readouterr().out
    assert main([*args, "--seeds", "3,x", "--print-config"]) == 2
    assert "--seeds: expected comma-separated integers" in capsys.readouterr().err
    assert main([*args, "--seeds", "1,1", "--print-config"]) == 2
    assert "run.seeds: each seed may appear once" in capsys.readouterr().err
    out = tmp_path / "group"
    code = main([*args, "--seeds", "0,1", "--set=run.replica_strategy=vmap", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "s0: final_test_acc" in printed and "s1: final_test_acc" in printed
    # The group resumes from its own config.toml.
    assert main(["--out", str(out), "--resume", "--no-progress"]) == 0
    # A folder holding a single run is not taken over.
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    assert main([*args, "--seeds", "0,1", "--out", str(single)]) == 2
    assert "holds a single run" in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main([*args, "--seeds", "0,1", "--out", str(a_file)]) == 2
    assert f"output folder {a_file} is a file" in capsys.readouterr().err


def test_config_errors():
    with pytest.raises(ConfigError, match="cannot be combined with run.distributed"):
        load_config("quickstart", ["run.seeds=[0, 1]", "run.distributed=true"])
    with pytest.raises(ConfigError, match="integers >= 0"):
        load_config("quickstart", ["run.seeds=[-1]"])


@pytest.mark.parametrize("name", ["gc_w", "gc_w_v2"])
def test_a_seeded_transform_updates_alike_for_every_seed(name):
    """The replicas share one update function: a seed may only reach ``tx.init``."""
    from gcgd_jax import methods

    factory = methods.get(name).load()
    params = {"w": jnp.ones((3, 3, 4, 8))}
    jaxprs, states = [], []
    for key in (0, 1):
        tx = factory(key=key)
        state = tx.init(params)
        states.append(state)
        jaxprs.append(str(jax.make_jaxpr(tx.update)(params, state, params)))
    assert jaxprs[0] == jaxprs[1]
    leaves = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(s)]) for s in states]
    assert not np.array_equal(*leaves)  # the seed does reach the initial state


def test_summary_json_roundtrip(tmp_path):
    """The group's summaries are plain JSON records (what experiments read)."""
    cfg = _cfg("train.epochs=1", "run.replica_strategy=vmap")
    summaries = Trainer(cfg, out_dir=tmp_path, stream=io.StringIO()).run()
    assert json.loads(json.dumps(summaries[1]))["final_test_acc"] is not None
