"""A reward model behind HTTP (``serve_rm``): ``POST /get_reward`` with ``{"query": [texts]}`` answers
``{"rewards": [floats], "scores": [floats]}``, one per text.

Requests are served on threads; one scoring thread owns the model and takes every request waiting
(after a short window, ``max_wait_s``), so concurrent clients share forward passes of up to
``batch_size`` texts. Bad requests get HTTP 400 with a one-line reason; a failed forward pass, 500.
Standard library only (``http.server``).
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from openrl_ckpt.checkpoint.faults import fault_point
from openrl_ckpt.data.padding import right_pad
from openrl_ckpt.models.reward import reward_token_ids

log = logging.getLogger("openrl_ckpt")

REWARD_PATH = "/get_reward"


class BadRequest(ValueError):
    """A request body that is not ``{"query": [texts]}``."""


def parse_queries(body: bytes) -> list[str]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None
    queries = data.get("query") if isinstance(data, dict) else None
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BadRequest('expected {"query": [texts]}')
    return queries


class RewardModelScorer:
    """Texts -> rewards with a frozen reward model, ``batch_size`` texts per forward pass (all at once
    when 0). The model applies the normalisation its config records (set by the caller)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_len: int, device: torch.device,
                 batch_size: int = 0) -> None:
        self.model, self.tok, self.max_len, self.device, self.batch_size = model, tokenizer, max_len, device, batch_size

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> list[float]:
        ids = reward_token_ids(self.tok, list(texts), self.max_len)
        size = self.batch_size if self.batch_size > 0 else max(len(ids), 1)
        out: list[float] = []
        for start in range(0, len(ids), size):
            batch, mask = right_pad(ids[start:start + size], self.tok.pad_token_id)
            out += self.model(input_ids=batch.to(self.device), attention_mask=mask.to(self.device)).float().tolist()
        return out


@dataclass
class _Request:
    texts: list[str]
    done: Future


class RewardBatcher:
    """Queues the texts of concurrent requests; one thread scores everything waiting together."""

    def __init__(self, score: Callable[[list[str]], list[float]], max_wait_s: float = 0.005) -> None:
        self.score = score
        self.max_wait_s = max_wait_s
        self.pending: queue.Queue[_Request | None] = queue.Queue()
        self.batches = 0  # forward rounds so far (logged; read by tests)
        self.thread = threading.Thread(target=self._work, name="reward-batcher", daemon=True)
        self.thread.start()

    def rewards(self, texts: list[str]) -> list[float]:
        request = _Request(texts, Future())
        self.pending.put(request)
        return request.done.result()

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join()

    def _work(self) -> None:
        while True:
            first = self.pending.get()
            if first is None:
                return
            group = [first]
            try:  # whatever else arrives within the window rides along
                while True:
                    nxt = self.pending.get(timeout=self.max_wait_s)
                    if nxt is None:
                        self.pending.put(None)
                        break
                    group.append(nxt)
            except queue.Empty:
                pass
            texts = [t for r in group for t in r.texts]
            try:
                rewards = self.score(texts)
            except Exception as e:  # the requests fail, the server stays up  # noqa: BLE001
                for r in group:
                    r.done.set_exception(e)
                continue
            self.batches += 1
            start = 0
            for r in group:
                r.done.set_result(rewards[start:start + len(r.texts)])
                start += len(r.texts)


def make_server(batcher: RewardBatcher, host: str, port: int) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving: call ``serve_forever``); port 0 picks a free one."""
    counter = itertools.count(1)  # requests so far, for the ``reward_request`` fault point

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            fault_point("reward_request", next(counter))
            if self.path.rstrip("/") != REWARD_PATH:
                self._reply(404, {"error": f"no such path {self.path}; POST {REWARD_PATH}"})
                return
            try:
                queries = parse_queries(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                rewards = batcher.rewards(queries)
            except BadRequest as e:
                self._reply(400, {"error": str(e)})
                return
            except Exception as e:  # noqa: BLE001
                log.error("scoring failed: %s", e)
                self._reply(500, {"error": f"scoring failed: {type(e).__name__}: {str(e)[:200]}"})
                return
            self._reply(200, {"rewards": rewards, "scores": rewards})

        def _reply(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            log.debug("%s %s", self.address_string(), format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
