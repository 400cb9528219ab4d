"""SlimConfig: everything a user can choose about one slimming run, as data."""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .allocation import REFINEMENTS
from .decompositions import FFN_SELECTIONS
from .errors import BudgetError, ConfigError

GROUP_KINDS = ("qk", "vo", "ffn")

VO_STATISTICS = ("input", "attention_output")
# What vo_statistics="auto" gives each attention kind: decisions.md row 31 (chosen on flux-tiny's validation prompts;
# a single-stream block's values are read only through its attention, whose head outputs are what proj_out reads).
AUTO_VO_STATISTICS = {"plain": "input", "joint": "input", "single": "attention_output"}
# The string values of SlimConfig.vo_statistics (it also takes a dict of attention kind -> one of VO_STATISTICS).
VO_STATISTICS_CHOICES = ("auto", *VO_STATISTICS)
# The attention kinds a per-kind ``vo_statistics`` dict may name (``AttentionSite.kind``): plain (UNets, PixArt),
# joint (Flux / SD3 double-stream) and Flux single-stream attention.
ATTENTION_KINDS = ("plain", "joint", "single")
# What allocation_refinement="auto" runs on models with joint or single-stream attention (decisions.md row 22).
AUTO_TRANSFORMER_REFINEMENT = "exchange"
# The values of SlimConfig.allocation_refinement ("auto" resolves to one of the others per model).
ALLOCATION_REFINEMENTS = ("auto", *REFINEMENTS)
# The values of SlimConfig.vo_output_refit ("auto" resolves per attention kind, SlimConfig.vo_output_refit_for).
VO_OUTPUT_REFITS = ("auto", "attention_output", "none")
# What vo_output_refit="auto" gives each attention kind: decisions.md row 26 (chosen on flux-tiny's validation
# prompts; plain attention keeps the SVD factor: its statistics would cost every UNet calibration ~3%).
AUTO_VO_OUTPUT_REFIT = {"plain": "none", "joint": "attention_output", "single": "attention_output"}
# The options of SlimConfig that take one of a fixed set of strings -> that set: what __post_init__ accepts and what
# front ends offer (SlimConfig.option_choices: the CLI's choices, the ComfyUI Slim node's combos).
OPTION_CHOICES: dict[str, tuple[str, ...]] = {
    "allocation": ("sis", "uniform"),
    "allocation_refinement": ALLOCATION_REFINEMENTS,
    "vo_statistics": VO_STATISTICS_CHOICES,  # its string values; the per-kind dict form is validated apart
    "vo_output_refit": VO_OUTPUT_REFITS,
    "propagation": ("auto", "measured", "probe", "block_influence", "none"),
    "ffn_selection": FFN_SELECTIONS,
    "head_layout": ("separate", "uniform"),
}


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
        exclude: regular expressions; sites whose module path matches one (``re.fullmatch``, or equality)
            are left untouched. Every pattern must match at least one site.
        adapter_compatible: leave every cross-attention (keys and values read the text, or another input than
            the queries) in its original basis, so adapters trained for the original model that attach there
            (IP-Adapter's ``to_k_ip``/``to_v_ip``, Custom Diffusion) load and act as on the original. It costs the
            cross-attentions' share of the budget: the report states the parameters kept whole for it.
        rank_pattern: per-group ranks as data (PEFT style): ``{"<site path>:qk": 16, "mid_block.*:ffn": 512}``.
            Keys are group names or regular expressions matched against them; values are per-head ranks for
            qk/vo and kept channels for ffn. These groups are fixed; the allocator distributes the rest.
            Every key must match at least one group. The first matching key wins.

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
        allocation_refinement: what the SIS allocation (``allocation="sis"``) does after its greedy descent, whose
            last steps on a coarse rank grid can leave budget unused or cut a wide group by a whole step:
            ``"exchange"`` (spend the unused budget, then 1-exchange local search), ``"refill"`` (spend the unused
            budget only) or ``"none"`` (the descent alone, the allocation before decisions.md row 22); each one's
            predicted objective is never worse than the next one's. ``"auto"`` (the default) takes
            ``"exchange"`` for transformer denoisers with joint or single-stream attention (Flux, SD3), where it
            was chosen on a validation set, and ``"none"`` for the others (UNets, PixArt), whose published quality
            figures were measured with the descent alone and have not been re-measured.
        propagation: how each group's influence α_g is obtained. ``"measured"``: measured in calibration by
            slimming the group alone (method.md §4.1.1, ``CalibrationConfig.group_influence``). The others model
            it as α_g = π_b^p · ε_g with the block factor π_b from the perturbation probe (``"probe"``), MoDeGPT's
            block influence 1 − E cos(h_in, h_out) (``"block_influence"``) or π = 1 (``"none"``). ``"auto"``
            (the default): ``"measured"`` when the calibration has it, else ``"probe"`` with a warning
            (calibrations made before it existed, or with ``group_influence=False``). :meth:`propagation_for`
            resolves it.
        propagation_power: p in α_g = π_b^p · ε_g (not used by ``"measured"``). Errors add in squares through the
            network, and π is a gain on norms, so p = 2 is the consistent choice (method.md's α = π·ε is p = 1).
        vo_statistics: ``"input"`` (whiten with the value input, MoDeGPT Type-III) or ``"attention_output"``
            ("P-aware": whiten with each head's attention output), or a dict of attention kind (``"plain"``,
            ``"joint"``, ``"single"``) -> one of those two, kinds it leaves out taking ``"input"`` (e.g.
            ``{"joint": "attention_output"}``); ``"auto"`` (the default) is the attention output for Flux's
            single-stream attention and the input for plain and joint attention (decisions.md rows 20 and 31).
            :meth:`vo_statistics_for` says which one a site gets. ``"attention_output"`` needs a calibration with
            attention-output statistics for those kinds (:meth:`attention_kinds_reading_outputs`; ``pipe.slim()``
            collects them when it calibrates); where a calibration lacks them, ``"auto"`` whitens with the input
            and says so, and an explicit ``"attention_output"`` is refused before any work.
        vo_output_refit: how the readers of a narrowed VO (to_out.0, joint attention's to_add_out, the attention
            columns of a single-stream proj_out) get their weights once the value bases are chosen: "none" keeps
            the SVD's own factor; "attention_output" refits each reader by least squares against the head outputs
            it actually reads (method.md §3.3.1), which needs a calibration with attention-output statistics;
            "auto" (the default) refits joint and single-stream attention (Flux, SD3) and keeps the SVD factor in
            plain attention (UNets, PixArt), decisions.md row 26. Where a calibration lacks those statistics, "auto"
            keeps the SVD factor and says so; an explicit "attention_output" is refused before any work.
        timestep_weighting: ``"tokens"`` (uniform over steps) or one weight per calibration bucket.
        ffn_selection: how the kept feed-forward channels are chosen: "greedy" (the default) adds, one at a time,
            the channel whose least-squares refit removes the most output error of the down projection (method.md
            §3.1.1; decisions.md rows 32 and 35); "leverage" keeps the top ridge leverage scores of the hidden
            activation alone (§3.1, MoDeGPT's Nyström selection, the default before row 35). Both refit the down
            projection the same way.
        ffn_ridge: relative ridge λ of the Nyström leverage scores (ffn_selection="leverage").
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
    adapter_compatible: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    rank_multiple: int = 8
    ffn_multiple: int = 64
    min_rank: int | None = None
    min_ffn_fraction: float = 0.1
    max_group_sparsity: float | None = None
    allocation: Literal["sis", "uniform"] = "sis"
    allocation_refinement: Literal["auto", "exchange", "refill", "none"] = "auto"
    propagation: Literal["auto", "measured", "probe", "block_influence", "none"] = "auto"
    propagation_power: float = 2.0
    vo_statistics: Literal["auto", "input", "attention_output"] | dict[str, str] = "auto"
    vo_output_refit: Literal["auto", "attention_output", "none"] = "auto"
    timestep_weighting: str | list[float] = "tokens"
    ffn_selection: Literal["greedy", "leverage"] = "greedy"
    ffn_ridge: float = 1e-2
    ffn_refit_bias: bool = True
    head_layout: Literal["separate", "uniform"] = "separate"
    device: str | None = None

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        unknown = set(self.targets) - set(GROUP_KINDS)
        if unknown or not self.targets:
            raise ConfigError(f"targets must be a non-empty subset of {GROUP_KINDS}, got {self.targets}")
        if self.keep_ratio is not None and self.params_to_remove is not None:
            raise BudgetError("give either keep_ratio or params_to_remove, not both")
        if self.keep_ratio is not None:
            if not _is_number(self.keep_ratio) or not (0.0 < float(self.keep_ratio) <= 1.0):
                raise BudgetError(f"keep_ratio must be in (0, 1] (a number), got {self.keep_ratio!r}")
        if self.budget not in ("params", "flops"):
            raise ConfigError(f"budget must be 'params' or 'flops', got {self.budget!r}")
        if self.params_to_remove is not None:
            if self.budget != "params":
                raise BudgetError("params_to_remove needs budget='params'; use keep_ratio with budget='flops'")
            if not _is_number(self.params_to_remove) or int(self.params_to_remove) < 0:
                raise BudgetError(f"params_to_remove must be >= 0 (a number), got {self.params_to_remove!r}")
        for name in ("rank_multiple", "ffn_multiple"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.min_rank is not None and (not _is_int(self.min_rank) or self.min_rank < 1):
            raise ConfigError(f"min_rank must be an integer >= 1 (or None), got {self.min_rank!r}")
        if not _is_number(self.min_ffn_fraction) or not 0.0 <= self.min_ffn_fraction <= 1.0:
            raise ConfigError(f"min_ffn_fraction must be in [0, 1], got {self.min_ffn_fraction!r}")
        if self.max_group_sparsity is not None and (not _is_number(self.max_group_sparsity)
                                                    or not 0.0 < self.max_group_sparsity <= 1.0):
            raise ConfigError(f"max_group_sparsity must be in (0, 1], got {self.max_group_sparsity!r}")
        if isinstance(self.vo_statistics, dict):
            if set(self.vo_statistics) - set(ATTENTION_KINDS) or \
                    any(v not in VO_STATISTICS for v in self.vo_statistics.values()):
                raise ConfigError(f"vo_statistics as a dict maps attention kinds {ATTENTION_KINDS} to one of "
                                  f"{VO_STATISTICS}, got {self.vo_statistics!r}")
            self.vo_statistics = dict(self.vo_statistics)
        elif self.vo_statistics not in VO_STATISTICS_CHOICES:
            raise ConfigError(f"vo_statistics must be one of {VO_STATISTICS_CHOICES} or a dict of attention kind -> "
                              f"one of {VO_STATISTICS}, got {self.vo_statistics!r}")
        for choice, allowed in OPTION_CHOICES.items():
            if choice == "vo_statistics" and isinstance(self.vo_statistics, dict):
                continue  # checked above, kind by kind
            if getattr(self, choice) not in allowed:
                raise ConfigError(f"{choice} must be one of {allowed}, got {getattr(self, choice)!r}")
        if not _is_number(self.propagation_power) or self.propagation_power < 0:
            raise ConfigError(f"propagation_power must be a number >= 0, got {self.propagation_power!r}")
        if not _is_number(self.ffn_ridge) or not self.ffn_ridge > 0:
            raise ConfigError(f"ffn_ridge must be a positive number, got {self.ffn_ridge!r}")
        if self.timestep_weighting != "tokens":
            weights = self.timestep_weighting
            if isinstance(weights, str) or not isinstance(weights, Iterable) or \
                    not all(_is_number(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
                raise ConfigError("timestep_weighting must be 'tokens' or a list of non-negative weights, one per "
                                  f"calibration bucket (not all zero), got {self.timestep_weighting!r}")
            self.timestep_weighting = [float(w) for w in weights]
        if not isinstance(self.adapter_compatible, bool):
            raise ConfigError(f"adapter_compatible must be True or False, got {self.adapter_compatible!r}")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.exclude = list(self.exclude)
        for pattern in self.exclude:
            _compile(pattern, "exclude")
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"rank_pattern must be a dict of group pattern -> rank, got {type(self.rank_pattern).__name__}")
        for key, value in self.rank_pattern.items():
            _compile(key, "rank_pattern")
            if not _is_int(value) or value < 1:
                raise BudgetError(f"rank_pattern[{key!r}] must be an integer >= 1, got {value!r}")

    @classmethod
    def resolve(cls, config: SlimConfig | None = None, **overrides: Any) -> SlimConfig:
        """``config`` with the keyword ``overrides`` applied (``None`` values are ignored), validated once.

        The one place where the adapters' ``keep_ratio=...`` style arguments meet a :class:`SlimConfig`.
        """
        updates = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(updates) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown SlimConfig option(s): {', '.join(sorted(unknown))}")
        if config is None:
            return cls(**updates)
        if "keep_ratio" in updates and config.params_to_remove is not None:
            updates.setdefault("params_to_remove", None)
        if "params_to_remove" in updates and config.keep_ratio is not None:
            updates.setdefault("keep_ratio", None)
        return dataclasses.replace(config, **updates)

    # -- pattern matching (the one place that interprets exclude / rank_pattern) ------------------

    def excludes(self, site_name: str) -> bool:
        """Whether the site at module path ``site_name`` is excluded from slimming by an ``exclude`` pattern."""
        return any(_matches(p, site_name) for p in self.exclude)

    def kept_for_adapters(self, site: Any) -> bool:
        """Whether ``adapter_compatible`` keeps this (attention) site whole: a cross-attention not otherwise
        excluded."""
        return self.adapter_compatible and bool(getattr(site, "is_cross", False)) and not self.excludes(site.name)

    def excludes_site(self, site: Any) -> bool:
        """Whether an attention / feed-forward site is left untouched (``exclude`` or ``adapter_compatible``)."""
        return self.excludes(site.name) or self.kept_for_adapters(site)

    def fixed_rank(self, group_name: str) -> int | None:
        """The rank ``rank_pattern`` fixes for ``group_name`` (``"<site>:qk|vo|ffn"``), or None."""
        for pattern, value in self.rank_pattern.items():
            if _matches(pattern, group_name):
                return int(value)
        return None

    def check_patterns(self, site_names: list[str], group_names: list[str]) -> None:
        """Raise :class:`ConfigError` for an ``exclude`` or ``rank_pattern`` entry that matches nothing.

        A pattern that silently matches nothing leaves the user believing a site is excluded or a rank pinned.
        """
        for pattern in self.exclude:
            if not any(_matches(pattern, name) for name in site_names):
                raise ConfigError(f"exclude pattern {pattern!r} matches no slimmable module. It is matched in full "
                                  f"against module paths such as: {_examples(site_names)}")
        for pattern in self.rank_pattern:
            if not any(_matches(pattern, name) for name in group_names):
                raise ConfigError(f"rank_pattern key {pattern!r} matches no group. Keys are matched in full against "
                                  f"group names '<module path>:qk|vo|ffn' such as: {_examples(group_names)}")

    def attention_kinds_reading_outputs(self, required: bool = False) -> frozenset[str]:
        """The attention kinds whose VO this config whitens or refits with attention outputs, so that a calibration
        for it collects their ``attention_output_statistics`` (``"auto"`` on a :class:`CalibrationConfig` collects
        them for the kinds of the default config). ``required``: only the kinds that an explicit setting needs them
        for (planning refuses a calibration without them); ``vo_output_refit="auto"`` does without them."""
        return frozenset(kind for kind in ATTENTION_KINDS
                         if (self.vo_statistics_for(kind) == "attention_output"
                             and not (required and self.vo_statistics == "auto"))
                         or (self.vo_output_refit_for(kind) != "none"
                             and not (required and self.vo_output_refit == "auto")))

    def vo_output_refit_for(self, attention_kind: str) -> str:
        """``"attention_output"`` or ``"none"``: how the VO readers of an attention site of ``attention_kind`` are
        fit; the one place that resolves ``vo_output_refit="auto"``."""
        if attention_kind not in ATTENTION_KINDS:
            raise ConfigError(f"unknown attention kind {attention_kind!r} (known: {', '.join(ATTENTION_KINDS)})")
        if self.vo_output_refit == "auto":
            return AUTO_VO_OUTPUT_REFIT[attention_kind]
        return self.vo_output_refit

    def vo_statistics_for(self, attention_kind: str) -> str:
        """The VO statistics (``"input"`` or ``"attention_output"``) of an attention site of ``attention_kind``
        (``AttentionSite.kind``: ``"plain"``, ``"joint"`` or ``"single"``); the one place that reads
        ``vo_statistics`` and resolves ``"auto"`` (:data:`AUTO_VO_STATISTICS`)."""
        if attention_kind not in ATTENTION_KINDS:
            raise ConfigError(f"unknown attention kind {attention_kind!r} (known: {', '.join(ATTENTION_KINDS)})")
        if isinstance(self.vo_statistics, dict):
            return self.vo_statistics.get(attention_kind, "input")
        if self.vo_statistics == "auto":
            return AUTO_VO_STATISTICS[attention_kind]
        return self.vo_statistics

    def propagation_for(self, has_measured_influence: bool) -> str:
        """How α_g is obtained for a calibration that has (or lacks) measured group influence; the one place that
        resolves ``propagation="auto"`` (decisions.md row 36)."""
        if self.propagation != "auto":
            return self.propagation
        return "measured" if has_measured_influence else "probe"

    def allocation_refinement_for(self, attention_kinds: Iterable[str]) -> str:
        """The refinement (``"exchange"``, ``"refill"`` or ``"none"``) that ``allocation="sis"`` runs on a model whose
        attention sites are of ``attention_kinds``; the one place that resolves ``"auto"`` (decisions.md row 22)."""
        if self.allocation_refinement != "auto":
            return self.allocation_refinement
        return AUTO_TRANSFORMER_REFINEMENT if set(attention_kinds) & {"joint", "single"} else "none"

    @classmethod
    def option_default(cls, name: str) -> Any:
        """The default value of the option ``name`` (for front ends that offer it: the CLI, nodes)."""
        spec = next((f for f in dataclasses.fields(cls) if f.name == name), None)
        if spec is None:
            raise ConfigError(f"unknown SlimConfig option {name!r}")
        return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default

    @classmethod
    def option_choices(cls, name: str) -> tuple[str, ...]:
        """The values the option ``name`` accepts, for an option that takes one of a fixed set of strings
        (:data:`OPTION_CHOICES`; for front ends that offer it as a list of choices)."""
        if name not in OPTION_CHOICES:
            known = {f.name for f in dataclasses.fields(cls)}
            what = "has no fixed set of choices" if name in known else "is not a SlimConfig option"
            raise ConfigError(f"{name!r} {what} (options with choices: {', '.join(OPTION_CHOICES)})")
        return OPTION_CHOICES[name]

    @classmethod
    def option_help(cls, name: str) -> str:
        """The description of the option ``name`` in this class's docstring, as plain text on one line (Sphinx
        markup removed), so that front ends (``slimdiff slim --help``) say what the docstring says."""
        lines = (cls.__doc__ or "").splitlines()
        start = next((i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:")), None)
        if start is None:
            raise ConfigError(f"SlimConfig's docstring does not describe {name!r}")
        indent = len(lines[start]) - len(lines[start].lstrip())
        text = [lines[start].strip()[len(name) + 1:]]
        for line in lines[start + 1:]:
            if not line.strip() or len(line) - len(line.lstrip()) <= indent:
                break
            text.append(line.strip())
        plain = re.sub(r":(?:meth|func|class|attr|data):`~?([^`]+)`", r"\1", " ".join(text))
        return plain.replace("``", "").strip()

    @property
    def has_budget(self) -> bool:
        return self.keep_ratio is not None or self.params_to_remove is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _compile(pattern: Any, option: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{option} patterns must be non-empty strings, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{option} pattern {pattern!r} is not a valid regular expression ({exc}); escape "
                          "literal characters such as '[' or '(' with a backslash") from exc


def _matches(pattern: str, name: str) -> bool:
    return pattern == name or re.fullmatch(pattern, name) is not None


def _examples(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
