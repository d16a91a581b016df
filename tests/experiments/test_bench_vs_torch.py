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


def test_report_of_two_jax_environments_names_each():
    row = {"parameters": 269722, "n": 1, "step_s_min": 0.2, "step_s_median": 0.2,
           "step_s_max": 0.2, "images_per_s": 640.0}  # fmt: skip
    rec = {
        "command": "python -m experiments.bench.bench_vs_torch --jax-python a --jax-python b",
        "date": "2026-12-07",
        "wall_s": 1.0,
        "machine": {"cpu": "c", "cores": 2, "platform": "x", "python": "3.11", "jax": "0.10.2, 0.12.1",
                    "torch": "2.13.0", "torch_threads": 2},
        "jax_workers": [{"jax": "0.10.2", "jaxlib": "0.10.2", "python": "3.11.7"},
                        {"jax": "0.12.1", "jaxlib": "0.12.1", "python": "3.13.5"}],
        "batch_size": 128, "rounds": 1, "steps_per_round": 1, "quick": False, "torch_found": True,
        "results": [
            {"variant": "torch_channels_last", **row, "step_s_median": 0.1},
            {"variant": "jax_best (jaxlib 0.10.2)", **row},
            {"variant": "jax_best (jaxlib 0.12.1)", **row, "step_s_median": 0.25},
        ],
    }  # fmt: skip
    text = bench._markdown(rec)
    assert (
        "- JAX environments: jax 0.10.2 / jaxlib 0.10.2 on Python 3.11.7; "
        "jax 0.12.1 / jaxlib 0.12.1 on Python 3.13.5"
    ) in text
    assert "| jax_best (jaxlib 0.10.2) | 269,722 |" in text and "| 0.50x |" in text
    assert "| jax_best (jaxlib 0.12.1) | 269,722 |" in text and "| 0.40x |" in text
