"""GaLore as the runtime reference applies galore-torch 1.0: which parameters are projected.

Nothing in the model changes: every parameter trains, the backward is the full backward (each
weight gradient is computed in full; only the optimizer projects it). ``galore_torch.GaLoreAdamW``
gets the weights of every ``nn.Conv2d`` (grouped and depthwise ones too) and ``nn.Linear`` outside
the head in its low-rank group (rank ``r``, ``update_proj_gap = T``, ``scale``,
``proj_type="std"``) and every other parameter (biases, batch-norm affine parameters, the head)
in a plain group. A 4-D convolution gradient is projected as the matrix
``(C_out, C_in/groups * kh * kw)`` (galore-torch 1.0 itself fails on 4-D tensors).

The plugin returns one :class:`ParamGroup` for the whole optimizer, ``optimizer="galore_adamw"``,
listing every parameter in the order ``optimizer.step()`` visits them - the plain group first, as
the reference builds it, then the low-rank group - with the low-rank ones and their projection
settings in ``options["low_rank"]``: GaLoreAdamW's step keeps its temporaries in Python locals
that live on from one parameter to the next, across its parameter groups, so only the whole step
can be costed to the byte (see ``galore_adamw``).

Options: ``update_proj_gap`` (T, default 200; the CLI's ``--galore-update-proj-gap``) and
``scale`` (default 0.25), then those of ``method_targets`` except ``include_grouped`` (every
convolution is projected anyway) and ``alpha_pattern``; ``rank_pattern`` gives a layer its own
projection rank.
"""

from __future__ import annotations

from torch import nn

from costmodel.config import StepConfig
from costmodel.costs import MethodOptions, OptionSpec, ParamGroup, ParamMeta, PreparedMethod
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl
from costmodel.plugins.method_targets import KNOWN_OPTIONS, TARGET_OPTIONS, select_targets

METHOD = "galore"
GALORE_OPTIONS = KNOWN_OPTIONS - {"include_grouped", "alpha_pattern"}
# The reference configuration's T and scale (the GaLore paper's).
UPDATE_PROJ_GAP = 200
SCALE = 0.25
ARGUMENTS = MethodOptions(takes_rank=True, options={
    "update_proj_gap": OptionSpec("int", "T: the projector is refreshed (an SVD) on step k when (k - 1) % T == 0 "
                                         f"(the CLI's --galore-update-proj-gap; default {UPDATE_PROJ_GAP})",
                                  default=UPDATE_PROJ_GAP),
    "scale": OptionSpec("float", f"the factor of the projected-back update (default {SCALE})", default=SCALE),
    **{key: spec for key, spec in TARGET_OPTIONS.items() if key in GALORE_OPTIONS},
    "rank_pattern": OptionSpec("int_pattern", "per-layer projection rank: {layer-name regex: rank}, the first "
                                              "matching key wins"),
})


def low_rank_settings(config: StepConfig, rank: int) -> dict[str, object]:
    """The low-rank group's settings, as the runtime reference passes them to GaLoreAdamW
    (T and the scale: ``config.options``, else the declared defaults)."""
    return {"rank": rank, "update_proj_gap": galore_option(config, "update_proj_gap"),
            "scale": galore_option(config, "scale"), "proj_type": "std"}


def galore_option(config: StepConfig, key: str) -> object:
    """Option ``key`` of ``config`` or its declared default (the engine fills the defaults in; a
    caller of :func:`galore_param_group` on a bare config gets them here)."""
    return config.options.get(key, ARGUMENTS.options[key].default)


def galore_param_group(model: nn.Module, config: StepConfig) -> ParamGroup:
    """Unfreeze ``model`` and describe GaLoreAdamW over it as one ordered ParamGroup."""
    targets = select_targets(model, config.rank, float(config.rank), config.options, grouped="all")
    low_rank = {f"{t.name}.weight": low_rank_settings(config, t.rank) for t in targets}
    for param in model.parameters():
        param.requires_grad_(True)
    metas = [ParamMeta(name, tuple(p.shape), p.dtype, True) for name, p in model.named_parameters()]
    projected = [m for m in metas if m.name in low_rank]
    plain = [m for m in metas if m.name not in low_rank]
    return ParamGroup("galore_adamw", plain + projected, {"lr": config.lr, "low_rank": low_rank})


@hookimpl
def costmodel_method_names() -> list[str]:
    return [METHOD]


@hookimpl
def costmodel_method_options(name: str) -> MethodOptions | None:
    return ARGUMENTS if name == METHOD else None


# The optimizer name StepConfig carries by default: GaLoreAdamW is an AdamW, so it is no conflict.
DEFAULT_OPTIMIZER = StepConfig().optimizer


def refuse_other_optimizer(config: StepConfig) -> None:
    """GaLore's projection lives in its optimizer: galore-torch's GaLoreAdamW projects each
    gradient, keeps its Adam moments in the low-rank space and projects the update back. Another
    optimizer (``--optimizer sgd``) would be no GaLore at all, and GaLoreAdamW's own keywords
    (weight decay, betas) are not modelled: both are refused, in one line."""
    if config.optimizer != DEFAULT_OPTIMIZER:
        raise CostModelError(f"--optimizer {config.optimizer}: method galore trains with its own optimizer "
                             f"(galore-torch's GaLoreAdamW, which projects the gradients); drop --optimizer")
    if config.optimizer_options:
        raise CostModelError(f"--optimizer-option {next(iter(config.optimizer_options))}: method galore's "
                             f"GaLoreAdamW is modelled with its defaults only")


@hookimpl
def costmodel_prepare_method(name: str, model: nn.Module, config: StepConfig) -> PreparedMethod | None:
    if name != METHOD:
        return None
    refuse_other_optimizer(config)
    group = galore_param_group(model, config)
    return PreparedMethod(
        param_groups=[group],
        note=f"galore: {len(group.options['low_rank'])} projected weights at rank {config.rank}, "
             f"T={galore_option(config, 'update_proj_gap')}; every parameter trains",
        affine_in_rank=True)  # the rank is only the low-rank group's projection rank
