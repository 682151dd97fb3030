"""Tokens and keys in configs: read from the environment, never written.

A setting whose name says it is a secret (``token``, ``api_key``, ``password``, ``secret``, or a name ending in
``_token`` / ``_api_key`` / ``_secret`` / ``_password``) may hold ``env:NAME``: the value of the environment variable
``NAME``, read when the reward (or whatever takes it) is built, so the config file holds only the variable's
name. A literal secret still works for the run that holds it, but every file diffrl writes (``config.yaml``,
tracker parameters, a pushed folder) gets ``<redacted>`` in its place, and ``diffrl push`` refuses a run whose
saved config still holds one (written before this redaction existed).

    reward: {weights: {remote: 1.0}, kwargs: {remote: {url: "http://10.0.0.5:8000", token: env:REWARD_TOKEN}}}
"""

from __future__ import annotations

import os
from typing import Any

from diffrl.errors import ConfigError

ENV_PREFIX = "env:"
REDACTED = "<redacted>"
_NAMES = ("token", "api_key", "apikey", "password", "secret")
_SUFFIXES = ("_token", "_api_key", "_secret", "_password")


def is_secret_name(name: str) -> bool:
    name = str(name).lower()
    return name in _NAMES or name.endswith(_SUFFIXES)


def _walk(data: Any, visit, path: str = "") -> Any:
    """A copy of nested dicts / lists with ``visit(path, value)`` applied to every value under a secret name."""
    if isinstance(data, dict):
        return {key: visit(f"{path}{key}", value) if is_secret_name(key) and not isinstance(value, (dict, list))
                else _walk(value, visit, f"{path}{key}.") for key, value in data.items()}
    if isinstance(data, list):
        return [_walk(value, visit, path) for value in data]
    return data


def _is_literal(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and value != REDACTED and not value.startswith(ENV_PREFIX)


def redact(data: Any) -> Any:
    """``data`` with every literal secret replaced by ``<redacted>`` (``env:NAME`` references stay)."""
    return _walk(data, lambda path, value: REDACTED if _is_literal(value) else value)


def literal_secrets(data: Any) -> list[str]:
    """The dotted paths of literal secrets in ``data`` (what :func:`redact` would hide)."""
    found: list[str] = []
    _walk(data, lambda path, value: found.append(path) if _is_literal(value) else value)
    return found


def resolve(data: Any, where: str = "") -> Any:
    """``data`` with every ``env:NAME`` secret replaced by the variable's value; a missing variable or a value
    that was redacted when a run's config was saved is one line naming the setting and the fix."""
    def value_of(path: str, value: Any) -> Any:
        setting = f"{where}{path}"
        if value == REDACTED:
            raise ConfigError(f"{setting} was redacted when the run's config was saved; give it again as "
                              f"{setting}=env:NAME with the secret in the environment variable NAME")
        if isinstance(value, str) and value.startswith(ENV_PREFIX):
            name = value[len(ENV_PREFIX):]
            if not os.environ.get(name):
                raise ConfigError(f"{setting} reads the environment variable {name}, which is not set; export "
                                  f"{name}=... before the run")
            return os.environ[name]
        return value

    return _walk(data, value_of)
