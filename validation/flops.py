"""FLOP counting for the runtime reference: stock FlopCounterMode ("torch") and our "exact" formulas.

The "exact" convention is defined in ``docs/flop-convention.md``; every formula here implements one
row of it, with its derivation in the docstring, and is handed to ``FlopCounterMode`` through
``custom_mapping``. The "torch" convention is the stock counter, untouched.

Formulas are registered *raw* (``_get_raw``): they receive the op's real arguments (tensors, real or
fake) rather than bare shapes, because a few rows depend on a dtype (non-floating outputs count 0) or
on a scalar coefficient (``alpha``, ``value``). Formulas are keyed by op packet, so ``aten.add``
covers ``add.Tensor`` and ``add.Scalar``; in-place variants are registered beside their
out-of-place twins and count the same.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from costmodel.errors import CostModelError
from costmodel.result import FLOP_CONVENTIONS

aten = torch.ops.aten

FlopFormula = Callable[..., int]

EXACT_FLOP_FORMULAS: dict[Any, FlopFormula] = {}


def _register(*packets: Any) -> Callable[[FlopFormula], FlopFormula]:
    """Register ``formula`` for ``packets`` in the exact convention (raw arguments)."""

    def decorate(formula: FlopFormula) -> FlopFormula:
        formula._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode's raw-argument flag
        for packet in packets:
            if packet in EXACT_FLOP_FORMULAS:
                raise RuntimeError(f"duplicate exact FLOP formula for {packet}")
            EXACT_FLOP_FORMULAS[packet] = formula
        return formula

    return decorate


def _first(value: Any) -> torch.Tensor:
    """The first tensor of an op's output (ops such as max_pool2d_with_indices return tuples)."""
    if isinstance(value, torch.Tensor):
        return value
    for item in value:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"no tensor in op output {type(value).__name__}")


def _floating_numel(out: Any) -> int:
    """numel of the op's output, or 0 if it is not floating point ("FLOPs" are floating-point)."""
    tensor = _first(out)
    if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
        return 0
    return tensor.numel()


def _coefficient(value: Any) -> int:
    """1 when a scalar coefficient (alpha, value, beta) costs a multiply per element, i.e. != 1."""
    return 0 if value is None or (not isinstance(value, torch.Tensor) and value == 1) else 1


# ---------------------------------------------------------------------------------------------
# Zero FLOPs: views, copies, allocation, fills, randomness, profiler markers.
# ---------------------------------------------------------------------------------------------

ZERO_FLOP_OPS: tuple[Any, ...] = (
    aten.view, aten._unsafe_view, aten.reshape, aten.t, aten.transpose, aten.permute, aten.expand,
    aten.slice, aten.select, aten.squeeze, aten.unsqueeze, aten.as_strided, aten.as_strided_, aten.alias,
    aten.detach,
    aten.clone, aten.copy_, aten._to_copy, aten.cat, aten.stack, aten.split, aten.split_with_sizes,
    aten.unbind, aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
    aten.new_empty_strided, aten.zeros, aten.zeros_like, aten.new_zeros, aten.ones, aten.ones_like,
    aten.new_ones, aten.eye, aten.full, aten.full_like, aten.fill_, aten.zero_, aten.scalar_tensor,
    aten.lift_fresh, aten.lift_fresh_copy, aten._local_scalar_dense, aten.diag_embed, aten.diag,
    aten.bernoulli_, torch.ops.prim.device, torch.ops.profiler._record_function_enter_new,
    torch.ops.profiler._record_function_exit,
)


@_register(*ZERO_FLOP_OPS)
def zero_flop(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """Moves, views, allocates, fills or draws random numbers: no floating-point arithmetic."""
    return 0


# ---------------------------------------------------------------------------------------------
# Matrix products
# ---------------------------------------------------------------------------------------------

@_register(aten.mm)
def mm_flop(a: torch.Tensor, b: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """(m x k) @ (k x n): m*n dot products of length k, each k multiplies and k adds: 2*m*k*n."""
    m, k = a.shape
    return 2 * m * k * b.shape[1]


@_register(aten.addmm)
def addmm_flop(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: Any = 1, alpha: Any = 1,
               out_val: Any = None) -> int:
    """beta*bias + alpha*(a @ b): the product 2*m*k*n, the bias add m*n, each non-unit scalar m*n."""
    m, k = a.shape
    n = b.shape[1]
    return 2 * m * k * n + m * n * (1 + _coefficient(beta) + _coefficient(alpha))


@_register(aten.bmm)
def bmm_flop(a: torch.Tensor, b: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """A batch of b matrix products (m x k) @ (k x n): 2*b*m*k*n."""
    batch, m, k = a.shape
    return 2 * batch * m * k * b.shape[2]


@_register(aten.baddbmm)
def baddbmm_flop(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: Any = 1, alpha: Any = 1,
                 out_val: Any = None) -> int:
    """bmm plus the bias add b*m*n and b*m*n per non-unit scalar."""
    batch, m, k = a.shape
    n = b.shape[2]
    return 2 * batch * m * k * n + batch * m * n * (1 + _coefficient(beta) + _coefficient(alpha))


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------

def conv_forward_flop(x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int],
                      transposed: bool) -> int:
    """F, the multiply-adds of a convolution, bias excluded.

    Non-transposed: each output element is a dot product of length (C_in/groups) * prod(kernel),
    and w_shape[1] = C_in/groups, so F = 2 * numel(out) * w_shape[1] * prod(kernel).
    Transposed: each input element is scattered into w_shape[1] * prod(kernel) outputs
    (w_shape[1] = C_out/groups), so F = 2 * numel(x) * w_shape[1] * prod(kernel).
    """
    per_element = w_shape[1] * math.prod(w_shape[2:])
    return 2 * math.prod(x_shape if transposed else out_shape) * per_element


@_register(aten.convolution, aten._convolution)
def convolution_flop(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any,
                     dilation: Any, transposed: bool, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """F plus one add per output element for the bias."""
    out = _first(out_val)
    return conv_forward_flop(x.shape, w.shape, out.shape, transposed) + (out.numel() if bias is not None else 0)


@_register(aten.convolution_backward)
def convolution_backward_flop(grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias_sizes: Any,
                              stride: Any, padding: Any, dilation: Any, transposed: bool, output_padding: Any,
                              groups: int, output_mask: Sequence[bool], *, out_val: Any = None) -> int:
    """grad_input F, grad_weight F, grad_bias numel(grad_out), each only if requested.

    grad_input is a transposed convolution of grad_out with w: the forward's multiply-adds.
    Each weight element w[o, i, *k] accumulates one product per (sample, output position) of its
    group: 2 * numel(w) * N * prod(out spatial), which equals F. (Stock FlopCounterMode uses the
    full C_in here, hence counts grouped convolutions ``groups`` times too high.) grad_bias sums
    grad_out over batch and space: numel(grad_out) adds.
    """
    forward = conv_forward_flop(x.shape, w.shape, grad_out.shape, transposed)
    grad_input, grad_weight, grad_bias = (bool(flag) for flag in output_mask)
    return forward * grad_input + forward * grad_weight + grad_out.numel() * grad_bias


# ---------------------------------------------------------------------------------------------
# Batch normalisation
# ---------------------------------------------------------------------------------------------

def batch_norm_flop_count(x_shape: Sequence[int], has_weight: bool, has_bias: bool, running_stats: bool,
                          training: bool) -> int:
    """Training: E*(6 + w + b) + C*(5 + 7*r); evaluation: E*(2 + w + b) + 3*C.

    Training, per element: mean accumulate 1, variance (x - mean)^2 accumulate 3, normalise
    (x - mean) * invstd 2, scale w, shift b. Per channel: mean divide 1, variance divide 1,
    invstd = 1/sqrt(var + eps) 3, and with running statistics (r) rm = (1-m)*rm + m*mean 3 and
    rv = (1-m)*rv + m*var*M/(M-1) 4. Evaluation: normalise with the running statistics.
    """
    numel, channels = math.prod(x_shape), x_shape[1]
    affine = int(has_weight) + int(has_bias)
    if training:
        return numel * (6 + affine) + channels * (5 + 7 * int(running_stats))
    return numel * (2 + affine) + channels * 3


@_register(aten.native_batch_norm, aten._native_batch_norm_legit)
def batch_norm_flop(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, *args: Any,
                    out_val: Any = None, **kwargs: Any) -> int:
    """batch_norm_flop_count. Arguments after bias: (running_mean, running_var, training, momentum,
    eps), or (training, momentum, eps) for ``_native_batch_norm_legit.no_stats`` (no running stats).
    """
    if len(args) == 5:
        running_mean, _, training = args[:3]
    else:
        running_mean, training = None, args[0]
    return batch_norm_flop_count(x.shape, weight is not None, bias is not None, running_mean is not None,
                                 bool(training))


@_register(aten._native_batch_norm_legit_no_training)
def batch_norm_eval_flop(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, *args: Any,
                         out_val: Any = None, **kwargs: Any) -> int:
    """batch_norm_flop_count with training=False."""
    return batch_norm_flop_count(x.shape, weight is not None, bias is not None, True, False)


@_register(aten.native_batch_norm_backward)
def batch_norm_backward_flop(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                             running_mean: Any, running_var: Any, save_mean: Any, save_invstd: Any,
                             train: bool, eps: float, output_mask: Sequence[bool], *, out_val: Any = None) -> int:
    """Training: E*([g_i or g_b] + 3*[g_i or g_w] + 5*g_i) + C*(g_w + g_i*(4 + w)).

    sum_dy = sum(dy) per channel (1 per element) serves grad_input and is grad_bias;
    dot = sum(dy * (x - mean)) (3 per element) serves grad_input and gives grad_weight =
    dot * invstd (1 per channel). grad_input = (dy - sum_dy/M - (x - mean)*dot*invstd^2/M) *
    invstd * weight: 5 per element, and per channel sum_dy/M 1, dot*invstd^2/M 3, invstd*weight w.
    Evaluation: invstd from the running variance 3*C; grad_input = dy * (invstd*weight): E + C*w;
    grad_weight = sum(dy * (x - rm) * invstd): 4*E; grad_bias = sum(dy): E.
    """
    numel, channels = x.numel(), x.shape[1]
    g_i, g_w, g_b = (int(bool(flag)) for flag in output_mask)
    w = int(weight is not None)
    if train:
        per_element = int(bool(g_i or g_b)) + 3 * int(bool(g_i or g_w)) + 5 * g_i
        return numel * per_element + channels * (g_w + g_i * (4 + w))
    return channels * 3 + g_i * (numel + channels * w) + g_w * 4 * numel + g_b * numel


# ---------------------------------------------------------------------------------------------
# Element-wise ops: k FLOPs per (floating-point) output element
# ---------------------------------------------------------------------------------------------

def _elementwise(k: int, doc: str, *packets: Any) -> FlopFormula:
    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return k * _floating_numel(out_val)

    formula.__name__ = f"elementwise_{k}_flop"
    formula.__doc__ = f"{k} per output element: {doc}."
    return _register(*packets)(formula)


_elementwise(1, "one multiply, divide, negation, root, exp or log",
             aten.mul, aten.mul_, aten.div, aten.div_, aten.neg, aten.neg_, aten.reciprocal,
             aten.reciprocal_, aten.sqrt, aten.sqrt_, aten.rsqrt, aten.rsqrt_, aten.exp, aten.exp_,
             aten.log, aten.log_)
_elementwise(3, "self + weight * (end - self)", aten.lerp, aten.lerp_)
_elementwise(1, "max(x, 0)", aten.relu, aten.relu_)
_elementwise(1, "grad where x > threshold: one comparison", aten.threshold_backward)
_elementwise(2, "ReLU6: clamp below and above", aten.hardtanh, aten.hardtanh_)
_elementwise(2, "two comparisons select grad", aten.hardtanh_backward)
_elementwise(4, "clamp(x + 3, 0, 6) / 6: add, two comparisons, divide", aten.hardsigmoid, aten.hardsigmoid_)
_elementwise(3, "two comparisons and grad / 6", aten.hardsigmoid_backward)
_elementwise(5, "x * clamp(x + 3, 0, 6) / 6: add, two comparisons, multiply, divide",
             aten.hardswish, aten.hardswish_)
_elementwise(6, "two comparisons, (2x + 3) / 6 (3), times grad", aten.hardswish_backward)


_elementwise(1, "one power (a square for exponent 2; a general power is one special-function "
             "evaluation, as exp is)", aten.pow, aten.pow_)
_elementwise(1, "one comparison with the lower bound", aten.clamp_min, aten.clamp_min_)


@_register(aten.clamp, aten.clamp_)
def clamp_flop(x: Any, min: Any = None, max: Any = None, *, out_val: Any = None) -> int:
    """One comparison per element for each bound given (``min``, ``max``)."""
    return ((min is not None) + (max is not None)) * _floating_numel(out_val)


@_register(aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub)
def add_flop(x: Any, other: Any, alpha: Any = 1, *, out_val: Any = None) -> int:
    """One add per output element, plus one multiply per element for alpha * other if alpha != 1."""
    return (1 + _coefficient(alpha)) * _floating_numel(out_val)


@_register(aten.addcmul, aten.addcmul_, aten.addcdiv, aten.addcdiv_)
def addcmul_flop(x: Any, tensor1: Any, tensor2: Any, *, value: Any = 1, out_val: Any = None) -> int:
    """self + value * t1 * t2 (or t1 / t2): product, add, and the value multiply if value != 1."""
    return (2 + _coefficient(value)) * _floating_numel(out_val)


# ---------------------------------------------------------------------------------------------
# Foreach ops (an optimizer's ``foreach=True`` path): the element-wise row of each tensor of the
# list, summed. The first argument is the list the op computes over (in place, or the shapes of
# its new tensors).
# ---------------------------------------------------------------------------------------------

def _floating_numels(tensors: Sequence[torch.Tensor]) -> list[int]:
    """numel of each tensor of a foreach op's list, 0 for one that is not floating point."""
    return [t.numel() if (t.dtype.is_floating_point or t.dtype.is_complex) else 0 for t in tensors]


def _foreach_elementwise(k: int, doc: str, *packets: Any) -> FlopFormula:
    def formula(tensors: Sequence[torch.Tensor], *args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return k * sum(_floating_numels(tensors))

    formula.__name__ = f"foreach_elementwise_{k}_flop"
    formula.__doc__ = f"{k} per element of every tensor of the list: {doc}."
    return _register(*packets)(formula)


_foreach_elementwise(1, "one multiply, divide, negation, root, reciprocal or comparison",
                     aten._foreach_mul, aten._foreach_mul_, aten._foreach_div, aten._foreach_div_,
                     aten._foreach_neg, aten._foreach_neg_, aten._foreach_sqrt, aten._foreach_sqrt_,
                     aten._foreach_reciprocal, aten._foreach_reciprocal_, aten._foreach_rsqrt,
                     aten._foreach_rsqrt_, aten._foreach_clamp_min, aten._foreach_clamp_min_)
_foreach_elementwise(3, "self + weight * (end - self)", aten._foreach_lerp, aten._foreach_lerp_)


@_register(aten._foreach_add, aten._foreach_add_, aten._foreach_sub, aten._foreach_sub_)
def foreach_add_flop(tensors: Sequence[torch.Tensor], other: Any = None, *, alpha: Any = 1,
                     out_val: Any = None) -> int:
    """``aten.add`` per tensor: one add per element, and one multiply for ``alpha * other`` when
    ``alpha != 1`` (the Scalar and ScalarList overloads take no alpha: one add)."""
    return (1 + _coefficient(alpha)) * sum(_floating_numels(tensors))


@_register(aten._foreach_addcmul, aten._foreach_addcmul_, aten._foreach_addcdiv, aten._foreach_addcdiv_)
def foreach_addcmul_flop(tensors: Sequence[torch.Tensor], tensor1: Any, tensor2: Any, scalars: Any = 1, *,
                         value: Any = None, out_val: Any = None) -> int:
    """``aten.addcmul``/``aten.addcdiv`` per tensor: product or quotient, add, and the ``value``
    multiply where that tensor's value is not 1 (one ``value`` for the Scalar overload, one per
    tensor for ScalarList; the Tensor overload's values are data, counted as not 1)."""
    scalars = scalars if value is None else value
    numels = _floating_numels(tensors)
    if isinstance(scalars, torch.Tensor):
        return 3 * sum(numels)
    if isinstance(scalars, (list, tuple)):
        return sum((2 + _coefficient(v)) * n for v, n in zip(scalars, numels, strict=True))
    return (2 + _coefficient(scalars)) * sum(numels)


# ---------------------------------------------------------------------------------------------
# bitsandbytes' blockwise quantisation (its 8-bit optimizers on CPU; compiled code, counted from
# csrc/cpu_ops.cpp and csrc/common.cpp). Registered by costmodel.validation.optimizers when it
# imports bitsandbytes (whose import defines torch.ops.bitsandbytes).
# ---------------------------------------------------------------------------------------------

QUANTIZE_BLOCKWISE_K = 11


def dequantize_blockwise_flop(a: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """``out[i] = code[A[i]] * absmax[block]``: one multiply per element (the lookup is a load)."""
    return a.numel()


def quantize_blockwise_flop(a: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """11 per element: the block's ``absmax = fmax(absmax, fabs(x))`` (2); ``x / absmax`` (1); the
    code search, BinSearch's Direct2 (``(x - x0) * scale`` and one comparison: 3); the nearest of two
    neighbours (two subtractions, two ``fabs``, one comparison: 5). The kernel skips the last step
    for an element that lands on the code's last entry; it is counted for every element, so that
    the count does not depend on the data."""
    return QUANTIZE_BLOCKWISE_K * a.numel()


def dequantize_4bit_flop(a: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """``out[i] = code[q_i] * absmax[block]`` over the weight's ``prod(shape)`` elements (two codes
    a byte): one multiply each (csrc/cpu_ops.cpp, ``dequantizeBlockwise4bitCpu``)."""
    return out_val.numel()


def register_bitsandbytes_formulas() -> None:
    """Add the rows above to the exact convention (once; bitsandbytes must be imported)."""
    library = torch.ops.bitsandbytes
    if library.quantize_blockwise in EXACT_FLOP_FORMULAS:
        return
    _register(library.quantize_blockwise)(quantize_blockwise_flop)
    _register(library.dequantize_blockwise)(dequantize_blockwise_flop)
    _register(library.dequantize_4bit)(dequantize_4bit_flop)


# ---------------------------------------------------------------------------------------------
# Attention: the CPU flash kernel of scaled_dot_product_attention and its backward. The composite
# ``scaled_dot_product_attention`` decomposes under both counters into
# ``_scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, *, attn_mask, scale)``
# -> (out, logsumexp); its backward is ``..._for_cpu_backward(grad_out, q, k, v, out, logsumexp,
# dropout_p, is_causal, *, attn_mask, scale)`` -> (dq, dk, dv). The stock counter has formulas for
# the CUDA kernels only: both count 0 in the torch convention. Exact counts follow the algorithm,
# not the kernel's blocking (its per-block online-softmax rescaling is an artefact of the tiling),
# per batch-head with query length L, key length S and head size d; only dropout_p = 0, no mask
# and not causal are defined.
# ---------------------------------------------------------------------------------------------

def _sdpa_dims(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch * heads, L, S, d) of (..., L, d) queries and (..., S, d) keys."""
    return math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2], q.shape[-1]


def _sdpa_check(dropout_p: Any, is_causal: Any, attn_mask: Any) -> None:
    if dropout_p or is_causal or attn_mask is not None:
        raise CostModelError("the exact FLOP convention defines CPU flash attention only without dropout, "
                             "mask or causality")


@_register(aten._scaled_dot_product_flash_attention_for_cpu)
def sdpa_flash_cpu_flop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                        is_causal: bool = False, *, attn_mask: Any = None, scale: Any = None,
                        out_val: Any = None) -> int:
    """B*(4*L*S*d + 5*L*S + L*d + 2*L): scores Q K^T 2LSd; times scale LS; row max LS comparisons;
    exp(s - max) 2LS; row sum LS; out = P V (unnormalised) 2LSd; out / row sum Ld; logsumexp =
    max + log(sum) 2L."""
    _sdpa_check(dropout_p, is_causal, attn_mask)
    b, l, s, d = _sdpa_dims(q, k)
    return b * (4 * l * s * d + 5 * l * s + l * d + 2 * l)


@_register(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def sdpa_flash_cpu_backward_flop(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, logsumexp: torch.Tensor, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, attn_mask: Any = None, scale: Any = None,
                                 out_val: Any = None) -> int:
    """B*(10*L*S*d + 6*L*S + 2*L*d): D = rowsum(dO * O) 2Ld; recompute scale * Q K^T 2LSd + LS
    and P = exp(s - lse) 2LS; dV = P^T dO 2LSd; dP = dO V^T 2LSd; dS = P * (dP - D) 2LS, times
    scale LS; dQ = dS K 2LSd; dK = dS^T Q 2LSd."""
    _sdpa_check(dropout_p, is_causal, attn_mask)
    b, l, s, d = _sdpa_dims(q, k)
    return b * (10 * l * s * d + 6 * l * s + 2 * l * d)


# ---------------------------------------------------------------------------------------------
# Reductions, norms, pooling
# ---------------------------------------------------------------------------------------------

@_register(aten.sum)
def sum_flop(x: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """Every input element is accumulated once (into zero): numel(x)."""
    return x.numel()


@_register(aten.mean)
def mean_flop(x: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """The sum, numel(x), and one divide per output element."""
    return x.numel() + _first(out_val).numel()


@_register(aten.linalg_vector_norm)
def vector_norm_flop(x: torch.Tensor, ord: Any = 2, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """2-norm: square and accumulate each element (2*numel(x)), one sqrt per output element."""
    if ord != 2:
        raise CostModelError(f"the exact FLOP convention defines linalg_vector_norm only for ord=2, got ord={ord}")
    return 2 * x.numel() + _first(out_val).numel()


@_register(aten.max_pool2d_with_indices)
def max_pool2d_flop(x: torch.Tensor, kernel_size: Sequence[int], *args: Any, out_val: Any = None,
                    **kwargs: Any) -> int:
    """One comparison per window element, windows counted as full: numel(out) * kh * kw."""
    kernel = list(kernel_size) * (2 if len(kernel_size) == 1 else 1)
    return _first(out_val).numel() * math.prod(kernel)


@_register(aten.max_pool2d_with_indices_backward)
def max_pool2d_backward_flop(grad_out: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """Each output gradient is added into grad_input at its argmax: numel(grad_out)."""
    return grad_out.numel()


@_register(aten.upsample_nearest2d)
def upsample_nearest2d_flop(*args: Any, **kwargs: Any) -> int:
    """Each output element is a copy of one input element: no arithmetic."""
    return 0


@_register(aten.upsample_nearest2d_backward)
def upsample_nearest2d_backward_flop(grad_out: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """Each output gradient is added into the input element it was copied from: numel(grad_out)."""
    return grad_out.numel()


def _adaptive_windows(in_size: int, out_size: int) -> int:
    """Total length of an adaptive pool's windows along one dimension: output ``i`` averages
    input ``start(i) .. end(i) - 1`` with ``start = floor(i*in/out)``, ``end = ceil((i+1)*in/out)``
    (windows may overlap, so the total can exceed ``in_size``)."""
    total = 0
    for i in range(out_size):
        start = math.floor(i * in_size / out_size)
        end = math.ceil((i + 1) * in_size / out_size)
        total += end - start
    return total


def _adaptive_avg_pool2d_count(x: torch.Tensor, out: torch.Tensor) -> int:
    planes = math.prod(x.shape[:-2])
    windows = _adaptive_windows(x.shape[-2], out.shape[-2]) * _adaptive_windows(x.shape[-1], out.shape[-1])
    return planes * windows + out.numel()


@_register(aten._adaptive_avg_pool2d)
def adaptive_avg_pool2d_flop(x: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """A mean per output element over its window: every window element accumulated, one divide
    per output: sum of the window sizes + numel(out)."""
    return _adaptive_avg_pool2d_count(x, _first(out_val))


@_register(aten._adaptive_avg_pool2d_backward)
def adaptive_avg_pool2d_backward_flop(grad_out: torch.Tensor, x: torch.Tensor, *args: Any, out_val: Any = None,
                                      **kwargs: Any) -> int:
    """Each output gradient divided by its window size (numel(grad_out)) and added into every
    element of its window: the forward's count."""
    return _adaptive_avg_pool2d_count(x, grad_out)


@_register(aten.avg_pool2d)
def avg_pool2d_flop(x: torch.Tensor, kernel_size: Sequence[int], *args: Any, out_val: Any = None,
                    **kwargs: Any) -> int:
    """A mean per window, windows counted as full: numel(out) * (kh * kw + 1)."""
    kernel = list(kernel_size) * (2 if len(kernel_size) == 1 else 1)
    return _first(out_val).numel() * (math.prod(kernel) + 1)


@_register(aten.avg_pool2d_backward)
def avg_pool2d_backward_flop(grad_out: torch.Tensor, x: torch.Tensor, kernel_size: Sequence[int], *args: Any,
                             out_val: Any = None, **kwargs: Any) -> int:
    """A divide per output gradient and an add per window element: numel(grad_out) * (kh * kw + 1)."""
    kernel = list(kernel_size) * (2 if len(kernel_size) == 1 else 1)
    return grad_out.numel() * (math.prod(kernel) + 1)


# ---------------------------------------------------------------------------------------------
# Loss: nn.CrossEntropyLoss = _log_softmax + nll_loss_forward; nn.MSELoss = mse_loss
# ---------------------------------------------------------------------------------------------

_MEAN_REDUCTION = 1  # at::Reduction::Mean


@_register(aten._softmax)
def softmax_flop(x: torch.Tensor, dim: int, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """5 per element: row max comparison, subtract the max, exp, accumulate, divide by the sum."""
    return 5 * x.numel()


@_register(aten._softmax_backward_data)
def softmax_backward_flop(grad: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """``out * (grad - sum(grad * out))``: multiply, accumulate, subtract, multiply: 4 per element."""
    return 4 * grad.numel()


@_register(aten._log_softmax)
def log_softmax_flop(x: torch.Tensor, dim: int, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """5 per element (max comparison, subtract, exp, accumulate, subtract the log-sum), 1 log per row."""
    return 5 * x.numel() + x.numel() // x.shape[dim]


@_register(aten._log_softmax_backward_data)
def log_softmax_backward_flop(grad: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """grad - exp(out) * sum(grad): accumulate, exp, multiply, subtract: 4 per element."""
    return 4 * grad.numel()


@_register(aten.nll_loss_forward)
def nll_loss_flop(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: int,
                  ignore_index: int, *, out_val: Any = None) -> int:
    """N negate-accumulates, one divide for the mean, 2N with class weights (multiply, accumulate)."""
    n = target.numel()
    return n + int(reduction == _MEAN_REDUCTION) + 2 * n * (weight is not None)


@_register(aten.nll_loss_backward)
def nll_loss_backward_flop(grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                           reduction: int, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """One value written per sample, grad / total once for the mean, N more with class weights."""
    n = target.numel()
    return n + int(reduction == _MEAN_REDUCTION) + n * (weight is not None)


_NO_REDUCTION = 0  # at::Reduction::None


# nn.MSELoss = mse_loss (forward), mse_loss_backward (backward), each arriving whole.

@_register(aten.mse_loss)
def mse_loss_flop(x: torch.Tensor, target: torch.Tensor, reduction: int = _MEAN_REDUCTION, *, out_val: Any = None) -> int:
    """Per element subtract and square (2), accumulated for a reduction (1 more); the mean's divide once."""
    e = x.numel()
    return 2 * e + e * int(reduction != _NO_REDUCTION) + int(reduction == _MEAN_REDUCTION)


@_register(aten.mse_loss_backward)
def mse_loss_backward_flop(grad: torch.Tensor, x: torch.Tensor, target: torch.Tensor, reduction: int, *,
                           out_val: Any = None) -> int:
    """norm * (x - target) * grad: subtract, two multiplies per element; norm (2/E or 2) is a scalar
    computed once from integers (0)."""
    return 3 * x.numel()


# ---------------------------------------------------------------------------------------------
# SVD (GaLore's projector refresh)
# ---------------------------------------------------------------------------------------------

def svd_flop_count(m: int, n: int, full_matrices: bool, compute_uv: bool) -> int:
    """Golub-Reinsch SVD of one m x n matrix, l = max(m, n), k = min(m, n).

    Golub & Van Loan, Matrix Computations (3rd ed. Fig. 5.4.1; 4th ed. Fig. 8.6.1): thin U1, S, V:
    14*l*k^2 + 8*k^3; full U, S, V: 4*l^2*k + 8*l*k^2 + 9*k^3; S only: 4*l*k^2 - 4*k^3/3
    (rounded down).
    """
    l, k = max(m, n), min(m, n)
    if not compute_uv:
        return (12 * l * k * k - 4 * k**3) // 3
    if full_matrices:
        return 4 * l * l * k + 8 * l * k * k + 9 * k**3
    return 14 * l * k * k + 8 * k**3


@_register(aten._linalg_svd)
def svd_flop(a: torch.Tensor, full_matrices: bool = False, compute_uv: bool = True, *, driver: Any = None,
             out_val: Any = None) -> int:
    """svd_flop_count per matrix, times the batch (defaults as in the op's schema: the dispatcher
    drops arguments equal to their defaults)."""
    *batch, m, n = a.shape
    return math.prod(batch) * svd_flop_count(m, n, full_matrices, compute_uv)


# ---------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------

def plugin_flop_formulas() -> dict[Any, FlopFormula]:
    """The rows the installed plugins add to the exact convention (``costmodel_exact_flop_formulas``),
    keyed by overload packet; a row for an op of the built-in table, or one that two plugins
    give, is a one-line CostModelError naming the plugin."""
    from costmodel.plugin_calls import EXACT_FLOP_FORMULAS as CONTRACT, HookAsker
    from costmodel.registry import default_plugin_manager

    rows: dict[Any, FlopFormula] = {}
    givers: dict[Any, str] = {}
    for plugin, answer in HookAsker(default_plugin_manager(), CONTRACT).every_by_plugin():
        for op, formula in answer.items():
            packet = getattr(op, "overloadpacket", op)
            if packet in EXACT_FLOP_FORMULAS:
                raise CostModelError(f"plugin {plugin!r} gives an exact FLOP formula for {packet}, "
                                     f"which the convention's own table defines (docs/flop-convention.md)")
            if packet in givers:
                raise CostModelError(f"plugins {givers[packet]!r} and {plugin!r} both give an "
                                     f"exact FLOP formula for {packet}")
            raw = lambda *args, _formula=formula, **kwargs: _formula(*args, **kwargs)  # noqa: E731
            raw._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode's raw-argument flag
            rows[packet], givers[packet] = raw, plugin
    return rows


class ExactFlopCounterMode(FlopCounterMode):
    """FlopCounterMode restricted to the exact convention's table, recording every uncovered op.

    The stock registry is not merged in: an op the convention does not define is recorded in
    ``uncovered`` (never silently counted as 0 or by a stock formula), and ``measure`` fails on it.
    """

    def __init__(self) -> None:
        table = {**EXACT_FLOP_FORMULAS, **plugin_flop_formulas()}
        super().__init__(display=False, custom_mapping=table)
        self.flop_registry = table
        self.uncovered: Counter[str] = Counter()

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet not in self.flop_registry:
            self.uncovered[str(func_packet)] += 1
        return super()._count_flops(func_packet, out, args, kwargs)


class GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: every count goes to "Global" only.

    The stock ``ModuleTracker`` registers gradient hooks on every module's outputs, also when a
    module runs again inside backward (activation checkpointing's recomputation), and those hooks
    keep the recomputed tensors' autograd graph, and with it the tensors, alive until the
    backward ends: a counter observing the step would change its memory (measured on resnet18
    with two checkpointed stages). The per-module breakdown is never used here."""

    parents = frozenset({"Global"})
    is_bw = False

    def __enter__(self) -> "GlobalOnly":
        return self

    def __exit__(self, *args: Any) -> None:
        return None


def make_counter(convention: str) -> FlopCounterMode:
    """A fresh counter for one convention: "torch" (stock) or "exact", counting "Global" only
    (:class:`GlobalOnly`)."""
    # keep_whole (the smooth activations section): no decomposition that allocates differently.
    if convention == "torch":
        counter = FlopCounterMode(display=False)
    elif convention == "exact":
        counter = ExactFlopCounterMode()
    else:
        raise CostModelError(f"unknown FLOP convention {convention!r}; choose one of {', '.join(FLOP_CONVENTIONS)}")
    counter.mod_tracker = GlobalOnly()
    return keep_whole(counter)


class PhaseFlops:
    """FLOPs per phase in both conventions: ``with phase_flops.phase("forward"): ...``.

    Each phase enters a fresh counter per convention (entering a FlopCounterMode resets it), both
    nested so that every op is seen once by each.
    """

    def __init__(self, conventions: Sequence[str] = FLOP_CONVENTIONS) -> None:
        self.conventions = tuple(conventions)
        self.counts: dict[str, dict[str, int]] = {conv: {} for conv in self.conventions}
        self.by_op: dict[str, dict[str, dict[str, int]]] = {conv: {} for conv in self.conventions}
        self.uncovered: Counter[str] = Counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        counters = {conv: make_counter(conv) for conv in self.conventions}
        with contextlib.ExitStack() as stack:
            for counter in counters.values():
                stack.enter_context(counter)
            yield
        for conv, counter in counters.items():
            self.counts[conv][name] = self.counts[conv].get(name, 0) + counter.get_total_flops()
            global_counts = counter.get_flop_counts().get("Global", {})
            phase_ops = self.by_op[conv].setdefault(name, {})
            for packet, flops in global_counts.items():
                phase_ops[str(packet)] = phase_ops.get(str(packet), 0) + flops
            if isinstance(counter, ExactFlopCounterMode):
                self.uncovered.update(counter.uncovered)


def count_flops(fn: Callable[[], Any], convention: str) -> int:
    """FLOPs of ``fn()`` in one convention (tests on single layers use this)."""
    counter = make_counter(convention)
    with counter:
        fn()
    if isinstance(counter, ExactFlopCounterMode) and counter.uncovered:
        raise CostModelError(f"ops outside the exact FLOP convention: {', '.join(sorted(counter.uncovered))}")
    return counter.get_total_flops()


# =============================================================================================
# Smooth activations: sigmoid, SiLU, tanh, GELU (EfficientNet, RegNetY, ConvNeXt, ViT, MaxViT).
# Each op is costed as the primitive operations of its CPU kernel (torch 2.14.1,
# aten/src/ATen/native/cpu/UnaryOpsKernel.cpp and Activation.cpp). exp and erf count 1 each
# (one special-function evaluation, as exp and log do above); products with constants fixed by
# the op (1/sqrt(2), 0.044715, 3*0.044715, ...) count 1 per element when applied to an element,
# 0 when two constants are combined. tanh is not a primitive: (exp(2x) - 1) / (exp(2x) + 1).
# What reaches the counter: FlopCounterMode decomposes every op that has a
# CompositeImplicitAutograd kernel and whose OpOverload is not a key of its table (the table is
# keyed by packets, so a formula row alone never stops it). ``silu_backward`` has one,
# ``grad * (s * (1 + x * (1 - s)))`` with s = sigmoid(x) (sigmoid 4, empty_like + fill_ + sub_ for
# 1 - s 1, mul, add, mul, mul 4: 9 per element, the row below), but CPU autograd runs its fused
# kernel, which allocates only the gradient. Decomposed under the counters, it would allocate five
# input-sized temporaries that the memory tracker (below the counters) sees and a real step does
# not have. So the counters keep it whole (``keep_whole``): the FLOP counts are unchanged (exact: the
# 9 of the row; torch: 0 either way, the stock table has neither silu_backward nor any op of its
# decomposition) and the measured memory is the real step's. sigmoid, sigmoid_backward, silu, tanh,
# tanh_backward, gelu and gelu_backward have no decomposition and arrive whole.
# =============================================================================================

SIGMOID_FORWARD_K = 4  # 1 / (1 + exp(-x)): negate, exp, add, reciprocal
SIGMOID_BACKWARD_K = 3  # grad * (1 - y) * y: subtract, two multiplies
SILU_FORWARD_K = SIGMOID_FORWARD_K + 1  # x * sigmoid(x)
SILU_BACKWARD_K = SIGMOID_FORWARD_K + 5  # s = sigmoid(x); grad * (s * (1 + x * (1 - s))): 4 + 5
TANH_FORWARD_K = 5  # e = exp(2x): multiply, exp; (e - 1) / (e + 1): subtract, add, divide
TANH_BACKWARD_K = 3  # grad * (1 - y * y): multiply, subtract, multiply
GELU_FORWARD_K = 5  # x * 0.5 * (1 + erf(x * M_SQRT1_2)): multiply, erf, add, multiply, multiply
GELU_BACKWARD_K = 11  # cdf 4 + pdf 4 + grad * (cdf + x * pdf) 3 (see gelu_backward_flop)
GELU_TANH_FORWARD_K = 8 + TANH_FORWARD_K  # 13 (see gelu_flop)
GELU_TANH_BACKWARD_K = 17 + TANH_FORWARD_K  # 22 (see gelu_backward_flop)

_elementwise(SIGMOID_FORWARD_K, "sigmoid 1 / (1 + exp(-x)): negate, exp, add, reciprocal",
             aten.sigmoid, aten.sigmoid_)
_elementwise(SIGMOID_BACKWARD_K, "sigmoid_backward(grad, y) = grad * (1 - y) * y: subtract, two multiplies",
             aten.sigmoid_backward)
_elementwise(SILU_FORWARD_K, "silu x * sigmoid(x): sigmoid's 4 and a multiply", aten.silu, aten.silu_)
_elementwise(SILU_BACKWARD_K, "silu_backward(grad, x): s = sigmoid(x) (4), grad * (s * (1 + x * (1 - s))): "
             "subtract, multiply, add, multiply, multiply (5)", aten.silu_backward)
_elementwise(TANH_FORWARD_K, "tanh (exp(2x) - 1) / (exp(2x) + 1): multiply, exp, subtract, add, divide",
             aten.tanh, aten.tanh_)
_elementwise(TANH_BACKWARD_K, "tanh_backward(grad, y) = grad * (1 - y * y): multiply, subtract, multiply",
             aten.tanh_backward)


def _gelu_approximate(args: Sequence[Any], kwargs: dict[str, Any], position: int) -> str:
    """GELU's ``approximate`` argument ('none' or 'tanh'); the dispatcher drops it when it is the
    default 'none'."""
    value = args[position] if len(args) > position else kwargs.get("approximate", "none")
    if value not in ("none", "tanh"):
        raise CostModelError(f"the exact FLOP convention defines gelu for approximate='none' or 'tanh', got {value!r}")
    return value


@_register(aten.gelu, aten.gelu_)
def gelu_flop(x: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """Per output element. approximate='none': ``x * 0.5 * (1 + erf(x * M_SQRT1_2))``: multiply,
    erf, add, multiply, multiply = 5. approximate='tanh': ``0.5 * x * (1 + tanh(inner))`` with
    ``inner = sqrt(2/pi) * (x + 0.044715 * x^3)``: x^3 2, * 0.044715 1, + x 1, * sqrt(2/pi) 1
    (inner 5), tanh 5, 1 + 1, 0.5 * x 1, the product 1 = 13."""
    tanh = _gelu_approximate(args, kwargs, 0) == "tanh"
    return (GELU_TANH_FORWARD_K if tanh else GELU_FORWARD_K) * _floating_numel(out_val)


@_register(aten.gelu_backward)
def gelu_backward_flop(grad: Any, x: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """Per output element. approximate='none': ``cdf = 0.5 * (1 + erf(x * M_SQRT1_2))`` (multiply,
    erf, add, multiply: 4), ``pdf = exp(-0.5 * x * x) * (M_2_SQRTPI * M_SQRT1_2 * 0.5)`` (two
    multiplies, exp, multiply: 4; the constant is folded), ``grad * (cdf + x * pdf)`` (3) = 11.
    approximate='tanh': ``x_sq = x * x``, ``x_cube = x_sq * x`` (2); ``inner = kBeta * (x + kKappa *
    x_cube)`` (3); ``t = tanh(inner)`` (5); ``left = 0.5 * x``, ``right = 1 + t`` (2);
    ``left_derivative = 0.5 * right`` (1); ``tanh_derivative = 1 - t * t`` (2); ``inner_derivative =
    kBeta * (1 + 3 * kKappa * x_sq)`` (3: ``3 * kKappa`` is one constant); ``right_derivative =
    left * tanh_derivative * inner_derivative`` (2); ``grad * (left_derivative + right_derivative)``
    (2) = 17 + 5 = 22."""
    tanh = _gelu_approximate(args, kwargs, 0) == "tanh"
    return (GELU_TANH_BACKWARD_K if tanh else GELU_BACKWARD_K) * _floating_numel(out_val)



# Ops that both counters run whole instead of through their CompositeImplicitAutograd
# decomposition (see the section's header): OpOverloads, since that is what FlopCounterMode's
# "can it decompose" test looks up. Each must have an exact row for its packet.
# ``upsample_nearest2d`` (``F.interpolate(mode="nearest")``) decomposes into two ``arange`` index
# tensors and an ``_unsafe_index``; its CPU kernel allocates only the output.
KEEP_WHOLE_OPS: tuple[Any, ...] = (aten.silu_backward.default, aten.upsample_nearest2d.default)


def _kept_whole(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """Never called: FlopCounterMode counts an op by its packet's row; this OpOverload key only
    stops the decomposition."""
    raise AssertionError("an OpOverload key of KEEP_WHOLE_OPS was used as a formula")


_kept_whole._get_raw = True  # type: ignore[attr-defined]


def keep_whole(counter: FlopCounterMode) -> FlopCounterMode:
    """Make ``counter`` (stock or exact) run ``KEEP_WHOLE_OPS`` whole; returns it."""
    for op in KEEP_WHOLE_OPS:
        counter.flop_registry.setdefault(op, _kept_whole)
    return counter

# ============================ end of the smooth activations section ===========================


# =============================================================================================
# Shape ops: indexing, rolling and padding (ShuffleNetV2, ViT, Swin, ConvNeXt).
# Pure data movement, 0 FLOPs (docs/flop-convention.md, "Zero FLOPs"): ``select_backward`` and
# ``slice_backward`` (the backward of ``x[i]`` / ``x[a:b]``: a zero-filled input-sized tensor with
# the incoming gradient copied into the selected part), ``roll`` (forward, and backward with the
# shifts negated) and ``constant_pad_nd`` (``F.pad(mode="constant")``: a filled tensor with the
# input copied in; its backward is ``constant_pad_nd`` with the pads negated, a crop).
# =============================================================================================

SHAPE_ZERO_FLOP_OPS: tuple[Any, ...] = (aten.select_backward, aten.slice_backward, aten.roll, aten.constant_pad_nd)

_register(*SHAPE_ZERO_FLOP_OPS)(zero_flop)

# ============================ end of the shape ops section ====================================


# =============================================================================================
# Layer and group normalisation: native_layer_norm, native_group_norm and their backwards
# (nn.LayerNorm / F.layer_norm: ConvNeXt's LayerNorm2d, ViT, Swin, MaxViT; nn.GroupNorm). Counted
# term by term as batch_norm_flop_count / batch_norm_backward_flop are, with the statistics taken
# per group of M = E / R elements instead of per channel: E = numel(input), R = numel(mean) (layer
# norm: the product of the sizes before the normalised dims; group norm: N * group), w / b = a
# weight / bias is passed. Both ops arrive whole at FlopCounterMode (no CompositeImplicitAutograd
# kernel); the stock counter has no formula for them (0 in the torch convention).
# =============================================================================================

def norm_forward_flop_count(numel: int, groups: int, has_weight: bool, has_bias: bool) -> int:
    """E*(6 + w + b) + 5*R.

    Per element: mean accumulate 1, variance (x - mean)^2 accumulate 3, normalise
    (x - mean) * rstd 2, scale w, shift b (the weight and bias vary inside a group: one multiply
    and one add per element, never folded per group). Per group: mean divide 1, variance divide 1,
    rstd = 1/sqrt(var + eps) 3.
    """
    return numel * (6 + int(has_weight) + int(has_bias)) + 5 * groups


def norm_backward_flop_count(numel: int, groups: int, has_weight: bool, output_mask: Sequence[bool]) -> int:
    """g_i*(E*(9 + w) + 4*R) + 4*E*g_w + E*g_b, with (g_i, g_w, g_b) = output_mask.

    grad_input, with dy' = dy * weight (w per element): s = sum(dy') 1 and d = sum(dy' * (x - mean))
    3 per element, then (dy' - s/M - (x - mean) * d*rstd^2/M) * rstd 5 per element; per group s/M 1
    and d*rstd^2/M 3 (square, multiply, divide). grad_weight = sum(dy * (x - mean) * rstd) across
    groups: 4 per element (rstd varies along the sum, so it cannot be applied once per weight
    element as batch norm does). grad_bias = sum(dy): 1 per element. Unlike batch norm no term is
    shared: grad_input reduces within a group, grad_weight and grad_bias across groups.
    """
    g_i, g_w, g_b = (int(bool(flag)) for flag in output_mask)
    grad_input = numel * (9 + int(has_weight)) + 4 * groups
    return g_i * grad_input + g_w * 4 * numel + g_b * numel


@_register(aten.native_layer_norm)
def layer_norm_flop(x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, *, out_val: Any = None) -> int:
    """norm_forward_flop_count with R = numel(x) / prod(normalized_shape)."""
    return norm_forward_flop_count(x.numel(), x.numel() // math.prod(normalized_shape), weight is not None,
                                   bias is not None)


@_register(aten.native_layer_norm_backward)
def layer_norm_backward_flop(grad_out: torch.Tensor, x: torch.Tensor, normalized_shape: Sequence[int],
                             mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, output_mask: Sequence[bool], *, out_val: Any = None) -> int:
    """norm_backward_flop_count with R = numel(mean)."""
    return norm_backward_flop_count(x.numel(), mean.numel(), weight is not None, output_mask)


@_register(aten.native_group_norm)
def group_norm_flop(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, n: int, c: int,
                    hxw: int, group: int, eps: float, *, out_val: Any = None) -> int:
    """norm_forward_flop_count with R = N * group."""
    return norm_forward_flop_count(x.numel(), n * group, weight is not None, bias is not None)


@_register(aten.native_group_norm_backward)
def group_norm_backward_flop(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                             weight: torch.Tensor | None, n: int, c: int, hxw: int, group: int,
                             output_mask: Sequence[bool], *, out_val: Any = None) -> int:
    """norm_backward_flop_count with R = N * group."""
    return norm_backward_flop_count(x.numel(), n * group, weight is not None, output_mask)

# ============================ end of the layer and group normalisation section ================
