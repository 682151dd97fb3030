"""The vlm_judge reward against a small OpenAI-format chat server started on 127.0.0.1 in the test (the
standard library's HTTP server answering as vLLM / sglang do): the image really travels (the server's answer
is computed from its pixels), numbers are parsed, an unparsable answer is NaN and counted, a failing server is
retried, then NaN."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from diffrl.errors import RewardError
from rewards import load_reward
from rewards.image.vlm_judge import parse_score


def reply(handler: BaseHTTPRequestHandler, answer: str) -> None:
    """A chat completion with ``answer`` as the assistant's message, as vLLM / sglang send it."""
    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


class Judge(BaseHTTPRequestHandler):
    """Answers "Score: N/10" with N = round(10 x the image's mean red), or words for prompts with 'vague', or
    a 500 on the first try for prompts with 'flaky'; refuses models other than 'judge'."""

    calls: dict = {}

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["model"] != "judge":
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"error": "model not found"}')
            return
        content = body["messages"][0]["content"]
        url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        text = next(c["text"] for c in content if c["type"] == "text")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        red = sum(p[0] for p in image.getdata()) / (255 * image.width * image.height)
        Judge.calls[text] = Judge.calls.get(text, 0) + 1
        if "flaky" in text and Judge.calls[text] == 1:
            self.send_response(500)
            self.end_headers()
            return
        answer = "It is hard to say." if "vague" in text else f"Score: {round(red * 10)}/10"
        reply(self, answer)


@pytest.fixture
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_parse_score_by_hand():
    assert parse_score("Score: 7/10", 0, 10) == 7.0
    assert parse_score("I'd say 8.5", 0, 10) == 8.5
    assert parse_score("42, no: 6", 0, 10) == 6.0
    assert math.isnan(parse_score("no idea", 0, 10)) and math.isnan(parse_score("", 0, 10))


def test_scores_come_from_the_image_and_vague_answers_are_nan(judge_url):
    images = torch.zeros(3, 3, 8, 8)
    images[0, 0], images[1, 0], images[2, 0] = 0.3, 0.9, 0.5
    reward = load_reward({"vlm_judge": 1.0}, kwargs={"vlm_judge": {"url": judge_url, "model": "judge"}})
    out = reward(images, ["a red square", "a redder square", "something vague"])
    assert out.scores[:2].tolist() == pytest.approx([0.3, 0.9])
    assert math.isnan(out.scores[2]) and out.extras["vlm_judge/unparsed"].tolist() == [False, False, True]
    assert out.extras["vlm_judge/answers"][1] == "Score: 9/10"


def test_a_flaky_server_is_retried_and_a_dead_one_gives_nan(judge_url):
    reward = load_reward({"vlm_judge": 1.0}, kwargs={"vlm_judge": {"url": judge_url, "model": "judge",
                                                                   "backoff": 0.01}})
    image = torch.full((1, 3, 8, 8), 0.6)
    assert reward(image, ["a flaky one"]).scores.tolist() == pytest.approx([0.6])
    with pytest.raises(RewardError, match="refused the request .404.*model"):
        load_reward({"vlm_judge": 1.0}, kwargs={"vlm_judge": {"url": judge_url, "model": "other"}})(image, ["x"])
    dead = load_reward({"vlm_judge": 1.0}, kwargs={"vlm_judge": {"url": "http://127.0.0.1:9/v1", "retries": 1,
                                                                 "backoff": 0.01, "model": "judge"}})
    with pytest.warns(UserWarning, match="did not answer for 1 of 1 images"):
        assert math.isnan(dead(image, ["x"]).scores[0])


class UnifiedRewardServer(BaseHTTPRequestHandler):
    """Answers as UnifiedReward does, its score from the image's mean red (x 5): the element list then
    "Final Score: s" for the score question, the word-wise list then the three 1-5 axes for the semantic one.
    Keeps what it received."""

    received: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        text = next(c["text"] for c in content if c["type"] == "text")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        UnifiedRewardServer.received.append((url.split(";")[0], image.format, text, body["max_tokens"]))
        red = sum(p[0] for p in image.convert("RGB").getdata()) / (255 * image.width * image.height)
        if "Final Score" in text:
            answer = f"square (object): 1\nred (attribute): 1\nFinal Score: {round(red * 5, 2)}"
        else:
            answer = (f'Word-wise Scores: [["a", 0], ["[No_mistakes]", 4]]\n\nAlignment Score (1-5): {round(red * 5)}'
                      "\nCoherence Score (1-5): 2\nStyle Score (1-5): 1")
        reply(self, answer)


def test_unifiedreward_presets_ask_its_questions_and_read_its_scores():
    server = ThreadingHTTPServer(("127.0.0.1", 0), UnifiedRewardServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        images = torch.zeros(2, 3, 8, 8)
        images[0, 0], images[1, 0] = 0.4, 0.8
        for preset, opening, rule in [
                ("unifiedreward_score", "You are given a text caption and a generated image",
                 "assign a score from 1 to 5 after 'Final Score:'"),
                ("unifiedreward_semantic", "You are presented with a generated image and its associated text",
                 "Alignment Score (1-5): X\nCoherence Score (1-5): Y\nStyle Score (1-5): Z")]:
            UnifiedRewardServer.received.clear()
            reward = load_reward({"vlm_judge": 1.0}, kwargs={"vlm_judge": {"url": url, "preset": preset}})
            out = reward(images, ["a red square", "a redder square"])
            # the score on 0-5 read from its own line (the word-wise list's numbers are not it), divided by 5
            assert out.scores.tolist() == pytest.approx([0.4, 0.8], abs=0.01)
            received = sorted(UnifiedRewardServer.received, key=lambda r: r[2])
            assert {(kind, fmt, tokens) for kind, fmt, _, tokens in received} == {("data:image/jpeg", "JPEG", 4096)}
            assert [text.split("Text Caption: ")[1] for _, _, text, _ in received] == ["[a red square]",
                                                                                     "[a redder square]"]
            assert all(text.startswith(opening) and rule in text for _, _, text, _ in received)
        with pytest.raises(RewardError, match="sets the question, the scale and max_tokens itself; drop high"):
            load_reward({"vlm_judge": 1.0}, kwargs={"vlm_judge": {"url": url, "preset": "unifiedreward_score",
                                                                  "high": 10.5}})(images, ["a", "b"])
        with pytest.raises(RewardError, match="unknown preset 'unified'"):
            load_reward({"vlm_judge": 1.0}, kwargs={"vlm_judge": {"url": url, "preset": "unified"}})(images, ["a", "b"])
    finally:
        server.shutdown()
        server.server_close()


def test_a_pattern_reads_its_group_or_nan():
    pattern = r"Final Score:\s*([0-5](?:\.\d+)?)"
    assert parse_score("a (object): 1\nFinal Score: 2.33", 0, 5, pattern) == 2.33
    assert math.isnan(parse_score("a (object): 1\nno final line", 0, 5, pattern))
