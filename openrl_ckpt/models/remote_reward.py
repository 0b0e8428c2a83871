"""Rewards over HTTP (--remote_rm_url): the client side of ``serve_rm``'s ``POST /get_reward``.

The request is ``{"query": [texts], "prompts": [texts], "labels": [...]}`` (``labels`` only with
--label_key) and the answer ``{"rewards": [floats]}``, one per query. Several URLs score the same
queries and their rewards are averaged, as several local reward models are. A request that fails
(connection refused or reset, timeout, HTTP 5xx) is retried with a doubling pause; when every try
failed the run stops with one line naming the URL, before anything of the current step is saved,
so its last checkpoint stays the newest and the same command resumes from it once the server is back.
Uses only the standard library, so ``train_ppo``, ``train_ppo_ray`` and ``batch_inference`` share it.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from openrl_ckpt.errors import UserError

log = logging.getLogger("openrl_ckpt")


@dataclass(frozen=True)
class RemoteRewardConfig:
    """``--remote_rm_url --remote_rm_timeout --remote_rm_retries --remote_rm_batch_size``."""

    urls: tuple[str, ...]
    timeout_s: float = 60.0
    retries: int = 5  # tries after the first one
    backoff_s: float = 1.0  # the first pause; doubled after each failed try
    batch_size: int = 0  # queries per request; 0: all of a call in one request


def parse_remote_urls(value: str) -> tuple[str, ...]:
    """``URL[,URL]``: each an http(s) address (a Python reward file is not served here)."""
    urls = tuple(u.strip() for u in value.split(",") if u.strip())
    if not urls:
        raise UserError("--remote_rm_url: give at least one URL, e.g. http://127.0.0.1:5000/get_reward")
    for url in urls:
        if url.endswith(".py"):
            raise UserError(f"--remote_rm_url {url}: reward functions in a Python file are not supported; serve "
                            "the reward over HTTP (python -m openrl_ckpt.cli.serve_rm) and pass its URL")
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--remote_rm_url {url}: not an http:// or https:// URL")
    return urls


class RemoteRewardClient:
    """Rewards of texts from the reward servers, with timeouts and retries."""

    def __init__(self, cfg: RemoteRewardConfig) -> None:
        self.cfg = cfg

    def rewards(self, queries: Sequence[str], prompts: Sequence[str] | None = None,
                labels: Sequence[Any] | None = None) -> list[float]:
        """The mean over the URLs of each query's reward."""
        per_url = [self._rewards_of(url, list(queries), prompts, labels) for url in self.cfg.urls]
        return [sum(values) / len(values) for values in zip(*per_url)]

    def _rewards_of(self, url: str, queries: list[str], prompts: Sequence[str] | None,
                    labels: Sequence[Any] | None) -> list[float]:
        size = self.cfg.batch_size if self.cfg.batch_size > 0 else max(len(queries), 1)
        out: list[float] = []
        for start in range(0, len(queries), size):
            body: dict[str, Any] = {"query": queries[start:start + size]}
            if prompts is not None:
                body["prompts"] = list(prompts[start:start + size])
            if labels is not None:
                body["labels"] = list(labels[start:start + size])
            out += self._post(url, body)
        return out

    def _post(self, url: str, body: dict[str, Any]) -> list[float]:
        data = json.dumps(body).encode("utf-8")
        pause, reason = self.cfg.backoff_s, ""
        for attempt in range(self.cfg.retries + 1):
            request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                    return _parse_rewards(url, response.read(), len(body["query"]))
            except urllib.error.HTTPError as e:
                if e.code < 500:  # the request itself is wrong: retrying cannot help
                    raise UserError(f"--remote_rm_url {url}: the server refused the request (HTTP {e.code}: "
                                    f"{_first_line(e.read())})") from None
                reason = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                reason = str(getattr(e, "reason", e)) or type(e).__name__
            if attempt < self.cfg.retries:
                log.warning("--remote_rm_url %s: try %d of %d failed (%s); again in %.1fs", url, attempt + 1,
                            self.cfg.retries + 1, reason, pause)
                time.sleep(pause)
                pause *= 2
        raise UserError(f"--remote_rm_url {url}: no reward after {self.cfg.retries + 1} tries ({reason}); the last "
                        "checkpoint is intact: rerun the same command once the server is back")


def _first_line(raw: bytes) -> str:
    return (raw.decode("utf-8", "replace").strip().splitlines() or [""])[0][:200]


def _parse_rewards(url: str, raw: bytes, expected: int) -> list[float]:
    try:
        rewards = json.loads(raw)["rewards"]
        values = [float(r) for r in rewards]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"--remote_rm_url {url}: the answer is not {{\"rewards\": [numbers]}} "
                        f"({_first_line(raw)})") from None
    if len(values) != expected or not all(math.isfinite(v) for v in values):
        raise UserError(f"--remote_rm_url {url}: {len(values)} rewards for {expected} queries, or one not finite")
    return values


class RemoteRewardScorer:
    """PPO's reward hook (``ExperienceMaker``'s scorer) over HTTP: each sample decoded with the actor's
    tokenizer (prompt and answer, special tokens kept, padding dropped) and scored by the servers."""

    def __init__(self, client: RemoteRewardClient, actor_tokenizer: Any, device: torch.device) -> None:
        self.client = client
        self.tok = actor_tokenizer
        self.device = device

    def __call__(self, inputs: dict[str, torch.Tensor], labels: Sequence[Any] | None = None,
                 prompt_len: int | None = None) -> torch.Tensor:
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        queries = [self.tok.decode(row[keep].tolist(), skip_special_tokens=False) for row, keep in zip(ids, mask)]
        prompts = None
        if prompt_len is not None:
            prompts = [self.tok.decode(row[:prompt_len][keep[:prompt_len]].tolist(), skip_special_tokens=False)
                       for row, keep in zip(ids, mask)]
        has_labels = labels is not None and any(label is not None for label in labels)
        rewards = self.client.rewards(queries, prompts, list(labels) if has_labels and labels is not None else None)
        return torch.tensor(rewards, dtype=torch.float32, device=self.device)
