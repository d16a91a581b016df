"""Writes the LocalMixer / forward-gradient parity fixture from the authors' official code.

Reference: Ren, Kornblith, Liao and Hinton, "Scaling Forward Gradient With Local
Losses" (ICLR 2023), official JAX code in google-research/google-research, folder
``local_forward_gradient/``, at commit 8d8a4f1b27753c7580d16261a1468b3d6ad2c3d3. Four
of its files are executed (none is copied into this project): ``train_mixer_supervised.py``
(the model, the losses and the ``update_*`` functions), ``mixer_lib.py``,
``spatial_avg_linear.py`` and ``spatial_avg_linear_v2.py``. Put them in a folder (e.g.
from a clone: ``git -C google-research show <commit>:local_forward_gradient/<file> >
/tmp/lfg/<file>``) and run, from the repository root::

    .venv/bin/python tests/parity/make_estimator_fixtures.py --source /tmp/lfg

(``--clone PATH`` reads the four files from a git clone at the pinned commit instead).
It writes ``tests/parity/fixtures_estimators/local_forward_gradient.npz``. The fixture committed
next to this script was made with Python 3.11, jax 0.10.2, numpy 2.4.6, absl-py 2.5.1,
einops 0.8.2 and flax 0.12.8 (all recorded in its ``meta``), on the CPU.

**Stubs.** ``train_mixer_supervised.py`` imports TensorFlow, TensorFlow Datasets, clu
and the folder's ``augmentations``, ``dataset`` and ``train_utils`` at module level,
for its data pipeline and training loop only. Before importing it, this script puts
empty modules with the few names the import touches into ``sys.modules``
(:func:`install_stubs`: ``tf.config.experimental.list_physical_devices`` returns no
GPU, and ``tf.Tensor`` / ``tf.Variable`` are empty classes for einops, which probes
every framework in ``sys.modules``; the rest are placeholders that raise if called).
absl (real, from the environment) defines the script's flags; :func:`load_official`
parses :data:`FLAGS` programmatically. Their functions print shapes; that goes to
stderr.

**Configuration** (:data:`CONFIG`, :data:`FLAGS`): CIFAR-10 metadata (3 channels, its
mean and std; the official ``preprocess`` normalises the images, ours leaves that to the
data pipeline, so the tests normalise them the same way first), 4x4x3 images, batch 4,
2 blocks, 2x2 patches (P = 4), D = 32 channels in G = 4 groups, 10 classes; every
LayerNorm of our LocalMixer switched on (``begin_ln``, ``middle_ln``, ``post_linear_ln``,
``inter_ln``, ``last_layer_ln``), ``modular_loss`` and ``spatial_loss`` (the paper's
patchwise and groupwise local losses), ``wd=0`` (their SGD weight decay is added inside
every update) and ``last_layer_lr=1`` (their default 0.1 scales the read-out's gradient
inside the update). The parameter list comes from their ``get_layer_sizes`` and
``init_random_params`` (layer order: block 0 dense, block 0 grouped, then per later
block token, dense, grouped; then one head per block; then the read-out), with random
values: kernels at their ``kaiming`` scale (the read-out at 0.1 instead of their zero
init, so that the global gradient reaches the blocks) and biases N(0, 0.1^2).

**Cases.** ``forward``: their ``loss`` (logits, mean read-out cross-entropy, the
replicated local losses [B, P, G] times B). Deterministic gradients: ``backprop``
(``update_backprop``), ``local_backprop`` (``update_local_stopgrad_backprop``) and
``local_backprop_nospatial`` (the same with ``spatial_loss=False``). Estimators, each
with the noise it drew, captured by wrapping ``jax.jvp`` inside their module (the
noise is stored, so that the tests can feed the same directions to ours):
``fgw_local`` (``update_forward_grad_weights``), ``fgw_global``
(``update_global_forward_grad_weights``), ``fga_local``
(``update_forward_grad_activations``), ``fga_global``
(``update_global_forward_grad_activations``) and ``fga_local_nospatial``
(``update_forward_grad_activations`` with ``spatial_loss=False``); all with
``num_passes=1`` and the same key, so the two FG-W cases share one weight noise and the
three FG-A cases one activation noise.

Layout of the ``.npz``: ``meta`` (JSON), ``inputs.*``, ``params.<i>.w`` / ``.b`` (their
list, index ``i``), ``forward.*``, ``<case>.<i>.w`` / ``.b`` and ``noise.weights.<i>.w`` /
``.b`` (the main layers), ``noise.activations.<i>``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import subprocess
import sys
import tempfile
import types
from importlib import metadata
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent / "fixtures_estimators" / "local_forward_gradient.npz"
REPOSITORY = "google-research/google-research"
COMMIT = "8d8a4f1b27753c7580d16261a1468b3d6ad2c3d3"
FOLDER = "local_forward_gradient"
FILES = (
    "train_mixer_supervised.py",
    "mixer_lib.py",
    "spatial_avg_linear.py",
    "spatial_avg_linear_v2.py",
)
COMMAND = ".venv/bin/python tests/parity/make_estimator_fixtures.py --source /tmp/lfg"

CONFIG = {
    "image_shape": [4, 4, 3],
    "batch": 4,
    "num_classes": 10,
    "features": 32,
    "num_blocks": 2,
    "patches_per_side": 2,
    "num_groups": 4,
}
FLAGS = {
    "dataset": "cifar-10",
    "num_blocks": CONFIG["num_blocks"],
    "num_patches": CONFIG["patches_per_side"],
    "num_groups": CONFIG["num_groups"],
    "num_channel_mlp_units": CONFIG["features"],
    "num_channel_mlp_hidden_units": -1,
    "begin_ln": True,
    "middle_ln": True,
    "post_linear_ln": True,
    "inter_ln": True,
    "last_layer_ln": True,
    "modular_loss": True,
    "spatial_loss": True,
    "wd": 0.0,
    "last_layer_lr": 1.0,
    "head_lr": 1.0,
    "num_passes": 1,
    "optimizer": "sgd",
    "init_scheme": "kaiming",
}
SEED = 0
KEY = 7  # jax.random.PRNGKey(KEY) goes into every update function
CASES = {
    "backprop": ("update_backprop", {}),
    "local_backprop": ("update_local_stopgrad_backprop", {}),
    "local_backprop_nospatial": ("update_local_stopgrad_backprop", {"spatial_loss": False}),
    "fgw_local": ("update_forward_grad_weights", {}),
    "fgw_global": ("update_global_forward_grad_weights", {}),
    "fga_local": ("update_forward_grad_activations", {}),
    "fga_global": ("update_global_forward_grad_activations", {}),
    "fga_local_nospatial": ("update_forward_grad_activations", {"spatial_loss": False}),
}


def install_stubs() -> None:
    """Empty stand-ins for the modules the official script imports for data and logging."""

    def unused(name: str):
        def fail(*args, **kwargs):
            raise RuntimeError(f"stub {name} called: not needed for the parity fixtures")

        return fail

    tf = types.ModuleType("tensorflow")
    experimental = types.SimpleNamespace(
        list_physical_devices=lambda kind=None: [], set_memory_growth=unused("set_memory_growth")
    )
    tf.config = types.SimpleNamespace(experimental=experimental)
    # einops (their patchify) probes every framework in sys.modules: nothing is a tf tensor
    tf.Tensor = type("Tensor", (), {})
    tf.Variable = type("Variable", (), {})
    clu = types.ModuleType("clu")
    clu.metric_writers = types.ModuleType("clu.metric_writers")
    modules = {
        "tensorflow": tf,
        "tensorflow_datasets": types.ModuleType("tensorflow_datasets"),
        "clu": clu,
        "clu.metric_writers": clu.metric_writers,
        "augmentations": types.ModuleType("augmentations"),
        "dataset": types.ModuleType("dataset"),
        "train_utils": types.ModuleType("train_utils"),
    }
    modules["dataset"]._decode_and_random_crop = unused("_decode_and_random_crop")
    modules["dataset"]._decode_and_center_crop = unused("_decode_and_center_crop")
    modules["train_utils"].save_checkpoint = unused("save_checkpoint")
    modules["train_utils"].last_checkpoint = unused("last_checkpoint")
    modules["augmentations"].postprocess1 = unused("postprocess1")
    for name, module in modules.items():
        if name in sys.modules:
            raise RuntimeError(f"{name} is already imported; run this script in a fresh Python")
        sys.modules[name] = module


def load_official(source: Path) -> types.ModuleType:
    """Import their training script from ``source`` (with the stubs) and parse the flags."""
    missing = [f for f in FILES if not (source / f).is_file()]
    if missing:
        raise SystemExit(f"{source} lacks {missing} (see the module docstring)")
    install_stubs()
    sys.path.insert(0, str(source))
    official = importlib.import_module("train_mixer_supervised")
    argv = ["make_estimator_fixtures"]
    for name, value in FLAGS.items():
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no{name}")
        else:
            argv.append(f"--{name}={value}")
    official.FLAGS(argv)
    return official


def files_from_clone(clone: Path, into: Path) -> Path:
    for name in FILES:
        text = subprocess.run(
            ["git", "-C", str(clone), "show", f"{COMMIT}:{FOLDER}/{name}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (into / name).write_text(text)
    return into


@contextlib.contextmanager
def captured_tangents(official: types.ModuleType, store: list):
    """Inside, ``jax.jvp`` called by their module records its tangents in ``store``."""
    import jax

    class JaxWithRecordingJvp:
        def __getattr__(self, name):
            return getattr(jax, name)

        @staticmethod
        def jvp(fun, primals, tangents, **kwargs):
            store.append(jax.tree.map(np.asarray, tangents[0]))
            return jax.jvp(fun, primals, tangents, **kwargs)

    official.jax = JaxWithRecordingJvp()
    try:
        yield store
    finally:
        official.jax = jax


def official_params(official: types.ModuleType) -> list[tuple[np.ndarray, np.ndarray]]:
    md = dict(official.get_dataset_metadata(FLAGS["dataset"]))
    height, width, channels = CONFIG["image_shape"]
    assert channels == md["input_channel"]
    md.update(input_height=height, input_width=width)
    sizes = official.get_layer_sizes(
        md,
        FLAGS["num_patches"],
        FLAGS["num_channel_mlp_units"],
        FLAGS["num_blocks"],
        FLAGS["num_groups"],
        True,  # concat_groups (their default)
        True,  # same_head (their default)
        False,  # conv_mixer
        3,  # kernel_size (unused without conv_mixer)
        num_channel_mlp_hidden_units=FLAGS["num_channel_mlp_hidden_units"],
        downsample=[1] * FLAGS["num_blocks"],
        channel_ratio=[1] * FLAGS["num_blocks"],
        group_ratio=[1] * FLAGS["num_blocks"],
    )
    scales = official.get_param_scale(FLAGS["init_scheme"], sizes)
    scales[-1] = 0.1  # their read-out starts at zero; a random one lets gradients through
    with contextlib.redirect_stdout(sys.stderr):
        layout = official.init_random_params(scales, sizes, rng=np.random.RandomState(SEED))
    rng = np.random.default_rng(SEED + 1)
    return [
        (w.astype(np.float32), (0.1 * rng.standard_normal(b.shape)).astype(np.float32))
        for w, b in layout
    ]


def flat(prefix: str, pairs) -> dict[str, np.ndarray]:
    out = {}
    for i, (w, b) in enumerate(pairs):
        out[f"{prefix}.{i}.w"] = np.asarray(w, np.float32)
        out[f"{prefix}.{i}.b"] = np.asarray(b, np.float32)
    return out


def run(official: types.ModuleType) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    md = official.get_dataset_metadata(FLAGS["dataset"])
    rng = np.random.default_rng(SEED + 2)
    batch_size = CONFIG["batch"]
    images = rng.uniform(0.0, 1.0, (batch_size, *CONFIG["image_shape"])).astype(np.float32)
    labels = rng.integers(0, CONFIG["num_classes"], batch_size).astype(np.int32)
    params_np = official_params(official)
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in params_np]
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    arrays = {
        "inputs.image": images,
        "inputs.label": labels,
        "inputs.image_mean": np.asarray(md["image_mean"], np.float32),
        "inputs.image_std": np.asarray(md["image_std"], np.float32),
        **flat("params", params_np),
    }

    with contextlib.redirect_stdout(sys.stderr):  # their code prints shapes
        final, local, (states, _) = official.loss(params, batch, stop_gradient=True, readout=True)
    arrays["forward.logits"] = np.asarray(states["pred_final"])
    arrays["forward.final_loss"] = np.asarray(final)
    for blk, term in enumerate(local):
        arrays[f"forward.local.{blk}"] = np.asarray(term) * batch_size  # undo their 1/B

    num_layers = official.get_num_layers(FLAGS["num_blocks"])
    noises: dict[str, list] = {}
    for case, (function, overrides) in CASES.items():
        for name, value in overrides.items():
            setattr(official.FLAGS, name, value)
        tangents: list = []
        with captured_tangents(official, tangents), contextlib.redirect_stdout(sys.stderr):
            grads, _ = getattr(official, function)(params, batch, jax.random.PRNGKey(KEY))
        for name in overrides:
            setattr(official.FLAGS, name, FLAGS[name])
        arrays.update(flat(case, grads))
        if case.startswith(("fgw", "fga")):
            assert len(tangents) == 1, (case, len(tangents))
            kind = "weights" if case.startswith("fgw") else "activations"
            noises.setdefault(kind, []).append(tangents[0])

    weights = noises["weights"]
    activations = noises["activations"]
    for other in weights[1:]:  # one key: the FG-W cases drew the same noise
        for a, b in zip(jax.tree.leaves(weights[0]), jax.tree.leaves(other)):
            np.testing.assert_array_equal(a, b)
    for other in activations[1:]:
        for a, b in zip(activations[0], other):
            np.testing.assert_array_equal(a, b)
    for i, (w, b) in enumerate(weights[0][num_layers:]):  # the heads are not perturbed
        assert not np.any(w) and not np.any(b), i
    arrays.update(flat("noise.weights", weights[0][:num_layers]))
    for i, dz in enumerate(activations[0]):
        arrays[f"noise.activations.{i}"] = np.asarray(dz, np.float32)
    return arrays


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "numpy", "absl-py", "einops", "flax"):
        found[package] = metadata.version(package)
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--source", type=Path, help="a folder holding the four official files")
    where.add_argument("--clone", type=Path, help="a git clone of google-research")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        source = args.source or files_from_clone(args.clone, Path(tmp))
        official = load_official(source.resolve())
        arrays = run(official)

    meta = {
        "repository": REPOSITORY,
        "commit": COMMIT,
        "folder": FOLDER,
        "files": list(FILES),
        "command": COMMAND,
        "config": CONFIG,
        "flags": FLAGS,
        "key": KEY,
        "seed": SEED,
        "cases": {case: function for case, (function, _) in CASES.items()},
        "overrides": {case: overrides for case, (_, overrides) in CASES.items() if overrides},
        **versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1024:.0f} KiB, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
