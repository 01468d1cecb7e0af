"""Memory of one training step per MemTracker group: each group's own maximum, and the true peak.

:class:`GroupPeakMemTracker` is ``torch.distributed._tools.mem_tracker.MemTracker`` with two
changes: it works on models with frozen parameters, and it records every group's own maximum over
the tracked region besides the simultaneous peak. What it counts, precisely (the analytic engine
reproduces these rules):

Unit of account
    A *storage*: ``untyped_storage().nbytes()`` on CPU (exact bytes, no allocator rounding), counted
    once however many tensors view it. Each storage has one category at a time.

Categories (MemTracker's rules, unchanged)
    - PARAM: storages of module parameters; BUFFER: of module buffers (BatchNorm's running_mean,
      running_var, and ``num_batches_tracked``, an int64 scalar: 8 bytes).
    - GRAD: ``param.grad``. A gradient is first created by an op during backward (TEMP) and moves to
      GRAD in the parameter's grad hook / post-accumulate-grad hook; gradients that exist before the
      step (from step k-1) are GRAD from the start, until ``zero_grad(set_to_none=True)`` frees them.
    - OPT: every op output created inside ``optimizer.step()`` (moments, step counters, and also the
      step's temporaries: ``denom``, GaLore's projected gradients, SVD factors...), plus the tensors
      held in the optimizer's state. We also walk one level into non-tensor state values, so the
      tensors held by GaLore's projector (``ortho_matrix``) count as OPT; stock MemTracker cannot see
      them on a step that does not refresh the projector.
    - TEMP: every other op output created during backward (gradients of activations, the gradient of
      the loss, intermediate results of backward formulas).
    - ACT: every other op output created outside backward and outside the optimizer: forward
      activations, tensors saved for backward, the loss.
    - OTH: tensors passed to ``track_external`` that are none of the above: the input images and the
      labels.
    An op's output that aliases an already-tracked storage (views, in-place ops) keeps its category.

When it is counted
    Outputs are categorised and added right after their op returns; a storage leaves when it is
    freed (weakref callback). Group maxima and the peak are sampled after every op dispatched inside
    the tracker (op-boundary snapshots) and once at entry. Hence:
    - memory allocated and freed within one op (a kernel's internal workspace) is never seen;
    - an op's output is added before its inputs can be freed by the caller, so "x -> y, free x"
      counts x and y together.
    - a group's maximum is taken whenever it occurs (``memory[group]``); ``peak`` is the largest
      simultaneous total; ``sum_of_group_peaks`` the sum of the group maxima (>= peak);
    - a tensor lives as long as Python or autograd holds it, not as long as it is needed. Example,
      AdamW's single-tensor loop: ``denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)`` keeps the
      previous parameter's ``denom`` alive until the name is rebound, so at the boundary of the div
      for parameter i the OPT group holds both moments of every parameter, the step counters (4 B
      each), ``denom`` of parameter i-1, and ``sqrt`` and its quotient for parameter i:
      OPT max = 8 * trainable + 4 * tensors + max_i(bytes_{i-1} + 2 * bytes_i) in parameter order,
      bytes_{-1} = 0 (matches the measured fft steps of mobilenet_v2, mobilenet_v3_small, resnet18);
    - a parameter's new gradient is an op output during backward, so it is TEMP at that op's
      boundary and becomes GRAD only in the hooks that follow: TEMP's maximum includes it.

What it cannot see
    Tensors created outside the tracker and not reachable from ``track_external`` (module, optimizer
    state, inputs); storage inside C++ objects (autograd's saved ``SavedVariable`` that is not a
    dispatched output, allocator caches); the Python/framework overhead; memory internal to one op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn, optim
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _TOTAL_KEY

from costmodel.result import MEMORY_GROUPS

# MemTracker's categories under the names the result schema uses.
GROUP_NAMES: dict[_MemRefType, str] = {
    _MemRefType.PARAM: "PARAM",
    _MemRefType.BUFFER: "BUFFER",
    _MemRefType.GRAD: "GRAD",
    _MemRefType.ACT: "ACT",
    _MemRefType.TEMP: "TEMP",
    _MemRefType.OPT: "OPT",
    _MemRefType.OTH: "OTH",
}
assert tuple(GROUP_NAMES.values()) == MEMORY_GROUPS


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """Tensors of a state value: the value itself, or one level into an object, list or tuple."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [item for item in value if isinstance(item, torch.Tensor)]
    found: list[torch.Tensor] = []
    for attribute in getattr(value, "__dict__", {}).values():
        if isinstance(attribute, torch.Tensor):
            found.append(attribute)
        elif isinstance(attribute, (list, tuple)):
            found.extend(item for item in attribute if isinstance(item, torch.Tensor))
    return found


def quantization_state(module: nn.Module) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside a quantized layer's parameter, not as module buffers:
    a 4-bit weight's ``quant_state`` (its blocks' maxima, their offset and codes, and the nested
    ``state2``), an int8 weight's per-row scales ``SCB`` (on the parameter until the first
    forward, then in the layer's ``state``). Counted as BUFFER."""
    found: list[torch.Tensor] = []
    for parameter in module.parameters():
        state = getattr(parameter, "quant_state", None)
        for holder in (state, getattr(state, "state2", None)):
            if holder is not None:
                found += [value for value in vars(holder).values() if isinstance(value, torch.Tensor)]
        found.append(getattr(parameter, "SCB", None))
    found += [getattr(getattr(layer, "state", None), "SCB", None) for layer in module.modules()]
    return [tensor for tensor in found if isinstance(tensor, torch.Tensor)]


class GroupPeakMemTracker(MemTracker):
    """MemTracker that handles frozen parameters and records each group's maximum.

    After the tracked region: ``group_peaks`` (bytes per group name) and ``peak`` (the largest
    simultaneous total).
    """

    def __init__(self) -> None:
        super().__init__()
        self.group_peaks: dict[str, int] = dict.fromkeys(MEMORY_GROUPS, 0)
        self.peak = 0

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        # Stock MemTracker registers a grad hook on every parameter, which raises on frozen ones;
        # only parameters that can receive a gradient get hooks here.
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for tensor in quantization_state(module):  # model state beside the packed weights
            self._update_and_maybe_create_winfos(tensor, _MemRefType.BUFFER)
        if install_grad_hooks:
            for parameter in module.parameters():
                if parameter.requires_grad and self._param_to_grad_hook_handles.get(parameter) is None:
                    self._param_to_grad_hook_handles[parameter] = (
                        parameter.register_hook(self._grad_hook),
                        parameter.register_post_accumulate_grad_hook(lambda p: self._grad_hook(p.grad)),
                    )
        return memory

    def _grad_hook(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _track_optimizer_states(self, reftype: Any, optimizer: optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                for tensor in _tensors_in(value):
                    self._update_and_maybe_create_winfos(tensor, reftype)
        # Tensors the optimizer holds outside its state, from its construction on (bitsandbytes'
        # quantisation maps, ``name2qmap``), are its memory too, on step 1 as well.
        for name, value in vars(optimizer).items():
            if name in ("state", "param_groups"):
                continue
            for item in value.values() if isinstance(value, dict) else [value]:
                for tensor in _tensors_in(item) if isinstance(item, (torch.Tensor, list, tuple)) else []:
                    self._update_and_maybe_create_winfos(tensor, reftype)

    def _update_peak_stats(self, peak_state: Any) -> None:
        # Replaces the stock per-module peak snapshots (a walk over every tracked module per op,
        # most of the tracker's run time) by the per-group maxima and the simultaneous peak.
        self._sample()

    def _sample(self) -> None:
        current = dict.fromkeys(MEMORY_GROUPS, 0)
        total = 0
        for device_snapshot in self._curr_mem_snap.values():
            for reftype, name in GROUP_NAMES.items():
                current[name] += device_snapshot.get(reftype, 0)
            total += device_snapshot.get(_TOTAL_KEY, 0)
        for name, value in current.items():
            self.group_peaks[name] = max(self.group_peaks[name], value)
        self.peak = max(self.peak, total)

    def __enter__(self) -> "GroupPeakMemTracker":
        super().__enter__()
        self._sample()  # what exists before the first op (parameters, state, inputs) counts too
        return self

    def memory(self) -> dict[str, int]:
        """The result schema's memory fields: each group's maximum, peak, sum_of_group_peaks."""
        return {**self.group_peaks, "peak": self.peak, "sum_of_group_peaks": sum(self.group_peaks.values())}
