"""Command-line overrides: ``section.key=value`` strings applied to a configuration's dicts."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from gcgd_jax.train.config.schema import SECTIONS, ConfigError, parse_value, suggest

__all__ = ["apply_overrides", "apply_section_overrides"]


def apply_section_overrides(
    data: Mapping[str, Any],
    overrides: Sequence[str],
    sections: Collection[str],
    key_problem: Callable[[list[str]], str | None],
) -> dict[str, Any]:
    """Applies ``section.key=value`` strings to the nested dicts of any configuration.

    Args:
        data: ``{section: {key: value}}`` (copied, not changed).
        overrides: the strings, applied in order; a value is read by
          :func:`~gcgd_jax.train.config.schema.parse_value`.
        sections: the configuration's section names.
        key_problem: the configuration's rule for the dotted key (split at the dots):
          what is wrong with it, or None; it says where sub-tables take one dot more.
          It is asked before the section is looked up.

    Returns:
        The dicts with the overrides set (sub-tables created as needed).
    """
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        problem = key_problem(parts)
        if problem is not None:
            raise ConfigError(f"override {item!r}: {problem}")
        if parts[0] not in sections:
            raise ConfigError(
                f"override {item!r}: unknown section {parts[0]!r}"
                + suggest(parts[0], list(sections))
            )
        node = data.setdefault(parts[0], {})
        for depth, part in enumerate(parts[1:-1], start=2):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth])} is not a table")
        node[parts[-1]] = parse_value(text.strip())
    return data


def _key_problem(parts: list[str]) -> str | None:
    """``section.key``; one dot more in the sub-tables ``corrections.<name>.<option>`` and
    ``model.gc_ode.<setting>`` (too many dots in an unknown section: the section is named)."""
    if len(parts) < 2 or not all(parts):
        return "the key must be section.key (e.g. optim.lr=0.05)"
    tables = parts[0] == "corrections" or parts[:2] == ["model", "gc_ode"]
    if parts[0] in SECTIONS and len(parts) > (3 if tables else 2):
        return "too many dots in the key"
    return None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` strings to nested dicts (before typing)."""
    return apply_section_overrides(data, overrides, SECTIONS, _key_problem)
