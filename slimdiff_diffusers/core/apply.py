"""apply_plan(): narrow a model to a :class:`SlimPlan`, module by module, all or nothing.

Each attention / feed-forward gets its narrow layers computed from its own original weights and the plan's
factors (fp64, one module at a time) and swapped in. The originals are kept until every module is done: on
any exception (out of memory, fp16 overflow, Ctrl-C) every replaced module and attribute is put back, so the
model is exactly as before and never half slimmed.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .errors import CalibrationMismatchError
from .plan import GroupPlan, SlimPlan, check_plan_target
from .report import SlimReport
from .rewrite import get_module, install_attention, install_feed_forward, to_uniform_layout
from .sites import AttentionSite

logger = logging.getLogger("slimdiff")

_MISSING = object()
# Attributes of an attention module that slimming (or an adapter finishing the job) may set.
_ATTENTION_ATTRS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "scale", "slimdiff_head_dim",
                    "slimdiff_spec", "processor")


class _Undo:
    """Records what a transaction changed, to put it back in reverse order."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def attributes(self, obj: Any, names: tuple[str, ...]) -> None:
        saved = {n: getattr(obj, n, _MISSING) for n in names}

        def restore() -> None:
            for n, v in saved.items():
                if v is _MISSING:
                    if hasattr(obj, n):
                        delattr(obj, n)
                else:
                    setattr(obj, n, v)
        self._steps.append(restore)

    def module(self, root: nn.Module, path: str) -> None:
        from .rewrite import set_module

        old = get_module(root, path)
        self._steps.append(lambda: set_module(root, path, old))

    def object_class(self, obj: Any) -> None:
        cls = obj.__class__
        self._steps.append(lambda: setattr(obj, "__class__", cls))

    def rollback(self) -> None:
        for step in reversed(self._steps):
            step()
        self._steps.clear()


@torch.no_grad()
def apply_plan(model: nn.Module, plan: SlimPlan, *, finish: Callable[[nn.Module, _Undo], None] | None = None,
               check: bool = True) -> nn.Module:
    """Narrow ``model`` in place to ``plan``; returns ``model`` with ``.slimdiff_spec`` and ``.slimdiff_report``.

    Args:
        model: the model the plan was made for, or an identical copy of it (checked unless ``check=False``).
        plan: from :func:`plan_slim`.
        finish: adapters' last step inside the same transaction (e.g. installing attention processors); it
            receives the model and the undo log so that what it changes is rolled back on failure too.
        check: verify that ``model`` has the structure and weights the plan was made from.

    Raises:
        CalibrationMismatchError: ``model`` is not the planned model. Any error while narrowing is re-raised
        after the model has been restored.
    """
    started = time.perf_counter()
    if check:
        problem = check_plan_target(model, plan)
        if problem:
            raise CalibrationMismatchError(f"This slim plan does not belong to the given model: {problem}.")
    params_before = sum(p.numel() for p in model.parameters())
    undo = _Undo()
    try:
        by_site: dict[str, list[GroupPlan]] = {}
        for group in plan.groups:
            by_site.setdefault(group.site.name, []).append(group)
        for path, groups in by_site.items():
            site = groups[0].site
            if isinstance(site, AttentionSite):
                _apply_attention(model, site, groups, plan, undo)
            else:
                _apply_feed_forward(model, groups[0], plan, undo)
        undo.attributes(model, ("slimdiff_spec", "slimdiff_report"))
        report = SlimReport(
            params_before=params_before,
            params_after=sum(p.numel() for p in model.parameters()),
            compressible_params_before=sum(g.full_params for g in plan.groups),
            compressible_params_after=sum(g.params for g in plan.groups),
            flops_before=sum(g.full_flops for g in plan.groups),
            flops_after=sum(g.flops for g in plan.groups),
            groups=[g.report() for g in plan.groups],
            stage_seconds=dict(plan.stage_seconds) | {"rewrite": round(time.perf_counter() - started, 3)},
            config=plan.config.to_dict(),
            adapter_params=plan.adapter_params,
            allocation_refinement=plan.allocation_refinement,
            propagation=plan.propagation,
            vo_output_refit=dict(plan.vo_output_refit),
            vo_statistics=dict(plan.vo_statistics),
        )
        report.seconds = round(sum(report.stage_seconds.values()), 3)
        model.slimdiff_spec = plan.spec
        model.slimdiff_report = report
        if finish is not None:
            finish(model, undo)
    except BaseException:
        undo.rollback()
        logger.warning("slimming failed; the model was restored to its original layers")
        raise
    logger.info("slimmed %d groups: %s -> %s parameters in %.1fs", len(plan.groups), f"{report.params_before:,}",
                f"{report.params_after:,}", report.seconds)
    return model


def _apply_attention(model: nn.Module, site: AttentionSite, groups: list[GroupPlan], plan: SlimPlan, undo: _Undo) -> None:
    attn = get_module(model, site.name)
    spec = plan.spec.attention[site.name]
    by_kind = {g.kind: g for g in groups}
    weights = _attention_weights(model, site, by_kind.get("qk"), by_kind.get("vo"))
    if spec.layout == "uniform":
        weights = to_uniform_layout(weights, spec)
    undo.attributes(attn, _ATTENTION_ATTRS)
    for path in site.output_paths:
        undo.module(model, path)
    if site.kind == "single":
        undo.attributes(get_module(model, site.out), ("_tp_packed_row_blocks",))
    install_attention(attn, spec, weights, root=model, path=site.name)


def _apply_feed_forward(model: nn.Module, group: GroupPlan, plan: SlimPlan, undo: _Undo) -> None:
    site = group.site
    ff = get_module(model, site.name)
    undo.module(model, site.up)
    undo.module(model, site.down)
    undo.attributes(ff, ("mlp_hidden_dim",))
    if site.kind == "single":
        undo.attributes(get_module(model, site.down), ("_tp_packed_row_blocks",))
    install_feed_forward(ff, site.up, site.down, plan.spec.feed_forward[site.name], group.factors, model)


def _original(layer: nn.Module, key: str) -> dict[str, torch.Tensor]:
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(layer.out_features, dtype=torch.float64)
    return {f"{key}.weight": w, f"{key}.bias": b}


def _attention_weights(model: nn.Module, site: AttentionSite, qk: GroupPlan | None,
                       vo: GroupPlan | None) -> dict[str, torch.Tensor]:
    """Separate-layout weights for one attention (fp64, CPU); an untouched group keeps its original weights.

    Keys: ``q k v`` (+ ``add_q add_k add_v`` for joint attention) ``.weight/.bias``, ``out.weight``
    (+ ``add_out.weight``); a single-stream attention's ``out.weight`` is its columns of ``proj_out``.
    """
    attn = get_module(model, site.name)
    out: dict[str, torch.Tensor] = {}
    if qk is not None:
        out |= qk.weights()
    else:
        out |= _original(attn.to_q, "q") | _original(attn.to_k, "k")
        if site.is_joint:
            out |= _original(attn.add_q_proj, "add_q") | _original(attn.add_k_proj, "add_k")
    if vo is not None:
        out |= vo.weights()
    else:
        out |= _original(attn.to_v, "v")
        readers = get_module(model, site.out).weight.detach().double()
        out["out.weight"] = readers[:, :site.heads * site.head_dim] if site.kind == "single" else readers
        if site.is_joint:
            out |= _original(attn.add_v_proj, "add_v")
            if site.add_out:
                out["add_out.weight"] = attn.to_add_out.weight.detach().double()
    return {k: v.cpu() for k, v in out.items()}
