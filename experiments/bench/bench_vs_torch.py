"""ResNet-20 train step, ours (JAX) vs PyTorch, side by side on the same machine.

The same network (CIFAR ResNet-20, option-A shortcuts, 269,722 parameters), batch
(128 CIFAR-10-shaped images, float32, already normalised, fixed for every step),
loss (softmax cross-entropy) and optimizer (SGD, lr 0.1, momentum 0.9, coupled
weight decay 1e-4) in both frameworks, timed per whole train step (forward,
backward, update):

* ``torch_nchw``          -- PyTorch, default NCHW memory format;
* ``torch_channels_last`` -- PyTorch with ``torch.channels_last`` model and input;
* ``jax_default``         -- our ``gcgd-train`` step (config ``cifar10_resnet20``): augmentation,
  normalisation, non-finite guard and metrics inside the jitted step, batch already on the device;
* ``jax_best``            -- our fastest plain step: a bare ``jax.jit`` step of the same model
  (XLA CPU flag + fusion breaker, ``gcgd_jax.ops``).

PyTorch is never a dependency of this package: it runs in its own virtual
environment, named by ``--torch-python`` or ``$GCGD_TORCH_PYTHON`` (e.g. ``python3 -m
venv /work/torchvenv && /work/torchvenv/bin/pip install torch==2.13.0 numpy``). Without it
the benchmark says so and measures only the JAX variants. Every variant lives in a worker
process (PyTorch with ``torch.set_num_threads`` = the cores available); the parent asks
the workers for measurements in alternating rounds (order rotated each round), pools the
per-step times and reports medians and the ratio PyTorch-channels_last step time / ours
(>= 1.0: we are at least as fast).

Several JAX versions side by side: ``--jax-python`` (repeatable) names the Python of each
environment to measure (each with this checkout's dependencies installed; the checkout is
put on its ``PYTHONPATH``); every JAX variant is then reported per jaxlib, all in the same
alternating rounds as PyTorch, so each ratio comes from one run.

    python -m experiments.bench.bench_vs_torch --torch-python /work/torchvenv/bin/python
    python -m experiments.bench.bench_vs_torch --torch-python /work/torchvenv/bin/python \
        --jax-python .venv/bin/python --jax-python .venv313/bin/python   # two jaxlibs
    python -m experiments.bench.bench_vs_torch --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments import REPO
from experiments import RESULTS as RESULTS_ROOT
from experiments.common.provenance import describe_machine, git_commit, machine
from experiments.common.results import command, utc_now, write
from experiments.common.timing import Worker, alternate, serve, summary, timed

RESULTS = RESULTS_ROOT / "bench_vs_torch"
BATCH = 128
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
JAX_VARIANTS = ("jax_default", "jax_best")
TORCH_VARIANTS = ("torch_nchw", "torch_channels_last")


def _batch():
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, BATCH).astype(np.int32)
    return images, labels


# --------------------------------------------------------------------------- JAX worker


def _jax_worker() -> None:
    from gcgd_jax.ops import apply_cpu_flags

    apply_cpu_flags()
    import io
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from experiments.common.bare_step import make_bare_step
    from gcgd_jax.data import normalization
    from gcgd_jax.models import resnet20
    from gcgd_jax.train import Trainer, load_config

    images, labels = _batch()
    mean, std = normalization("cifar10")
    built: dict = {}

    def default():
        if "default" not in built:
            cfg = load_config(
                "cifar10_resnet20",
                ["data.name=synthetic", "data.synthetic_train_size=256", "log.progress=false",
                 "checkpoint.enabled=false", f"data.batch_size={BATCH}"],
            )  # fmt: skip
            t = Trainer(cfg, out_dir=tempfile.mkdtemp(prefix="vs_torch_"), stream=io.StringIO())
            x, y = t.put_batch(images[None]), t.put_batch(labels[None])  # one replica
            built["default"] = lambda: jax.block_until_ready(t.dispatch(x, y)["loss"])
            built.setdefault("params", t.num_params)
        return built["default"]

    def best():
        if "best" not in built:
            model = resnet20(10, in_channels=3, rngs=nnx.Rngs(0))
            model.train()
            x = jnp.asarray((images / 255.0 - mean) / std, jnp.float32)
            run, params = make_bare_step(
                model, x, jnp.asarray(labels), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
            )
            built["best"] = run
            built["params"] = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        return built["best"]

    import jaxlib

    runners = {"jax_default": default, "jax_best": best}
    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    _serve(lambda name: runners[name](), {**versions, "python": sys.version.split()[0]}, built)


# --------------------------------------------------------------------------- PyTorch worker


def torch_resnet20():
    """He et al.'s CIFAR ResNet-20 in PyTorch (option-A shortcuts, 269,722 parameters): the
    same network as ``gcgd_jax.models.resnet20``."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        """He et al.'s basic block with an option-A (zero-padded, strided) shortcut."""

        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.pad:
                short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(out + short)

    class ResNet20(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(16)
            layers, cin = [], 16
            for i, width in enumerate((16, 32, 64)):
                for j in range(3):
                    layers.append(Block(cin, width, 2 if (i > 0 and j == 0) else 1))
                    cin = width
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.layers(F.relu(self.bn(self.conv(x))))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return ResNet20()


def _torch_worker() -> None:
    import numpy as np
    import torch
    from torch.nn import functional as F

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)

    images, labels = _batch()
    mean = np.array([0.4914, 0.4822, 0.4465], np.float32)
    std = np.array([0.2470, 0.2435, 0.2616], np.float32)
    x_nhwc = ((images / 255.0 - mean) / std).astype(np.float32)
    built: dict = {}

    def runner(name: str):
        if name not in built:
            model = torch_resnet20()
            x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
            if name == "torch_channels_last":
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(labels.astype(np.int64))
            opt = torch.optim.SGD(
                model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
            )
            model.train()

            def run():
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                loss.item()

            built[name] = run
            built["params"] = sum(p.numel() for p in model.parameters())
        return built[name]

    _serve(runner, {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}, built)


def _serve(get_runner, versions: dict, built: dict) -> None:
    """Answers ``{"variant", "steps", "warmup"}`` requests with ``{"times": [...], "params": n}``."""

    def answer(cmd: dict) -> dict:
        run = get_runner(cmd["variant"])
        timed(run, cmd["warmup"])
        return {"times": timed(run, cmd["steps"]), "params": built.get("params")}

    serve(answer, hello={"ready": True, **versions})


# --------------------------------------------------------------------------- parent


def _torch_python(arg: str | None) -> str | None:
    candidate = arg or os.environ.get("GCGD_TORCH_PYTHON")
    if not candidate:
        return None
    path = shutil.which(candidate) or candidate
    if not Path(path).exists():
        return None
    probe = subprocess.run([path, "-c", "import torch"], capture_output=True, check=False)
    return path if probe.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--torch-python", help="a Python with torch installed (or $GCGD_TORCH_PYTHON)"
    )
    parser.add_argument(
        "--jax-python",
        action="append",
        help="the Python of a JAX environment to measure (repeatable; default: this one)",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 steps: a smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv_used)
    if args.worker == "jax":
        _jax_worker()
        return 0
    if args.worker == "torch":
        _torch_worker()
        return 0
    n_rounds = args.rounds or (2 if args.quick else 6)
    steps = args.steps or (3 if args.quick else 10)
    warmup = 1 if args.quick else args.warmup

    torch_python = _torch_python(args.torch_python)
    if torch_python is None:
        print(
            "PyTorch not found (pass --torch-python or set GCGD_TORCH_PYTHON to a Python with "
            "torch installed); measuring only the JAX variants",
            file=sys.stderr,
        )
    me = str(Path(__file__).resolve())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    workers: dict[str, Worker] = {}
    jax_pythons = args.jax_python or [sys.executable]
    for i, py in enumerate(jax_pythons):
        workers[f"jax{i}"] = Worker(
            f"jax ({py})", [py, me, "--worker", "jax"], cwd=REPO, env=env, hello=True
        )
    if torch_python:
        cmd = [torch_python, me, "--worker", "torch"]
        workers["torch"] = Worker("torch", cmd, cwd=REPO, env=env, hello=True)
    # variant name -> (worker key, the worker's own variant name)
    plan = {v: ("torch", v) for v in (TORCH_VARIANTS if torch_python else ())}
    jax_workers = []
    for i in range(len(jax_pythons)):
        hello = workers[f"jax{i}"].hello
        jax_workers.append({k: hello[k] for k in ("jax", "jaxlib", "python")})
        for v in JAX_VARIANTS:
            name = v if len(jax_pythons) == 1 else f"{v} (jaxlib {hello['jaxlib']})"
            plan[name] = (f"jax{i}", v)
    torch_hello = workers["torch"].hello if torch_python else {}
    versions = {k: v for k, v in torch_hello.items() if k.startswith("torch")}
    versions["jax"] = ", ".join(w["jax"] for w in jax_workers)
    params: dict[str, int | None] = {}

    def measure(r: int, v: str) -> list[float]:
        key, own = plan[v]
        request = {"variant": own, "steps": steps, "warmup": warmup if r == 0 else 1}
        answer = workers[key].ask(request)
        params[v] = answer["params"]
        return answer["times"]

    started = time.time()
    try:
        times = alternate(list(plan), n_rounds, measure, describe=lambda v: f"{v:34s}")
    finally:
        for w in workers.values():
            w.close()

    rows = [
        {"variant": v, "parameters": params.get(v), **summary(ts, BATCH)} for v, ts in times.items()
    ]
    record = {
        "command": command("experiments.bench.bench_vs_torch", argv_used),
        "date": utc_now(),
        "commit": git_commit(),
        "machine": {**machine(with_jax=False), **versions},  # versions: the workers' jax, torch
        "jax_workers": jax_workers,  # each JAX environment measured: jax, jaxlib, its Python
        "batch_size": BATCH,
        "rounds": n_rounds,
        "steps_per_round": steps,
        "wall_s": time.time() - started,
        "quick": args.quick,
        "torch_found": torch_python is not None,
        "results": rows,
    }
    stem = "vs_torch_quick" if args.quick else "bench_vs_torch"
    if len(jax_pythons) > 1 and not args.quick:
        stem = "vs_torch_jaxlibs"
    write(args.out, stem, record, _markdown(record))
    print(_markdown(record))
    return 0


def _markdown(rec: dict) -> str:
    m = rec["machine"]
    med = {r["variant"]: r["step_s_median"] for r in rec["results"]}
    lines = [
        "# ResNet-20 train step: ours (JAX) vs PyTorch, side by side",
        "",
        *(["**Smoke run (--quick): too few steps to quote.**", ""] if rec["quick"] else []),
        f"- command: `{rec['command']}`",
        f"- date: {rec['date']}; wall time {rec['wall_s']:.0f} s; commit {rec.get('commit') or 'unknown'}",
        f"- machine: {describe_machine(m)}",
        *(
            [f"- JAX environments: {_environments(rec['jax_workers'])}"]
            if len(rec.get("jax_workers", ())) > 1
            else []
        ),
        f"- torch {m.get('torch', 'not found')}"
        + (f" ({m['torch_threads']} threads)" if "torch_threads" in m else ""),
        (
            f"- batch {rec['batch_size']}, SGD lr {LR} momentum {MOMENTUM} wd {WEIGHT_DECAY}; "
            f"{rec['rounds']} alternating rounds x {rec['steps_per_round']} timed steps per "
            "variant, per-step times pooled"
        ),
        "",
        "| variant | parameters | step s (min / median / max) | img/s at median | PyTorch channels_last / this |",
        "|---|---|---|---|---|",
    ]
    ref = med.get("torch_channels_last")
    for r in rec["results"]:
        ratio = f"{ref / r['step_s_median']:.2f}x" if ref else "n/a"
        lines.append(
            f"| {r['variant']} | {r['parameters']:,} | {r['step_s_min']:.3f} / {r['step_s_median']:.3f} / "
            f"{r['step_s_max']:.3f} | {r['images_per_s']:.0f} | {ratio} |"
        )
    if not rec["torch_found"]:
        lines += ["", "PyTorch was not found, so there is no ratio to report."]
    return "\n".join(lines) + "\n"


def _environments(jax_workers: list[dict]) -> str:
    return "; ".join(
        f"jax {w['jax']} / jaxlib {w['jaxlib']} on Python {w['python']}" for w in jax_workers
    )


if __name__ == "__main__":
    sys.exit(main())
