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

from .errors import SlimFileError
from .io_utils import atomic_path
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
    """Read only the metadata of a slim file: (spec, metadata with JSON values decoded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"slim model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:
        raise SlimFileError(f"{path} is not a readable safetensors file ({exc})") from exc
    if raw.get("slimdiff.format") != SLIM_FILE_FORMAT:
        if "slimdiff.format" not in raw:
            raise SlimFileError(f"{path} is a safetensors file but not a SlimDiff slim model (no slimdiff metadata); "
                                "load regular checkpoints with the usual loader")
        raise SlimFileError(f"{path} has SlimDiff format {raw['slimdiff.format']!r}; this version reads "
                            f"{SLIM_FILE_FORMAT!r}. Upgrade slimdiff-diffusers.")
    spec = SlimSpec.from_json(raw["slimdiff.spec"])
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("slimdiff.spec", "slimdiff.format"):
            continue
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    if meta.get("slimdiff.key_layout") not in KEY_LAYOUTS:
        raise SlimFileError(f"{path} has an unknown key layout {meta.get('slimdiff.key_layout')!r}")
    return spec, meta


def load_slim_file(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], SlimSpec, dict[str, Any]]:
    """Read a slim file: (state_dict, spec, metadata). Raises :class:`SlimFileError` for foreign files."""
    from safetensors.torch import load_file

    spec, meta = read_slim_header(path)
    try:
        state_dict = load_file(str(path), device=str(device))
    except Exception as exc:
        raise SlimFileError(f"{path} is corrupt: {exc}") from exc
    return state_dict, spec, meta
