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


def error_line(error: BaseException, *, last: bool = False) -> str:
    """One line of an exception's message for an ``error:`` line (200 characters at most): its first line, or its
    last where the first only names a check (huggingface_hub's config validation errors)."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return (lines[-1] if last else lines[0]).strip()[:200]


@contextlib.contextmanager
def loading_errors(path: str | Path, setting: str = "model.path"):
    """Turn the libraries' long loading errors into one line naming the model, where it is set, and the fix."""
    from huggingface_hub.errors import StrictDataclassError  # a config.json that fails its class's validation

    check_model_path(path, setting)
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, StrictDataclassError) as e:
        first = error_line(e, last=isinstance(e, StrictDataclassError))
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        fix = ("this machine is offline: download it elsewhere (huggingface-cli download) and give the folder"
               if offline else "check the hub id or folder")
        raise ConfigError(f"{setting} {path}: cannot load the model ({first}); {fix}") from None


def describe_folder(path: str | Path) -> str | None:
    """What a local folder holds, in words, for errors when it is given where something else was expected: a
    diffusers pipeline, a transformers model, a LoRA adapter, a diffrl run or checkpoint; None if unknown or
    not a local folder."""
    import json

    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None

    def read(name: str) -> dict:
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    if (folder / "model_index.json").is_file():
        return f"a diffusers {read('model_index.json').get('_class_name', 'pipeline')} folder (an image / video model)"
    if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
        return "a diffrl run's output folder (its weights are in checkpoints/step-N/model)"
    if (folder / "trainer_state.json").is_file():
        return "a diffrl checkpoint folder (its weights are in model/)"
    if (folder / "adapter_config.json").is_file() or (folder / "pytorch_lora_weights.safetensors").is_file():
        return "a LoRA adapter folder, not a whole model"
    config = read("config.json")
    if config.get("model_type"):
        name = (config.get("architectures") or [config["model_type"]])[0]
        return f"a transformers {name} folder (a language model)"
    if config.get("_class_name"):
        return f"a diffusers {config['_class_name']} folder, one component of a pipeline, not the whole pipeline"
    return None


def pipeline_class_name(path: str | Path, revision: str | None = None) -> str:
    """``_class_name`` of a diffusers pipeline folder or hub id (its ``model_index.json``)."""
    import json

    with loading_errors(path):
        local = Path(path)
        if local.is_dir():
            index = local / "model_index.json"
            if not index.is_file():
                what = describe_folder(local)
                raise ConfigError(f"model.path {path}" + (f" is {what}, not a diffusers pipeline" if what else
                                                          ": no model_index.json") +
                                  "; image and video trainers need a diffusers pipeline folder (model_index.json; "
                                  "`diffrl ls models` lists which trainers take which models)")
            return json.loads(index.read_text())["_class_name"]
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(str(path), revision=revision)["_class_name"]
