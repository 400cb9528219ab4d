"""SlimReport: what one slimming did, per group and in total (returned by plan/apply and slim)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def describe_allocation(allocation: str, refinement: str | None, setting: str | None = None,
                        influence: str | None = None) -> str:
    """``"sis, refinement exchange (auto), influence measured"``: the allocation, the refinement it ran and, when
    the user's setting differs from it (``"auto"``), that setting, then how the group influences were obtained
    (``SlimConfig.propagation`` resolved; left out when not recorded); ``"uniform"`` alone (it reads neither)."""
    if refinement is None:
        return str(allocation)
    how = f" ({setting})" if setting and setting != refinement else ""
    weighed = f", influence {influence}" if influence else ""
    return f"{allocation}, refinement {refinement}{how}{weighed}"


def _describe_attention_output_use(per_kind: dict[str, str] | None, used: str, otherwise: str) -> str | None:
    """``"<used> (<kinds> attention; <other kinds> attention <otherwise>)"`` for a setting resolved per attention
    kind to ``"attention_output"`` or something else; None when no kind used the attention outputs."""
    outputs = [kind for kind, how in (per_kind or {}).items() if how == "attention_output"]
    if not outputs:
        return None
    others = [kind for kind, how in per_kind.items() if how != "attention_output"]
    rest = f"; {', '.join(others)} attention {otherwise}" if others else ""
    return f"{used} ({', '.join(outputs)} attention{rest})"


def describe_vo_output_refit(refits: dict[str, str] | None) -> str | None:
    """``"refit by least squares against the attention outputs they read (joint, single attention)"``: how the VO
    readers were fit where some were refit (``SlimConfig.vo_output_refit`` resolved per attention kind); None when
    every reader kept the SVD's own factor (or nothing was recorded), which needs no sentence."""
    return _describe_attention_output_use(refits, "refit by least squares against the attention outputs they read",
                                          "keeps the SVD factor")


def describe_vo_statistics(statistics: dict[str, str] | None) -> str | None:
    """``"whitened with the attention outputs (single attention; joint attention with the value inputs)"``: what
    chose the VO bases where some kind used the attention outputs (``SlimConfig.vo_statistics`` resolved per
    attention kind); None when every kind used the value inputs (or nothing was recorded), which needs no sentence."""
    return _describe_attention_output_use(statistics, "whitened with the attention outputs",
                                          "with the value inputs")


def describe_ffn_selection(selection: str | None) -> str | None:
    """How ``SlimConfig.ffn_selection`` chose the kept feed-forward channels, in words; None when nothing was
    recorded (reports and cards written before the option existed: leverage scores)."""
    return {"greedy": "chosen by output-aware greedy forward selection",
            "leverage": "chosen by their ridge leverage scores"}.get(selection)


@dataclass
class GroupReport:
    """One group's outcome: rank kept out of the full rank, its cost and the predicted error."""

    name: str
    kind: str
    rank: int
    full_rank: int
    params: int
    full_params: int
    flops: float
    full_flops: float
    predicted_error: float
    influence: float


@dataclass
class SlimReport:
    """What slimming did: totals, per-group allocation, timings."""

    params_before: int
    params_after: int
    compressible_params_before: int
    compressible_params_after: int
    flops_before: float
    flops_after: float
    groups: list[GroupReport] = field(default_factory=list)
    seconds: float = 0.0
    # Wall-clock seconds of each stage: "decomposition" (closed forms incl. the FFN refits; near 0 when the
    # factors came from a decomposition_cache),
    # "allocation" (the rank search) and "rewrite" (copying the model and installing the narrow layers).
    stage_seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # parameters of the cross-attentions SlimConfig.adapter_compatible kept whole (outside the compressible counts)
    adapter_params: int = 0
    # the refinement the SIS allocation ran ("exchange", "refill" or "none": config's "auto" resolved for this
    # model; decisions.md row 22); None for allocation="uniform"
    allocation_refinement: str | None = None
    # attention kind -> how its VO readers were fit ("attention_output" or "none": config's vo_output_refit
    # resolved; decisions.md row 26); empty for reports written before it was recorded or without VO groups
    vo_output_refit: dict[str, str] = field(default_factory=dict)
    # attention kind -> what whitened its VO bases ("input" or "attention_output": config's vo_statistics resolved;
    # decisions.md row 31); empty for reports written before it was recorded or without VO groups
    vo_statistics: dict[str, str] = field(default_factory=dict)
    # how the group influences were obtained ("measured", "probe", "block_influence" or "none": config's
    # propagation resolved; decisions.md row 36); None for reports written before it was recorded
    propagation: str | None = None

    @property
    def vo_readers_summary(self) -> str | None:
        """How the VO readers were fit, when some were refit (:func:`describe_vo_output_refit`)."""
        return describe_vo_output_refit(self.vo_output_refit)

    @property
    def vo_bases_summary(self) -> str | None:
        """What chose the VO bases, when some kind used the attention outputs (:func:`describe_vo_statistics`)."""
        return describe_vo_statistics(self.vo_statistics)

    @property
    def ffn_channels_summary(self) -> str | None:
        """How the kept feed-forward channels were chosen, when some feed-forward was slimmed
        (:func:`describe_ffn_selection`)."""
        if not any(g.kind == "ffn" for g in self.groups):
            return None
        return describe_ffn_selection(self.config.get("ffn_selection"))

    @property
    def allocation_summary(self) -> str:
        """The allocation as report.md and the model card state it (:func:`describe_allocation`)."""
        return describe_allocation(self.config.get("allocation", "sis"), self.allocation_refinement,
                                   self.config.get("allocation_refinement"), self.propagation)

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"params_removed": self.params_removed}

    def to_markdown(self, max_rows: int | None = None) -> str:
        lines = [
            "| | before | after | ratio |", "|---|---:|---:|---:|",
            f"| parameters (model) | {self.params_before:,} | {self.params_after:,} | {self.params_after / self.params_before:.3f} |",
            f"| parameters (compressible) | {self.compressible_params_before:,} | {self.compressible_params_after:,} | "
            f"{self.compressible_params_after / max(self.compressible_params_before, 1):.3f} |",
            f"| compressible MACs / sample | {self.flops_before:,.0f} | {self.flops_after:,.0f} | "
            f"{self.flops_after / max(self.flops_before, 1):.3f} |",
            *([f"| kept whole for adapters (cross-attention) | {self.adapter_params:,} | {self.adapter_params:,} | "
               "1.000 |"] if self.adapter_params else []),
            "", "| group | kind | rank / full | params kept | predicted rel. error | influence |",
            "|---|---|---:|---:|---:|---:|",
        ]
        rows = self.groups if max_rows is None else self.groups[:max_rows]
        for g in rows:
            lines.append(f"| `{g.name}` | {g.kind} | {g.rank} / {g.full_rank} | {g.params:,} / {g.full_params:,} | "
                         f"{g.predicted_error:.2e} | {g.influence:.2e} |")
        return "\n".join(lines)
