"""``experiments/bench/bench_vs_torch.py``: finds PyTorch only where it is told to, and reports
honestly without it (the timing itself is a benchmark, not a test)."""

import sys

from experiments.bench import bench_vs_torch as bench


def test_no_torch_python_means_none(tmp_path, monkeypatch):
    monkeypatch.delenv("GCGD_TORCH_PYTHON", raising=False)
    assert bench._torch_python(None) is None
    assert bench._torch_python(str(tmp_path / "missing" / "python")) is None
    # A Python without torch (this venv has none: torch is never a dependency).
    try:
        import torch  # noqa: F401
    except ImportError:
        assert bench._torch_python(sys.executable) is None


def test_report_without_torch_has_no_ratio():
    rec = {
        "command": "python -m experiments.bench.bench_vs_torch",
        "date": "2026-12-01",
        "wall_s": 1.0,
        "machine": {"cpu": "c", "cores": 2, "platform": "x", "python": "3.11", "jax": "0.10.2"},
        "batch_size": 128,
        "rounds": 1,
        "steps_per_round": 1,
        "quick": False,
        "torch_found": False,
        "results": [
            {"variant": "jax_best", "parameters": 269722, "n": 1, "step_s_min": 0.2,
             "step_s_median": 0.2, "step_s_max": 0.2, "images_per_s": 640.0},
        ],
    }  # fmt: skip
    text = bench._markdown(rec)
    assert "| jax_best | 269,722 |" in text and "| n/a |" in text
    assert "PyTorch was not found" in text
    assert "- machine: c (2 cores), x, Python 3.11, jax 0.10.2" in text
