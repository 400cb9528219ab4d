"""The core verbs for diffusers models: plan, then apply with attention processors and the Slim* classes.

``apply_slim_plan`` narrows the layers (core ``apply_plan``), puts a :class:`LowRankAttnProcessor` on slimmed
attention modules whose processor was a stock one, and turns the model into its ``SlimUNet2DConditionModel`` /
``SlimUNet2DModel`` class, all in one transaction: on failure the model is restored whole.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..core.apply import apply_plan
from ..core.basis_maps import basis_maps_from_plan
from ..core.calibration import Calibration
from ..core.config import SlimConfig
from ..core.plan import SlimPlan, plan_slim
from ..core.slim import copy_for_narrowing, unshare
from ..core.errors import ConfigError
from ..core.sites import Sites, check_supported, find_sites
from .attention_processor import check_processors, install_processors
from .models import as_slim_class


def check_slimmable(model: nn.Module, config: SlimConfig, sites: Sites | None = None) -> dict[str, str]:
    """Everything that can be checked before calibrating: patterns match groups, processors can be slimmed.

    Returns the processor decisions (``{attention path: "replace" | "keep"}``) for :func:`apply_slim_plan`.
    Raises :class:`ConfigError` / :class:`UnsupportedProcessorError` with the reason.
    """
    sites = sites if sites is not None else find_sites(model)
    check_supported(sites, type(model).__name__)
    config.check_patterns([s.name for s in [*sites.attention, *sites.feed_forward]],
                          [f"{s.name}:{k}" for s in sites.attention for k in ("qk", "vo")] +
                          [f"{s.name}:ffn" for s in sites.feed_forward])
    if config.head_layout != "separate":
        kinds = sorted({s.kind for s in sites.attention if s.kind != "plain" and not config.excludes_site(s)})
        if kinds:
            raise ConfigError(f"head_layout='uniform' is for plain attention; this model has {' and '.join(kinds)} "
                              "attention: use head_layout='separate' (the default)")
        return {}
    attention = [s for s in sites.attention if not config.excludes_site(s)]
    return check_processors(model, [s.name for s in attention], {s.name: s.is_cross for s in attention},
                            {s.name: s.kind for s in attention})


def apply_slim_plan(model: nn.Module, plan: SlimPlan, decisions: dict[str, str] | None = None, *,
                    check: bool = True) -> nn.Module:
    """Narrow a diffusers model in place to ``plan`` (all or nothing) and give it its Slim* class.

    The model keeps the plan's basis maps as ``slimdiff_basis_maps`` (CPU) when the plan recorded them
    (``plan_slim(..., basis_maps=True)``): LoRAs made for the original model are translated through them
    (:mod:`.lora`), and ``save_pretrained`` writes them beside the weights.

    Args:
        decisions: from :func:`check_slimmable` (computed here when not given).
        check: verify that ``model`` is the model the plan was made for.
    """
    if decisions is None:
        decisions = check_slimmable(model, plan.config, find_sites(model))
    dtype = next(model.parameters()).dtype
    maps = basis_maps_from_plan(plan, dtype)

    def finish(slimmed: nn.Module, undo) -> None:
        undo.attributes(slimmed, ("slimdiff_basis_maps",))
        slimmed.slimdiff_basis_maps = maps
        for path in decisions:
            undo.attributes(slimmed.get_submodule(path), ("processor",))
        install_processors(slimmed, {p: d for p, d in decisions.items() if p in plan.spec.attention})
        for path in plan.spec.attention:  # as_slim_class guards each slimmed attention (a class of its own)
            undo.object_class(slimmed.get_submodule(path))
        undo.object_class(slimmed)
        undo.attributes(slimmed, ("_internal_dict",))
        as_slim_class(slimmed, plan.spec)

    return apply_plan(model, plan, finish=finish, check=check)


def slim(model: nn.Module, calibration: Calibration, config: SlimConfig | None = None, *, inplace: bool = False,
         strict_weights: bool = True, decomposition_cache: dict | None = None, lora_maps: bool = True,
         **overrides: Any) -> nn.Module:
    """Slim a diffusers denoiser (``UNet2DConditionModel``, ``UNet2DModel``, ...) with a calibration.

    Like :func:`slimdiff_diffusers.core.slim`, and in addition: refuses custom attention processors that would
    compute the wrong thing on narrowed projections (before any decomposition), puts a
    :class:`~slimdiff_diffusers.LowRankAttnProcessor` on slimmed attention modules whose processor was a stock
    one, and returns a ``SlimUNet2DConditionModel``/``SlimUNet2DModel`` that ``save_pretrained``/``from_pretrained``
    round-trip. Keyword ``overrides`` set :class:`SlimConfig` fields (e.g. ``keep_ratio=0.6``); pass a dict as
    ``decomposition_cache`` to decompose once when slimming at several budgets. ``inplace=True`` narrows
    ``model`` itself (restored whole if anything fails). ``lora_maps=False`` skips the basis maps that let the
    slim model take LoRAs made for the original (one m×k matrix per narrowed feed-forward; see :mod:`.lora`).
    """
    config = SlimConfig.resolve(config, **overrides)
    decisions = check_slimmable(model, config)
    plan = plan_slim(model, calibration, config, strict_weights=strict_weights, decomposition_cache=decomposition_cache,
                     basis_maps=lora_maps)
    if inplace:
        return apply_slim_plan(model, plan, decisions, check=False)
    target, shared = copy_for_narrowing(model, plan)  # the layers being narrowed are not copied first
    slimmed = apply_slim_plan(target, plan, decisions)
    unshare(slimmed, shared)
    return slimmed
