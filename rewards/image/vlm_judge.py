"""A vision-language model as the judge, over an OpenAI-compatible chat endpoint (what vLLM, sglang and
most served VLMs speak): each image goes as a PNG data URL with a question built from its prompt; the first
number of the answer on the ``low``-``high`` scale becomes the score, divided by ``high`` (so 0-1 by
default). An answer with no number on the scale scores NaN ("not applicable": left out, and counted in
``extras["unparsed"]``); a server that keeps failing is retried with doubling waits, then the sample is NaN
with a warning, never a silent zero.

    reward: {weights: {vlm_judge: 1.0},
             kwargs: {vlm_judge: {url: "http://127.0.0.1:30000/v1", model: "Qwen/Qwen2.5-VL-7B-Instruct"}}}

``preset: unifiedreward_score`` / ``unifiedreward_semantic`` asks a served UnifiedReward model (CodeGoat24's
UnifiedReward-qwen / -Think, arXiv 2503.05236) its published questions, as MixGRPO's
``fastvideo/models/reward_model/unified_reward.py`` does (the image as JPEG at quality 95, temperature 0, up to
4096 answer tokens) and reads its ``Final Score:`` (score) or ``Alignment Score (1-5):`` (semantic), 0-5,
divided by 5.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from diffrl.errors import RewardError
from rewards import RewardOutput, register_reward
from rewards.image._clip import check_images

DEFAULT_QUESTION = ("How well does this image match the description \"{prompt}\" (content, text, composition, "
                    "quality)? Answer with a single integer from {low} (not at all) to {high} (perfectly), then "
                    "nothing else.")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

# UnifiedReward's two questions as its users publish them (MixGRPO's unified_reward.py), "{prompt}" the caption.
UNIFIEDREWARD_SCORE = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well this image aligns with the provided caption. Consider the "
    "accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail preservation, "
    "color accuracy, and overall aesthetic appeal.\n"
    "Extract key elements from the provided text caption, evaluate their presence in the generated image using the "
    "format: 'element (type): value' (where value=0 means not generated, and value=1 means generated), and assign "
    "a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\nText Caption: [{prompt}]")
UNIFIEDREWARD_SEMANTIC = (
    "You are presented with a generated image and its associated text caption. Your task is to analyze the image "
    "across multiple dimensions in relation to the caption. Specifically:\n\n"
    "1. Evaluate each word in the caption based on how well it is visually represented in the image. Assign a "
    "numerical score to each word using the format:\n"
    "   Word-wise Scores: [[\"word1\", score1], [\"word2\", score2], ..., [\"wordN\", scoreN], "
    "[\"[No_mistakes]\", scoreM]]\n"
    "   - A higher score indicates that the word is less well represented in the image.\n"
    "   - The special token [No_mistakes] represents whether all elements in the caption were correctly depicted. "
    "A high score suggests no mistakes; a low score suggests missing or incorrect elements.\n\n"
    "2. Provide overall assessments for the image along the following axes (each rated from 1 to 5):\n"
    "- Alignment Score: How well the image matches the caption in terms of content.\n"
    "- Coherence Score: How logically consistent the image is (absence of visual glitches, object distortions, "
    "etc.).\n"
    "- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.\n\n"
    "Output your evaluation using the format below:\n\n"
    "---\n\n"
    "Word-wise Scores: [[\"word1\", score1], ..., [\"[No_mistakes]\", scoreM]]\n\n"
    "Alignment Score (1-5): X\n"
    "Coherence Score (1-5): Y\n"
    "Style Score (1-5): Z\n\n"
    "Your task is provided as follows:\nText Caption: [{prompt}]")
# preset -> (question, the answer's pattern (group 1: the score), high, max_tokens, image format)
PRESETS = {
    "unifiedreward_score": (UNIFIEDREWARD_SCORE, r"Final Score:\s*([0-5](?:\.\d+)?)", 5.0, 4096, "JPEG"),
    "unifiedreward_semantic": (UNIFIEDREWARD_SEMANTIC, r"Alignment Score \(1-5\):\s*([0-5](?:\.\d+)?)", 5.0, 4096,
                               "JPEG"),
}


def parse_score(text: str, low: float, high: float, pattern: str | None = None) -> float:
    """The first number of ``text`` inside [low, high] (a "7/10" reads as 7), or with ``pattern`` its first
    match's group 1 (UnifiedReward's "Final Score: 2.33"); NaN when there is none."""
    if pattern is not None:
        match = re.search(pattern, text or "")
        return float(match.group(1)) if match and low <= float(match.group(1)) <= high else float("nan")
    for match in _NUMBER.finditer(text or ""):
        value = float(match.group())
        if low <= value <= high:
            return value
    return float("nan")


@register_reward("vlm_judge", modality="image", source="OpenAI-compatible chat endpoint (vLLM, sglang)",
                 summary="a served VLM scores each image against its prompt (url, model, question, low, high; "
                         "preset: unifiedreward_score / unifiedreward_semantic)")
class VLMJudge:
    def __init__(self, device="cpu", url: str = "http://127.0.0.1:30000/v1", model: str = "default",
                 question: str = DEFAULT_QUESTION, low: float = 0.0, high: float = 10.0, api_key: str | None = None,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 1.0, max_tokens: int = 16,
                 concurrency: int = 8, preset: str | None = None):
        self.pattern, self.image_format = None, "PNG"
        if preset is not None:
            if preset not in PRESETS:
                raise RewardError(f"vlm_judge: unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
            given = [name for name, value, default in (("question", question, DEFAULT_QUESTION), ("low", low, 0.0),
                                                       ("high", high, 10.0), ("max_tokens", max_tokens, 16))
                     if value != default]
            if given:
                raise RewardError(f"vlm_judge: preset {preset!r} sets the question, the scale and max_tokens "
                                  f"itself; drop {', '.join(given)} or the preset")
            question, self.pattern, high, max_tokens, self.image_format = PRESETS[preset]
        if not low < high:
            raise RewardError(f"vlm_judge: low ({low}) must be below high ({high})")
        self.url, self.model, self.question = url.rstrip("/"), model, question
        self.low, self.high, self.api_key = low, high, api_key
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_tokens, self.concurrency = max_tokens, concurrency

    def _ask(self, image: torch.Tensor, prompt: str) -> str | None:
        from diffrl.media import to_pil

        buffer = io.BytesIO()
        to_pil(image).save(buffer, format=self.image_format, **({"quality": 95} if self.image_format == "JPEG" else {}))
        data_url = f"data:image/{self.image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()
        text = self.question.format(prompt=prompt, low=int(self.low), high=int(self.high))
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0.0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                          {"type": "text", "text": text}]}]}
        headers = {"Content-Type": "application/json",
                   **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        wait = self.backoff
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url + "/chat/completions", data=json.dumps(body).encode(),
                                             headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    detail = e.read().decode(errors="replace")[:200]
                    raise RewardError(f"vlm_judge: {self.url} refused the request ({e.code}: {detail}); check "
                                      f"model ({self.model!r}) and api_key") from None
            except (urllib.error.URLError, OSError, KeyError, IndexError, json.JSONDecodeError):
                pass
            if attempt < self.retries:
                time.sleep(wait)
                wait *= 2
        return None

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        images = check_images(samples).detach().float().cpu()
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            answers = list(pool.map(self._ask, images, prompts))
        failed = sum(a is None for a in answers)
        if failed:
            warnings.warn(f"vlm_judge: {self.url} did not answer for {failed} of {len(answers)} images after "
                          f"{self.retries + 1} tries; they score NaN", stacklevel=2)
        values = [parse_score(a, self.low, self.high, self.pattern) if a is not None else float("nan")
                  for a in answers]
        scores = torch.tensor(values, dtype=torch.float32) / self.high
        unanswered = {i: f"{self.url} did not answer after {self.retries + 1} tries" for i, a in enumerate(answers)
                      if a is None}
        unparsed = torch.tensor([a is not None and v != v for a, v in zip(answers, values)])
        return RewardOutput(scores, {"unparsed": unparsed, "answers": [a or "" for a in answers]}, unanswered)
