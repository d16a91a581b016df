"""Command-line overrides: ``section.key=value`` strings applied to a configuration's dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gcgd_jax.train.config.schema import SECTIONS, ConfigError, parse_value, suggest

__all__ = ["apply_overrides"]


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` strings to nested dicts (before typing)."""
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(
                f"override {item!r}: the key must be section.key (e.g. optim.lr=0.05)"
            )
        if parts[0] not in SECTIONS:
            raise ConfigError(
                f"override {item!r}: unknown section {parts[0]!r}"
                + suggest(parts[0], list(SECTIONS))
            )
        # sub-tables: corrections.<name>.<option>, model.gc_ode.<setting>
        tables = parts[0] == "corrections" or parts[:2] == ["model", "gc_ode"]
        if len(parts) > (3 if tables else 2):
            raise ConfigError(f"override {item!r}: too many dots in the key")
        node = data.setdefault(parts[0], {})
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a table")
        node[parts[-1]] = parse_value(text.strip())
    return data
