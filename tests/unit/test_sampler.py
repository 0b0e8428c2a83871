"""ResumableDistributedSampler: positions, wrap-around, O(1) resume, world-size changes."""

import itertools

import pytest

from openrl_ckpt.data.sampler import EvalSampler, ResumableDistributedSampler


def global_order(n, batch, world, *, seed=7, consumed=0, micro=1):
    """Reassemble the global sample order from every rank's stream, micro batch by micro batch."""
    samplers = [ResumableDistributedSampler(n, batch, world, r, seed=seed) for r in range(world)]
    for s in samplers:
        s.set_consumed(consumed)
    streams = [list(s) for s in samplers]
    out = []
    # position p belongs to rank p % world, so interleaving the streams restores the order
    for group in itertools.zip_longest(*streams):
        out.extend(x for x in group if x is not None)
    return out


def test_epoch_covers_every_sample_once_when_divisible():
    order = global_order(12, 4, 2)
    assert sorted(order) == list(range(12))


def test_partial_last_batch_wraps_to_epoch_start():
    s = ResumableDistributedSampler(10, 4, 1, 0, seed=1)
    order = list(s)
    assert s.steps_per_epoch == 3 and len(order) == 12
    assert sorted(set(order)) == list(range(10))
    assert order[10:] == order[:2]


def test_dataset_smaller_than_one_batch_still_fills_a_step():
    s = ResumableDistributedSampler(3, 8, 2, 0, seed=1)
    assert s.steps_per_epoch == 1 and len(s) == 4


@pytest.mark.parametrize("consumed", [0, 4, 8, 12, 16, 20])
def test_resume_is_the_suffix_of_the_uninterrupted_stream(consumed):
    full = global_order(10, 4, 2, consumed=0) + global_order(10, 4, 2, consumed=12)
    resumed = global_order(10, 4, 2, consumed=consumed)
    epoch_len = 12
    epoch, offset = divmod(consumed, epoch_len)
    assert resumed == full[epoch * epoch_len + offset : (epoch + 1) * epoch_len]


def test_next_epoch_has_a_different_permutation():
    a = global_order(50, 10, 1, consumed=0)
    b = global_order(50, 10, 1, consumed=50)
    assert a != b and sorted(a) == sorted(b)


@pytest.mark.parametrize("save_world,resume_world", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_world_size_change_continues_at_the_same_global_position(save_world, resume_world):
    before = global_order(30, 8, save_world, consumed=0)
    after = global_order(30, 8, resume_world, consumed=16)
    assert after == before[16:]


def test_consumed_must_be_whole_global_batches():
    s = ResumableDistributedSampler(10, 4, 1, 0, seed=1)
    with pytest.raises(ValueError):
        s.set_consumed(6)


def test_resume_far_into_a_huge_dataset_is_arithmetic():
    s = ResumableDistributedSampler(10**9, 1024, 8, 3, seed=0, shuffle=False)
    s.set_consumed(10**12)  # ~1000 epochs in: would take hours if it iterated
    assert s.epoch == 10**12 // s.epoch_positions
    first = next(iter(s))
    assert first == (10**12 % s.epoch_positions + 3) % 10**9


def test_eval_sampler_marks_padding_and_balances_ranks():
    samplers = [EvalSampler(5, 2, 2, r) for r in range(2)]
    streams = [list(s) for s in samplers]
    assert len(streams[0]) == len(streams[1]) == 4  # 5 rows padded to 2 batches of 2 on 2 ranks
    real = sorted(p for st in streams for p in st if p >= 0)
    assert real == list(range(5))
    pads = [p for st in streams for p in st if p < 0]
    assert len(pads) == 3 and all(0 <= -1 - p < 5 for p in pads)
