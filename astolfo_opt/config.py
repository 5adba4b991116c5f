"""Config nodes as plain Python: one place that turns Hydra / OmegaConf sections into dicts and lists."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from astolfo_opt.errors import ConfigError


def to_plain(node: Any, key: str) -> Any:
    """``node`` (the config section at ``key``) with interpolations resolved into plain containers; a missing
    mandatory value (``???``) or an interpolation that does not resolve is a one-line ConfigError naming the full key.
    Anything that is not an OmegaConf node is returned as it is (the API also takes plain dicts)."""
    if not isinstance(node, DictConfig | ListConfig):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        full = str(getattr(e, "full_key", "") or "")
        full = full if full == key or full.startswith(f"{key}.") else f"{key}.{full}" if full else key
        raise ConfigError(f"{full} is required (set it on the command line: {full}=VALUE)") from None
    except InterpolationResolutionError as e:
        raise ConfigError(f"{key}: cannot resolve {getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}") from None
