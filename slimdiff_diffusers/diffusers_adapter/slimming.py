"""``slim()`` for diffusers models: the core slim plus attention processors and the Slim* model classes."""
from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from ..core import slim as core_slim
from ..core.calibration import Calibration
from ..core.config import SlimConfig
from .attention_processor import check_processors, install_processors
from .models import as_slim_class


def slim(model: nn.Module, calibration: Calibration, config: SlimConfig | None = None, *, inplace: bool = False,
         strict_weights: bool = True, decomposition_cache: dict | None = None, **overrides: Any) -> nn.Module:
    """Slim a diffusers denoiser (``UNet2DConditionModel``, ``UNet2DModel``, ...) with a calibration.

    Like :func:`slimdiff_diffusers.core.slim`, and in addition: refuses custom attention processors that would
    compute the wrong thing on narrowed projections (before touching anything), puts a
    :class:`~slimdiff_diffusers.LowRankAttnProcessor` on slimmed attention modules whose processor was a stock
    one, and returns a ``SlimUNet2DConditionModel``/``SlimUNet2DModel`` that ``save_pretrained``/``from_pretrained``
    round-trip. Keyword ``overrides`` set :class:`SlimConfig` fields (e.g. ``keep_ratio=0.6``); pass a dict as
    ``decomposition_cache`` to decompose once when slimming at several budgets.
    """
    import dataclasses

    cfg = dataclasses.replace(config, **overrides) if config is not None else SlimConfig(**overrides)
    calibration.check_compatible(model, strict_weights=strict_weights)  # before anything else looks at the model
    attention = [s for s in calibration.sites.attention
                 if not any(p == s.name or re.fullmatch(p, s.name) for p in cfg.exclude)]
    decisions: dict[str, str] = {}
    if cfg.head_layout == "separate":
        decisions = check_processors(model, [s.name for s in attention], {s.name: s.is_cross for s in attention})
    slimmed = core_slim(model, calibration, cfg, inplace=inplace, strict_weights=strict_weights,
                        decomposition_cache=decomposition_cache)
    install_processors(slimmed, {p: d for p, d in decisions.items() if p in slimmed.slimdiff_spec.attention})
    return as_slim_class(slimmed, slimmed.slimdiff_spec)
