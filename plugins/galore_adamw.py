"""``galore_torch.GaLoreAdamW`` (galore-torch 1.0): one optimizer step, FLOP for FLOP, byte for byte.

What the pinned ``galore_torch/adamw.py`` and ``galore_projector.py`` run, checked on this machine
with a logging ``TorchDispatchMode`` on 4-D and 2-D parameters (steps 1-3, T = 1 and 200). The step
visits its parameter groups in order, and each group's parameters in order:

Plain parameter (``n`` elements):
``grad = p.grad``; on step 1 ``exp_avg``, ``exp_avg_sq`` = ``zeros_like(grad)`` (the state);
``exp_avg.mul_(b1).add_(grad, alpha=1-b1)``, ``exp_avg_sq.mul_(b2).addcmul_(grad, grad,
value=1-b2)`` (in place); ``denom = exp_avg_sq.sqrt().add_(eps)`` (one new tensor);
``norm_grad = exp_avg / denom`` (one new tensor); ``p.add_(norm_grad, alpha=-step_size)``
(weight decay is 0: no op). The step counter is a Python int. FLOPs (exact): ``12 n``; torch: 0.

Low-rank parameter, its gradient seen as the ``m x n`` matrix ``(shape[0], numel / shape[0])``
(a view: galore-torch 1.0 needs 2-D, the runtime reference reshapes), ``K = min(m, n)``,
``r' = min(r, K)``:

- on a refresh step (step ``k`` with ``(k - 1) % T == 0``; the projector's iteration counter is
  ``k - 1``): ``U, S, Vh = linalg.svd(G, full_matrices=False)`` - ``U: m x K``, ``S: K``,
  ``Vh: K x n`` - then, if ``m >= n`` ("right"), ``U[:, :r'] @ diag(S[:r'])`` (``diag_embed``
  ``r' x r'``, an ``mm`` of ``2 m r'^2`` FLOPs whose result is thrown away) and the projector
  ``P = Vh[:r']`` - a *view*, so the projector keeps all of ``Vh`` (``K x n``) alive; else
  ("left") ``diag(S[:r']) @ Vh[:r']`` (``2 r'^2 n``, thrown away) and ``P = U[:, :r']``, keeping
  all of ``U`` (``m x K``). The old projector is released when the new one is assigned;
- projection ``G @ P.t()`` (right, ``m x r'``) or ``P.t() @ G`` (left, ``r' x n``):
  ``2 m n r'`` FLOPs, one new tensor, which becomes ``grad``;
- the Adam update as above on the projected gradient (moments of ``s = m r'`` or ``r' n``
  elements; ``10 s`` FLOPs for the moments, ``denom`` and the division);
- projection back ``norm_grad @ P`` or ``P @ norm_grad`` (``2 m n r'``, ``m x n``) then
  ``* scale`` (``m n``, a second ``m x n`` tensor; the ``mm`` result dies when ``project_back``
  returns); ``p.add_(..., alpha=-step_size)`` (``2 m n``).

Parameters that are not float32 (``--dtype bf16|fp16``): ``get_orthogonal_matrix`` first copies
the gradient with ``.float()`` (an ``m x n`` float32 tensor), runs the SVD and the thrown-away
factor in float32, and casts the projector back with ``.type(original_type)``: a new ``r' x n``
(right) or ``m x r'`` (left) tensor of the parameter's dtype, so the projector no longer keeps the
SVD's factor alive. Everything else is in the parameter's dtype.

The SVD's FLOPs and output shapes are the ``svd`` op plugin's (thin SVD, Golub-Reinsch); the stock
counter counts only the ``mm`` ops.

Memory (MemTracker's OPT group: everything allocated inside ``optimizer.step()``): the loop's
Python locals (``grad``, ``denom``, ``norm_grad``) outlive their parameter - each is freed only
when the next parameter rebinds it, possibly in the next parameter group, and the last ones when
``step()`` returns - so the temporaries are simulated over the whole step in visiting order. On
step 1 the moments and projectors are created as each parameter is visited. On a later step they
exist before the step and are in OPT from the start (the reference tracks the optimizer's state
tensors, and one level into the ``GaLoreProjector`` object held in the state); on a refresh step
the new SVD factors are made while the old projector still lives, and the old projector's storage
is freed when the new one is assigned.

``state_bytes``: the moments and the projectors' storages (what persists from one step to the next).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from costmodel.config import StepConfig
from costmodel.costs import Flops, MemEvent, OptimizerCost, ParamGroup, ParamMeta, smaller
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl
from costmodel.plugins.svd import svd_flops, svd_output_shapes

OPTIMIZER = "galore_adamw"


@dataclass
class _Storage:
    nbytes: int
    label: str
    holders: int = 0


@dataclass
class _StepMemory:
    """The OPT timeline of one ``step()``: storages held by Python locals, state or projectors.

    ``bind(local, storage)`` rebinds a local variable as Python does: the new value exists first,
    then the old one loses a reference (and is freed when nothing else holds it).
    """

    itemsize: int
    events: list[MemEvent] = field(default_factory=list)
    locals_: dict[str, _Storage | None] = field(default_factory=dict)

    def alloc(self, numel: int, label: str, itemsize: int | None = None) -> _Storage:
        storage = _Storage(numel * (self.itemsize if itemsize is None else itemsize), label)
        self.events.append(MemEvent(storage.nbytes, "OPT", label))
        return storage

    def hold(self, storage: _Storage) -> _Storage:
        storage.holders += 1
        return storage

    def drop(self, storage: _Storage | None) -> None:
        if storage is None:
            return
        storage.holders -= 1
        if storage.holders == 0:
            self.events.append(MemEvent(-storage.nbytes, "OPT", f"free {storage.label}"))

    def bind(self, local: str, storage: _Storage | None) -> None:
        if storage is not None:
            self.hold(storage)
        self.drop(self.locals_.get(local))
        self.locals_[local] = storage

    def temporary(self, storage: _Storage) -> None:
        """A value no name holds (an intermediate of an expression): freed right away."""
        self.hold(storage)
        self.drop(storage)

    def end(self) -> None:
        for local in list(self.locals_):
            self.bind(local, None)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        raise CostModelError(f"GaLore projects matrices; a parameter of shape {shape} cannot be projected")
    rows = shape[0]
    cols = 1
    for size in shape[1:]:
        cols *= size
    return rows, cols


def low_rank_moment_shape(shape: tuple[int, ...], rank: int) -> tuple[int, int]:
    """The projected gradient's (and each moment's) shape under the "std" rule."""
    m, n = _matrix_shape(shape)
    r = smaller(rank, min(m, n))
    return (m, r) if m >= n else (r, n)


def projector_storage_numel(shape: tuple[int, ...], rank: int, cast: bool = False) -> int:
    """Elements of the storage a projector keeps alive: all of ``Vh`` (right) or ``U`` (left), of
    which it is a view; or, for parameters that are not float32 (``cast``), only its own ``r' x n``
    or ``m x r'`` elements, the copy ``.type(original_type)`` makes."""
    m, n = _matrix_shape(shape)
    if cast:
        r = smaller(rank, min(m, n))
        return r * n if m >= n else m * r
    u_shape, _, vh_shape = svd_output_shapes(m, n, full_matrices=False)
    return math.prod(vh_shape if m >= n else u_shape)


# galore-torch's ``get_orthogonal_matrix`` runs the SVD in float32: a parameter of another dtype
# has its gradient copied with ``.float()`` first, and the projector cast back with
# ``.type(original_type)`` (a copy: no longer a view of the SVD's factor).
SVD_ITEMSIZE = torch.float32.itemsize


def galore_step(params: list[ParamMeta], low_rank: Mapping[str, Mapping[str, Any]], step: int) -> OptimizerCost:
    """Cost GaLoreAdamW's ``step()`` number ``step`` (1-based) over ``params`` in visiting order."""
    if not params:
        return OptimizerCost(Flops(), 0)
    itemsize = params[0].dtype.itemsize
    if any(p.dtype != params[0].dtype for p in params):
        raise CostModelError("galore_adamw: parameters of mixed dtypes are not modelled")
    cast = params[0].dtype != torch.float32
    svd_itemsize = SVD_ITEMSIZE if cast else itemsize
    memory = _StepMemory(itemsize)
    flops_torch = flops_exact = 0
    state_bytes = 0
    first_step = step == 1
    for p in params:
        settings = low_rank.get(p.name)
        if settings is None:
            state_bytes += 2 * p.numel * itemsize
        else:
            rows, cols = low_rank_moment_shape(p.shape, settings["rank"])
            state_bytes += (2 * rows * cols + projector_storage_numel(p.shape, settings["rank"], cast)) * itemsize

    for p in params:
        settings = low_rank.get(p.name)
        memory.bind("grad", None)  # grad = p.grad: a gradient, not an OPT storage
        if settings is None:
            moments = p.numel
        else:
            m, n = _matrix_shape(p.shape)
            r = smaller(settings["rank"], min(m, n))
            if settings.get("proj_type", "std") != "std":
                raise CostModelError(f"galore_adamw: only proj_type='std' is modelled, got {settings['proj_type']!r}")
            gap = int(settings["update_proj_gap"])
            right = m >= n
            refresh = first_step or (step - 1) % gap == 0
            if refresh:
                u_shape, s_shape, vh_shape = svd_output_shapes(m, n, full_matrices=False)
                factors = [memory.alloc(m * n, f"{p.name}: float32 copy of the gradient", SVD_ITEMSIZE)] if cast else []
                u = memory.alloc(math.prod(u_shape), f"{p.name}: svd U", svd_itemsize)
                s = memory.alloc(math.prod(s_shape), f"{p.name}: svd S", svd_itemsize)
                vh = memory.alloc(math.prod(vh_shape), f"{p.name}: svd Vh", svd_itemsize)
                diag = memory.alloc(r * r, f"{p.name}: diag(S[:r])", svd_itemsize)
                unused = memory.alloc(m * r if right else r * n, f"{p.name}: unused svd factor", svd_itemsize)
                memory.temporary(diag)
                factors += [u, s, vh, unused]
                for storage in factors:
                    memory.hold(storage)
                if cast:  # .type(original_type): the projector's own copy
                    projector = memory.alloc(projector_storage_numel(p.shape, r, cast), f"{p.name}: projector")
                else:
                    projector = vh if right else u  # the projector's view keeps all of it alive
                memory.hold(projector)
                for storage in factors:  # get_orthogonal_matrix returns
                    memory.drop(storage)
                if not first_step:  # assigning the new projector frees the old one
                    memory.events.append(MemEvent(-projector_storage_numel(p.shape, r, cast) * itemsize, "OPT",
                                                  f"free {p.name}: old projector"))
                svd = svd_flops(m, n, full_matrices=False)  # GaLore's linalg.svd(G, full_matrices=False)
                factor = 2 * m * r * r if right else 2 * r * r * n
                flops_torch += factor
                flops_exact += svd + factor
            moments = m * r if right else r * n
            memory.bind("grad", memory.alloc(moments, f"{p.name}: projected gradient"))
            project = 2 * m * n * r
            flops_torch += 2 * project
            flops_exact += 2 * project + m * n + 2 * m * n
        if first_step:
            memory.hold(memory.alloc(moments, f"{p.name}: exp_avg"))
            memory.hold(memory.alloc(moments, f"{p.name}: exp_avg_sq"))
        memory.bind("denom", memory.alloc(moments, f"{p.name}: denom"))
        memory.bind("norm_grad", memory.alloc(moments, f"{p.name}: exp_avg / denom"))
        if settings is None:
            flops_exact += 12 * moments
        else:
            back = memory.alloc(m * n, f"{p.name}: projected back")
            scaled = memory.alloc(m * n, f"{p.name}: projected back * scale")
            memory.temporary(back)
            memory.bind("norm_grad", scaled)
            flops_exact += 10 * moments
    memory.end()
    return OptimizerCost(
        flops=Flops(flops_torch, flops_exact),
        state_bytes=state_bytes,
        events=memory.events,
        note=f"GaLoreAdamW step {step}: {len(low_rank)} projected, {len(params) - len(low_rank)} plain parameters")


@hookimpl
def costmodel_optimizer_cost(group: ParamGroup, step: int, config: StepConfig) -> OptimizerCost | None:
    if group.optimizer != OPTIMIZER:
        return None
    return galore_step(group.params, group.options.get("low_rank", {}), step)


@hookimpl
def costmodel_optimizer_names() -> list[str]:
    return [OPTIMIZER]
