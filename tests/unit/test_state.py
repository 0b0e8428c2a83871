import json
import random

import numpy as np
import torch

from openrl_ckpt.checkpoint.state import TrainState, capture_rng, incompatibility, restore_rng


def test_rng_round_trip_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = json.loads(json.dumps(capture_rng()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_train_state_json_round_trip_ignores_unknown_keys():
    s = TrainState(algorithm="sft", global_batch_size=8, world_size=2, model_fingerprint="f", global_step=3,
                   extra={"sft": {}})
    data = json.loads(s.to_json())
    data["future_field"] = 1
    assert TrainState.from_json(json.dumps(data)) == s


def base(**kw):
    d = dict(algorithm="sft", global_batch_size=8, world_size=2, model_fingerprint="f")
    d.update(kw)
    return TrainState(**d)


def test_incompatibility_reasons():
    assert incompatibility(base(), base()) is None
    assert "dpo" in incompatibility(base(algorithm="dpo"), base())
    assert "different model" in incompatibility(base(model_fingerprint="g"), base())
    assert "--train_batch_size 16" in incompatibility(base(global_batch_size=16), base())
    assert "--zero_stage 3" in incompatibility(base(zero_stage=3), base(zero_stage=2))
    assert "--zero_stage 0" in incompatibility(base(zero_stage=0), base(zero_stage=2))
    assert incompatibility(base(zero_stage=2), base(zero_stage=1)) is None, "ZeRO-1 <-> 2 converts"
    assert incompatibility(base(world_size=4), base()) is None, "another world size resumes (universal format)"


def test_step_saved_again_replaces_the_old_copy(tmp_path):
    from openrl_ckpt.checkpoint.comm import SingleProcessComm
    from openrl_ckpt.checkpoint.contents import BytesFile, CheckpointContents
    from openrl_ckpt.checkpoint.manager import CheckpointManager

    m = CheckpointManager(str(tmp_path), SingleProcessComm(), max_ckpt_num=3, max_ckpt_mem_gb=1)
    m.prepare()
    state = TrainState(algorithm="sft", global_batch_size=8, world_size=1, model_fingerprint="f", global_step=4)
    for payload in (b"old", b"new"):
        m.save(state, CheckpointContents([BytesFile("w.bin", payload)]), meta={})
    assert (tmp_path / "global_step4" / "w.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step4", "latest"]
