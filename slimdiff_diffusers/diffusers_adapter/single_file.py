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

from ..core.errors import SlimFileError
from ..core.slim_file import load_slim_file, save_slim_file
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
    when it wrote diffusers keys). Raises :class:`SlimFileError` for files of another layout or model."""
    state_dict, spec, meta = load_slim_file(path, device="cpu")
    if meta["slimdiff.key_layout"] != "diffusers":
        raise SlimFileError(f"{path} stores ComfyUI/ldm key names; load it with the ComfyUI 'Load Slim Model' node, "
                            "or re-save it from ComfyUI in diffusers layout")
    config = dict(meta.get("slimdiff.base_config") or {})
    class_name = config.pop("_class_name", None)
    base = _CLASSES_BY_NAME.get(class_name)
    if base is None:
        raise SlimFileError(f"{path} was made from a {class_name!r}, which this loader cannot rebuild "
                            f"(supported: {', '.join(c.__name__ for c in SLIM_CLASSES)})")
    slim_cls = SLIM_CLASSES.get(base, base)
    model = slim_cls.from_config({**config, "slimdiff_spec": spec.to_dict()})
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise SlimFileError(f"{path} does not match its recorded architecture: {len(missing)} missing and "
                            f"{len(unexpected)} unexpected tensors (e.g. {(missing or unexpected)[0]})")
    dtype = torch_dtype or getattr(torch, meta.get("slimdiff.dtype", "float32"), torch.float32)
    return model.to(device=device, dtype=dtype).eval()


__all__ = ["SlimUNet2DConditionModel", "SlimUNet2DModel", "UNet2DConditionModel", "UNet2DModel",
           "load_slim_unet_file", "save_slim_unet_file"]
