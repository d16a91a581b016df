"""The GPU check's stages: preflight, train-step speed vs PyTorch, the paper's setting.

Run by ``experiments/gpu_check.sh`` (read its header first); each stage is also a
command of its own::

    python -m experiments.gpu_check preflight --out OUT [--dry-run]
    python -m experiments.gpu_check bench --out OUT [--dry-run]
    python -m experiments.gpu_check main --out OUT --deadline UNIX_SECONDS [--suite-dir DIR] [--dry-run]

- ``preflight`` (under a minute): versions of everything the project imports,
  that JAX sees a GPU, and one jitted train step of each variant (baseline,
  GCGD = GC-W + GC-ODE gradient mode, two seed-parallel replicas) plus an orbax
  checkpoint round trip. It stops at the first failure with one line naming the
  stage, the installed versions of the packages in the failing frames and the
  place it broke (``preflight.json``), so the rest of the device time can go to
  a fix and a re-run.
- ``bench``: ResNet-20 and ResNet-18 (small stem) train steps at batch 128, SGD
  momentum 0.9, weight decay 1e-4 (``experiments/bench/bench_vs_torch.py``'s setting):
  ours (float32; our models have no bf16 option) and PyTorch's on the same GPU
  (float32 NCHW, float32 channels_last, channels_last with bf16 autocast, the
  way PyTorch users turn on AMP), median step time, images/s and peak device
  memory, each case in its own process; then the seed-parallel step (``vmap``) of
  N replicas of the baseline, per replica-step (``bench.json``, ``bench.md``).
- ``main``: ``gpu-cifar10-resnet20``, He et al.'s setting (ResNet-20, SGD 0.9,
  lr 0.1, weight decay 1e-4, batch 128, lr ÷10 at 50% and 75% of training, crop
  + flip, all 50k training images, 10k test images), baseline vs GCGD at budgets
  1.0 and 0.8, N seeds trained in parallel per arm: an ordinary run of that suite,
  ``python -m experiments.suites.compare --suite gpu-cifar10-resnet20 --seed-parallel
  --set train.total_steps=STEPS`` (and the data, no checkpoints), through the runner's
  own function (``compare.run_seeds``: one seed-parallel ``gcgd-train`` process per
  method and budget, the full budget first) into the suite's layout,
  ``SUITE_DIR/runs/<method>/b<budget>/s<seed>/`` (``--suite-dir``, default
  ``OUT/gpu-cifar10-resnet20``). He et al. train 64k steps; the stage measures the step
  costs first, in a process of its own (300 steps of each method's seed-parallel step with
  the real input pipeline: the N-replica cost of GCGD; the imports and data load of a
  run's process), and chooses STEPS to fit before ``--deadline`` (at most 64k) and says
  so: a shorter schedule is reported as shortened, never as He et al.'s. After every arm
  (a stage cut at its limit leaves the arms that finished) it rebuilds the suite's report
  (``experiments.suites.report.build_report``: ``SUITE_DIR/RESULTS.md`` and its plots,
  with the schedule and the measured costs in its notes) and writes ``main.json`` (this
  stage's record: calibration, plan, each arm's exit code, wall time and peak RSS) and
  ``main.md`` (the report); when ``SUITE_DIR`` lies outside ``OUT`` (the device tool
  brings back 8 files of ``OUT``, 2 folders down), also ``main.tar.gz``, the suite folder.

``--dry-run`` runs the same code on the CPU with tiny sizes (8×8 synthetic
images, batch 8, a handful of steps, two replicas) so that the test suite keeps
the script working while no GPU is at hand.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PACKAGES = (
    "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "diffrax",
    "equinox", "orbax-checkpoint", "numpy", "scipy", "pillow", "torch", "torchvision",
)  # fmt: skip
HE_STEPS = 64_000
BATCH = 128
DRY_STEPS = 8  # a dry run's schedule at budget 1.0
#: The experiment of the ``main`` stage: its one definition (methods, budgets, seeds, base
#: configuration) is the suite file ``experiments/suites/gpu-cifar10-resnet20.toml``.
SUITE = "gpu-cifar10-resnet20"


def suite():
    """The GPU experiment's suite (:mod:`experiments.suites.compare`)."""
    from experiments.suites.compare import suites

    return suites()[SUITE]


def methods() -> dict[str, tuple[str, ...]]:
    """Each method of the suite -> its configuration overrides (from the registry)."""
    s = suite()
    return {m: s.overrides_for(m) for m in dict.fromkeys(c[0] for c in s.grid())}


def budgets() -> tuple[float, ...]:
    """The suite's budgets, largest first."""
    return tuple(sorted(suite().budgets, reverse=True))


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the project (and the comparison) uses."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def utc_now() -> str:
    from experiments.common.results import utc_now as now

    return now()


def _commit() -> str | None:
    from experiments.common.provenance import git_commit

    return os.environ.get("GCGD_COMMIT") or git_commit()


def _write(out: Path, name: str, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(record, indent=2, default=str) + "\n")


def _sizes(dry: bool) -> dict:
    """Image shape, batch, synthetic set sizes of a stage (tiny in a dry run)."""
    if dry:
        return {"shape": [8, 8, 3], "batch": 8, "train": 32, "test": 16}
    return {"shape": [32, 32, 3], "batch": BATCH, "train": 2 * BATCH, "test": BATCH}


def synthetic_overrides(dry: bool, model: str = "resnet20") -> list[str]:
    s = _sizes(dry)
    return [
        "data.name=synthetic",
        f"data.synthetic_image_shape={s['shape']}",
        f"data.synthetic_train_size={s['train']}",
        f"data.synthetic_test_size={s['test']}",
        f"data.batch_size={s['batch']}",
        f"model.name={model}",
        *(["model.small_stem=true"] if model == "resnet18" else []),
        "checkpoint.enabled=false",
        "log.progress=false",
    ]


# --------------------------------------------------------------------------- preflight


def _where(err: BaseException) -> str:
    """The innermost frame of ``err`` inside this project or a package, as ``file:line``."""
    frames = traceback.extract_tb(err.__traceback__)
    for frame in reversed(frames):
        if "site-packages" in frame.filename or "gcgd_jax" in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def _packages_in(err: BaseException, found: dict[str, str | None]) -> str:
    """``name version`` of every known package whose files appear in the traceback."""
    files = " ".join(f.filename for f in traceback.extract_tb(err.__traceback__))
    names = [n for n in PACKAGES if f"/{n.replace('-', '_').split('_')[0]}" in files]
    return ", ".join(f"{n} {found.get(n)}" for n in names) or "none of the listed packages"


def preflight(out: Path, dry: bool) -> int:
    """Versions, the GPU, one train step of each variant, a checkpoint round trip."""
    t_start = time.perf_counter()
    found = versions()
    record: dict = {"date": utc_now(), "commit": _commit(), "versions": found, "stages": []}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items() if v), flush=True)

    def stage(name: str, fn) -> bool:
        t0 = time.perf_counter()
        try:
            detail = fn()
        except BaseException as err:
            line = (
                f"PREFLIGHT FAILED at {name}: {type(err).__name__}: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else ''} "
                f"[at {_where(err)}; packages in the traceback: {_packages_in(err, found)}; "
                f"jax {found['jax']}, jaxlib {found['jaxlib']}, flax {found['flax']}, "
                f"optax {found['optax']}, diffrax {found['diffrax']}, "
                f"orbax-checkpoint {found['orbax-checkpoint']}]"
            )
            print(line, flush=True)
            traceback.print_exc()
            record["stages"].append({"stage": name, "ok": False, "error": line})
            record["failed"] = line
            record["seconds"] = time.perf_counter() - t_start
            _write(out, "preflight.json", record)
            return False
        seconds = time.perf_counter() - t0
        record["stages"].append({"stage": name, "ok": True, "seconds": seconds, "detail": detail})
        print(f"ok  {name} ({seconds:.1f} s){': ' + str(detail) if detail else ''}", flush=True)
        return True

    def backend():
        import jax

        d = jax.devices()[0]
        if not dry and jax.default_backend() != "gpu":
            raise RuntimeError(
                f"JAX sees no GPU (backend {jax.default_backend()!r}, devices {jax.devices()}): "
                "is a jax CUDA plugin installed and matching jaxlib?"
            )
        record["device"] = f"{d.platform}: {d.device_kind}"
        return record["device"]

    def step_of(extra: tuple[str, ...], seeds: tuple[int, ...] = ()):
        def run():
            from gcgd_jax.train import Trainer, load_config

            overrides = [*synthetic_overrides(dry), "train.total_steps=1", *extra]
            if seeds:
                overrides += [f"run.seeds={list(seeds)}", "run.replica_strategy=vmap"]
            cfg = load_config("cifar10_resnet20", overrides)
            folder = tempfile.mkdtemp(prefix="gcgd_preflight_")
            summaries = Trainer(cfg, out_dir=folder, stream=io.StringIO()).run()
            losses = [s["final_test_loss"] for s in summaries.values()]
            if not all(v is not None and math.isfinite(v) for v in losses):
                raise RuntimeError(f"non-finite or missing test loss after one step: {losses}")
            return f"test loss {', '.join(f'{v:.3f}' for v in losses)}"

        return run

    def checkpoint():
        import jax.numpy as jnp

        from gcgd_jax.train.checkpoint import Checkpointer

        folder = Path(tempfile.mkdtemp(prefix="gcgd_ckpt_"))
        ckpt = Checkpointer(folder)
        state = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.int32(3)}
        ckpt.save(1, state, {"step": 1})
        restored, meta = ckpt.restore(1, state)
        ckpt.close()
        if meta["step"] != 1 or not bool(jnp.all(restored["w"] == state["w"])):
            raise RuntimeError("the restored checkpoint differs from the saved one")
        return "save + restore equal"

    stages = [
        ("import gcgd_jax", lambda: __import__("gcgd_jax").__file__),
        ("jax backend", backend),
        ("train step: baseline", step_of(())),
        ("train step: GCGD (GC-W + GC-ODE gradient)", step_of(methods()["gcgd"])),
        ("train step: 2 seed-parallel replicas (vmap)", step_of((), (0, 1))),
        ("orbax checkpoint", checkpoint),
    ]
    for name, fn in stages:
        if not stage(name, fn):
            return 1
    record["seconds"] = time.perf_counter() - t_start
    _write(out, "preflight.json", record)
    print(f"preflight passed in {record['seconds']:.1f} s", flush=True)
    return 0


# --------------------------------------------------------------------------- bench


def _jax_case(model: str, extra: tuple[str, ...], seeds: tuple[int, ...], steps: int, dry: bool):
    """One of our train steps (``Trainer``'s jitted step, or the seed-parallel one), timed."""
    import jax

    from gcgd_jax.train import Trainer, load_config

    overrides = [
        *synthetic_overrides(dry, model),
        "optim.schedule=constant",
        "optim.weight_decay=1e-4",
        *extra,
    ]
    if seeds:
        overrides += [f"run.seeds={list(seeds)}", "run.replica_strategy=vmap"]
    cfg = load_config("cifar10_resnet20", overrides)
    folder = tempfile.mkdtemp(prefix="gcgd_bench_")
    t = Trainer(cfg, out_dir=folder, stream=io.StringIO())
    images, labels = next(t.batches(0))  # (replicas, batch, ...)
    x, y = t.put_batch(images), t.put_batch(labels)

    def step():
        return t.dispatch(x, y)

    params = t.num_params
    t0 = time.perf_counter()
    jax.block_until_ready(step())
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        jax.block_until_ready(step())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - t0)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    med = statistics.median(times)
    n = max(len(seeds), 1)
    return {
        "framework": "jax",
        "model": model,
        "batch": cfg.data.batch_size,
        "replicas": n,
        "precision": "float32",
        "parameters": params,
        "device": f"{device.platform}: {device.device_kind}",
        "first_step_s": compile_s,
        "step_s_median": med,
        "step_s_per_replica": med / n,
        "images_per_s": n * cfg.data.batch_size / med,
        "peak_bytes": stats.get("peak_bytes_in_use"),
    }


TORCH_VARIANTS = ("nchw_fp32", "channels_last_fp32", "channels_last_bf16")


def _torch_case(model: str, variant: str, steps: int, dry: bool) -> dict:
    """PyTorch's train step of the same model, batch and optimizer, timed on the GPU
    (the CPU in a dry run)."""
    import numpy as np
    import torch
    from torch.nn import functional as F

    from experiments.bench.bench_vs_torch import LR, MOMENTUM, WEIGHT_DECAY, torch_resnet20

    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    torch.manual_seed(0)
    if model == "resnet20":
        net = torch_resnet20()
    else:
        import torchvision

        net = torchvision.models.resnet18(num_classes=10)
        net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # small stem, as ours
        net.maxpool = torch.nn.Identity()
    s = _sizes(dry)
    rng = np.random.default_rng(0)
    h, w, c = s["shape"]
    x = torch.from_numpy(rng.standard_normal((s["batch"], c, h, w), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, s["batch"]).astype(np.int64))
    net, x, y = net.to(device), x.to(device), y.to(device)
    if variant.startswith("channels_last"):
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    amp = variant.endswith("bf16")
    net.train()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "framework": "torch",
        "model": model,
        "variant": variant,
        "batch": s["batch"],
        "replicas": 1,
        "precision": "bf16 autocast" if amp else "float32",
        "parameters": sum(p.numel() for p in net.parameters()),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "first_step_s": first,
        "step_s_median": med,
        "step_s_per_replica": med,
        "images_per_s": s["batch"] / med,
        "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


def _in_process(kind: str, args: list[str], timeout: float) -> list[dict]:
    """Runs one case in a fresh process (its own peak memory); an error becomes a row."""
    cmd = [sys.executable, "-m", "experiments.gpu_check", "case", kind, *args]
    name = " ".join([kind, *[a for a in args if not a.startswith("--")][:3]])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [{"case": name, "error": f"timed out after {timeout:.0f} s"}]
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return [{"case": name, "error": tail[0][:300]}]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def bench(out: Path, dry: bool, replicas: int, deadline: float | None) -> int:
    steps = 3 if dry else 50
    rows: list[dict] = []

    def left() -> float:
        return (deadline - time.time()) if deadline else 1e9

    plan: list[tuple[str, list[str]]] = []
    for model in ("resnet20", "resnet18"):
        plan.append(("jax", [model, "baseline", "1"]))
        plan.append(("torch", [model, "all"]))
    # The seed-parallel step of the bare setting (GCGD's, with data, is timed by `main`).
    plan.append(("jax", ["resnet20", "baseline", str(replicas)]))
    have_torch = importlib.util.find_spec("torch") is not None
    record = {
        "date": utc_now(),
        "commit": _commit(),
        "command": "python -m experiments.gpu_check bench" + (" --dry-run" if dry else ""),
        "versions": versions(),
        "timed_steps": steps,
        "rows": rows,
    }

    def write() -> None:  # after every case: a stage cut at its limit leaves what finished
        _write(out, "bench.json", record)
        (out / "bench.md").write_text(bench_markdown(record))

    write()
    for kind, args in plan:
        if kind == "torch" and not have_torch:
            rows.append({"case": " ".join([kind, *args]), "error": "torch is not installed"})
            continue
        if left() < 20 and not dry:  # a dry run checks every case, however slow the CPU
            rows.append({"case": " ".join([kind, *args]), "error": "skipped: out of time"})
            continue
        extra = ["--steps", str(steps)] + (["--dry-run"] if dry else [])
        got = _in_process(
            kind, [*args, *extra], timeout=150.0 if dry else min(150.0, max(left() - 10, 10))
        )
        for row in got:
            row.setdefault("case", " ".join([kind, *args]))
            rows.append(row)
            print(json.dumps(row), flush=True)
        write()
    return 0


def bench_markdown(record: dict) -> str:
    rows = record["rows"]
    ours = {
        (r["model"], r["replicas"], r.get("case", "")): r
        for r in rows
        if r.get("framework") == "jax"
    }
    lines = [
        "# Train steps on the GPU: ours vs PyTorch, and seed-parallel replicas",
        "",
        f"- command: `{record['command']}`; {record['date']}; commit {record['commit']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items() if v)}",
        (
            f"- median of {record['timed_steps']} timed steps after 4 untimed ones; peak = the "
            "device allocator's peak in that case's own process"
        ),
        "",
        (
            "| case | device | precision | batch × replicas | first step s | step ms | ms per replica "
            "| img/s | peak MiB | PyTorch / ours (step time) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error']} | | | | | | | | |")
            continue
        ref = next((o for (m, n, _), o in ours.items() if m == r["model"] and n == 1), None)
        ratio = (
            f"{r['step_s_median'] / ref['step_s_median']:.2f}"
            if r["framework"] == "torch" and ref
            else ""
        )
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "n/a"
        lines.append(
            f"| {r['case']} | {r['device']} | {r['precision']} | {r['batch']} × {r['replicas']} "
            f"| {r['first_step_s']:.1f} | {1e3 * r['step_s_median']:.2f} "
            f"| {1e3 * r['step_s_per_replica']:.2f} | {r['images_per_s']:.0f} | {peak} | {ratio} |"
        )
    lines += [
        "",
        (
            "PyTorch / ours > 1: our step is faster. Ours runs in float32 (the models have no "
            "bf16 option); PyTorch's bf16 row is what its users get with autocast."
        ),
    ]
    return "\n".join(lines) + "\n"


def case(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpu_check case")
    p.add_argument("kind", choices=("jax", "torch"))
    p.add_argument("model")
    p.add_argument("variant")
    p.add_argument("replicas", nargs="?", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    if a.kind == "torch":
        variants = TORCH_VARIANTS if a.variant == "all" else (a.variant,)
        for variant in variants:
            row = _torch_case(a.model, variant, a.steps, a.dry_run)
            row["case"] = f"torch {a.model} {variant}"
            print(json.dumps(row), flush=True)
        return 0
    seeds = tuple(range(a.replicas)) if a.replicas > 1 else ()
    row = _jax_case(a.model, methods()[a.variant], seeds, a.steps, a.dry_run)
    row["case"] = f"ours {a.model} {a.variant}" + (f" x{a.replicas} (vmap)" if seeds else "")
    print(json.dumps(row))
    return 0


# --------------------------------------------------------------------------- main event

#: Seconds of a run's process besides what the calibration's process measures (its imports,
#: the device, the data from its decoded cache) and the train step's compile: the evaluation
#: step's compile, the report rebuilt after the arm.
ARM_SLACK_S = 5.0


def arms() -> list[tuple[str, float]]:
    """The suite's ``(method, budget)`` groups in its runner's order (the grid's: every method
    at the full budget first), one seed-parallel process each."""
    return list(dict.fromkeys((m, b) for m, b, _ in suite().grid()))


def plan_steps(
    seconds: float,
    step_s: dict[str, float],
    compile_s: dict[str, float],
    steps_per_epoch: int,
    process_s: float = 0.0,
) -> int:
    """Steps at budget 1.0 such that the four arms (both methods at budgets 1.0 and 0.8)
    fit into ``seconds``: each arm is a fresh process that starts in ``process_s``, compiles
    once and trains ``budget * steps`` steps; an epoch-end evaluation is budgeted as 10% of
    the training steps. At most He et al.'s 64k."""
    fixed = len(budgets()) * (sum(compile_s.values()) + len(compile_s) * process_s)
    per_step = sum(budgets()) * sum(step_s.values()) * 1.10
    steps = int(max(seconds - fixed, 0.0) / per_step) if per_step > 0 else 0
    return min(steps, HE_STEPS)


def _left_out(name: str) -> bool:
    """Whether a suite folder's file stays out of its archive: checkpoints, a run's lock."""
    return "checkpoints" in Path(name).parts or Path(name).name == ".lock"


def pack(folder: Path, dest: Path) -> None:
    """``dest``, a ``.tar.gz`` of ``folder`` (as ``folder.name/...``, without checkpoints and
    locks), written beside it and renamed: a stage cut while packing keeps the previous one."""
    import tarfile

    part = dest.with_name(dest.name + ".part")
    with tarfile.open(part, "w:gz") as tar:
        tar.add(
            folder,
            arcname=folder.name,
            filter=lambda info: None if _left_out(info.name) else info,
        )
    part.replace(dest)


def calibrate(spec: dict) -> dict:
    """The step costs of each method, measured in a process of their own (``python -m
    experiments.gpu_check calibrate SPEC``, as the runs are): ``spec`` holds the base
    configuration (``config``), the overrides of each method's calibration run
    (``methods``: method -> overrides, its seeds included) and the steps to time
    (``steps``). Loads the data twice (the second time from its decoded cache, as each run's
    process does), then runs each method's seed-parallel ``Trainer`` with the real input
    pipeline to ``steps``; returns the timings and the machine (``machine()``)."""
    from gcgd_jax.ops import apply_cpu_flags

    apply_cpu_flags()  # as gcgd-train does: the calibration's programs are the runs' own
    t0 = time.perf_counter()
    import jax

    from experiments.common.provenance import machine
    from gcgd_jax.train import Trainer, load_config, load_data

    jax.devices()
    got: dict = {"import_s": time.perf_counter() - t0, "machine": machine()}
    cfg0 = load_config(spec["config"], next(iter(spec["methods"].values())))
    t0 = time.perf_counter()
    datasets = load_data(cfg0)
    got["data_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_data(cfg0)  # again, from the decoded cache, as each run's process reads it
    got["data_reload_s"] = time.perf_counter() - t0
    got["train_examples"] = len(datasets[0].labels)
    got["steps_per_epoch"] = len(datasets[0].labels) // cfg0.data.batch_size
    print(
        f"imports {got['import_s']:.1f} s; data loaded in {got['data_load_s']:.1f} s, from its "
        f"cache in {got['data_reload_s']:.1f} s ({got['train_examples']} train)",
        file=sys.stderr,
        flush=True,
    )
    steps = spec["steps"]
    got["step_s"], got["first_step_s"] = {}, {}
    for method, overrides in spec["methods"].items():
        cfg = load_config(spec["config"], overrides)
        folder = tempfile.mkdtemp(prefix=f"gcgd_calib_{method}_")
        group = Trainer(cfg, out_dir=folder, stream=io.StringIO(), datasets=datasets)
        t0 = time.perf_counter()
        group.run(stop_at_step=steps)
        wall = time.perf_counter() - t0
        first = group.first_step_s
        got["step_s"][method] = max((wall - first) / max(steps - 1, 1), 1e-6)
        got["first_step_s"][method] = first
        print(
            f"calibration {method}: first step {first:.1f} s, "
            f"{1e3 * got['step_s'][method]:.2f} ms/step",
            file=sys.stderr,
            flush=True,
        )
    return got


def run_calibration(spec: dict, limit: float) -> tuple[dict | None, str]:
    """:func:`calibrate` in a process of its own, stopped after ``limit`` seconds (its
    progress goes to this process's standard error): its result and ``""``, or ``None`` and
    why not."""
    cmd = [sys.executable, "-m", "experiments.gpu_check", "calibrate", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return None, f"the calibration ran past {limit:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return None, f"the calibration exited with {proc.returncode}"
    return json.loads(lines[-1]), ""


def main_event(
    out: Path,
    dry: bool,
    deadline: float,
    replicas: int,
    data_dir: str | None,
    suite_dir: Path | None = None,
    argv: list[str] | tuple[str, ...] = (),
) -> int:
    """The suite, run by its own runner (:func:`experiments.suites.compare.run_seeds`, one
    seed-parallel ``gcgd-train`` process per method and budget) into ``suite_dir``'s
    ``runs/<method>/b<budget>/s<seed>/``, with ``train.total_steps`` chosen by
    :func:`plan_steps` from step costs measured first (:func:`calibrate`, in a process of its
    own: this one holds no device memory and its size is not in the runs' peak RSS); after
    every arm ``out/main.json`` (this stage's record), ``out/main.md`` (the suite's report,
    ``RESULTS.md``, as :func:`experiments.suites.report.build_report` writes it) and, when
    ``suite_dir`` lies outside ``out``, ``out/main.tar.gz`` (the suite folder)."""
    from experiments.common.provenance import machine
    from experiments.common.results import command, write
    from experiments.suites import compare
    from experiments.suites.report import build_report
    from gcgd_jax.train import load_config

    out = Path(out)
    suite_dir = Path(suite_dir) if suite_dir else out / SUITE
    runs = suite_dir / "runs"
    if runs.is_dir() and any(runs.iterdir()):
        print(
            f"{runs} holds runs of an earlier main stage (another schedule, which the suite "
            "runner would take as done): give a fresh --suite-dir",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    suite_dir.mkdir(parents=True, exist_ok=True)
    packed = not suite_dir.resolve().is_relative_to(out.resolve())
    seeds = list(range(replicas))
    n = len(seeds)
    shared = ["checkpoint.enabled=false", "run.replica_strategy=vmap"]
    if dry:
        shared += [o for o in synthetic_overrides(True) if o.startswith("data.")]
    elif data_dir:
        shared += [f"data.data_dir={data_dir}"]
    definition = suite()
    base = compare.with_overrides(definition.with_seeds(replicas), tuple(shared))
    record: dict = {
        "command": command("experiments.gpu_check", list(argv)),
        "date": utc_now(),
        "commit": _commit(),
        "machine": machine(with_jax=False),
        "versions": versions(),
        "suite": SUITE,
        "suite_dir": str(suite_dir),
        "seeds": seeds,
        "arms": {},
    }

    # Step costs, measured first: a few hundred steps of each method's seed-parallel step
    # with the real input pipeline (dry run: a few). The schedule's length is not known
    # yet: a long one, cut at ``calib_steps``. A dry run's schedule is fixed (DRY_STEPS), so
    # its calibration builds the same program as its budget-1.0 runs: with JAX's persistent
    # compilation cache on (gpu_check.sh and the test suite turn it on), each is compiled once.
    calib_steps = 4 if dry else 300
    calib_total = DRY_STEPS if dry else 1_000_000
    spec = {
        "config": base.base_config,
        "steps": calib_steps,
        "methods": {
            m: [
                *base.overrides_for(m),
                f"run.seeds={seeds}",
                "log.progress=false",
                f"train.total_steps={calib_total}",
            ]
            for m in dict.fromkeys(m for m, _ in arms())
        },
    }
    limit = 600.0 if dry else max(deadline - time.time() - 30.0, 30.0)
    calib, failure = run_calibration(spec, limit)
    if calib is None:
        record["skipped"] = failure
        write(out, "main", record, f"# Suite {SUITE}\n\nNot run: {failure} (see the log).\n")
        print(f"main event not run: {failure}", file=sys.stderr)
        return 1
    record["machine"] = calib.pop("machine")
    step_s, compile_s = calib["step_s"], calib["first_step_s"]
    spe = calib["steps_per_epoch"]
    process_s = calib["import_s"] + calib["data_reload_s"] + ARM_SLACK_S
    record["calibration"] = {
        **calib,
        "steps": calib_steps,
        "process_s": process_s,
        "note": "step_s: wall time of the calibration run after its first step, per step "
        "(includes data feeding and metrics, as the runs do); process_s: a run's process "
        f"before its first step (imports, the device, the data from its cache, plus "
        f"{ARM_SLACK_S:g} s)",
    }
    remaining = deadline - time.time() - 15.0
    steps = DRY_STEPS if dry else plan_steps(remaining, step_s, compile_s, spe, process_s)
    record["total_steps"] = steps
    record["schedule"] = (
        "He et al.'s 64k steps"
        if steps == HE_STEPS
        else f"SHORTENED: {steps} steps at budget 1.0 ({100 * steps / HE_STEPS:.1f}% of He et al.'s "
        "64k; lr ÷10 at 50% and 75% of each run, as in theirs)"
    )
    planned = {
        f"{m}@{b:g}": process_s + compile_s[m] + b * steps * step_s[m] * 1.10 for m, b in arms()
    }
    record["plan"] = {"seconds_left": remaining, "arm_s": planned}
    print(f"chose {n} seeds per arm and {steps} steps at budget 1.0: {record['schedule']}")

    suite_run = compare.with_overrides(base, (f"train.total_steps={steps}",))
    record["suite_command"] = compare.command_line(
        SUITE,
        seeds=None if replicas == len(definition.phases[0].seeds) else replicas,
        seed_parallel=True,
        sets=[*shared, f"train.total_steps={steps}"],
    )
    costs = "; ".join(
        f"{m}: {1e3 * step_s[m]:.2f} ms per step of all {n} ({1e3 * step_s[m] / n:.2f} ms per "
        f"replica-step), first step {compile_s[m]:.1f} s"
        for m in step_s
    )
    host = record["machine"]
    notes = (
        compare.report_notes(
            suite_run,
            suite_run.grid(),
            load_config(suite_run.base_config, list(suite_run.overrides)),
            record["suite_command"],
        )
        + f"\n\n**Schedule: {record['schedule']}.** Run by the GPU check's main stage "
        f"(`{record['command']}`, from `experiments/gpu_check.sh`) as that command, one "
        "seed-parallel process per method and budget (`experiments.suites.compare.run_seeds`), "
        f"on {host.get('device')} ({host.get('cpu')}), {record['date']}, commit {record['commit']}. "
        "The schedule's length was chosen to fit the device time from step costs measured "
        f"first over {calib_steps} steps of each method's seed-parallel step ({costs}) and a "
        f"run's process start ({process_s:.0f} s); `main.json` holds the plan and each arm's "
        "wall time. A shortened schedule is not He et al.'s."
    )

    def publish() -> None:  # after every arm: a stage cut at its limit leaves what finished
        try:
            text = build_report(suite_dir, title=f"Suite {SUITE}", notes=notes)
        except FileNotFoundError:  # no finished run
            reason = record.get("skipped", "no run has finished yet")
            text = f"# Suite {SUITE}\n\n{notes}\n\nNot run: {reason}.\n"
        except Exception as err:  # the runs go on; their folders hold everything
            traceback.print_exc()
            text = f"# Suite {SUITE}\n\n{notes}\n\nREPORT FAILED: {type(err).__name__}: {err}\n"
        write(out, "main", record, text)
        if packed:
            pack(suite_dir, out / "main.tar.gz")

    if steps < 2 * spe and not dry:
        record["skipped"] = f"only {remaining:.0f} s left: fewer than two epochs fit"
        publish()
        return 0
    publish()

    failed = []
    for method, budget in arms():
        arm = f"{method}@{budget:g}"
        left = deadline - time.time()
        if planned[arm] > left and not dry:  # a dry run runs every arm
            record["arms"][arm] = {
                "skipped": f"out of time: planned {planned[arm]:.0f} s, {left:.0f} s left"
            }
            print(f"{arm}: {record['arms'][arm]['skipped']}", flush=True)
            publish()
            continue
        print(f"{arm}: seeds {seeds} ... (planned {planned[arm]:.0f} s)", flush=True)
        if n > 1 and method not in compare.MATCHED_SCALE:
            recs = [compare.run_seeds(suite_run, method, budget, seeds, suite_dir)]
        else:
            recs = [compare.run_one(suite_run, method, budget, s, suite_dir) for s in seeds]
        code = next((r["exit_code"] for r in recs if r["exit_code"] != 0), 0)
        record["arms"][arm] = {
            "exit_code": code,
            "wall_s": sum(r["wall_s"] for r in recs),
            "planned_s": planned[arm],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in recs),
            "command": recs[0]["command"],
        }
        print(f"{arm}: exit {code}, {record['arms'][arm]['wall_s']:.0f} s", flush=True)
        if code != 0:
            failed.append(arm)
            log = compare.run_dir(suite_dir, method, budget, seeds[0]) / "train.log"
            tail = log.read_text().splitlines()[-15:] if log.exists() else []
            print("\n".join([f"{arm} FAILED; the end of {log}:", *tail]), file=sys.stderr)
        publish()
    print((out / "main.md").read_text())
    return 1 if failed else 0


# --------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "case":
        return case(argv[1:])
    if argv and argv[0] == "calibrate":
        print(json.dumps(calibrate(json.loads(argv[1]))))
        return 0
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__)
    p.add_argument("stage", choices=("preflight", "bench", "main"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes")
    p.add_argument("--deadline", type=float, help="unix time by which the stage must end")
    p.add_argument(
        "--replicas", type=int, default=None, help="seeds per arm (default: the suite's; 2 dry)"
    )
    p.add_argument("--data-dir", help="folder holding cifar10-jpeg.tar.gz (main)")
    p.add_argument(
        "--suite-dir",
        type=Path,
        help=f"the suite's folder (runs/, RESULTS.md) (main; default OUT/{SUITE}); outside "
        "OUT it also travels as OUT/main.tar.gz",
    )
    a = p.parse_args(argv)
    replicas = a.replicas or (2 if a.dry_run else len(suite().phases[0].seeds))
    if a.stage == "preflight":
        return preflight(a.out, a.dry_run)
    if a.stage == "bench":
        return bench(a.out, a.dry_run, replicas, a.deadline)
    deadline = a.deadline or (time.time() + 300)
    return main_event(a.out, a.dry_run, deadline, replicas, a.data_dir, a.suite_dir, argv)


if __name__ == "__main__":
    sys.exit(main())
