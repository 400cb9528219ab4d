"""slim(): plan and apply in one call, on a copy of the model (or in place when asked)."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from .apply import apply_plan
from .calibration import Calibration
from .config import SlimConfig
from .plan import SlimPlan, plan_slim
from .rewrite import get_module
from .sites import AttentionSite


@torch.no_grad()
def slim(model: nn.Module, calibration: Calibration, config: SlimConfig | None = None, *,
         inplace: bool = False, strict_weights: bool = True, decomposition_cache: dict | None = None,
         **overrides: Any) -> nn.Module:
    """Return a slimmed copy of ``model`` (or slim it in place with ``inplace=True``).

    ``plan_slim`` followed by ``apply_plan``: the plan is made on ``model`` (which it never modifies), then
    applied to a copy (:func:`copy_for_narrowing`: the layers being narrowed are not copied first), or to
    ``model`` itself with ``inplace=True`` (all or nothing: a failure restores the original layers).

    Args:
        model: the model the calibration was computed on.
        calibration: from :func:`calibrate`; checked against ``model`` first.
        config: a :class:`SlimConfig`; keyword ``overrides`` (e.g. ``keep_ratio=0.6``) replace its fields.
        inplace: modify ``model`` itself instead of a deep copy.
        strict_weights: refuse a calibration computed on different weights of the same architecture.
        decomposition_cache: a dict you own; decompositions are stored in it and reused by later calls with
            the same model, calibration and decomposition settings, so slimming at several budgets decomposes
            once (drop it to free the factors).

    Returns:
        The slimmed model, with ``.slimdiff_spec`` (:class:`SlimSpec`) and ``.slimdiff_report`` (:class:`SlimReport`).
    """
    plan = plan_slim(model, calibration, config, strict_weights=strict_weights,
                     decomposition_cache=decomposition_cache, **overrides)
    if inplace:
        return apply_plan(model, plan, check=False)
    target, shared = copy_for_narrowing(model, plan)
    slimmed = apply_plan(target, plan)
    unshare(slimmed, shared)
    return slimmed


def copy_for_narrowing(model: nn.Module, plan: SlimPlan) -> tuple[nn.Module, dict[int, nn.Parameter]]:
    """A deep copy of ``model`` that does not copy the weights :func:`apply_plan` is about to replace.

    In the copy, the layers the plan narrows share the original's parameters (``apply_plan`` reads them and
    swaps in new narrow layers; it never writes to them); everything else is copied. Slimming a copy then peaks
    at the model plus its slim version rather than at two models plus the narrow layers: attentions and
    feed-forwards are most of a denoiser's parameters (85% of SDXL's UNet). Returns the copy and the shared
    parameters by id, for :func:`unshare`.
    """
    paths: set[str] = set()
    for group in plan.groups:
        site = group.site
        paths.update([*site.input_paths, *site.output_paths] if isinstance(site, AttentionSite) else
                     (site.up, site.down))
    shared = {id(p): p for path in sorted(paths) for p in get_module(model, path).parameters(recurse=False)}
    return copy.deepcopy(model, memo=dict(shared)), shared  # memo: "already copied, as itself"


def unshare(model: nn.Module, shared: dict[int, nn.Parameter]) -> None:
    """Copy any parameter of ``model`` still shared with the original (a layer the rewrite kept), so that the
    slim copy never shares storage with the model it was made from. A parameter tied between several modules
    stays tied (one copy)."""
    copies: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and shared.get(id(param)) is param:
                if id(param) not in copies:
                    copies[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                module._parameters[name] = copies[id(param)]
