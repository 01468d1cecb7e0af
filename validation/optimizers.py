"""Optimizers the reference builds beyond ``torch.optim``: bitsandbytes' 8-bit AdamW; and its
bitsandbytes kernels in view (the 8-bit optimizer's, the 4-bit Linear's).

``bnb.optim.AdamW8bit`` updates each parameter through one custom op,
``torch.ops.bitsandbytes.optimizer_update_8bit_blockwise`` (``optimizer_update_32bit`` for a
parameter below ``min_8bit_size``). On CPU that op's kernel is a Python function of torch ops
(``bitsandbytes/backends/cpu/ops.py``), but a dispatch mode sees only the custom op: the memory
tracker would miss every float32 copy of the moments the kernel makes, and the FLOP counter every
operation. :class:`KernelsInView`, entered above the counters and the tracker for the optimizer
phase, runs that same Python function in the op's place, so each torch op inside reaches them;
the quantisation ops it calls (``quantize_blockwise``, ``dequantize_blockwise``, compiled code)
arrive whole and are counted by their rows in the exact convention. A 4-bit Linear's product
(``bitsandbytes::gemm_4bit``, ``StepConfig.quantize``) is the same on CPU: its kernel is a Python
function that dequantizes and calls ``F.linear``; the same mode runs it, entered for the forward
and the backward.

bitsandbytes is imported only when such an optimizer is built (it takes about two seconds).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from costmodel.errors import CostModelError

BITSANDBYTES_VERSION = "0.50.2"  # the version whose CPU kernels costmodel.plugins.adamw8bit models


def _bitsandbytes() -> Any:
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise CostModelError("--optimizer adamw8bit: bitsandbytes is not installed (pip install "
                             f"bitsandbytes=={BITSANDBYTES_VERSION})") from None
    if version != BITSANDBYTES_VERSION:
        raise CostModelError(f"--optimizer adamw8bit: the rule models bitsandbytes {BITSANDBYTES_VERSION}'s CPU "
                             f"kernels, this is {version}")
    import bitsandbytes

    return bitsandbytes


def adamw8bit(params: list[nn.Parameter], lr: float, **options: Any) -> torch.optim.Optimizer:
    """``bitsandbytes.optim.AdamW8bit(params, lr=lr, **options)``."""
    return _bitsandbytes().optim.AdamW8bit(params, lr=lr, **options)


# StepConfig.optimizer -> how the reference builds it, for the optimizers outside torch.optim.
BUILDERS: Mapping[str, Callable[..., torch.optim.Optimizer]] = {"adamw8bit": adamw8bit}
# Optimizers that cannot step fake tensors, and why (``measure --fake`` refuses them before any work).
REAL_TENSORS_ONLY: Mapping[str, str] = {
    "adafactor": "its step reads param.norm(2).item(), a value fake tensors do not have",
    "adamw8bit": "bitsandbytes makes its quantisation maps as real tensors when the optimizer is built, and its "
                 "ops refuse to mix them with fake ones"}


class KernelsInView(TorchDispatchMode):
    """Runs the Python CPU kernels of bitsandbytes' ops given in ``kernels`` (op -> its kernel) in
    place of the ops (module docstring); every other op passes through unchanged."""

    def __init__(self, kernels: Mapping[Any, Callable[..., Any]]) -> None:
        super().__init__()
        self.kernels = dict(kernels)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kernel = self.kernels.get(func, func)
        return kernel(*args, **(kwargs or {}))


def optimizer_kernels() -> dict[Any, Callable[..., Any]]:
    """bitsandbytes 0.50.2 registers these two functions as its optimizer ops' CPU kernels."""
    from bitsandbytes.backends.cpu import ops as cpu_ops

    library = torch.ops.bitsandbytes
    return {library.optimizer_update_8bit_blockwise.default: cpu_ops._optimizer_update_8bit_blockwise_cpu,
            library.optimizer_update_32bit.default: cpu_ops._optimizer_update_32bit_cpu}


def matmul_4bit_kernels() -> dict[Any, Callable[..., Any]]:
    """The CPU kernel of ``bitsandbytes::gemm_4bit`` (the 4-bit Linear's product) is its default
    implementation: the statistics dequantized, the weight dequantized, ``F.linear``."""
    from bitsandbytes.backends.default import ops as default_ops

    return {torch.ops.bitsandbytes.gemm_4bit.default: default_ops._gemm_4bit_default_impl}


def holds_4bit_weights(model: nn.Module) -> bool:
    """Whether ``model`` has bitsandbytes 4-bit parameters (``StepConfig.quantize``)."""
    return any(hasattr(parameter, "quant_state") for parameter in model.parameters())


def kernels_in_view(optimizer: torch.optim.Optimizer, model: nn.Module | None = None
                    ) -> contextlib.AbstractContextManager:
    """:class:`KernelsInView` for a bitsandbytes optimizer, and for a model with 4-bit weights (one
    mode for both: enter it for the forward and backward too), else nothing. Call it before the
    FLOP counters are made: it adds the quantisation ops its kernels call to the exact convention."""
    kernels: dict[Any, Callable[..., Any]] = {}
    if type(optimizer).__module__.startswith("bitsandbytes."):
        kernels.update(optimizer_kernels())
    if model is not None and holds_4bit_weights(model):
        kernels.update(matmul_4bit_kernels())
    if not kernels:
        return contextlib.nullcontext()
    from costmodel.validation.flops import register_bitsandbytes_formulas

    register_bitsandbytes_formulas()
    return KernelsInView(kernels)
