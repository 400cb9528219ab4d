"""The framework-agnostic SlimDiff core: torch only, no diffusers or ComfyUI imports."""
from .allocation import RankGroup, allocate_sis, allocate_uniform, rank_grid
from .calibration import Calibration, CalibrationConfig, Calibrator, calibrate, measure_propagation, model_fingerprint
from .config import SlimConfig
from .decompositions import decompose_ffn, decompose_qk, decompose_vo
from .errors import (
    BudgetError,
    CalibrationError,
    CalibrationMismatchError,
    IncompatibleAdapterError,
    NonFiniteActivationError,
    SlimDiffError,
    SlimFileError,
    UnsupportedModelError,
    UnsupportedProcessorError,
)
from .rewrite import apply_slim_spec, convert_layout, narrow_linear, to_uniform_layout
from .sites import AttentionSite, FeedForwardSite, Sites, find_sites
from .slim import GroupReport, SlimReport, slim
from .slim_file import load_slim_file, read_slim_header, save_slim_file
from .spec import AttentionSpec, FeedForwardSpec, SlimSpec

__all__ = [
    "AttentionSite", "AttentionSpec", "BudgetError", "Calibration", "CalibrationConfig", "CalibrationError",
    "CalibrationMismatchError", "Calibrator", "FeedForwardSite", "FeedForwardSpec", "GroupReport",
    "IncompatibleAdapterError",     "NonFiniteActivationError", "RankGroup", "SlimConfig", "SlimDiffError", "SlimFileError", "SlimReport",
    "SlimSpec", "Sites", "UnsupportedModelError", "UnsupportedProcessorError", "allocate_sis",
    "allocate_uniform", "apply_slim_spec", "calibrate", "convert_layout", "decompose_ffn", "decompose_qk", "decompose_vo",
    "find_sites", "load_slim_file", "measure_propagation", "model_fingerprint", "narrow_linear", "rank_grid",
    "read_slim_header", "save_slim_file", "slim", "to_uniform_layout",
]
