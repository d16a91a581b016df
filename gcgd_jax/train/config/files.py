"""Configuration files: finding them by name, reading TOML (with ``extends``), writing TOML."""

from __future__ import annotations

import importlib.resources
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from gcgd_jax.train.config.schema import ConfigError, TrainConfig, config_to_dict

__all__ = ["CONFIG_DIRS", "find_config", "read_toml", "sections_to_toml", "to_toml"]


def _package_config_dir() -> Path:
    """The configurations shipped inside the package (``gcgd_jax/configs``)."""
    return Path(str(importlib.resources.files("gcgd_jax") / "configs"))


# Looked up by name, in order: ``./configs`` (a user's own), then the shipped ones.
CONFIG_DIRS: tuple[Path, ...] = (Path("configs"), _package_config_dir())


def find_config(name_or_path: str | Path) -> Path:
    """Resolves a configuration name (``quickstart``) or a path to a TOML file."""
    candidate = Path(name_or_path)
    tried = []
    if candidate.suffix == ".toml" or candidate.parent != Path("."):
        tried.append(candidate)
    for folder in CONFIG_DIRS:
        tried.append(
            folder / f"{candidate.name}.toml"
            if candidate.suffix != ".toml"
            else folder / candidate.name
        )
    for path in tried:
        if path.is_file():
            return path
    available = sorted({p.stem for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.toml")})
    raise ConfigError(
        f"configuration {str(name_or_path)!r} not found (tried {', '.join(map(str, dict.fromkeys(tried)))}); "
        f"available: {', '.join(available) or 'none'}"
    )


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(
            f"configuration {path} extends itself (cycle: {' -> '.join(map(str, seen))})"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except OSError as err:
        raise ConfigError(f"cannot read configuration {path}: {err}") from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be a configuration name or path, got {parent!r}")
    parent_path = Path(parent)
    if not parent_path.is_absolute() and (path.parent / f"{parent}.toml").is_file():
        parent_path = path.parent / f"{parent}.toml"
    elif not parent_path.is_absolute() and (path.parent / parent).is_file():
        parent_path = path.parent / parent
    else:
        parent_path = find_config(parent)
    return _merge(read_toml(parent_path, (*seen, path)), data)


def toml_value(value: Any) -> str:
    """A configuration value as TOML text (booleans, numbers, strings, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def sections_to_toml(
    tree: Mapping[str, Mapping[str, Any]],
    tables: Collection[str] = (),
    table_groups: Collection[str] = (),
) -> str:
    """Any configuration's nested dicts as TOML text: a ``[section]`` table each, its keys
    in order, keys that are None left out (None is an optional field's default).

    Args:
        tree: ``{section: {key: value}}``
          (:func:`~gcgd_jax.train.config.schema.sections_to_dict`).
        tables: ``"section.key"`` of keys that are a table of their own, written after
          their section as ``[section.key]`` when not empty (``model.gc_ode``).
        table_groups: ``"section.key"`` of keys that hold tables by name, each written as
          ``[section.<name>]`` (``corrections.options``: ``[corrections.gc_w]``).
    """
    lines: list[str] = []
    for section, values in tree.items():
        values = dict(values)
        sub_tables: dict[str, Mapping[str, Any]] = {}
        for key in list(values):
            name = f"{section}.{key}"
            if name in tables:
                if table := values.pop(key):  # an empty table is left out
                    sub_tables[name] = table
            elif name in table_groups:
                sub_tables.update({f"{section}.{k}": v for k, v in values.pop(key).items()})
        for name, table in {section: values, **sub_tables}.items():
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None)
            lines.append("")
    return "\n".join(lines)


def to_toml(cfg: TrainConfig) -> str:
    """The configuration as TOML text that :func:`load_config` reads back equal.

    Optional fields that are None are left out (None is their default).
    """
    return sections_to_toml(
        config_to_dict(cfg), tables=("model.gc_ode",), table_groups=("corrections.options",)
    )
