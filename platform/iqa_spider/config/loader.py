"""Load a job's YAML into its typed dataclass, with dotlist overrides.

Every entrypoint goes through `load_config`, so every one fails the same way on a bad
config: a `ConfigError` whose one-line message names the key and the file, and which the
entrypoints turn into exit code 2 before any cluster, model or bucket is touched.

A config file may pull other files into one of its sections with `include`
(paths relative to the including file), which is how job configs share model recipes:

    include:
      model: ../model/tiny_qwen2_5_vl.yaml   # its `model:` section, or the whole file
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

T = TypeVar("T")


class ConfigError(Exception):
    """A config that cannot run. str() is one line naming the key and the file."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None):
        self.key, self.source, self.detail = key, source, message
        where = f"{source}: " if source else ""
        what = f"key '{key}': " if key else ""
        super().__init__(f"config error: {where}{what}{message}")


class ConfigValueError(ValueError):
    """Raised by a schema's __post_init__ for a value of the right type but not allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    """Schemas call this from __post_init__ for enumerated string fields."""
    if value not in allowed:
        raise ConfigValueError(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")


# The one spelling of a boolean given as text, everywhere: a form field, a model param, a config.
BOOLEAN_WORDS = {"true": True, "1": True, "false": False, "0": False}


def parse_bool(value: Any, key: str) -> bool:
    """A boolean from a bool, 0 or 1, or the text true/false/1/0 (any case, spaces ignored).
    Anything else ("yes", "maybe", 2) is refused naming ``key`` rather than read as true."""
    if not isinstance(value, str) and hasattr(value, "item"):  # numpy and pandas scalars
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[value.strip().lower()]
    raise ConfigValueError(key, f"expected true, false, 1 or 0, got {str(value)[:40]!r}")


def check_at_least(minimum: float, *fields: tuple[str, Any]) -> None:
    """Schemas call this from __post_init__ for counts, sizes and bounds: each ``(key, value)``
    must be at least ``minimum``."""
    for key, value in fields:
        if value < minimum:
            raise ConfigValueError(key, f"must be at least {minimum}, got {value}")


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if not path.is_file():
        raise ConfigError("file not found", source=str(path))
    if path in seen:
        raise ConfigError("include cycle", source=str(path))
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: report them the same way
        raise ConfigError(f"not valid YAML ({str(exc).splitlines()[0]})", source=str(path)) from exc
    if not isinstance(node, DictConfig):
        raise ConfigError("top level must be a mapping", source=str(path))
    includes = node.pop("include", None)
    if includes is None:
        includes = {}
    elif not isinstance(includes, DictConfig):
        raise ConfigError("must map a section name to a YAML path", key="include", source=str(path))
    merged = OmegaConf.create({})
    for section, rel in includes.items():
        sub = read_yaml((path.parent / str(rel)).resolve(), seen + (path,))
        # A recipe file may itself be a complete config of kind `job` with the section inside.
        if section in sub:
            sub = sub[section]
        merged = OmegaConf.merge(merged, OmegaConf.create({section: sub}))
    return OmegaConf.merge(merged, node)


def _full_key(exc: OmegaConfBaseException) -> str | None:
    key = getattr(exc, "full_key", None)
    return str(key) if key not in (None, "") else None


def load_config(schema: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Merge schema defaults <- YAML file <- dotlist overrides and build the dataclass.

    Raises ConfigError for an unknown key, a wrong type, a missing required value (`???`
    left unset), a value the schema rejects, or an unreadable file.
    """
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        layers.append((str(path), read_yaml(Path(path).resolve())))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override must look like key=value, got {bad[0]!r}",
                              source="command line")
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    return build_config(schema, layers)


def build_config(schema: type[T], layers: Sequence[tuple[str, DictConfig]]) -> T:
    """Merge schema defaults <- each (source name, node) layer in order, and build the dataclass.

    The one place that turns OmegaConf's errors into one-line ConfigErrors naming the key and
    the layer it came from; every way of configuring a job (files, dotlists, Serve args) ends here.
    """
    layers = list(layers)
    cfg = OmegaConf.structured(schema)
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except (ConfigKeyError, ConfigAttributeError) as exc:
            raise ConfigError("unknown key (not in the schema)", _full_key(exc), source) from None
        except ValidationError as exc:
            raise ConfigError(f"wrong type: {str(exc).splitlines()[0]}", _full_key(exc), source) from None
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError("required value is missing", missing[0], _describe(layers))
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        raise ConfigError("required value is missing", _full_key(exc), _describe(layers)) from None
    except ConfigValueError as exc:
        raise ConfigError(str(exc), exc.key, _describe(layers)) from None
    except OmegaConfBaseException as exc:  # an ${...} interpolation that does not resolve, and the like
        raise ConfigError(f"cannot resolve: {str(exc).splitlines()[0]}", _full_key(exc), _describe(layers)) from None
    return obj  # type: ignore[return-value]


def _describe(layers: list[tuple[str, DictConfig]]) -> str:
    return " + ".join(src for src, _ in layers) or "defaults"


def config_to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what `config show` prints and jobs log)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_flat_dict(cfg: Any) -> dict[str, Any]:
    """Dotted keys -> values, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg)
    return out
