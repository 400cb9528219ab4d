"""slim(): plan and apply in one call, on a copy of the model (or in place when asked)."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from .apply import apply_plan
from .calibration import Calibration
from .config import SlimConfig
from .plan import plan_slim


@torch.no_grad()
def slim(model: nn.Module, calibration: Calibration, config: SlimConfig | None = None, *,
         inplace: bool = False, strict_weights: bool = True, decomposition_cache: dict | None = None,
         **overrides: Any) -> nn.Module:
    """Return a slimmed copy of ``model`` (or slim it in place with ``inplace=True``).

    ``plan_slim`` followed by ``apply_plan``: the plan is made on ``model`` (which it never modifies), then
    applied to a deep copy, or to ``model`` itself with ``inplace=True`` (all or nothing: a failure restores
    the original layers).

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
    target = model if inplace else copy.deepcopy(model)
    return apply_plan(target, plan, check=not inplace)
