"""The one line of a failed collective (who is lost, who prints it) and the stale build lock, without a
process group: a stand-in store plays the heartbeats."""

from __future__ import annotations

import datetime
import logging
import os

import pytest

from openrl_ckpt.strategy import build_lock, peers

GLOO_CLOSED = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:18338. This is typically caused by a remote worker crashing.")
GLOO_TIMEOUT = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv"


def test_collective_failures_are_told_from_other_errors():
    assert peers.is_collective_failure(RuntimeError(GLOO_CLOSED))
    assert peers.is_collective_failure(RuntimeError(GLOO_TIMEOUT))
    assert not peers.is_collective_failure(RuntimeError("CUDA out of memory"))
    assert not peers.is_collective_failure(ValueError(GLOO_CLOSED))


class Beats:
    """A store whose counters move for the ranks that are alive (``add(key, 0)`` reads one)."""

    def __init__(self, alive: set[int], reachable: bool = True) -> None:
        self.alive, self.reachable, self.reads = alive, reachable, 0

    def add(self, key: str, amount: int) -> int:
        if not self.reachable:
            raise RuntimeError("Connection refused")
        if key == peers._SAID_KEY:
            self.said = getattr(self, "said", 0) + amount
            return self.said
        self.reads += 1
        rank = int(key.rsplit("/", 1)[1])
        return self.reads if rank in self.alive else 7


def watch(rank: int, store: Beats, monkeypatch) -> peers.PeerWatch:
    w = object.__new__(peers.PeerWatch)  # no process group: the attributes PeerWatch gathers at start-up
    w.rank, w.world_size, w.timeout = rank, 4, datetime.timedelta(minutes=0.1)
    w.hosts = ["a", "a", "b", "b"]
    w._store = store
    monkeypatch.setattr(peers, "_watch", w)
    monkeypatch.setattr(peers.time, "sleep", lambda s: None)
    return w


def test_a_lost_node_is_named_by_its_stopped_heartbeats_and_said_once(monkeypatch):
    watch(1, Beats(alive={0, 1}), monkeypatch)
    message, say = peers.describe_failure(RuntimeError(GLOO_CLOSED))
    assert message.startswith("lost ranks 2, 3 on host b (its heartbeat stopped): the collective failed on rank 1 "
                              "(Connection closed by peer); the run stops. Rerun the same command")
    assert say, "the first survivor to claim the line says it"
    assert not peers.describe_failure(RuntimeError(GLOO_CLOSED))[1], "the next one does not"


def test_a_hung_rank_times_out_naming_the_flag(monkeypatch):
    watch(0, Beats(alive={0, 1, 2, 3}), monkeypatch)
    message, say = peers.describe_failure(RuntimeError(GLOO_TIMEOUT))
    assert "within --collective_timeout_mins 0.1" in message and "heartbeat goes on" in message and say


def test_without_the_store_rank_0s_node_is_the_lost_one_and_the_lowest_survivor_says_it(monkeypatch):
    watch(2, Beats(alive=set(), reachable=False), monkeypatch)
    message, say = peers.describe_failure(RuntimeError(GLOO_CLOSED))
    assert message.startswith("lost ranks 0, 1 on host a (the rendezvous store of rank 0 no longer answers)") and say
    watch(3, Beats(alive=set(), reachable=False), monkeypatch)
    assert not peers.describe_failure(RuntimeError(GLOO_CLOSED))[1]


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(build_lock.time, "sleep", lambda s: None)  # the second look, a moment later
    folder = build_lock.extension_dir("some_op")
    assert folder == tmp_path / "some_op"
    return folder


def test_a_lock_nobody_holds_is_removed_and_a_held_one_is_said(extensions, caplog):
    lock = extensions / "lock"
    lock.touch()
    with caplog.at_level(logging.WARNING, logger="openrl_ckpt"):
        build_lock.clear_stale_build_lock("some_op")
    assert not lock.exists() and "removed a stale build lock" in caplog.text

    caplog.clear()
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton holds it while it builds
    try:
        with caplog.at_level(logging.WARNING, logger="openrl_ckpt"):
            build_lock.clear_stale_build_lock("some_op")
        assert lock.exists() and f"(pid {os.getpid()})" in caplog.text
    finally:
        os.close(fd)
