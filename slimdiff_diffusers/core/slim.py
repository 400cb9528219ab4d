"""slim(): decompose every group, allocate ranks under the budget, build the narrowed model."""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .allocation import RankGroup, allocate_sis, allocate_uniform, rank_grid
from .calibration import Calibration
from .config import SlimConfig
from .decompositions import augment, decompose_ffn, decompose_qk, decompose_vo
from .errors import BudgetError, CalibrationError
from .rewrite import get_module, install_attention, install_feed_forward, to_uniform_layout
from .sites import AttentionSite, FeedForwardSite
from .spec import AttentionSpec, FeedForwardSpec, SlimSpec

logger = logging.getLogger("slimdiff")


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
    # Wall-clock seconds of each stage: "decomposition" (0 when every factor came from a decomposition_cache),
    # "allocation" (the rank search) and "rewrite" (copying the model and installing the narrow layers).
    stage_seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

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
            "", "| group | kind | rank / full | params kept | predicted rel. error | influence |",
            "|---|---|---:|---:|---:|---:|",
        ]
        rows = self.groups if max_rows is None else self.groups[:max_rows]
        for g in rows:
            lines.append(f"| `{g.name}` | {g.kind} | {g.rank} / {g.full_rank} | {g.params:,} / {g.full_params:,} | "
                         f"{g.predicted_error:.2e} | {g.influence:.2e} |")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Costs: parameters and multiply-accumulates per unit of rank
# --------------------------------------------------------------------------------------------------


def _bias(layer: nn.Linear) -> int:
    return 1 if layer.bias is not None else 0


def _attention_slopes(site: AttentionSite, root: nn.Module, tokens: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(params per rank, MACs per rank per sample row) for the qk and vo groups of one attention."""
    q, k, v = (get_module(root, p) for p in (site.q, site.k, site.v))
    h = site.heads
    n_q = tokens.get(site.q, 1.0)
    n_kv = tokens.get(site.k, n_q)
    qk_params = h * (q.in_features + _bias(q) + k.in_features + _bias(k))
    vo_params = h * (v.in_features + _bias(v) + site.out_dim)
    qk_flops = h * (n_q * q.in_features + n_kv * k.in_features + n_q * n_kv)
    vo_flops = h * (n_kv * v.in_features + n_q * n_kv + n_q * site.out_dim)
    return {"qk": (qk_params, qk_flops), "vo": (vo_params, vo_flops)}


def _ffn_slope(site: FeedForwardSite, root: nn.Module, tokens: dict[str, float]) -> tuple[float, float]:
    up, down = get_module(root, site.up), get_module(root, site.down)
    per_channel_up = (2 if site.gated else 1) * (up.in_features + _bias(up))
    n = tokens.get(site.down, 1.0)
    return per_channel_up + down.out_features, n * ((2 if site.gated else 1) * up.in_features + down.out_features)


# --------------------------------------------------------------------------------------------------
# slim()
# --------------------------------------------------------------------------------------------------


def _matches(patterns: list[str] | dict[str, int], name: str) -> bool:
    return any(p == name or re.fullmatch(p, name) for p in patterns)


def _rank_pattern_value(config: SlimConfig, group: str) -> int | None:
    for pattern, value in config.rank_pattern.items():
        if pattern == group or re.fullmatch(pattern, group):
            return int(value)
    return None


def _influence(calibration: Calibration, config: SlimConfig, block: str, output_path: str) -> float:
    block_energy = calibration.energy(f"{block}#in", config.timestep_weighting)
    epsilon = calibration.energy(output_path, config.timestep_weighting) / max(block_energy, 1e-30)
    if config.propagation == "probe":
        if calibration.propagation is None:
            raise CalibrationError("propagation='probe' needs a calibration with propagation probing "
                                   "(CalibrationConfig.propagation_probe_calls > 0); or use "
                                   "propagation='block_influence'")
        pi = calibration.propagation[block]
    elif config.propagation == "block_influence":
        pi = calibration.block_influence(block)
    else:
        pi = 1.0
    return (pi ** config.propagation_power) * epsilon


def _step(full: int, multiple: int) -> int:
    # A group narrower than two grid steps could not be slimmed at all; give it a quarter of its width.
    return multiple if full >= 2 * multiple else max(1, full // 4)


@torch.no_grad()
def slim(model: nn.Module, calibration: Calibration, config: SlimConfig | None = None, *,
         inplace: bool = False, strict_weights: bool = True, decomposition_cache: dict | None = None,
         **overrides: Any) -> nn.Module:
    """Return a slimmed copy of ``model`` (or slim it in place with ``inplace=True``).

    Args:
        model: the model the calibration was computed on.
        calibration: from :func:`calibrate`; checked against ``model`` first.
        config: a :class:`SlimConfig`; keyword ``overrides`` (e.g. ``keep_ratio=0.6``) replace its fields.
        inplace: modify ``model`` itself instead of a deep copy.
        strict_weights: refuse a calibration computed on different weights of the same architecture.
        decomposition_cache: a dict you own; decompositions are stored in it and reused by later calls with
            the same model, calibration and decomposition settings, so slimming at several budgets decomposes
            once (it holds fp64 factors of the size of the calibration statistics; drop it to free them).

    Returns:
        The slimmed model, with ``.slimdiff_spec`` (:class:`SlimSpec`) and ``.slimdiff_report`` (:class:`SlimReport`).
    """
    started = time.perf_counter()
    config = dataclasses.replace(config, **overrides) if config is not None else SlimConfig(**overrides)
    calibration.check_compatible(model, strict_weights=strict_weights)
    sites = calibration.sites
    tokens = calibration.tokens_per_row
    wt = config.timestep_weighting
    # Decompositions run in fp64 where the weights are (or on config.device).
    device = torch.device(config.device) if config.device else next(model.parameters()).device

    def moment(path: str) -> torch.Tensor:
        xx, x = calibration.input_moment(path, wt)
        return augment(xx, x).to(device)

    groups: list[RankGroup] = []
    decompositions = _CachedDecompositions(decomposition_cache, model, calibration, config, device)
    full_cost: dict[str, tuple[float, float]] = {}
    kinds: dict[str, str] = {}
    for site in sites.attention:
        if _matches(config.exclude, site.name):
            continue
        attn = get_module(model, site.name)
        slopes = _attention_slopes(site, model, tokens)
        influence = _influence(calibration, config, site.block, site.out)
        floor = config.min_rank or _step(site.head_dim, config.rank_multiple)
        grid = rank_grid(site.head_dim, _step(site.head_dim, config.rank_multiple), floor)
        if "qk" in config.targets and site.qk_decomposable:
            shared = calibration.linear_inputs[site.k] == calibration.linear_inputs[site.q]

            def q_in(site=site):
                return moment(site.q)

            def k_in(site=site, shared=shared):
                return moment(site.q if shared else site.k)
            decompositions.get_or_compute(f"{site.name}:qk", attn.to_q.weight, lambda: decompose_qk(
                attn.to_q.weight.to(device), _to(attn.to_q.bias, device), attn.to_k.weight.to(device),
                _to(attn.to_k.bias, device), site.heads, q_in(), k_in()))
            kinds[f"{site.name}:qk"] = "qk"
        if "vo" in config.targets:
            if config.vo_statistics == "attention_output":
                decompositions.get_or_compute(f"{site.name}:vo", attn.to_v.weight, lambda: decompose_vo(
                    attn.to_v.weight.to(device), _to(attn.to_v.bias, device), attn.to_out[0].weight.to(device),
                    site.heads, head_output_moment=calibration.attention_output_moment(site, wt)[0].to(device)))
            else:
                decompositions.get_or_compute(f"{site.name}:vo", attn.to_v.weight, lambda: decompose_vo(
                    attn.to_v.weight.to(device), _to(attn.to_v.bias, device), attn.to_out[0].weight.to(device),
                    site.heads, value_moment=moment(site.v)))
            kinds[f"{site.name}:vo"] = "vo"
        for kind in ("qk", "vo"):
            name = f"{site.name}:{kind}"
            if name not in decompositions:
                continue
            params_slope, flops_slope = slopes[kind]
            slope = params_slope if config.budget == "params" else flops_slope
            full_cost[name] = (params_slope * site.head_dim, flops_slope * site.head_dim)
            groups.append(RankGroup(name, grid, slope, decompositions[name].errors.cpu(), influence,
                                    fixed=_rank_pattern_value(config, name), max_sparsity=config.max_group_sparsity))
    if "ffn" in config.targets:
        for site in sites.feed_forward:
            if _matches(config.exclude, site.name):
                continue
            down = get_module(model, site.down)
            name = f"{site.name}:ffn"

            def ffn(down=down, site=site):
                def hidden_moment() -> tuple[torch.Tensor, torch.Tensor]:
                    hh, h = calibration.input_moment(site.down, wt)
                    return hh.to(device), h.to(device)

                decomposition = decompose_ffn(down.weight.to(device), _to(down.bias, device), *hidden_moment(),
                                              ridge=config.ffn_ridge, refit_bias=config.ffn_refit_bias)
                # Rebuilt from the calibration for the refit instead of held: one fp64 (m+1)² per FFN adds up.
                decomposition.release_moment(lambda: augment(*(t.double() for t in hidden_moment())))
                return decomposition
            decompositions.get_or_compute(name, down.weight, ffn)
            kinds[name] = "ffn"
            params_slope, flops_slope = _ffn_slope(site, model, tokens)
            step = _step(site.inner_dim, config.ffn_multiple)
            grid = rank_grid(site.inner_dim, step, max(step, config.min_ffn_fraction * site.inner_dim))
            full_cost[name] = (params_slope * site.inner_dim, flops_slope * site.inner_dim)
            groups.append(RankGroup(name, grid, params_slope if config.budget == "params" else flops_slope,
                                    decompositions[name].errors.cpu(), _influence(calibration, config, site.block, site.name),
                                    fixed=_rank_pattern_value(config, name), max_sparsity=config.max_group_sparsity))
    decomposed = time.perf_counter()
    if not groups:
        raise BudgetError("nothing to slim: every group is excluded or not targeted")
    for g in groups:
        if g.fixed is not None and g.fixed > g.full:
            raise BudgetError(f"rank_pattern gives {g.name} rank {g.fixed}, above its full rank {g.full}")

    # Budget
    total = sum(g.cost(g.full) for g in groups)
    if config.keep_ratio is not None:
        budget = float(config.keep_ratio) * total
    elif config.params_to_remove is not None:
        if config.params_to_remove >= total:
            raise BudgetError(f"params_to_remove={config.params_to_remove:,} is not below the {total:,.0f} "
                              "compressible parameters")
        budget = total - config.params_to_remove
    elif all(g.fixed is not None for g in groups):
        budget = float("inf")
    else:
        raise BudgetError("give a budget: keep_ratio or params_to_remove (or rank_pattern for every group)")
    allocate = allocate_sis if config.allocation == "sis" else allocate_uniform
    ranks = allocate(groups, budget)
    allocated = time.perf_counter()

    # Build the new model
    params_before = sum(p.numel() for p in model.parameters())
    target = model if inplace else copy.deepcopy(model)
    spec = SlimSpec()
    reports: list[GroupReport] = []
    for site in sites.attention:
        qk_name, vo_name = f"{site.name}:qk", f"{site.name}:vo"
        if qk_name not in ranks and vo_name not in ranks:
            continue
        qk_rank, vo_rank = ranks.get(qk_name, site.head_dim), ranks.get(vo_name, site.head_dim)
        attn = get_module(target, site.name)
        weights = _attention_weights(attn, site, decompositions.get(qk_name), decompositions.get(vo_name), qk_rank, vo_rank)
        a_spec = AttentionSpec(site.heads, site.head_dim, qk_rank, vo_rank, layout=config.head_layout)
        if config.head_layout == "uniform":
            weights = to_uniform_layout(weights, a_spec)
        install_attention(attn, a_spec, weights)
        spec.attention[site.name] = a_spec
    for site in sites.feed_forward:
        name = f"{site.name}:ffn"
        if name not in ranks:
            continue
        width = ranks[name]
        f_spec = FeedForwardSpec(site.inner_dim, width, site.gated)
        install_feed_forward(get_module(target, site.name), site.up, site.down, f_spec,
                             decompositions[name].weights(width), target)
        spec.feed_forward[site.name] = f_spec
    for g in groups:
        p_full, f_full = full_cost[g.name]
        r = ranks[g.name]
        reports.append(GroupReport(g.name, kinds[g.name], r, g.full, round(p_full * r / g.full), round(p_full),
                                   f_full * r / g.full, f_full, float(g.errors[r]), g.influence))

    order = {name: i for i, name in enumerate(n for n, _ in model.named_modules())}
    kind_order = {"qk": 0, "vo": 1, "ffn": 2}
    reports.sort(key=lambda r: (order.get(r.name.rsplit(":", 1)[0], len(order)), kind_order[r.kind]))
    report = SlimReport(
        params_before=params_before,
        params_after=sum(p.numel() for p in target.parameters()),
        compressible_params_before=sum(r.full_params for r in reports),
        compressible_params_after=sum(r.params for r in reports),
        flops_before=sum(r.full_flops for r in reports),
        flops_after=sum(r.flops for r in reports),
        groups=reports,
        seconds=round(time.perf_counter() - started, 3),
        stage_seconds={"decomposition": round(decomposed - started, 3), "allocation": round(allocated - decomposed, 3),
                       "rewrite": round(time.perf_counter() - allocated, 3)},
        config=config.to_dict(),
    )
    target.slimdiff_spec = spec
    target.slimdiff_report = report
    logger.info("slimmed %d groups: %s -> %s parameters in %.1fs", len(groups), f"{report.params_before:,}",
                f"{report.params_after:,}", report.seconds)
    return target


class _CachedDecompositions(dict):
    """The decompositions of one slim() call, read from / written to the caller's cache when one is given.

    Cache keys name everything a decomposition depends on: the calibration, the weight tensor (and its
    version counter, which in-place edits bump) and the settings that change the maths.
    """

    def __init__(self, cache: dict | None, model: nn.Module, calibration: Calibration, config: SlimConfig,
                 device: torch.device):
        super().__init__()
        self.cache = cache
        if cache is not None:  # keep the calibration alive so its id() cannot be reused by another object
            kept = cache.setdefault("calibrations", [])
            if not any(c is calibration for c in kept):
                kept.append(calibration)
        self.settings = (id(calibration), str(config.timestep_weighting), config.vo_statistics, config.ffn_ridge,
                         config.ffn_refit_bias, str(device))

    def get_or_compute(self, name: str, weight: torch.Tensor, compute) -> Any:
        if self.cache is None:
            value = compute()
        else:
            key = (name, weight.data_ptr(), _version_counter(weight), *self.settings)
            if key not in self.cache:
                self.cache[key] = compute()
            value = self.cache[key]
        self[name] = value
        return value


def _version_counter(t: torch.Tensor) -> int | None:
    """The tensor's in-place edit counter; None for inference tensors (ComfyUI's weights), which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _attention_weights(attn: nn.Module, site: AttentionSite, qk, vo, qk_rank: int, vo_rank: int) -> dict[str, torch.Tensor]:
    """Separate-layout weights for one attention; an untouched group keeps its original weights."""
    out: dict[str, torch.Tensor] = {}
    if qk is not None:
        out |= qk.weights(qk_rank)
    else:
        for key, layer in (("q", attn.to_q), ("k", attn.to_k)):
            out[f"{key}.weight"] = layer.weight.detach().double()
            out[f"{key}.bias"] = layer.bias.detach().double() if layer.bias is not None else \
                torch.zeros(layer.out_features, dtype=torch.float64)
    if vo is not None:
        out |= vo.weights(vo_rank)
    else:
        out["v.weight"] = attn.to_v.weight.detach().double()
        out["v.bias"] = attn.to_v.bias.detach().double() if attn.to_v.bias is not None else \
            torch.zeros(attn.to_v.out_features, dtype=torch.float64)
        out["out.weight"] = attn.to_out[0].weight.detach().double()
    return {k: v.cpu() for k, v in out.items()}
