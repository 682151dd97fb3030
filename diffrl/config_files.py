"""Config files and command-line overrides: reading a YAML config (a key written twice is an error), applying
``key.sub=value`` overrides, and writing a resolved config (secrets redacted). The sections themselves and
their checks are :mod:`diffrl.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from diffrl import secrets
from diffrl.config import to_dict
from diffrl.errors import ConfigError
from diffrl.text_files import read_text


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a key written twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one section (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        hint = f" (this run's is {path / 'config.yaml'})" if (path / "config.yaml").is_file() else ""
        raise ConfigError(f"{path}: a folder, not a config file; pass a YAML config{hint}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; check the path (shipped configs: `diffrl ls`)")
    text = read_text(path, error=ConfigError)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; a config needs at least 'trainer:' and 'model.path'")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str], source: str = "command line") -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML, then type-checked by the dataclass)."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"{source}: override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: cannot set {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config (every default spelled out) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    # Literal tokens and keys are never written (diffrl.secrets): env:NAME references are.
    tmp.write_text(yaml.safe_dump(secrets.redact(to_dict(config)), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


