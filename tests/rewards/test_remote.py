"""`diffrl serve-reward` and the `remote` reward, against the real server on 127.0.0.1: equal scores,
failures retried then skipped, malformed requests answered with a 4xx while the server stays up."""

from __future__ import annotations

import json
import math
import re
import threading
import urllib.error
import urllib.request

import pytest
import torch

from diffrl.errors import RewardError
from diffrl.reward_server import RewardServer
from rewards import load_reward

SPEC = {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.25}


@pytest.fixture
def server():
    server = RewardServer(load_reward(SPEC), "127.0.0.1", 0, max_body_bytes=2_000_000)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as response:
        return json.loads(response.read())


def test_remote_scores_equal_in_process_scores(server):
    images = torch.rand(5, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    images[0] = 0.5  # a flat one: a very different JPEG size
    local = load_reward(SPEC)(images, [""] * 5)
    remote = load_reward({"remote": 1.0}, kwargs={"remote": {"url": server.url}})
    assert remote.modality == "image"
    out = remote(images, [""] * 5)
    assert torch.equal(out.scores, local.scores)
    assert torch.equal(out.extras["remote/jpeg_compressibility"], local.extras["jpeg_compressibility"])
    assert server.requests_served == 1


def test_malformed_requests_get_a_4xx_and_the_server_stays_up(server):
    url = server.url + "/score"
    cases = [
        (b"{not json", 400, "not JSON"),
        (json.dumps({"texts": ["a"]}).encode(), 400, "'pixels' must be"),
        (json.dumps({"pixels": {"shape": [1, 4, 8, 8], "data": ""}}).encode(), 400, "expected [B, 3, H, W]"),
        (json.dumps({"pixels": {"shape": [1, 3, 2, 2], "data": "AAAA"}}).encode(), 400, "needs 12"),
        (json.dumps({"pixels": {"shape": [1, 3, 2, 2], "data": "A" * 16}, "prompts": ["a", "b"]}).encode(), 400,
         "one per sample"),
        (b"x" * 2_000_001, 413, "over the limit"),
    ]
    for body, status, words in cases:
        code, answer = _post(url, body)
        assert code == status and words in answer["error"], (code, answer)
        assert _health(server.url)["status"] == "ok"
    code, answer = _post(server.url + "/nope", b"{}")
    assert code == 404 and "POST /score" in answer["error"]


def test_a_token_is_required_when_set():
    server = RewardServer(load_reward(SPEC), "127.0.0.1", 0, token="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, answer = _post(server.url + "/score", b"{}")
        assert code == 401 and "Bearer" in answer["error"]
        with pytest.raises(RewardError, match="refused the request .401"):
            load_reward({"remote": 1.0}, kwargs={"remote": {"url": server.url}})
        remote = load_reward({"remote": 1.0}, kwargs={"remote": {"url": server.url, "token": "s3cret"}})
        assert remote(torch.rand(2, 3, 8, 8), ["", ""]).scores.shape == (2,)
    finally:
        server.shutdown()
        server.server_close()


def test_server_down_at_start_is_one_error_and_mid_run_is_retried_then_nan(server):
    url = server.url
    remote = load_reward({"remote": 1.0}, kwargs={"remote": {"url": url, "retries": 2, "backoff": 0.01,
                                                             "timeout": 5}})
    server.shutdown()
    server.server_close()
    with pytest.warns(UserWarning, match="failed 3 times .* scores NaN"):
        out = remote(torch.rand(3, 3, 8, 8), ["", "", ""])
    assert all(math.isnan(v) for v in out.scores.tolist())  # never a silent zero: the trainer skips the step
    with pytest.raises(RewardError, match="not reachable .*diffrl serve-reward"):
        load_reward({"remote": 1.0}, kwargs={"remote": {"url": url}})


def test_a_tiny_awm_run_scored_remotely_and_async_equals_the_in_process_run(server, tiny_dir, tmp_path):
    """Two sampling batches per step, so that with async the first is scored while the second is sampled."""
    from diffrl.trainers.awm import AWMTrainer
    from tests.trainers.test_awm import make_config

    remote = {"weights": {"remote": 1.0}, "kwargs": {"remote": {"url": server.url}}}
    runs = {}
    for name, reward in (("local", {"weights": SPEC}), ("remote", remote), ("remote_async", {**remote, "async": True}),
                         ("local_async", {"weights": SPEC, "async": True})):
        trainer = AWMTrainer(make_config(tiny_dir, tmp_path / name, reward=reward, sample_batch_size=2))
        trainer.train()
        rows = [json.loads(line) for line in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [(r["reward"], r["reward_std"], r["loss"]) for r in rows if "reward" in r]
    assert len(runs["local"]) == 2
    assert runs["remote"] == runs["local"] and runs["remote_async"] == runs["local"]
    assert runs["local_async"] == runs["local"]
    # per run 2 evaluations; sync 1 request per step, async 1 per sampling batch (2 per step)
    assert server.requests_served == (2 + 2 * 1) + (2 + 2 * 2)


def test_the_serve_reward_command(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT, free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffrl.cli", "serve-reward", "--reward", "jpeg_compressibility",
                             "--port", str(port)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                assert _health(url)["rewards"] == ["jpeg_compressibility"]
                break
            except OSError:
                time.sleep(0.2)
        images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        remote = load_reward({"remote": 1.0}, kwargs={"remote": {"url": url}})
        local = load_reward("jpeg_compressibility")(images, ["", ""])
        assert torch.equal(remote(images, ["", ""]).scores, local.scores)
        busy = subprocess.run([sys.executable, "-m", "diffrl.cli", "serve-reward", "--reward",
                               "jpeg_compressibility", "--port", str(port)], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=120)
        assert busy.returncode == 1 and "choose another --port" in busy.stderr and "Traceback" not in busy.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and f"at http://127.0.0.1:{port}" in out and "no authentication" in out, err


def test_concurrent_requests_are_batched_and_each_gets_its_own_scores():
    server = RewardServer(load_reward(SPEC), "127.0.0.1", 0, batch_wait=0.5)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = load_reward({"remote": 1.0}, kwargs={"remote": {"url": server.url}})
        shapes = [(2, 3, 24, 24), (3, 3, 24, 24), (1, 3, 24, 24), (2, 3, 16, 16)]   # the last cannot stack
        batches = [torch.rand(*s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
        results = [None] * len(batches)

        def ask(i):
            results[i] = remote(batches[i], [""] * len(batches[i]))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        local = load_reward(SPEC)
        for images, out in zip(batches, results):
            expected = local(images, [""] * len(images))
            assert torch.equal(out.scores, expected.scores)
            assert torch.equal(out.extras["remote/jpeg_incompressibility"], expected.extras["jpeg_incompressibility"])
        assert server.requests_served == 4 and 2 <= server.batches_run < 4
    finally:
        server.shutdown()
        server.server_close()


class _FailsAfter:
    """A reward whose server-side scoring breaks after ``ok_calls`` calls, as a reward server that died."""

    modality, needs_prompts = "image", False

    def __init__(self, ok_calls: int):
        self.calls, self.ok_calls = 0, ok_calls
        from rewards.image.jpeg import JpegCompressibility

        self.inner = JpegCompressibility()

    def __call__(self, samples, prompts, **metadata):
        self.calls += 1
        if self.calls > self.ok_calls:
            raise RuntimeError("CUDA error: device lost")
        return self.inner(samples, prompts)


def test_a_run_whose_reward_server_dies_stops_saying_so_and_keeps_its_good_steps(tiny_dir, tmp_path):
    """Evaluation and two steps score; then every request fails: step 3 is skipped, step 4 stops the run with
    the server's reason (not advice about prompts or learning rates) and a checkpoint of the run so far (step 3,
    skipped, trained nothing), and the run resumes once the reward works again."""
    from diffrl.errors import RewardFailed
    from diffrl.trainers.awm import AWMTrainer
    from rewards import CombinedReward, _Component
    from tests.trainers.test_awm import make_config

    failing = _FailsAfter(ok_calls=3)
    server = RewardServer(CombinedReward([_Component("flaky", 1.0, failing, "image")]), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reward = {"weights": {"remote": 1.0}, "kwargs": {"remote": {"url": server.url, "retries": 0}}}
        config = make_config(tiny_dir, tmp_path, reward=reward, max_steps=6, max_bad_steps=2,
                             checkpoint={"every": 100})
        with pytest.raises(RewardFailed) as stopped:
            AWMTrainer(config).train()
        message = str(stopped.value)
        assert message.startswith("stopped after 2 steps in a row: the reward could not score this step's samples")
        assert "device lost" in message and server.url in message and "optim.lr" not in message
        assert "step-000003" in message and "checkpoint.resume=latest" in message
        assert (tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.json").is_file()
        failing.ok_calls = 10 ** 6  # the reward works again
        resumed = make_config(tiny_dir, tmp_path, reward=reward, max_steps=4, max_bad_steps=2,
                              checkpoint={"every": 100, "resume": "latest"})
        AWMTrainer(resumed).train()
        assert (tmp_path / "run" / "checkpoints" / "step-000004").is_dir()
    finally:
        server.shutdown()
        server.server_close()


def test_score_counts_what_a_dying_server_did_not_score_and_exits_non_zero(tmp_path, capsys):
    """`diffrl score` against a server whose reward breaks after one batch: the rows are all written, the
    unscored ones carry the reason, and the command exits 1 with one line (0 with --allow-failures)."""
    import json

    from PIL import Image

    from diffrl import cli
    from rewards import CombinedReward, _Component

    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 80, 120)).save(tmp_path / f"{i}.png")
    failing = _FailsAfter(ok_calls=1)
    server = RewardServer(CombinedReward([_Component("flaky", 1.0, failing, "image")]), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        args = ["score", "--reward", "remote", "--images", str(tmp_path / "*.png"), "--batch-size", "2", "--quiet",
                "--reward-kwargs", json.dumps({"remote": {"url": server.url, "retries": 0}}),
                "--out", str(tmp_path / "s.jsonl")]
        assert cli.main(args) == 1
        rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
        assert [("reward" in r, "error" in r) for r in rows] == [(True, False)] * 2 + [(False, True)] * 2
        assert "not scored" in rows[2]["error"] and "device lost" in rows[2]["error"]
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: 2 of 4 inputs could not be read or scored")
        failing.calls = 0
        assert cli.main([*args, "--allow-failures"]) == 0
    finally:
        server.shutdown()
        server.server_close()


def _raw(url: str, request: bytes) -> tuple[int, dict]:
    """Send a hand-written HTTP request (headers no client library would write) and read the answer."""
    import socket
    from urllib.parse import urlparse

    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("length, words", [("abc", "whole number"), ("-5", "whole number"), ("1e3", "whole number")])
def test_a_content_length_that_is_not_a_size_is_a_400_not_a_hang(server, length, words):
    code, answer = _raw(server.url, f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{}}".encode())
    assert code == 400 and words in answer["error"]
    assert _health(server.url)["status"] == "ok"


def test_deeply_nested_json_is_a_400(server):
    code, answer = _post(server.url + "/score", b"[" * 100_000 + b"]" * 100_000)
    assert code == 400 and "nested too deeply" in answer["error"]
    assert _health(server.url)["status"] == "ok"


@pytest.mark.parametrize("host, port, words", [("127.0.0.1", 99999, "--port 99999 is not a port number"),
                                                ("no-such-host.invalid", 0, "--host no-such-host.invalid is not an "
                                                                           "address of this machine")])
def test_a_bad_port_or_host_is_one_line(host, port, words):
    from diffrl.errors import DiffrlError
    from diffrl.reward_server import serve

    with pytest.raises(DiffrlError, match=re.escape(words)):
        serve(load_reward(SPEC), host, port, token=None)


def test_sigterm_while_scoring_answers_the_batch_then_exits_cleanly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT, free_port

    port = free_port()
    started = tmp_path / "scoring"
    proc = subprocess.Popen([sys.executable, "-m", "diffrl.cli", "serve-reward", "--reward",
                             "tests.rewards.slow_reward:SlowReward", "--port", str(port)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SLOW_REWARD_STARTED": str(started)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                _health(url)
                break
            except OSError:
                time.sleep(0.2)
        answers = []
        remote = load_reward({"remote": 1.0}, kwargs={"remote": {"url": url, "retries": 0}})
        client = threading.Thread(target=lambda: answers.append(remote(torch.ones(2, 3, 8, 8), ["", ""])))
        client.start()
        deadline = time.time() + 60
        while not started.exists() and time.time() < deadline:   # the batch is being scored (2 s)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        client.join(timeout=60)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert answers and answers[0].scores.tolist() == [1.0, 1.0] and not answers[0].failed
    assert proc.returncode == 0 and "terminate called" not in err and "Traceback" not in err, err
