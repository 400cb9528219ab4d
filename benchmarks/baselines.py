"""The baselines of method.md §9, at the same parameter budget and on the same calibration as SlimDiff.

Every baseline is a function ``(model, calibration, keep_ratio, targets=...) -> new model`` (the input model is
never modified):

====================  ============================================================================================
``truncated_svd``      (a) data-free truncated SVD of every targeted matrix, one uniform kept fraction
``whitened_svd``       (b) SVD-LLM-style whitened SVD of every matrix in isolation (input second moment)
``magnitude_pruning``  (c) activation-magnitude head / FFN-neuron pruning with a global threshold, no refit
``uniform_madac``      (d) SlimDiff's decompositions (MADAC) with the same kept fraction in every group
``modegpt_madac``      (e) MoDeGPT's block-influence softmax allocation, MADAC decompositions
``obs_pruning``        (f) OBS-Diff-style structured pruning: whole heads / FFN channels, inverse-Hessian update
====================  ============================================================================================

Every baseline handles the groups the core finds (``slimdiff_diffusers.find_sites``): UNet/PixArt attention and
FFNs, joint attention (both streams' q/k/v projections, ``to_out.0`` and ``to_add_out``), Flux single-stream
blocks (``proj_out``'s attention and MLP columns) and ``ff_context``; QK is left whole where the core leaves it
whole (QK-norm, RoPE).

``calibration`` is a :class:`BaselineCalibration`: the :class:`slimdiff_diffusers.Calibration` that SlimDiff
uses, plus the few statistics that the per-matrix baselines need and SlimDiff does not collect
(:class:`ExtraStatistics`: full input moments of ``to_out[0]`` and of the feed-forward up projection, mean
absolute activations of heads and FFN channels). Both come from the same calibration trajectories.

The budget is a fraction of the *compressible parameters of the targeted groups*, counted exactly like
:func:`slimdiff_diffusers.core.slim` reports ``compressible_params_*``:

* QK group: ``to_q`` and ``to_k`` weights and biases;
* VO group: ``to_v`` weight and bias, ``to_out[0]`` weight (its bias is a fixed cost, not counted);
* FFN group: up projection weight and bias, down projection weight (its bias is not counted).

:func:`compressible_params` counts them on any model (original, slimmed or baseline) from the modules that are
actually there, so every method is measured with the same ruler.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import slimdiff_diffusers as sd
from slimdiff_diffusers.core.decompositions import augment
from slimdiff_diffusers.core.plan import _attention_slopes, _ffn_slope
from slimdiff_diffusers.core.rewrite import get_module, set_module
from slimdiff_diffusers.core.sites import AttentionSite, FeedForwardSite, Sites

ALL_TARGETS: tuple[str, ...] = ("qk", "vo", "ffn")

# The MoDeGPT re-implementation's defaults (cbacary/MoDeGPT src/compression_utils.py::allocate_global_sparsity).
MODEGPT_SMOOTHING = 0.015
MODEGPT_MAX_SPARSITY = 0.8


# --------------------------------------------------------------------------------------------------
# Extra statistics (collected with our own hooks on the same calibration trajectories)
# --------------------------------------------------------------------------------------------------


class _Moment:
    """Running uncentered second moment and mean of row vectors, fp64."""

    def __init__(self, dim: int):
        self.xx = torch.zeros(dim, dim, dtype=torch.float64)
        self.x = torch.zeros(dim, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        self.xx += rows.T @ rows
        self.x += rows.sum(0)
        self.n += rows.shape[0]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(self.n, 1)
        return self.xx / n, self.x / n


@dataclass
class ExtraStatistics:
    """Statistics the per-matrix and magnitude baselines need beyond a SlimDiff :class:`Calibration`.

    Attributes:
        input_moments: ``path -> (E[xxᵀ], E[x])`` of the input of every reader of heads (``to_out[0]``,
            ``to_add_out``, a single-stream ``proj_out``: attention and MLP columns together) and of each FFN up
            projection.
        head_abs_mean: ``attention path -> (H,)`` mean |u| of each head's output u (over every reader's input).
        channel_abs_mean: ``feed-forward path -> (m,)`` mean |a_j| of each hidden channel (input of the down proj).
        query_abs_mean: ``attention path -> float`` mean |x| of the attention input (to normalise single-head layers).
    """

    input_moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    head_abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    channel_abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    query_abs_mean: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def collect_extra_statistics(model: nn.Module, sites: Sites) -> Iterator[Callable[[], ExtraStatistics]]:
    """Hook ``model`` for the duration of the ``with`` block; the yielded function returns the statistics.

    Use it around exactly the forward passes of the calibration run (not around propagation probing, whose
    perturbed passes would pollute the statistics).
    """
    moments: dict[str, _Moment] = {}
    head_sum: dict[str, torch.Tensor] = {}
    head_count: dict[str, int] = {}
    channel_sum: dict[str, torch.Tensor] = {}
    channel_count: dict[str, int] = {}
    query_sum: dict[str, float] = {}
    query_count: dict[str, int] = {}
    handles = []

    def moment_hook(path: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            acc = moments.get(path)
            if acc is None:
                acc = moments[path] = _Moment(x.shape[-1])
            acc.add(x)
        return hook

    def head_hook(site: AttentionSite) -> Callable:
        # The reader's input starts with the heads' outputs (a single-stream proj_out reads the MLP after them);
        # a joint attention's heads are read by to_out (image queries) and to_add_out (text queries): both count.
        width = site.heads * site.head_dim

        def hook(_m: nn.Module, args: tuple) -> None:
            u = args[0].detach()[..., :width].double().cpu()
            per_head = u.reshape(-1, site.heads, site.head_dim).abs()
            head_sum[site.name] = head_sum.get(site.name, 0) + per_head.sum(dim=(0, 2))
            head_count[site.name] = head_count.get(site.name, 0) + per_head.shape[0] * per_head.shape[2]
        return hook

    def query_hook(site: AttentionSite) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            query_sum[site.name] = query_sum.get(site.name, 0.0) + float(x.abs().sum())
            query_count[site.name] = query_count.get(site.name, 0) + x.numel()
        return hook

    def channel_hook(site: FeedForwardSite) -> Callable:
        # A single-stream block's MLP is the last inner_dim columns of proj_out's input.
        def hook(_m: nn.Module, args: tuple) -> None:
            a = args[0].detach()[..., -site.inner_dim:].double().cpu().reshape(-1, site.inner_dim)
            channel_sum[site.name] = channel_sum.get(site.name, 0) + a.abs().sum(0)
            channel_count[site.name] = channel_count.get(site.name, 0) + a.shape[0]
        return hook

    moment_paths: dict[str, None] = {}
    for site in sites.attention:
        for path in site.output_paths:
            moment_paths.setdefault(path, None)
            handles.append(get_module(model, path).register_forward_pre_hook(head_hook(site)))
        handles.append(get_module(model, site.q).register_forward_pre_hook(query_hook(site)))
    for site in sites.feed_forward:
        moment_paths.setdefault(site.up, None)
        handles.append(get_module(model, site.down).register_forward_pre_hook(channel_hook(site)))
    for path in moment_paths:  # once per Linear, even where two groups share it (a single-stream proj_out)
        handles.append(get_module(model, path).register_forward_pre_hook(moment_hook(path)))

    def result() -> ExtraStatistics:
        return ExtraStatistics(
            input_moments={p: m.result() for p, m in moments.items()},
            head_abs_mean={k: v / max(head_count[k], 1) for k, v in head_sum.items()},
            channel_abs_mean={k: v / max(channel_count[k], 1) for k, v in channel_sum.items()},
            query_abs_mean={k: v / max(query_count[k], 1) for k, v in query_sum.items()},
        )

    try:
        yield result
    finally:
        for h in handles:
            h.remove()


@dataclass
class BaselineCalibration:
    """SlimDiff's calibration plus the extra statistics, both from the same trajectories."""

    calibration: sd.Calibration
    extra: ExtraStatistics

    @property
    def sites(self) -> Sites:
        return self.calibration.sites


def calibrate_with_extras(model: nn.Module, run_fn: Callable[[], object],
                          config: sd.CalibrationConfig | None = None) -> BaselineCalibration:
    """:func:`slimdiff_diffusers.calibrate` and :func:`collect_extra_statistics` in one pass of ``run_fn``."""
    sites = sd.find_sites(model)
    holder: dict[str, ExtraStatistics] = {}

    def run_and_collect() -> None:
        with collect_extra_statistics(model, sites) as result:
            run_fn()
        holder["extra"] = result()

    calibration = sd.calibrate(model, run_and_collect, config)
    return BaselineCalibration(calibration, holder["extra"])


# --------------------------------------------------------------------------------------------------
# Parameter accounting (the same ruler for every method)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matrix:
    """One targeted Linear layer: its path, and whether its bias counts as compressible."""

    path: str
    group: str  # "qk", "vo", "ffn"
    bias_counted: bool


def targeted_matrices(sites: Sites, targets: tuple[str, ...] = ALL_TARGETS) -> list[Matrix]:
    """The Linear layers of the targeted groups, in model order, each once.

    Transformer groups (core ``find_sites``) bring more layers per group: a joint attention's QK group is
    ``to_q, add_q_proj, to_k, add_k_proj``, its VO group ``to_v, add_v_proj`` (biases counted) and the readers
    ``to_out.0, to_add_out`` (biases not counted). QK is only targeted where it is decomposable (no QK-norm or
    RoPE). A Flux single-stream block's ``proj_out`` reads the attention (its first columns) and the MLP (its last
    columns): its whole weight belongs to the VO and FFN groups together, so it is one matrix here, and a
    single-stream model must be measured with both "vo" and "ffn" targeted.
    """
    out: dict[str, Matrix] = {}
    single_readers = {s.out for s in sites.attention if s.kind == "single"}
    if single_readers and ("vo" in targets) != ("ffn" in targets):
        raise ValueError("a single-stream block's proj_out serves the VO and the FFN group together: target both "
                         "'vo' and 'ffn' to count or compress it")
    for s in sites.attention:
        if "qk" in targets and s.qk_decomposable:
            for path in (*s.query_paths, *s.key_paths):
                out.setdefault(path, Matrix(path, "qk", True))
        if "vo" in targets:
            for path in s.value_paths:
                out.setdefault(path, Matrix(path, "vo", True))
            for path in s.output_paths:
                out.setdefault(path, Matrix(path, "vo", False))
    if "ffn" in targets:
        for f in sites.feed_forward:
            out.setdefault(f.up, Matrix(f.up, "ffn", True))
            out.setdefault(f.down, Matrix(f.down, "ffn", False))
    return list(out.values())


def _module_params(module: nn.Module, bias_counted: bool) -> int:
    """Weights of a Linear or of a factorised ``Sequential(Linear, Linear)``; the final bias only if counted."""
    linears = [module] if isinstance(module, nn.Linear) else [m for m in module.modules() if isinstance(m, nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    inner_biases = sum(m.bias.numel() for m in linears[:-1] if m.bias is not None)
    last_bias = linears[-1].bias
    return weights + inner_biases + (last_bias.numel() if (bias_counted and last_bias is not None) else 0)


def compressible_params(model: nn.Module, sites: Sites, targets: tuple[str, ...] = ALL_TARGETS) -> int:
    """Compressible parameters of the targeted groups present in ``model`` (original or slimmed)."""
    return sum(_module_params(get_module(model, m.path), m.bias_counted) for m in targeted_matrices(sites, targets))


# --------------------------------------------------------------------------------------------------
# (a), (b): per-matrix low-rank factorisations
# --------------------------------------------------------------------------------------------------


def _factored(old: nn.Linear, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None) -> nn.Sequential:
    """``Sequential(Linear(in, r, bias=False), Linear(r, out, bias))`` in the dtype/device of ``old``."""
    rank = first.shape[0]
    kwargs = {"dtype": old.weight.dtype, "device": old.weight.device}
    a = nn.Linear(old.in_features, rank, bias=False, **kwargs)
    b = nn.Linear(rank, old.out_features, bias=bias is not None, **kwargs)
    with torch.no_grad():
        a.weight.copy_(first)
        b.weight.copy_(second)
        if bias is not None:
            b.bias.copy_(bias)
    return nn.Sequential(a, b)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free truncated SVD: ``W ≈ second @ first`` with the singular values split evenly (fp64)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def _damped_cholesky(c: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower L with damp(C) = L Lᵀ; stronger damping when the moment is singular (few calibration tokens),
    the same retry ladder as SlimDiff's decompositions (1e-6, 1e-4, 1e-2 of the mean eigenvalue)."""
    dim = c.shape[0]
    scale = (torch.trace(c) / dim).clamp_min(1e-30)
    eye = torch.eye(dim, dtype=c.dtype)
    for delta in (damping, 1e-4, 1e-2):
        lower, info = torch.linalg.cholesky_ex(c + delta * scale * eye)
        if not info.any():
            return lower
    raise torch.linalg.LinAlgError("input second moment is not positive definite even with 1e-2 damping")


def whitened_svd_factors(weight: torch.Tensor, bias: torch.Tensor | None, moment: torch.Tensor, mean: torch.Tensor,
                         rank: int, damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SVD-LLM truncation-aware whitening: minimise E‖(W − Ŵ)x‖² (+ bias) over rank-``rank`` Ŵ.

    With a bias the input is augmented with a constant 1 (second moment ``[[E xxᵀ, E x], [E xᵀ, 1]]``) and the
    augmented weight ``[W b]`` is truncated, so the bias (and the input mean) are fitted jointly: the new
    bias is ``second @ a`` where ``a`` is the augmented column of the first factor. Without a bias the plain
    uncentered moment is used and no bias is added (exactly SVD-LLM). Returns ``(first, second, bias)``.

    With ``C = L Lᵀ`` (Cholesky of the damped moment) the error is ``‖(W − Ŵ) L‖_F``: SVD ``W L = U S Vᵀ``,
    ``Ŵ = U_r S_r V_rᵀ L⁻¹`` (Eckart–Young in whitened coordinates).
    """
    w = weight.double()
    c = moment.double()
    if bias is not None:
        w = torch.cat([w, bias.double()[:, None]], dim=1)
        c = augment(c, mean.double())
    lower = _damped_cholesky(c, damping)
    u, s, vh = torch.linalg.svd(w @ lower, full_matrices=False)
    root = s[:rank].sqrt()
    # first = S^½ V_rᵀ L⁻¹ (a triangular solve: Lᵀ firstᵀ = V_r S^½).
    first = torch.linalg.solve_triangular(lower.T, (vh[:rank].T * root[None, :]), upper=True).T
    second = u[:, :rank] * root[None, :]
    if bias is None:
        return first, second, None
    return first[:, :-1], second, second @ first[:, -1]


def _max_useful_rank(layer: nn.Linear) -> float:
    """Rank at which the factorisation costs as much as the dense matrix, ``in·out/(in+out)``."""
    return layer.in_features * layer.out_features / (layer.in_features + layer.out_features)


def _ranks_at(layers: dict[str, nn.Linear], fraction: float) -> dict[str, int | None]:
    """Per-matrix rank keeping ``fraction`` of each matrix's weights (None: keep the dense matrix)."""
    if fraction >= 1.0:
        return {p: None for p in layers}
    return {p: max(1, math.floor(fraction * _max_useful_rank(layer))) for p, layer in layers.items()}


def _uniform_fraction_ranks(model: nn.Module, matrices: list[Matrix], budget: float) -> dict[str, int | None]:
    """The largest uniform kept fraction of every matrix's weights whose total cost fits the budget."""
    layers = {m.path: get_module(model, m.path) for m in matrices}
    counted_bias = sum(layers[m.path].bias.numel() for m in matrices if m.bias_counted and layers[m.path].bias is not None)

    def cost(ranks: dict[str, int | None]) -> float:
        total = counted_bias
        for path, r in ranks.items():
            layer = layers[path]
            total += layer.weight.numel() if r is None else r * (layer.in_features + layer.out_features)
        return total

    if cost(_ranks_at(layers, 1.0)) <= budget + 1e-6:
        return _ranks_at(layers, 1.0)
    lo, hi = 0.0, 1.0 - 1e-12
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(_ranks_at(layers, mid)) <= budget + 1e-6 else (lo, mid)
    return _ranks_at(layers, lo)


def _budget(model: nn.Module, sites: Sites, targets: tuple[str, ...], keep_ratio: float) -> float:
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return keep_ratio * compressible_params(model, sites, targets)


def _factor_every_matrix(model: nn.Module, calibration: BaselineCalibration, keep_ratio: float,
                         targets: tuple[str, ...], factorize) -> nn.Module:
    """A copy of ``model`` whose targeted matrices are factored at one uniform kept fraction of the budget.

    ``factorize(layer, path, rank) -> (first, second, bias)`` decides how one matrix is factored.
    """
    sites = calibration.sites
    matrices = targeted_matrices(sites, targets)
    ranks = _uniform_fraction_ranks(model, matrices, _budget(model, sites, targets, keep_ratio))
    new = copy.deepcopy(model)
    for m in matrices:
        rank = ranks[m.path]
        if rank is None:
            continue
        old = get_module(new, m.path)
        first, second, bias = factorize(old, m.path, rank)
        set_module(new, m.path, _factored(old, first, second, bias))
    return new


@torch.no_grad()
def truncated_svd(model: nn.Module, calibration: BaselineCalibration, keep_ratio: float,
                  targets: tuple[str, ...] = ALL_TARGETS) -> nn.Module:
    """(a) Data-free truncated SVD of every targeted matrix at one uniform kept fraction (no activations used)."""
    def factorize(layer: nn.Linear, path: str, rank: int):
        first, second = svd_factors(layer.weight, rank)
        return first, second, layer.bias.detach() if layer.bias is not None else None
    return _factor_every_matrix(model, calibration, keep_ratio, targets, factorize)


def _input_moment(calibration: BaselineCalibration, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input second moment and mean: from SlimDiff's calibration where it has them, else the extra statistics."""
    if path in calibration.calibration.linear_inputs:
        return calibration.calibration.input_moment(path)
    return calibration.extra.input_moments[path]


@torch.no_grad()
def whitened_svd(model: nn.Module, calibration: BaselineCalibration, keep_ratio: float,
                 targets: tuple[str, ...] = ALL_TARGETS) -> nn.Module:
    """(b) SVD-LLM-style whitened SVD of every targeted matrix in isolation, one uniform kept fraction."""
    def factorize(layer: nn.Linear, path: str, rank: int):
        xx, x = _input_moment(calibration, path)
        return whitened_svd_factors(layer.weight, layer.bias, xx, x, rank)
    return _factor_every_matrix(model, calibration, keep_ratio, targets, factorize)


# --------------------------------------------------------------------------------------------------
# (c) activation-magnitude pruning of heads and FFN channels
# --------------------------------------------------------------------------------------------------


@dataclass
class _Unit:
    """One prunable unit: a head of an attention, or a hidden channel of a feed-forward."""

    kind: str  # "head" or "channel"
    site: str
    index: int
    score: float  # normalised score
    cost: int  # compressible parameters it carries


def _attention_rank_costs(model: nn.Module, site: AttentionSite) -> dict[str, float]:
    """Compressible parameters per unit of per-head rank of the qk and vo groups (all heads together).

    The core's own slopes (``plan._attention_slopes``), so joint attention (both streams' projections and
    ``to_add_out``) and single-stream blocks (``proj_out``'s attention columns) cost what ``slim`` says they do.
    """
    return {kind: params for kind, (params, _) in _attention_slopes(site, model, {}).items()}


def _counts_qk(site: AttentionSite, targets: tuple[str, ...]) -> bool:
    return "qk" in targets and site.qk_decomposable


def _prunes_heads(site: AttentionSite, targets: tuple[str, ...]) -> bool:
    """A head carries QK and VO: it may go when VO is targeted and QK is targeted or kept whole by the core
    (QK-norm / RoPE: its q/k rows are then outside the compressible count and leave with the head for free)."""
    return "vo" in targets and ("qk" in targets or not site.qk_decomposable)


def _head_cost(model: nn.Module, site: AttentionSite, width: int, targets: tuple[str, ...] = ALL_TARGETS) -> float:
    """Compressible parameters of one head of per-head width ``width``."""
    costs = _attention_rank_costs(model, site)
    per_rank = costs["vo"] + (costs["qk"] if _counts_qk(site, targets) else 0.0)
    return width * per_rank / site.heads


def _stub_width(site: AttentionSite) -> int:
    """Width of the zero head that replaces a removed attention: 1 where processors reshape by ``attn.heads``
    (UNets, PixArt, SD3), a whole head where they reshape by ``attn.head_dim`` (Flux)."""
    return 1 if site.kind == "plain" else site.head_dim


def _channel_cost(model: nn.Module, site: FeedForwardSite) -> float:
    """Compressible parameters of one FFN hidden channel (the core's slope: up row(s) with bias, down column)."""
    return _ffn_slope(site, model, {})[0]


def _normalised(scores: torch.Tensor, single_unit_reference: float) -> torch.Tensor:
    """Per-layer normalisation: divide by the layer's mean score.

    A layer with one unit (a single-head attention, e.g. anime64's) would always score 1, so its score is
    instead the unit's mean |activation| relative to the mean |input| of the layer (``single_unit_reference``):
    still scale-free, and comparable across such layers.
    """
    if scores.numel() == 1:
        return scores / max(single_unit_reference, 1e-30)
    return scores / scores.mean().clamp_min(1e-30)


def _narrowed(old: nn.Linear, out_rows: torch.Tensor | None, in_cols: torch.Tensor | None,
              zero_rows: bool = False, zero_cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear with the rows ``out_rows`` and the columns ``in_cols`` of ``old`` (None: all).

    ``zero_rows`` zeroes the whole weight and bias (a stub head's q/k/v); ``zero_cols`` (positions in the new
    layer) zeroes those input columns only (a stub head's share of an output projection, whose bias stays).
    """
    w = old.weight.detach()
    w = w[out_rows] if out_rows is not None else w
    w = w[:, in_cols] if in_cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(torch.zeros_like(w) if zero_rows else w)
        if zero_cols is not None:
            new.weight[:, zero_cols] = 0
        if old.bias is not None:
            b = old.bias.detach()[out_rows] if out_rows is not None else old.bias.detach()
            new.bias.copy_(torch.zeros_like(b) if zero_rows else b)
    return new


@torch.no_grad()
def _prune_attention(model: nn.Module, site: AttentionSite, keep: list[int]) -> None:
    """Keep the heads in ``keep``: physically narrower projections of every stream, ``attn.heads`` updated.

    Rows of ``to_q/to_k/to_v`` (and ``add_q/k/v_proj``) and the matching input columns of every reader
    (``to_out.0``, ``to_add_out``, or a single-stream block's ``proj_out``, whose MLP columns stay) go. QK-norm
    (per head over ``head_dim``) and RoPE (per head) are unaffected by removing whole heads.

    An attention that loses every head keeps one stub head with all-zero weights (:func:`_stub_width`): its
    output is exactly the readers' biases (what a removed attention branch contributes), and stock processors
    keep running. The stub's parameters are counted in the budget.
    """
    attn = get_module(model, site.name)
    dh = site.head_dim
    width = site.heads * dh
    stub = not keep
    if keep:
        rows = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in keep])
    else:
        rows = torch.arange(_stub_width(site))
    for path in (*site.query_paths, *site.key_paths, *site.value_paths):
        set_module(model, path, _narrowed(get_module(model, path), rows, None, zero_rows=stub))
    stub_cols = torch.arange(rows.numel()) if stub else None
    for path in site.output_paths:
        reader = get_module(model, path)
        # a single-stream proj_out keeps its MLP columns after the kept heads' columns
        cols = torch.cat([rows, torch.arange(width, reader.in_features)]) if site.kind == "single" else rows
        set_module(model, path, _narrowed(reader, None, cols, zero_cols=stub_cols))
    attn.heads = max(len(keep), 1)


@torch.no_grad()
def _prune_feed_forward(model: nn.Module, site: FeedForwardSite, keep: list[int]) -> None:
    """Keep hidden channels ``keep`` (value and gate rows of up, columns of down); no refit.

    A single-stream block's down projection is ``proj_out``, whose hidden channels are its *last*
    ``inner_dim`` columns (the attention's columns before them are kept as they are, whatever their number).
    """
    up, down = get_module(model, site.up), get_module(model, site.down)
    idx = torch.tensor(sorted(keep), dtype=torch.long)
    rows = torch.cat([idx, idx + site.inner_dim]) if site.gated else idx
    offset = down.in_features - site.inner_dim
    cols = torch.cat([torch.arange(offset), offset + idx]) if site.kind == "single" else idx
    set_module(model, site.up, _narrowed(up, rows, None))
    set_module(model, site.down, _narrowed(down, None, cols))


@torch.no_grad()
def magnitude_pruning(model: nn.Module, calibration: BaselineCalibration, keep_ratio: float,
                      targets: tuple[str, ...] = ALL_TARGETS) -> nn.Module:
    """(c) Activation-magnitude pruning: the "alternative description" of SlimDiff (method.md), a baseline.

    Each head is scored by the mean |activation| of its attention output, each FFN hidden channel by its mean
    |activation|; scores are normalised per layer (:func:`_normalised`); the units with the lowest normalised
    scores are removed until the kept compressible parameters fit the budget (equivalently: keep the units
    above a global threshold τ, the largest τ that meets the budget). No refit. Heads are pruned where
    :func:`_prunes_heads` allows it (a head carries QK and VO); FFN channels when "ffn" is. Transformer groups
    are the core's: a joint attention's head is scored over both streams' outputs and removed from both; a
    single-stream block's heads and MLP channels are columns of the same ``proj_out``.
    """
    sites = calibration.sites
    extra = calibration.extra
    budget = _budget(model, sites, targets, keep_ratio)
    units: list[_Unit] = []
    head_sites = [s for s in sites.attention if _prunes_heads(s, targets)]
    for s in head_sites:
        scores = _normalised(extra.head_abs_mean[s.name], extra.query_abs_mean[s.name])
        cost = _head_cost(model, s, s.head_dim, targets)
        units += [_Unit("head", s.name, h, float(scores[h]), cost) for h in range(s.heads)]
    if "ffn" in targets:
        for f in sites.feed_forward:
            scores = _normalised(extra.channel_abs_mean[f.name], 1.0)
            cost = _channel_cost(model, f)
            units += [_Unit("channel", f.name, j, float(scores[j]), cost) for j in range(f.inner_dim)]

    total = compressible_params(model, sites, targets)
    removed: set[tuple[str, int]] = set()
    heads_left = {s.name: s.heads for s in sites.attention}
    channels_left = {f.name: f.inner_dim for f in sites.feed_forward}
    stub_cost = {s.name: _head_cost(model, s, _stub_width(s), targets) for s in sites.attention}
    kept = float(total)
    # Lowest normalised score first (ties: the costlier unit first, then model order, for determinism).
    for unit in sorted(units, key=lambda u: (u.score, -u.cost)):
        if kept <= budget + 1e-6:
            break
        if unit.kind == "channel" and channels_left[unit.site] <= 1:
            continue  # a feed-forward keeps at least one channel
        removed.add((unit.site, unit.index))
        kept -= unit.cost
        if unit.kind == "head":
            heads_left[unit.site] -= 1
            if heads_left[unit.site] == 0:
                kept += stub_cost[unit.site]  # the zero stub head that replaces a removed attention
        else:
            channels_left[unit.site] -= 1

    new = copy.deepcopy(model)
    for s in head_sites:
        keep = [h for h in range(s.heads) if (s.name, h) not in removed]
        if len(keep) < s.heads:
            _prune_attention(new, s, keep)
    if "ffn" in targets:
        for f in sites.feed_forward:
            keep = [j for j in range(f.inner_dim) if (f.name, j) not in removed]
            if len(keep) < f.inner_dim:
                _prune_feed_forward(new, f, keep)
    return new


# --------------------------------------------------------------------------------------------------
# (f) OBS-style structured pruning (OBS-Diff's structured setting)
# --------------------------------------------------------------------------------------------------

OBS_DAMPING = 0.01  # SparseGPT / OBS-Diff "percdamp": λ = 1% of the mean diagonal of the Hessian


@dataclass
class _ObsUnit:
    """A prunable unit for OBS: a head or a hidden channel, and the reader columns that carry it."""

    pool: str  # the site whose units compete for that site's quota
    index: int
    columns: dict[str, torch.Tensor]  # reader path -> its input columns for this unit


class _ObsReader:
    """One reader layer's weight W (out × in, fp64) and inverse Hessian H⁻¹ of its input, updated in place."""

    def __init__(self, weight: torch.Tensor, moment: torch.Tensor, damping: float):
        self.weight = weight.detach().double().cpu().clone()
        h = moment.double().cpu().clone()
        dead = torch.diag(h) <= 0  # inputs that were never non-zero: OBS's own convention (SparseGPT): H_ii = 1
        h[dead, dead] = 1.0
        h += damping * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
        self.hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))

    def saliency(self, cols: torch.Tensor) -> float:
        """OBS error of zeroing the columns ``cols`` with the optimal update: tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ)."""
        w_s = self.weight[:, cols]
        return float((w_s @ torch.linalg.solve(self.hinv[cols][:, cols], w_s.T)).trace())

    def column_saliencies(self, cols: torch.Tensor) -> torch.Tensor:
        """Single-column saliencies ‖W_j‖² / (H⁻¹)_jj for every j in ``cols`` at once."""
        return self.weight[:, cols].pow(2).sum(0) / self.hinv[cols, cols]

    def remove(self, cols: torch.Tensor) -> None:
        """Zero ``cols`` with the OBS update of every other column, then drop them from H⁻¹ (Schur complement)."""
        block = torch.linalg.inv(self.hinv[cols][:, cols])
        rows = self.hinv[cols]  # (|S|, in)
        self.weight -= self.weight[:, cols] @ block @ rows
        self.hinv -= rows.T @ block @ rows
        self.weight[:, cols] = 0.0
        self.hinv[cols, :] = 0.0
        self.hinv[:, cols] = 0.0
        self.hinv[cols, cols] = 1.0  # keeps later solves well defined; these columns are never chosen again


def _obs_units(model: nn.Module, sites: Sites, targets: tuple[str, ...]) -> tuple[list[_ObsUnit], dict[str, float], dict[str, int]]:
    """Every prunable unit, its pool's cost per unit and size."""
    units: list[_ObsUnit] = []
    cost: dict[str, float] = {}
    size: dict[str, int] = {}
    for s in sites.attention:
        if not _prunes_heads(s, targets):
            continue
        cost[s.name], size[s.name] = _head_cost(model, s, s.head_dim, targets), s.heads
        for h in range(s.heads):
            cols = torch.arange(h * s.head_dim, (h + 1) * s.head_dim)
            units.append(_ObsUnit(s.name, h, {path: cols for path in s.output_paths}))
    if "ffn" in targets:
        for f in sites.feed_forward:
            cost[f.name], size[f.name] = _channel_cost(model, f), f.inner_dim
            offset = get_module(model, f.down).in_features - f.inner_dim  # single-stream: after the heads
            units += [_ObsUnit(f.name, j, {f.down: torch.tensor([offset + j])}) for j in range(f.inner_dim)]
    return units, cost, size


def _uniform_unit_counts(total: float, budget: float, cost: dict[str, float], size: dict[str, int],
                         keep_ratio: float, head_pools: set[str]) -> dict[str, int]:
    """Units kept per pool: one kept fraction of heads for every attention and one of channels for every FFN.

    Heads are few (3 per attention in flux-tiny), so one fraction for both would floor the heads far below the
    budget (keep 0.6 of 3 heads is 1 head). The head fraction is therefore the budget's own, rounded to whole
    heads (at least one kept), and the channel fraction is the largest that fits what is left; where even one
    channel per FFN cannot fit, the head fraction steps down one head at a time.
    """
    channel_pools = [p for p in size if p not in head_pools]

    def kept_cost(c: dict[str, int]) -> float:
        return total - sum((size[p] - c[p]) * cost[p] for p in size)

    def with_channels(heads: dict[str, int], f: float) -> dict[str, int]:
        return heads | {p: max(1, min(size[p], math.floor(f * size[p] + 1e-9))) for p in channel_pools}

    if kept_cost(dict(size)) <= budget + 1e-6:
        return dict(size)
    max_heads = max((size[p] for p in head_pools), default=1)
    for step in range(max_heads + 1):
        head_fraction = max(0.0, keep_ratio - step / max_heads)
        heads = {p: max(1, min(size[p], round(head_fraction * size[p]))) for p in head_pools}
        if kept_cost(with_channels(heads, 0.0)) > budget + 1e-6:
            continue
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if kept_cost(with_channels(heads, mid)) <= budget + 1e-6 else (lo, mid)
        return with_channels(heads, lo)
    raise sd.BudgetError(f"OBS pruning cannot reach keep_ratio={keep_ratio}: one head per attention and one "
                         "channel per FFN already exceed it")


@torch.no_grad()
def obs_pruning(model: nn.Module, calibration: BaselineCalibration, keep_ratio: float,
                targets: tuple[str, ...] = ALL_TARGETS, damping: float = OBS_DAMPING) -> nn.Module:
    """(f) OBS-style structured pruning, the closest training-free peer (OBS-Diff's structured setting).

    Whole heads and whole FFN hidden channels are removed; the layer that reads them (``to_out.0`` and
    ``to_add_out`` for a head, the down projection for a channel; a single-stream block's ``proj_out`` for
    both) gets the Optimal Brain Surgeon update from the inverse Hessian ``H = E[xxᵀ]`` of its input:

    * saliency of removing the column set S (a head's ``head_dim`` columns, a channel's one column):
      ``Σ_readers tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ)``;
    * update of the remaining columns: ``W ← W − W_S [(H⁻¹)_SS]⁻¹ (H⁻¹)_S,:``, then S leaves H⁻¹ (Schur
      complement), so the next choice sees the updated weights (sequential OBS: the result is the least-squares
      refit of the kept columns on the calibration inputs).

    In each pool (the heads of one attention, the channels of one FFN) the unit with the lowest saliency goes
    first; the pools of one reader (a single-stream block's heads and channels) compete for its turn. The number
    of units removed per pool is uniform over layers, as OBS-Diff prunes one fraction per layer: every attention
    keeps the budget's fraction of its heads (rounded to whole heads, at least one), every FFN the largest
    channel fraction that fits the rest of the budget (:func:`_uniform_unit_counts`). The producers' rows
    (q/k/v of every stream, the FFN up projection's value and gate rows) are dropped with the unit; biases are
    not updated (OBS updates weights only). ``H`` comes from the same calibration trajectories as SlimDiff's
    statistics: a down projection's input moment *is* SlimDiff's FFN hidden moment; the readers of heads need
    the full (cross-head) moment of their input, which SlimDiff does not keep (it keeps per-head blocks) and
    :func:`collect_extra_statistics` records. Damping λ = ``damping`` × mean diag(H) (SparseGPT's 1%).
    """
    sites = calibration.sites
    units, cost, size = _obs_units(model, sites, targets)
    total = compressible_params(model, sites, targets)
    head_pools = {s.name for s in sites.attention if s.name in size}
    keep_counts = _uniform_unit_counts(total, _budget(model, sites, targets, keep_ratio), cost, size, keep_ratio,
                                       head_pools)
    quota = {p: size[p] - keep_counts[p] for p in size}

    # Readers touched by each pool, and clusters of pools that share a reader (single-stream proj_out).
    reader_paths: dict[str, list[str]] = {}
    for u in units:
        reader_paths.setdefault(u.pool, list(u.columns))
    clusters: list[set[str]] = []
    for pool, paths in reader_paths.items():
        joined = [c for c in clusters if any(p in reader_paths[q] for q in c for p in paths)]
        merged = {pool}.union(*joined) if joined else {pool}
        clusters = [c for c in clusters if c not in joined] + [merged]

    updated: dict[str, torch.Tensor] = {}
    removed: set[tuple[str, int]] = set()
    for cluster in clusters:
        if not any(quota[p] for p in cluster):
            continue
        paths = list(dict.fromkeys(p for pool in cluster for p in reader_paths[pool]))
        readers = {p: _ObsReader(get_module(model, p).weight, _input_moment(calibration, p)[0], damping) for p in paths}
        alive = {p: [u for u in units if u.pool == p] for p in cluster}
        left = {p: quota[p] for p in cluster}
        while any(left.values()):
            best: tuple[float, _ObsUnit] | None = None
            for pool in cluster:
                if not left[pool]:
                    continue
                candidates = alive[pool]
                if all(len(c) == 1 and c[next(iter(c))].numel() == 1 for c in (u.columns for u in candidates)):
                    path = next(iter(candidates[0].columns))
                    cols = torch.cat([u.columns[path] for u in candidates])
                    scores = readers[path].column_saliencies(cols)
                    i = int(torch.argmin(scores))
                    score = float(scores[i])
                else:
                    per_unit = [sum(readers[p].saliency(c) for p, c in u.columns.items()) for u in candidates]
                    i = min(range(len(per_unit)), key=per_unit.__getitem__)
                    score = per_unit[i]
                if best is None or score < best[0]:
                    best = (score, candidates[i])
            _, unit = best
            for p, c in unit.columns.items():
                readers[p].remove(c)
            alive[unit.pool].remove(unit)
            left[unit.pool] -= 1
            removed.add((unit.pool, unit.index))
        for p, reader in readers.items():
            updated[p] = reader.weight

    new = copy.deepcopy(model)
    for p, w in updated.items():  # OBS-updated readers first, then the structural cut drops the zeroed columns
        layer = get_module(new, p)
        layer.weight.copy_(w.to(layer.weight.dtype))
    for s in sites.attention:
        if s.name in size:
            keep = [h for h in range(s.heads) if (s.name, h) not in removed]
            if len(keep) < s.heads:
                _prune_attention(new, s, keep)
    for f in sites.feed_forward:
        if f.name in size:
            keep = [j for j in range(f.inner_dim) if (f.name, j) not in removed]
            if len(keep) < f.inner_dim:
                _prune_feed_forward(new, f, keep)
    return new


# --------------------------------------------------------------------------------------------------
# (d), (e): MADAC with other allocations
# --------------------------------------------------------------------------------------------------


def uniform_madac(model: nn.Module, calibration: BaselineCalibration, keep_ratio: float,
                  targets: tuple[str, ...] = ALL_TARGETS) -> nn.Module:
    """(d) SlimDiff's decompositions with the same kept fraction in every group (no SIS / ARA), rounded down or up
    to each group's grid so that the budget is spent (``allocate_uniform``, decisions.md row 33)."""
    return sd.slim(model, calibration.calibration, sd.SlimConfig(keep_ratio=keep_ratio, targets=targets,
                                                                 allocation="uniform"))


def allocate_global_sparsity(block_influence: list[float], mean_sparsity: float,
                             smoothing: float = MODEGPT_SMOOTHING,
                             max_sparsity: float = MODEGPT_MAX_SPARSITY) -> list[float]:
    """MoDeGPT's per-layer sparsity: ``L·φ̄·softmax(−s/ε)``, capped at ``max_sparsity``, excess redistributed.

    A re-statement of ``allocate_global_sparsity`` in cbacary/MoDeGPT (``src/compression_utils.py``): layers with
    a low block influence s get the large sparsities; layers over the cap are set to the cap and the rest of
    the budget is spread over the others in proportion to their softmax weights.
    """
    n = len(block_influence)
    s = torch.tensor(block_influence, dtype=torch.float64)
    weights = torch.softmax(-s / smoothing, dim=0)
    remaining = min(n * mean_sparsity, n * max_sparsity)
    sparsity = torch.zeros(n, dtype=torch.float64)
    active = torch.ones(n, dtype=torch.bool)
    for _ in range(n):
        if not active.any() or remaining <= 0:
            break
        proposed = remaining * weights[active] / weights[active].sum()
        over = proposed > max_sparsity
        idx = active.nonzero(as_tuple=True)[0]
        if not over.any():
            sparsity[idx] = proposed
            break
        sparsity[idx[over]] = max_sparsity
        remaining -= max_sparsity * int(over.sum())
        active[idx[over]] = False
    return sparsity.clamp(0.0, max_sparsity).tolist()


def _grid_rank(full: int, multiple: int, keep: float, min_fraction: float = 0.0) -> int:
    """The largest rank on SlimDiff's grid (multiples of the step, floors as in slim) not above ``keep·full``."""
    step = multiple if full >= 2 * multiple else max(1, full // 4)
    floor = max(step, math.ceil(min_fraction * full / step) * step)
    if keep >= 1.0:
        return full
    return min(full, max(floor, math.floor(keep * full / step) * step))


def modegpt_rank_pattern(model: nn.Module, calibration: BaselineCalibration, keep_ratio: float,
                         targets: tuple[str, ...] = ALL_TARGETS, smoothing: float = MODEGPT_SMOOTHING,
                         config: sd.SlimConfig | None = None) -> tuple[dict[str, int], dict[str, float]]:
    """Per-group ranks from MoDeGPT's block-influence allocation, as an exact-name ``rank_pattern``.

    MoDeGPT allocates sparsity over equally sized LLM layers, so its mean sparsity φ̄ is a parameter
    fraction. Diffusion blocks differ in width, so φ̄ is chosen here by bisection: the largest mean
    sparsity whose per-block ratios, rounded *down* to SlimDiff's rank grid, keep at most the budget.
    Returns ``(rank_pattern, keep ratio per block)``.
    """
    config = config or sd.SlimConfig()
    cal = calibration.calibration
    sites = cal.sites
    blocks = sites.blocks
    influence = [cal.block_influence(b) for b in blocks]
    budget = _budget(model, sites, targets, keep_ratio)
    total = compressible_params(model, sites, targets)

    # Group name -> (block, full rank, params per unit of rank, grid multiple, min fraction)
    groups: dict[str, tuple[str, int, float, int, float]] = {}
    for s in sites.attention:
        per_rank = _attention_rank_costs(model, s)
        for kind in ("qk", "vo"):
            if kind in targets and (kind != "qk" or s.qk_decomposable):
                groups[f"{s.name}:{kind}"] = (s.block, s.head_dim, per_rank[kind], config.rank_multiple, 0.0)
    if "ffn" in targets:
        for f in sites.feed_forward:
            groups[f"{f.name}:ffn"] = (f.block, f.inner_dim, _channel_cost(model, f), config.ffn_multiple,
                                       config.min_ffn_fraction)
    fixed_cost = total - sum(full * slope for (_, full, slope, _, _) in groups.values())  # 0 here: every targeted parameter belongs to a group

    def pattern_at(mean_sparsity: float) -> tuple[dict[str, int], dict[str, float]]:
        sparsity = allocate_global_sparsity(influence, mean_sparsity, smoothing)
        keep_of_block = {b: 1.0 - sp for b, sp in zip(blocks, sparsity)}
        ranks = {name: _grid_rank(full, mult, keep_of_block[block], minf)
                 for name, (block, full, _, mult, minf) in groups.items()}
        return ranks, keep_of_block

    def cost(ranks: dict[str, int]) -> float:
        return fixed_cost + sum(ranks[name] * groups[name][2] for name in groups)

    lo, hi = 0.0, MODEGPT_MAX_SPARSITY
    if cost(pattern_at(lo)[0]) <= budget + 1e-6:
        return pattern_at(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(pattern_at(mid)[0]) <= budget + 1e-6 else (mid, hi)
    ranks, keep_of_block = pattern_at(hi)
    if cost(ranks) > budget + 1e-6:
        raise sd.BudgetError(f"MoDeGPT allocation cannot reach keep_ratio={keep_ratio} with the 0.8 sparsity cap")
    return ranks, keep_of_block


def modegpt_madac(model: nn.Module, calibration: BaselineCalibration, keep_ratio: float,
                  targets: tuple[str, ...] = ALL_TARGETS) -> nn.Module:
    """(e) MoDeGPT block-influence softmax allocation, SlimDiff's MADAC decompositions (shared code via rank_pattern)."""
    ranks, _ = modegpt_rank_pattern(model, calibration, keep_ratio, targets)
    return sd.slim(model, calibration.calibration, sd.SlimConfig(rank_pattern=ranks, targets=targets))


BASELINES: dict[str, Callable[..., nn.Module]] = {
    "truncated_svd": truncated_svd,
    "whitened_svd": whitened_svd,
    "magnitude_pruning": magnitude_pruning,
    "uniform_madac": uniform_madac,
    "modegpt_madac": modegpt_madac,
    "obs_pruning": obs_pruning,
}
