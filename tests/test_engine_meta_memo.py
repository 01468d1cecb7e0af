"""The memo of meta kernels: a call answered from it is indistinguishable from the kernel's own
answer, and calls it cannot replay (metadata-changing in-place ops, views, shared or oversized
output storages, non-tensor outputs, fake tensors) always run."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from costmodel import meta_memo
from costmodel.config import StepConfig
from costmodel.meta_memo import (MetaKernelMemo, MemoStats, clear_meta_memo, meta_kernel_memo, meta_memo_disabled,
                                 meta_memo_enabled, meta_memo_stats)
from costmodel.prediction import traced_step
from costmodel.registry import default_plugin_manager
from costmodel.shapes import concrete

aten = torch.ops.aten


def meta(*size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*size, dtype=dtype, device="meta")


def delta(before: MemoStats) -> tuple[int, int, int]:
    """(hits, misses, uncached) since ``before``."""
    now = meta_memo_stats()
    return now.hits - before.hits, now.misses - before.misses, now.uncached - before.uncached


@pytest.fixture
def memo() -> Iterator[MetaKernelMemo]:
    clear_meta_memo()
    with MetaKernelMemo() as mode:
        yield mode
    clear_meta_memo()


# -- whole models: the same facts with and without the memo

@pytest.mark.parametrize("method", ["fft", "dora"])
@pytest.mark.parametrize("model", ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18"])
def test_propagation_facts_are_the_same_with_the_memo(model: str, method: str) -> None:
    traced = traced_step(StepConfig(model=model, method=method, rank=4), default_plugin_manager())
    with meta_memo_disabled():
        before = meta_memo_stats()
        plain = concrete(traced, 1, 224)
        assert delta(before) == (0, 0, 0)
    clear_meta_memo()
    for run in ("cold", "warm"):
        before = meta_memo_stats()
        memoized = concrete(traced, 1, 224)
        hits, misses, _ = delta(before)
        # TensorFacts: shape, dtype, requires_grad, is_leaf, storage id pattern, storage bytes.
        assert memoized.results == plain.results
        assert memoized.params == plain.params
        assert memoized.same_tensor == plain.same_tensor
        assert misses > 0 if run == "cold" else (hits > 0 and misses == 0)


def test_the_memo_can_be_disabled() -> None:
    assert meta_memo_enabled()
    with meta_memo_disabled():
        assert not meta_memo_enabled()
        with meta_kernel_memo():
            assert not any(isinstance(m, MetaKernelMemo) for m in _get_current_dispatch_mode_stack())
    assert meta_memo_enabled()
    with meta_kernel_memo():
        assert any(isinstance(m, MetaKernelMemo) for m in _get_current_dispatch_mode_stack())


# -- what a hit returns

def test_a_repeated_call_returns_a_fresh_tensor_like_the_kernels(memo: MetaKernelMemo) -> None:
    x, w = meta(2, 8, 10, 10), meta(4, 8, 3, 3)
    first = torch.conv2d(x, w, stride=2)
    y, v = meta(2, 8, 10, 10), meta(4, 8, 3, 3)
    before = meta_memo_stats()
    second = torch.conv2d(y, v, stride=2)
    assert delta(before) == (1, 0, 0)
    assert second is not first
    assert second.untyped_storage()._cdata != first.untyped_storage()._cdata
    assert (second.shape, second.stride(), second.dtype, second.storage_offset()) == \
        (first.shape, first.stride(), first.dtype, first.storage_offset())
    assert second.untyped_storage().nbytes() == first.untyped_storage().nbytes()


def test_an_in_place_add_returns_its_input_on_a_hit(memo: MetaKernelMemo) -> None:
    a, b = meta(3, 4), meta(3, 4)
    assert a.add_(b) is a
    c, d = meta(3, 4), meta(3, 4)
    before = meta_memo_stats()
    assert c.add_(d) is c
    assert delta(before) == (1, 0, 0)
    assert c._version == 1  # autograd's version counter, above the memo, still counts the write
    # The mode itself answers with the very argument object, not a look-alike.
    e, f = meta(3, 4), meta(3, 4)
    assert memo.__torch_dispatch__(aten.add_.Tensor, (), (e, f), {}) is e


def test_an_in_place_op_that_changes_metadata_is_never_served(memo: MetaKernelMemo) -> None:
    for _ in range(2):
        x = meta(3, 4)
        before = meta_memo_stats()
        x.t_()
        assert x.shape == (4, 3) and x.stride() == (1, 4)
        hits, misses, uncached = delta(before)
        assert (hits, misses) == (0, 0) and uncached == 1
    for _ in range(2):
        x = meta(3, 4)
        before = meta_memo_stats()
        x.resize_(20)
        assert x.shape == (20,) and x.untyped_storage().nbytes() == 80
        assert delta(before) == (0, 0, 1)
    # The same op is remembered when it leaves the metadata as it was.
    meta(3, 4).resize_(3, 4)
    before = meta_memo_stats()
    y = meta(3, 4)
    assert y.resize_(3, 4) is y
    assert delta(before)[0] == 2  # torch.empty and resize_


def test_a_view_is_never_cached(memo: MetaKernelMemo) -> None:
    for _ in range(2):
        x = meta(3, 4)
        before = meta_memo_stats()
        v = x.transpose(0, 1)
        assert delta(before) == (0, 0, 1)
        assert v._base is x and v.untyped_storage()._cdata == x.untyped_storage()._cdata
    assert not any(key[0] is aten.transpose.int for key in meta_memo._MEMO.entries)


def test_aliasing_among_arguments_is_part_of_the_key(memo: MetaKernelMemo) -> None:
    a = meta(3, 4)
    a.add_(a.view(3, 4))  # the second argument shares the first's storage
    before = meta_memo_stats()
    c, d = meta(3, 4), meta(3, 4)
    c.add_(d)  # same metadata, but two storages: another call
    assert delta(before)[:2] == (2, 1)  # the two torch.empty hit, add_ missed
    e = meta(3, 4)
    before = meta_memo_stats()
    assert e.add_(e.view(3, 4)) is e
    assert delta(before)[:2] == (1, 0)


def test_scalar_arguments_are_keyed_by_type_and_exact_value(memo: MetaKernelMemo) -> None:
    dtypes = [torch.full((2,), value, device="meta").dtype for value in (1, 1.0, True, 1, 1.0, True)]
    assert dtypes == [torch.int64, torch.float32, torch.bool] * 2
    x = meta(2)
    keys = [meta_memo._call_key(aten.add.Tensor, (x, x), {"alpha": alpha})[0]
            for alpha in (0.0, -0.0, math.nan, math.nan, 0, False)]
    assert len(set(keys)) == 5 and keys[2] == keys[3]


def test_a_generator_argument_is_not_keyed() -> None:
    assert meta_memo._call_key(aten.bernoulli_.float, (meta(3), 0.5), {"generator": torch.Generator()}) is None


def test_a_failing_kernel_raises_and_is_not_remembered(memo: MetaKernelMemo) -> None:
    x = meta(3)
    before = meta_memo_stats()
    for _ in range(2):
        with pytest.raises(NotImplementedError):
            torch.nonzero(x)
    assert delta(before)[:2] == (0, 0) and meta_memo_stats().entries == before.entries


def test_fake_tensors_run_uncached() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    clear_meta_memo()
    with FakeTensorMode(), MetaKernelMemo():
        x = torch.empty(3, 4)
        for _ in range(2):
            y = x + x
    assert type(y).__name__ == "FakeTensor"
    assert meta_memo_stats().hits == 0


# -- outputs a fresh tensor cannot stand in for, from test ops with meta kernels

@pytest.fixture(scope="module")
def test_ops() -> Iterator[object]:
    library = torch.library.Library("costmodel_meta_memo_test", "DEF")
    library.define("oversized(Tensor x) -> Tensor")
    library.impl("oversized", lambda x: torch.empty(2 * x.numel(), device="meta")[: x.numel()], "Meta")
    library.define("twice(Tensor x) -> (Tensor, Tensor)")
    library.impl("twice", lambda x: (lambda y: (y, y))(torch.empty_like(x)), "Meta")
    library.define("rank(Tensor x) -> int")
    library.impl("rank", lambda x: x.dim(), "Meta")
    yield torch.ops.costmodel_meta_memo_test
    del library


@pytest.mark.parametrize("op", ["oversized", "twice", "rank"])
def test_outputs_that_cannot_be_rebuilt_are_not_remembered(memo: MetaKernelMemo, test_ops: object, op: str) -> None:
    func = getattr(test_ops, op).default
    results = []
    for _ in range(2):
        x = meta(5)
        before = meta_memo_stats()
        results.append(func(x))
        assert delta(before) == (0, 0, 1)
    if op == "oversized":
        assert results[1].untyped_storage().nbytes() == 40
    if op == "twice":
        assert results[1][0] is results[1][1]


def test_the_memo_is_bounded(memo: MetaKernelMemo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meta_memo, "MAX_ENTRIES", 3)
    for n in range(1, 10):
        meta(n)
    assert meta_memo_stats().entries == 3
    before = meta_memo_stats()
    meta(9)  # the most recent entries stay
    meta(1)  # the oldest went
    assert delta(before)[:2] == (1, 1)
