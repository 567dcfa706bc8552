"""Config loading and validation shared by every physics stage.

Every invalid value raises :class:`ConfigError` naming the field, the value received and what is
allowed. YAML files live in the repository's ``configs/`` folder (override with ``PHOTONFIT_CONFIGS``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Invalid configuration or argument: message names field, value and what is allowed."""


def config_dir() -> Path:
    """Root folder of the YAML configs (``$PHOTONFIT_CONFIGS`` or the repository's ``configs/``)."""
    env = os.environ.get("PHOTONFIT_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; missing file, bad YAML or a non-mapping raise ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file: {str(p)!r} does not exist (expected a readable YAML file)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: top level is {type(data).__name__}, expected a mapping")
    return data


def check_keys(
    cfg: Mapping[str, Any], *, required: Iterable[str], optional: Iterable[str] = (), where: str = "config"
) -> None:
    """Reject unknown keys and report missing ones."""
    required, optional = set(required), set(optional)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: got {type(cfg).__name__} {cfg!r}, expected a mapping")
    unknown = sorted(set(cfg) - required - optional)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(required | optional)}")
    missing = sorted(required - set(cfg))
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")


def check_number(
    value: Any,
    field: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_min: bool = False,
    strict_max: bool = False,
    integer: bool = False,
) -> float:
    """Validate a real (or integer) number within bounds; returns it as float (or int)."""
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{field}: got {value!r} ({type(value).__name__}), expected {kind}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(f"{field}: got {value!r}, expected a finite number")
    if minimum is not None and (v < minimum or (strict_min and v == minimum)):
        op = ">" if strict_min else ">="
        raise ConfigError(f"{field}: got {value!r}, allowed: {op} {minimum}")
    if maximum is not None and (v > maximum or (strict_max and v == maximum)):
        op = "<" if strict_max else "<="
        raise ConfigError(f"{field}: got {value!r}, allowed: {op} {maximum}")
    return int(value) if integer else v


def check_choice(value: Any, field: str, choices: Iterable[str]) -> str:
    """Validate that ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{field}: got {value!r}, allowed: {choices}")
    return value
