"""SlimDiff: training-free, activation-guided slimming of diffusion models.

The compression core (``slimdiff_diffusers.core``) needs only torch; names that need diffusers are imported
lazily, so ``import slimdiff_diffusers.core`` works where diffusers is not installed (e.g. inside ComfyUI).
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

from .core import (
    BudgetError,
    Calibration,
    CalibrationConfig,
    CalibrationError,
    CalibrationMismatchError,
    Calibrator,
    IncompatibleAdapterError,
    NonFiniteActivationError,
    SlimConfig,
    SlimDiffError,
    SlimFileError,
    SlimReport,
    SlimSpec,
    UnsupportedModelError,
    UnsupportedProcessorError,
    apply_slim_spec,
    calibrate,
    find_sites,
    load_slim_file,
    save_slim_file,
)

__version__ = "0.1.0"

logging.getLogger("slimdiff").addHandler(logging.NullHandler())

_LAZY = {
    "slim": "slimdiff_diffusers.diffusers_adapter.slimming",
    "LowRankAttnProcessor": "slimdiff_diffusers.diffusers_adapter.attention_processor",
    "SlicedLowRankAttnProcessor": "slimdiff_diffusers.diffusers_adapter.attention_processor",
    "FusedLowRankAttnProcessor": "slimdiff_diffusers.diffusers_adapter.attention_processor",
    "SlimUNet2DConditionModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimUNet2DModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimFluxTransformer2DModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimChromaTransformer2DModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimDiTTransformer2DModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimSD3Transformer2DModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimPixArtTransformer2DModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimQwenImageTransformer2DModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimWanTransformer3DModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimLTXVideoTransformer3DModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimCogView4Transformer2DModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimHunyuanDiT2DModel": "slimdiff_diffusers.diffusers_adapter.models",
    "SlimDiffPipelineMixin": "slimdiff_diffusers.diffusers_adapter.pipeline",
    "enable_slimdiff": "slimdiff_diffusers.diffusers_adapter.pipeline",
    "PipelineSlimReport": "slimdiff_diffusers.diffusers_adapter.pipeline",
    "build_slimset": "slimdiff_diffusers.diffusers_adapter.slimset",
    "save_slim_unet_file": "slimdiff_diffusers.diffusers_adapter.single_file",
    "load_slim_unet_file": "slimdiff_diffusers.diffusers_adapter.single_file",
    "save_slim_model_file": "slimdiff_diffusers.diffusers_adapter.single_file",
    "load_slim_model_file": "slimdiff_diffusers.diffusers_adapter.single_file",
    "write_model_card": "slimdiff_diffusers.hub.card",
    "push_output_folder": "slimdiff_diffusers.hub.push",
    "OutputFolderError": "slimdiff_diffusers.core.errors",
    "LoraMappingError": "slimdiff_diffusers.core.errors",
    "UnsupportedArchitectureError": "slimdiff_diffusers.core.errors",
    "UnsupportedAttentionProcessorError": "slimdiff_diffusers.core.errors",
    "translate_lora_state_dict": "slimdiff_diffusers.diffusers_adapter.lora",
    "mark_slim_lora_file": "slimdiff_diffusers.diffusers_adapter.lora",
    "slim_lora_metadata": "slimdiff_diffusers.diffusers_adapter.lora",
    "SlimLoraMismatchError": "slimdiff_diffusers.core.errors",
}


# `DiffusionPipeline.from_pretrained` resolves a component declared as ["slimdiff_diffusers", "SlimUNet2D..."] by
# looking up its loadable base classes (ModelMixin, ...) on this package; expose the one our models derive from.
_LAZY["ModelMixin"] = "diffusers"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimdiff_diffusers' has no attribute {name!r}")


__all__ = [
    "BudgetError", "Calibration", "CalibrationConfig", "CalibrationError", "CalibrationMismatchError", "Calibrator",
    "IncompatibleAdapterError",     "NonFiniteActivationError", "SlimConfig", "SlimDiffError", "SlimFileError", "SlimReport", "SlimSpec",
    "UnsupportedModelError", "UnsupportedProcessorError", "apply_slim_spec", "calibrate", "find_sites",
    "load_slim_file", "save_slim_file", *_LAZY,
]
