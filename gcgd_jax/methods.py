"""The method registry: every gradient correction the package ships, one entry each.

A :class:`Method` says what a method is (its ``kind``), where its factory is,
how a configuration switches it on (``select``: ``section.key=value``
overrides), its documented defaults, which parameters it applies to and its
reference. Everything that needs to know the methods reads this table:

* configuration validation (``corrections.chain``, ``loss.name``,
  ``loss.penalty``, ``model.gc_ode.mode``, ``gradient.estimator`` and the
  continual-learning runner's ``method.name`` accept exactly the registered values),
* the optimizer builder (:func:`gcgd_jax.train.optim.build_correction`),
* the train step (the loss and gradient function it calls, the optimizer-state
  metrics it reports),
* the comparison suites and the gradient-quality diagnostics (the repository's
  ``experiments`` package),
* the conformance tests (``tests/test_methods.py`` checks that every entry is
  exercised and runs from the command line).

Kinds:

``"transform"``
    an optax ``GradientTransformation`` factory chained before the optimizer
    (``corrections.chain = ["<name>"]``, keyword arguments from
    ``[corrections.<name>]``, applied to the parameters of ``mask``).
``"loss"``
    a per-example loss ``(logits, labels, **options) -> losses`` that replaces
    cross-entropy (``loss.name = "<name>"``; ``options`` maps its keyword
    arguments to ``[loss]`` fields).
``"gradient"``
    a ``jax.value_and_grad`` replacement
    ``(loss_fn, **options, argnums, has_aux) -> value_and_grad_fn``
    (``loss.penalty = "<name>"``).
``"model"``
    a model option: a GC-ODE mode (``[model.gc_ode] mode = "<mode>"``) and its
    controls, or a graph layer the model places (``model.backward_grad_norm``).
``"estimator"``
    a forward-mode gradient estimate that replaces backpropagation
    (``gradient.estimator = "<name>"``; ``options`` maps its keyword arguments to
    ``[gradient]`` fields): :mod:`gcgd_jax.estimators`. ``perturbs = "weights"``:
    ``factory(loss_fn, **options, has_aux, exact)``, a ``value_and_grad``
    replacement on the parameters (any model); ``perturbs = "activities"``:
    ``factory(**options)(model, x, labels, key=key)`` on a model that exposes its
    pre-activations (:class:`gcgd_jax.estimators.ActivityPerturbable`).
``"combination"``
    several methods at once (GCGD = GC-W + GC-ODE).
``"continual"``
    an optax transform for continual learning, fed the old tasks' gradients on
    their episodic memories (``update(..., memory_grads=..., memory_mask=...)``);
    run by :mod:`gcgd_jax.continual` (``gcgd-continual --set method.name=<name>``,
    keyword arguments from ``[method.options]``), not by ``gcgd-train``.

Adding a method = its module (maths and reference in the docstring), one
:class:`Method` entry below, its tests; see ``docs/guides/adding_a_method.md``.

Factories are named by ``"module:attribute"`` strings and imported on first
use, so importing this module (and the configuration code that reads it)
stays light.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "MASKS",
    "METHODS",
    "Kind",
    "MaskName",
    "Method",
    "by_value",
    "config_values",
    "gc_w_v2_mean_objective",
    "get",
    "methods_of_kind",
]

#: What a method is: an optax transform, a loss, a gradient function, a model option, a
#: combination or a continual-learning transform (see the module docstring).
Kind = Literal["transform", "loss", "gradient", "estimator", "model", "combination", "continual"]
#: The named parameter masks a transform can apply to (``corrections.<name>.mask``).
MaskName = Literal["all", "all_kernels", "pre_downsampling", "pre_downsampling_block"]
#: Every :data:`MaskName`, in order.
MASKS: tuple[MaskName, ...] = ("all", "all_kernels", "pre_downsampling", "pre_downsampling_block")

# The configuration key a kind's ``value`` is written to.
_CONFIG_KEY: dict[str, str] = {
    "transform": "corrections.chain",
    "loss": "loss.name",
    "gradient": "loss.penalty",
    "estimator": "gradient.estimator",
    "model": "model.gc_ode.mode",
    "continual": "method.name",  # gcgd_jax.continual's configuration
}


def _resolve(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclasses.dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes:
        name: the method's name in suites, reports and ``corrections.chain``.
        kind: see the module docstring.
        summary: one line: what it does.
        reference: where it comes from.
        factory: ``"module:attribute"`` of its factory (None for pure configuration
            entries such as the GC-ODE modes and combinations).
        value: the value of its kind's configuration key (``corrections.chain``
            entry, ``loss.name``, ``loss.penalty``, ``model.gc_ode.mode``, the continual
            runner's ``method.name``); None for
            entries that only combine or re-parameterise others.
        fixed: keyword arguments always passed to the factory (not user options).
        options: ``"loss"``/``"gradient"`` kinds: factory keyword -> ``[loss]`` field;
            ``"estimator"`` kind: factory keyword -> ``[gradient]`` field.
        mask: ``"transform"`` kind: the parameters it applies to by default.
        seeded: the factory takes ``key``, defaulting to the run's seed.
        state_metric: ``(record key, "module:function")``: a scalar read from the
            optimizer state after every step and logged per epoch.
        extra: further configuration overrides that ``select`` adds (e.g. solver
            settings of a control).
        parts: ``"combination"`` kind: the methods it combines.
        control: a control experiment (isolates one ingredient of another method)
            rather than a method one would deploy.
        perturbs: ``"estimator"`` kind: ``"weights"`` or ``"activities"`` (its calling
            convention, see the module docstring).
    """

    name: str
    kind: Kind
    summary: str
    reference: str
    factory: str | None = None
    value: str | None = None
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    mask: MaskName = "all"
    seeded: bool = False
    state_metric: tuple[str, str] | None = None
    extra: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()
    control: bool = False
    perturbs: Literal["weights", "activities"] | None = None

    @property
    def config_key(self) -> str | None:
        """The configuration key its ``value`` goes to (None for combinations)."""
        return _CONFIG_KEY.get(self.kind)

    @property
    def select(self) -> tuple[str, ...]:
        """Configuration overrides that switch this method on (from the baseline)."""
        if self.kind == "combination":
            out: list[str] = []
            for part in self.parts:
                out += get(part).select
            return (*_merge_chains(out), *self.extra)
        own = () if self.value is None else (f"{self.config_key}={self.value}",)
        return (*own, *self.extra)

    def options_from(self, section: Any) -> dict[str, Any]:
        """Its factory's keyword arguments read from its configuration section (``options``:
        ``[loss]`` for losses and gradient functions, ``[gradient]`` for estimators)."""
        return {kw: getattr(section, field) for kw, field in self.options.items()}

    def load(self) -> Callable[..., Any]:
        """The factory (imported now)."""
        if self.factory is None:
            raise ValueError(f"method {self.name!r} ({self.kind}) has no factory")
        return _resolve(self.factory)

    def option_names(self) -> tuple[str, ...]:
        """``"transform"`` kind: the keyword options a ``[corrections.<name>]`` table may
        set (its factory's keywords less ``fixed``, plus ``mask``); ``"continual"`` kind:
        those of the continual runner's ``[method.options]`` (its factory's keywords less
        ``fixed``). Imports the factory."""
        if self.kind not in ("transform", "continual"):
            raise ValueError(f"method {self.name!r} ({self.kind}) takes no corrections options")
        accepted = inspect.signature(self.load()).parameters
        own = tuple(k for k in accepted if k not in self.fixed)
        return (*own, "mask") if self.kind == "transform" else own

    def read_state_metric(self, opt_state: Any) -> Any:
        """Its ``state_metric`` read from an optimizer state."""
        if self.state_metric is None:
            raise ValueError(f"method {self.name!r} has no state metric")
        return _resolve(self.state_metric[1])(opt_state)


def _merge_chains(overrides: list[str]) -> list[str]:
    """Joins several ``corrections.chain=x`` overrides into one (``=x,y``)."""
    chain = [o.split("=", 1)[1] for o in overrides if o.startswith("corrections.chain=")]
    rest = [o for o in overrides if not o.startswith("corrections.chain=")]
    return ([f"corrections.chain={','.join(chain)}"] if chain else []) + rest


def gc_w_v2_mean_objective(opt_state: Any) -> Any:
    """Mean of GC-W v2's last predictor objective over its kernels (a logged metric)."""
    import jax.numpy as jnp

    from gcgd_jax.transforms.gc_w_v2 import gc_w_v2_states

    return jnp.mean(jnp.stack([st.objective for st in gc_w_v2_states(opt_state)]))


_PAPER = "Li et al., Gradient Correction beyond Gradient Descent, arXiv 2203.08345 (withdrawn)"

_ENTRIES: tuple[Method, ...] = (
    # ------------------------------------------------------------ optax transforms
    Method(
        "gc_w",
        "transform",
        "GC-W v1: learned, bounded gradient offset by attention across a kernel's output units",
        f"ours; inspired by {_PAPER}",
        factory="gcgd_jax.transforms.gc_w:gc_w",
        value="gc_w",
        mask="pre_downsampling",
        seeded=True,
        state_metric=("gc_w_predictor_loss", "gcgd_jax.transforms.gc_w:gc_w_predictor_loss"),
    ),
    Method(
        "centralize",
        "transform",
        "subtract the fan-in mean per output unit",
        "Yong et al., Gradient Centralization, ECCV 2020, arXiv 2004.01461",
        factory="gcgd_jax.transforms.centralize:centralize",
        value="centralize",
    ),
    Method(
        "channel_directed_h0",
        "transform",
        "smooth the gradient along the output-channel axis (re-weighted H0 metric)",
        "Lao et al., Channel-Directed Gradients for Optimization of CNNs, arXiv 2008.10766",
        factory="gcgd_jax.transforms.channel_directed:channel_directed",
        value="channel_directed_h0",
        fixed=MappingProxyType({"metric": "h0"}),
    ),
    Method(
        "channel_directed_sobolev",
        "transform",
        "smooth the gradient along the output-channel axis (periodic Sobolev metric)",
        "Lao et al., Channel-Directed Gradients for Optimization of CNNs, arXiv 2008.10766",
        factory="gcgd_jax.transforms.channel_directed:channel_directed",
        value="channel_directed_sobolev",
        fixed=MappingProxyType({"metric": "sobolev"}),
    ),
    Method(
        "znorm",
        "transform",
        "per-layer z-score of the gradient",
        "Yun et al., ZNorm, arXiv 2408.01215",
        factory="gcgd_jax.transforms.znorm:znorm",
        value="znorm",
    ),
    Method(
        "agr",
        "transform",
        "g * (1 - |g| / sum |g|) per leaf",
        "Jiang et al., Adaptive Gradient Regularization, arXiv 2407.16944",
        factory="gcgd_jax.transforms.agr:agr",
        value="agr",
    ),
    Method(
        "gc_w_v2",
        "transform",
        "GC-W v2: learned, bounded offset from each coordinate's multi-scale gradient history",
        f"ours; inspired by {_PAPER}",
        factory="gcgd_jax.transforms.gc_w_v2:gc_w_v2",
        value="gc_w_v2",
        mask="pre_downsampling",
        seeded=True,
        state_metric=("gc_w_v2_objective", "gcgd_jax.methods:gc_w_v2_mean_objective"),
    ),
    Method(
        "mars_correction",
        "transform",
        "g + gamma beta1/(1-beta1) (g_t - g_{t-1}), clipped per tensor (MARS-approx)",
        "Yuan et al., MARS, arXiv 2411.10438",
        factory="gcgd_jax.transforms.mars_correction:mars_correction",
        value="mars_correction",
    ),
    Method(
        "grokfast_ema",
        "transform",
        "g + lambda EMA_alpha(g): amplifies the slow part of the gradient",
        "Lee et al., Grokfast, arXiv 2405.20233",
        factory="gcgd_jax.transforms.grokfast_ema:grokfast_ema",
        value="grokfast_ema",
    ),
    # ------------------------------------------------------------ losses and gradient functions
    Method(
        "powergrad",
        "loss",
        "cross-entropy whose backward uses softmax(alpha log p) - q",
        "Das et al., Altering Backward Pass Gradients improves Convergence, arXiv 2111.12495",
        factory="gcgd_jax.losses.powergrad:powergrad_cross_entropy",
        value="powergrad",
        options=MappingProxyType({"alpha": "powergrad_alpha"}),
    ),
    Method(
        "gradient_norm_penalty",
        "gradient",
        "gradient of L + lambda ||grad L|| by finite differences (alpha = 1 is SAM)",
        "Zhao, Zhang & Hu, Penalizing Gradient Norm, ICML 2022, arXiv 2202.03599",
        factory="gcgd_jax.gradients.gradient_norm_penalty:gradient_norm_penalty",
        value="gradient_norm",
        options=MappingProxyType({"radius": "penalty_radius", "alpha": "penalty_alpha"}),
    ),
    # ------------------------------------------------------------ GC-ODE (model options)
    Method(
        "gc_ode_gradient",
        "model",
        "GC-ODE gradient mode: an ODE branch between stage outputs mixes its gradient "
        "into the backbone's (forward unchanged)",
        f"ours; inspired by {_PAPER}",
        value="gradient",
    ),
    Method(
        "gc_ode_branch",
        "model",
        "GC-ODE branch mode: the ODE branch's output is added to the next stage's input",
        f"ours; inspired by {_PAPER}",
        value="branch",
    ),
    Method(
        "gc_ode_euler4",
        "model",
        "control: GC-ODE branch mode with 4 Euler steps (does more integration matter?)",
        "ours",
        extra=("model.gc_ode.mode=branch", "model.gc_ode.solver=euler", "model.gc_ode.steps=4"),
        control=True,
    ),
    Method(
        "gc_ode_scale_only",
        "model",
        "control: gradient mode's gradient re-scaling without the ODE branch",
        "ours",
        value="scale_only",
        control=True,
    ),
    Method(
        "gc_ode_frozen_branch",
        "model",
        "control: gradient mode with the ODE branch frozen at its random init",
        "ours",
        value="frozen_branch",
        control=True,
    ),
    # ------------------------------------------------------------ graph layers (model options)
    Method(
        "backward_grad_norm",
        "model",
        "identity forward; the gradient into every residual block's output is normalised "
        "per sample (RMS 1)",
        "Cabana & Lago-Fernández, Backward Gradient Normalization in Deep Neural Networks, "
        "arXiv 2106.09475",
        factory="gcgd_jax.layers.backward_grad_norm:backward_grad_norm",
        extra=("model.backward_grad_norm=true",),
    ),
    # ------------------------------------------------------------ gradient estimators
    Method(
        "forward_gradient_weights",
        "estimator",
        "FG-W: the directional derivative along N(0, I) weight directions (jax.jvp) times "
        "the direction; unbiased, no reverse pass",
        "Baydin et al., Gradients without Backpropagation, arXiv 2202.08587; Ren et al., "
        "Scaling Forward Gradient With Local Losses, ICLR 2023, arXiv 2210.03310",
        factory="gcgd_jax.estimators.fg_weight:weight_perturbation",
        value="weight_perturbation",
        options=MappingProxyType({"num_directions": "num_directions"}),
        perturbs="weights",
    ),
    Method(
        "forward_gradient_activities",
        "estimator",
        "FG-A: N(0, I) perturbations of the pre-activations (inactive ReLUs left out), "
        "mapped to the weights through each layer alone; unbiased, no reverse pass",
        "Ren et al., Scaling Forward Gradient With Local Losses, ICLR 2023, arXiv 2210.03310",
        factory="gcgd_jax.estimators.fg_activity:activity_perturbation",
        value="activity_perturbation",
        options=MappingProxyType(
            {"num_directions": "num_directions", "mask_inactive": "mask_inactive"}
        ),
        perturbs="activities",
    ),
    Method(
        "guess_transpose",
        "estimator",
        "gradient guess: fresh noise through the next layer's W^T, masked by active ReLUs, "
        "scaled by its directional derivative; biased",
        "Singhal et al., How to guess a gradient, arXiv 2312.04709",
        factory="gcgd_jax.estimators.guesses:gradient_guess",
        value="guess_transpose",
        fixed=MappingProxyType({"family": "transpose"}),
        options=MappingProxyType(
            {"num_directions": "num_directions", "mask_inactive": "mask_inactive"}
        ),
        perturbs="activities",
    ),
    Method(
        "guess_activation_mixing",
        "estimator",
        "gradient guess: random mixtures of the batch's activations, masked by active ReLUs, "
        "scaled by its directional derivative; biased",
        "Singhal et al., How to guess a gradient, arXiv 2312.04709",
        factory="gcgd_jax.estimators.guesses:gradient_guess",
        value="guess_activation_mixing",
        fixed=MappingProxyType({"family": "activation_mixing"}),
        options=MappingProxyType(
            {"num_directions": "num_directions", "mask_inactive": "mask_inactive"}
        ),
        perturbs="activities",
    ),
    # ------------------------------------------------------------ combinations
    Method(
        "gcgd",
        "combination",
        "GCGD = GC-W v1 + GC-ODE in gradient mode",
        f"ours; inspired by {_PAPER}",
        parts=("gc_w", "gc_ode_gradient"),
    ),
    # ------------------------------------------------------------ continual learning
    Method(
        "layerwise_decomposition",
        "continual",
        "per layer: project out the old tasks' task-specific gradient directions, keep the "
        "update from opposing their shared direction",
        "Tang et al., Layerwise Optimization by Gradient Decomposition for Continual "
        "Learning, CVPR 2021, arXiv 2105.07561",
        factory="gcgd_jax.transforms.layerwise_decomposition:layerwise_gradient_decomposition",
        value="layerwise_decomposition",
    ),
    Method(
        "layerwise_decomposition_whole",
        "continual",
        "control: the layerwise decomposition's rule on the whole network as one group "
        "(the paper's ablation)",
        "Tang et al., CVPR 2021, arXiv 2105.07561",
        factory="gcgd_jax.transforms.layerwise_decomposition:layerwise_gradient_decomposition",
        value="layerwise_decomposition_whole",
        fixed=MappingProxyType({"layerwise": False}),
        control=True,
    ),
    Method(
        "gem",
        "continual",
        "GEM: the closest update that increases no old task's memory loss (dual QP)",
        "Lopez-Paz & Ranzato, Gradient Episodic Memory for Continual Learning, NeurIPS "
        "2017, arXiv 1706.08840",
        factory="gcgd_jax.transforms.gem:gem",
        value="gem",
    ),
    Method(
        "agem",
        "continual",
        "A-GEM: project the update when it conflicts with the mean old-task memory gradient",
        "Chaudhry et al., Efficient Lifelong Learning with A-GEM, ICLR 2019, arXiv 1812.00420",
        factory="gcgd_jax.transforms.agem:agem",
        value="agem",
    ),
)

METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in _ENTRIES})
"""Every registered method by name, in registry order."""


def get(name: str) -> Method:
    """The method called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def methods_of_kind(kind: Kind) -> tuple[Method, ...]:
    """The registered methods of one kind, in registry order."""
    return tuple(m for m in METHODS.values() if m.kind == kind)


def config_values(kind: Kind) -> tuple[str, ...]:
    """The values its kind's configuration key accepts from the registry (no defaults)."""
    return tuple(m.value for m in methods_of_kind(kind) if m.value is not None)


def by_value(kind: Kind, value: str) -> Method:
    """The method of ``kind`` whose configuration value is ``value``."""
    for m in methods_of_kind(kind):
        if m.value == value:
            return m
    raise KeyError(
        f"no {kind} method with value {value!r}; known: {', '.join(config_values(kind))}"
    )
