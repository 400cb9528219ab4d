"""Measured group influence: how much the model output moves when one group alone is slimmed (α_g, method.md §4.1.1).

The Spectral Influence Score models a group's damage as α_g·e_g(r) with α_g = π_b²·ε_g: a block's response to
isotropic noise times the group's share of its residual stream (method.md §4.1). On transformer denoisers that model
is off by up to two orders of magnitude between groups of one block (decisions.md row 36): a joint block's text-stream
FFN is weighed by the image stream's π, AdaLN gates scale a group's output after its energy is recorded, and a
truncation's error points where the input has little energy, not in a random direction. This module measures α_g
instead. It slims each group alone at a reference rank (a uniform keep-0.5 plan, halved again while its predicted
error is too small to measure against rounding), replays the propagation probe's recorded calls, and divides the
mean squared relative change of the output by e_g(r_ref). The closed-form error curve e_g then carries α_g to every
other rank: measured damage over e_g agreed within ~30% across ranks ¼–⅔ of full width on flux-tiny.

Slimming one group is done in place and undone exactly. The group's factors are written, zero-padded per head (and
per FFN channel), into the model's own parameters. Zero value/query/key channels add nothing to any logit or head
output, and zero down-projection columns read nothing, so the stock forward computes the slim group exactly: no
module is swapped, no processor changed, and the parameters may be views of another framework's fused weights
(ComfyUI's view). The original values are copied back after each group, so the model ends bit-identical.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any

import torch
import torch.nn as nn

from . import distributed
from .apply import _attention_weights
from .calibration import Calibration
from .config import SlimConfig
from .errors import CalibrationError
from .plan import GroupPlan, _has_head_outputs, group_grid, plan_slim
from .propagation import ProgressCallback, first_tensor
from .rewrite import get_module
from .sites import AttentionSite, FeedForwardSite, Sites

logger = logging.getLogger("slimdiff")

# The reference plan: uniform at this keep ratio (about half of every group's width).
REFERENCE_KEEP_RATIO = 0.5
# A relative error energy this small moves a fp32 output by ~1e-4.5, near the rounding of a replayed call.
MEASURABLE_ERROR = 1e-9


def _pad_head_rows(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(H·r, ...) per-head rows → (H·head_dim, ...) with each head's rows first and zeros after."""
    rank = t.shape[0] // heads
    per_head = t.reshape(heads, rank, *t.shape[1:])
    padded = per_head.new_zeros(heads, head_dim, *t.shape[1:])
    padded[:, :rank] = per_head
    return padded.reshape(heads * head_dim, *t.shape[1:])


def _pad_head_columns(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    return _pad_head_rows(t.T, heads, head_dim).T


def _attention_writes(model: nn.Module, group: GroupPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, zero-padded full-shape value) pairs that make the stock attention compute the slim group."""
    site: AttentionSite = group.site
    attn = get_module(model, site.name)
    weights = _attention_weights(model, site, group if group.kind == "qk" else None,
                                 group if group.kind == "vo" else None)
    heads, head_dim = site.heads, site.head_dim
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []

    def projection(key: str, layer: nn.Linear) -> None:
        writes.append((layer.weight, _pad_head_rows(weights[f"{key}.weight"], heads, head_dim)))
        if layer.bias is not None:
            writes.append((layer.bias, _pad_head_rows(weights[f"{key}.bias"], heads, head_dim)))

    if group.kind == "qk":
        projection("q", attn.to_q)
        projection("k", attn.to_k)
        if site.is_joint:
            projection("add_q", attn.add_q_proj)
            projection("add_k", attn.add_k_proj)
        return writes
    projection("v", attn.to_v)
    if site.is_joint:
        projection("add_v", attn.add_v_proj)
    reader = get_module(model, site.out)
    columns = _pad_head_columns(weights["out.weight"], heads, head_dim)
    if site.kind == "single":  # proj_out reads [heads | MLP]: only its first H·head_dim columns change
        writes.append((reader.weight[:, :heads * head_dim], columns))
    else:
        writes.append((reader.weight, columns))
    if site.is_joint and "add_out.weight" in weights:
        writes.append((attn.to_add_out.weight, _pad_head_columns(weights["add_out.weight"], heads, head_dim)))
    return writes


def _feed_forward_writes(model: nn.Module, group: GroupPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The down projection with the refit columns at the kept channels and zeros at the dropped ones."""
    site: FeedForwardSite = group.site
    down = get_module(model, site.down)
    factors = group.factors
    columns = factors["down.weight"].new_zeros(down.out_features, site.inner_dim)
    columns[:, factors["channels"].to(columns.device)] = factors["down.weight"].to(columns)
    target = down.weight[:, -site.inner_dim:] if site.kind == "single" else down.weight
    writes = [(target, columns)]
    if down.bias is not None:  # the refit intercept; a layer without a bias keeps none (as apply_plan does)
        writes.append((down.bias, factors["down.bias"]))
    return writes


def _writes(model: nn.Module, group: GroupPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(group.site, AttentionSite):
        return _attention_writes(model, group)
    return _feed_forward_writes(model, group)


class _SlimmedAlone:
    """Context manager: ``group`` slimmed in place in ``model``; every written parameter restored on exit."""

    def __init__(self, model: nn.Module, group: GroupPlan) -> None:
        self.model, self.group = model, group
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> None:
        with torch.no_grad():
            for target, value in _writes(self.model, self.group):
                if value.shape != target.shape:
                    raise RuntimeError(f"{self.group.name}: a slim factor of shape {tuple(value.shape)} does not "
                                       f"pad to its layer's {tuple(target.shape)}")
                self._saved.append((target, target.detach().clone()))
                target.copy_(value.to(dtype=target.dtype, device=target.device))

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for target, original in reversed(self._saved):
                target.copy_(original)
        self._saved.clear()


def _reference_groups(model: nn.Module, calibration: Calibration) -> dict[str, GroupPlan]:
    """Each group at its rank in a uniform keep-0.5 plan, or at its floor where the error there is unmeasurable."""
    # The default decompositions, minus what the calibration cannot feed (its head outputs, for the VO options that
    # read them): the defaults would fall back with a warning at every reference plan, which the user's own plan
    # gives once. propagation="none": a uniform allocation reads no influence, and none is known yet.
    outputs = all(_has_head_outputs(site, calibration) for site in calibration.sites.attention if site.kind != "plain")
    options = {"propagation": "none"} | ({} if outputs else {"vo_statistics": "input", "vo_output_refit": "none"})
    plan = plan_slim(model, calibration, SlimConfig(keep_ratio=REFERENCE_KEEP_RATIO, allocation="uniform", **options))
    chosen = {group.name: group for group in plan.groups}
    lossless = [g for g in plan.groups if g.predicted_error < MEASURABLE_ERROR]
    if lossless:
        # A group exact at half width (e.g. inputs of lower rank than that: a short text stream) is measured at its
        # floor, the lowest rank the allocation may give it; every other group keeps its rank (the plan is made
        # again, without a decomposition cache, which would hold every factor of both plans at once).
        config = SlimConfig(**options)
        pattern = {re.escape(g.name): g.rank for g in plan.groups} | \
            {re.escape(g.name): group_grid(g.site, config)[0] for g in lossless}
        floors = plan_slim(model, calibration, SlimConfig(rank_pattern=pattern, **options))
        chosen |= {g.name: g for g in floors.groups if g.name in {x.name for x in lossless}}
    return chosen


@torch.no_grad()
def measure_group_influence(model: nn.Module, calibration: Calibration, calls: list[tuple[tuple, dict]],
                            progress: ProgressCallback | None = None,
                            runner: nn.Module | None = None) -> dict[str, float]:
    """α_g for every group of ``calibration``: output damage per unit predicted error, measured on ``calls``.

    Args:
        model: the calibrated model, whose layers the sites name (its weights are changed during the measurement
            and restored exactly).
        calibration: its statistics; the reference factors are planned from them.
        calls: recorded forward calls ``(args, kwargs)`` to replay (the propagation probe's).
        runner: the module the calls are replayed on, when it is not ``model`` itself but computes with its
            parameters (ComfyUI: the live model behind a view whose layers are slices of its weights).
        progress: ``progress(done, total)`` after every forward call; it may raise to cancel (the model is
            restored first).

    Returns:
        group name (``"<site>:qk|vo|ffn"``) → α_g = mean over calls of ‖Δout‖²/‖out‖², divided by the group's
        predicted error e_g(r_ref) at the reference rank. A group with no measurable error even at its floor gets
        0: it is (numerically) lossless wherever the allocation may cut it.
    """
    if not calls:
        raise ValueError("measuring group influence needs recorded calls")
    groups = _reference_groups(model, calibration)
    total, done = (len(groups) + 1) * len(calls), 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    forward = runner if runner is not None else model

    def run(args: tuple, kwargs: dict) -> torch.Tensor:
        out = first_tensor(forward(*args, **kwargs))
        if out is None:
            raise RuntimeError("the model output has no tensor to compare")
        return out.float()

    clean = []
    for args, kwargs in calls:
        clean.append(run(args, kwargs))
        step()
    influence: dict[str, float] = {}
    unchanged = 0  # groups with a measurable predicted error that left every output bit as it was
    for name, group in groups.items():
        damage = 0.0
        with _SlimmedAlone(model, group):
            for (args, kwargs), reference in zip(calls, clean):
                changed = run(args, kwargs)
                damage += float((changed - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))
                step()
        damage /= len(calls)
        error = group.predicted_error
        influence[name] = damage / error if error >= MEASURABLE_ERROR else 0.0
        unchanged += damage == 0.0 and error >= MEASURABLE_ERROR
        logger.debug("group influence %s: rank %d/%d, e=%.3g, damage=%.3g, alpha=%.4g", name, group.rank,
                     group.full_rank, error, damage, influence[name])
    if unchanged and unchanged == sum(g.predicted_error >= MEASURABLE_ERROR for g in groups.values()):
        # One group can leave the output unchanged (a QK error the softmax cancels: keys that are all alike), but
        # not every one: the writes did not reach the forward (copies of the weights that run, e.g. offloaded),
        # and influences of 0 would let the allocation cut every group to its floor.
        raise CalibrationError("slimming a group in place never changed the model output: the parameters SlimDiff "
                               "wrote are not the ones the forward reads (offloaded or copied weights?); calibrate "
                               "with CalibrationConfig(group_influence=False)")
    return influence



def group_influence_calls(sites: Sites, num_calls: int) -> int:
    """Forward calls :func:`measure_group_influence` makes: the clean replay plus one per group."""
    groups = sum(1 + site.qk_decomposable for site in sites.attention) + len(sites.feed_forward)
    return (groups + 1) * num_calls


def add_group_influence(model: nn.Module, calibration: Calibration, calls: list[tuple[tuple, dict]],
                        progress: ProgressCallback | None = None, runner: nn.Module | None = None) -> None:
    """Measure α_g and store it in ``calibration.group_influence`` (with its time in ``meta``).

    Under ``torch.distributed`` rank 0 measures on its recorded calls (the statistics are already summed over the
    ranks, so its reference factors are everyone's) and the result is broadcast, as for the block probe.
    """
    started = time.perf_counter()
    influence = None
    if distributed.world_size() == 1 or distributed.rank() == 0:
        logger.info("group influence: %d recorded calls, %d forward calls",
                    len(calls), group_influence_calls(calibration.sites, len(calls)))
        influence = measure_group_influence(model, calibration, calls, progress, runner)
    if distributed.world_size() > 1:
        influence = distributed.broadcast_object(influence)
    calibration.group_influence = influence
    calibration.meta["influence_seconds"] = round(time.perf_counter() - started, 3)
    logger.info("group influence: %d groups in %.1fs", len(influence), calibration.meta["influence_seconds"])
