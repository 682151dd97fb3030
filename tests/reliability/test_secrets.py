"""No token lands in a file a run writes or ``diffrl push`` uploads: a literal token works for its run and is
saved as <redacted>; ``env:NAME`` reads it from the environment; a saved run with a token in clear is refused by
push. The reward server is the real one, token-protected, on 127.0.0.1."""

from __future__ import annotations

import threading

import pytest
import yaml

from diffrl import model_card, secrets
from diffrl.errors import ConfigError, DiffrlError
from diffrl.reward_server import RewardServer
from rewards import load_reward

TOKEN = "tok-3f9a71c2e5"


@pytest.fixture
def server():
    server = RewardServer(load_reward({"jpeg_compressibility": 1.0}), "127.0.0.1", 0, token=TOKEN)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _files_holding(folder, text: str) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


@pytest.mark.parametrize("given", ["literal", "env"])
def test_a_run_with_a_token_writes_it_nowhere(server, tiny_dir, tmp_path, monkeypatch, given):
    from diffrl.trainers.awm import AWMTrainer
    from tests.trainers.test_awm import make_config

    monkeypatch.setenv("DIFFRL_TEST_REWARD_TOKEN", TOKEN)
    token = TOKEN if given == "literal" else "env:DIFFRL_TEST_REWARD_TOKEN"
    reward = {"weights": {"remote": 1.0}, "kwargs": {"remote": {"url": server.url, "token": token}}}
    config = make_config(tiny_dir, tmp_path, reward=reward, max_steps=1,
                         logging={"trackers": ["tensorboard"], "progress_bar": False})
    AWMTrainer(config).train()
    assert server.requests_served >= 3     # the token reached the server: two evaluations and a step
    run = tmp_path / "run"
    assert _files_holding(run, TOKEN) == []
    saved = yaml.safe_load((run / "config.yaml").read_text())["reward"]["kwargs"]["remote"]["token"]
    assert saved == (secrets.REDACTED if given == "literal" else "env:DIFFRL_TEST_REWARD_TOKEN")
    shared = model_card.prepare(run, tmp_path / "share", repo_id="me/run")
    assert _files_holding(shared, TOKEN) == []
    # the redacted config.yaml still counts as the same config on resume
    AWMTrainer(make_config(tiny_dir, tmp_path, reward=reward, max_steps=2, checkpoint={"every": 1, "resume": "latest"},
                           logging={"trackers": [], "progress_bar": False})).train()
    assert (run / "checkpoints" / "step-000002").is_dir() and _files_holding(run, TOKEN) == []


def test_push_refuses_a_saved_run_with_a_token_in_clear(server, tiny_dir, tmp_path):
    from diffrl.trainers.awm import AWMTrainer
    from tests.trainers.test_awm import make_config

    reward = {"weights": {"remote": 1.0}, "kwargs": {"remote": {"url": server.url, "token": TOKEN}}}
    AWMTrainer(make_config(tiny_dir, tmp_path, reward=reward, max_steps=1)).train()
    path = tmp_path / "run" / "config.yaml"   # as a run saved before redaction existed wrote it
    data = yaml.safe_load(path.read_text())
    data["reward"]["kwargs"]["remote"]["token"] = TOKEN
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DiffrlError, match="reward.kwargs.remote.token"):
        model_card.prepare(tmp_path / "run", tmp_path / "share", repo_id="me/run")
    assert not (tmp_path / "share").exists() or not any((tmp_path / "share").iterdir())


def test_secret_references_resolve_or_fail_in_one_line(monkeypatch):
    monkeypatch.delenv("DIFFRL_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match="reward.kwargs.remote.token reads the environment variable DIFFRL_NOT_SET"):
        secrets.resolve({"token": "env:DIFFRL_NOT_SET"}, "reward.kwargs.remote.")
    with pytest.raises(ConfigError, match="was redacted when the run's config was saved"):
        secrets.resolve({"api_key": secrets.REDACTED}, "reward.kwargs.vlm_judge.")
    data = {"a": {"hf_token": "x", "max_tokens": 5, "url": "u"}, "b": [{"password": "p"}], "api_key": "env:K"}
    assert secrets.redact(data) == {"a": {"hf_token": "<redacted>", "max_tokens": 5, "url": "u"},
                                    "b": [{"password": "<redacted>"}], "api_key": "env:K"}
    assert secrets.literal_secrets(data) == ["a.hf_token", "b.password"]
