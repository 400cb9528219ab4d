"""The framework-agnostic SlimDiff core: torch only, no diffusers or ComfyUI imports."""
from .allocation import RankGroup, allocate_sis, allocate_uniform, rank_grid
from .apply import apply_plan
from .calibration import Calibration, StatKeys, model_fingerprint
from .calibrator import CalibrationConfig, Calibrator, calibrate, estimate_statistics_bytes
from .config import SlimConfig
from .decompositions import decompose_ffn, decompose_qk, decompose_vo
from .errors import (
    BudgetError,
    CalibrationError,
    CalibrationMismatchError,
    ConfigError,
    IncompatibleAdapterError,
    NonFiniteActivationError,
    SlimDiffError,
    SlimFileError,
    UnsupportedArchitectureError,
    UnsupportedModelError,
    UnsupportedProcessorError,
)
from .rewrite import apply_slim_spec, check_spec_fits, convert_layout, narrow_linear, to_uniform_layout
from .sites import AttentionSite, FeedForwardSite, Sites, check_supported, find_sites
from .plan import GroupPlan, SlimPlan, plan_slim
from .propagation import measure_propagation
from .report import GroupReport, SlimReport
from .slim import slim
from .slim_file import load_slim_file, read_slim_header, save_slim_file
from .spec import AttentionSpec, FeedForwardSpec, SlimSpec

__all__ = [
    "AttentionSite", "AttentionSpec", "BudgetError", "Calibration", "CalibrationConfig", "CalibrationError",
    "CalibrationMismatchError", "Calibrator", "ConfigError", "FeedForwardSite", "FeedForwardSpec", "GroupPlan",
    "GroupReport", "IncompatibleAdapterError", "SlimPlan", "StatKeys", "apply_plan", "estimate_statistics_bytes", "plan_slim",
    "NonFiniteActivationError", "RankGroup", "SlimConfig", "SlimDiffError", "SlimFileError", "SlimReport",
    "SlimSpec", "Sites", "UnsupportedArchitectureError", "UnsupportedModelError", "UnsupportedProcessorError", "allocate_sis",
    "allocate_uniform", "apply_slim_spec", "calibrate", "check_spec_fits", "check_supported", "convert_layout", "decompose_ffn", "decompose_qk", "decompose_vo",
    "find_sites", "load_slim_file", "measure_propagation", "model_fingerprint", "narrow_linear", "rank_grid",
    "read_slim_header", "save_slim_file", "slim", "to_uniform_layout",
]
