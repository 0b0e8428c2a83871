"""The reward server and its client in one process, over real sockets on 127.0.0.1: batching across
concurrent requests, retries while a server is down or comes back, one-line errors, the PPO hook."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from openrl_ckpt.errors import UserError
from openrl_ckpt.inference.reward_server import RewardBatcher, RewardModelScorer, make_server
from openrl_ckpt.models.remote_reward import (
    RemoteRewardClient,
    RemoteRewardConfig,
    RemoteRewardScorer,
    parse_remote_urls,
)


def text_length(texts: list[str]) -> list[float]:
    return [float(len(t)) for t in texts]


@contextmanager
def serving(score=text_length, port: int = 0, max_wait_s: float = 0.005) -> Iterator[tuple[str, RewardBatcher]]:
    batcher = RewardBatcher(score, max_wait_s=max_wait_s)
    server = make_server(batcher, "127.0.0.1", port)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/get_reward", batcher
    finally:
        server.shutdown()
        server.server_close()
        batcher.close()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(*urls: str, retries: int = 2, batch_size: int = 0) -> RemoteRewardClient:
    return RemoteRewardClient(RemoteRewardConfig(urls=urls, timeout_s=5, retries=retries, backoff_s=0.05,
                                                 batch_size=batch_size))


def test_rewards_come_back_in_order_and_urls_are_averaged() -> None:
    with serving() as (a, _), serving(lambda texts: [2.0 * len(t) for t in texts]) as (b, _):
        assert client(a).rewards(["x", "abc", ""]) == [1.0, 3.0, 0.0]
        assert client(a, batch_size=2).rewards(["x", "abc", "hello"]) == [1.0, 3.0, 5.0]  # 2 requests
        assert client(a, b).rewards(["ab"]) == [3.0]  # (2 + 4) / 2


def test_concurrent_requests_share_a_forward_pass() -> None:
    def slow(texts: list[str]) -> list[float]:
        time.sleep(0.2)  # while the first request is scored, the others queue up
        return text_length(texts)

    with serving(slow, max_wait_s=0.05) as (url, batcher):
        results: dict[int, list[float]] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, client(url).rewards(["a" * i])))
                   for i in range(1, 7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {i: [float(i)] for i in range(1, 7)}
        assert batcher.batches < 6  # fewer forward rounds than requests


def test_bad_requests_are_400_with_a_reason() -> None:
    with serving() as (url, _):
        request = urllib.request.Request(url, data=json.dumps({"query": "not a list"}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=5)
        assert e.value.code == 400 and "query" in e.value.read().decode()
        with pytest.raises(UserError, match=r"--remote_rm_url .*/nope: the server refused the request \(HTTP 404"):
            client(url.replace("get_reward", "nope")).rewards(["a"])


def test_a_dead_server_is_retried_then_one_line_error() -> None:
    url = f"http://127.0.0.1:{unused_port()}/get_reward"
    started = time.monotonic()
    with pytest.raises(UserError, match=r"no reward after 3 tries .*the last checkpoint is intact") as e:
        client(url, retries=2).rewards(["a"])
    assert "\n" not in str(e.value)
    assert time.monotonic() - started >= 0.05 + 0.1  # the pauses doubled


def test_a_server_that_comes_back_is_reached_by_the_retries() -> None:
    port = unused_port()
    results: list[list[float]] = []
    asking = threading.Thread(target=lambda: results.append(client(f"http://127.0.0.1:{port}/get_reward",
                                                                   retries=6).rewards(["abcd"])))
    asking.start()
    time.sleep(0.2)  # a few tries fail first
    with serving(port=port):
        asking.join()
    assert results == [[4.0]]


def test_a_scoring_failure_is_500_and_the_server_stays_up() -> None:
    calls = []

    def flaky(texts: list[str]) -> list[float]:
        calls.append(len(texts))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return text_length(texts)

    with serving(flaky) as (url, _):
        assert client(url, retries=1).rewards(["abc"]) == [3.0]  # the retry after HTTP 500 succeeds
    assert calls == [1, 1]


def test_url_flag_is_checked() -> None:
    assert parse_remote_urls("http://a:1/get_reward, http://b:2/get_reward") == ("http://a:1/get_reward",
                                                                               "http://b:2/get_reward")
    with pytest.raises(UserError, match="Python file"):
        parse_remote_urls("reward_func.py")
    with pytest.raises(UserError, match="not an http"):
        parse_remote_urls("localhost:5000")


def test_ppo_hook_sends_decoded_samples_prompts_and_labels(tiny_tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    seen: list[dict] = []

    class Recording(RemoteRewardClient):
        def rewards(self, queries, prompts=None, labels=None):
            seen.append({"query": queries, "prompts": prompts, "labels": labels})
            return [1.0] * len(queries)

    pad = tok.pad_token_id
    prompt, answer = tok("Hi")["input_ids"], tok(" there")["input_ids"]
    ids = torch.tensor([[pad, *prompt, *answer], [*prompt, prompt[-1], *answer]])
    mask = torch.tensor([[0] + [1] * (len(prompt) + len(answer)), [1] * (len(prompt) + 1 + len(answer))])
    scorer = RemoteRewardScorer(Recording(RemoteRewardConfig(urls=("http://x",))), tok, torch.device("cpu"))
    out = scorer({"input_ids": ids, "attention_mask": mask}, labels=["a", "b"], prompt_len=len(prompt) + 1)
    assert out.tolist() == [1.0, 1.0]
    assert seen[0]["query"][0] == "Hi there" and seen[0]["prompts"][0] == "Hi"
    assert seen[0]["labels"] == ["a", "b"]
    scorer({"input_ids": ids, "attention_mask": mask}, labels=[None, None])
    assert seen[1]["labels"] is None  # no --label_key: no labels sent


def test_reward_model_scorer_matches_the_model(tiny_model_dir) -> None:
    from openrl_ckpt.models.actor import ModelConfig, load_tokenizer
    from openrl_ckpt.models.reward import load_reward_model, reward_token_ids

    tok = load_tokenizer(tiny_model_dir)
    model = load_reward_model(ModelConfig(pretrain=tiny_model_dir), require_head=False).eval()
    texts = ["The capital of France is Paris.", "Hi", "Sort the list 5, 2, 9"]
    with torch.no_grad():
        one_by_one = [model(input_ids=torch.tensor([ids])).item() for ids in reward_token_ids(tok, texts, 64)]
    scored = RewardModelScorer(model, tok, 64, torch.device("cpu"), batch_size=2)(texts)
    assert scored == pytest.approx(one_by_one, abs=1e-5)
