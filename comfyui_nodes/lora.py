"""LoRAs on slim MODELs in ComfyUI: a loader that maps them, and a guard against loaders that cannot.

A LoRA made for the original model has the original shapes. ComfyUI's stock ``LoraLoader`` adds it as weight
patches; on a layer SlimDiff narrowed, ``comfy.weight_adapter.LoRAAdapter.calculate_weight`` fails to reshape
the update, logs ``ERROR lora ...`` and leaves the weight as it is: the sample silently lacks the LoRA there.
So this module gives two things:

- :func:`apply_lora`, behind **SlimDiff Load LoRA**: ComfyUI parses the LoRA file (``comfy.lora.load_lora``
  with the model's own key map, every format ComfyUI reads), then each update of a narrowed layer is mapped
  through the slimming's basis maps (:func:`slimdiff_diffusers.core.basis_maps.translate_lora_factors`, the
  maths the diffusers side uses) and added as an ordinary LoRA patch of the slim shape; untouched layers get
  the LoRA unchanged. Strength, stacking, Save and partial (lowvram) loading work as for any LoRA patch.
- :func:`install_guard`, which SlimDiff Slim and Load Slim Model put on the MODELs they return: an
  ``OUTER_SAMPLE`` wrapper (inherited by every clone, so also by a stock LoRA loader's output) that refuses to
  sample when a weight or hook patch of the original shape targets a narrowed layer, and says what to do.

Slim transformers (Flux, SD3, PixArt): the spec and the maps name diffusers' Linears, while ComfyUI fuses several of
them into one layer (``qkv``, ``linear1``, ``kv_linear``) and patches that layer (a whole kohya-style patch, or
rows of it for a diffusers-style key). :func:`_map_transformer_patches` splits each patch by rows into the diffusers
Linears the layer holds (``slim_format.comfy_linear_parts``, from ComfyUI's own key map), maps each like the diffusers
side, and puts the parts back in the slim layer's row order (:class:`MappedLoRAAdapter`, which the guard accepts).

The maps exist for a MODEL slimmed in this workflow (SlimDiff Slim keeps them in memory, on the CPU). A MODEL
loaded from a slim file has none: its LoRAs are applied before SlimDiff Slim (baked in), or it is slimmed again
in the workflow.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

import comfy.lora
import comfy.model_patcher
import comfy.patcher_extension
from comfy.weight_adapter.lora import LoRAAdapter

from slimdiff_diffusers.core import SlimSpec
from slimdiff_diffusers.core.basis_maps import (
    SINGLE_OUT,
    UNMAPPED,
    BasisMaps,
    narrowed_linear_roles,
    original_linear_shape,
    translate_lora_factors,
)
from slimdiff_diffusers.core.errors import LoraMappingError

from . import comfy_dit, slim_format

logger = logging.getLogger("slimdiff.comfyui")

GUARD_KEY = "slimdiff_lora_guard"
LORA_NODE = "SlimDiff Load LoRA"
_PREFIX = "diffusion_model."
WHAT_TO_DO = (f"Use the '{LORA_NODE}' node after SlimDiff Slim (it maps the LoRA into the slim layers), or apply "
              "the LoRA before SlimDiff Slim (it is baked in)")


def _spec(patcher: comfy.model_patcher.ModelPatcher) -> SlimSpec | None:
    return getattr(getattr(patcher.model, "diffusion_model", None), "slimdiff_spec", None)


def maps_of(patcher: comfy.model_patcher.ModelPatcher) -> BasisMaps | None:
    """The basis maps SlimDiff Slim kept for this MODEL, or None (a MODEL loaded from a slim file)."""
    return getattr(getattr(patcher.model, "diffusion_model", None), "slimdiff_basis_maps", None)


def _narrowed(patcher: comfy.model_patcher.ModelPatcher) -> dict[str, str]:
    """``{linear path relative to diffusion_model: role}`` of the narrowed Linears (empty for a dense MODEL)."""
    spec = _spec(patcher)
    if spec is None:
        return {}
    return narrowed_linear_roles(patcher.model.diffusion_model, spec, maps_of(patcher))


def _linear_of(key: Any) -> str | None:
    """The module path (relative to diffusion_model) a patch key ``diffusion_model.<path>.weight`` targets."""
    if isinstance(key, tuple):  # (key, offset) patches of fused layers
        key = key[0]
    if not isinstance(key, str) or not key.startswith(_PREFIX):
        return None
    return key[len(_PREFIX):].rpartition(".")[0]


# ---------------------------------------------------------------------------------------------------
# SlimDiff Load LoRA
# ---------------------------------------------------------------------------------------------------


class MappedLoRAAdapter(LoRAAdapter):
    """A LoRA patch SlimDiff Load LoRA mapped into a slim transformer's layer (fused or not): ComfyUI applies it as
    any LoRA; the class tells the guard (:func:`misfit_patches`) that its rows and columns are the slim layer's."""


def _refuse(problems: list[str]) -> None:
    """Raise one :class:`LoraMappingError` naming the first problems, if there are any (nothing is loaded then)."""
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LoraMappingError(f"{LORA_NODE}: this LoRA cannot be mapped onto the slim MODEL: "
                               f"{'; '.join(problems[:3])}{more}. Apply it before SlimDiff Slim instead")


def _plain_lora_or_problem(adapter: Any, path: str, problems: list[str]
                           ) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
    """:func:`_plain_lora`, or None with the reason appended to ``problems`` (a LoHa, LoKr, ... update)."""
    plain = _plain_lora(adapter)
    if plain is None:
        kind = getattr(adapter, "name", None) or type(adapter).__name__
        problems.append(f"{path!r}: a {kind} update (only plain LoRA factors have an image on a narrowed layer)")
    return plain


def _fits_original(path: str, up: torch.Tensor, down: torch.Tensor, expected_in: int, expected_out: int,
                   problems: list[str]) -> bool:
    """Whether the LoRA's factors have the original layer's shape; if not, the reason is appended to ``problems``."""
    if down.shape[1] == expected_in and up.shape[0] == expected_out:
        return True
    problems.append(f"{path!r}: the LoRA maps {down.shape[1]} -> {up.shape[0]} features, the original layer "
                    f"{expected_in} -> {expected_out} (a LoRA for another model?)")
    return False


def _plain_lora(adapter: Any) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
    """(up = B, down = A, alpha) of a plain LoRA patch; None for anything else (LoCon mid, DoRA, LoHa, ...)."""
    if not isinstance(adapter, LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if mid is not None or dora_scale is not None or reshape is not None or up.ndim != 2 or down.ndim != 2:
        return None
    return up, down, alpha


def _transformer_family(patcher: comfy.model_patcher.ModelPatcher) -> comfy_dit.ComfyTransformerFamily | None:
    model_config = patcher.model.model_config
    return comfy_dit.family_of_unet_config(model_config.unet_config, type(model_config).__name__)


def _transformer_layers(patcher: comfy.model_patcher.ModelPatcher
                        ) -> dict[str, tuple[slim_format.LinearPart, ...]]:
    """The ComfyUI Linears of a slim transformer that hold a diffusers Linear SlimDiff changed (or shifted: a part
    after a narrowed one in a fused layer), each with its diffusers parts (:func:`slim_format.comfy_linear_parts`)."""
    spec = _spec(patcher)
    family = _transformer_family(patcher)
    if spec is None or family is None:
        return {}
    roles = _narrowed(patcher)
    parts = slim_format.comfy_linear_parts(spec, comfy_dit.key_map_of(family, patcher.model.model_config.unet_config))
    return {path: laid for path, laid in parts.items()
            if any(part.path in roles or part.rows != part.slim_rows for part in laid)}


class _Widths:
    """The widths :func:`original_linear_shape` reads of a (slim) Linear, here those of a ComfyUI Linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape[:2]


class _WidthsModel(torch.nn.Module):
    """Stands in for the diffusers model in :func:`original_linear_shape`: the diffusers Linear ``path`` is the
    ComfyUI Linear ``layer`` as a whole (no fusing), so its slim widths are that layer's."""

    def __init__(self, path: str, layer: torch.nn.Module) -> None:
        super().__init__()
        self._slim_path, self._slim_widths = path, _Widths(layer.weight)

    def get_submodule(self, target: str) -> Any:  # noqa: D102
        if target != self._slim_path:
            raise AttributeError(target)
        return self._slim_widths


def _original_shape(layer: torch.nn.Module, spec: SlimSpec, path: str, role: str | None) -> tuple[int, int]:
    """(in, out) features before slimming of the ComfyUI Linear that is the diffusers Linear ``path``."""
    if role is None:
        return layer.weight.shape[1], layer.weight.shape[0]
    return original_linear_shape(_WidthsModel(path, layer), spec, path, role)


def _map_transformer_patches(patcher: comfy.model_patcher.ModelPatcher, patches: dict[Any, Any]
                             ) -> tuple[dict[Any, Any], dict[str, tuple[torch.Tensor]], int]:
    """:func:`map_lora_patches` for a slim transformer (Flux, SD3, PixArt), whose spec and maps name diffusers'
    Linears while ComfyUI fuses several of them into one layer.

    A patch of a fused layer is split by its rows into the diffusers Linears it holds (a kohya-style patch of the
    whole ``linear1``: q, k, v and the MLP's input share its down factor), each part is mapped as the diffusers
    side maps that Linear, and the parts are put back in the slim layer's row order: one LoRA of the same rank
    (the row parts only change the up factor). A patch of one part (a diffusers-style ``to_v`` patch, with its
    offset into the fused weight) gets that part's offset in the slim weight. Layers reading narrowed columns
    (``proj``, ``linear2``, ``proj_out``, down projections) map as a whole."""
    spec = _spec(patcher)
    maps = maps_of(patcher)
    unet = patcher.model.diffusion_model
    if maps is None:  # a MODEL loaded from a slim file: no maps, so nothing to split a fused patch into
        touched = _transformer_layers(patcher)
        narrowed = sorted({path for key in patches if (path := _linear_of(key)) is not None
                           and (path in touched or _has_slim_layout(patcher, path))}
                          | {_linear_of(key) for key, adapter in patches.items() if _misfits(patcher, key, adapter)})
        if narrowed:
            raise LoraMappingError(
                f"{LORA_NODE}: this slim MODEL has no LoRA maps (it was loaded from a slim file), and the LoRA "
                f"targets {len(narrowed)} layer(s) SlimDiff narrowed, e.g. {narrowed[0]!r}. Apply the LoRA to the "
                "original model before SlimDiff Slim (it is baked in), or slim the original in this workflow "
                "(SlimDiff Calibrate + Slim keep the maps in memory)")
        return dict(patches), {}, 0
    roles = _narrowed(patcher)
    layers = _transformer_layers(patcher)
    problems: list[str] = []
    plan: list[tuple[Any, str, tuple[slim_format.LinearPart, ...], Any]] = []
    out: dict[Any, Any] = {}
    for key, adapter in patches.items():
        name = key[0] if isinstance(key, tuple) else key
        path = _linear_of(key)
        laid = layers.get(path) if path is not None else None
        if laid is None:
            out[key] = adapter  # a layer slimming did not touch: the LoRA applies as it is
            continue
        layer = unet.get_submodule(path)
        if not name.endswith(".weight"):
            if _outputs_kept(laid, roles):
                out[key] = adapter  # the bias of a layer whose outputs slimming kept (proj, linear2): unchanged
            else:
                problems.append(f"{name!r}: an update of the bias of a layer whose outputs SlimDiff changed "
                                "(narrowed, or in a new basis)")
            continue
        plain = _plain_lora_or_problem(adapter, path, problems)
        if plain is None:
            continue
        up, down, _ = plain
        offset = key[1] if isinstance(key, tuple) else None
        if laid[0].start is None:  # one diffusers Linear, narrowed by its columns (or an unfused up projection)
            if offset is not None:
                problems.append(f"{name!r} rows {offset}: a patch of part of a layer that holds one Linear")
                continue
            expected_in, expected_out = _original_shape(layer, spec, laid[0].path, roles.get(laid[0].path))
            chosen: tuple[slim_format.LinearPart, ...] = laid
        else:  # a fused layer: the patch covers all of it, or some of its parts (ComfyUI's offset into it)
            dim, start, size = offset if offset is not None else (0, 0, sum(p.rows for p in laid))
            chosen = tuple(p for p in laid if p.start >= start and p.start + p.rows <= start + size)
            if dim != 0 or not chosen or chosen[0].start != start or sum(p.rows for p in chosen) != size:
                problems.append(f"{name!r} rows {offset}: a patch of a fused layer that does not cover whole parts "
                                f"of it ({', '.join(f'{p.path} {p.start}+{p.rows}' for p in laid)})")
                continue
            expected_in, expected_out = layer.weight.shape[1], size
        if not _fits_original(path, up, down, expected_in, expected_out, problems):
            continue
        if any(roles.get(p.path) == UNMAPPED for p in chosen):
            problems.append(f"{path!r}: a layer reading attention heads and MLP together (no LoRA map)")
            continue
        plan.append((key, path, chosen, plain))
    _refuse(problems)
    biases: dict[str, tuple[torch.Tensor]] = {}
    for key, path, chosen, (up, down, alpha) in plan:
        ups, downs = [], []
        row = 0
        for part in chosen:
            b = up[row: row + part.rows] if part.rows is not None else up
            row += part.rows or 0
            role = roles.get(part.path)
            if role is None:  # a part slimming kept (a full-width MLP beside narrowed values): as it is
                a_new, b_new, bias_delta = down, b, None
            else:
                a_new, b_new, _, bias_delta = translate_lora_factors(part.path, role, down, b, maps)
            ups.append(b_new)
            downs.append(a_new)
            if bias_delta is not None:
                scale = alpha / down.shape[0] if alpha is not None else 1.0  # the bias patch is a plain diff
                biases[f"{_PREFIX}{path}.bias"] = ((bias_delta.float() * scale).to(bias_delta.dtype),)
        # row parts change only the up factor (q/k/v: T_hᵀ per head, MLP: the kept rows), so they share `down`
        if any(a is not downs[0] for a in downs[1:]):
            raise LoraMappingError(f"{LORA_NODE}: {path!r}: its parts changed the LoRA's down factor differently")
        new_key: Any = key
        if isinstance(key, tuple):  # the same parts' rows in the slim weight
            new_key = (key[0], (0, chosen[0].slim_start, sum(p.slim_rows for p in chosen)))
        out[new_key] = MappedLoRAAdapter(set(), (torch.cat(ups, dim=0), downs[0], alpha, None, None, None))
    return out, biases, len(plan)


def map_lora_patches(patcher: comfy.model_patcher.ModelPatcher, patches: dict[Any, Any]
                     ) -> tuple[dict[Any, Any], dict[str, tuple[torch.Tensor]], int]:
    """Translate ComfyUI LoRA patches made for the original model into ``patcher``'s slim shapes.

    Returns ``(weight patches, bias patches, number of layers mapped)``. Everything is checked first; a patch
    that cannot be mapped raises :class:`LoraMappingError` naming the layer and nothing is returned.
    """
    if _spec(patcher) is not None and _transformer_family(patcher) is not None:
        return _map_transformer_patches(patcher, patches)
    unet = patcher.model.diffusion_model
    spec = _spec(patcher)
    maps = maps_of(patcher)
    roles = _narrowed(patcher)
    problems: list[str] = []
    plan: list[tuple[Any, str, str, tuple[torch.Tensor, torch.Tensor, float | None]]] = []
    out: dict[Any, Any] = {}
    for key, adapter in patches.items():
        path = _linear_of(key)
        role = roles.get(path) if path is not None else None
        if role is None:
            out[key] = adapter  # a layer slimming did not touch: the LoRA applies as it is
            continue
        if role == UNMAPPED:
            problems.append(f"{path!r}: a layer reading attention heads and MLP together (no LoRA map yet)")
            continue
        if isinstance(key, tuple) or not key.endswith(".weight"):
            problems.append(f"{key!r}: a patch of part of a narrowed layer")
            continue
        plain = _plain_lora_or_problem(adapter, path, problems)
        if plain is None:
            continue
        up, down, _ = plain
        expected_in, expected_out = original_linear_shape(unet, spec, path, role)
        if not _fits_original(path, up, down, expected_in, expected_out, problems):
            continue
        plan.append((key, path, role, plain))
    if plan and maps is None and not problems:
        raise LoraMappingError(
            f"{LORA_NODE}: this slim MODEL has no LoRA maps (it was loaded from a slim file), and the LoRA targets "
            f"{len(plan)} narrowed layer(s), e.g. {plan[0][1]!r}. Apply the LoRA to the original model before "
            "SlimDiff Slim (it is baked in), or slim the original in this workflow (SlimDiff Calibrate + Slim "
            "keep the maps in memory)")
    _refuse(problems)
    biases: dict[str, tuple[torch.Tensor]] = {}
    for key, path, role, (up, down, alpha) in plan:
        a, b, _, bias_delta = translate_lora_factors(path, role, down, up, maps)
        out[key] = LoRAAdapter(set(), (b, a, alpha, None, None, None))
        if bias_delta is not None:
            # LoRAAdapter scales its update by alpha / rank; the bias patch is a plain diff, so scale it here.
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            biases[f"{_PREFIX}{path}.bias"] = ((bias_delta.float() * scale).to(bias_delta.dtype),)
    return out, biases, len(plan)


def apply_lora(patcher: comfy.model_patcher.ModelPatcher, lora: dict[str, torch.Tensor], strength: float
               ) -> tuple[comfy.model_patcher.ModelPatcher, str]:
    """A clone of ``patcher`` with the LoRA state dict ``lora`` (any format ComfyUI reads) applied at
    ``strength``, mapped into the slim layers when ``patcher`` is a slim MODEL. Returns (MODEL, summary)."""
    if strength == 0:
        return patcher, "strength 0: nothing applied"
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    patches = comfy.lora.load_lora(lora, key_map)
    if not patches:
        raise LoraMappingError(f"{LORA_NODE}: no entry of this LoRA names a layer of this model's diffusion model "
                               "(a LoRA for another model family, or a text-encoder-only LoRA)")
    weights, biases, mapped = map_lora_patches(patcher, patches)
    model = patcher.clone()
    added = model.add_patches(weights, strength)
    if biases:
        model.add_patches(biases, strength)
    unmapped = misfit_patches(model)
    if unmapped:  # a patch the mapping left in the original's shapes (none should be: a safety net)
        raise LoraMappingError(
            f"{LORA_NODE}: {len(unmapped)} patch(es) of this LoRA do not fit the slim layers they target (e.g. "
            f"{unmapped[0]!r}); apply the LoRA before SlimDiff Slim (it is baked in)")
    text = f"{len(added)} layers patched"
    if mapped:
        text += f", {mapped} of them narrowed by SlimDiff (mapped through the slimming's bases)"
    logger.info("%s: %s", LORA_NODE, text)
    return model, text


# ---------------------------------------------------------------------------------------------------
# The guard on slim MODELs
# ---------------------------------------------------------------------------------------------------


def _patch_fits(value: Any, shape: torch.Size) -> bool:
    """Whether a weight patch's update has ``shape`` (ComfyUI skips, with a log line, one that does not)."""
    if isinstance(value, LoRAAdapter):
        plain = _plain_lora(value)
        return plain is not None and (plain[0].shape[0], plain[1].shape[1]) == tuple(shape)
    if isinstance(value, tuple) and len(value) == 1 and value[0] is None:
        return True  # a pure weight scale (UNetSelfAttentionMultiply's (None,) with strength_model): any shape
    if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], torch.Tensor):
        return value[0].shape == shape  # a plain "diff"
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "diff":
        return value[1][0].shape == shape
    return False  # other adapters (LoHa, LoKr, OFT, ...) and "set" / model-as-LoRA patches: not checked, refused


def _has_slim_layout(patcher: comfy.model_patcher.ModelPatcher, path: str | None) -> bool:
    """Whether ``path`` is a fused layer of a slim transformer (SlimOps' scatter/gather layout), whose rows or
    columns no longer line up with what a LoRA for the original model (or its offset into the fused weight) expects."""
    if path is None:
        return False
    try:
        module = patcher.model.diffusion_model.get_submodule(path)
    except AttributeError:
        return False
    return getattr(module, "slim_out_index", None) is not None or getattr(module, "slim_in_index", None) is not None


def _misfits(patcher: comfy.model_patcher.ModelPatcher, key: Any, adapter: Any) -> bool:
    """Whether a plain LoRA patch's update does not have its target's shape (ComfyUI would skip it)."""
    name = key[0] if isinstance(key, tuple) else key
    if _plain_lora(adapter) is None or isinstance(key, tuple):
        return False
    try:
        shape = patcher.get_model_object(name).shape
    except AttributeError:
        return False
    return not _patch_fits(adapter, shape)


#: roles of diffusers Linears whose outputs slimming keeps (it narrows or changes only what they read)
_COLUMN_ROLES = ("out", "down", SINGLE_OUT, UNMAPPED)


def _outputs_kept(parts: tuple[slim_format.LinearPart, ...], roles: dict[str, str]) -> bool:
    """Whether slimming kept the outputs (rows) of the ComfyUI Linear holding ``parts``: then its bias and an
    update of it are the original's."""
    return all(roles.get(p.path) in (None, *_COLUMN_ROLES) and p.rows == p.slim_rows for p in parts)


def _entry_shape(entry: tuple, weight_shape: torch.Size) -> torch.Size | None:
    """The shape a patch entry ``(strength, adapter, strength_model, offset, function)`` updates: the weight's, or
    the rows its offset selects (None for an offset along another dimension or past the weight)."""
    offset = entry[3] if len(entry) > 3 else None
    if offset is None:
        return weight_shape
    dim, start, size = offset
    if dim != 0 or start + size > weight_shape[0]:
        return None
    return torch.Size((size, *weight_shape[1:]))


def _fits_touched_layer(patcher: comfy.model_patcher.ModelPatcher, name: str, entries: list,
                        parts: tuple[slim_format.LinearPart, ...], roles: dict[str, str]) -> bool:
    """Whether every patch of a slim transformer's layer that slimming changed is right there: weight updates
    SlimDiff Load LoRA mapped into it (:class:`MappedLoRAAdapter`, fitting the rows they patch), bias updates only
    where slimming kept the layer's outputs."""
    try:
        target = patcher.get_model_object(name)
    except AttributeError:
        return False
    if name.endswith(".weight"):
        return all(isinstance(e[1], MappedLoRAAdapter) and (shape := _entry_shape(e, target.shape)) is not None
                   and _patch_fits(e[1], shape) for e in entries)
    return _outputs_kept(parts, roles) and all(
        (shape := _entry_shape(e, target.shape)) is not None and _patch_fits(e[1], shape) for e in entries)


def _transformer_misfits(patcher: comfy.model_patcher.ModelPatcher) -> list[str]:
    """:func:`misfit_patches` of a slim transformer: on a layer slimming changed (narrowed, fused with a narrowed
    part, or in a new basis at full width), anything but what :func:`_fits_touched_layer` accepts; elsewhere, a
    plain LoRA whose update does not have the shape it patches."""
    touched = _transformer_layers(patcher)
    roles = _narrowed(patcher)
    groups = [patcher.patches] + list(getattr(patcher, "hook_patches", {}).values())
    bad: list[str] = []
    for group in groups:
        for key, entries in group.items():
            name = key[0] if isinstance(key, tuple) else key
            path = _linear_of(key)
            if path in touched or _has_slim_layout(patcher, path):
                if not _fits_touched_layer(patcher, name, entries, touched.get(path, ()), roles):
                    bad.append(name)
                continue
            try:
                weight_shape = patcher.get_model_object(name).shape
            except AttributeError:
                continue
            for entry in entries:
                shape = _entry_shape(entry, weight_shape)
                if _plain_lora(entry[1]) is not None and (shape is None or not _patch_fits(entry[1], shape)):
                    bad.append(name)
    return sorted(set(bad))


def misfit_patches(patcher: comfy.model_patcher.ModelPatcher) -> list[str]:
    """Keys of weight or hook patches on narrowed layers whose update does not have the slim shape.

    UNets: the narrowed layers the spec names. Transformers (their spec is in diffusers' names, ComfyUI's layers
    are fused): :func:`_transformer_misfits`."""
    if _spec(patcher) is None:
        return []
    if _transformer_family(patcher) is not None:
        return _transformer_misfits(patcher)
    roles = _narrowed(patcher)
    groups = [patcher.patches] + list(getattr(patcher, "hook_patches", {}).values())
    bad: list[str] = []
    for group in groups:
        for key, entries in group.items():
            path = _linear_of(key)
            name = key[0] if isinstance(key, tuple) else key
            if path not in roles:
                try:
                    shape = patcher.get_model_object(name).shape
                except AttributeError:
                    continue
                if any(_plain_lora(e[1]) is not None and not _patch_fits(e[1], shape) for e in entries):
                    bad.append(name)
                continue
            try:
                shape = patcher.get_model_object(name).shape
            except AttributeError:
                bad.append(name)
                continue
            if isinstance(key, tuple) or roles[path] == UNMAPPED or any(not _patch_fits(e[1], shape) for e in entries):
                bad.append(name)
    return sorted(set(bad))


def check_weight_patches(patcher: comfy.model_patcher.ModelPatcher, where: str) -> None:
    """Raise :class:`LoraMappingError` when patches of the original shapes target narrowed layers of a slim MODEL
    (what a stock LoRA loader placed after SlimDiff Slim adds; ComfyUI would skip them with a log line)."""
    bad = misfit_patches(patcher)
    if bad:
        raise LoraMappingError(
            f"{where}: {len(bad)} LoRA/weight patch(es) made for the original model target layers SlimDiff narrowed, "
            f"e.g. {bad[0]!r}; ComfyUI cannot apply them to the slim shapes and would sample without them. "
            f"{WHAT_TO_DO}")


def _guard_outer_sample(executor, *args, **kwargs):
    check_weight_patches(executor.class_obj.model_patcher, "SlimDiff")
    return executor(*args, **kwargs)


def install_guard(patcher: comfy.model_patcher.ModelPatcher) -> comfy.model_patcher.ModelPatcher:
    """Register the patch check on a slim MODEL (in place; clones inherit it). Returns ``patcher``."""
    patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, GUARD_KEY)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, GUARD_KEY, _guard_outer_sample)
    return patcher
