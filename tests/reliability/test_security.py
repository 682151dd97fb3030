"""Nothing runs code the user did not ask for: weights load as safetensors or weights-only pickles (a planted
malicious pickle is refused and its payload never runs), a model's own code runs only with
``model.trust_remote_code: true``, and reward plug-ins are imported only when a config (``module:Class``) or an
installed entry point names them."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import rewards
from diffrl.dllm.masked_lm import MaskedDiffusionLM
from diffrl.errors import CheckpointError, ConfigError, RewardError
from diffrl.training import checkpoints
from rewards._files import load_weights
from tests.conftest import REPO_ROOT


class _Payload:
    """Unpickling this would create the file named in ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_pickles_are_refused_and_their_code_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    with pytest.raises(RewardError, match="cannot be loaded safely"):
        load_weights(str(evil), "aesthetic.head")              # a reward head's .pt / .pth
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        checkpoints._load(evil)                                     # every checkpoint .pt file goes through this
    assert not marker.exists()
    torch.save({"weight": torch.ones(2)}, tmp_path / "good.pt")  # plain tensors still load
    assert torch.equal(load_weights(str(tmp_path / "good.pt"), "head")["weight"], torch.ones(2))


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for root in ("diffrl", "rewards"):
        for path in (REPO_ROOT / root).rglob("*.py"):
            for line in path.read_text().splitlines():
                if re.search(r"\btorch\.load\(", line) and not line.lstrip().startswith(('"', "#", "``")):
                    calls.append((path.name, line))
    assert calls and all("weights_only=True" in line for _, line in calls), calls


def _model_with_remote_code(tiny_dir, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny LM, whose config.json now points at a configuration module shipped in the folder (as LLaDA's
    does); importing that module creates ``marker``."""
    folder = tmp_path / "remote"
    shutil.copytree(tiny_dir("dllm"), folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "configuration_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).touch()\n"
        "from transformers import ModernBertConfig\n\n"
        "class CustomConfig(ModernBertConfig):\n    model_type = 'custom_dllm'\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    config["model_type"] = "custom_dllm"  # not a transformers architecture, as LLaDA's "llada"
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_remote_code_runs_only_when_the_config_says_so(tiny_dir, tmp_path):
    folder, marker = _model_with_remote_code(tiny_dir, tmp_path)
    with pytest.raises(ConfigError, match="needs its own code to load; if you trust it, set "
                                          "model.trust_remote_code: true"):
        MaskedDiffusionLM.from_pretrained(folder)  # the default: trust_remote_code off
    assert not marker.exists()
    try:
        MaskedDiffusionLM.from_pretrained(folder, trust_remote_code=True)
    except Exception:
        pass  # whether the rest loads is not the point: the user's flag let the folder's code run
    assert marker.exists()


def _plugin(tmp_path: Path, module: str) -> Path:
    marker = tmp_path / f"{module}-imported"
    (tmp_path / f"{module}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).touch()\n"
        "import torch\nfrom rewards import RewardOutput\n\n"
        "class Reward:\n    modality = 'image'\n\n"
        "    def __init__(self, device='cpu'):\n        pass\n\n"
        "    def __call__(self, images, prompts, **_):\n"
        "        return RewardOutput(torch.ones(len(images)))\n")
    return marker


def test_plugins_are_imported_only_when_named(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    named, bystander = _plugin(tmp_path, "diffrl_test_named_plugin"), _plugin(tmp_path, "diffrl_test_bystander")
    # An installed distribution exposing one reward through the diffrl.rewards entry-point group.
    dist = tmp_path / "diffrl_test_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: diffrl-test-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[diffrl.rewards]\ntest_entry_point = diffrl_test_ep_plugin:Reward\n")
    from_entry_point = _plugin(tmp_path, "diffrl_test_ep_plugin")
    monkeypatch.setattr(rewards, "_discovered", False)
    monkeypatch.setattr(rewards, "_REGISTRY", dict(rewards._REGISTRY))

    assert "test_entry_point" in rewards.available_rewards()           # entry points: found and imported
    assert from_entry_point.exists()
    rewards.load_reward("jpeg_compressibility")
    assert not named.exists() and not bystander.exists()               # nothing else on the path is imported
    reward = rewards.load_reward("diffrl_test_named_plugin:Reward")    # a config naming module:Class
    assert named.exists() and not bystander.exists()
    assert reward(torch.zeros(2, 3, 4, 4), ["a", "b"]).scores.tolist() == [1.0, 1.0]
    with pytest.raises(RewardError, match="cannot be imported"):
        rewards.load_reward("diffrl_test_missing_plugin:Reward")
    sys.modules.pop("diffrl_test_named_plugin", None)
    sys.modules.pop("diffrl_test_ep_plugin", None)
