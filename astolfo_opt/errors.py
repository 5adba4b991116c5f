"""User-facing errors. Each one prints as a single line that says what is wrong and how to fix it; the CLI turns
them into ``error: ...`` and a non-zero exit instead of a traceback."""

from __future__ import annotations

from pathlib import Path


class AstolfoError(Exception):
    """Base of every error the CLI reports as one line (exit status 2)."""

    def __str__(self) -> str:  # names from hostile files must not break the line or drive the terminal
        return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in super().__str__())


class CheckpointError(AstolfoError):
    """A model file cannot be used: unreadable, hostile, malformed or of the wrong architecture."""

    def __init__(self, path: str | Path, problem: str, hint: str | None = None):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" + (f" ({hint})" if hint else ""))


class ConfigError(AstolfoError):
    """A configuration value is missing or invalid."""


class MissingFileError(ConfigError):
    """A local file the user must provide is absent; names the file and the config key that sets it."""

    def __init__(self, path: str | Path, config_key: str, what: str = "file"):
        self.path = str(path)
        self.config_key = config_key
        kind = "folder" if "folder" in what or config_key.endswith(("folder", "_dir", "dir")) else "file"
        super().__init__(f"{what} not found: {path} (set it with `{config_key}=/path/to/{kind}`)")


class NonFiniteError(AstolfoError):
    """A tensor holds NaN / Inf under the default ``nan_policy: error``."""

    def __init__(self, model: str, key: str, count: int):
        self.model, self.key, self.count = model, key, count
        super().__init__(f"{model}: tensor {key} holds {count} NaN/Inf values "
                         "(repair or exclude the model, or set nan_policy=drop_model to skip it for this key)")
