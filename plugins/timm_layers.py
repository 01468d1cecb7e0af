"""timm layers whose forward torch.fx cannot trace, given traceable stand-ins
(``costmodel_module_forward``) that dispatch the same ops, so that the op rules cost them as
usual.

``timm.layers.Conv2dSame`` (timm 1.0.31; the ``tf_`` ports' TensorFlow "SAME" convolutions): its
forward is ``conv2d_same``, ``pad_same(x, kernel, stride, dilation)`` then ``F.conv2d(x, weight,
bias, stride, (0, 0), dilation, groups)``. ``pad_same`` reads ``x.size()[-2:]`` and computes each
side's total padding in Python, ``max((ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)``,
split as ``(t // 2, t - t // 2)``, then calls ``F.pad(x, (left, right, top, bottom), value=0)``
(always, even when every pad is 0). The stand-in computes the same integers as graph arithmetic
(``ceil(a / b) = -((-a) // b)``, ``max(t, 0) = (t + abs(t)) // 2``), so the traced graph holds
``F.pad`` and ``F.conv2d``, the two ops the real forward dispatches (``constant_pad_nd``, then
``convolution``), costed by the shape and conv plugins.

The class is recognised by its module and name, so that predicting a torchvision model never
imports timm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn import functional as F

from costmodel.hookspecs import hookimpl

CONV2D_SAME = ("timm.layers.conv2d_same", "Conv2dSame")


def same_padding(size: Any, kernel: int, stride: int, dilation: int) -> Any:
    """timm's ``get_same_padding`` on a traced size: the total padding of one spatial dimension."""
    total = (-((-size) // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size
    return (total + abs(total)) // 2


def conv2d_same_forward(module: nn.Conv2d) -> Callable[[Any], Any]:
    """``Conv2dSame.forward`` as traceable ops (module docstring)."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation

    def forward(x: Any) -> Any:
        pad_h = same_padding(x.size(-2), kh, sh, dh)
        pad_w = same_padding(x.size(-1), kw, sw, dw)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0)
        return F.conv2d(x, module.weight, module.bias, module.stride, (0, 0), module.dilation, module.groups)

    return forward


@hookimpl
def costmodel_module_forward(module: nn.Module) -> Callable[..., Any] | None:
    kind = type(module)
    if (kind.__module__, kind.__qualname__) == CONV2D_SAME:
        return conv2d_same_forward(module)
    return None
