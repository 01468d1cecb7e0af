"""A process-wide memo of meta kernels, for shape propagation.

Propagating a traced step runs every aten op on meta tensors. PyTorch's meta kernels are mostly
Python (batch norm's is a decomposition of about half a millisecond), and the same op meets the
same input metadata again and again: repeated blocks within one model, one base network under
several methods, one model at many ranks. A meta kernel computes nothing but metadata, so it is a
deterministic function of its arguments' metadata and values: :class:`MetaKernelMemo` remembers
what each call returned and answers a repeat without running the kernel.

The memo is a dispatch mode, so it sits below autograd: ``grad_fn``, ``requires_grad``, version
counters and view tracking are made above it by PyTorch itself, from whatever the memo returns. A
call is answered from the memo only where the answer is indistinguishable from the kernel's:

- The key is the op overload, the default dtype (type promotion reads it), the structure of the
  arguments, and for each argument: a tensor's shape, stride, storage offset, dtype, and which
  earlier tensor argument (if any) it shares a storage with (aliasing among arguments changes what
  an in-place op does); any other value by its type and value, when it is of a known immutable
  type (a float by its ``repr``, so that ``0.0`` and ``-0.0`` differ and ``nan`` equals itself).
- Only plain strided tensors on the meta device with concrete sizes take part (so the device and
  layout need no place in the key): a call with a symbolic size, a tensor subclass that handles
  dispatch itself (``FakeTensor``), a tensor on a real device, a conjugate/negative/zero bit, a
  generator or any other argument runs uncached. A meta tensor holds no data, so nothing else of
  an argument can reach the kernel.
- A call is remembered only when every output is ``None``, the very object of one input tensor (an
  in-place op returns ``self``), or a tensor on a fresh storage that ``torch.empty_strided``
  reproduces exactly (same size, stride, dtype, storage offset 0, storage bytes, version 0). A
  view of an input, outputs sharing a storage, any non-tensor output or an unusual container runs
  every time; so does, without even being keyed, an op whose schema declares a view output
  (``Tensor(a)``: ``view``, ``t``, ``detach``).
- Ops that write an argument (``Tensor(a!)`` in the schema) may change its metadata: ``resize_``,
  ``set_``, ``t_`` cannot be replayed by a memo. Rather than trust annotations, every tensor
  argument's shape, stride, offset, dtype, storage, storage bytes and version is compared before
  and after a miss; a call that changed any is not remembered. In-place ops that change no
  metadata (``add_``, running-statistics updates) are remembered and return their input on a hit.
- A kernel that raises (data-dependent shapes) propagates its exception; nothing is remembered.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MAX_ENTRIES = 20_000  # remembered calls, least recently used dropped first (a few hundred per model)

_META = torch.device("meta")
# Argument values keyed by (type, value): hashable and immutable. Floats are keyed by repr.
_VALUE_TYPES = frozenset({int, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format})

# What a remembered call returns: per output, None, the index of the input tensor it is, or the
# (size, stride, dtype) of a fresh meta tensor.
_Leaf = None | int | tuple[torch.Size, tuple[int, ...], torch.dtype]
_SINGLE = object()  # the op returns one tensor (not a container)


@dataclass(frozen=True)
class MemoStats:
    """Counts since the last :func:`clear_meta_memo`: calls answered from the memo, calls run and
    remembered, calls run and not remembered (uncacheable), and the entries held now."""

    hits: int
    misses: int
    uncached: int
    entries: int


class _Memo:
    """The process-wide LRU of remembered calls and its counters."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[Any, ...], tuple[Any, tuple[_Leaf, ...]]] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = self.uncached = 0

    def get(self, key: tuple[Any, ...]) -> tuple[Any, tuple[_Leaf, ...]] | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
                self.hits += 1
            return entry

    def put(self, key: tuple[Any, ...], entry: tuple[Any, tuple[_Leaf, ...]]) -> None:
        with self.lock:
            self.misses += 1
            self.entries[key] = entry
            while len(self.entries) > MAX_ENTRIES:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.hits = self.misses = self.uncached = 0


_MEMO = _Memo()
_state = threading.local()  # .disabled: set by meta_memo_disabled() in this thread


def clear_meta_memo() -> None:
    """Forget every remembered call and reset the counters."""
    _MEMO.clear()


def meta_memo_stats() -> MemoStats:
    return MemoStats(_MEMO.hits, _MEMO.misses, _MEMO.uncached, len(_MEMO.entries))


def meta_memo_enabled() -> bool:
    return not getattr(_state, "disabled", False)


@contextmanager
def meta_memo_disabled() -> Iterator[None]:
    """Within this block (in this thread), :func:`meta_kernel_memo` runs every kernel: for a
    comparison with the memo, or to rule it out when chasing a discrepancy."""
    previous = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = previous


def meta_kernel_memo() -> AbstractContextManager[Any]:
    """The context to run meta-tensor code in: a :class:`MetaKernelMemo`, unless disabled."""
    return MetaKernelMemo() if meta_memo_enabled() else nullcontext()


# The dispatch keys of a plain strided meta tensor (``nn.Parameter`` included). Any other set marks
# something a memo cannot stand in for: a tensor subclass that dispatches in Python (``FakeTensor``),
# a real device, a sparse or nested layout, a conjugate, negative or zero-tensor bit, inference mode.
_PLAIN_META_KEYS = torch._C._dispatch_keys(torch.empty(0, device=_META)).raw_repr()
_dispatch_keys = torch._C._dispatch_keys


class _Open:
    """Marks, among the flattened arguments, the start of a list or tuple of ``size`` items."""

    __slots__ = ("token",)

    def __init__(self, container: type, size: int) -> None:
        self.token = (container, size)


def _call_key(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[tuple[Any, ...], list[torch.Tensor]] | None:
    """The memo key of a call and its tensor arguments in order, or None if it is not memoizable.

    One token per argument leaf: ``(type, value)`` for a value (``repr`` for a float), and for a
    tensor ``(shape, stride, storage offset, dtype, index of the first tensor argument on the same
    storage)``; a list or tuple argument adds ``(type, length)`` before its items (one level: aten
    schemas nest no deeper).
    """
    key: list[Any] = [func, torch.get_default_dtype()]
    flat: list[Any] = []
    for value in (*args, *kwargs.values()) if kwargs else args:
        if value.__class__ is list or value.__class__ is tuple:
            flat.append(_Open(value.__class__, len(value)))
            flat.extend(value)
        else:
            flat.append(value)
    if kwargs:
        key.append(tuple(kwargs))
    tensors: list[torch.Tensor] = []
    storages: dict[int, int] = {}
    for value in flat:
        cls = value.__class__
        if cls in _VALUE_TYPES:
            key.append((cls, value))
        elif cls is float:
            key.append((float, repr(value)))
        elif cls is _Open:
            key.append(value.token)
        elif (isinstance(value, torch.Tensor) and _dispatch_keys(value).raw_repr() == _PLAIN_META_KEYS
              and not value._has_symbolic_sizes_strides):
            alias = storages.setdefault(value.untyped_storage()._cdata, len(tensors))
            key.append((value.shape, value.stride(), value.storage_offset(), value.dtype, alias))
            tensors.append(value)
        else:
            return None  # a generator, a nested list, a symbolic size, a FakeTensor...
    return tuple(key), tensors


_view_ops: dict[torch._ops.OpOverload, bool] = {}


def _returns_view(func: torch._ops.OpOverload) -> bool:
    """Whether the schema declares an output that aliases an input without writing it
    (``Tensor(a)``: ``view``, ``t``, ``detach``...): such a call is never remembered, so it need
    not even be keyed."""
    view = _view_ops.get(func)
    if view is None:
        view = _view_ops[func] = any(ret.alias_info is not None and not ret.alias_info.is_write
                                     for ret in func._schema.returns)
    return view


def _metadata(tensor: torch.Tensor) -> tuple[Any, ...]:
    storage = tensor.untyped_storage()
    return (tensor.shape, tensor.stride(), tensor.storage_offset(), tensor.dtype, storage._cdata, storage.nbytes(),
            tensor._version)


def _fresh_leaf(tensor: torch.Tensor) -> _Leaf | None:
    """How to rebuild a newly allocated output, or None if ``torch.empty_strided`` would not give
    an indistinguishable tensor."""
    if (type(tensor) is not torch.Tensor or _dispatch_keys(tensor).raw_repr() != _PLAIN_META_KEYS
            or tensor._has_symbolic_sizes_strides or tensor.requires_grad or tensor.storage_offset() != 0
            or tensor._version != 0):
        return None
    leaf = (tensor.shape, tensor.stride(), tensor.dtype)
    if _rebuild(leaf, []).untyped_storage().nbytes() != tensor.untyped_storage().nbytes():
        return None
    return leaf


def _describe(result: Any, tensors: list[torch.Tensor]) -> tuple[Any, tuple[_Leaf, ...]] | None:
    """The memo entry of a call's result, or None when it cannot be replayed exactly."""
    if result is None:
        return None, ()
    cls = result.__class__
    if cls is list or cls is tuple:
        container, outputs = cls, result
    else:
        container, outputs = _SINGLE, (result,)
    input_storages = {t.untyped_storage()._cdata for t in tensors}
    output_storages: set[int] = set()
    leaves: list[_Leaf] = []
    for output in outputs:
        if output is None:
            leaves.append(None)
            continue
        if not isinstance(output, torch.Tensor):
            return None  # ints, SymInts, scalars, nested containers
        same = [i for i, t in enumerate(tensors) if t is output]
        if same:
            if len(same) > 1:
                return None  # which argument object a replay should return would be ambiguous
            leaves.append(same[0])
            continue
        storage = output.untyped_storage()._cdata
        if storage in input_storages or storage in output_storages:
            return None  # a view of an input or of another output
        output_storages.add(storage)
        leaf = _fresh_leaf(output)
        if leaf is None:
            return None
        leaves.append(leaf)
    return container, tuple(leaves)


def _rebuild(leaf: _Leaf, tensors: list[torch.Tensor]) -> torch.Tensor | None:
    if leaf is None:
        return None
    if leaf.__class__ is int:
        return tensors[leaf]
    return torch.empty_strided(leaf[0], leaf[1], dtype=leaf[2], device=_META)


class MetaKernelMemo(TorchDispatchMode):
    """Answers repeated meta-kernel calls from the process-wide memo (see the module docstring)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if not isinstance(func, torch._ops.OpOverload):
            return func(*args, **kwargs)
        call = None if _returns_view(func) else _call_key(func, args, kwargs)
        if call is None:
            _MEMO.uncached += 1
            return func(*args, **kwargs)
        key, tensors = call
        entry = _MEMO.get(key)
        if entry is not None:
            container, leaves = entry
            if container is _SINGLE:
                return _rebuild(leaves[0], tensors)
            if container is None:
                return None
            return container(_rebuild(leaf, tensors) for leaf in leaves)
        before = [_metadata(t) for t in tensors]
        result = func(*args, **kwargs)
        entry = _describe(result, tensors) if [_metadata(t) for t in tensors] == before else None
        if entry is None:
            _MEMO.uncached += 1
        else:
            _MEMO.put(key, entry)
        return result
