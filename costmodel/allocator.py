"""What PyTorch's CUDA caching allocator would report for a predicted step.

The memory simulation (``costmodel.memory``) counts storages as ``MemTracker`` sees them on the
CPU: exact byte sizes. On a GPU, ``torch.cuda.max_memory_allocated()`` counts every live block of
the caching allocator (a request rounded up, sometimes a whole unsplit free block) and
``torch.cuda.max_memory_reserved()`` every segment it took from ``cudaMalloc`` and keeps. This
module replays the simulation's allocation event stream (``memory.AllocEvent``) through a model of
that allocator, torch 2.14 (``c10/cuda/CUDACachingAllocator.cpp``, class
``DeviceCachingAllocator``), with its default configuration.

**Unvalidated on hardware**: written from the allocator's source without a GPU at hand; no number
it gives has been compared with a measurement yet.

Rules followed (function names of ``DeviceCachingAllocator`` unless said otherwise):

- ``round_size``: a request is rounded up to a multiple of ``kMinBlockSize`` = 512 B (at least
  512 B); ``roundup_power2_divisions`` is off by default. A request of 0 B takes no block (the
  allocator's ``allocate`` returns an empty pointer without calling ``malloc``).
- ``get_pool``: rounded sizes <= ``kSmallSize`` (1 MiB) come from the small pool, larger ones from
  the large pool; a free block is only reused within its pool.
- ``get_allocation_size``: a new segment (``alloc_block``, one ``cudaMalloc``) is
  ``kSmallBuffer`` = 2 MiB for the small pool, ``kLargeBuffer`` = 20 MiB for sizes below
  ``kMinLargeAlloc`` = 10 MiB, else the size rounded up to ``kRoundLarge`` = 2 MiB.
- ``get_free_block``: best fit, ``pool.blocks.lower_bound`` over the set ordered by
  ``BlockComparatorSize`` (stream, size, address): the smallest free block that fits, the lowest
  address among equal sizes. One stream. With ``max_split_size`` unlimited (the default) its two
  oversize checks never refuse a block.
- ``should_split`` / ``alloc_found_block``: the block is split when the remainder is >= 512 B (small
  pool) or > 1 MiB (large pool); the request takes the lower addresses, the remainder stays free.
  Unsplit, the request holds the whole block.
- Stats in ``alloc_found_block`` / ``free``: ``allocated_bytes`` grows and shrinks by ``block->size``
  (the rounded request after a split, the whole block without one); ``alloc_block`` grows
  ``reserved_bytes`` by the segment size; a peak is the maximum of ``current`` after each change
  (``increase_stat``), reset to ``current`` by ``resetPeakStats``.
- ``free_block`` / ``try_merge_blocks``: a freed block merges with its free neighbours in its
  segment (``prev``, ``next``); segments are never returned (no ``empty_cache``, no
  ``release_cached_blocks``, since nothing runs out of memory here).

Left out: ``garbage_collection_threshold`` (off by default; needs a memory fraction),
``expandable_segments`` (off by default), ``max_split_size_mb`` and ``roundup_power2_divisions``
(unlimited / off by default), several streams and ``recordStream`` events (one stream: frees take
effect at once), CUDA graph private pools, ``cudaMalloc`` failures and their retries (which free
cached segments), and memory outside the allocator: the CUDA context, cuBLAS / cuDNN workspaces
(cuBLAS takes its workspace through this allocator in recent torch, but the simulation lists no
such allocation), kernels' own scratch - an ``overhead_bytes`` argument stands for what a device
profile knows of these. Addresses are modelled: each new segment lies above every earlier one (real
``cudaMalloc`` addresses need not), which only decides ties between free blocks of equal size.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from costmodel.errors import CostModelError
from costmodel.memory import AllocEvent, simulate

if TYPE_CHECKING:
    import pluggy
    from torch import nn

    from costmodel.config import StepConfig

K_MIN_BLOCK_SIZE = 512  # kMinBlockSize: every size is rounded to a multiple of it
K_SMALL_SIZE = 1 << 20  # kSmallSize: the largest "small" request, 1 MiB
K_SMALL_BUFFER = 2 << 20  # kSmallBuffer: small requests are packed in 2 MiB segments
K_LARGE_BUFFER = 20 << 20  # kLargeBuffer: requests of 1-10 MiB share 20 MiB segments
K_MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc: from here a request gets a segment of its own size
K_ROUND_LARGE = 2 << 20  # kRoundLarge: such a segment is a multiple of 2 MiB

# How many steps before the measured one are replayed to bring the allocator into its state
# (``validation.measure.measure_step`` runs steps 1..k-1 first): steps 1..this at most.
MAX_WARMUP_STEPS = 3


def round_size(nbytes: int) -> int:
    """``round_size``: the block size a request of ``nbytes`` asks for."""
    if nbytes < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    return K_MIN_BLOCK_SIZE * -(-nbytes // K_MIN_BLOCK_SIZE)


def is_small(size: int) -> bool:
    """``get_pool``: whether a rounded size is served by the small pool."""
    return size <= K_SMALL_SIZE


def allocation_size(size: int) -> int:
    """``get_allocation_size``: the segment ``cudaMalloc``'d when no free block fits ``size``."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * -(-size // K_ROUND_LARGE)


def should_split(block_size: int, size: int, small: bool) -> bool:
    """``should_split``: whether the rest of a free block of ``block_size`` stays a free block of
    its own after ``size`` is taken from it (else the request holds the whole block). A large-pool
    remainder of 1 MiB or less is not kept: it could only serve small requests, which never come
    from the large pool."""
    remaining = block_size - size
    return remaining >= K_MIN_BLOCK_SIZE if small else remaining > K_SMALL_SIZE


@dataclass(eq=False)
class Block:
    """A contiguous range of one segment, allocated or free; ``prev``/``next`` are its neighbours
    in the segment (None at the segment's ends)."""

    address: int
    size: int
    small: bool
    requested: int = 0
    allocated: bool = False
    prev: Block | None = None
    next: Block | None = None


@dataclass(frozen=True)
class Segment:
    """One ``cudaMalloc``: where it lies, its size, and its pool."""

    address: int
    size: int
    small: bool


@dataclass(frozen=True)
class AllocatorStats:
    """What the allocator would report (bytes): ``max_allocated`` and ``max_reserved`` as
    ``torch.cuda.max_memory_allocated()`` / ``max_memory_reserved()`` after
    ``reset_peak_memory_stats()`` at the start of the replayed (last) step; ``max_requested`` the
    peak of the unrounded live bytes (the CPU simulation's view of the same moments, without the
    rounding); the state at the end; the segments reserved; ``overhead_bytes`` what the caller says
    exists outside the allocator (CUDA context, workspaces); ``carried_freed`` the tensors alive
    at the end of a warm-up step that the next step's entry does not have (the loss, which the
    simulation keeps to the end of the step and a training loop drops before the next one), freed
    as that step starts."""

    max_allocated: int
    max_reserved: int
    max_requested: int
    allocated: int
    reserved: int
    segments: tuple[Segment, ...]
    allocations: int
    overhead_bytes: int = 0
    carried_freed: int = 0

    @property
    def device_total(self) -> int:
        """The device memory the process would hold at its peak: reserved segments plus overhead."""
        return self.max_reserved + self.overhead_bytes

    @property
    def fragmentation(self) -> int:
        """Reserved but not allocated at the end (cached free blocks)."""
        return self.reserved - self.allocated


@dataclass
class CachingAllocator:
    """The caching allocator's state: segments, free blocks per pool, live blocks by key."""

    allocated: int = 0
    reserved: int = 0
    requested: int = 0
    max_allocated: int = 0
    max_reserved: int = 0
    max_requested: int = 0
    allocations: int = 0
    segments: list[Segment] = field(default_factory=list)
    live: dict[object, Block] = field(default_factory=dict)
    # Free blocks of each pool (True: small) as sorted (size, address): BlockComparatorSize's order.
    free_order: dict[bool, list[tuple[int, int]]] = field(default_factory=lambda: {True: [], False: []})
    free_blocks: dict[int, Block] = field(default_factory=dict)  # address -> free block
    next_address: int = 0

    def malloc(self, key: object, nbytes: int) -> None:
        """Allocate ``nbytes`` for storage ``key`` (``DeviceCachingAllocator::malloc``)."""
        if key in self.live:
            raise CostModelError(f"allocation event for a storage that is already live: {key!r}")
        if nbytes < 0:
            raise CostModelError(f"allocation of {nbytes} B for {key!r}")
        if nbytes == 0:
            return  # no block: an empty pointer
        size = round_size(nbytes)
        small = is_small(size)
        block = self._take_free_block(size, small) or self._new_segment(size, small)
        if should_split(block.size, size, small):
            remaining = Block(block.address + size, block.size - size, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = remaining
            block.next = remaining
            block.size = size
            self._insert_free(remaining)
        block.allocated = True
        block.requested = nbytes
        self.live[key] = block
        self.allocations += 1
        self.allocated += block.size
        self.requested += nbytes
        self.max_allocated = max(self.max_allocated, self.allocated)
        self.max_requested = max(self.max_requested, self.requested)

    def free(self, key: object) -> None:
        """Free storage ``key``'s block and merge it with free neighbours (``free``, ``free_block``,
        ``try_merge_blocks``)."""
        block = self.live.pop(key, None)
        if block is None:
            return  # a 0-byte storage (no block); an unknown key is refused by :meth:`replay`
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        block.requested = 0
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated:
                self._remove_free(neighbour)
                if neighbour is block.prev:  # [neighbour block]
                    block.address = neighbour.address
                    block.prev = neighbour.prev
                    if block.prev is not None:
                        block.prev.next = block
                else:  # [block neighbour]
                    block.next = neighbour.next
                    if block.next is not None:
                        block.next.prev = block
                block.size += neighbour.size
        self._insert_free(block)

    def reset_peaks(self) -> None:
        """``resetPeakStats``: each peak starts again from the current value."""
        self.max_allocated, self.max_reserved, self.max_requested = self.allocated, self.reserved, self.requested

    def stats(self, overhead_bytes: int = 0, carried_freed: int = 0) -> AllocatorStats:
        return AllocatorStats(self.max_allocated, self.max_reserved, self.max_requested, self.allocated,
                              self.reserved, tuple(self.segments), self.allocations, overhead_bytes,
                              carried_freed)

    def _take_free_block(self, size: int, small: bool) -> Block | None:
        order = self.free_order[small]
        index = bisect_left(order, (size, -1))
        if index == len(order):
            return None
        _, address = order.pop(index)
        return self.free_blocks.pop(address)

    def _new_segment(self, size: int, small: bool) -> Block:
        segment_size = allocation_size(size)
        segment = Segment(self.next_address, segment_size, small)
        self.next_address += segment_size
        self.segments.append(segment)
        self.reserved += segment_size
        self.max_reserved = max(self.max_reserved, self.reserved)
        return Block(segment.address, segment_size, small)

    def _insert_free(self, block: Block) -> None:
        insort(self.free_order[block.small], (block.size, block.address))
        self.free_blocks[block.address] = block

    def _remove_free(self, block: Block) -> None:
        order = self.free_order[block.small]
        index = bisect_left(order, (block.size, block.address))
        del order[index]
        del self.free_blocks[block.address]


def replay(events: Iterable[AllocEvent], overhead_bytes: int = 0) -> AllocatorStats:
    """Replay one event stream through a fresh allocator (``"snapshot"`` events are markers)."""
    return replay_steps([events], overhead_bytes)


def replay_steps(streams: Sequence[Iterable[AllocEvent]], overhead_bytes: int = 0) -> AllocatorStats:
    """Replay the streams of consecutive training steps through one allocator, as one process runs
    them; the peaks are those of the last step (reset when it starts, as a measurement calls
    ``reset_peak_memory_stats()`` before the step it measures).

    A step's entry (its events before its first ``"snapshot"``) allocates what exists when it
    starts: tensors the previous step left alive. Those are not allocated again but matched to the
    previous step's live blocks: by key (a traced storage keeps its key across steps of one graph)
    when the size agrees, else by requested size (the optimizer state and the gradients, created
    under other keys in the step before). Live blocks the entry does not claim are freed when the
    entry ends (before ``zero_grad``), and counted in ``carried_freed``."""
    allocator = CachingAllocator()
    carried_freed = 0
    for index, events in enumerate(streams):
        carried = dict(allocator.live) if index else {}
        in_entry = bool(index)
        if index == len(streams) - 1:
            allocator.reset_peaks()
        for event in events:
            kind = event.kind
            if kind == "snapshot":
                if in_entry:
                    in_entry = False
                    for key in carried:  # dropped between the steps
                        allocator.free(key)
                        carried_freed += 1
                    carried = {}
                continue
            if kind == "alloc":
                if in_entry and _claim(allocator, carried, event):
                    continue
                allocator.malloc(event.key, event.nbytes)
            elif kind == "free":
                if event.key not in allocator.live and event.nbytes:
                    raise CostModelError(f"free event for a storage that is not live: {event.key!r}")
                allocator.free(event.key)
            else:
                raise CostModelError(f"unknown allocation event kind {kind!r}")
    return allocator.stats(overhead_bytes, carried_freed)


def _claim(allocator: CachingAllocator, carried: dict[object, Block], event: AllocEvent) -> bool:
    """Bind an entry allocation to a block the previous step left alive; False when none fits."""
    if event.nbytes == 0:
        return True
    block = carried.get(event.key)
    if block is not None and block.requested == event.nbytes:
        del carried[event.key]
        return True
    for key, block in carried.items():
        if block.requested == event.nbytes:
            del carried[key]
            del allocator.live[key]
            if event.key in allocator.live:  # the key is another carried block's: move that one aside
                other = allocator.live.pop(event.key)
                carried.pop(event.key)
                moved = ("moved", id(other))
                allocator.live[moved] = other
                carried[moved] = other
            allocator.live[event.key] = block
            return True
    return False


def step_events(config: StepConfig, *, allow_unknown: bool = False, manager: pluggy.PluginManager | None = None,
                model: nn.Module | None = None) -> list[list[AllocEvent]]:
    """The allocation event streams of the training steps a measurement of step ``config.step``
    runs: steps 1..``MAX_WARMUP_STEPS`` at most before it (each step's optimizer state handed to
    the next one tensor by tensor), then step ``config.step`` itself. Steps left out between them
    are taken to leave the state the last replayed warm-up step leaves (the same sizes for AdamW and
    SGD; where they differ the measured step's entry state falls back to one lump)."""
    from costmodel.config import EVALUATION
    from costmodel.graph import build_step_graph
    from costmodel.memory import gradient_flow
    from costmodel.prediction import cost_nodes, optimizer_steps, state_after, traced_step, updated_groups
    from costmodel.registry import default_plugin_manager
    from costmodel.shapes import shape_facts
    from costmodel.trace import trace_config

    if config.phase == EVALUATION:
        raise CostModelError("the CUDA allocator model covers training steps only, not an evaluation pass")
    manager = manager or default_plugin_manager()
    traced = trace_config(config, manager, model) if model is not None else traced_step(config, manager)
    graph = build_step_graph(traced, shape_facts(traced, config.batch, config.resolution))
    costs, _ = cost_nodes(graph, manager, allow_unknown)
    flow = gradient_flow(graph, costs)
    groups = updated_groups(traced.prepared.param_groups, flow)
    numbers = list(range(1, min(config.step - 1, MAX_WARMUP_STEPS) + 1)) + [config.step]
    streams: list[list[AllocEvent]] = []
    state_tensors: list[int] = []
    for number in numbers:
        steps = optimizer_steps(groups, manager, config, number)
        state_before, grads_before = state_after(groups, flow, manager, config, number - 1)
        memory = simulate(graph, costs, flow, steps, state_before, grads_before, record_timeline=False,
                          record_events=True, state_tensors=state_tensors)
        events = memory.events or []
        streams.append(events)
        state_tensors = live_state_tensors(events)
    return streams


def live_state_tensors(events: Iterable[AllocEvent]) -> list[int]:
    """The optimizer tensors (group ``"OPT"``: entry state and optimizer events) alive at the end of
    a stream, in allocation order: the state the next step starts with."""
    live: dict[object, int] = {}
    for event in events:
        key = event.key
        if not (isinstance(key, tuple) and len(key) == 3 and key[0] in ("entry", "lump") and key[1] == "OPT"):
            continue
        if event.kind == "alloc":
            live[key] = event.nbytes
        elif event.kind == "free":
            live.pop(key, None)
    return list(live.values())


def predict_cuda_memory(config: StepConfig, *, overhead_bytes: int = 0, allow_unknown: bool = False,
                        manager: pluggy.PluginManager | None = None, model: nn.Module | None = None) -> AllocatorStats:
    """What ``torch.cuda.max_memory_allocated()`` / ``max_memory_reserved()`` would report over
    training step ``config.step`` run after the steps before it (:func:`step_events`,
    :func:`replay_steps`); ``overhead_bytes`` (a device profile's CUDA context and workspaces) is
    added to :attr:`AllocatorStats.device_total` only."""
    if overhead_bytes < 0:
        raise CostModelError(f"overhead_bytes must be >= 0, not {overhead_bytes}")
    streams = step_events(config, allow_unknown=allow_unknown, manager=manager, model=model)
    return replay_steps(streams, overhead_bytes)
