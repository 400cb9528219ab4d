"""ComfyUI side of the SlimDiff single-file format: metadata and key layouts (pure python, no ComfyUI import).

The file itself is written and read by the core (``save_slim_file`` / ``load_slim_file``). This module only
decides what ComfyUI records in it and how a file written with diffusers key names is renamed to ComfyUI's
("ldm") names, given the key map ComfyUI itself provides (``comfy.utils.unet_to_diffusers``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slimdiff_diffusers.core.errors import SlimFileError
from slimdiff_diffusers.core.spec import SlimSpec

KEY_LAYOUT = "slimdiff.key_layout"
BASE_CONFIG = "slimdiff.base_config"
# Extras only ComfyUI writes; a diffusers-written file lacks them and is detected from its keys instead.
COMFY_MODEL_CONFIG = "slimdiff.comfyui.model_config"  # comfy.supported_models class name, e.g. "SD15"
COMFY_MODEL_TYPE = "slimdiff.comfyui.model_type"  # comfy.model_base.ModelType name, e.g. "EPS"
COMFY_LATENT_FORMAT = "slimdiff.comfyui.latent_format"  # comfy.latent_formats class name
COMFY_VERSION = "slimdiff.comfyui.version"

LAYOUT_LDM = "ldm"
LAYOUT_DIFFUSERS = "diffusers"

# unet_config entries that describe the runtime, not the architecture.
_RUNTIME_CONFIG_KEYS = ("dtype", "device", "operations", "disable_unet_model_creation")


def jsonable_unet_config(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture part of a ComfyUI ``unet_config`` as JSON-compatible data.

    Raises:
        ValueError: an entry is not plain data (it would not survive the round trip through the file).
    """
    out: dict[str, Any] = {}
    for key, value in unet_config.items():
        if key in _RUNTIME_CONFIG_KEYS:
            continue
        if isinstance(value, tuple):
            value = list(value)
        try:
            json.dumps(value)
        except TypeError:
            raise ValueError(f"unet_config[{key!r}] = {value!r} is not JSON data; cannot record the base model") from None
        out[key] = value
    return out


@dataclass(frozen=True)
class SlimFileFields:
    """Arguments of the core ``save_slim_file`` that describe the base model (besides weights and spec)."""

    key_layout: str
    base_config: dict[str, Any]
    metadata: dict[str, str]


def comfy_file_fields(unet_config: Mapping[str, Any], model_config_name: str, model_type: str, latent_format: str,
                      comfyui_version: str | None = None) -> SlimFileFields:
    """What a ComfyUI-written slim file records about its base model (key layout "ldm")."""
    metadata = {COMFY_MODEL_CONFIG: model_config_name, COMFY_MODEL_TYPE: model_type,
                COMFY_LATENT_FORMAT: latent_format}
    if comfyui_version:
        metadata[COMFY_VERSION] = comfyui_version
    return SlimFileFields(LAYOUT_LDM, jsonable_unet_config(unet_config), metadata)


@dataclass(frozen=True)
class BaseModelInfo:
    """What a slim file says about the stock model it was slimmed from."""

    key_layout: str
    base_config: dict[str, Any]
    model_config_name: str | None  # None for diffusers-written files
    model_type: str | None
    latent_format: str | None


def read_base_model_info(metadata: Mapping[str, Any], file_name: str) -> BaseModelInfo:
    """Parse the base-model entries of a slim file's metadata (as returned by the core ``load_slim_file``:
    JSON values already decoded).

    Raises:
        SlimFileError: naming ``file_name``, when an entry is missing or malformed.
    """
    layout = metadata.get(KEY_LAYOUT)
    if layout not in (LAYOUT_LDM, LAYOUT_DIFFUSERS):
        raise SlimFileError(f"{file_name}: unknown key layout {layout!r} (expected 'ldm' or 'diffusers')")
    base_config = metadata.get(BASE_CONFIG) or {}
    if isinstance(base_config, str):
        try:
            base_config = json.loads(base_config)
        except json.JSONDecodeError as exc:
            raise SlimFileError(f"{file_name}: the recorded base model config is not valid JSON ({exc})") from exc
    if not isinstance(base_config, dict):
        raise SlimFileError(f"{file_name}: the recorded base model config is not a JSON object")
    name = metadata.get(COMFY_MODEL_CONFIG)
    if layout == LAYOUT_LDM and (not isinstance(name, str) or not name or not base_config):
        raise SlimFileError(f"{file_name}: an 'ldm' layout file must record the ComfyUI model config class "
                            f"({COMFY_MODEL_CONFIG}) and the unet config ({BASE_CONFIG})")
    model_type = metadata.get(COMFY_MODEL_TYPE)
    latent = metadata.get(COMFY_LATENT_FORMAT)
    return BaseModelInfo(layout, base_config, name, model_type if isinstance(model_type, str) else None,
                         latent if isinstance(latent, str) else None)


def _module_map(key_map: Mapping[str, str]) -> dict[str, str]:
    """Module-path map from a parameter-key map (``a.b.weight -> x.y.weight`` gives ``a.b -> x.y``)."""
    modules: dict[str, str] = {}
    for src, dst in key_map.items():
        src_mod, _, src_leaf = src.rpartition(".")
        dst_mod, _, dst_leaf = dst.rpartition(".")
        if src_leaf == dst_leaf and src_mod and dst_mod:
            modules.setdefault(src_mod, dst_mod)
    return modules


def rename_spec(spec: SlimSpec, key_map: Mapping[str, str], file_name: str) -> SlimSpec:
    """The same spec with module paths renamed through a parameter-key map (e.g. diffusers -> ldm).

    Attention paths are found through their ``to_q`` weight and feed-forward paths through the weight of
    their down projection (``net.2``), since key maps name parameters, not modules.

    Raises:
        SlimFileError: a spec path has no counterpart in the map (the file does not match the model).
    """
    modules = _module_map(key_map)

    def rename(path: str, child: str) -> str:
        mapped = modules.get(f"{path}.{child}")
        if mapped is None or not mapped.endswith(f".{child}"):
            raise SlimFileError(f"{file_name}: the slim spec names {path!r}, which has no counterpart in the "
                                "target model's key layout (file and base model do not match)")
        return mapped[: -len(child) - 1]

    return SlimSpec(
        attention={rename(path, "to_q"): a for path, a in spec.attention.items()},
        feed_forward={rename(path, "net.2"): f for path, f in spec.feed_forward.items()},
        version=spec.version,
    )


def rename_state_dict(state_dict: Mapping[str, Any], key_map: Mapping[str, str], file_name: str) -> dict[str, Any]:
    """Rename every key through ``key_map``; a key the map does not know is an error (nothing is dropped)."""
    unknown = [k for k in state_dict if k not in key_map]
    if unknown:
        raise SlimFileError(f"{file_name}: {len(unknown)} tensors have names the base model does not have "
                            f"(e.g. {unknown[:3]}); the file does not belong to this model family")
    return {key_map[k]: v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------------
# Files written by the diffusers side
# ---------------------------------------------------------------------------------------------------


def to_uniform_layout_state(state_dict: Mapping[str, Any], spec: SlimSpec) -> tuple[dict[str, Any], SlimSpec]:
    """A diffusers-written ``"separate"`` layout as the ``"uniform"`` layout ComfyUI's backends run (exact)."""
    from slimdiff_diffusers.core import convert_layout

    return convert_layout(dict(state_dict), spec, layout="uniform")


def _per_level(value: Any, levels: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{name} has {len(value)} entries for {levels} levels")
        return list(value)
    return [value] * levels


def ldm_unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """ComfyUI's ``unet_config`` (as ``model_detection`` writes it) for a diffusers ``UNet2DConditionModel``
    config. Used when ComfyUI's own detection, which knows only the standard SD1.x/2.x/XL sizes, does not
    recognise a diffusers-written file.

    Raises:
        ValueError: the config describes something ComfyUI's UNetModel cannot build.
    """
    class_name = config.get("_class_name")
    if class_name not in (None, "UNet2DConditionModel", "SlimUNet2DConditionModel"):
        raise ValueError(f"a {class_name} is not a text-conditioned UNet ComfyUI can build")
    blocks = list(config["block_out_channels"])
    levels = len(blocks)
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    if len(down_types) != levels or len(up_types) != levels:
        raise ValueError("down/up block types do not match block_out_channels")
    res = [int(n) for n in _per_level(config.get("layers_per_block", 2), levels, "layers_per_block")]
    depth = [int(d) for d in _per_level(config.get("transformer_layers_per_block", 1), levels,
                                        "transformer_layers_per_block")]
    reverse_depth = config.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    reverse_depth = [int(d) if not isinstance(d, (list, tuple)) else int(d[0]) for d in reverse_depth]
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = [int(h) for h in _per_level(heads, levels, "attention heads")]
    context_dim = config.get("cross_attention_dim")
    if isinstance(context_dim, (list, tuple)):
        if len(set(context_dim)) != 1:
            raise ValueError("per-level cross_attention_dim is not supported by ComfyUI's UNetModel")
        context_dim = context_dim[0]

    transformer_depth: list[int] = []
    transformer_depth_output: list[int] = []
    for level in range(levels):
        down_attn = "CrossAttn" in down_types[level]
        transformer_depth += [depth[level] if down_attn else 0] * res[level]
        up_index = levels - 1 - level  # up blocks run from the deepest level
        up_attn = "CrossAttn" in up_types[up_index]
        transformer_depth_output += [reverse_depth[up_index] if up_attn else 0] * (res[level] + 1)

    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    middle = depth[-1] if mid == "UNetMidBlock2DCrossAttn" else (-1 if mid == "UNetMidBlock2D" else -2)

    out: dict[str, Any] = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": int(config.get("in_channels", 4)), "out_channels": int(config.get("out_channels", 4)),
        "model_channels": blocks[0], "num_res_blocks": res, "channel_mult": [b // blocks[0] for b in blocks],
        "transformer_depth": transformer_depth, "transformer_depth_output": transformer_depth_output,
        "transformer_depth_middle": middle, "context_dim": context_dim,
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    if any(b % blocks[0] for b in blocks):
        raise ValueError(f"block widths {blocks} are not multiples of the first")
    if len(set(heads)) == 1:
        out["num_heads"], out["num_head_channels"] = heads[0], -1
    elif len({b // h for b, h in zip(blocks, heads, strict=True)}) == 1:
        out["num_heads"], out["num_head_channels"] = -1, blocks[0] // heads[0]
    else:
        raise ValueError(f"per-level heads {heads} are neither constant nor of constant width")
    adm = None
    if config.get("addition_embed_type") == "text_time" or config.get("class_embed_type") is not None:
        adm = config.get("projection_class_embeddings_input_dim")
    out["adm_in_channels"] = adm
    if adm is not None:
        out["num_classes"] = "sequential"
    return out
