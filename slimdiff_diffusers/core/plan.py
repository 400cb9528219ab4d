"""plan_slim(): decide every width and compute every factor, without touching or copying the model.

The plan is the middle of the one-way flow ``calibrate → Calibration → plan → apply → save``:

1. check the configuration's patterns and the calibration against the model (once);
2. decompose every targeted group (closed form, fp64; optionally through a caller-owned cache);
3. allocate ranks under the budget (Spectral Influence Score + greedy allocation);
4. compute what the rewrite needs for the chosen ranks that only the statistics know (the FFN refits).

After step 4 the plan no longer needs the calibration, so callers can free the statistics before
:func:`~slimdiff_diffusers.core.apply.apply_plan` builds the narrow layers. QK/VO factors hold the original
weights by reference (no copies), so a plan costs a few per-head matrices per attention plus the refit
feed-forward down projections in the model's dtype.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from .allocation import RankGroup, allocate_sis, allocate_uniform, rank_grid
from .basis_maps import ffn_refit_with_map
from .calibration import Calibration, StatKeys, model_fingerprint
from .config import ATTENTION_KINDS, GROUP_KINDS, SlimConfig
from .decompositions import (
    FFNDecomposition,
    JointQKDecomposition,
    JointVODecomposition,
    LinearRef,
    QKDecomposition,
    VODecomposition,
    decompose_ffn_augmented,
    decompose_qk,
    decompose_qk_joint,
    decompose_vo,
    decompose_vo_joint,
    head_moment,
    pool_moments,
)
from .errors import BudgetError, CalibrationError, ConfigError
from .heap import release_free_heap
from .moments import AugmentedMoment
from .propagation import ProgressCallback
from .report import GroupReport
from .rewrite import get_module
from .sites import AttentionSite, FeedForwardSite, Sites
from .spec import AttentionSpec, FeedForwardSpec, SlimSpec

logger = logging.getLogger("slimdiff")


@dataclass
class GroupPlan(GroupReport):
    """One group (QK or VO of an attention, or a feed-forward): its report fields plus how to build it.

    The inherited :class:`GroupReport` fields give the chosen rank (per-head rank for qk/vo, kept hidden channels
    for ffn), the full rank, costs at both (FLOPs: multiply-accumulates per sample at the calibration
    resolution), the exact predicted relative error e_g(rank) and the influence α_g. ``name`` is
    ``"<site path>:<kind>"``, what ``rank_pattern`` keys are matched against.

    Attributes:
        site: the attention or feed-forward the group belongs to.
        factors: QK/VO decomposition (truncated to ``rank`` at apply), or the FFN's kept channels and refit
            down projection (``{"channels", "down.weight", "down.bias"}``).
    """

    site: AttentionSite | FeedForwardSite = field(default=None)
    factors: QKDecomposition | VODecomposition | dict[str, torch.Tensor] = field(default=None, repr=False)
    # VO only: reader short name ("out", "add_out") -> (H, dh, dh) moment of the head outputs it reads, for the
    # least-squares refit of that reader (SlimConfig.vo_output_refit); None: the SVD's own factor
    reader_moments: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def weights(self) -> dict[str, torch.Tensor]:
        """The QK/VO factors truncated to ``rank`` (VO readers refit when ``reader_moments`` says so)."""
        if self.kind == "vo":
            return self.factors.weights(self.rank, self.reader_moments)
        return self.factors.weights(self.rank)

    def report(self) -> GroupReport:
        return GroupReport(**{f.name: getattr(self, f.name) for f in fields(GroupReport)})


@dataclass
class SlimPlan:
    """Every width and factor of one slimming, ready for :func:`~slimdiff_diffusers.core.apply_plan`.

    Attributes:
        config: the settings the plan was made with.
        groups: one record per slimmed group, in model order (QK, VO, FFN within a block).
        spec: the widths the applied model will have (:class:`SlimSpec`).
        fingerprint: the model the plan belongs to (checked by ``apply_plan``).
        stage_seconds: ``"decomposition"`` and ``"allocation"`` wall-clock seconds.
        adapter_params: parameters of the cross-attentions that ``adapter_compatible`` left whole.
        allocation_refinement: the refinement the allocation ran (``config.allocation_refinement`` with
            ``"auto"`` resolved for this model: ``"exchange"``, ``"refill"`` or ``"none"``); ``None`` when
            ``allocation="uniform"``, which has none.
        vo_output_refit: attention kind -> how the VO readers of that kind's slimmed groups were fit
            (``config.vo_output_refit`` resolved: ``"attention_output"`` or ``"none"``); empty without VO groups.
        vo_statistics: attention kind -> what whitened the value bases of that kind's slimmed VO groups
            (``config.vo_statistics`` resolved: ``"input"`` or ``"attention_output"``); empty without VO groups.
        propagation: how the group influences were obtained (``config.propagation`` resolved: ``"measured"``,
            ``"probe"``, ``"block_influence"`` or ``"none"``).
    """

    config: SlimConfig
    groups: list[GroupPlan]
    spec: SlimSpec
    fingerprint: dict[str, Any]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    adapter_params: int = 0  # parameters of the cross-attentions SlimConfig.adapter_compatible keeps whole
    allocation_refinement: str | None = None
    vo_output_refit: dict[str, str] = field(default_factory=dict)
    vo_statistics: dict[str, str] = field(default_factory=dict)
    propagation: str | None = None

    def group(self, name: str) -> GroupPlan | None:
        return next((g for g in self.groups if g.name == name), None)

    @property
    def ranks(self) -> dict[str, int]:
        return {g.name: g.rank for g in self.groups}


# --------------------------------------------------------------------------------------------------
# Costs: parameters and multiply-accumulates per unit of rank
# --------------------------------------------------------------------------------------------------


def _bias(layer: nn.Linear) -> int:
    return 1 if layer.bias is not None else 0


def _attention_slopes(site: AttentionSite, root: nn.Module, tokens: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(params per rank, MACs per rank per sample row) for the qk and vo groups of one attention.

    Joint attention: every stream's projections narrow with the group, and the softmax runs over the
    concatenated sequence (all queries against all keys, the text queries included even where SD3's last
    block discards their outputs). Single-stream attention: the output projection is ``proj_out``'s attention
    columns, ``out_dim`` weights per channel like ``to_out``.
    """
    q, k, v = (get_module(root, p) for p in (site.q, site.k, site.v))
    h = site.heads
    n_q = tokens.get(site.q, 1.0)
    n_kv = tokens.get(site.k, n_q)
    qk_params = h * (q.in_features + _bias(q) + k.in_features + _bias(k))
    vo_params = h * (v.in_features + _bias(v) + site.out_dim)
    if not site.is_joint:
        qk_flops = h * (n_q * q.in_features + n_kv * k.in_features + n_q * n_kv)
        vo_flops = h * (n_kv * v.in_features + n_q * n_kv + n_q * site.out_dim)
        return {"qk": (qk_params, qk_flops), "vo": (vo_params, vo_flops)}
    aq, ak, av = (get_module(root, p) for p in (site.add_q, site.add_k, site.add_v))
    n_c = tokens.get(site.add_q, 1.0)
    n_all = n_q + n_c
    qk_params += h * (aq.in_features + _bias(aq) + ak.in_features + _bias(ak))
    vo_params += h * (av.in_features + _bias(av))
    qk_flops = h * (n_q * (q.in_features + k.in_features) + n_c * (aq.in_features + ak.in_features) + n_all * n_all)
    vo_flops = h * (n_q * v.in_features + n_c * av.in_features + n_all * n_all + n_q * site.out_dim)
    if site.add_out:
        add_out = get_module(root, site.add_out)
        vo_params += h * add_out.out_features
        vo_flops += h * n_c * add_out.out_features
    return {"qk": (qk_params, qk_flops), "vo": (vo_params, vo_flops)}


def _ffn_slope(site: FeedForwardSite, root: nn.Module, tokens: dict[str, float]) -> tuple[float, float]:
    up, down = get_module(root, site.up), get_module(root, site.down)
    per_channel_up = (2 if site.gated else 1) * (up.in_features + _bias(up))
    n = tokens.get(site.hidden_key, 1.0)
    return per_channel_up + down.out_features, n * ((2 if site.gated else 1) * up.in_features + down.out_features)


def _influence(calibration: Calibration, config: SlimConfig, propagation: str, group: str, block: str,
               output_path: str | list[tuple[str, str, float]], stream: str = "hidden") -> float:
    """α_g: measured (``propagation="measured"``, method.md §4.1.1), or π_b^p · ε_g (method.md §4.1, decisions.md
    row 1) with ``propagation`` (resolved) naming π_b.

    ``output_path`` is the group's output, normalised by the energy of the residual stream it writes to
    (``stream``: the block's hidden states, or its ``"context"`` stream); or, for a joint attention writing
    to both streams, a list of ``(output path, stream, token share)`` whose relative energies are averaged by
    token share (method.md §8.2).
    """
    from .calibrator import context_stream

    if propagation == "measured":
        return calibration.measured_influence(group)
    weighting = config.timestep_weighting

    def relative(path: str, which: str) -> float:
        energy_of = context_stream(block) if which == "context" else block
        return calibration.output_energy(path, weighting) / max(calibration.block_input_energy(energy_of, weighting), 1e-30)

    if isinstance(output_path, str):
        epsilon = relative(output_path, stream)
    else:
        total = sum(share for *_, share in output_path)
        epsilon = sum(relative(path, which) * share for path, which, share in output_path) / max(total, 1e-30)
    if propagation == "probe":
        pi = calibration.propagation_factor(block)
    elif propagation == "block_influence":
        pi = calibration.block_influence(block)
    else:
        pi = 1.0
    return (pi ** config.propagation_power) * epsilon


def _step(full: int, multiple: int) -> int:
    # A group narrower than two grid steps could not be slimmed at all; give it a quarter of its width.
    return multiple if full >= 2 * multiple else max(1, full // 4)


def group_grid(site: AttentionSite | FeedForwardSite, config: SlimConfig) -> list[int]:
    """The ranks the allocation may give a group of ``site`` (per-head ranks for qk/vo, kept channels for ffn)."""
    if isinstance(site, AttentionSite):
        step = _step(site.head_dim, config.rank_multiple)
        return rank_grid(site.head_dim, step, config.min_rank or step)
    step = _step(site.inner_dim, config.ffn_multiple)
    return rank_grid(site.inner_dim, step, max(step, config.min_ffn_fraction * site.inner_dim))


# --------------------------------------------------------------------------------------------------
# plan_slim()
# --------------------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    """A decomposed group before allocation."""

    kind: str
    site: AttentionSite | FeedForwardSite
    decomposition: Any
    rank_group: RankGroup
    full_params: float
    full_flops: float


@torch.no_grad()
def plan_slim(model: nn.Module, calibration: Calibration, config: SlimConfig | None = None, *,
              strict_weights: bool = True, decomposition_cache: dict | None = None,
              progress: ProgressCallback | None = None, basis_maps: bool = False, release_statistics: bool = False,
              **overrides: Any) -> SlimPlan:
    """Decide the width of every group of ``model`` and compute its factors; ``model`` is not modified.

    Args:
        model: the model the calibration was computed on.
        calibration: from :func:`calibrate`; checked against ``model`` first.
        config: a :class:`SlimConfig`; keyword ``overrides`` (e.g. ``keep_ratio=0.6``) replace its fields.
        strict_weights: refuse a calibration computed on different weights of the same architecture.
        decomposition_cache: a dict you own; decompositions are stored in it and reused by later calls with
            the same model, calibration and decomposition settings, so planning at several budgets decomposes
            once (drop it to free the factors).
        progress: ``progress(done, total)`` after each attention / feed-forward is decomposed and after each
            refit; it may raise to cancel (nothing has been changed).
        basis_maps: also record each narrowed feed-forward's refit map (``"down.input_map"``/``"down.bias_map"``
            in its factors; :mod:`.basis_maps`), which LoRAs made for the original model need. It costs one m×k
            matrix per narrowed feed-forward in the model's dtype.
        release_statistics: free each feed-forward's moment from ``calibration`` once its refit is done, for a
            caller that owns the calibration and discards it after planning (``pipe.slim`` with statistics it
            collected itself); the calibration cannot be used or saved afterwards. Not with ``decomposition_cache``.

    Returns:
        A :class:`SlimPlan`. Raises :class:`ConfigError` / :class:`BudgetError` /
        :class:`CalibrationMismatchError` before any decomposition when the settings or the calibration do
        not fit the model.
    """
    started = time.perf_counter()
    config = SlimConfig.resolve(config, **overrides)
    if release_statistics and decomposition_cache is not None:
        raise ConfigError("release_statistics frees the statistics that a decomposition_cache reuses: use one or the other")
    calibration.check_compatible(model, strict_weights=strict_weights)
    sites = calibration.sites
    site_names = [s.name for s in [*sites.attention, *sites.feed_forward]]
    group_names = [f"{s.name}:{k}" for s in sites.attention for k in ("qk", "vo")] + \
        [f"{s.name}:ffn" for s in sites.feed_forward]
    config.check_patterns(site_names, group_names)
    if not config.has_budget and not config.rank_pattern:
        raise BudgetError("give a budget: keep_ratio or params_to_remove (or rank_pattern for every group)")
    vo_output_refit = _resolve_vo_output_refit(sites, calibration, config) if "vo" in config.targets else {}
    vo_statistics = _resolve_vo_statistics(sites, calibration, config) if "vo" in config.targets else {}
    propagation = config.propagation_for(calibration.group_influence is not None)
    if config.propagation == "auto" and propagation != "measured":
        logger.warning("this calibration has no measured group influence (it was made before SlimDiff measured it, "
                       "or with CalibrationConfig(group_influence=False)): the allocation models each group's "
                       "influence with the block probe (propagation='probe'); calibrate again for the measured "
                       "allocation")
    if propagation == "measured":  # before any decomposition
        calibration.require_group_influence()
    elif propagation == "probe":
        calibration.require_propagation()

    release_free_heap()  # what calibration freed (activations, fold buffers) before planning adds its own
    tokens = calibration.tokens_per_row
    weighting = config.timestep_weighting
    # Decompositions run in fp64 where the weights are (or on config.device).
    device = torch.device(config.device) if config.device else next(model.parameters()).device
    cache = _DecompositionCache(decomposition_cache, calibration, config, device)

    def moment(path: str) -> torch.Tensor:
        return calibration.augmented_input_moment(path, weighting).to(device)

    attention = [s for s in sites.attention if not config.excludes_site(s)]
    feed_forward = [s for s in sites.feed_forward if not config.excludes_site(s)] if "ffn" in config.targets else []
    adapter_params = sum(_attention_params(model, s) for s in sites.attention if config.kept_for_adapters(s))
    if adapter_params:
        logger.info("adapter_compatible: %d cross-attentions (%s parameters) stay in their original basis",
                    sum(config.kept_for_adapters(s) for s in sites.attention), f"{adapter_params:,}")
    if config.head_layout == "uniform":
        kinds = sorted({s.kind for s in attention if s.kind != "plain"})
        if kinds:
            raise ConfigError(f"head_layout='uniform' is for plain attention (UNets, PixArt; ComfyUI's backends); this "
                              f"model has {' and '.join(kinds)} attention, whose slim processors take the separate "
                              "layout: use head_layout='separate' (the default)")
    total_steps, done = len(attention) + 2 * len(feed_forward), 0

    def advance() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total_steps)

    # Feed-forwards first: their decompositions have the largest transients (one (m + 1)² fp64 matrix each), and
    # before the attention factors exist (VO holds a fp64 copy of every output projection) the peak is lower.
    ffn_decompositions: dict[str, FFNDecomposition] = {}
    for site in feed_forward:
        down = get_module(model, site.down)
        # A single-stream block's MLP is read by proj_out's last inner_dim columns only.
        down_weight = down.weight[:, -site.inner_dim:] if site.kind == "single" else down.weight

        def ffn(down=down, site=site, down_weight=down_weight) -> FFNDecomposition:
            def moment_blocks() -> AugmentedMoment:
                return calibration.augmented_input_blocks(site.hidden_key, weighting, device)

            # Blocks built from the statistics, never the (m+1)² moment itself: the decomposition builds each
            # matrix it factorises straight from the sums, and keeps this loader (not the blocks, which would
            # pin a spilled moment) for the one refit.
            return decompose_ffn_augmented(down_weight.to(device), _to(down.bias, device), moment_blocks,
                                           ridge=config.ffn_ridge, refit_bias=config.ffn_refit_bias,
                                           selection=config.ffn_selection)
        ffn_decompositions[f"{site.name}:ffn"] = cache.get(f"{site.name}:ffn", down.weight, ffn)
        advance()

    candidates: list[_Candidate] = []
    for site in attention:
        attn = get_module(model, site.name)
        slopes = _attention_slopes(site, model, tokens)
        outputs = _attention_outputs(site, tokens)
        grid = group_grid(site, config)
        decompositions: dict[str, Any] = {}
        if "qk" in config.targets and site.qk_decomposable:
            if site.is_joint:
                decompositions["qk"] = cache.get(f"{site.name}:qk", attn.to_q.weight, lambda site=site: _joint_qk(
                    model, site, moment, tokens, device))
            else:
                shared = calibration.shares_input(site.q, site.k)
                decompositions["qk"] = cache.get(f"{site.name}:qk", attn.to_q.weight, lambda site=site, attn=attn, shared=shared: decompose_qk(
                    attn.to_q.weight.to(device), _to(attn.to_q.bias, device), attn.to_k.weight.to(device),
                    _to(attn.to_k.bias, device), site.heads, moment(site.q), moment(site.q if shared else site.k)))
        if "vo" in config.targets:
            if site.is_joint:
                def vo(site=site):
                    return _joint_vo(model, site, calibration, config, vo_statistics[site.kind], moment, tokens,
                                     device)
            elif vo_statistics[site.kind] == "attention_output":
                def vo(site=site, attn=attn):
                    return decompose_vo(attn.to_v.weight.to(device), _to(attn.to_v.bias, device),
                                        _out_weight(model, site).to(device), site.heads,
                                        head_output_moment=calibration.attention_output_moment(site, weighting)[0].to(device))
            else:
                def vo(site=site, attn=attn):
                    return decompose_vo(attn.to_v.weight.to(device), _to(attn.to_v.bias, device),
                                        _out_weight(model, site).to(device), site.heads, value_moment=moment(site.v))
            decompositions["vo"] = cache.get(f"{site.name}:vo", attn.to_v.weight, vo)
        for kind, decomposition in decompositions.items():
            name = f"{site.name}:{kind}"
            params_slope, flops_slope = slopes[kind]
            slope = params_slope if config.budget == "params" else flops_slope
            influence = _influence(calibration, config, propagation, name, site.block, outputs)
            group = RankGroup(name, grid, slope, decomposition.errors.cpu(), influence,
                              fixed=config.fixed_rank(name), max_sparsity=config.max_group_sparsity)
            candidates.append(_Candidate(kind, site, decomposition, group, params_slope * site.head_dim,
                                         flops_slope * site.head_dim))
        advance()
    for site in feed_forward:
        params_slope, flops_slope = _ffn_slope(site, model, tokens)
        grid = group_grid(site, config)
        name = f"{site.name}:ffn"
        decomposition = ffn_decompositions[name]
        group = RankGroup(name, grid, params_slope if config.budget == "params" else flops_slope,
                          decomposition.errors.cpu(),
                          _influence(calibration, config, propagation, name, site.block, site.name, site.stream),
                          fixed=config.fixed_rank(name), max_sparsity=config.max_group_sparsity)
        candidates.append(_Candidate("ffn", site, decomposition, group, params_slope * site.inner_dim,
                                     flops_slope * site.inner_dim))
    decomposed = time.perf_counter()
    if not candidates:
        raise BudgetError("nothing to slim: every group is excluded or not targeted")
    groups = [c.rank_group for c in candidates]
    for g in groups:
        if g.fixed is not None and g.fixed > g.full:
            raise BudgetError(f"rank_pattern gives {g.name} rank {g.fixed}, above its full rank {g.full}")
    refinement = config.allocation_refinement_for(s.kind for s in sites.attention) \
        if config.allocation == "sis" else None
    ranks = _allocate(groups, config, refinement)
    allocated = time.perf_counter()

    # The refit is the one step that needs the statistics again: do it now so the plan stands alone. Narrowest
    # first: with release_statistics, the 5120-wide refits of SD1.5 then run after the smaller moments are freed.
    refits: dict[str, dict[str, torch.Tensor]] = {}
    for c in sorted((c for c in candidates if c.kind == "ffn"), key=lambda c: c.site.inner_dim):
        r = ranks[c.rank_group.name]
        dtype = get_module(model, c.site.down).weight.dtype
        if basis_maps:
            refits[c.rank_group.name] = ffn_refit_with_map(c.decomposition, r, dtype)
        else:
            refits[c.rank_group.name] = {k: (v if k == "channels" else v.to(dtype))
                                         for k, v in c.decomposition.weights(r).items()}
        if release_statistics:
            # This FFN's moment (the bulk of the statistics) is never read again: free it before the next
            # refit adds its factors and maps, so the peak stays at the model plus the statistics.
            c.decomposition.release_moment()
            calibration.release_input(c.site.hidden_key)
        release_free_heap()
        advance()
    records: list[GroupPlan] = []
    for c in candidates:
        g, r = c.rank_group, ranks[c.rank_group.name]
        factors = refits[g.name] if c.kind == "ffn" else c.decomposition
        readers = _reader_moments(c.site, calibration, config, device) \
            if c.kind == "vo" and vo_output_refit[c.site.kind] != "none" else None
        records.append(GroupPlan(name=g.name, kind=c.kind, rank=r, full_rank=g.full,
                                 params=round(c.full_params * r / g.full), full_params=round(c.full_params),
                                 flops=c.full_flops * r / g.full, full_flops=c.full_flops,
                                 predicted_error=float(g.errors[r]), influence=g.influence, site=c.site,
                                 factors=factors, reader_moments=readers))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    kind_order = {kind: i for i, kind in enumerate(GROUP_KINDS)}
    records.sort(key=lambda rec: (order.get(rec.site.name, len(order)), kind_order[rec.kind]))
    # The plan belongs to the model it was made on: with strict_weights=False (a LoRA fused into the original
    # since the calibration) that is not the calibration's model, and apply_plan must accept this one.
    fingerprint = calibration.fingerprint if strict_weights else model_fingerprint(model, sites)
    plan = SlimPlan(config=config, groups=records, spec=_spec(records, config), fingerprint=fingerprint,
                    adapter_params=adapter_params, allocation_refinement=refinement, propagation=propagation,
                    vo_output_refit={kind: vo_output_refit[kind] for kind in
                                     dict.fromkeys(g.site.kind for g in records if g.kind == "vo")},
                    vo_statistics={kind: vo_statistics[kind] for kind in
                                   dict.fromkeys(g.site.kind for g in records if g.kind == "vo")},
                    # The FFN refits are the last closed-form step of the decompositions (MADAC), timed with them.
                    stage_seconds={"decomposition": round(decomposed - started + time.perf_counter() - allocated, 3),
                                   "allocation": round(allocated - decomposed, 3)})
    logger.info("planned %d groups in %.1fs", len(records), time.perf_counter() - started)
    return plan


def _attention_params(model: nn.Module, site: AttentionSite) -> int:
    """Parameters of an attention's q/k/v/out projections."""
    return sum(p.numel() for path in (site.q, site.k, site.v, site.out) for p in get_module(model, path).parameters())


def _allocate(groups: list[RankGroup], config: SlimConfig, refinement: str | None) -> dict[str, int]:
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
    if config.allocation == "uniform":
        return allocate_uniform(groups, budget)
    return allocate_sis(groups, budget, refinement=refinement)


def _spec(records: list[GroupPlan], config: SlimConfig) -> SlimSpec:
    spec = SlimSpec()
    for rec in records:
        site = rec.site
        if rec.kind == "ffn":
            spec.feed_forward[site.name] = FeedForwardSpec(site.inner_dim, rec.rank, site.gated, kind=site.kind)
        elif site.name not in spec.attention:
            ranks = {r.kind: r.rank for r in records if r.site is site}
            spec.attention[site.name] = AttentionSpec(site.heads, site.head_dim, ranks.get("qk", site.head_dim),
                                                      ranks.get("vo", site.head_dim), layout=config.head_layout,
                                                      kind=site.kind)
    return spec


class _DecompositionCache:
    """The decompositions of one plan, read from / written to the caller's cache when one is given.

    Cache keys name everything a decomposition depends on: the calibration, the weight tensor (and its
    version counter, which in-place edits bump) and the settings that change the maths.
    """

    def __init__(self, cache: dict | None, calibration: Calibration, config: SlimConfig, device: torch.device):
        self.cache = cache
        if cache is not None:  # keep the calibration alive so its id() cannot be reused by another object
            kept = cache.setdefault("calibrations", [])
            if not any(c is calibration for c in kept):
                kept.append(calibration)
        self.settings = (id(calibration), str(config.timestep_weighting), str(config.vo_statistics), config.ffn_ridge,
                         config.ffn_refit_bias, config.ffn_selection, str(device))

    def get(self, name: str, weight: torch.Tensor, compute) -> Any:
        if self.cache is None:
            return compute()
        key = (name, weight.data_ptr(), _version_counter(weight), *self.settings)
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


def _version_counter(t: torch.Tensor) -> int | None:
    """The tensor's in-place edit counter; None for inference tensors (ComfyUI's weights), which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


def _out_weight(model: nn.Module, site: AttentionSite) -> torch.Tensor:
    """The output projection's weight over the head outputs (single-stream: proj_out's attention columns)."""
    out = get_module(model, site.out)
    return out.weight[:, :site.heads * site.head_dim] if site.kind == "single" else out.weight


def _has_head_outputs(site: AttentionSite, calibration: Calibration) -> bool:
    return all(StatKeys.heads(p, "n") in calibration.tensors for p in site.output_paths)


def _resolve_vo_statistics(sites: Sites, calibration: Calibration, config: SlimConfig) -> dict[str, str]:
    """Attention kind -> what whitens its VO bases (``"input"`` or ``"attention_output"``), checked against what the
    calibration holds: ``vo_statistics="auto"`` whitens with the value input where the calibration has no head
    outputs for a site, and warns once (an explicit setting was refused by :func:`_resolve_vo_output_refit`)."""
    resolved = {kind: config.vo_statistics_for(kind) for kind in ATTENTION_KINDS}
    if config.vo_statistics != "auto":
        return resolved
    targeted = [s for s in sites.attention if not config.excludes_site(s)]
    lacking = sorted({s.kind for s in targeted
                      if resolved[s.kind] == "attention_output" and not _has_head_outputs(s, calibration)})
    if lacking:
        logger.warning("vo_statistics='auto' would whiten the VO bases of the %s attention with their attention "
                       "outputs, but this calibration has no attention-output statistics for them: they are whitened "
                       "with the value inputs (calibrate with attention_output_statistics='auto' or True)",
                       "/".join(lacking))
        resolved |= dict.fromkeys(lacking, "input")
    return resolved


def _resolve_vo_output_refit(sites: Sites, calibration: Calibration, config: SlimConfig) -> dict[str, str]:
    """Attention kind -> how its VO readers are fit (``"attention_output"`` or ``"none"``), checked against what
    the calibration holds before any decomposition runs.

    An explicit setting that reads attention outputs (``vo_statistics="attention_output"``,
    ``vo_output_refit="attention_output"``) is refused when the calibration lacks them for a site it covers;
    ``vo_output_refit="auto"`` keeps the SVD factor there instead and warns once (a calibration made with
    ``attention_output_statistics=False``, or saved by SlimDiff before they were collected by default).
    """
    targeted = [s for s in sites.attention if not config.excludes_site(s)]
    for option, uses_outputs, instead in (
            ("vo_statistics", lambda kind: config.vo_statistics != "auto"
             and config.vo_statistics_for(kind) == "attention_output", "'input'"),
            ("vo_output_refit", lambda kind: config.vo_output_refit == "attention_output", "'none'")):
        needing = [s.name for s in targeted if uses_outputs(s.kind) and not _has_head_outputs(s, calibration)]
        if needing:
            raise CalibrationError(
                f"{option}={getattr(config, option)!r} uses the attention outputs of {', '.join(needing[:4])}"
                f"{f' (and {len(needing) - 4} more)' if len(needing) > 4 else ''}, which this calibration did not "
                "collect (attention_output_statistics=False): re-calibrate with "
                f"attention_output_statistics=True, or pass {option}={instead}")
    resolved = {kind: config.vo_output_refit_for(kind) for kind in ATTENTION_KINDS}
    lacking = sorted({s.kind for s in targeted if resolved[s.kind] != "none" and not _has_head_outputs(s, calibration)})
    if lacking:
        logger.warning("vo_output_refit='auto' would refit the VO readers of the %s attention by least squares, "
                       "but this calibration has no attention-output statistics for them: they keep the SVD factor "
                       "(calibrate with attention_output_statistics='auto' or True to refit them)", "/".join(lacking))
        resolved |= dict.fromkeys(lacking, "none")
    return resolved


def _reader_moments(site: AttentionSite, calibration: Calibration, config: SlimConfig,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """The per-head moments of the head outputs each VO reader of ``site`` reads (``{"out": G}``, plus
    ``"add_out"`` for joint attention with a second output), for the least-squares refit of the readers."""
    readers = {"out": site.out} | ({"add_out": site.add_out} if site.add_out else {})
    return {name: calibration.head_output_moment(path, config.timestep_weighting)[0].to(device).double()
            for name, path in readers.items()}


def _attention_outputs(site: AttentionSite, tokens: dict[str, float]) -> str | list[tuple[str, str, float]]:
    """What :func:`_influence` normalises an attention's output energy by (both streams for joint attention)."""
    if not site.add_out:
        return site.out
    return [(site.out, "hidden", tokens.get(site.q, 1.0)), (site.add_out, "context", tokens.get(site.add_q, 1.0))]


def _joint_qk(model: nn.Module, site: AttentionSite, moment, tokens: dict[str, float],
              device: torch.device) -> JointQKDecomposition:
    def stream(path: str) -> tuple[LinearRef, torch.Tensor, float]:
        layer = get_module(model, path)
        return LinearRef.of(layer.weight.to(device), _to(layer.bias, device)), moment(path), tokens.get(path, 1.0)
    return decompose_qk_joint({"q": stream(site.q), "add_q": stream(site.add_q)},
                              {"k": stream(site.k), "add_k": stream(site.add_k)}, site.heads)


def _joint_vo(model: nn.Module, site: AttentionSite, calibration: Calibration, config: SlimConfig,
              statistics: str, moment, tokens: dict[str, float], device: torch.device) -> JointVODecomposition:
    """Joint VO (method.md §8.2): one value transform for to_v/add_v_proj, pooled metric, readers weighted by
    their query tokens; ``statistics`` (``"input"`` or ``"attention_output"``) is the resolved
    ``vo_statistics`` of the site's kind."""
    weighting = config.timestep_weighting
    values = {}
    for short, path in (("v", site.v), ("add_v", site.add_v)):
        layer = get_module(model, path)
        values[short] = LinearRef.of(layer.weight.to(device), _to(layer.bias, device))
    n_img, n_txt = tokens.get(site.q, 1.0), tokens.get(site.add_q, 1.0)
    outputs = {"out": (get_module(model, site.out).weight.to(device), n_img)}
    if site.add_out:
        outputs["add_out"] = (get_module(model, site.add_out).weight.to(device), n_txt)
    if statistics == "attention_output":
        # The head outputs the readers actually see: image queries (to_out) and text queries (to_add_out).
        readers = [(site.out, n_img)] + ([(site.add_out, n_txt)] if site.add_out else [])
        g = pool_moments([calibration.head_output_moment(p, weighting)[0].to(device) for p, _ in readers],
                         [n for _, n in readers])
    else:
        # The value vectors of both streams, pooled over the concatenated key sequence.
        g = pool_moments([head_moment(values["v"], site.heads, moment(site.v)),
                          head_moment(values["add_v"], site.heads, moment(site.add_v))],
                         [tokens.get(site.v, n_img), tokens.get(site.add_v, n_txt)])
    return decompose_vo_joint(values, outputs, site.heads, g)


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def check_plan_target(model: nn.Module, plan: SlimPlan) -> str | None:
    """Why ``model`` is not the model ``plan`` was made for (None when it is)."""
    from .calibration import compare_fingerprints
    from .sites import find_sites

    return compare_fingerprints(plan.fingerprint, model_fingerprint(model, find_sites(model)), strict_weights=True)
