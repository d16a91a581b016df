"""Metrics file, optional TensorBoard, progress bar and summary table (no JAX)."""

import io

import pytest

from gcgd_jax.train.report import MetricsWriter, ProgressBar, read_metrics, summary_table


def test_resume_cuts_records_written_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path)
    for step in (4, 8, 12):
        w.write({"kind": "epoch", "step": step, "test_acc": step / 100})
    w.write({"kind": "summary", "step": 12})
    with path.open("a") as f:
        f.write('{"kind": "epoch", "st')  # a line cut off by a killed process
    assert [r["step"] for r in read_metrics(path)] == [4, 8, 12, 12]
    MetricsWriter(path, resume_step=8)
    assert read_metrics(path) == [
        {"kind": "epoch", "step": 4, "test_acc": 0.04},
        {"kind": "epoch", "step": 8, "test_acc": 0.08},
    ]
    MetricsWriter(path)  # a new run starts an empty file
    assert read_metrics(path) == []


def test_tensorboard_without_a_writer_package_is_an_error(tmp_path, monkeypatch):
    from gcgd_jax.train import report

    monkeypatch.setattr(report, "_tensorboard_module", lambda: None)
    assert not report.tensorboard_available()
    with pytest.raises(RuntimeError, match=r"pip install 'gcgd-jax\[tensorboard\]'"):
        MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=True)


def _events(logdir):
    """(tag, step, value) of every scalar in the event files under ``logdir`` (TFRecord)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            record = data[pos + 12 : pos + 12 + length]  # after length + its crc
            pos += 12 + length + 4  # + the record's crc
            event = event_pb2.Event.FromString(record)
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_events_are_written_and_read_back(tmp_path):
    pytest.importorskip("tensorboardX")
    w = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=True)
    w.scalars(10, {"loss": 2.5, "lr": 0.1})
    w.write({"kind": "epoch", "step": 32, "train_loss": 1.5, "test_acc": 0.25})
    w.close()
    events = _events(tmp_path / "tensorboard")
    assert ("step/loss", 10, 2.5) in events and ("step/lr", 10, pytest.approx(0.1)) in events
    assert ("train_loss", 32, 1.5) in events and ("test_acc", 32, 0.25) in events


def test_a_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "metrics.jsonl", enabled=False)
    w.write({"kind": "epoch", "step": 1})
    w.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_progress_bar_in_a_log_file_prints_every_tenth():
    stream = io.StringIO()
    bar = ProgressBar(100, 128, "epoch 1/3", stream=stream)
    for done in range(1, 101):
        bar.update(done, loss=2.0, images_per_s=256.0)
    bar.close("done")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1] == "done"
    assert (
        lines[0].startswith("epoch 1/3 [") and "256.0 img/s | loss 2.0000 | ETA 00:45" in lines[0]
    )
    assert "100/100" in lines[-2] and "ETA 00:00" in lines[-2]
    quiet = io.StringIO()
    ProgressBar(10, 1, "x", enabled=False, stream=quiet).update(5, 1.0, 1.0)
    assert quiet.getvalue() == ""


def test_summary_table():
    records = [
        {
            "epoch": 1,
            "step": 4,
            "lr": 0.1,
            "train_loss": 2.0,
            "train_acc": 0.25,
            "val_loss": 1.5,
            "val_acc": 0.5,
            "images_per_s": 300.0,
            "epoch_time": 12.0,
        },
        {"epoch": 2, "step": 8, "lr": 0.01, "train_loss": 1.0, "train_acc": 0.5},
    ]
    table = summary_table(records, "val").splitlines()
    assert table[0].split() == [
        "epoch",
        "step",
        "lr",
        "train",
        "loss",
        "train",
        "acc",
        "val",
        "loss",
        "val",
        "acc",
        "img/s",
        "time",
        "s",
    ]
    assert table[2].split() == [
        "1",
        "4",
        "0.1",
        "2.0000",
        "0.2500",
        "1.5000",
        "0.5000",
        "300.0",
        "12.0",
    ]
    assert table[3].split()[-4:] == ["-", "-", "-", "-"]
