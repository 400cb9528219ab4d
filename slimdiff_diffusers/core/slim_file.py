"""The single-file format shared by the diffusers side and the ComfyUI nodes.

One ``.safetensors`` file: the denoiser's full state dict (narrowed layers included) and string metadata:

* ``slimdiff.format``: ``"1"``;
* ``slimdiff.spec``: the :class:`SlimSpec` as JSON;
* ``slimdiff.key_layout``: ``"diffusers"`` or ``"ldm"`` (ComfyUI / original SD key names);
* ``slimdiff.base_config``: JSON of the base model's configuration (e.g. the diffusers UNet config);
* any further ``slimdiff.*`` entries the writer adds (calibration settings, report).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import SlimFileError, SlimSpecError
from .io_utils import atomic_path
from .slim_state import check_finite, check_shapes_against_spec
from .spec import SlimSpec

SLIM_FILE_FORMAT = "1"
KEY_LAYOUTS = ("diffusers", "ldm")


def save_slim_file(path: str | Path, state_dict: dict[str, torch.Tensor], spec: SlimSpec, *,
                   key_layout: str, base_config: dict[str, Any] | None = None,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write a slim model to one safetensors file, atomically. Returns the path."""
    from safetensors.torch import save_file

    if key_layout not in KEY_LAYOUTS:
        raise ValueError(f"key_layout must be one of {KEY_LAYOUTS}, got {key_layout!r}")
    header = {
        "slimdiff.format": SLIM_FILE_FORMAT,
        "slimdiff.spec": spec.to_json(),
        "slimdiff.key_layout": key_layout,
        "slimdiff.base_config": json.dumps(base_config or {}, default=str),
    }
    for key, value in (metadata or {}).items():
        if not key.startswith("slimdiff."):
            key = f"slimdiff.{key}"
        header[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    # safetensors refuses shared storage; contiguous copies of views are fine for a file on disk.
    tensors = {k: v.detach().contiguous().clone() if v.data_ptr() in _shared_ptrs(state_dict) else v.detach().contiguous()
               for k, v in state_dict.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def _shared_ptrs(state_dict: dict[str, torch.Tensor]) -> set[int]:
    seen: dict[int, int] = {}
    for t in state_dict.values():
        seen[t.data_ptr()] = seen.get(t.data_ptr(), 0) + 1
    return {p for p, n in seen.items() if n > 1}


def read_slim_header(path: str | Path) -> tuple[SlimSpec, dict[str, Any]]:
    """Read only the metadata of a slim file: (spec, metadata with JSON values decoded).

    Validates the schema: format version, spec (:meth:`SlimSpec.from_json`), key layout, and that
    ``slimdiff.base_config`` is a JSON object. Raises :class:`SlimFileError` (or a subclass) naming the file.
    """
    spec, meta, _ = _read_header(path)
    return spec, meta


def _read_header(path: str | Path) -> tuple[SlimSpec, dict[str, Any], dict[str, tuple[int, ...]]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise SlimFileError(f"{path} is a folder; a slim single file is one .safetensors file (a folder saved "
                                "with save_pretrained loads with SlimUNet2DConditionModel.from_pretrained)")
        raise FileNotFoundError(f"slim model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:
        raise SlimFileError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or not a "
                            "safetensors file at all: download or export it again") from exc
    if raw.get("slimdiff.format") != SLIM_FILE_FORMAT:
        if "slimdiff.format" not in raw:
            raise SlimFileError(f"{path} is a safetensors file but not a SlimDiff slim model (no slimdiff metadata); "
                                "load regular checkpoints with the usual loader")
        raise SlimFileError(f"{path} has SlimDiff format {raw['slimdiff.format']!r}; this version reads "
                            f"{SLIM_FILE_FORMAT!r}. Upgrade slimdiff-diffusers.")
    if "slimdiff.spec" not in raw:
        raise SlimSpecError(f"{path}: the metadata has no 'slimdiff.spec' entry (the widths of the slim layers); "
                            "the file is damaged or was edited: export the slim model again")
    spec = SlimSpec.from_json(raw["slimdiff.spec"], source=str(path))
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("slimdiff.spec", "slimdiff.format"):
            continue
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            if key == "slimdiff.base_config":
                raise SlimFileError(f"{path}: metadata entry 'slimdiff.base_config' is not valid JSON; the file is "
                                    "damaged or was edited: export the slim model again") from None
            meta[key] = value
    if meta.get("slimdiff.key_layout") not in KEY_LAYOUTS:
        raise SlimFileError(f"{path} has an unknown key layout {meta.get('slimdiff.key_layout')!r} (known: "
                            f"{', '.join(KEY_LAYOUTS)}); it may come from a newer SlimDiff: upgrade slimdiff-diffusers")
    if not isinstance(meta.get("slimdiff.base_config", {}), dict):
        raise SlimFileError(f"{path}: metadata entry 'slimdiff.base_config' must be a JSON object, got "
                            f"{type(meta['slimdiff.base_config']).__name__}; export the slim model again")
    check_shapes_against_spec(spec, shapes, str(path))
    return spec, meta, shapes


def read_slim_shapes(path: str | Path) -> tuple[SlimSpec, dict[str, Any], dict[str, tuple[int, ...]]]:
    """(spec, metadata, tensor shapes) of a slim file, validated against each other; no tensor data is read.

    Loaders use the shapes to compare the file with the model they are about to build, before allocating it.
    """
    return _read_header(path)


def load_slim_file(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], SlimSpec, dict[str, Any]]:
    """Read a slim file: (state_dict, spec, metadata).

    The header is validated first (schema, spec, tensor shapes against the spec: nothing is read before), then
    the tensors are loaded and checked for NaN/inf. Raises :class:`SlimFileError` (or a subclass) naming the
    file, the entry and the fix.
    """
    from safetensors.torch import load_file

    spec, meta, _ = _read_header(path)
    try:
        state_dict = load_file(str(path), device=str(device))
    except Exception as exc:
        raise SlimFileError(f"{path} is corrupt: {exc}; download or export it again") from exc
    check_finite(state_dict.items(), str(path))
    return state_dict, spec, meta
