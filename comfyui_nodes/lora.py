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
    UNMAPPED,
    BasisMaps,
    narrowed_linear_roles,
    original_linear_shape,
    translate_lora_factors,
)
from slimdiff_diffusers.core.errors import LoraMappingError

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


def _plain_lora(adapter: Any) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
    """(up = B, down = A, alpha) of a plain LoRA patch; None for anything else (LoCon mid, DoRA, LoHa, ...)."""
    if not isinstance(adapter, LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if mid is not None or dora_scale is not None or reshape is not None or up.ndim != 2 or down.ndim != 2:
        return None
    return up, down, alpha


def map_lora_patches(patcher: comfy.model_patcher.ModelPatcher, patches: dict[Any, Any]
                     ) -> tuple[dict[Any, Any], dict[str, tuple[torch.Tensor]], int]:
    """Translate ComfyUI LoRA patches made for the original model into ``patcher``'s slim shapes.

    Returns ``(weight patches, bias patches, number of layers mapped)``. Everything is checked first; a patch
    that cannot be mapped raises :class:`LoraMappingError` naming the layer and nothing is returned.
    """
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
        plain = _plain_lora(adapter)
        if plain is None:
            kind = getattr(adapter, "name", None) or type(adapter).__name__
            problems.append(f"{path!r}: a {kind} update (only plain LoRA factors have an image on a narrowed layer)")
            continue
        up, down, _ = plain
        expected_in, expected_out = original_linear_shape(unet, spec, path, role)
        if down.shape[1] != expected_in or up.shape[0] != expected_out:
            problems.append(f"{path!r}: the LoRA maps {down.shape[1]} -> {up.shape[0]} features, the original layer "
                            f"{expected_in} -> {expected_out} (a LoRA for another model?)")
            continue
        plan.append((key, path, role, plain))
    if plan and maps is None and not problems:
        raise LoraMappingError(
            f"{LORA_NODE}: this slim MODEL has no LoRA maps (it was loaded from a slim file), and the LoRA targets "
            f"{len(plan)} narrowed layer(s), e.g. {plan[0][1]!r}. Apply the LoRA to the original model before "
            "SlimDiff Slim (it is baked in), or slim the original in this workflow (SlimDiff Calibrate + Slim "
            "keep the maps in memory)")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LoraMappingError(f"{LORA_NODE}: this LoRA cannot be mapped onto the slim MODEL: "
                               f"{'; '.join(problems[:3])}{more}. Apply it before SlimDiff Slim instead")
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
    if unmapped:  # a slim transformer's fused layers: no map for ComfyUI's fused LoRA patches yet
        raise LoraMappingError(
            f"{LORA_NODE}: {len(unmapped)} layer(s) of this LoRA are fused layers SlimDiff narrowed (e.g. "
            f"{unmapped[0]!r}), which it cannot map into yet; apply the LoRA before SlimDiff Slim (it is baked in)")
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


def misfit_patches(patcher: comfy.model_patcher.ModelPatcher) -> list[str]:
    """Keys of weight or hook patches on narrowed layers whose update does not have the slim shape.

    UNets: the narrowed layers the spec names. Transformers (their spec is in diffusers' names, ComfyUI's layers
    are fused): any patch on a fused layer with a slim layout, and any plain LoRA / diff whose update does not
    have its target's shape."""
    if _spec(patcher) is None:
        return []
    roles = _narrowed(patcher)
    groups = [patcher.patches] + list(getattr(patcher, "hook_patches", {}).values())
    bad: list[str] = []
    for group in groups:
        for key, entries in group.items():
            path = _linear_of(key)
            name = key[0] if isinstance(key, tuple) else key
            if path not in roles:
                if _has_slim_layout(patcher, path):
                    bad.append(name)
                    continue
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
