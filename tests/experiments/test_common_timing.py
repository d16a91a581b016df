"""experiments.common.timing and .results: the side-by-side timing protocol and results I/O
that every benchmark uses."""

import json
import sys

import pytest

from experiments import REPO
from experiments.common.results import command, utc_now, write
from experiments.common.timing import Worker, alternate, rounds, summary, timed

_ECHO = """
from experiments.common.timing import serve
serve(lambda req: {"twice": 2 * req["x"]}, hello={"ready": True, "who": "echo"})
"""

# A worker whose answers print to standard output, from Python and below it (as XLA's or
# a profiler's C code would).
_NOISY = """
import os
from experiments.common.timing import serve

def answer(req):
    print("stray Python print")
    os.write(1, b"stray C-level write\\n")
    return {"twice": 2 * req["x"]}

serve(answer, hello={"ready": True})
"""


def test_rounds_visit_every_variant_once_per_round_starting_one_further_each_round():
    got = list(rounds(["a", "b", "c"], 4))
    assert [v for r, v in got if r == 0] == ["a", "b", "c"]
    assert [v for r, v in got if r == 1] == ["b", "c", "a"]
    assert [v for r, v in got if r == 3] == ["a", "b", "c"]
    assert len(got) == 12 and list(rounds([], 3)) == []


def test_summary_is_min_median_max_and_throughput_at_the_median():
    s = summary([0.4, 0.1, 0.2, 0.3], batch=128)
    assert s == {"n": 4, "step_s_min": 0.1, "step_s_median": 0.25, "step_s_max": 0.4,
                 "images_per_s": 128 / 0.25}  # fmt: skip
    assert summary([0.4, 0.1, 0.2, 0.3]) == {k: v for k, v in s.items() if k != "images_per_s"}
    with pytest.raises(ValueError, match="no step times"):
        summary([], batch=1)


def test_alternate_measures_in_rotated_rounds_and_pools_per_variant(capsys):
    calls = []

    def measure(r, v):
        calls.append((r, v))
        return [10 * r + len(calls)]  # one "step time" per measurement

    times = alternate(["a", "b", "c"], 2, measure, describe=str.upper)
    assert calls == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a")]
    assert times == {"a": [1, 16], "b": [2, 14], "c": [3, 15]}
    assert list(times) == ["a", "b", "c"]  # the variants' order, not the last round's
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and err[0].startswith("round 1/2 A: median 1 s (1 steps)")
    alternate(["a"], 1, lambda r, v: [1.0], progress=False)
    assert capsys.readouterr().err == ""


def test_timed_returns_one_time_per_step():
    calls = []
    times = timed(lambda: calls.append(1), 3)
    assert len(times) == 3 and len(calls) == 3 and all(t >= 0 for t in times)


def test_a_worker_says_hello_answers_requests_and_exits_when_closed():
    with Worker("echo", [sys.executable, "-c", _ECHO], cwd=REPO, hello=True) as w:
        assert w.hello == {"ready": True, "who": "echo"}
        assert w.ask({"x": 2}) == {"twice": 4}
        assert w.ask({"x": 5}) == {"twice": 10}


def test_a_workers_stray_output_goes_to_stderr_not_into_its_answers():
    with Worker("noisy", [sys.executable, "-c", _NOISY], cwd=REPO, hello=True) as w:
        assert w.hello == {"ready": True}
        assert w.ask({"x": 2}) == {"twice": 4}
        assert w.ask({"x": 3}) == {"twice": 6}


def test_a_dying_worker_is_named_in_the_error():
    w = Worker("broken", [sys.executable, "-c", "import sys; sys.exit(3)"], cwd=REPO)
    with pytest.raises(RuntimeError, match=r"the broken worker died \(exit code 3\)"):
        w.ask({"x": 1})
    w.close()


def test_write_puts_the_record_and_its_table_side_by_side(tmp_path):
    md = write(tmp_path / "new", "bench_x", {"a": 1}, "# table\n\n")
    assert md == tmp_path / "new" / "bench_x.md" and md.read_text() == "# table\n"
    assert json.loads((tmp_path / "new" / "bench_x.json").read_text()) == {"a": 1}


def test_command_quotes_what_needs_it_and_the_date_is_utc():
    assert command("experiments.bench.b", ["--out", "a b"]) == (
        "python -m experiments.bench.b --out 'a b'"
    )
    assert utc_now().endswith(" UTC") and len(utc_now()) == len("2026-12-04 05:00 UTC")
