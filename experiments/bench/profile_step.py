"""Where the CPU time of a ResNet-20 train step goes, and what each speed-up candidate buys.

Issue 15's evidence: our ResNet-20 train step (batch 128, SGD momentum, the bare
``jax.jit`` step of ``bench_vs_torch.py``'s ``jax_best``) against PyTorch's on the
same 2-core machine. Three parts, each in fresh worker processes (XLA reads its
flags once per process):

* ``ops``     -- every convolution shape of ResNet-20 (32x32x16, 16x16x32, 8x8x64,
  batch 128, 3x3, stride 1): forward, input gradient (dgrad) and weight gradient
  (wgrad) as XLA differentiates them, and the weight gradient in other
  formulations (im2col + one matmul, nine shifted matmuls, the transposed
  convolution XLA itself emits, and the batch split into 8 chunks whose partial
  weight gradients are summed, as shipped); on both cores and pinned to one core (which
  shows which kernels use the second core); forward + both gradients in one
  function, NHWC/HWIO and NCHW/OIHW (the layout question); BatchNorm + ReLU forward + backward;
  the same convolutions and BatchNorm in PyTorch (channels_last) when its
  virtual environment is given. Totals are weighted by how often ResNet-20 has
  each shape (7, 6 and 6 convolutions; one BatchNorm per convolution).
* ``profile`` -- the step under ``jax.profiler``: XLA thunk time per op category
  (summed over both worker threads), so transposes, BatchNorm reductions and
  element-wise fusions are visible next to the step time.
* ``step``    -- the whole step with each candidate, in alternating rounds (order
  rotated each round), median per step over the pooled rounds:
  ``base`` (what we ship: XLA flag + fusion breaker + every convolution's
  weight gradient in 8 batch chunks, ``gcgd_jax.ops.chunked_wgrad_conv``),
  ``plain_wgrad`` (the same without the chunks: XLA's own VJP), ``custom_bn``
  (BatchNorm with a hand-written backward and one-pass statistics),
  ``split_batch`` (instead of the chunked VJP, every convolution run as 8 batch
  chunks, concatenated, so autodiff splits its backward too), ``bf16``
  (bf16 compute, f32 master weights), three other XLA CPU flag sets, and
  ``no_bn`` -- BatchNorm replaced by its affine part, an **upper bound** of what
  any BatchNorm work could buy, not a candidate.

    python -m experiments.bench.profile_step --torch-python /work/torchvenv/bin/python
    python -m experiments.bench.profile_step --quick        # a smoke run (numbers meaningless)

Writes ``experiments/results/profile_step/profile.{json,md}`` with the command, machine,
versions and date. PyTorch is never a dependency of the package (see
``bench_vs_torch.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from experiments import REPO
from experiments import RESULTS as RESULTS_ROOT
from experiments.common.provenance import describe_machine, git_commit, machine
from experiments.common.results import command, utc_now, write
from experiments.common.timing import Worker, alternate, serve, summary, timed

RESULTS = RESULTS_ROOT / "profile_step"
BATCH = 128
SHAPES = ((32, 16, 7), (16, 32, 6), (8, 64, 6))  # (H = W, channels, how many in ResNet-20)
CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
CANDIDATES = {
    # name: (XLA_FLAGS, in-worker variant)
    "base": (CONV_FLAG, "base"),
    "plain_wgrad": (CONV_FLAG, "plain_wgrad"),
    "custom_bn": (CONV_FLAG, "custom_bn"),
    "split_batch": (CONV_FLAG, "split_batch"),
    "bf16": (CONV_FLAG, "bf16"),
    "flag_xnn_conv": (
        f"{CONV_FLAG} --xla_cpu_experimental_xnn_fusion_type=individual_convolution",
        "base",
    ),
    "flag_onednn": (f"{CONV_FLAG} --xla_cpu_use_onednn=true", "base"),
    "flag_concurrency_scheduler": (
        f"{CONV_FLAG} --xla_cpu_enable_concurrency_optimized_scheduler=true",
        "base",
    ),
    "no_bn (bound)": (CONV_FLAG, "no_bn"),
}
SPLIT_CHUNKS = 8


def _median_ms(fn, *args, reps: int) -> float:
    """Median wall time of ``fn(*args)`` in ms, over ``reps`` calls after three untimed ones."""
    import jax

    def run():
        jax.block_until_ready(fn(*args))

    timed(run, 3)  # compile + settle
    return summary(timed(run, reps))["step_s_median"] * 1e3


# --------------------------------------------------------------------------- formulations


def _conv(x, w):
    from jax import lax

    return lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _conv_nchw(x, w):
    from jax import lax

    return lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
    )


def _fwd_dgrad_wgrad(x, w, dy):
    import jax

    y, vjp = jax.vjp(_conv, x, w)
    return y, vjp(dy)


def _wgrad_xla(x, w, dy):
    import jax

    return jax.vjp(lambda w: _conv(x, w), w)[1](dy)[0]


def _dgrad_xla(x, w, dy):
    import jax

    return jax.vjp(lambda x: _conv(x, w), x)[1](dy)[0]


def _wgrad_im2col(x, w, dy):
    import jax.numpy as jnp

    _, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.stack([xp[:, i : i + h, j : j + wd, :] for i in range(3) for j in range(3)], 3)
    return jnp.einsum("nhwkc,nhwo->kco", cols, dy).reshape(w.shape)


def _wgrad_shifted(x, w, dy):
    import jax.numpy as jnp

    _, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    d2 = dy.reshape(-1, dy.shape[-1])
    taps = [
        xp[:, i : i + h, j : j + wd, :].reshape(-1, c).T @ d2 for i in range(3) for j in range(3)
    ]
    return jnp.stack(taps).reshape(w.shape)


def _wgrad_transposed_conv(x, w, dy):
    from jax import lax

    dk = lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    return dk.transpose(1, 2, 0, 3)


def _wgrad_split(x, w, dy):
    import jax

    from gcgd_jax.ops import chunked_wgrad_conv

    def conv(w):
        return chunked_wgrad_conv(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    return jax.vjp(conv, w)[1](dy)[0]


def _bn_relu(x, scale, bias):
    import jax
    import jax.numpy as jnp

    m = jnp.mean(x, (0, 1, 2))
    v = jnp.mean(jnp.square(x), (0, 1, 2)) - m * m
    return jax.nn.relu((x - m) * jax.lax.rsqrt(v + 1e-5) * scale + bias)


def _chunked_conv_general_dilated(lhs, rhs, *args, **kwargs):
    """``lax.conv_general_dilated`` run on batch chunks, concatenated (autodiff does the rest)."""
    import jax.numpy as jnp
    from jax import lax

    kwargs.pop("out_sharding", None)
    if lhs.shape[0] % SPLIT_CHUNKS:
        return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
    parts = [
        lax.conv_general_dilated(a, rhs, *args, **kwargs) for a in jnp.split(lhs, SPLIT_CHUNKS)
    ]
    return jnp.concatenate(parts, 0)


def _custom_batch_norm_call(self, x, use_running_average=None, *, mask=None):
    """``nnx.BatchNorm.__call__`` (training mode) with one-pass stats and a hand-written VJP."""
    import jax
    import jax.numpy as jnp

    if self.use_running_average if use_running_average is None else use_running_average:
        r = jax.lax.rsqrt(self.var[...] + self.epsilon)
        return (x - self.mean[...]) * r * self.scale[...] + self.bias[...]
    eps = self.epsilon

    def stats(x):
        x2 = x.reshape(-1, x.shape[-1])
        m = jnp.mean(x2, 0)
        return m, jnp.maximum(jnp.mean(jnp.square(x2), 0) - m * m, 0.0)

    @jax.custom_vjp
    def bn(x, s, b):
        m, v = stats(x)
        return (x - m) * (jax.lax.rsqrt(v + eps) * s) + b, m, v

    def fwd(x, s, b):
        m, v = stats(x)
        r = jax.lax.rsqrt(v + eps)
        return ((x - m) * (r * s) + b, m, v), (x, m, r, s)

    def bwd(res, cts):
        dy = cts[0]
        x, m, r, s = res
        c = x.shape[-1]
        n = x.size // c
        d2, xh = dy.reshape(-1, c), ((x - m) * r).reshape(-1, c)
        db, ds = jnp.sum(d2, 0), jnp.sum(d2 * xh, 0)
        return ((s * r) * (d2 - (db + xh * ds) / n)).reshape(x.shape), ds, db

    bn.defvjp(fwd, bwd)
    y, m, v = bn(x, self.scale[...], self.bias[...])
    self.mean[...] = jax.lax.stop_gradient(self.momentum * self.mean[...] + (1 - self.momentum) * m)
    self.var[...] = jax.lax.stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * v)
    return y


def _affine_only_call(self, x, use_running_average=None, *, mask=None):
    return x * self.scale[...] + self.bias[...]


# --------------------------------------------------------------------------- workers


def _ops_worker(reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    wgrads = {
        "wgrad_im2col": _wgrad_im2col,
        "wgrad_shifted_matmuls": _wgrad_shifted,
        "wgrad_transposed_conv": _wgrad_transposed_conv,
        f"wgrad_split{SPLIT_CHUNKS}": _wgrad_split,
    }
    rows = []
    key = jax.random.PRNGKey(0)
    for hw, c, count in SHAPES:
        kx, kw, kd = jax.random.split(key, 3)
        x = jax.random.normal(kx, (BATCH, hw, hw, c))
        w = jax.random.normal(kw, (3, 3, c, c)) * 0.1
        dy = jax.random.normal(kd, x.shape)
        scale, bias = jnp.ones(c), jnp.zeros(c)
        row = {"hw": hw, "channels": c, "count": count}
        row["fwd"] = _median_ms(jax.jit(_conv), x, w, reps=reps)
        row["dgrad"] = _median_ms(jax.jit(_dgrad_xla), x, w, dy, reps=reps)
        row["wgrad"] = _median_ms(jax.jit(_wgrad_xla), x, w, dy, reps=reps)
        row["fwd_dgrad_wgrad"] = _median_ms(jax.jit(_fwd_dgrad_wgrad), x, w, dy, reps=reps)
        # NCHW: the layout change of the inputs is done once, outside the timed function.
        xc, wc, dc = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), dy.transpose(0, 3, 1, 2)

        def nchw(xc, wc, dc):
            y, vjp = jax.vjp(_conv_nchw, xc, wc)
            return y, vjp(dc)

        row["fwd_dgrad_wgrad_nchw"] = _median_ms(jax.jit(nchw), xc, wc, dc, reps=reps)
        for name, fn in wgrads.items():
            row[name] = _median_ms(jax.jit(fn), x, w, dy, reps=reps)

        def bn_fwd_bwd(x, s, b, dy):
            return jax.vjp(_bn_relu, x, s, b)[1](dy)

        row["bn_relu_fwd_bwd"] = _median_ms(jax.jit(bn_fwd_bwd), x, scale, bias, dy, reps=reps)
        rows.append(row)
    return {"rows": rows}


def _build_step(variant: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments.common.bare_step import make_bare_step
    from gcgd_jax.models import resnet20
    from gcgd_jax.ops import conv as conv_ops

    if variant in ("plain_wgrad", "split_batch"):
        conv_ops.CHUNKED_WGRAD = False
    if "custom_bn" in variant:
        nnx.BatchNorm.__call__ = _custom_batch_norm_call
    elif variant == "no_bn":
        nnx.BatchNorm.__call__ = _affine_only_call
    model = resnet20(10, in_channels=3, rngs=nnx.Rngs(0))
    model.train()
    if variant == "split_batch":
        for _, module in nnx.iter_graph(model):
            if isinstance(module, nnx.Conv):
                module.conv_general_dilated = _chunked_conv_general_dilated
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (BATCH, 32, 32, 3))
    y = jnp.arange(BATCH) % 10
    compute = jnp.bfloat16 if variant == "bf16" else jnp.float32
    run, _ = make_bare_step(model, x, y, compute=compute)
    return run


def _step_worker(variant: str, steps: int) -> dict:
    run = _build_step(variant)
    (first,) = timed(run, 1)  # compile + run
    timed(run, 3)
    return {"times": timed(run, steps), "first_step_s": first}


def _profile_worker(steps: int) -> dict:
    import collections
    import re
    import tempfile

    import jax

    run = _build_step("base")
    timed(run, 4)
    wall = sum(timed(run, steps)) / steps
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                run()
        (pb,) = Path(d).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(pb))
    per_cat: collections.Counter = collections.Counter()
    threads = set()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name:
                continue
            threads.add(line.name)
            for ev in line.events:
                name = re.sub(r"\.\d+$", "", ev.name)
                if name.startswith(("end: ", "ThreadpoolListener", "SlinkyThreadPool")):
                    continue
                per_cat[name] += ev.duration_ns
    untraced = per_cat.pop("ThunkExecutor::Execute", 0)
    cats = {k: v / steps / 1e6 for k, v in per_cat.most_common()}
    return {
        "step_ms": wall * 1e3,
        "threads": len(threads),
        "categories_thread_ms": cats,
        "thunk_executor_other_thread_ms": untraced / steps / 1e6,
    }


def _torch_ops(reps: int, shapes: list) -> dict:
    """The same convolutions and BatchNorm in PyTorch (channels_last), both cores (its own
    Python: torch is never a dependency of the package)."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))

    def med(f) -> float:
        timed(f, 3)
        return summary(timed(f, reps))["step_s_median"] * 1e3

    rows = []
    for hw, c, count in shapes:
        cl = torch.channels_last
        x = torch.randn(BATCH, c, hw, hw).to(memory_format=cl).requires_grad_()
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=cl)
        bn = torch.nn.BatchNorm2d(c)
        g = torch.randn(BATCH, c, hw, hw).to(memory_format=cl)

        def fb(conv=conv, x=x, g=g):
            torch.autograd.grad(conv(x), (x, conv.weight), g)

        def bnfb(bn=bn, x=x, g=g):
            torch.autograd.grad(torch.relu(bn(x)), (x, bn.weight, bn.bias), g)

        rows.append({"hw": hw, "channels": c, "count": count, "fwd": med(lambda: conv(x)),
                     "fwd_dgrad_wgrad": med(fb), "bn_relu_fwd_bwd": med(bnfb)})  # fmt: skip
    return {"rows": rows, "torch": torch.__version__}


def _serve(kind: str) -> None:
    """A worker (:func:`~experiments.common.timing.serve`): ``torch`` answers ``{"reps",
    "shapes"}`` with :func:`_torch_ops`; ``jax`` answers ``{"part": "ops" | "step" |
    "profile", ...}``. A step variant patches the libraries for good: one request per
    worker."""
    if kind == "torch":
        import torch

        serve(lambda req: _torch_ops(req["reps"], req["shapes"]), {"torch": torch.__version__})
        return
    import jax

    parts = {
        "ops": lambda req: _ops_worker(req["reps"]),
        "step": lambda req: _step_worker(req["variant"], req["steps"]),
        "profile": lambda req: _profile_worker(req["steps"]),
    }
    version = {"jax": jax.__version__}  # in every answer too, as the record has it
    serve(lambda req: {**parts[req["part"]](req), **version}, hello=version)


def _worker(kind: str, flags: str = "", *, python: str = sys.executable, one_core: bool = False):
    """A fresh :class:`~experiments.common.timing.Worker` (``XLA_FLAGS=flags``; with
    ``one_core``, pinned to one core)."""
    env = dict(os.environ, XLA_FLAGS=flags)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [python, __file__, "--worker", kind]
    if one_core:
        cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]
    return Worker(f"profile_step {kind}", cmd, cwd=REPO, env=env, hello=True)


def _ask_once(request: dict, flags: str = CONV_FLAG, **kwargs) -> tuple[dict, dict]:
    """``(hello, answer)`` of one request to a fresh worker."""
    with _worker("jax", flags, **kwargs) as w:
        return w.hello, w.ask(request)


# --------------------------------------------------------------------------- report


def _weighted(rows: list[dict], key: str) -> float:
    return sum(r[key] * r["count"] for r in rows)


def _markdown(rec: dict) -> str:
    m = rec["machine"]
    out = [
        f"# ResNet-20 train step: where the time goes ({'QUICK SMOKE RUN' if rec['quick'] else 'full run'})",
        "",
        f"- command: `{rec['command']}`",
        f"- date (UTC): {rec['date_utc']}; code: commit {rec.get('commit') or 'unknown'}",
        f"- machine: {describe_machine(m)}; jax {rec['jax']}"
        + (
            f"; PyTorch {rec['torch_ops']['torch']}" if rec.get("torch_ops") else "; PyTorch absent"
        ),
        "- batch 128, float32, NHWC (PyTorch: channels_last); medians; ms",
        "",
    ]
    ops = rec.get("ops")
    if ops:
        two, one = ops["two_cores"]["rows"], ops["one_core"]["rows"]
        torch_rows = (rec.get("torch_ops") or {}).get("rows")
        out += ["## Convolutions and BatchNorm, per op (3x3, stride 1)", ""]
        cols = ["fwd", "dgrad", "wgrad", "wgrad_im2col", "wgrad_shifted_matmuls",
                "wgrad_transposed_conv", f"wgrad_split{SPLIT_CHUNKS}", "bn_relu_fwd_bwd"]  # fmt: skip
        cols += [c for c in ("fwd_dgrad_wgrad", "fwd_dgrad_wgrad_nchw") if c in two[0]]
        out += ["| shape (x count) | cores | " + " | ".join(cols) + " |",
                "|---|---|" + "---:|" * len(cols)]  # fmt: skip
        for r2, r1 in zip(two, one, strict=True):
            for label, r in (("2", r2), ("1", r1)):
                out.append(
                    f"| {r['hw']}x{r['hw']}x{r['channels']} (x{r['count']}) | {label} | "
                    + " | ".join(f"{r[c]:.2f}" for c in cols)
                    + " |"
                )
        for label, rows in (("2", two), ("1", one)):
            out.append(
                f"| **ResNet-20 total** | {label} | "
                + " | ".join(f"**{_weighted(rows, c):.1f}**" for c in cols)
                + " |"
            )
        out.append("")
        if torch_rows:
            out += ["PyTorch, same shapes, both cores (fwd; fwd + dgrad + wgrad; BN + ReLU fwd + bwd):", "",
                    "| shape (x count) | fwd | fwd+dgrad+wgrad | bn_relu_fwd_bwd |", "|---|---:|---:|---:|"]  # fmt: skip
            for r in torch_rows:
                out.append(f"| {r['hw']}x{r['hw']}x{r['channels']} (x{r['count']}) | {r['fwd']:.2f} | "
                           f"{r['fwd_dgrad_wgrad']:.2f} | {r['bn_relu_fwd_bwd']:.2f} |")  # fmt: skip
            ours = _weighted(two, "fwd") + _weighted(two, "dgrad") + _weighted(two, "wgrad")
            out += [
                (
                    f"| **total** | **{_weighted(torch_rows, 'fwd'):.1f}** | "
                    f"**{_weighted(torch_rows, 'fwd_dgrad_wgrad'):.1f}** | "
                    f"**{_weighted(torch_rows, 'bn_relu_fwd_bwd'):.1f}** |"
                ),
                "",
                (
                    f"Convolutions of one step (fwd + dgrad + wgrad), ours: {ours:.1f} ms, "
                    f"PyTorch: {_weighted(torch_rows, 'fwd_dgrad_wgrad'):.1f} ms; BatchNorm + "
                    f"ReLU, ours {_weighted(two, 'bn_relu_fwd_bwd'):.1f} ms, PyTorch "
                    f"{_weighted(torch_rows, 'bn_relu_fwd_bwd'):.1f} ms."
                ),
                "",
            ]
    prof = rec.get("profile")
    if prof:
        out += [
            "## The step under jax.profiler (base)",
            "",
            (
                f"Step {prof['step_ms']:.1f} ms wall on {prof['threads']} XLA worker threads "
                f"({prof['threads'] * prof['step_ms']:.0f} thread-ms available). Thread-ms per "
                "step by op category; the convolutions run inside Eigen's thread pool and are "
                "not named by the trace: they are most of the "
                f"{prof['thunk_executor_other_thread_ms']:.1f} thread-ms of unnamed "
                "`ThunkExecutor::Execute` time."
            ),
            "",
            "| op category | thread-ms per step |",
            "|---|---:|",
        ]
        for k, v in list(prof["categories_thread_ms"].items())[:14]:
            out.append(f"| `{k}` | {v:.1f} |")
        out.append("")
    step = rec.get("step")
    if step:
        base = step["base"]["median_ms"]
        out += [
            "## The whole step with each candidate",
            "",
            (
                f"{rec['rounds']} alternating rounds x {rec['steps']} timed steps, fresh process "
                "per round and candidate (first step = compile + run)."
            ),
            "",
            "| candidate | median ms | min | max | vs base | first step s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, s in step.items():
            out.append(
                f"| {name} | {s['median_ms']:.1f} | {s['min_ms']:.1f} | {s['max_ms']:.1f} | "
                f"{base / s['median_ms']:.3f}x | {s['first_step_s']:.1f} |"
            )
        out.append("")
    return "\n".join(out) + "\n"


def _step_summary(pooled: dict[str, list[float]], first: dict[str, list[float]]) -> dict:
    """The ``step`` part's record: each candidate's pooled step times (ms) and its median
    first step (compile + run, one per fresh process)."""
    out = {}
    for name, t in pooled.items():
        s = summary(t)
        out[name] = {
            "median_ms": s["step_s_median"] * 1e3,
            "min_ms": s["step_s_min"] * 1e3,
            "max_ms": s["step_s_max"] * 1e3,
            "n": s["n"],
            "first_step_s": summary(first[name])["step_s_median"],
            "times_s": t,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--worker":
        _serve(argv[1])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["ops", "profile", "step"],
                   choices=["ops", "profile", "step"])  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="step candidates to run")
    p.add_argument("--torch-python", default=os.environ.get("GCGD_TORCH_PYTHON"))
    p.add_argument("--quick", action="store_true", help="1 round, 2 steps, 3 reps")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.reps = 1, 2, 3
    rec: dict = {
        "command": command("experiments.bench.profile_step", argv),
        "date_utc": utc_now(),
        "commit": git_commit(),
        "machine": machine(with_jax=False),  # the workers' jax: "jax"
        "quick": args.quick, "rounds": args.rounds, "steps": args.steps, "reps": args.reps,
    }  # fmt: skip
    if "ops" in args.parts:
        print("[profile_step] ops, both cores ...", flush=True)
        hello, two = _ask_once({"part": "ops", "reps": args.reps})
        print("[profile_step] ops, one core ...", flush=True)
        _, one = _ask_once({"part": "ops", "reps": args.reps}, one_core=True)
        rec["ops"] = {"two_cores": two, "one_core": one}
        rec["jax"] = hello["jax"]
        if args.torch_python and Path(args.torch_python).exists():
            print("[profile_step] PyTorch ops ...", flush=True)
            try:
                with _worker("torch", python=args.torch_python) as w:
                    rec["torch_ops"] = w.ask({"reps": args.reps, "shapes": SHAPES})
            except RuntimeError as err:
                print(f"[profile_step] PyTorch failed: {err}", flush=True)
        else:
            print("[profile_step] no PyTorch (--torch-python): its ops are skipped", flush=True)
    if "profile" in args.parts:
        print("[profile_step] profile ...", flush=True)
        hello, rec["profile"] = _ask_once({"part": "profile", "steps": max(args.steps, 2)})
        rec["jax"] = hello["jax"]
    if "step" in args.parts:
        first: dict[str, list[float]] = {n: [] for n in args.only or CANDIDATES}

        def measure(_: int, name: str) -> list[float]:
            """One fresh process per round and candidate (its flags; its patches)."""
            flags, variant = CANDIDATES[name]
            hello, res = _ask_once({"part": "step", "variant": variant, "steps": args.steps}, flags)
            first[name].append(res["first_step_s"])
            rec["jax"] = hello["jax"]
            return res["times"]

        rec["step"] = _step_summary(alternate(list(first), args.rounds, measure), first)
    stem = "profile_quick" if args.quick else "profile"
    write(args.out, stem, rec, _markdown(rec))
    print(f"[profile_step] wrote {args.out / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
