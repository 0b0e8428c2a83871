"""Stop requests (SIGTERM/SIGUSR1), one-shot fault points and the host copy of a state dict."""

import collections
import os
import signal

import pytest
import torch

from openrl_ckpt.checkpoint.faults import fault_point
from openrl_ckpt.checkpoint.preemption import Preempted, StopRequests, signal_name
from openrl_ckpt.strategy.engine_checkpoint import _DeferredWrites, _to_host


def test_stop_signals_are_recorded_then_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequests() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal only counts
        assert stop.requested and signal_name(stop.signum) == "SIGUSR1" and stop.count == 2
    assert signal.getsignal(signal.SIGUSR1) is before


def test_preempted_exit_code_says_whether_a_checkpoint_was_committed(tmp_path):
    assert Preempted("x", tmp_path).exit_code == 0
    assert Preempted("x", None).exit_code == 1


def test_once_fault_fires_in_one_process_only(tmp_path, monkeypatch):
    marker = tmp_path / "fired"
    monkeypatch.setenv("OPENRL_FAULT", f"write@3:raise=ENOSPC:once={marker}")
    fault_point("write", 2)  # another step: nothing
    with pytest.raises(OSError, match="No space left"):
        fault_point("write", 3)
    fault_point("write", 3)  # the marker exists: a rerun passes
    assert marker.exists()


Pair = collections.namedtuple("Pair", "a b")


def test_host_copy_is_independent_and_keeps_the_structure():
    t = torch.arange(6.0)
    state = collections.OrderedDict(w=t[:3], nested={"list": [t[3:], 1], "pair": Pair(t, "x"), "tup": (t, 2)},
                                    lr=0.1)
    copy = _to_host(state)
    t.add_(100)  # training moves on
    assert type(copy) is collections.OrderedDict and list(copy) == ["w", "nested", "lr"]
    assert torch.equal(copy["w"], torch.arange(3.0)) and torch.equal(copy["nested"]["list"][0], torch.arange(3.0, 6))
    assert isinstance(copy["nested"]["pair"], Pair) and torch.equal(copy["nested"]["pair"].a, torch.arange(6.0))
    assert type(copy["nested"]["tup"]) is tuple and copy["lr"] == 0.1


def test_deferred_writes_queue_the_save_and_pass_everything_else_through():
    class Real:
        name = "real"

        def save(self, state_dict, path):
            raise AssertionError("not now")

    queue = []
    t = torch.ones(2)
    stand_in = _DeferredWrites(Real(), queue, host_copy=True)
    stand_in.save(state_dict={"t": t}, path="/x/file.pt")
    t.zero_()
    assert stand_in.name == "real" and len(queue) == 1
    writer, state, path = queue[0]
    assert isinstance(writer, Real) and path == "/x/file.pt" and torch.equal(state["t"], torch.ones(2))


def test_deferred_writes_drop_every_frozen_name_tied_aliases_included():
    """DeepSpeed leaves a tied alias of a frozen weight (lm_head of a frozen embedding) in the module
    state of a LoRA checkpoint; the stand-in drops every frozen name it is given."""
    emb, lora = torch.nn.Embedding(8, 4), torch.nn.Linear(4, 2)
    emb.weight.requires_grad_(False)
    model = torch.nn.ModuleDict({"embed": emb, "lm_head": torch.nn.Linear(4, 8, bias=False), "lora": lora})
    model["lm_head"].weight = emb.weight  # tied
    frozen = frozenset(n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad)
    assert frozen == {"embed.weight", "lm_head.weight"}
    queue = []
    state = {"module": model.state_dict(), "other": 1}
    _DeferredWrites(object(), queue, host_copy=False, frozen=frozen).save(state, "/x/model_states.pt")
    _, saved, _ = queue[0]
    assert sorted(saved["module"]) == ["lora.bias", "lora.weight"] and saved["other"] == 1
    assert "lm_head.weight" in state["module"], "the caller's dict is left as it was"


def test_host_copy_keeps_tied_weights_as_one_tensor():
    w = torch.randn(4, 3)
    copy = _to_host({"embed": w.detach(), "lm_head": w.detach(), "row": w[1]})
    assert copy["embed"] is copy["lm_head"] and copy["embed"].data_ptr() != w.data_ptr()
    assert torch.equal(copy["row"], w[1]) and copy["row"] is not copy["embed"]
