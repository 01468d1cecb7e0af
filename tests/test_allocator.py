"""The CUDA caching allocator model (``costmodel.allocator``): its rules in closed form, and the
allocation event stream of the memory simulation (``costmodel.memory.AllocEvent``)."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

import costmodel
from costmodel.allocator import (K_LARGE_BUFFER, K_SMALL_BUFFER, AllocatorStats, allocation_size, is_small,
                                 predict_cuda_memory, replay, round_size, step_events)
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.memory import AllocEvent, refuse_arrays

MiB = 1 << 20


def alloc(key: str, nbytes: int) -> AllocEvent:
    return AllocEvent("alloc", key, nbytes)


def free(key: str) -> AllocEvent:
    return AllocEvent("free", key, 0)


def test_rounding_to_512_bytes() -> None:
    assert round_size(1) == 512
    assert round_size(512) == 512
    assert round_size(513) == 1024
    assert replay([alloc("a", 1)]).max_allocated == 512
    assert replay([alloc("a", 513)]).max_allocated == 1024


def test_pools_and_segment_sizes() -> None:
    exactly_small = replay([alloc("a", MiB)])
    assert is_small(MiB) and exactly_small.max_reserved == K_SMALL_BUFFER
    assert exactly_small.segments[0].small
    just_large = replay([alloc("a", MiB + 1)])  # rounds to 1 MiB + 512: the large pool
    assert just_large.max_reserved == K_LARGE_BUFFER == 20 * MiB
    assert not just_large.segments[0].small
    assert just_large.max_allocated == MiB + 512  # split: the 20 MiB segment keeps its remainder
    assert replay([alloc("a", 12 * MiB)]).max_reserved == 12 * MiB  # >= 10 MiB: a segment of its own
    own = replay([alloc("a", 11 * MiB + 1)])  # rounded to 2 MiB multiples: 12 MiB
    assert own.max_reserved == allocation_size(11 * MiB + 512) == 12 * MiB
    assert own.max_allocated == 12 * MiB  # the 1 MiB - 512 B remainder is not > 1 MiB: no split
    assert replay([alloc("a", 9 * MiB)]).max_reserved == 20 * MiB  # < 10 MiB: a 20 MiB segment


def test_zero_bytes_take_no_block() -> None:
    stats = replay([alloc("a", 0), free("a")])
    assert stats.max_allocated == stats.max_reserved == 0 and stats.allocations == 0


def test_freed_block_serves_a_smaller_request() -> None:
    stats = replay([alloc("a", 4 * MiB), free("a"), alloc("b", 3 * MiB)])
    assert stats.max_reserved == stats.reserved == 20 * MiB and len(stats.segments) == 1
    assert stats.max_allocated == 4 * MiB and stats.allocated == 3 * MiB
    small = replay([alloc("a", 4096), free("a"), alloc("b", 1000)])
    assert small.reserved == K_SMALL_BUFFER and len(small.segments) == 1 and small.allocated == 1024


def test_large_pool_remainder_rule() -> None:
    whole = replay([alloc("x", 12 * MiB), free("x"), alloc("y", 11 * MiB)])  # remainder 1 MiB: kept whole
    assert whole.allocated == 12 * MiB and len(whole.segments) == 1
    split = replay([alloc("x", 12 * MiB), free("x"), alloc("y", 10 * MiB + MiB // 2)])  # 1.5 MiB > 1 MiB
    assert split.allocated == 10 * MiB + MiB // 2
    # the small pool keeps a remainder down to 512 B
    small = replay([alloc("a", MiB), alloc("b", MiB - 512), alloc("c", 512)])  # b leaves exactly 512 B
    assert small.allocated == 2 * MiB and len(small.segments) == 1


def test_adjacent_frees_coalesce() -> None:
    events = [alloc("a", 6 * MiB), alloc("b", 6 * MiB), alloc("c", 6 * MiB), free("a"), free("b"),
              alloc("d", 12 * MiB)]
    stats = replay(events)
    assert len(stats.segments) == 1 and stats.reserved == 20 * MiB  # a + b merged serve d
    assert stats.allocated == 18 * MiB
    apart = replay([alloc("a", 6 * MiB), alloc("b", 6 * MiB), alloc("c", 6 * MiB), free("a"), free("c"),
                    alloc("d", 12 * MiB)])  # a and the c + tail are not adjacent: 6 MiB and 8 MiB
    assert len(apart.segments) == 2 and apart.reserved == 32 * MiB


def test_best_fit_takes_the_smallest_free_block() -> None:
    events = [alloc("a", 8 * MiB),  # a 20 MiB segment: a, then a free 12 MiB tail
              alloc("big", 14 * MiB), free("big"),  # its own 14 MiB segment, free again
              alloc("c", 11 * MiB),  # best fit: the 12 MiB tail (1 MiB remainder: taken whole)
              alloc("d", 14 * MiB)]  # the 14 MiB segment is still free for it
    stats = replay(events)
    assert stats.reserved == 34 * MiB and len(stats.segments) == 2
    assert stats.allocated == (8 + 12 + 14) * MiB


def test_maxima_of_a_small_stream_by_hand() -> None:
    events = [alloc("a", 300), alloc("b", 2 * MiB), free("a"),
              alloc("c", 15 * MiB),  # from b's 18 MiB remainder: split, 3 MiB stays free
              alloc("d", 15 * MiB)]  # no fit: a 16 MiB segment, 1 MiB remainder not kept
    stats = replay(events)
    assert stats.max_allocated == (2 + 15 + 16) * MiB
    assert stats.max_reserved == (2 + 20 + 16) * MiB
    assert stats.max_requested == (2 + 15 + 15) * MiB
    assert stats.fragmentation == stats.reserved - stats.allocated == 5 * MiB
    assert AllocatorStats(1, 2, 1, 1, 2, (), 1, overhead_bytes=5).device_total == 7


def test_bad_streams_are_refused() -> None:
    with pytest.raises(CostModelError):
        replay([free("nothing")._replace(nbytes=4)])
    with pytest.raises(CostModelError):
        replay([alloc("a", 4), alloc("a", 4)])
    with pytest.raises(CostModelError):
        refuse_arrays(np.array([4, 8]))


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def live_bytes_at_snapshots(events: list[AllocEvent]) -> list[int]:
    live: dict[object, int] = {}
    totals = []
    for event in events:
        if event.kind == "alloc":
            assert event.key not in live
            live[event.key] = event.nbytes
        elif event.kind == "free":
            assert live.pop(event.key) == event.nbytes
        else:
            assert event.key == len(totals)
            totals.append(sum(live.values()))
    return totals


@pytest.mark.parametrize("step", [1, 2])
def test_event_stream_matches_the_timeline(step: int) -> None:
    model = tiny_model()
    timeline = costmodel.predict(model, "fft", batch=2, resolution=8, step=step).details["timeline"]
    config = StepConfig(model="Sequential", method="fft", batch=2, resolution=8, step=step)
    events = step_events(config, model=model)[-1]
    assert live_bytes_at_snapshots(events) == [snapshot.total for snapshot in timeline]


def test_predicted_step_on_the_allocator() -> None:
    model = tiny_model()
    prediction = costmodel.predict(model, "fft", batch=2, resolution=8)
    config = StepConfig(model="Sequential", method="fft", batch=2, resolution=8)
    stats = predict_cuda_memory(config, model=model, overhead_bytes=1000)
    peak = prediction.details["timeline"]
    assert stats.max_requested == max(snapshot.total for snapshot in peak)
    assert stats.carried_freed == 1  # step 1's loss, dropped before step 2
    assert stats.max_reserved >= stats.max_allocated >= stats.max_requested
    assert stats.max_reserved == K_SMALL_BUFFER  # every tensor of this model is small
    assert stats.device_total == stats.max_reserved + 1000
