"""Singular value decomposition: ``torch.linalg.svd`` (one ``_linalg_svd`` op), and the formulas
that GaLore's projector refresh reuses.

FLOPs: the stock counter (``torch``) counts 0. ``exact`` (docs/flop-convention.md): per ``m x n``
matrix, with ``l = max(m, n)``, ``k = min(m, n)``, the Golub-Reinsch counts of Golub & Van Loan,
*Matrix Computations* (3rd ed. Fig. 5.4.1; 4th ed. Fig. 8.6.1), times the batch:

- thin (``full_matrices=False``: ``U1``, ``S``, ``V``; what GaLore calls): ``14*l*k^2 + 8*k^3``
- full (``full_matrices=True``): ``4*l^2*k + 8*l*k^2 + 9*k^3``
- singular values only (``compute_uv=False``): ``(12*l*k^2 - 4*k^3) // 3``

Memory (torch 2.14.1, CPU): the op allocates its three outputs, in order ``U`` (``m x k`` thin,
``m x m`` full), ``S`` (``k``, real dtype) and ``Vh`` (``k x n`` thin, ``n x n`` full); with
``compute_uv=False`` ``U`` and ``Vh`` are empty. LAPACK's workspace lives and dies inside the op.
Keeping a slice of an output (GaLore's ``Vh[:r]``) keeps that output's whole storage alive.

Not modelled (answer None): an SVD that autograd records (its backward), the legacy
``torch.svd``, and ``torch.linalg.svdvals``: it asks for ``U`` and ``Vh`` whenever a dispatch mode
is active (``_may_require_fw_or_bw_grad``), so under the measuring tools it is a thin SVD with two
temporaries, and without them a values-only one: no single rule is true for both.
"""

from __future__ import annotations

import torch

from costmodel.authoring import HandleTable, new_output, numel, tensor_input
from costmodel.costs import Flops, OpCost, OpNode
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()


def svd_flops(m: int, n: int, *, full_matrices: bool = False, compute_uv: bool = True, batch: int = 1) -> int:
    """Exact-convention FLOPs of the SVD of ``batch`` matrices of ``m x n``."""
    l, k = max(m, n), min(m, n)
    if not compute_uv:
        per_matrix = (12 * l * k * k - 4 * k**3) // 3
    elif full_matrices:
        per_matrix = 4 * l * l * k + 8 * l * k * k + 9 * k**3
    else:
        per_matrix = 14 * l * k * k + 8 * k**3
    return batch * per_matrix


def svd_output_shapes(m: int, n: int, *, full_matrices: bool = False,
                      compute_uv: bool = True) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``U``, ``S``, ``Vh`` for one ``m x n`` matrix (empty ``U``/``Vh`` without uv)."""
    k = min(m, n)
    if not compute_uv:
        return (0,), (k,), (0,)
    if full_matrices:
        return (m, m), (k,), (n, n)
    return (m, k), (k,), (k, n)


def svd_output_bytes(m: int, n: int, dtype: torch.dtype, *, full_matrices: bool = False, compute_uv: bool = True,
                     batch: int = 1) -> tuple[int, int, int]:
    """Bytes of ``U``, ``S`` and ``Vh`` (``S`` in the real dtype matching ``dtype``)."""
    u, s, vh = svd_output_shapes(m, n, full_matrices=full_matrices, compute_uv=compute_uv)
    real = dtype.to_real() if dtype.is_complex else dtype
    return (batch * numel(u) * dtype.itemsize, batch * numel(s) * real.itemsize, batch * numel(vh) * dtype.itemsize)


def svd_cost(node: OpNode, full_matrices: bool, compute_uv: bool) -> OpCost | None:
    a = tensor_input(node, 0, "A")
    if a is None or len(a.shape) < 2 or node.records_autograd:
        return None
    *batch, m, n = a.shape
    flops = svd_flops(m, n, full_matrices=full_matrices, compute_uv=compute_uv, batch=numel(batch))
    allocs = tuple(alloc for i in range(len(node.outputs)) for alloc in new_output(node, i))
    return OpCost(forward=Flops(torch=0, exact=flops), forward_allocs=allocs,
                  note=f"svd {m}x{n} ({'full' if full_matrices else 'thin'}{'' if compute_uv else ', values only'})")


@TABLE.register("call_function", torch.linalg.svd)
def linalg_svd(node: OpNode) -> OpCost | None:
    """``torch.linalg.svd(A, full_matrices=True, *, driver=None)``: outputs ``U``, ``S``, ``Vh``."""
    if len(node.outputs) != 3:
        return None
    return svd_cost(node, bool(node.arg(1, "full_matrices", True)), compute_uv=True)


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
