"""Opening a model folder or hub id: one-line errors that name the model and the fix, and the pipeline class
of a diffusers folder."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

from diffrl.errors import ConfigError


def looks_local(path: str) -> bool:
    """A path the user means as a folder (absolute, relative with ./ or ../, ~, or nested), not a hub id."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or Path(path).exists()


_hub_checked = False


def offline_without_network(timeout: float = 3.0) -> bool:
    """Before the first hub id is opened: when the hub's host cannot be reached, switch huggingface_hub to
    offline mode for this process (cached files still load), so that a missing model fails at once instead
    of after about a minute of retries. Returns whether the process is offline. Checked once."""
    global _hub_checked
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    if _hub_checked:
        return False
    _hub_checked = True
    url = urlparse(hub.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        hub.HF_HUB_OFFLINE = True
        print(f"note: {url.hostname} cannot be reached; models load from the local cache only (HF_HUB_OFFLINE=1)",
              file=sys.stderr)
        return True


def check_model_path(path: str | Path, setting: str = "model.path") -> None:
    path = str(path)
    if looks_local(path) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"{setting} {path}: folder not found; give a hub id (org/name) or a folder written "
                          f"by save_pretrained")
    if not Path(path).expanduser().exists():
        offline_without_network()


def reward_setting(reward: str, option: str = "model") -> str:
    """How a user sets a reward's model option, in a config and in `diffrl score` (for error messages)."""
    return (f"the {reward} reward's {option} (reward.kwargs.{reward}.{option} in a config, "
            f"--reward-kwargs '{{\"{reward}\": {{\"{option}\": FOLDER}}}}' in diffrl score)")


@contextlib.contextmanager
def loading_errors(path: str | Path, setting: str = "model.path"):
    """Turn the libraries' long loading errors into one line naming the model, where it is set, and the fix."""
    check_model_path(path, setting)
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        fix = ("this machine is offline: download it elsewhere (huggingface-cli download) and give the folder"
               if offline else "check the hub id or folder")
        raise ConfigError(f"{setting} {path}: cannot load the model ({first}); {fix}") from None


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
