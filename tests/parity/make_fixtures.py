"""Writes the parity fixtures: outputs of the authors' own code on fixed inputs.

Run from the repository root, the PyTorch references with a Python that has PyTorch
and NumPy, the gradient-norm penalty's (the authors' code is JAX) with the project's
Python::

    /work/torchvenv/bin/python tests/parity/make_fixtures.py --mirrors /work/.mirror
    .venv/bin/python tests/parity/make_fixtures.py --mirrors /work/.mirror \
        --only gradient_norm_penalty

(without ``--only`` it writes every fixture whose framework the Python has).
``--mirrors`` is a folder holding a git clone of each reference repository; each
reference file is read from it at the commit pinned below and executed as a module at
run time (:mod:`tests.parity.mirrors`); none of it is copied into this project.

The fixtures committed next to this script were made with Python 3.11.7 and numpy
2.4.6, torch 2.13.0+cpu (PyTorch references) and jax 0.10.2 / flax 0.12.8 (the
gradient-norm penalty), all recorded in every fixture's ``meta``, from:

* gradient centralization: Yonghongwei/Gradient-Centralization
  @ ed2a608ccdbb731301e00bf838c83821df1b8d70, ``GC_code/CIFAR100/algorithm/SGD.py``
  (``SGD_GC``, ``SGD_GCC``) and ``.../Adam.py`` (``Adam_GC``, ``Adam_GC2``);
* Grokfast-EMA: ironjr/grokfast @ 93b2248e351d4bb9e4dda8ac32a6999b8970404b,
  ``grokfast.py`` (``gradfilter_ema``);
* MARS-approx (MARS-AdamW): AGI-Arena/MARS @ 4831e28eba863a4e69d7e9474ff8e73bc1b410fe,
  ``MARS/optimizers/mars.py`` (``MARS``);
* AGR: hjiang24/AGR-method (branch master) @ 7680c052a9a28202ead473b6eb2f14f5f485df06,
  ``AGR.py`` (``AGR``);
* gradient-norm penalty: JustNobody0204/gradient-norm-penalty
  @ 5209c85ad7a2a5c0d3dab94f6ddb6ad508c46729, ``gnp/training/training_core.py``
  (``train_step``) with ``gnp/training/utli.py``.

Inputs (PyTorch references): one gradient stream of 12 steps for three leaves in
PyTorch layout -- a conv kernel ``(out 6, in 4, 3, 3)``, a dense weight ``(out 5, in
12)`` and a bias ``(5,)`` -- whose scale changes from step to step by up to four orders
of magnitude (1e-3 .. 8), so per-tensor norms fall on both sides of MARS's clip
threshold 1, with a non-zero mean per output unit (so centralization has something to
remove). Trajectories start from fixed parameters. The JAX side
(``tests/parity/table.py``) transposes every leaf into Flax layout (conv ``(kh, kw, in,
out)``, dense ``(in, out)``) before calling ours and back before comparing. The
gradient-norm penalty is a function of a loss, not of a gradient: its inputs are 10
(parameters, batch) draws of a small MLP whose gradient norms range from 0.2 to 10.

Each ``<method>.npz`` holds ``meta`` (JSON: reference, commit, versions, the settings
of every case), the inputs (``grads.<leaf>`` with steps first and ``params0.<leaf>``,
or ``inputs.*``) and, per case, ``<case>.<leaf>``: the reference's corrected gradients
(transform cases), its parameters after every step (trajectory cases) or its
gradients (the gradient-norm penalty).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import types
import typing
import warnings
from pathlib import Path

import numpy as np

try:  # every reference but the gradient-norm penalty's (JAX) runs on PyTorch
    import torch
except ImportError:
    torch = None

if (root := str(Path(__file__).resolve().parents[2])) not in sys.path:
    sys.path.insert(0, root)  # run as a script: the repository's root, for `tests`
from tests.parity.mirrors import add_mirrors_argument, load_module

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COMMANDS = {
    "torch": "/work/torchvenv/bin/python tests/parity/make_fixtures.py --mirrors /work/.mirror",
    "jax": ".venv/bin/python tests/parity/make_fixtures.py --mirrors /work/.mirror "
    "--only gradient_norm_penalty",
}

STEPS = 12
SCALES = (0.02, 1.5, 0.005, 4.0, 0.1, 0.01, 2.5, 0.05, 8.0, 0.001, 0.3, 1.0)
SHAPES = {"conv": (6, 4, 3, 3), "dense": (5, 12), "bias": (5,)}  # PyTorch layout

REFERENCES = {
    "gc": ("Yonghongwei/Gradient-Centralization", "ed2a608ccdbb731301e00bf838c83821df1b8d70"),
    "grokfast": ("ironjr/grokfast", "93b2248e351d4bb9e4dda8ac32a6999b8970404b"),
    "mars": ("AGI-Arena/MARS", "4831e28eba863a4e69d7e9474ff8e73bc1b410fe"),
    "agr": ("hjiang24/AGR-method", "7680c052a9a28202ead473b6eb2f14f5f485df06"),
    "gnp": ("JustNobody0204/gradient-norm-penalty", "5209c85ad7a2a5c0d3dab94f6ddb6ad508c46729"),
}


# --------------------------------------------------------------------------- inputs


def gradient_stream(seed: int = 0) -> dict[str, np.ndarray]:
    """Per leaf, ``(STEPS, *shape)`` float32 gradients with a per-output-unit offset."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in SHAPES.items():
        offset = rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1))
        steps = [s * (rng.normal(size=shape) + offset) for s in SCALES]
        out[name] = np.stack(steps).astype(np.float32)
    return out


def initial_params(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


# --------------------------------------------------------------------------- references


def load_reference(mirrors: Path, key: str, path: str, name: str | None = None) -> types.ModuleType:
    """The reference file at its pinned commit, executed as a fresh module (registered in
    ``sys.modules`` under ``name`` when given, for the reference's own imports)."""
    module_name = name or f"reference_{key}_{Path(path).stem}"
    return load_module(mirrors, REFERENCES[key], path, module_name, register=name is not None)


def make_params(values: dict[str, np.ndarray]) -> dict[str, torch.nn.Parameter]:
    return {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in values.items()}


def run_optimizer(make_opt, grads, params0) -> dict[str, np.ndarray]:
    """Parameters after every step of the reference optimizer fed the fixed gradients."""
    params = make_params(params0)
    opt = make_opt(list(params.values()))
    trajectory = {k: [] for k in params}
    for t in range(STEPS):
        for k, p in params.items():
            p.grad = torch.from_numpy(grads[k][t].copy())  # a fresh tensor (set_to_none)
        opt.step()
        for k, p in params.items():
            trajectory[k].append(p.detach().numpy().copy())
    return {k: np.stack(v) for k, v in trajectory.items()}


def corrected_by_sgd(optimizer_cls, grads) -> dict[str, np.ndarray]:
    """The gradient an SGD-form optimizer applies: lr 1, no momentum/decay, from 0."""
    out = {k: [] for k in grads}
    for t in range(STEPS):
        params = make_params({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
        opt = optimizer_cls(list(params.values()), lr=1.0)
        for k, p in params.items():
            p.grad = torch.from_numpy(grads[k][t].copy())
        opt.step()
        for k, p in params.items():
            out[k].append(-p.detach().numpy())
    return {k: np.stack(v) for k, v in out.items()}


# --------------------------------------------------------------------------- methods


def centralize_cases(mirrors, grads, params0):
    sgd = load_reference(mirrors, "gc", "GC_code/CIFAR100/algorithm/SGD.py")
    adam = load_reference(mirrors, "gc", "GC_code/CIFAR100/algorithm/Adam.py")
    sgd_kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    adam_kw = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 5e-4}
    cases = {
        "sgd_gc_gradient": ("SGD_GC", "transform", {"lr": 1.0},
                            corrected_by_sgd(sgd.SGD_GC, grads)),
        "sgd_gcc_gradient": ("SGD_GCC", "transform", {"lr": 1.0},
                             corrected_by_sgd(sgd.SGD_GCC, grads)),
        "sgd_gc": ("SGD_GC", "trajectory", sgd_kw,
                   run_optimizer(lambda p: sgd.SGD_GC(p, **sgd_kw), grads, params0)),
        "adam_gc": ("Adam_GC", "trajectory", adam_kw,
                    run_optimizer(lambda p: adam.Adam_GC(p, **adam_kw), grads, params0)),
        "adam_gc2": ("Adam_GC2", "trajectory", adam_kw,
                     run_optimizer(lambda p: adam.Adam_GC2(p, **adam_kw), grads, params0)),
    }  # fmt: skip
    return "gc", ["GC_code/CIFAR100/algorithm/SGD.py", "GC_code/CIFAR100/algorithm/Adam.py"], cases


def grokfast_cases(mirrors, grads, params0):
    ref = load_reference(mirrors, "grokfast", "grokfast.py")
    cases = {}
    for name, kw in {
        "defaults": {"alpha": 0.98, "lamb": 2.0},
        "fast": {"alpha": 0.8, "lamb": 0.5},
    }.items():
        module = torch.nn.Module()
        for k, v in make_params(params0).items():
            module.register_parameter(k, v)
        state, out = None, {k: [] for k in grads}
        for t in range(STEPS):
            for k, p in module.named_parameters():
                p.grad = torch.from_numpy(grads[k][t].copy())
            state = ref.gradfilter_ema(module, grads=state, **kw)
            for k, p in module.named_parameters():
                out[k].append(p.grad.detach().numpy().copy())
        cases[name] = ("gradfilter_ema", "transform", kw, {k: np.stack(v) for k, v in out.items()})
    return "grokfast", ["grokfast.py"], cases


def mars_cases(mirrors, grads, params0):
    ref = load_reference(mirrors, "mars", "MARS/optimizers/mars.py")
    base = {
        "lr": 1e-2, "betas": (0.95, 0.99), "eps": 1e-8, "weight_decay": 0.05, "gamma": 0.025,
        "is_approx": True, "mars_type": "mars-adamw", "lr_1d": 5e-3, "betas_1d": (0.9, 0.95),
        "weight_decay_1d": 0.1,
    }  # fmt: skip
    cases = {}
    for name, kw in {
        "mars_adamw": {**base, "optimize_1d": False},
        "mars_adamw_optimize_1d": {**base, "optimize_1d": True},
        "mars_adamw_gamma_0.1": {**base, "optimize_1d": False, "gamma": 0.1},
    }.items():
        traj = run_optimizer(lambda p, kw=kw: ref.MARS(p, **kw), grads, params0)
        cases[name] = ("MARS", "trajectory", kw, traj)
    return "mars", ["MARS/optimizers/mars.py"], cases


def agr_cases(mirrors, grads, params0):
    ref = load_reference(mirrors, "agr", "AGR.py")

    def apply(stream):
        out = {k: [] for k in stream}
        for t in range(len(next(iter(stream.values())))):
            for k, v in stream.items():
                p = torch.nn.Parameter(torch.zeros(v.shape[1:]))
                p.grad = torch.from_numpy(v[t].copy())
                out[k].append(ref.AGR(p).grad.detach().numpy().copy())
        return {k: np.stack(v) for k, v in out.items()}

    # An all-zero dense weight and bias at one step: the reference divides 0 by 0 there.
    zero = {k: v[:1].copy() for k, v in grads.items()}
    zero["dense"][:] = 0.0
    zero["bias"][:] = 0.0
    with np.errstate(invalid="ignore"):
        cases = {
            "agr": ("AGR", "transform", {}, apply(grads)),
            "agr_zero_leaf": ("AGR", "transform", {"inputs": "grads_zero"}, apply(zero)),
        }
    extra = {f"grads_zero.{k}": v for k, v in zero.items()}
    return "agr", ["AGR.py"], cases, extra


def gnp_cases(mirrors, grads, params0):
    """The gradient-norm penalty's official ``train_step`` (JAX) on a small MLP's loss.

    The reference is the authors' JAX code of 2022 (``flax.optim``, ``jax.tree_multimap``).
    Run with today's JAX it needs names that have since been removed; they are provided
    here as the renamed functions (``jax.tree_multimap = jax.tree.map`` ...) or as empty
    stand-ins used only in annotations and unused imports (``flax.optim``, ``flax.nn``,
    ``tensorflow.io.gfile``). Their ``FLAGS.config`` is replaced by the settings of each
    case; the optimizer object only hands back the gradient ``train_step`` passes to
    ``apply_gradient`` (after their one-replica ``pmean``; their gradient clipping is
    switched off, ``gradient_clipping = 0``: it is the optimizer's, not the method's).
    """
    del grads, params0  # a loss is needed here, not a gradient stream
    import flax
    import jax
    import jax.numpy as jnp

    for old, new in {"tree_multimap": jax.tree.map, "tree_map": jax.tree.map,
                     "tree_leaves": jax.tree.leaves}.items():  # fmt: skip
        if not hasattr(jax, old):
            setattr(jax, old, new)
    stub = types.SimpleNamespace
    flax.optim = sys.modules["flax.optim"] = types.ModuleType("flax.optim")
    flax.optim.Optimizer = object
    flax.nn = stub(Model=object, Collection=object)
    import flax.training.checkpoints  # before the tensorflow stand-in: flax.io looks for it

    tf_io = types.ModuleType("tensorflow.io")
    tf_io.gfile = None
    sys.modules.setdefault("tensorflow", types.ModuleType("tensorflow")).io = tf_io
    sys.modules["tensorflow.io"] = tf_io
    for package in ("gnp", "gnp.training"):
        sys.modules[package] = types.ModuleType(package)
    utli = load_reference(mirrors, "gnp", "gnp/training/utli.py", "gnp.training.utli")
    sys.modules["gnp.training"].utli = utli
    core = load_reference(
        mirrors, "gnp", "gnp/training/training_core.py", "gnp.training.training_core"
    )

    class _State(typing.NamedTuple):
        step: typing.Any

    class _Optimizer(typing.NamedTuple):
        target: typing.Any
        state: typing.Any

        def apply_gradient(self, grad, learning_rate):
            del learning_rate
            return _Optimizer(grad, self.state)

    inputs = gnp_inputs()

    def apply_fn(variables, inputs, train, rngs, mutable):
        del train, rngs, mutable
        return gnp_logits(variables["params"], inputs), {}

    cases = {}
    for name, settings in GNP_CASES.items():
        gnp_config = stub(r=settings["radius"], alpha=settings["alpha"], sync_perturbations=False,
                          norm_perturbations=settings["norm_perturbations"])  # fmt: skip
        config = stub(no_weight_decay_on_bn=False, asam=False, use_dual_in_adam=False,
                      gradient_clipping=0.0, label_smoothing=0.0, gnp=gnp_config)  # fmt: skip
        core.FLAGS = utli.FLAGS = stub(config=config)
        out = {k: [] for k in GNP_LEAVES}
        for t in range(len(inputs["x"])):
            params = {k: jnp.asarray(inputs[f"params.{k}"][t]) for k in GNP_LEAVES}
            batch = {"image": jnp.asarray(inputs["x"][t]),
                     "label": jax.nn.one_hot(inputs["labels"][t], GNP_CLASSES)}  # fmt: skip

            def step(_, params=params, batch=batch):
                optimizer = _Optimizer(params, _State(jnp.zeros((), jnp.int32)))
                new_optimizer, *_ = core.train_step(
                    optimizer, {}, batch, jax.random.key(0), lambda s: 0.1, 0.0, apply_fn
                )
                return new_optimizer.target

            grad = jax.vmap(step, axis_name="batch")(jnp.zeros(1))
            for k in GNP_LEAVES:
                out[k].append(np.asarray(grad[k][0]))
        ref = f"train_step, norm_perturbations={settings['norm_perturbations']}"
        cases[name] = (ref, "gradient", settings, {k: np.stack(v) for k, v in out.items()})
    extra = {f"inputs.{k}": v for k, v in inputs.items()}
    versions = {"jax": jax.__version__, "flax": flax.__version__}
    return "gnp", ["gnp/training/training_core.py", "gnp/training/utli.py"], cases, extra, versions


#: The gradient-norm penalty's loss: a 6-8-4 tanh MLP, softmax cross-entropy, mean over 16.
GNP_LEAVES = ("w1", "b1", "w2", "b2")
GNP_CLASSES = 4
GNP_STEPS = 10
GNP_CASES = {
    "paper_recipe": {"radius": 0.1, "alpha": 0.8, "norm_perturbations": True},
    "paper_recipe_raw_first_term": {"radius": 0.1, "alpha": 0.8, "norm_perturbations": False},
    "sam": {"radius": 0.05, "alpha": 1.0, "norm_perturbations": True},
}


def gnp_inputs(seed: int = 2) -> dict[str, np.ndarray]:
    """``GNP_STEPS`` independent (parameters, batch) draws; the scales of the parameters
    and of the inputs (and so the gradient norm) change from draw to draw."""
    rng = np.random.default_rng(seed)
    shapes = {"w1": (6, 8), "b1": (8,), "w2": (8, GNP_CLASSES), "b2": (GNP_CLASSES,)}
    scales = np.geomspace(0.03, 3.0, GNP_STEPS)
    out = {f"params.{k}": np.stack([s * rng.normal(size=shape) for s in scales]).astype(np.float32)
           for k, shape in shapes.items()}  # fmt: skip
    x_scales = np.geomspace(0.1, 10.0, GNP_STEPS)[:, None, None]
    out["x"] = (x_scales * rng.normal(size=(GNP_STEPS, 16, 6))).astype(np.float32)
    out["labels"] = rng.integers(0, GNP_CLASSES, size=(GNP_STEPS, 16)).astype(np.int32)
    return out


def gnp_logits(params, x):
    """The MLP both sides differentiate (``tests/parity/table.py`` imports it)."""
    import jax.numpy as jnp

    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


METHODS = {  # method: (framework, cases)
    "centralize": ("torch", centralize_cases),
    "grokfast_ema": ("torch", grokfast_cases),
    "mars_correction": ("torch", mars_cases),
    "agr": ("torch", agr_cases),
    "gradient_norm_penalty": ("jax", gnp_cases),
}


def _available(framework: str) -> bool:
    return importlib.util.find_spec(framework) is not None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mirrors_argument(parser)
    parser.add_argument(
        "--only", nargs="*", choices=sorted(METHODS),
        help="methods to write (default: every one whose framework this Python has)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    only = args.only or [m for m, (fw, _) in METHODS.items() if _available(fw)]
    skipped = sorted(set(METHODS) - set(only))
    if skipped:
        print(f"not written here (framework missing or not selected): {', '.join(skipped)}")
    warnings.filterwarnings("ignore", category=UserWarning)  # the GC code's deprecated add_
    grads, params0 = gradient_stream(), initial_params()
    FIXTURES.mkdir(exist_ok=True)
    for method in only:
        framework, make = METHODS[method]
        if framework == "torch":
            torch.manual_seed(0)
        key, files, cases, *rest = make(args.mirrors, grads, params0)
        extra = rest[0] if rest else {}
        versions = rest[1] if len(rest) > 1 else {"torch": torch.__version__}
        repo, commit = REFERENCES[key]
        meta = {
            "method": method,
            "repository": repo,
            "commit": commit,
            "files": files,
            "command": COMMANDS[framework],
            "python": platform.python_version(),
            "numpy": np.__version__,
            **versions,
            "cases": {
                name: {"reference": ref, "kind": kind, "settings": settings}
                for name, (ref, kind, settings, _) in cases.items()
            },
        }
        arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
        if framework == "torch":
            meta |= {"steps": STEPS, "scales": SCALES, "layout": "pytorch"}
            arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
            arrays |= {f"grads.{k}": v for k, v in grads.items()}
            arrays |= {f"params0.{k}": v for k, v in params0.items()}
        arrays |= extra
        for name, (*_, outputs) in cases.items():
            arrays |= {f"{name}.{k}": np.asarray(v, np.float32) for k, v in outputs.items()}
        target = FIXTURES / f"{method}.npz"
        np.savez_compressed(target, **arrays)
        print(f"{target}: {', '.join(cases)} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    sys.exit(main())
