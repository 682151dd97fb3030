"""`diffrl serve-reward`: any reward plug-in over HTTP, for reward models that need their own environment or
GPUs. The standard library's threading HTTP server: no new dependency, and the reward model, not the
server, bounds the throughput. Concurrent requests are batched: one worker runs the reward, and requests
that arrive while it is busy (or within ``batch_wait`` seconds) are scored together in one call when their
samples stack (same shape, same metadata keys), up to ``max_batch`` samples; each gets its own slice back.

    GET  /health  -> {"status": "ok", "rewards": [...], "modality": "image"}
    POST /score   <- {"pixels": {shape, data} | "texts": [...], "prompts": [...], "metadata": {key: [...]}}
                  -> {"scores": [...], "extras": {name: [...]}}      (NaN travels as null)

Bad requests get a 4xx with {"error": "..."} and the server stays up. It binds to 127.0.0.1 unless told
otherwise, and has no authentication unless a token is set (then every request needs
``Authorization: Bearer TOKEN``).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from diffrl.errors import DiffrlError, RewardError

MAX_BODY_BYTES = 256 * 1024 * 1024


@dataclass
class _Request:
    samples: object                       # a tensor [B, ...] or a list of texts
    prompts: list[str]
    metadata: dict
    result: Future = field(default_factory=Future)

    def key(self) -> tuple:
        """Requests with equal keys can be scored in one call."""
        shape = tuple(self.samples.shape[1:]) if hasattr(self.samples, "shape") else ("text",)
        return shape, tuple(sorted(self.metadata))


def _cat(values: list):
    import torch

    return torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for part in values for v in part]


class _Batcher:
    """One worker thread that runs the reward on merged requests."""

    def __init__(self, reward, *, max_batch: int, wait: float):
        self.reward, self.max_batch, self.wait = reward, max_batch, wait
        self.queue: queue.Queue[_Request] = queue.Queue()
        self.batches_run = 0
        self.idle = threading.Event()  # set while no batch is being scored
        self.idle.set()
        threading.Thread(target=self._work, daemon=True, name="diffrl-reward-batcher").start()

    def score(self, request: _Request):
        self.queue.put(request)
        return request.result.result()

    def drain(self, timeout: float) -> bool:
        """Wait until the requests already taken are scored and answered (a clean stop); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle.is_set() and self.queue.empty():
                return True
            time.sleep(0.05)
        return False

    def _take(self) -> list[_Request]:
        """The next request and those waiting that stack with it (the rest keep their place)."""
        first = self.queue.get()
        self.idle.clear()
        group, held, size = [first], [], len(first.samples)
        deadline = time.monotonic() + self.wait
        while size < self.max_batch:
            try:
                nxt = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if nxt.key() == first.key() and size + len(nxt.samples) <= self.max_batch:
                group.append(nxt)
                size += len(nxt.samples)
            else:
                held.append(nxt)
        for request in held:
            self.queue.put(request)
        return group

    def _run(self, group: list[_Request]):
        samples = _cat([r.samples for r in group])
        metadata = {k: _cat([r.metadata[k] for r in group]) for k in group[0].metadata}
        self.batches_run += 1
        return self.reward(samples, [p for r in group for p in r.prompts], **metadata)

    def _work(self) -> None:
        while True:
            group = self._take()
            try:
                self._answer(group)
            finally:
                self.idle.set()

    def _answer(self, group: list[_Request]) -> None:
        try:
            out = self._run(group)
        except Exception as error:  # handed to the request's handler, which answers 4xx / 5xx
            if len(group) == 1:
                group[0].result.set_exception(error)
                return
            # one request may be the bad one: score each alone so that only it gets the error
            for request in group:
                try:
                    request.result.set_result(self._run([request]))
                except Exception as e:
                    request.result.set_exception(e)
            return
        start = 0
        for request in group:
            part = slice(start, start + len(request.samples))
            start += len(request.samples)
            request.result.set_result(_slice(out, part, len(out.scores)))


def _slice(out, part: slice, total: int):
    from rewards import RewardOutput

    extras = {k: v[part] for k, v in out.extras.items() if hasattr(v, "__len__") and len(v) == total}
    failed = {i - part.start: reason for i, reason in out.failed.items() if part.start <= i < part.stop}
    return RewardOutput(out.scores[part], extras, failed)


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, reward, host: str = "127.0.0.1", port: int = 8000, *, token: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, max_batch: int = 64, batch_wait: float = 0.005):
        self.reward, self.token, self.max_body_bytes = reward, token, max_body_bytes
        self.batcher = _Batcher(reward, max_batch=max_batch, wait=batch_wait)
        self.requests_served = 0
        self._count = threading.Lock()
        self._answering = 0  # connections whose handler has not finished writing its answer
        super().__init__((host, port), _Handler)

    def finish_request(self, request, client_address):
        with self._count:
            self._answering += 1
        try:
            super().finish_request(request, client_address)
        finally:
            with self._count:
                self._answering -= 1

    def drain(self, timeout: float) -> bool:
        """Wait until every request taken is scored and its answer written (the handler threads are daemons:
        the process must not end between the batcher's result and the handler's write); False on timeout."""
        deadline = time.monotonic() + timeout
        if not self.batcher.drain(timeout):
            return False
        while time.monotonic() < deadline:
            with self._count:
                if self._answering == 0:
                    return True
            time.sleep(0.02)
        return False

    @property
    def batches_run(self) -> int:
        return self.batcher.batches_run

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def log_message(self, format, *args):  # noqa: A002 (the base class's name): quiet, errors are answered
        pass

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        if self.server.token and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self._send(401, {"error": "missing or wrong token: send Authorization: Bearer TOKEN"})
            return False
        return True

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if not self._authorized():
            return
        if self.path != "/health":
            self._send(404, {"error": f"no such endpoint {self.path}; use GET /health or POST /score"})
            return
        reward = self.server.reward
        self._send(200, {"status": "ok", "rewards": reward.names, "modality": reward.modality,
                         "needs_prompts": reward.needs_prompts})

    def do_POST(self):  # noqa: N802
        if not self._authorized():
            return
        if self.path != "/score":
            self._send(404, {"error": f"no such endpoint {self.path}; use POST /score"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:  # reading "all there is" would wait for a client that waits for the answer
            self._send(400, {"error": "Content-Length must be a whole number of bytes, 0 or more"})
            self.close_connection = True
            return
        if length > self.server.max_body_bytes:
            # read what was sent (up to a bound) so that the client gets the answer, not a reset connection
            remaining = min(length, 4 * self.server.max_body_bytes)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
            self._send(413, {"error": f"request of {length} bytes is over the limit of "
                                      f"{self.server.max_body_bytes}; send smaller batches"})
            self.close_connection = True
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._send(400, {"error": "the body is not JSON"})
            return
        except RecursionError:
            self._send(400, {"error": "the body's JSON is nested too deeply"})
            return
        try:
            self._send(200, self._score(body))
        except (RewardError, DiffrlError, ValueError, TypeError) as e:
            self._send(400, {"error": str(e).splitlines()[0] if str(e) else type(e).__name__})
        except Exception as e:  # the reward itself broke: the server answers and stays up
            self._send(500, {"error": f"the reward failed: {type(e).__name__}: {str(e)[:200]}"})

    def _score(self, body) -> dict:
        from rewards.wire import decode_samples, to_json_list

        if not isinstance(body, dict):
            raise RewardError("the body must be a JSON object")
        reward = self.server.reward
        samples = decode_samples(body, reward.modality, max_pixels=self.server.max_body_bytes)
        prompts = body.get("prompts", [""] * len(samples))
        if not isinstance(prompts, list) or len(prompts) != len(samples):
            raise RewardError(f"'prompts' must be a list of {len(samples)} strings, one per sample")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or any(not isinstance(v, list) or len(v) != len(samples)
                                                 for v in metadata.values()):
            raise RewardError(f"'metadata' must map names to lists of {len(samples)} values, one per sample")
        out = self.server.batcher.score(_Request(samples, [str(p) for p in prompts], metadata))
        with self.server._count:
            self.server.requests_served += 1
        extras = {k: v for k, v in ((k, to_json_list(v)) for k, v in out.extras.items()) if v is not None}
        return {"scores": to_json_list(out.scores), "extras": extras}


def serve(reward, host: str, port: int, *, token: str | None, max_batch: int = 64,
          batch_wait: float = 0.005) -> None:
    """Serve until Ctrl-C / SIGTERM."""
    import signal
    import socket

    if not 0 <= port <= 65535:
        raise DiffrlError(f"--port {port} is not a port number; choose one in 1-65535 (0: any free port)")
    try:
        server = RewardServer(reward, host, port, token=token, max_batch=max_batch, batch_wait=batch_wait)
    except socket.gaierror as e:
        raise DiffrlError(f"--host {host} is not an address of this machine ({e.strerror or e}); use 127.0.0.1 "
                          f"(this machine only) or 0.0.0.0 (every interface)") from None
    except OSError as e:
        raise DiffrlError(f"cannot serve on {host}:{port} ({e.strerror or e}); choose another --port, or an "
                          f"address of this machine for --host") from None
    # SIGTERM: stop taking requests; the batch being scored is finished and answered before the process ends.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"serving {', '.join(reward.names)} ({reward.modality}) at {server.url} "
          f"({'token required' if token else 'no authentication'}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.drain(timeout=120.0)
        server.server_close()
