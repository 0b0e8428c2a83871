"""TrainState: everything besides the engines that a resumed run needs, as JSON.

RNG states are captured per rank and stored as plain lists / base64 so the file stays
human-readable JSON: our own state never holds serialized Python objects.
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

STATE_FILE = "train_state.json"
STATE_VERSION = 1


@dataclass
class TrainState:
    """Counters and identity of a run at an optimizer-step boundary.

    ``consumed_samples`` is global (all ranks together), so the data position survives a
    change of world size. ``extra`` holds each algorithm's own JSON state (PPO: KL
    coefficient, normaliser statistics, ...).
    """

    algorithm: str
    global_batch_size: int
    world_size: int
    model_fingerprint: str
    zero_stage: int | None = None
    global_step: int = 0
    micro_step: int = 0
    epoch: int = 0
    consumed_samples: int = 0
    rng: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """The RNG state of this process: python, numpy's legacy global, torch CPU and CUDA."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def incompatibility(saved: TrainState, current: TrainState) -> str | None:
    """Why a saved state cannot continue the current run, or None when it can."""
    if saved.algorithm != current.algorithm:
        return f"it was saved by {saved.algorithm}, this run is {current.algorithm}"
    if saved.model_fingerprint != current.model_fingerprint:
        return (f"it was saved for a different model (fingerprint {saved.model_fingerprint}, this model "
                f"{current.model_fingerprint}); point --ckpt_path elsewhere or use the same --pretrain")
    if saved.global_batch_size != current.global_batch_size:
        return (f"it was saved with --train_batch_size {saved.global_batch_size}, this run uses "
                f"{current.global_batch_size}")
    # Another world size always resumes (the data position is global; ZeRO partitions go through
    # DeepSpeed's universal format), and so does a change between ZeRO-1 and ZeRO-2, which share
    # the optimizer layout that format restores; other stage changes do not load.
    stages = {saved.zero_stage, current.zero_stage}
    if None not in stages and len(stages) > 1 and stages != {1, 2}:
        return (f"it was saved with --zero_stage {saved.zero_stage}, this run uses {current.zero_stage}; resume "
                f"with --zero_stage {saved.zero_stage} (only a change between stages 1 and 2 is converted)")
    return None
