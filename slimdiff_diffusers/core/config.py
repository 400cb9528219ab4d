"""SlimConfig: everything a user can choose about one slimming run, as data."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from .errors import BudgetError

GROUP_KINDS = ("qk", "vo", "ffn")


@dataclass
class SlimConfig:
    """Settings of :func:`slimdiff_diffusers.core.slim`.

    Budget (exactly one of ``keep_ratio`` / ``params_to_remove``, unless ``rank_pattern`` fixes every group):
        keep_ratio: fraction of the compressible cost kept, in (0, 1]. The cost is parameters
            (``budget="params"``) or multiply-accumulates per forward row at the calibration resolution
            (``budget="flops"``).
        params_to_remove: absolute number of parameters to remove (``budget="params"`` only).
        budget: ``"params"`` or ``"flops"``.

    What to slim:
        targets: any of ``"qk"``, ``"vo"``, ``"ffn"``.
        exclude: regular expressions; sites whose module path matches one are left untouched.
        rank_pattern: per-group ranks as data (PEFT style): ``{"<site path>:qk": 16, "mid_block.*:ffn": 512}``.
            Keys are group names or regular expressions matched against them; values are per-head ranks for
            qk/vo and kept channels for ffn. These groups are fixed; the allocator distributes the rest.

    Rank grid and floors:
        rank_multiple: per-head ranks are multiples of this (8 keeps tensor cores and SDPA kernels happy);
            a group narrower than two steps uses a step of a quarter of its width.
        ffn_multiple: feed-forward widths are multiples of this.
        min_rank: smallest per-head rank (default: one grid step).
        min_ffn_fraction: smallest kept fraction of feed-forward channels.
        max_group_sparsity: optional cap on the fraction of a group's cost that may be removed.

    Method choices (method.md §3-4; the defaults are the method, the rest are ablations):
        allocation: ``"sis"`` (Spectral Influence Score + automatic rank allocation) or ``"uniform"``
            (the same kept fraction in every group).
        propagation: block propagation factor π_b: ``"probe"`` (measured), ``"block_influence"``
            (1 − E cos(h_in, h_out)) or ``"none"`` (π = 1).
        propagation_power: influence α_g = π_b^p · ε_g. Errors add in squares through the network, and π is
            a gain on norms, so p = 2 is the consistent choice (method.md's α = π·ε is p = 1).
        vo_statistics: ``"input"`` (whiten with the value input, MoDeGPT Type-III) or
            ``"attention_output"`` ("P-aware": whiten with each head's attention output).
        timestep_weighting: ``"tokens"`` (uniform over steps) or one weight per calibration bucket.
        ffn_ridge: relative ridge λ of the Nyström leverage scores.
        ffn_refit_bias: refit the down-projection bias with the kept columns (least squares with intercept).

    Output:
        head_layout: ``"separate"`` (q/k and v/o per-head widths differ; needs an attention processor that
            takes the original softmax scale: diffusers' ``LowRankAttnProcessor``) or ``"uniform"`` (one width
            per attention, zero-padded, softmax scale folded into ``to_q``: runs with any stock attention).
        device: where decompositions run (``None``: the device of the weights). fp64 is always used.
    """

    keep_ratio: float | None = None
    params_to_remove: int | None = None
    budget: Literal["params", "flops"] = "params"
    targets: tuple[str, ...] = GROUP_KINDS
    exclude: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    rank_multiple: int = 8
    ffn_multiple: int = 64
    min_rank: int | None = None
    min_ffn_fraction: float = 0.1
    max_group_sparsity: float | None = None
    allocation: Literal["sis", "uniform"] = "sis"
    propagation: Literal["probe", "block_influence", "none"] = "probe"
    propagation_power: float = 2.0
    vo_statistics: Literal["input", "attention_output"] = "input"
    timestep_weighting: str | list[float] = "tokens"
    ffn_ridge: float = 1e-2
    ffn_refit_bias: bool = True
    head_layout: Literal["separate", "uniform"] = "separate"
    device: str | None = None

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        unknown = set(self.targets) - set(GROUP_KINDS)
        if unknown or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {GROUP_KINDS}, got {self.targets}")
        if self.keep_ratio is not None and self.params_to_remove is not None:
            raise BudgetError("give either keep_ratio or params_to_remove, not both")
        if self.keep_ratio is not None and not (0.0 < float(self.keep_ratio) <= 1.0):
            raise BudgetError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.params_to_remove is not None:
            if self.budget != "params":
                raise BudgetError("params_to_remove needs budget='params'; use keep_ratio with budget='flops'")
            if int(self.params_to_remove) < 0:
                raise BudgetError(f"params_to_remove must be >= 0, got {self.params_to_remove}")
        if self.budget not in ("params", "flops"):
            raise ValueError(f"budget must be 'params' or 'flops', got {self.budget!r}")
        if self.rank_multiple < 1 or self.ffn_multiple < 1:
            raise ValueError("rank_multiple and ffn_multiple must be >= 1")
        if not 0.0 <= self.min_ffn_fraction <= 1.0:
            raise ValueError("min_ffn_fraction must be in [0, 1]")
        if self.max_group_sparsity is not None and not 0.0 < self.max_group_sparsity <= 1.0:
            raise ValueError("max_group_sparsity must be in (0, 1]")
        for choice, allowed in (("allocation", ("sis", "uniform")), ("propagation", ("probe", "block_influence", "none")),
                                ("vo_statistics", ("input", "attention_output")), ("head_layout", ("separate", "uniform"))):
            if getattr(self, choice) not in allowed:
                raise ValueError(f"{choice} must be one of {allowed}, got {getattr(self, choice)!r}")
        for key, value in self.rank_pattern.items():
            if int(value) < 1:
                raise BudgetError(f"rank_pattern[{key!r}] must be >= 1, got {value}")

    @property
    def has_budget(self) -> bool:
        return self.keep_ratio is not None or self.params_to_remove is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d
