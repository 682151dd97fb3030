"""The `remote` reward: scores from a `diffrl serve-reward` server (any reward plug-in, served where its
model lives). In a config:

    reward: {weights: {remote: 1.0}, kwargs: {remote: {url: "http://127.0.0.1:8000", timeout: 120}}}

The server is asked for its rewards and modality when the reward is built (a server that is down is one
error line then). A timeout, a dropped connection or a 5xx mid-run is retried ``retries`` times with
doubling waits; after that the batch scores NaN with a warning, so the trainer skips the step and counts it
(as any non-finite reward), never a silent zero. The per-component scores come back as extras.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import warnings

from diffrl.errors import RewardError
from rewards import RewardOutput, register_reward


@register_reward("remote", modality="image", source="diffrl serve-reward",
                 summary="scores from a diffrl serve-reward server (url, timeout, retries, token)")
class RemoteReward:
    def __init__(self, device="cpu", url: str = "http://127.0.0.1:8000", timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0, token: str | None = None):
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff
        self.token = token
        try:
            health = self._request("GET", "/health", None, timeout=min(timeout, 10.0))
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise RewardError(f"reward server {self.url} is not reachable ({reason}); start it with "
                              f"`diffrl serve-reward --reward NAME --port PORT` or fix kwargs.remote.url") from None
        self.modality = health["modality"]
        self.names = health["rewards"]
        self.needs_prompts = health.get("needs_prompts", True)
        self.failed_batches = 0

    def _request(self, method: str, path: str, body: dict | None, *, timeout: float) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.token}"} if self.token else {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            try:
                detail = json.loads(detail).get("error", detail)
            except (json.JSONDecodeError, AttributeError):
                pass
            if e.code < 500:  # the request itself is wrong: retrying cannot help
                raise RewardError(f"reward server {self.url} refused the request ({e.code}: {detail})") from None
            raise OSError(f"{e.code}: {detail}") from None

    def __call__(self, samples, prompts, **metadata) -> RewardOutput:
        import torch

        from rewards.wire import encode_samples, scores_from_json, to_json_list

        body = {**encode_samples(samples, self.modality), "prompts": list(prompts),
                "metadata": {k: to_json_list(v) for k, v in metadata.items() if to_json_list(v) is not None}}
        wait, last = self.backoff, None
        for attempt in range(self.retries + 1):
            try:
                answer = self._request("POST", "/score", body, timeout=self.timeout)
                # what the server's own rewards could not score stays a failure here (not "not applicable")
                failed = {i: f"{self.url}: {reason}" for i, reason in
                          enumerate(answer.get("extras", {}).pop("failed", None) or []) if isinstance(reason, str)}
                extras = {name: scores_from_json(values) if all(v is None or isinstance(v, (int, float))
                                                                for v in values) else values
                          for name, values in answer.get("extras", {}).items()}
                return RewardOutput(scores_from_json(answer["scores"]), extras, failed)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                last = getattr(e, "reason", None) or e
                if attempt < self.retries:
                    time.sleep(wait)
                    wait *= 2
        self.failed_batches += 1
        reason = f"reward server {self.url} failed {self.retries + 1} times ({last})"
        warnings.warn(f"{reason}; this batch scores NaN and the step is skipped ({self.failed_batches} batches so "
                      f"far)", stacklevel=2)
        return RewardOutput(torch.full((len(samples),), float("nan")), failed=dict.fromkeys(range(len(samples)),
                                                                                             reason))
