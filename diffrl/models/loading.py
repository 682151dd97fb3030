"""Opening a model folder or hub id: one-line errors that name the model and the fix, and the pipeline class
of a diffusers folder."""

from __future__ import annotations

import contextlib
from pathlib import Path

from diffrl.errors import ConfigError


def looks_local(path: str) -> bool:
    """A path the user means as a folder (absolute, relative with ./ or ../, ~, or nested), not a hub id."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or Path(path).exists()


def check_model_path(path: str | Path) -> None:
    path = str(path)
    if looks_local(path) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"model.path {path}: folder not found; give a hub id (org/name) or a folder written "
                          f"by save_pretrained")


@contextlib.contextmanager
def loading_errors(path: str | Path):
    """Turn the libraries' long loading errors into one line naming the model and the fix."""
    check_model_path(path)
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"model.path {path}: cannot load the model ({first}); check the hub id or folder, "
                          f"and that the machine can reach the hub or the files are cached") from None


def pipeline_class_name(path: str | Path, revision: str | None = None) -> str:
    """``_class_name`` of a diffusers pipeline folder or hub id (its ``model_index.json``)."""
    import json

    with loading_errors(path):
        local = Path(path)
        if local.is_dir():
            index = local / "model_index.json"
            if not index.is_file():
                raise ConfigError(f"model.path {path}: no model_index.json; point it at a diffusers pipeline folder")
            return json.loads(index.read_text())["_class_name"]
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(str(path), revision=revision)["_class_name"]
