"""Exceptions raised by SlimDiff. Each message says what went wrong and what the user can do."""
from __future__ import annotations


class SlimDiffError(Exception):
    """Base class of every SlimDiff error."""


class UnsupportedModelError(SlimDiffError, ValueError):
    """The model has nothing SlimDiff can decompose, or a part that cannot be slimmed safely."""


class UnsupportedProcessorError(SlimDiffError, ValueError):
    """An attention processor that does not work with narrowed q/k/v projections."""


class IncompatibleAdapterError(UnsupportedProcessorError):
    """An adapter (IP-Adapter, Custom Diffusion) trained on the original projections of a slimmed module."""


class CalibrationError(SlimDiffError, RuntimeError):
    """Calibration could not collect valid statistics."""


class NonFiniteActivationError(CalibrationError):
    """A hooked activation contained NaN or inf."""


class CalibrationMismatchError(SlimDiffError, ValueError):
    """A calibration does not belong to the model it is applied to."""


class BudgetError(SlimDiffError, ValueError):
    """A budget (keep ratio, parameters to remove, ranks) is out of range or cannot be met."""


class SlimFileError(SlimDiffError, ValueError):
    """A file is not a valid SlimDiff file (corrupt, foreign, or of an unknown format version)."""


class ConfigError(SlimDiffError, ValueError):
    """A setting is invalid: an out-of-range option, a malformed pattern, or a pattern that matches nothing."""


class OutputFolderError(SlimDiffError, ValueError):
    """A folder given as SlimDiff output (e.g. to ``slimdiff push``) is not one, or is incomplete."""


# File-content errors (issue 15): raised by the validation at each file boundary, before anything is allocated.


class SlimSpecError(SlimFileError):
    """A slim spec (widths per module, in a slim file or a ``config.json``) is malformed or does not fit the model."""


class SlimWeightsError(SlimFileError):
    """The tensors of a slim file or folder are missing, of another shape than their spec, or not finite."""


class UnsupportedArchitectureError(UnsupportedModelError, CalibrationError):
    """The model holds attention-like modules SlimDiff cannot slim exactly (fused projections, linear attention,
    unknown joint layouts); raised before anything runs, naming the modules. Also a :class:`CalibrationError`,
    since :func:`calibrate` is where most users meet it."""


class UnsupportedAttentionProcessorError(UnsupportedArchitectureError, UnsupportedProcessorError):
    """Transformer attention runs a custom processor SlimDiff cannot run narrowed (refused before anything runs,
    like any unsupported architecture; also an :class:`UnsupportedProcessorError`, what ``slim()`` raised for it
    before the check moved ahead of calibration)."""


class LoraMappingError(SlimDiffError, ValueError):
    """A LoRA cannot be carried onto a slim model's narrowed layers (another model's LoRA, an adapter type with no
    image in the slim bases, or a slim model saved without its LoRA basis maps)."""


class SlimLoraMismatchError(LoraMappingError):
    """A LoRA made on a slim model (marked, :mod:`slimdiff_diffusers.core.lora_mark`) is loaded onto another slim
    model (other widths or other bases) or a model that is not slimmed: its updates are in the other model's bases."""
