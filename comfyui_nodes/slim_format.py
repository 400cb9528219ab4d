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


# ---------------------------------------------------------------------------------------------------
# Transformer families (Flux, SD3/SD3.5, PixArt): ComfyUI's fused layers
# ---------------------------------------------------------------------------------------------------
#
# SlimDiff writes every transformer-family file in the diffusers key layout, whichever side made it: the slim
# spec names diffusers' modules (to_q/to_k/to_v, proj_mlp, proj_out, ...), which ComfyUI's fused layers (qkv,
# linear1, kv_linear) do not have, and a diffusers-layout file loads in diffusers as it is. ComfyUI's own key
# maps (comfy.utils.flux_to_diffusers, mmdit_to_diffusers, pixart_to_diffusers; passed in as ``key_map``) say
# which diffusers tensor goes where: a name, ``(name, (dim, start, size))`` for a slice of a fused tensor, or
# ``(name, None, fn)`` for a reordered one. In ComfyUI a narrowed fused layer stores only its kept rows,
# concatenated in the map's order, and scatters its output to the full-width layout ComfyUI's block code
# splits by fixed sizes; every head keeps its first ``width`` channels, the rest are zeros (a "prefix per
# head" layout). Readers of the attention output (proj, linear2, proj_out) gather the same channels.

TRANSFORMER_CLASSES = {  # diffusers class (as recorded in base_config) -> family name used in messages
    "FluxTransformer2DModel": "Flux", "SlimFluxTransformer2DModel": "Flux",
    "SD3Transformer2DModel": "SD3", "SlimSD3Transformer2DModel": "SD3",
    "PixArtTransformer2DModel": "PixArt", "SlimPixArtTransformer2DModel": "PixArt",
}

_ROLES = {"to_q": "q", "add_q_proj": "q", "to_k": "k", "add_k_proj": "k", "to_v": "v", "add_v_proj": "v",
          "proj_mlp": "mlp"}


def transformer_family(base_config: Mapping[str, Any]) -> str | None:
    """"Flux", "SD3" or "PixArt" for a recorded diffusers transformer config, else None (a UNet file)."""
    return TRANSFORMER_CLASSES.get(str(base_config.get("_class_name")))


#: the diffusers UNet classes a slim file may record; ComfyUI loads them through its own UNet detection
UNET_CLASSES = ("UNet2DConditionModel", "SlimUNet2DConditionModel")


def unsupported_class(base_config: Mapping[str, Any]) -> str | None:
    """The diffusers class a slim file records when ComfyUI's SlimDiff nodes cannot load it (a slim Chroma, DiT,
    Qwen-Image, Wan, ... transformer, which diffusers loads), else None. Files that record no class (ComfyUI's own
    UNet slims) are UNets."""
    name = base_config.get("_class_name")
    if name is None or name in UNET_CLASSES or name in TRANSFORMER_CLASSES:
        return None
    return str(name)


@dataclass(frozen=True)
class FusedLayout:
    """How one ComfyUI Linear stands in for its full-width original (``SlimOps.Linear.set_slim_layout``)."""

    in_index: Any  # torch.LongTensor of the input columns read, or None
    out_index: Any  # torch.LongTensor of the output positions written, or None
    full_out: int | None


def _module(key: str) -> str:
    return key.rpartition(".")[0]


def _prefix_per_head(start: int, heads: int, head_dim: int, width: int):
    import torch

    return (start + torch.arange(heads).repeat_interleave(width) * head_dim
            + torch.arange(width).repeat(heads))


def _part_width(spec: SlimSpec, source: str, full: int) -> tuple[int, Any]:
    """(kept rows, their positions relative to the part's start) of one part of a fused Linear."""
    import torch

    parent, _, leaf = source.rpartition(".")
    role = _ROLES.get(leaf)
    attention = spec.attention.get(parent)
    if role in ("q", "k", "v") and attention is not None:
        width = attention.qk_width if role in ("q", "k") else attention.vo_width
        return attention.heads * width, _prefix_per_head(0, attention.heads, attention.head_dim, width)
    ff = spec.feed_forward.get(parent)
    if role == "mlp" and ff is not None and ff.kind == "single":
        return ff.width, torch.arange(ff.width)
    return full, torch.arange(full)


@dataclass(frozen=True)
class LinearPart:
    """One diffusers Linear inside a ComfyUI Linear: its rows there before and after slimming.

    ``start``/``rows`` are None when the ComfyUI Linear is that diffusers Linear as a whole (no fusing)."""

    path: str  # the diffusers Linear's module path
    start: int | None  # first row in the original ComfyUI weight
    rows: int | None  # its rows there
    slim_start: int | None  # first row in the slim ComfyUI weight
    slim_rows: int | None  # its rows there (fewer when slimming narrowed its output)


def comfy_linear_parts(spec: SlimSpec, key_map: Mapping[str, Any]) -> dict[str, tuple[LinearPart, ...]]:
    """ComfyUI Linear (module path) -> the diffusers Linears it holds, in row order, for every ComfyUI Linear that
    is one diffusers Linear or fuses several by rows (Flux's ``qkv``/``linear1``, SD3's ``qkv``, PixArt's
    ``kv_linear``): how a slim model's fused weights are laid out (:func:`dit_to_comfy_state`), so that a LoRA
    patch of the original fused layer can be split into its parts. Tensors converted by a function (``fn``
    targets, none of them a narrowed Linear) are left out."""
    fused: dict[str, list[tuple[int, int, str]]] = {}
    out: dict[str, tuple[LinearPart, ...]] = {}
    for key, target in key_map.items():
        module, _, leaf = key.rpartition(".")
        if leaf != "weight":
            continue
        parent, _, name = module.rpartition(".")
        if isinstance(target, str) and _ROLES.get(name) in ("q", "k", "v") and parent in spec.attention:
            a = spec.attention[parent]  # an unfused projection ComfyUI reshapes by the head width: one part
            target = (target, (0, 0, a.heads * a.head_dim))
        if isinstance(target, str):
            out[_module(target)] = (LinearPart(module, None, None, None, None),)
        elif target[1] is not None and target[1][0] == 0:
            fused.setdefault(_module(target[0]), []).append((target[1][1], target[1][2], module))
    for comfy_path, parts in fused.items():
        row, laid = 0, []
        for start, size, module in sorted(parts):
            rows = _part_width(spec, module, size)[0]
            laid.append(LinearPart(module, start, size, row, rows))
            row += rows
        out[comfy_path] = tuple(laid)
    return out


def _reader_columns(spec: SlimSpec) -> dict[str, tuple[Any, int]]:
    """diffusers Linear path -> (input columns it keeps, full input width), for the readers of narrowed
    attention outputs (to_out.0, to_add_out, a single-stream proj_out) and of single-stream MLPs."""
    import torch

    readers: dict[str, tuple[Any, int]] = {}
    singles: dict[str, dict[str, Any]] = {}
    for path, a in spec.attention.items():
        columns = _prefix_per_head(0, a.heads, a.head_dim, a.vo_width)
        if a.kind == "single":
            singles.setdefault(path.rpartition(".")[0], {})["attn"] = (columns, a.heads * a.head_dim)
            continue
        for reader in ("to_out.0", "to_add_out") if a.kind == "joint" else ("to_out.0",):
            readers[f"{path}.{reader}"] = (columns, a.heads * a.head_dim)
    for path, ff in spec.feed_forward.items():
        if ff.kind == "single":
            singles.setdefault(path, {})["mlp"] = (torch.arange(ff.width), ff.inner_dim)
    for block, parts in singles.items():
        readers[f"{block}.proj_out"] = parts  # completed below, once the other part's full width is known
    return readers


def dit_to_comfy_state(state_dict: Mapping[str, Any], spec: SlimSpec, key_map: Mapping[str, Any],
                       file_name: str) -> tuple[dict[str, Any], dict[str, FusedLayout]]:
    """A slim transformer's diffusers-layout tensors in ComfyUI's names, fused layers holding their kept rows.

    Returns the state dict and, per ComfyUI module whose layout differs from the stock one, its
    :class:`FusedLayout`. Exact: tensors are only renamed, reordered (``fn``) and concatenated.

    Raises:
        SlimFileError: a tensor the map does not know, a fused layer with a part missing, or a tensor whose
            width does not match the spec (the file does not belong to this model family or is damaged).
    """
    import torch

    unknown = [k for k in state_dict if k not in key_map]
    if unknown:
        raise SlimFileError(f"{file_name}: {len(unknown)} tensors have names this model family does not have "
                            f"(e.g. {unknown[:3]}); the file does not belong to this model family")
    out: dict[str, Any] = {}
    fused: dict[str, list[tuple[int, int, str]]] = {}
    for key, value in state_dict.items():
        target = key_map[key]
        parent, _, leaf = _module(key).rpartition(".")
        if isinstance(target, str) and _ROLES.get(leaf) in ("q", "k", "v") and parent in spec.attention:
            # an unfused projection ComfyUI still reshapes by the head width (PixArt's cross-attention q_linear)
            full = spec.attention[parent].heads * spec.attention[parent].head_dim
            target = (target, (0, 0, full))
        if isinstance(target, str):
            out[target] = value
        elif target[1] is None:
            out[target[0]] = target[2](value)
        else:
            dim, start, size = target[1]
            if dim != 0:
                raise SlimFileError(f"{file_name}: unsupported fused layout for {key} (dimension {dim})")
            fused.setdefault(target[0], []).append((start, size, key))
    expected: dict[str, set[str]] = {}
    for target, parts in fused.items():
        expected[target] = {key for _, _, key in parts}
    for key, target in key_map.items():
        if not isinstance(target, str) and target[1] is not None and target[0] in fused:
            expected[target[0]].add(key)
    layouts: dict[str, FusedLayout] = {}
    for target, parts in fused.items():
        missing = expected[target] - {key for _, _, key in parts}
        if missing:
            raise SlimFileError(f"{file_name}: {target} needs {sorted(missing)}, which the file lacks")
        parts.sort()
        tensors, positions = [], []
        for start, size, key in parts:
            rows, offsets = _part_width(spec, _module(key), size)
            value = state_dict[key]
            if value.shape[0] != rows:
                raise SlimFileError(f"{file_name}: {key} has {value.shape[0]} rows where its slim spec gives {rows}")
            tensors.append(value)
            positions.append(start + offsets)
        out[target] = torch.cat(tensors, dim=0)
        index = torch.cat(positions)
        full = max(start + size for start, size, _ in parts)
        if target.endswith(".weight") and not torch.equal(index, torch.arange(full)):
            layouts[_module(target)] = FusedLayout(None, index, full)
    for source, columns in _reader_columns(spec).items():
        key = f"{source}.weight"
        if key not in state_dict and source.endswith(".to_add_out"):
            continue  # a context_pre_only block (SD3's last): the text stream's outputs are not read
        if key not in state_dict:
            raise SlimFileError(f"{file_name}: the slim spec narrows the input of {source}, which the file lacks")
        width = state_dict[key].shape[1]
        if isinstance(columns, dict):  # single-stream proj_out: attention columns first, then the MLP's
            attn, mlp = columns.get("attn"), columns.get("mlp")
            attn_full = attn[1] if attn else None
            mlp_full = mlp[1] if mlp else None
            attn_cols = attn[0] if attn else None
            mlp_cols = mlp[0] if mlp else None
            if attn_cols is None:  # attention kept whole: its columns come first, all of them
                attn_full = width - len(mlp_cols)
                attn_cols = torch.arange(attn_full)
            if mlp_cols is None:
                mlp_full = width - len(attn_cols)
                mlp_cols = torch.arange(mlp_full)
            index = torch.cat([attn_cols, attn_full + mlp_cols])
        else:
            index = columns[0]
        if len(index) != width:
            raise SlimFileError(f"{file_name}: {key} reads {width} columns where its slim spec gives {len(index)}")
        target = key_map[key]
        module = _module(target if isinstance(target, str) else target[0])
        previous = layouts.get(module)
        layouts[module] = FusedLayout(index, previous.out_index if previous else None,
                                      previous.full_out if previous else None)
    return out, layouts


def comfy_to_dit_state(state_dict: Mapping[str, Any], spec: SlimSpec, key_map: Mapping[str, Any],
                       file_name: str) -> dict[str, Any]:
    """The inverse of :func:`dit_to_comfy_state`: a slim ComfyUI transformer's tensors in diffusers' names
    (what SlimDiff Save writes). Fused layers are split at the widths the spec gives each part.

    Raises:
        SlimFileError: a ComfyUI tensor the map does not cover, or a fused tensor of the wrong height.
    """
    import torch

    out: dict[str, Any] = {}
    fused: dict[str, list[tuple[int, int, str]]] = {}
    covered: set[str] = set()
    for key, target in key_map.items():
        parent, _, leaf = _module(key).rpartition(".")
        if isinstance(target, str) and _ROLES.get(leaf) in ("q", "k", "v") and parent in spec.attention:
            target = (target, (0, 0, spec.attention[parent].heads * spec.attention[parent].head_dim))
        if isinstance(target, str):
            if target in state_dict:
                out[key] = state_dict[target]
                covered.add(target)
        elif target[1] is None:
            if target[0] in state_dict:
                value = state_dict[target[0]]
                restored = target[2](value)
                if not torch.equal(target[2](restored), value):
                    raise SlimFileError(f"{file_name}: cannot invert ComfyUI's conversion of {key}")
                out[key] = restored
                covered.add(target[0])
        elif target[0] in state_dict:
            fused.setdefault(target[0], []).append((target[1][1], target[1][2], key))
    for target, parts in fused.items():
        parts.sort()
        value = state_dict[target]
        row = 0
        for _, size, key in parts:
            rows, _ = _part_width(spec, _module(key), size)
            out[key] = value[row: row + rows].contiguous()
            row += rows
        if row != value.shape[0]:
            raise SlimFileError(f"{file_name}: {target} has {value.shape[0]} rows where its slim spec gives {row}")
        covered.add(target)
    left = sorted(set(state_dict) - covered)
    if left:
        raise SlimFileError(f"{file_name}: {len(left)} ComfyUI tensors have no diffusers name (e.g. {left[:3]}); "
                            "this model cannot be saved in SlimDiff's transformer layout")
    return out


def flux_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """ComfyUI's Flux ``unet_config`` for a diffusers ``FluxTransformer2DModel`` config.

    diffusers packs 2×2 latent patches before the transformer (``in_channels`` = 4 × latent channels,
    ``patch_size`` 1); ComfyUI's Flux patchifies inside (``patch_size`` 2 on the latent channels).
    """
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    if int(config.get("patch_size", 1)) != 1 or int(config["in_channels"]) % 4:
        raise ValueError("only diffusers' packed-latent Flux layout (patch_size 1, in_channels = 4 x latent "
                         "channels) maps to ComfyUI's Flux")
    out_channels = config.get("out_channels") or config["in_channels"]
    return {
        "image_model": "flux", "in_channels": int(config["in_channels"]) // 4,
        "out_channels": int(out_channels) // 4, "patch_size": 2,
        "vec_in_dim": int(config["pooled_projection_dim"]), "context_in_dim": int(config["joint_attention_dim"]),
        "hidden_size": heads * head_dim, "mlp_ratio": 4.0, "num_heads": heads,
        "depth": int(config["num_layers"]), "depth_single_blocks": int(config["num_single_layers"]),
        "axes_dim": [int(a) for a in config.get("axes_dims_rope", (16, 56, 56))], "theta": 10000,
        "qkv_bias": True, "guidance_embed": bool(config.get("guidance_embeds", False)),
    }


def flux_diffusers_config(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers ``FluxTransformer2DModel`` config of a ComfyUI Flux ``unet_config`` (inverse of
    :func:`flux_unet_config`).

    Raises:
        ValueError: a ComfyUI Flux variant diffusers' class cannot represent.
    """
    if unet_config.get("image_model") != "flux":
        raise ValueError(f"image_model {unet_config.get('image_model')!r} is not Flux")
    if int(unet_config.get("patch_size", 2)) != 2 or float(unet_config.get("mlp_ratio", 4.0)) != 4.0 or \
            not unet_config.get("qkv_bias", True) or int(unet_config.get("theta", 10000)) != 10000:
        raise ValueError("a Flux variant with patch size, MLP ratio, qkv bias or RoPE theta other than Flux's")
    hidden, heads = int(unet_config["hidden_size"]), int(unet_config["num_heads"])
    return {
        "_class_name": "FluxTransformer2DModel", "patch_size": 1,
        "in_channels": int(unet_config["in_channels"]) * 4, "out_channels": int(unet_config["out_channels"]) * 4,
        "num_layers": int(unet_config["depth"]), "num_single_layers": int(unet_config["depth_single_blocks"]),
        "attention_head_dim": hidden // heads, "num_attention_heads": heads,
        "joint_attention_dim": int(unet_config["context_in_dim"]),
        "pooled_projection_dim": int(unet_config["vec_in_dim"]),
        "guidance_embeds": bool(unet_config.get("guidance_embed", False)),
        "axes_dims_rope": [int(a) for a in unet_config["axes_dim"]],
    }


def sd3_key_map_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ComfyUI's MMDiT ``unet_config`` its key map needs, for a diffusers ``SD3Transformer2DModel``
    config (ComfyUI's own detection then reads the rest from the tensors). ComfyUI's MMDiT is 64 channels per
    unit of depth with ``depth`` heads of width 64."""
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    if head_dim != 64 or heads * head_dim % 64:
        raise ValueError(f"ComfyUI's MMDiT has 64-wide heads; this SD3 model has {head_dim}")
    return {"depth": heads * head_dim // 64, "num_blocks": int(config["num_layers"])}


def sd3_diffusers_config(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers ``SD3Transformer2DModel`` config of a ComfyUI MMDiT ``unet_config`` (as ComfyUI's detection
    writes it for SD3/SD3.5).

    Raises:
        ValueError: an MMDiT variant diffusers' class cannot represent (a context processor, no pooled input).
    """
    if unet_config.get("context_processor_layers") or unet_config.get("adm_in_channels") is None:
        raise ValueError("an MMDiT with a context processor or without pooled text input is not SD3")
    depth = int(unet_config["depth"])
    context = unet_config["context_embedder_config"]["params"]
    patch = int(unet_config.get("patch_size", 2))
    max_size = unet_config.get("pos_embed_max_size")
    qk_norm = unet_config.get("qk_norm")
    return {
        "_class_name": "SD3Transformer2DModel", "sample_size": 128,
        "patch_size": patch, "in_channels": int(unet_config.get("in_channels", 16)),
        "out_channels": int(unet_config.get("out_channels") or unet_config.get("in_channels", 16)),
        "num_layers": int(unet_config.get("num_blocks", depth)), "attention_head_dim": 64,
        "num_attention_heads": depth, "joint_attention_dim": int(context["in_features"]),
        "caption_projection_dim": int(context["out_features"]),
        "pooled_projection_dim": int(unet_config["adm_in_channels"]),
        "pos_embed_max_size": int(max_size) if max_size else 96,
        "dual_attention_layers": [int(i) for i in unet_config.get("x_block_self_attn_layers") or []],
        "qk_norm": "rms_norm" if qk_norm == "rms" else None,
    }


def pixart_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """ComfyUI's PixArt ``unet_config`` for a diffusers ``PixArtTransformer2DModel`` config (ComfyUI's PixArt
    detection hard-codes PixArt's 1152 width and 16 heads).

    ComfyUI computes the position embedding from the image size it samples at; diffusers from its
    ``sample_size``: the two agree when sampling at the model's own size (rounded to 64 latent pixels).
    """
    if config.get("norm_type", "ada_norm_single") != "ada_norm_single":
        raise ValueError(f"norm_type {config.get('norm_type')!r} is not PixArt's ada_norm_single")
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    in_channels = int(config.get("in_channels", 4))
    out_channels = int(config.get("out_channels") or in_channels)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"{out_channels} output channels for {in_channels} input channels")
    sample_size = int(config.get("sample_size", 128))
    micro = config.get("use_additional_conditions")
    micro = bool(sample_size == 128 if micro is None else micro)
    if int(config.get("cross_attention_dim") or heads * head_dim) != heads * head_dim:
        raise ValueError("a cross-attention width other than the model width")
    return {
        "image_model": "pixart_alpha" if micro else "pixart_sigma", "num_heads": heads, "patch_size":
        int(config.get("patch_size", 2)), "hidden_size": heads * head_dim, "in_channels": in_channels,
        "pred_sigma": out_channels == 2 * in_channels, "learn_sigma": out_channels == 2 * in_channels,
        "depth": int(config["num_layers"]), "caption_channels": int(config.get("caption_channels", 4096)),
        "model_max_length": 120 if micro else 300, "input_size": sample_size,
        "pe_interpolation": config.get("interpolation_scale") or max(sample_size // 64, 1), "micro_condition": micro,
    }


def pixart_diffusers_config(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers ``PixArtTransformer2DModel`` config of a ComfyUI PixArt ``unet_config``.

    Raises:
        ValueError: a ComfyUI PixArt variant diffusers' class cannot represent (KV compression, QK-norm).
    """
    if unet_config.get("kv_compress_config") or unet_config.get("qk_norm"):
        raise ValueError("PixArt with KV compression or QK-norm has no diffusers counterpart")
    hidden, heads = int(unet_config.get("hidden_size", 1152)), int(unet_config.get("num_heads", 16))
    in_channels = int(unet_config.get("in_channels", 4))
    pred_sigma = bool(unet_config.get("pred_sigma", True))
    sample_size = int(unet_config.get("input_size") or 128)
    return {
        "_class_name": "PixArtTransformer2DModel", "num_attention_heads": heads, "attention_head_dim": hidden // heads,
        "in_channels": in_channels, "out_channels": 2 * in_channels if pred_sigma else in_channels,
        "num_layers": int(unet_config["depth"]), "cross_attention_dim": hidden, "attention_bias": True,
        "sample_size": sample_size, "patch_size": int(unet_config.get("patch_size", 2)),
        "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": int(unet_config.get("caption_channels", 4096)),
        "use_additional_conditions": bool(unet_config.get("micro_condition", False)),
        "interpolation_scale": unet_config.get("pe_interpolation") or max(sample_size // 64, 1),
    }
