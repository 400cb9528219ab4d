"""Single-file export/import of a slimmed diffusers UNet (the format the ComfyUI nodes read and write).

The file holds the UNet state dict with diffusers key names (``slimdiff.key_layout = "diffusers"``), the slim
spec and the diffusers UNet config, so it can be rebuilt without any other file. ComfyUI's loader converts the
keys to its own (ldm) layout at load time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel, UNet2DModel

from ..core.errors import SlimFileError, SlimSpecError
from ..core.slim_file import load_slim_file, read_slim_shapes, save_slim_file
from ..core.slim_state import check_shapes_against_model
from ..core.spec import SlimSpec
from .models import SLIM_CLASSES, SlimUNet2DConditionModel, SlimUNet2DModel

_CLASSES_BY_NAME = {c.__name__: c for c in (*SLIM_CLASSES, *SLIM_CLASSES.values())}


def save_slim_unet_file(unet: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write a slimmed ``UNet2DConditionModel``/``UNet2DModel`` to one ``.safetensors`` file (atomically)."""
    spec = getattr(unet, "slimdiff_spec", None)
    if spec is None:
        raise ValueError("this model is not slimmed (no .slimdiff_spec); slim it first")
    base_config = {k: v for k, v in dict(unet.config).items() if k != "slimdiff_spec" and not k.startswith("_")}
    base_config["_class_name"] = next(b.__name__ for b, s in SLIM_CLASSES.items() if isinstance(unet, (b, s)))
    extra = {"dtype": str(next(unet.parameters()).dtype).removeprefix("torch.")}
    report = getattr(unet, "slimdiff_report", None)
    if report is not None:
        extra["report"] = json.dumps({"params_before": report.params_before, "params_after": report.params_after})
    return save_slim_file(path, unet.state_dict(), spec, key_layout="diffusers", base_config=base_config,
                          metadata={**extra, **(metadata or {})})


def load_slim_unet_file(path: str | Path, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a slimmed UNet from a single file written by :func:`save_slim_unet_file` (or ComfyUI's Save node
    when it wrote diffusers keys).

    Everything is validated before any weight memory is allocated: the metadata schema and slim spec, the
    tensor shapes against the spec, and against the model the recorded config builds (built on the ``meta``
    device, so it costs no memory); then the tensors are loaded, checked for NaN/inf and assigned to that
    model. Raises :class:`SlimFileError` (or a subclass) naming the file, the entry and the fix.
    """
    spec, meta, shapes = read_slim_shapes(path)
    if meta["slimdiff.key_layout"] != "diffusers":
        raise SlimFileError(f"{path} stores ComfyUI/ldm key names; load it with the ComfyUI 'Load Slim Model' node, "
                            "or re-save it from ComfyUI in diffusers layout")
    config = dict(meta.get("slimdiff.base_config") or {})
    class_name = config.pop("_class_name", None)
    base = _CLASSES_BY_NAME.get(class_name) if isinstance(class_name, str) else None
    if base is None:
        raise SlimFileError(f"{path} was made from a {class_name!r}, which this loader cannot rebuild "
                            f"(supported: {', '.join(c.__name__ for c in SLIM_CLASSES)})")
    slim_cls = SLIM_CLASSES.get(base, base)
    model = _skeleton(slim_cls, config, spec, path)
    check_shapes_against_model({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, str(path),
                               f"the {base.__name__} of its recorded config")
    state_dict, _, _ = load_slim_file(path, device="cpu")
    model.load_state_dict(state_dict, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a buffer the file does not hold
        model = slim_cls.from_config({**config, "slimdiff_spec": spec.to_dict()})
        model.load_state_dict(state_dict, strict=True)
    dtype = torch_dtype or getattr(torch, str(meta.get("slimdiff.dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    if next(model.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
        model = model.to(dtype=dtype)
    return model.to(device=device).eval()


def _skeleton(slim_cls: type, config: dict[str, Any], spec: SlimSpec, path: str | Path) -> nn.Module:
    """The slim model of ``config`` + ``spec`` on the meta device (shapes only, no memory)."""
    try:
        with torch.device("meta"):
            return slim_cls.from_config({**config, "slimdiff_spec": spec.to_dict()})
    except SlimSpecError as exc:
        raise SlimSpecError(f"{path}: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise SlimFileError(f"{path}: its recorded base model configuration ('slimdiff.base_config') cannot "
                            f"build a {slim_cls.__name__} ({type(exc).__name__}: {exc}); the file is damaged or "
                            "was edited: export the slim model again") from exc


__all__ = ["SlimUNet2DConditionModel", "SlimUNet2DModel", "UNet2DConditionModel", "UNet2DModel",
           "load_slim_unet_file", "save_slim_unet_file"]
