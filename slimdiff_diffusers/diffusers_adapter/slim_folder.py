"""Validation of a saved slim model folder (``save_pretrained`` output) before diffusers loads it.

``SlimUNet2DConditionModel.from_pretrained`` (directly, or as a component of ``DiffusionPipeline.from_pretrained``)
goes through :func:`load_validated`: for a local folder the ``config.json`` and its ``slimdiff_spec`` are parsed
and validated, and the safetensors weights' shapes (read from their headers, shards included) are compared with
the spec and with the model the config builds on the ``meta`` device, all before diffusers allocates anything.
Hub repo ids are downloaded by diffusers first, then get the same spec validation (in ``__init__``). Every
loaded model is checked for NaN/inf weights. Problems raise :class:`SlimFileError` subclasses naming the folder,
the entry and the fix, instead of diffusers' size-mismatch wall.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.errors import SlimFileError, SlimSpecError
from ..core.slim_state import check_finite, check_shapes_against_model, check_shapes_against_spec, safetensors_shapes
from ..core.spec import SlimSpec

WEIGHTS_NAME = "diffusion_pytorch_model"


def _local_folder(name_or_path: str | os.PathLike, subfolder: str | None) -> Path | None:
    folder = Path(name_or_path)
    if subfolder:
        folder = folder / subfolder
    return folder if folder.is_dir() else None


def read_folder_config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` as a dict (``None`` when absent); malformed JSON is a :class:`SlimFileError`."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimFileError(f"{path} is not valid JSON ({exc}); the folder is damaged: save the model again "
                            "with save_pretrained, or re-download it") from exc
    if not isinstance(config, dict):
        raise SlimFileError(f"{path} must hold a JSON object; save the model again with save_pretrained")
    return config


def weight_shapes(folder: Path, variant: str | None = None) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of the folder's safetensors weights (single file or shards), or ``None`` if it has none."""
    stem = f"{WEIGHTS_NAME}.{variant}" if variant else WEIGHTS_NAME
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    try:
        if single.is_file():
            return safetensors_shapes(single)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            shapes: dict[str, tuple[int, ...]] = {}
            for shard in shards:
                shapes.update(safetensors_shapes(folder / shard))
            return shapes
    except Exception as exc:  # safetensors raises its own error types for truncated / foreign files
        raise SlimFileError(f"{folder}: its weights cannot be read ({type(exc).__name__}: {exc}); the download is "
                            "incomplete or the folder is damaged: re-download it or save the model again") from exc
    return None


def check_slim_folder(cls: type, folder: Path, kwargs: dict[str, Any]) -> None:
    """Validate a local folder for ``cls.from_pretrained`` (no tensor data is read; nothing is allocated)."""
    config = read_folder_config(folder)
    if config is None or config.get("slimdiff_spec") is None:
        return  # a stock folder: the Slim class loads it as the stock model
    config_path = folder / "config.json"
    spec = SlimSpec.from_dict(config["slimdiff_spec"], source=f"{config_path} ('slimdiff_spec')")
    shapes = weight_shapes(folder, kwargs.get("variant"))
    if shapes is None:
        return  # no safetensors weights: diffusers reports the missing file itself
    check_shapes_against_spec(spec, shapes, str(folder))
    if kwargs.get("ignore_mismatched_sizes"):
        return
    overrides = {k: v for k, v in kwargs.items() if k in config}
    try:
        with torch.device("meta"):
            skeleton = cls.from_config({**config, **overrides})
    except SlimSpecError as exc:
        raise SlimSpecError(f"{config_path}: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    check_shapes_against_model(expected, shapes, str(folder), f"the {cls.__name__} of its config.json")


def load_validated(cls: type, load: Any, name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> nn.Module:
    """``load(name_or_path, **kwargs)`` (diffusers' ``from_pretrained``) with the slim-folder checks around it."""
    folder = _local_folder(name_or_path, kwargs.get("subfolder"))
    if folder is not None:
        check_slim_folder(cls, folder, kwargs)
    source = str(folder or name_or_path)
    try:
        model = load(name_or_path, **kwargs)
    except SlimSpecError as exc:  # a Hub download: the spec is first validated in __init__
        if source in str(exc):
            raise
        raise SlimSpecError(f"{source}: {exc}") from exc
    loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True returns (model, info)
    if getattr(loaded, "slimdiff_spec", None) is not None:
        check_finite(_finite_checkable(loaded.state_dict().items()), source)
    return model


def _finite_checkable(tensors):
    """The tensors the NaN/inf check can read. A quantizer applied at load time (``quantization_config``:
    torchao, quanto) leaves tensor subclasses that implement few operators: their dequantized values are
    checked instead; a subclass without ``dequantize`` is left to its library."""
    for name, tensor in tensors:
        if type(tensor) in (torch.Tensor, nn.Parameter):
            yield name, tensor
        elif callable(getattr(tensor, "dequantize", None)):
            yield name, tensor.dequantize()
