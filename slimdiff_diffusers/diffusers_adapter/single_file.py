"""Single-file export/import of a slimmed diffusers denoiser (any family of :data:`~.models.SLIM_MODEL_FAMILIES`).

The file holds the model's state dict with diffusers key names (``slimdiff.key_layout = "diffusers"``), the slim
spec and the diffusers model config (with its ``_class_name``, the stock class), so it can be rebuilt without any
other file. ComfyUI's Load Slim Model node reads UNet files and converts the keys to its own (ldm) layout at load
time; transformer files load here (:func:`load_slim_model_file`).
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.errors import SlimFileError, SlimSpecError
from ..core.slim_file import load_slim_file, read_slim_shapes, save_slim_file
from ..core.slim_state import check_shapes_against_model
from ..core.spec import SlimSpec
from .models import SLIM_CLASSES, family_of

logger = logging.getLogger("slimdiff")

_BASES_BY_NAME = {base.__name__: base for base in SLIM_CLASSES} | \
    {slim.__name__: base for base, slim in SLIM_CLASSES.items()}


def save_slim_model_file(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write a slimmed denoiser (a ``Slim*`` model of :data:`~.models.SLIM_MODEL_FAMILIES`) to one
    ``.safetensors`` file (atomically)."""
    spec = getattr(model, "slimdiff_spec", None)
    if spec is None:
        raise ValueError("this model is not slimmed (no .slimdiff_spec); slim it first")
    family = family_of(model)
    if family is None:
        raise ValueError(f"{type(model).__name__} has no single-file export (supported: "
                         f"{', '.join(b.__name__ for b in SLIM_CLASSES)})")
    base_config = {k: v for k, v in dict(model.config).items() if k != "slimdiff_spec" and not k.startswith("_")}
    base_config["_class_name"] = family.base.__name__
    extra = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    report = getattr(model, "slimdiff_report", None)
    if report is not None:
        extra["report"] = json.dumps({"params_before": report.params_before, "params_after": report.params_after})
    return save_slim_file(path, model.state_dict(), spec, key_layout="diffusers", base_config=base_config,
                          metadata={**extra, **(metadata or {})})


def load_slim_model_file(path: str | Path, torch_dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a slimmed denoiser from a single file written by :func:`save_slim_model_file` (or ComfyUI's Save
    node when it wrote diffusers keys). Returns the ``Slim*`` class of the recorded model.

    Everything is validated before any weight memory is allocated: the metadata schema and slim spec, the
    tensor shapes against the spec, and against the model the recorded config builds (built on the ``meta``
    device, so it costs no memory); then the tensors are loaded, checked for NaN/inf and assigned to that
    model. Tensors the file does not hold because ``__init__`` computes them (non-persistent buffers, and plain
    tensor attributes such as Qwen-Image's RoPE frequencies) are then computed for real: the model is built once
    more with only its parameters on ``meta`` (:func:`_left_on_meta`). Raises :class:`SlimFileError` (or a
    subclass) naming the file, the entry and the fix.
    """
    spec, meta, shapes = read_slim_shapes(path)
    if meta["slimdiff.key_layout"] != "diffusers":
        raise SlimFileError(f"{path} stores ComfyUI/ldm key names; load it with the ComfyUI 'Load Slim Model' node, "
                            "or re-save it from ComfyUI in diffusers layout")
    config = dict(meta.get("slimdiff.base_config") or {})
    class_name = config.pop("_class_name", None)
    base = _BASES_BY_NAME.get(class_name) if isinstance(class_name, str) else None
    if base is None:
        raise SlimFileError(f"{path} was made from a {class_name!r}, which this loader cannot rebuild "
                            f"(supported: {', '.join(c.__name__ for c in SLIM_CLASSES)})")
    slim_cls = SLIM_CLASSES[base]
    model = _skeleton(slim_cls, config, spec, path)
    check_shapes_against_model({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, str(path),
                               f"the {base.__name__} of its recorded config")
    state_dict, _, _ = load_slim_file(path, device="cpu")
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = _left_on_meta(model)
    if left:  # tensors the file does not hold and __init__ computes: build them for real, weights still on meta
        logger.debug("%s: %s computed at construction; rebuilding the model with only its parameters on meta",
                     path, ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else ""))
        model = _skeleton(slim_cls, config, spec, path, parameters_only=True)
        model.load_state_dict(state_dict, strict=True, assign=True)
        left = _left_on_meta(model)
        if left:
            raise SlimFileError(f"{path}: the {base.__name__} of its recorded config leaves {', '.join(left[:3])} "
                                "without data: the file does not hold it and the model does not compute it at "
                                "construction, so the model cannot be rebuilt from this file")
    dtype = torch_dtype or getattr(torch, str(meta.get("slimdiff.dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    if next(model.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
        model = model.to(dtype=dtype)
    return model.to(device=device).eval()


def _skeleton(slim_cls: type, config: dict[str, Any], spec: SlimSpec, path: str | Path,
              parameters_only: bool = False) -> nn.Module:
    """The slim model of ``config`` + ``spec`` on the meta device (shapes only, no memory). With
    ``parameters_only`` only the parameters are on meta: buffers and plain tensor attributes that ``__init__``
    computes (RoPE tables) are real, as diffusers' own empty-weights loading leaves them."""
    try:
        with (_parameters_on_meta() if parameters_only else torch.device("meta")):
            return slim_cls.from_config({**config, "slimdiff_spec": spec.to_dict()})
    except SlimSpecError as exc:
        raise SlimSpecError(f"{path}: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise SlimFileError(f"{path}: its recorded base model configuration ('slimdiff.base_config') cannot "
                            f"build a {slim_cls.__name__} ({type(exc).__name__}: {exc}); the file is damaged or "
                            "was edited: export the slim model again") from exc


# _parameters_on_meta patches nn.Module.register_parameter, which is process-wide; the patch acts only for the
# threads inside the context (a ComfyUI server may build another model in another thread meanwhile), and it is
# installed by the first thread to enter and removed by the last to leave.
_ON_META = threading.local()
_PATCH_LOCK = threading.Lock()
_patch: dict[str, Any] = {"users": 0, "register": None}


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _patch["register"](module, name, param)
    if getattr(_ON_META, "depth", 0) and param is not None and not param.is_meta:
        module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Within: every parameter a module registers *in this thread* is moved to the meta device as it is
    registered, so ``__init__``'s weight initialisation runs on meta (no memory, no time) while its other tensors
    are computed for real. Other threads build their modules as usual."""
    with _PATCH_LOCK:
        if _patch["users"] == 0:
            _patch["register"] = nn.Module.register_parameter
            nn.Module.register_parameter = _register_parameter
        _patch["users"] += 1
    _ON_META.depth = getattr(_ON_META, "depth", 0) + 1
    try:
        yield
    finally:
        _ON_META.depth -= 1
        with _PATCH_LOCK:
            _patch["users"] -= 1
            if _patch["users"] == 0:
                nn.Module.register_parameter = _patch["register"]
                _patch["register"] = None


def _left_on_meta(model: nn.Module) -> list[str]:
    """Names of the model's tensors still on the meta device: parameters and buffers, and the plain tensor
    attributes some models compute in ``__init__`` without registering them (Qwen-Image's RoPE frequencies
    ``pos_embed.pos_freqs``), which neither the file nor ``load_state_dict`` can fill."""
    left = []
    for prefix, module in model.named_modules():
        tensors = [*module._parameters.items(), *module._buffers.items(),
                   *((k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor))]
        left += [f"{prefix}.{name}" if prefix else name for name, t in tensors if t is not None and t.is_meta]
    return left


# The names of the UNet-only first version; they take any supported denoiser.
save_slim_unet_file = save_slim_model_file
load_slim_unet_file = load_slim_model_file

__all__ = ["load_slim_model_file", "load_slim_unet_file", "save_slim_model_file", "save_slim_unet_file"]
