"""Typed, frozen configuration loaded from YAML.

Every section is a pydantic model with ``extra="forbid"``: an unknown key is an error naming the
file and the dotted key. Relative paths resolve against the directory of the YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from epiray.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


T = TypeVar("T", bound=BaseModel)


#: keys whose string values are paths (by suffix: ``manifest``, ``chrom_sizes``, ``output_dir``)
PATH_SUFFIXES = (
    "path",
    "dir",
    "file",
    "manifest",
    "store",
    "out",
    "chain",
    "chrom_sizes",
    "root",
    "output",
    "genes",
    "enhancers",
    "blacklist",
    "predictd_splits",
)
#: keys whose value is a path only when it is a string (``model`` is also a section name)
PATH_IF_STRING = ("model",)
#: keys whose mapping values are paths (``runs: {label: pattern}``)
PATH_MAPPINGS = ("runs",)


def _resolve_paths(node: Any, base: Path, key: str = "") -> Any:
    """Resolve relative path-valued strings against ``base`` (see :data:`PATH_SUFFIXES`,
    :data:`PATH_IF_STRING`, :data:`PATH_MAPPINGS`); URIs (``scheme://``) are left alone."""
    if isinstance(node, dict):
        if key in PATH_MAPPINGS:
            return {k: _resolve_one(v, base) for k, v in node.items()}
        return {k: _resolve_paths(v, base, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_paths(v, base, key) for v in node]
    if isinstance(node, str) and (key.endswith(PATH_SUFFIXES) or key in PATH_IF_STRING):
        return _resolve_one(node, base)
    return node


def _resolve_one(value: Any, base: Path) -> Any:
    if not isinstance(value, str) or "://" in value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path}: file not found. Give the path of a YAML config.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML ({e}).") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config {path}: expected a mapping at the top level, got {type(data).__name__}."
        )
    return data


def parse_config(
    model: type[T], data: dict[str, Any], source: str | Path = "<config>", base: Path | None = None
) -> T:
    """Validate ``data`` into ``model``; relative paths resolve against ``base``.

    Raises
    ------
    ConfigError
        Listing each bad or unknown key by its dotted name, with the file.
    """
    if base is not None:
        data = _resolve_paths(data, base)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            dotted = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"{dotted}: unknown key. Remove it or check its spelling.")
            else:
                lines.append(f"{dotted}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(
            f"config {source}: {len(lines)} problem(s)\n" + "\n".join(f"  - {x}" for x in lines)
        ) from None


def load_config(model: type[T], path: str | Path) -> T:
    """Load a YAML file into a frozen config object."""
    path = Path(path).resolve()
    return parse_config(model, load_yaml(path), path, base=path.parent)


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the fully resolved config next to a job's outputs (atomically)."""
    from epiray.store import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
