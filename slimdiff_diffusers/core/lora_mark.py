"""The mark of a LoRA made *on* a slim model: "these updates are in the slim bases of that model".

A slimmed Linear computes in new bases (whitened per head, kept FFN channels, the refit), even at full rank. A LoRA
trained on a slim model is therefore meaningful only on that slim model (or one with the same layers), never on
the original, and a LoRA made for the original must be translated (:mod:`..diffusers_adapter.lora`). Both kinds
look alike when no target changed shape, so files saved from a slim model carry this mark in their LoRA metadata
(diffusers' ``lora_adapter_metadata`` JSON, which reaches ``load_lora_adapter`` on every diffusers route, model-
and pipeline-level), and the mark ties them to the model they were made on:

- ``spec_sha256``: the SHA-256 of the model's :class:`SlimSpec` (its widths): another budget or calibration that
  changed any width is told apart exactly;
- ``layers``: a sketch of every narrowed weight, ``[‖W‖_F, u_1ᵀW r_1/‖W‖_F, ..., u_KᵀW r_K/‖W‖_F]`` with
  fixed pseudo-random ±1 vectors ``u_k, r_k`` (a counter hash, the same on every machine and torch version). Two slim
  models of the same widths but other bases (another calibration) have unrelated sketches (each normalised entry
  is ~N(0, 1), so the per-layer RMS difference is ~1.4), while the same model reloaded in another dtype, or with
  a LoRA fused into it, moves by about the relative size of that change. A layer matches when its normalised
  sketch moves by at most :data:`SKETCH_TOLERANCE` (RMS) and its norm by at most that fraction.

This module is the one owner of the mark's key (:data:`MARK_KEY`), its format and its check.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .errors import LoraMappingError, SlimLoraMismatchError
from .slim_state import expected_slim_shapes
from .spec import SlimSpec

MARK_KEY = "slimdiff_slim_bases"  # the entry of diffusers' LoRA metadata (LoraConfig.to_dict() plus this key)
MARK_FORMAT = "1"
SKETCH_PROBES = 8
SKETCH_TOLERANCE = 0.1
_SEED = 0x5EED_5117


def spec_digest(spec: SlimSpec) -> str:
    """SHA-256 of the spec's canonical JSON."""
    return hashlib.sha256(spec.to_json().encode()).hexdigest()


def narrowed_weights(model: nn.Module, spec: SlimSpec) -> dict[str, torch.Tensor]:
    """``{weight key: tensor}`` of every weight the spec narrows (through PEFT wrappers: their base layers')."""
    params: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if ".lora_" in name or "lora_magnitude_vector" in name:
            continue
        params[name.replace(".base_layer.", ".")] = p
    expected = expected_slim_shapes(spec, {k: tuple(v.shape) for k, v in params.items()}, "the slim model")
    return {k: params[k] for k in sorted(expected) if k.endswith(".weight") and k in params}


def _int64(v: int) -> int:
    """``v`` modulo 2**64 as a signed int64 (torch's int64 arithmetic wraps the same way)."""
    return (v + 2 ** 63) % 2 ** 64 - 2 ** 63


_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _signs(n: int, stream: int, probes: int) -> torch.Tensor:
    """``(n, probes)`` fixed ±1 values from a counter hash (splitmix64's finaliser on int64, logical shifts by
    masking), so the sketch vectors are the same on every machine and torch version (no RNG involved)."""
    x = torch.arange(n * probes, dtype=torch.int64).reshape(n, probes) + _int64(_SEED + (stream << 40))
    x = x * _GOLDEN
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 11) & 1).to(torch.float32) * 2 - 1


@torch.no_grad()
def weight_sketch(weight: torch.Tensor, probes: int = SKETCH_PROBES) -> list[float]:
    """``[‖W‖_F, u_kᵀ W r_k / ‖W‖_F for k < probes]`` of a 2-D weight, in fp32 on the weight's device."""
    if weight.device.type == "meta":
        raise LoraMappingError("the slim model's weights are not materialised (meta device, e.g. sequential CPU "
                               "offload): load or save its LoRA before offloading it")
    w = weight.detach().reshape(weight.shape[0], -1).float()
    out_f, in_f = w.shape
    r = _signs(in_f, 1, probes).to(w.device)
    u = _signs(out_f, 2, probes).to(w.device)
    values = ((w @ r) * u).sum(0).cpu()  # u_kᵀ W r_k for each k
    norm = float(w.norm().cpu())
    scale = 1.0 / norm if norm > 0 else 0.0
    return [round(norm, 6)] + [round(float(v) * scale, 6) for v in values]


def make_mark(model: nn.Module, spec: SlimSpec) -> dict[str, Any]:
    """The mark of ``model`` (a slim model with ``spec``): format, family, spec digest and the weight sketches."""
    return {"format": MARK_FORMAT, "model": type(model).__name__, "spec_sha256": spec_digest(spec),
            "layers": {k.removesuffix(".weight"): weight_sketch(w) for k, w in narrowed_weights(model, spec).items()}}


def model_mark(model: nn.Module) -> dict[str, Any] | None:
    """``model``'s mark, cached while its narrowed weights stay the same tensors (same version counters); None for
    a model without a slim spec."""
    spec = getattr(model, "slimdiff_spec", None)
    if spec is None:
        return None
    weights = narrowed_weights(model, spec)
    key = tuple((k, w.data_ptr(), w._version, w.dtype, str(w.device)) for k, w in weights.items())
    cached = getattr(model, "_slimdiff_lora_mark", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    mark = make_mark(model, spec)
    model._slimdiff_lora_mark = (key, mark)
    return mark


def _parse(mark: Any, source: str) -> dict[str, Any]:
    if isinstance(mark, str):
        try:
            mark = json.loads(mark)
        except json.JSONDecodeError as exc:
            raise LoraMappingError(f"{source}: the {MARK_KEY!r} entry is not valid JSON ({exc})") from exc
    if not isinstance(mark, Mapping) or mark.get("format") != MARK_FORMAT or \
            not isinstance(mark.get("layers"), Mapping) or not isinstance(mark.get("spec_sha256"), str):
        raise LoraMappingError(f"{source}: the {MARK_KEY!r} entry is not a SlimDiff slim-LoRA mark of format "
                               f"{MARK_FORMAT} (found {str(mark)[:120]!r}); it was edited or written by a newer "
                               "SlimDiff")
    return dict(mark)


def check_mark(mark: Any, model: nn.Module, source: str = "this LoRA") -> None:
    """Raise :class:`SlimLoraMismatchError` unless ``mark`` (read from a LoRA's metadata) is ``model``'s own.

    Same widths are checked exactly (the spec digest); same bases by the weight sketches, per narrowed layer.
    """
    mark = _parse(mark, source)
    name = type(model).__name__
    made_on = mark.get("model", "a slim model")
    ours = model_mark(model)
    if ours is None:
        raise SlimLoraMismatchError(
            f"{source} was made on a slim model ({made_on}): its updates are in that model's slim bases, which this "
            f"{name} (not slimmed) does not have. Load it on the slim model it was made on")
    fix = ("Load it on the slim model it was made on. A LoRA for the original model (unmarked) is translated "
           "instead; to carry this one over, fuse it into the slim model it was made on, or retrain it here")
    if mark["spec_sha256"] != ours["spec_sha256"]:
        raise SlimLoraMismatchError(
            f"{source} was made on another slim model ({made_on} with other widths: another budget or "
            f"calibration): its updates are in that model's bases, not this {name}'s. {fix}")
    theirs_layers, our_layers = mark["layers"], ours["layers"]
    differ = []
    for path, sketch in our_layers.items():
        other = theirs_layers.get(path)
        if not isinstance(other, list) or len(other) != len(sketch) or not _sketch_matches(other, sketch):
            differ.append(path)
    if differ or set(theirs_layers) - set(our_layers):
        example = differ[0] if differ else sorted(set(theirs_layers) - set(our_layers))[0]
        raise SlimLoraMismatchError(
            f"{source} was made on another slim model ({made_on} of the same widths but other bases, e.g. another "
            f"calibration): {len(differ)} of {len(our_layers)} narrowed layer(s) differ, e.g. {example!r}. {fix}")


def _sketch_matches(theirs: list, ours: list) -> bool:
    try:
        values = [float(v) for v in theirs]
    except (TypeError, ValueError):
        return False
    n0, n1 = values[0], ours[0]
    if abs(n0 - n1) > SKETCH_TOLERANCE * max(abs(n0), abs(n1), 1e-12):
        return False
    diffs = [a - b for a, b in zip(values[1:], ours[1:])]
    return math.sqrt(sum(d * d for d in diffs) / max(len(diffs), 1)) <= SKETCH_TOLERANCE


def split_mark(metadata: Mapping[str, Any] | None, prefix: str | None) -> tuple[Any, dict[str, Any] | None]:
    """``(mark or None, metadata without it)`` from diffusers' LoRA metadata as ``load_lora_adapter`` receives it
    (pipeline files prefix every key with the component, e.g. ``unet.``). Metadata left with no entry for this
    component becomes None, so diffusers infers the LoRA config from the state dict as for unmarked files."""
    if not metadata:
        return None, (dict(metadata) if metadata is not None else None)
    key = MARK_KEY if prefix is None else f"{prefix}.{MARK_KEY}"
    rest = {k: v for k, v in metadata.items() if k != key}
    mark = metadata.get(key)
    if mark is None and prefix is not None:  # a model-level file (no prefixes) loaded with a prefix
        mark = metadata.get(MARK_KEY)
        rest.pop(MARK_KEY, None)
    if mark is not None:
        own = rest if prefix is None else {k: v for k, v in rest.items() if k.startswith(f"{prefix}.")}
        if not own:
            rest = None
    return mark, rest


DIFFUSERS_LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY (safetensors metadata)


def file_mark(path: str) -> Any | None:
    """The mark in a safetensors LoRA file's diffusers metadata (model- or pipeline-level key), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(DIFFUSERS_LORA_METADATA_KEY)
        meta = json.loads(raw) if raw else {}
    except Exception:  # noqa: BLE001 - not a safetensors file with JSON metadata: no mark to read
        return None
    if not isinstance(meta, dict):
        return None
    return next((v for k, v in meta.items() if k == MARK_KEY or k.endswith(f".{MARK_KEY}")), None)
