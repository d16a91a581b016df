"""The seam between a model's auxiliary outputs and the train step.

A model method (one that lives in the network rather than in the optimizer
chain, such as GC-ODE) reaches training through three things, all generic:

- the model, called as ``model(x, return_aux=True)``, returns ``(logits, aux)``
  where ``aux`` is a dict of float32 scalars by name;
- an :class:`AuxSpec` (static, hashable: part of the compiled step) says which
  of those entries are added to the training objective and with what weight,
  and which are logged, each with its epoch reduction (``"mean"`` over the
  epoch's steps or the ``"last"`` step's value);
- optionally a gradient probe: ``model.new_aux_probe()`` returns an array the
  model is called with (``aux_probe=``) and that the step differentiates
  with the loss; ``model.aux_probe_metrics(probe_grad)`` turns its gradient
  into more named scalars (a measurement carried by the backward pass, e.g.
  GC-ODE's gradient ratio).

The train step, its metrics, the epoch sums and the epoch records handle
every entry by name (:mod:`gcgd_jax.train.step`, :mod:`gcgd_jax.train.trainer`):
a new model-side method registers its names in its spec and needs no change
to the training code.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["AuxSpec", "Reduction"]

#: How an auxiliary metric is reduced over an epoch's steps in the epoch record.
Reduction = Literal["mean", "last"]


@dataclasses.dataclass(frozen=True)
class AuxSpec:
    """What the train step does with a model's auxiliary outputs.

    Attributes:
      loss_weights: ``(name, weight)``: the objective is the data loss plus
        ``weight * aux[name]`` for each.
      metrics: ``(name, reduction)``: logged every step under ``name`` and in
        the epoch record reduced by ``reduction``; names from the probe's
        metrics are listed here too.
      probe: differentiate ``model.new_aux_probe()`` and log
        ``model.aux_probe_metrics`` of its gradient.
    """

    loss_weights: tuple[tuple[str, float], ...] = ()
    metrics: tuple[tuple[str, Reduction], ...] = ()
    probe: bool = False

    def __post_init__(self) -> None:
        for name, reduction in self.metrics:
            if reduction not in ("mean", "last"):
                raise ValueError(
                    f"AuxSpec: metric {name!r} has reduction {reduction!r}; "
                    "expected 'mean' or 'last'."
                )

    @property
    def active(self) -> bool:
        """Whether the model must be called with ``return_aux=True``."""
        return bool(self.loss_weights or self.metrics or self.probe)
