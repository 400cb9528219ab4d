"""LoRAs made for the original model, on a slim model: translated through the slimming's basis maps.

A LoRA adds ``ΔW = s·B A`` to a Linear (``A``: r×d_in, ``B``: d_out×r, ``s`` = alpha/r). Every slimmed Linear's
weight is a linear function of the original weight (:mod:`slimdiff_diffusers.core.basis_maps`), so the update has
an exact image on the slim layer, still of rank r:

=================  ==============================================================================
layer              translated LoRA
=================  ==============================================================================
to_q / to_k / to_v ``B'[h] = T_hᵀ B[h]`` per head (the output basis changed), ``A' = A``
to_out.0           ``A'[:, h] = A[:, h] S_hᵀ`` per head (the input basis changed), ``B' = B``
ff up (GEGLU)      ``B' = B[J ∪ (m + J)]`` (the kept rows), ``A' = A``
ff down            ``A' = A M`` (the refit's right factor), ``B' = B``; with the refit's intercept the bias
                   also moves by ``s·B A M_b``, carried as ``lora_B.bias`` of that layer only
single-stream      Flux's ``proj_out`` reads ``[heads | MLP]``: ``A' = [A_a S_hᵀ per head | A_m M]``,
proj_out           ``B' = B``; the MLP part moves the bias by ``s·B A_m M_b`` as a down projection's does
anything else      unchanged (convolutions, proj_in/proj_out, time embeddings, untouched Linears)
=================  ==============================================================================

So the slim model with the translated LoRA computes what slimming ``W + ΔW`` *in the bases chosen for W* would:
exact at full rank (keep 1.0), and at lower ranks the LoRA's update is projected onto the kept subspaces, the same
approximation the slim model makes of W. The exact alternative is to fuse the LoRA into the original model and slim
again from the saved calibration (README, "LoRAs on slim models").

Entry points: :func:`translate_lora_state_dict` (a PEFT-format state dict → the slim model's), and
:func:`load_lora_adapter` which the Slim* model classes use for diffusers' ``load_lora_adapter`` (what
``pipe.load_lora_weights`` calls for the UNet), so ``set_adapters``, ``fuse_lora`` and ``unfuse_lora`` work as usual.

LoRAs made *on* a slim model are another kind: already in its bases. Every adapter config of a slim model carries
the model's mark (:mod:`slimdiff_diffusers.core.lora_mark`) in ``to_dict()``, so ``save_lora_adapter`` and a
pipeline's ``save_lora_weights`` (given ``unet_lora_adapter_metadata=unet.peft_config[name].to_dict()``, as
diffusers' training scripts pass it) write it into the file's LoRA metadata. On load, a marked LoRA that matches the
model passes through untranslated (diffusers' own loading); one marked for another slim model is refused; an unmarked
one is a LoRA for the original model and is translated, or refused when its shapes fit only the slim layers
(:func:`mark_slim_lora_file` marks such a file by hand).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.basis_maps import (
    LORA_MAPS_FILE,
    SINGLE_OUT,
    UNMAPPED,
    BasisMaps,
    lora_map_key,
    original_linear_shape,
    single_stream_readers,
    translate_lora_factors,
)
from ..core.basis_maps import narrowed_linear_roles as narrowed_linears
from ..core.errors import LoraMappingError
from ..core.lora_mark import MARK_KEY, check_mark, model_mark, split_mark
from ..core.spec import SlimSpec

logger = logging.getLogger("slimdiff")

_LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias")
HOW_TO_GET_MAPS = (
    "Slim the model with LoRA maps (the default of pipe.slim(), slimdiff_diffusers.slim() and `slimdiff slim`; "
    "save_pretrained writes them as " + LORA_MAPS_FILE + " beside the weights): re-slim from the saved calibration, "
    "e.g. pipe.slim(calibration='calibration.safetensors', keep_ratio=...), then save again. Or take the exact "
    "route: load the LoRA on the original pipeline, pipe.fuse_lora(), then pipe.slim(calibration=...)")


@dataclass
class TranslatedLora:
    """A LoRA state dict in the slim model's bases, and the bias updates PEFT's ``lora_B`` must carry."""

    state_dict: dict[str, torch.Tensor]
    lora_b_bias: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> (d_out,)
    translated: list[str] = field(default_factory=list)  # module paths whose LoRA was mapped


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _group_by_module(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        module, sep, rest = key.partition(".lora_")
        if not sep:
            raise LoraMappingError(f"LoRA entry {key!r} is not in the PEFT format (<module>.lora_A.weight / "
                                   "<module>.lora_B.weight); convert it with diffusers' loaders first")
        modules.setdefault(module, {})["lora_" + rest] = value
    return modules


def translate_lora_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module,
                              maps: BasisMaps | None = None) -> TranslatedLora:
    """Map a PEFT-format LoRA state dict made for the original model into ``model``'s slim bases.

    Keys are module paths relative to ``model`` (``down_blocks.0...attn1.to_q.lora_A.weight``). Targets the
    slimming did not narrow are returned unchanged. Everything is checked before anything is returned.

    Raises:
        LoraMappingError: a target that is not in the model, a LoRA whose shapes are not the original model's
            (a LoRA for another model), a target that cannot be mapped (DoRA, a ``lora_B`` bias on a narrowed
            feed-forward down projection), or a narrowed target when ``model`` has no basis maps; each names the
            module and says what to do instead.
    """
    spec: SlimSpec | None = getattr(model, "slimdiff_spec", None)
    narrowed = narrowed_linears(model, spec, maps) if spec is not None else {}
    modules = _group_by_module(state_dict)
    problems: list[str] = []
    slim_shaped: list[str] = []  # narrowed targets whose LoRA fits the slim layer, not the original one
    plan: list[tuple[str, str | None, dict[str, torch.Tensor]]] = []
    for path, parts in modules.items():
        try:
            module = _base(model.get_submodule(path))
        except AttributeError:
            problems.append(f"{path!r} is not a module of this {type(model).__name__}")
            continue
        role = narrowed.get(path)
        a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if a is None or b is None:
            problems.append(f"{path!r} has no lora_A/lora_B weight pair")
            continue
        unknown = set(parts) - set(_LORA_SUFFIXES)
        if role is None:
            problem = _check_untouched(path, module, a, b)
            if problem:
                problems.append(problem)
            plan.append((path, None, parts))
            continue
        if role == UNMAPPED:
            problems.append(f"{path!r} reads a single-stream block's attention heads and MLP together, and this "
                            f"model's LoRA maps were written before SlimDiff mapped that layer ({LORA_MAPS_FILE} of "
                            "format 1); slim the original again from the saved calibration and save it, which "
                            "writes the map, or take the exact route (fuse the LoRA into the original, then re-slim "
                            "from the saved calibration)")
            continue
        if unknown:
            problems.append(f"{path!r} carries {sorted(unknown)} (e.g. DoRA's magnitude vector), which depends on "
                            "the norms of the original weight's columns and has no image on the narrowed layer")
            continue
        expected_in, expected_out = original_linear_shape(model, spec, path, role)
        if a.shape[-1] != expected_in or b.shape[0] != expected_out:
            if isinstance(module, nn.Linear) and (a.shape[-1], b.shape[0]) == (module.in_features,
                                                                                 module.out_features):
                slim_shaped.append(path)
            problems.append(f"{path!r}: the LoRA maps {a.shape[-1]} -> {b.shape[0]} features, the original layer "
                            f"{expected_in} -> {expected_out} (a LoRA for another model?)")
            continue
        # a single-stream proj_out whose MLP columns were refit is a down projection too (same rule)
        mlp_refit = role == SINGLE_OUT and single_stream_readers(spec)[path][1] is not None
        if "lora_B.bias" in parts and (role == "down" or mlp_refit):
            problems.append(f"{path!r}: a lora_B bias on a narrowed feed-forward down projection cannot be carried "
                            "through the refit (it would need a rank-one term of its own)")
            continue
        plan.append((path, role, parts))
    needs_maps = [path for path, role, _ in plan if role is not None]
    if needs_maps and maps is None and not problems:
        raise LoraMappingError(
            f"this slim model has no LoRA basis maps, and the LoRA targets {len(needs_maps)} narrowed layer(s) "
            f"(e.g. {needs_maps[0]!r}). {HOW_TO_GET_MAPS}")
    if maps is not None:
        for path, role, _ in plan:
            if role is not None and not _has_map(maps, path, role):
                problems.append(f"{path!r} is narrowed but the LoRA maps have no entry for it (maps of another "
                                "slimming?); save the slim model again")
    if slim_shaped:
        raise LoraMappingError(
            f"this LoRA fits the slim layers of this {type(model).__name__} (e.g. {slim_shaped[0]!r}), not the "
            "original model's, but it carries no SlimDiff mark saying on which slim model it was made (it was saved "
            "without diffusers' LoRA metadata, or by another tool). Its updates are meaningful only in the bases of "
            "the slim model it was trained on, and another slimming of the same widths has other bases, so it is "
            "not loaded unverified. If it was made on this very slim model, mark it: "
            "slimdiff_diffusers.mark_slim_lora_file(path, model), or pass metadata={..., "
            "**slimdiff_diffusers.slim_lora_metadata(model)}; save LoRAs with model.save_lora_adapter, or with "
            "save_lora_weights(..., unet_lora_adapter_metadata=unet.peft_config[name].to_dict()), to mark them")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LoraMappingError(f"this LoRA cannot be loaded on the slim {type(model).__name__}: "
                               f"{'; '.join(problems[:3])}{more}")

    out = TranslatedLora({})
    for path, role, parts in plan:
        if role is None:
            out.state_dict |= {f"{path}.{k}": v for k, v in parts.items()}
            continue
        a, b, lora_bias, bias = translate_lora_factors(path, role, parts["lora_A.weight"], parts["lora_B.weight"],
                                                       maps, parts.get("lora_B.bias"))
        new = {"lora_A.weight": a, "lora_B.weight": b} | ({"lora_B.bias": lora_bias} if lora_bias is not None else {})
        out.state_dict |= {f"{path}.{k}": v for k, v in new.items()}
        if bias is not None:
            out.lora_b_bias[path] = bias
        out.translated.append(path)
    return out


def _check_untouched(path: str, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> str | None:
    if isinstance(module, nn.Linear):
        shape_in, shape_out = module.in_features, module.out_features
    elif isinstance(module, nn.modules.conv._ConvNd):
        shape_in, shape_out = module.in_channels, module.out_channels
    else:
        return None  # PEFT decides what it supports
    if a.shape[1] != shape_in or b.shape[0] != shape_out:
        return (f"{path!r}: the LoRA maps {a.shape[1]} -> {b.shape[0]} features, this layer {shape_in} -> "
                f"{shape_out} (a LoRA for another model?)")
    return None


def _has_map(maps: BasisMaps, path: str, role: str) -> bool:
    path = lora_map_key(path, maps)
    if role == SINGLE_OUT:  # BasisMaps.check made sure that every narrowed part of it has its map
        return path in maps.attention_input or path in maps.mlp_input
    if role in ("q", "k", "v"):
        return path in maps.output
    if role in ("out", "down"):
        return path in maps.input
    return path in maps.rows


# -------------------------------------------------------------------------------------------------- maps on models


def lora_maps(model: nn.Module) -> BasisMaps | None:
    """The model's basis maps: from its slimming (``slimdiff_basis_maps``), or read from where it was loaded
    (:data:`LORA_MAPS_FILE` beside the weights, read on first use and kept), or None."""
    maps = getattr(model, "slimdiff_basis_maps", None)
    if maps is not None:
        return maps
    location = getattr(model, "_slimdiff_lora_maps_location", None)
    spec = getattr(model, "slimdiff_spec", None)
    if location is None or spec is None:
        return None
    path = _resolve_maps_file(*location)
    if path is None:
        model._slimdiff_lora_maps_location = None
        return None
    maps = BasisMaps.load(path, spec)
    model.slimdiff_basis_maps = maps
    return maps


_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


def remember_maps_location(model: nn.Module, name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> None:
    """Record where a slim model was loaded from, to read its LoRA maps when a LoRA first needs them."""
    model._slimdiff_lora_maps_location = (str(name_or_path), kwargs.get("subfolder"),
                                          {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})


# A component folder of a huggingface_hub cache snapshot: .../models--owner--name/snapshots/<commit>/<subfolder>
_CACHE_SNAPSHOT = re.compile(r"^(?P<cache>.*)[/\\]models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots"
                             r"[/\\](?P<commit>[^/\\]+)[/\\]?(?P<sub>.*)$")


def _resolve_maps_file(name_or_path: str, subfolder: str | None, hub_kwargs: dict[str, Any]) -> Path | None:
    folder = Path(name_or_path) / subfolder if subfolder else Path(name_or_path)
    if folder.is_dir():
        candidate = folder / LORA_MAPS_FILE
        if candidate.is_file():
            return candidate
        # DiffusionPipeline.from_pretrained downloads only the weight files it knows of: the maps of a slim
        # pipeline from the Hub are fetched from the snapshot's repository and commit when first needed.
        snapshot = _CACHE_SNAPSHOT.match(str(folder.resolve()))
        if snapshot is None:
            return None
        repo = f"{snapshot['owner']}/{snapshot['name']}"
        sub = snapshot["sub"].replace("\\", "/").strip("/") or None
        hub_kwargs = {k: v for k, v in hub_kwargs.items() if k not in ("revision", "cache_dir")}
        return _hub_download(repo, sub, hub_kwargs | {"revision": snapshot["commit"], "cache_dir": snapshot["cache"]})
    return _hub_download(name_or_path, subfolder, hub_kwargs)


def _hub_download(repo_id: str, subfolder: str | None, hub_kwargs: dict[str, Any]) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, LORA_MAPS_FILE, subfolder=subfolder, **hub_kwargs))
    except (EntryNotFoundError, LocalEntryNotFoundError) as exc:
        logger.info("no LoRA maps for %s%s: %s", repo_id, f"/{subfolder}" if subfolder else "", exc)
        return None


def save_lora_maps(model: nn.Module, save_directory: str | os.PathLike) -> Path | None:
    """Write the model's basis maps beside its weights (``save_pretrained``); nothing when it has none."""
    maps = lora_maps(model)
    spec = getattr(model, "slimdiff_spec", None)
    if maps is None or spec is None:
        return None
    return maps.save(Path(save_directory) / LORA_MAPS_FILE, spec)


# -------------------------------------------------------------------------------------------------- diffusers hook

_FETCH_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder",
                 "weight_name", "use_safetensors")


def load_lora_adapter(model: nn.Module, load: Callable[..., Any], pretrained_model_name_or_path_or_dict: Any,
                      prefix: str | None, hotswap: bool, kwargs: dict[str, Any]) -> Any:
    """diffusers' ``load_lora_adapter`` on a slim model: read the LoRA as diffusers does, translate it
    (:func:`translate_lora_state_dict`), then let diffusers and PEFT load the translated state dict.

    ``load`` is the stock ``load_lora_adapter`` bound to ``model``. A LoRA that touches no narrowed layer passes
    through unchanged; one that cannot be mapped raises :class:`LoraMappingError` before anything is loaded.
    """
    from diffusers.loaders.lora_base import _fetch_state_dict
    from diffusers.utils.peft_utils import get_adapter_name
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    fetch = {k: kwargs.pop(k, None) for k in _FETCH_KWARGS}
    use_safetensors = fetch.pop("use_safetensors")
    state_dict, metadata = _fetch_state_dict(
        pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict, use_safetensors=use_safetensors,
        user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"}, allow_pickle=False,
        metadata=kwargs.pop("metadata", None), **fetch)
    mark, metadata = split_mark(metadata, prefix)
    if mark is not None:
        # Made on a slim model: already in slim bases. Ours passes through as diffusers loads any LoRA.
        has_weights = any(k.startswith(f"{prefix}.") for k in state_dict) if prefix is not None else bool(state_dict)
        if has_weights:
            check_mark(mark, model)
        result = load(state_dict, prefix=prefix, hotswap=hotswap, metadata=metadata, **kwargs)
        mark_adapter_configs(model)
        return result
    if prefix is not None:
        state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    if state_dict and metadata and not any(".lokr_" in k for k in state_dict):
        _check_lora_metadata(metadata, prefix)  # diffusers' own error for bad metadata comes first, as on stock
    if not state_dict or any(".lokr_" in k for k in state_dict):
        spec = getattr(model, "slimdiff_spec", None)
        narrowed = narrowed_linears(model, spec, lora_maps(model)) if spec is not None else {}
        hit = sorted({k.partition(".lokr_")[0] for k in state_dict} & set(narrowed))
        if hit:
            raise LoraMappingError(f"LoKr adapters (Kronecker factors) cannot be mapped onto narrowed layers such as "
                                   f"{hit[0]!r}; use the exact route instead: {HOW_TO_GET_MAPS.split('Or take ')[-1]}")
        result = load(_with_prefix(state_dict, prefix), prefix=prefix, hotswap=hotswap, metadata=metadata, **kwargs)
        mark_adapter_configs(model)
        return result
    if "lora_A" not in next(iter(state_dict)):
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    translated = translate_lora_state_dict(state_dict, model, lora_maps(model))
    if translated.lora_b_bias and hotswap:
        raise LoraMappingError("hotswapping a LoRA that targets narrowed feed-forward down projections is not "
                               "supported; load it under a new adapter name instead")
    if kwargs.get("adapter_name") is None:
        kwargs["adapter_name"] = get_adapter_name(model)
    if translated.translated:
        logger.info("LoRA %s: %d narrowed layer(s) translated into the slim bases", kwargs["adapter_name"],
                    len(translated.translated))
    result = load(_with_prefix(translated.state_dict, prefix), prefix=prefix, hotswap=hotswap, metadata=metadata,
                  **kwargs)
    if translated.lora_b_bias:
        _add_lora_b_bias(model, kwargs["adapter_name"], translated.lora_b_bias)
    mark_adapter_configs(model)  # now in the slim bases: saved again, it is a LoRA of this slim model
    return result


def _check_lora_metadata(metadata: dict[str, Any], prefix: str | None) -> None:
    """Build the LoraConfig diffusers will build from ``metadata``, so that bad metadata raises diffusers' own
    ``TypeError`` before any translation (as it does on a stock model)."""
    from diffusers.utils.peft_utils import _create_lora_config

    if prefix is not None:
        metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    if metadata:
        _create_lora_config({}, None, metadata, {})


def _with_prefix(state_dict: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    return state_dict if prefix is None else {f"{prefix}.{k}": v for k, v in state_dict.items()}


@torch.no_grad()
def _add_lora_b_bias(model: nn.Module, adapter_name: str, biases: dict[str, torch.Tensor]) -> None:
    """Give the named layers' ``lora_B`` a bias for this adapter (PEFT's ``lora_bias``, per layer).

    PEFT's ``lora_bias`` is one switch for every target, and it cannot merge on layers without a base bias (SD's
    q/k/v), so it is set only on the down projections that need it. PEFT scales, merges and unmerges a ``lora_B``
    bias per layer (``LoraLayer.lora_bias``), so ``set_adapters``, ``fuse_lora`` and ``unfuse_lora`` include it.
    """
    for path, bias in biases.items():
        layer = model.get_submodule(path)
        old = layer.lora_B[adapter_name]
        new = nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device, dtype=old.weight.dtype)
        new.weight = old.weight
        new.bias = nn.Parameter(bias.to(device=old.weight.device, dtype=old.weight.dtype),
                                requires_grad=old.weight.requires_grad)
        layer.lora_B[adapter_name] = new
        layer.lora_bias[adapter_name] = True


# ------------------------------------------------------------------------------ Flux pipelines' shape expansion


def _split_slimmed_targets(transformer: nn.Module, lora_state_dict: dict[str, torch.Tensor] | None, prefix: str
                           ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """``(entries outside the slimmed modules, entries inside them)`` of a pipeline-level LoRA state dict (keys
    ``<prefix>.<module path>.lora_*``) for a slim ``transformer``; everything is "outside" for a stock one."""
    spec = getattr(transformer, "slimdiff_spec", None)
    if spec is None or not lora_state_dict:
        return lora_state_dict, {}
    roots = tuple(f"{path}." for path in (*spec.attention, *spec.feed_forward))
    outside, inside = {}, {}
    for key, value in lora_state_dict.items():
        module = key.removeprefix(f"{prefix}.") if key.split(".")[0] == prefix else key
        (inside if module.startswith(roots) else outside)[key] = value
    return outside, inside


def install_flux_lora_shape_guard() -> None:
    """Keep Flux pipelines' ``load_lora_weights`` from resizing a slim transformer's narrowed layers.

    diffusers' ``FluxLoraLoaderMixin.load_lora_weights`` compares every LoRA target's shape with the transformer's
    layer *before* the transformer's ``load_lora_adapter`` runs, and replaces any layer narrower than the LoRA by a
    zero-padded wider one (meant for Flux Control LoRAs, which widen ``x_embedder``): on a slim transformer that
    silently un-slims ``proj_out``/``to_out.0`` and fails midway on a ``to_v`` with a bias, leaving the model
    half changed. No model hook runs before that check, so the pipeline mixin's two classmethods are wrapped: for a
    transformer with a ``slimdiff_spec`` the entries of slimmed modules are withheld from the expansion (the slim
    model's :func:`load_lora_adapter` checks and translates them next); everything else, and every stock
    transformer, gets diffusers' own behaviour unchanged. Idempotent; installed when this module is imported.
    """
    try:
        from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    except ImportError:  # a diffusers without Flux LoRA loading: nothing to guard
        return
    if getattr(FluxLoraLoaderMixin, "_slimdiff_shape_guard", False):
        return
    expand_params = FluxLoraLoaderMixin.__dict__["_maybe_expand_transformer_param_shape_or_error_"].__func__
    expand_state = FluxLoraLoaderMixin.__dict__["_maybe_expand_lora_state_dict"].__func__

    def _maybe_expand_transformer_param_shape_or_error_(cls, transformer, lora_state_dict=None, norm_state_dict=None,
                                                         prefix=None):
        outside, _ = _split_slimmed_targets(transformer, lora_state_dict, prefix or cls.transformer_name)
        return expand_params(cls, transformer, outside, norm_state_dict, prefix)

    def _maybe_expand_lora_state_dict(cls, transformer, lora_state_dict):
        outside, inside = _split_slimmed_targets(transformer, lora_state_dict, cls.transformer_name)
        if not inside:
            return expand_state(cls, transformer, lora_state_dict)
        return expand_state(cls, transformer, outside) | inside

    for wrapper, original in ((_maybe_expand_transformer_param_shape_or_error_, expand_params),
                              (_maybe_expand_lora_state_dict, expand_state)):
        wrapper.__doc__ = (original.__doc__ or "") + "\n\n(SlimDiff: slimmed modules of a slim transformer are " \
            "withheld; see slimdiff_diffusers.diffusers_adapter.lora.install_flux_lora_shape_guard.)"
        wrapper.__wrapped__ = original
        setattr(FluxLoraLoaderMixin, wrapper.__name__, classmethod(wrapper))
    FluxLoraLoaderMixin._slimdiff_shape_guard = True


install_flux_lora_shape_guard()


# -------------------------------------------------------------------------------------- LoRAs made on a slim model

_MARKED_CONFIG_CLASSES: dict[type, type] = {}


def _marked_config_class(cls: type) -> type:
    """``cls`` (a PEFT config dataclass) whose ``to_dict()`` adds the slim model's mark (same fields)."""
    if getattr(cls, "_slimdiff_marked", False):
        return cls
    if cls not in _MARKED_CONFIG_CLASSES:
        def to_dict(self) -> dict[str, Any]:
            out = cls.to_dict(self)
            mark = self.__dict__.get("_slimdiff_mark")
            if mark is not None:
                out[MARK_KEY] = mark
            return out

        _MARKED_CONFIG_CLASSES[cls] = type(cls.__name__, (cls,), {
            "to_dict": to_dict, "_slimdiff_marked": True, "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} of an adapter on a slim model: ``to_dict()`` also holds the model's mark "
                       f"(``{MARK_KEY}``), which diffusers writes into the LoRA file's metadata"})
    return _MARKED_CONFIG_CLASSES[cls]


def mark_adapter_configs(model: nn.Module, mark: dict[str, Any] | None = None, renew: tuple[str, ...] = ()) -> None:
    """Mark every adapter config of the slim ``model`` that is not marked yet: its LoRA lives in this model's
    bases (made here with ``add_adapter``, or loaded and translated here), so saved it must say so.

    The mark is taken now (when the adapter is made or loaded), so it names the slim model the LoRA was made on;
    the config is replaced by a marked copy (the caller's ``LoraConfig`` object is not changed). ``mark``: the
    model's mark if already taken (:func:`~slimdiff_diffusers.core.lora_mark.model_mark`). ``renew``: adapters
    marked again even if their config already carries a mark (``add_adapter`` with another slim model's config).
    """
    configs = getattr(model, "peft_config", None)
    if not configs:
        return
    for name, config in list(configs.items()):
        if name not in renew and config.__dict__.get("_slimdiff_mark") is not None:
            continue
        mark = mark if mark is not None else model_mark(model)
        if mark is None:
            return
        marked = copy.copy(config)
        marked.__class__ = _marked_config_class(type(config))
        marked.__dict__["_slimdiff_mark"] = mark
        configs[name] = marked


def slim_lora_metadata(model: nn.Module, prefix: str | None = None) -> dict[str, Any]:
    """``{mark key: mark}`` of the slim ``model``, to add to the ``metadata`` of a LoRA state dict that was made on
    this model but carries no mark (``model.load_lora_adapter(sd, metadata={**config, **slim_lora_metadata(m)})``).
    With ``prefix`` (e.g. ``"unet"``) the key is prefixed as in a pipeline file."""
    mark = model_mark(model)
    if mark is None:
        raise LoraMappingError(f"{type(model).__name__} is not a slim model: a LoRA made on it needs no mark")
    return {MARK_KEY if prefix is None else f"{prefix}.{MARK_KEY}": mark}


def mark_slim_lora_file(path: str | os.PathLike, model: nn.Module, prefix: str | None = "auto") -> Path:
    """Mark a LoRA file as made on the slim ``model`` (for files saved without diffusers' LoRA metadata, or by
    another tool): its LoRA metadata gains ``model``'s mark, the tensors are kept (atomic rewrite).

    Do this only for a LoRA trained on this very slim model: the mark is an assertion that its updates are in this
    model's bases. ``prefix="auto"`` uses the component name (``unet``/``transformer``) when every tensor key
    starts with it (a pipeline file), else none. Returns the file written.
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..core.io_utils import atomic_path

    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' own errors for a missing, truncated or foreign file
        raise LoraMappingError(f"{path}: not a readable safetensors LoRA file ({type(exc).__name__}: {exc})") from exc
    if prefix == "auto":
        from .models import family_of

        family = family_of(model)
        component = family.component if family is not None else None
        prefix = component if component and tensors and all(k.startswith(f"{component}.") for k in tensors) else None
    lora_meta = json.loads(meta.get(LORA_ADAPTER_METADATA_KEY, "{}"))
    lora_meta |= slim_lora_metadata(model, prefix)
    meta[LORA_ADAPTER_METADATA_KEY] = json.dumps(lora_meta, indent=2, sort_keys=True)
    meta.setdefault("format", "pt")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
