"""Who is lost when a collective fails: heartbeats through the rendezvous store, one line for the user.

A rank whose peer died sees its next collective fail within moments (gloo: "Connection closed by
peer"); a peer that hangs makes it fail after --collective_timeout_mins. Neither error says which rank
or node is gone, so every rank beats a counter in the launch's TCP store (MASTER_ADDR:MASTER_PORT, the
store the process group rendezvoused through) from a daemon thread; on a failure the survivors read
the counters twice, a few beats apart: a rank whose counter stands still is lost, one whose counter
moves is alive but did not join (hung). When the store itself is gone, rank 0's node (its host) is
the one lost. ``describe_failure`` turns that into the one line the CLI prints.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time

import torch.distributed as dist

log = logging.getLogger("openrl_ckpt")

BEAT_SECONDS = 1.0
_KEY = "openrl_ckpt/heartbeat/{}"
_SAID_KEY = "openrl_ckpt/failure_said"
# What torch and gloo/NCCL say when a collective fails because of a peer, not because of the caller.
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")
_TIMED_OUT = ("Timed out waiting", "timed out", "Timeout", "Watchdog caught collective operation timeout")


class PeerWatch:
    """This rank's heartbeat, and every rank's host (gathered once at start-up)."""

    def __init__(self, rank: int, world_size: int, timeout: datetime.timedelta) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        gathered: list[str | None] = [None] * world_size
        dist.all_gather_object(gathered, socket.gethostname())
        self.hosts = [str(h) for h in gathered]
        self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
        threading.Thread(target=self._beat, name="openrl-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        key = _KEY.format(self.rank)
        while True:  # for the life of the process (a daemon thread)
            try:
                self._store.add(key, 1)
            except Exception:  # the store's host is gone: nothing to beat into; describe_failure says so
                return
            time.sleep(BEAT_SECONDS)

    def silent_ranks(self) -> tuple[list[int], list[int]] | None:
        """(ranks whose heartbeat stopped, ranks that beat): every other rank is in one of them; None when
        the store cannot be read (its host, rank 0's node, is gone)."""
        others = [r for r in range(self.world_size) if r != self.rank]
        try:
            before = [self._store.add(_KEY.format(r), 0) for r in others]
            time.sleep(3.5 * BEAT_SECONDS)
            after = [self._store.add(_KEY.format(r), 0) for r in others]
        except Exception:
            return None
        lost = [r for r, b, a in zip(others, before, after) if a == b]
        return lost, [r for r in others if r not in lost]

    def first_to_say(self) -> bool | None:
        """Whether this rank is the first to report the failure (one line per job); None without a store."""
        try:
            return self._store.add(_SAID_KEY, 1) == 1
        except Exception:
            return None

    def name(self, ranks: list[int]) -> str:
        by_host: dict[str, list[int]] = {}
        for r in ranks:
            by_host.setdefault(self.hosts[r], []).append(r)
        return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on host {host}"
                         for host, rs in by_host.items())


_watch: PeerWatch | None = None


def start_watch(rank: int, world_size: int, timeout: datetime.timedelta) -> None:
    """Collective, right after the process group is up (a world of one has no peers to lose). Without a
    reachable store (a process group set up another way) failures are still one line, without names."""
    global _watch
    if world_size > 1 and _watch is None:
        try:
            _watch = PeerWatch(rank, world_size, timeout)
        except (KeyError, ValueError, RuntimeError) as e:
            log.warning("no heartbeat for this run (%s): a lost peer will not be named", e)


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed because of a peer (lost or hung), as torch raises it."""
    text = str(error)
    backend_errors = tuple(getattr(dist, n) for n in ("DistBackendError", "DistNetworkError") if hasattr(dist, n))
    return isinstance(error, backend_errors) or (
        isinstance(error, RuntimeError) and any(s in text for s in _LOST_PEER + ("Timed out waiting",)))


def describe_failure(error: BaseException) -> tuple[str, bool]:
    """The one line a collective failure gets, and whether this rank is the one to print it: the first
    rank to claim it in the store (a stuck rank never fails, so the lowest rank may not be the one), else
    the lowest surviving rank; a job with many survivors says it once."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = next((s for s in _LOST_PEER + _TIMED_OUT if s in text), text[:160])
    watch = _watch
    if watch is None:
        return f"a collective failed ({cause})", True
    timed_out = any(s in text for s in _TIMED_OUT) and not any(s in text for s in _LOST_PEER)
    minutes = watch.timeout.total_seconds() / 60
    silent = watch.silent_ranks()
    if silent is None:  # the store's host is gone: rank 0, with its whole node when that is not ours
        same_node = watch.hosts[watch.rank] == watch.hosts[0]
        lost = [0] if same_node else [r for r in range(watch.world_size) if watch.hosts[r] == watch.hosts[0]]
        what = f"lost {watch.name(lost)} (the rendezvous store of rank 0 no longer answers)"
    else:
        lost, _ = silent
        if lost:
            what = f"lost {watch.name(lost)} (its heartbeat stopped)"
        elif timed_out:
            what = (f"the other ranks did not join a collective within --collective_timeout_mins {minutes:g}, "
                    f"though every rank's heartbeat goes on (one is stuck: in I/O, or in a collective the others "
                    f"skipped)")
        else:
            what = "a peer closed its connection"
    if timed_out and lost:
        what += f"; the collective timed out after --collective_timeout_mins {minutes:g}"
    message = (f"{what}: the collective failed on rank {watch.rank} ({cause}); the run stops. Rerun the same "
               f"command (with --load_checkpoint) to resume from the newest checkpoint")
    first = watch.first_to_say() if silent is not None else None
    if first is None:  # no store to agree through: the lowest surviving rank says it
        first = watch.rank == min(r for r in range(watch.world_size) if r not in lost)
    return message, first
