"""The values that flow between the engine and its plugins.

Op plugins receive an :class:`OpNode` (one node of the traced graph, with shapes) and answer with an
:class:`OpCost`; optimizer plugins answer with an :class:`OptimizerCost`; method plugins with a
:class:`PreparedMethod`, and declare what they take as :class:`MethodOptions`; loss plugins
describe a training loss as a :class:`LossSpec`. Everything is plain
data: the engine turns it into FLOP totals and a memory timeline that mirrors what ``MemTracker``
would see at each op boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Flops:
    """FLOPs in both conventions: ``torch`` is what stock ``FlopCounterMode`` counts (grouped-conv
    weight gradients ``groups`` times too high, only matmul/conv/attention); ``exact`` is the
    project's own convention (docs/flop-convention.md)."""

    torch: int = 0
    exact: int = 0

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.torch + other.torch, self.exact + other.exact)

    def __mul__(self, times: int) -> "Flops":
        """The count of an op run ``times`` times (a micro-batch's, over the accumulated step)."""
        return Flops(self.torch * times, self.exact * times)

    @staticmethod
    def both(count: int) -> "Flops":
        """A count on which both conventions agree."""
        return Flops(count, count)


# Sizes for many ranks at once. When the engine predicts many ranks together
# (``costmodel.ranks``), it may ask a plugin once with every rank-dependent size a numpy integer
# array (one entry per rank). Arithmetic, ``math.prod`` and these helpers work on both; a plugin
# that branches on such a size (``if``, ``min``, ``max``, ``int()``) raises, and is then asked
# rank by rank. A plugin must not test a size's type.


def smaller(a: Any, b: Any) -> Any:
    """``min(a, b)`` of two sizes, without branching (element-wise for arrays)."""
    return (a + b - abs(a - b)) // 2


def differ(a: Any, b: Any) -> bool:
    """Whether two sizes differ (at any rank, for arrays)."""
    return bool(np.any(np.not_equal(a, b)))


def amount(count: Any) -> str:
    """A count for a note: ``1,234``, or ``rank-dependent`` for an array of counts."""
    return f"{count:,}" if isinstance(count, int) else "rank-dependent"


class _Sized:
    """Element count and bytes of anything with a ``shape`` and a ``dtype``."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class TensorMeta(_Sized):
    """A tensor as shape propagation saw it. ``storage`` identifies the storage it lives in:
    two metas with the same ``storage`` alias (views, in-place results). ``contiguous``: whether
    its layout is the row-major one (``Tensor.is_contiguous()``; a transpose is not), which
    decides whether some kernels copy their input first."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    storage: int
    storage_nbytes: int
    contiguous: bool = True


@dataclass(frozen=True)
class ParamMeta(_Sized):
    """A parameter or buffer of a module: its qualified name, shape, dtype and whether it trains."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    trainable: bool
    is_buffer: bool = False


@dataclass
class OpNode:
    """One node of the traced graph, as an op plugin sees it.

    ``kind`` is the torch.fx opcode (``call_module``, ``call_function``, ``call_method``);
    ``target`` is the called function, the method name, or for ``call_module`` the module's class.
    ``args``/``kwargs`` hold the node's arguments with every tensor replaced by its
    :class:`TensorMeta`; ``inputs`` lists those tensor arguments in order.
    ``needs_input_grad[i]`` says whether autograd must compute the gradient of ``inputs[i]``.
    ``params`` are the module's own parameters and buffers (``call_module`` only), keyed by their
    names relative to the module (``weight``, or ``base_layer.weight`` inside a wrapper); these
    keys are what ``OpCost.param_grads`` takes.
    """

    name: str
    kind: str
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    needs_input_grad: tuple[bool, ...]
    module: nn.Module | None = None
    params: dict[str, ParamMeta] = field(default_factory=dict)

    @property
    def records_autograd(self) -> bool:
        """Whether autograd records this op (some input or own parameter requires grad)."""
        return any(t.requires_grad for t in self.inputs) or any(
            p.trainable for p in self.params.values() if not p.is_buffer)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """A call argument given positionally at ``index`` or by keyword ``name``."""
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name, default)


def describe_op(op: OpNode) -> str:
    """A node's op as a user would name it: a module class, a function or a tensor method."""
    target = op.target
    if op.kind == "call_module":
        return f"{target.__module__}.{target.__qualname__}"
    if op.kind == "call_method":
        return f"Tensor.{target}"
    name = getattr(target, "__name__", None) or repr(target)
    module = getattr(target, "__module__", None)
    if module is None and "_VariableFunctions" in getattr(target, "__qualname__", ""):
        module = "torch"  # torch.flatten & co. are builtins of torch._C._VariableFunctions
    return f"{module}.{name}" if module and module != "builtins" else name


@dataclass(frozen=True)
class Alloc:
    """A storage an op allocates, in allocation order. ``nbytes`` is the storage size.

    ``lifetime`` says when it is freed:
    - ``"output"``: it is output ``index`` of the node; the engine frees it after its last use
      (or, if autograd saved it, after this node's backward);
    - ``"saved"``: kept by autograd for backward only (e.g. batch norm's saved mean and invstd,
      max-pool indices, a dropout mask, a clone of an in-place op's input); freed when this node's
      backward has run;
    - ``"transient"``: freed when the node finishes (visible to MemTracker only while it lives).

    The order matters beyond allocation: a ``"saved"`` storage listed before every ``"output"``
    one is made and saved before the op computes (a clone of an in-place op's input, dropout's
    mask), one listed after is among the op's results (batch norm's statistics, max-pool's
    indices). Activation checkpointing's recomputation stops at the last tensor saved
    (``costmodel.memory``): after the op, or before it.
    """

    nbytes: int
    lifetime: str
    index: int = 0


@dataclass(frozen=True)
class SavedRef:
    """Autograd keeps an existing tensor alive for backward: input ``index`` or output ``index``."""

    of: str  # "input" or "output"
    index: int


@dataclass
class OpCost:
    """What one node costs, in the forward pass and (when autograd records it) in backward.

    Forward memory: ``forward_allocs`` in order (outputs that alias an input, such as views and
    in-place results, allocate nothing and are not listed); ``saved`` names the inputs/outputs
    autograd keeps until backward.
    Backward memory: ``input_grads[i]`` is the number of bytes newly allocated for the gradient of
    ``inputs[i]`` (0 when it aliases the incoming gradient, None when not computed);
    ``param_grads`` maps each of the node's own trainable parameters that gets a gradient to the
    gradient's bytes, keyed by its key in ``OpNode.params`` - the name relative to the node's
    module (``weight``, ``bias``, ``base_layer.weight``), not the qualified
    ``ParamMeta.name``; the engine looks each key up in ``OpNode.params`` to find the parameter.
    ``backward_allocs`` are transients freed when the node's backward finishes, in order, before
    the gradients. ``late_param_grads`` names keys of ``param_grads`` whose gradient autograd makes
    only after the node's saved tensors are released: a gradient its engine reduces to the
    parameter's shape (``sum_to_size`` in ``validate_outputs``), such as ``addmm``'s broadcast bias;
    the rest are made by the node's kernels while the saved tensors are alive.
    """

    forward: Flops
    backward: Flops = Flops()
    forward_allocs: tuple[Alloc, ...] = ()
    saved: tuple[SavedRef, ...] = ()
    input_grads: tuple[int | None, ...] = ()
    param_grads: dict[str, int] = field(default_factory=dict)
    backward_allocs: tuple[Alloc, ...] = ()
    late_param_grads: tuple[str, ...] = ()
    # For input ``i``, the tensors autograd makes one after another for its gradient, when it is
    # not made in one go by the node's apply: first what the apply returns (0: the incoming
    # gradient itself), then each step autograd's engine takes on it after the apply
    # (``validate_outputs``, input by input in order: ``sum_to_size`` to the input's shape, a cast
    # to its dtype), each freeing the one before; the last is ``input_grads[i]``.
    input_grad_steps: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # Tensors the op's autograd node keeps as plain attributes rather than saved tensors (a custom
    # ``autograd.Function`` writing ``ctx.A = A``): alive from the forward on, inside a checkpointed
    # region too (checkpointing replaces saved tensors only), and not released by the backward
    # (which frees saved tensors only): the node lives as long as the step's graph, which the
    # loss holds (every node is reachable from its ``grad_fn``), so they die with the loss.
    kept_by_node: tuple[SavedRef, ...] = ()
    # Why: a short human-readable derivation, shown in per-node breakdowns.
    note: str = ""


@dataclass
class ParamGroup:
    """Parameters that one optimizer rule updates, with that rule's name and options
    (``optimizer="adamw"``, ``options={"lr": 1e-3, ...}``, or a method's own optimizer).

    A method plugin lists every parameter it trains; the optimizer plugin is given only those that
    receive a gradient in the step (torch's optimizers skip a parameter whose ``.grad`` is None:
    no state, no FLOPs), and no group left empty."""

    optimizer: str
    params: list[ParamMeta]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemEvent:
    """One step of an optimizer's memory timeline: ``nbytes`` allocated (positive) or freed
    (negative) into ``group`` ("OPT" for state and step temporaries, "GRAD" for gradients)."""

    nbytes: int
    group: str = "OPT"
    label: str = ""


@dataclass
class OptimizerCost:
    """An optimizer step over one parameter group at a given step number.

    ``state_bytes`` is the persistent state that exists after the step (created on the first
    step); ``events`` is the step's memory timeline in order (state creation on the first step,
    temporaries allocated and freed); ``flops`` the step's arithmetic. ``resident_bytes`` is what
    the optimizer holds from its construction on, before any step (OPT from the start of every
    step, step 1 included: bitsandbytes' quantisation maps), not part of ``state_bytes``.
    """

    flops: Flops
    state_bytes: int
    events: list[MemEvent] = field(default_factory=list)
    note: str = ""
    resident_bytes: int = 0


@dataclass
class PreparedMethod:
    """What a method plugin did to the (meta-device) model: the parameter groups the optimizer
    sees, and the module types the tracer must keep as leaves (costed by op plugins)."""

    param_groups: list[ParamGroup]
    leaf_modules: tuple[type[nn.Module], ...] = ()
    note: str = ""
    # The method's promise that lets the engine predict many ranks from one trace
    # (``costmodel.ranks``): preparing the model at any other rank >= 1 succeeds and changes only
    # integer sizes - parameter dimensions, integer attributes of modules the tracer keeps whole,
    # integer optimizer options - each an affine function of the rank. The engine checks it at
    # three ranks and predicts rank by rank wherever it does not hold.
    affine_in_rank: bool = False
    # Whether the method stored its frozen base quantized as ``StepConfig.quantize`` asks; the
    # engine refuses a quantized step whose method did not (it would be predicted unquantized).
    quantized: bool = False


# The kinds of value a method option can declare (``OptionSpec.kind``). ``costmodel.options`` checks
# and coerces each before the method plugin runs; "int" means 1 <= n <= costmodel.config.MAX_INT.
OPTION_KINDS: dict[str, str] = {
    "bool": "true or false (also yes/no, 1/0, any case)",
    "int": "an integer >= 1",
    "float": "a finite number > 0",
    "regex": "a regular expression",
    "names": "a list of names",
    "regex_or_names": "a regular expression or a list of names",
    "int_pattern": "a mapping of regular expressions to integers >= 1",
    "float_pattern": "a mapping of regular expressions to finite numbers > 0",
}


@dataclass(frozen=True)
class OptionSpec:
    """One option a method takes (``StepConfig.options[key]``, the CLI's ``--option KEY=VALUE``):
    the kind of its value (a key of :data:`OPTION_KINDS`) and a one-line description.

    The engine coerces a given value to its kind before the plugin sees it - a ``"bool"`` arrives
    as ``True``/``False`` even when typed ``--option adapt_head=no``, an ``"int"`` as an ``int``, a
    ``"float"`` as a ``float``, a ``"regex"`` as the (compilable) string, ``"names"`` as a list of
    strings, a pattern as a ``dict`` - and refuses anything else, so a plugin reads ready values.

    ``default``: the value the method uses when the option is not given (None: no default, the
    option is simply absent - e.g. LoRA's ``alpha``, which then equals the rank). The engine fills
    the defaults into the ``config.options`` a method plugin receives, so a plugin reads
    ``config.options[key]`` for an option with a default; the user's configuration is left as
    given (a default given explicitly or left out prices the same step).
    """

    kind: str
    help: str = ""
    default: Any = None

    def __post_init__(self) -> None:
        # A misspelt kind is the plugin author's mistake: say so when the plugin is imported.
        if self.kind not in OPTION_KINDS:
            raise ValueError(f"OptionSpec kind must be one of {', '.join(OPTION_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class MethodOptions:
    """What a fine-tuning method takes besides the model (the ``costmodel_method_options`` answer).

    ``takes_rank``: whether the method reads ``StepConfig.rank`` at all (an adapter or projection
    rank); the CLI refuses ``--rank`` for a method that does not, and a prediction's method note
    says the rank is unused. ``options``: every key the method accepts in ``StepConfig.options``
    with its spec; any other key is refused, naming it and listing these. A method's own
    hyper-parameters are options too (LoRA's ``alpha``, GaLore's ``update_proj_gap`` and
    ``scale``): ``StepConfig`` holds only what every method has; the CLI's ``--alpha`` and
    ``--galore-update-proj-gap`` are shorthands for ``--option alpha=...`` and
    ``--option update_proj_gap=...``, refused for a method that does not declare the option.
    """

    takes_rank: bool
    options: Mapping[str, OptionSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """A training loss, by name (the ``costmodel_loss`` answer; ``StepConfig.loss``).

    ``criterion``: builds the loss module, with no arguments (``nn.MSELoss``); the step is
    ``criterion()(model(images), target)`` (``costmodel.models.TrainingStep``), and op plugins cost
    the criterion's node like any other. ``target_shape(batch, classes)``: the target's shape, from
    the batch size and the number of classes - ``(batch,)`` for class indices, ``(batch, classes)``
    for a target shaped like a classifier's logits. ``batch`` may be a symbolic size (a ``SymInt``:
    ``costmodel.shapes`` propagates one template for many batch sizes), so build the shape from it
    with plain arithmetic, never branch on it. ``target_dtype``: the target's dtype.
    """

    criterion: Callable[[], nn.Module]
    target_shape: Callable[[Any, int], tuple[Any, ...]]
    target_dtype: torch.dtype

    def target(self, batch: Any, classes: int, device: str | torch.device = "meta",
               floating: torch.dtype | None = None) -> torch.Tensor:
        """An uninitialised target for ``batch`` samples of ``classes`` classes (a meta-device
        placeholder unless ``device`` says otherwise); a floating target in ``floating`` where
        given (the step's precision, ``StepConfig.dtype``)."""
        dtype = floating if floating is not None and self.target_dtype.is_floating_point else self.target_dtype
        return torch.empty(tuple(self.target_shape(batch, classes)), dtype=dtype, device=device)
