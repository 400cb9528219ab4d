"""ComfyUI's transformer families (Flux; SD3/SD3.5 and PixArt through the same table) for the SlimDiff nodes.

ComfyUI's blocks fuse what diffusers keeps apart (``img_attn.qkv``, a single-stream ``linear1`` holding q, k, v
and the MLP, PixArt's ``kv_linear``) and split the fused output inside their forward by fixed sizes. The core
finds groups by diffusers' structure (``to_q``/``to_k``/``to_v``/``to_out``, ``proj_mlp``/``proj_out``), so this
module gives it that structure without touching ComfyUI's code or the user's model:

* **A view** (:func:`build_view`): an ``nn.Module`` tree named exactly like diffusers' transformer
  (``transformer_blocks.0.attn.to_v``, ``single_transformer_blocks.3.proj_mlp``, ...), built from ComfyUI's own
  key map (``comfy.utils.flux_to_diffusers`` and friends). Its Linear leaves hold *views* of ComfyUI's weights
  (row slices of the fused layers: no copy), so ``find_sites``, ``plan_slim`` and ``apply_plan`` run on it
  unchanged, and slim specs and files name diffusers' modules on both sides.
* **Taps**: during calibration, hooks on ComfyUI's live modules call the view's leaves with the activations
  they stand for (the input of ``qkv`` is the input of to_q, to_k and to_v; the output of ``mlp_act`` is a
  single-stream block's MLP hidden state; a block's streams before and after it), so the core's ``Calibrator``
  hooks on the view record exactly what it records on a diffusers model.
* **Materialisation** (:func:`install_slim_layers`): the narrowed view leaves become ComfyUI layers through the
  same key conversion a slim file goes through when loaded (``slim_format.dit_to_comfy_state``), so a Slim
  node's model and the same model reloaded from its file are the same layers with the same tensors.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import comfy.utils

from . import slim_format
from .slim_ops import SlimOps

# ---------------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------------


def _flux_streams(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if "img" in kwargs:  # DoubleStreamBlock(img=, txt=, ...)
        return kwargs["img"], kwargs.get("txt")
    if "x" in kwargs:  # SingleStreamBlock(x, ...)
        return kwargs["x"], None
    return (args[0] if args else None), (args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None)


def _pixart_streams(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (args[0] if args else kwargs.get("x")), None  # PixArtMSBlock(x, y, t, ...): one residual stream


def _pixart_refusal(live: nn.Module) -> str | None:
    compressed = [i for i, block in enumerate(getattr(live, "blocks", [])) if getattr(block.attn, "sr_ratio", 1) > 1]
    # KV compression runs a depthwise convolution (with a bias) over k and v: zero value channels would not stay zero
    return f"blocks {compressed} compress keys/values (sr_ratio > 1)" if compressed else None


def _mmdit_streams(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    # JointBlock(context, x, c=...): the image stream is the second argument
    context = args[0] if args else kwargs.get("context")
    x = args[1] if len(args) > 1 else kwargs.get("x")
    return x, context


@dataclass(frozen=True)
class ComfyTransformerFamily:
    """One ComfyUI transformer family: how its modules correspond to diffusers' (data, not code paths).

    Attributes:
        name: family name in messages ("Flux").
        image_model: ``unet_config["image_model"]`` values of this family.
        model_configs: ComfyUI model config class names of this family (for families without ``image_model``).
        key_map: ComfyUI's diffusers -> ComfyUI key map for a ``unet_config``.
        blocks: (diffusers block list, ComfyUI block list) pairs, e.g. ("transformer_blocks", "double_blocks").
        streams: (hidden stream, text stream) of a live block call.
        hidden_taps: (diffusers module, ComfyUI module) name pairs inside a block for modules whose *output* is
            recorded (a single-stream block's MLP activation).
        heads: the attention heads of a live diffusion model.
        attention_class: class name of the view's attention modules (the core words its reasons by it).
        to_diffusers_config / from_diffusers_config: ``unet_config`` <-> diffusers config.
        detect: ComfyUI's own detection builds this family's config from a (slim) state dict; otherwise
            ``from_diffusers_config`` does (ComfyUI's Flux and PixArt detection hard-code the full-size widths).
        comfy_only: ComfyUI parameters diffusers' class does not have (left out of saved files, and loaded files
            may lack them: ComfyUI initialises them and inference does not read them).
        refusal: why a live model of this family cannot be slimmed exactly, or None.
    """

    name: str
    image_model: tuple[str, ...]
    model_configs: tuple[str, ...]
    key_map: Callable[[dict[str, Any]], dict[str, Any]]
    blocks: tuple[tuple[str, str], ...]
    streams: Callable[[tuple, dict], tuple[torch.Tensor | None, torch.Tensor | None]]
    hidden_taps: tuple[tuple[str, str], ...]
    heads: Callable[[nn.Module], int]
    attention_class: str
    to_diffusers_config: Callable[[dict[str, Any]], dict[str, Any]]
    from_diffusers_config: Callable[[dict[str, Any]], dict[str, Any]]
    detect: bool = False
    comfy_only: tuple[str, ...] = ()
    refusal: Callable[[nn.Module], str | None] = lambda live: None


FLUX = ComfyTransformerFamily(
    name="Flux",
    image_model=("flux",),
    model_configs=(),
    key_map=lambda c: comfy.utils.flux_to_diffusers(c),
    blocks=(("transformer_blocks", "double_blocks"), ("single_transformer_blocks", "single_blocks")),
    streams=_flux_streams,
    hidden_taps=(("act_mlp", "mlp_act"),),
    heads=lambda live: int(live.num_heads),
    attention_class="FluxComfyAttention",
    to_diffusers_config=slim_format.flux_diffusers_config,
    from_diffusers_config=slim_format.flux_unet_config,
)

SD3 = ComfyTransformerFamily(
    name="SD3",
    image_model=(),
    model_configs=("SD3",),
    key_map=lambda c: comfy.utils.mmdit_to_diffusers({"depth": c["depth"], "num_blocks": c.get("num_blocks", c["depth"])}),
    blocks=(("transformer_blocks", "joint_blocks"),),
    streams=_mmdit_streams,
    hidden_taps=(),
    heads=lambda live: int(live.joint_blocks[0].x_block.attn.num_heads),
    attention_class="JointComfyAttention",
    to_diffusers_config=slim_format.sd3_diffusers_config,
    from_diffusers_config=slim_format.sd3_key_map_config,
    detect=True,
)

PIXART = ComfyTransformerFamily(
    name="PixArt",
    image_model=("pixart_alpha", "pixart_sigma"),
    model_configs=(),
    key_map=lambda c: comfy.utils.pixart_to_diffusers({"depth": c["depth"], "hidden_size": c.get("hidden_size", 1152)}),
    blocks=(("transformer_blocks", "blocks"),),
    streams=_pixart_streams,
    hidden_taps=(),
    heads=lambda live: int(live.num_heads),
    attention_class="PixArtComfyAttention",
    to_diffusers_config=slim_format.pixart_diffusers_config,
    from_diffusers_config=slim_format.pixart_unet_config,
    comfy_only=("y_embedder.y_embedding",),  # the caption-dropout embedding, used in training only
    refusal=_pixart_refusal,
)

FAMILIES: tuple[ComfyTransformerFamily, ...] = (FLUX, SD3, PIXART)
SUPPORTED = "Flux (dev and schnell layouts), SD3/SD3.5 (MMDiT), PixArt-α/Σ"


def family_of_unet_config(unet_config: dict[str, Any], model_config_name: str = "") -> ComfyTransformerFamily | None:
    image_model = unet_config.get("image_model")
    return next((f for f in FAMILIES if (image_model is not None and image_model in f.image_model)
                 or model_config_name in f.model_configs), None)


def family_by_name(name: str) -> ComfyTransformerFamily | None:
    return next((f for f in FAMILIES if f.name == name), None)


def key_map_of(family: ComfyTransformerFamily, unet_config: dict[str, Any]) -> dict[str, Any]:
    return family.key_map(dict(unet_config))


# ---------------------------------------------------------------------------------------------------
# The diffusers-shaped view
# ---------------------------------------------------------------------------------------------------


class TapLinear(nn.Linear):
    """A Linear of the view: it holds (a view of) a ComfyUI layer's weight for the core to read and replace,
    and is *called* only by the taps, with the activation it stands for and the output to report."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, live_path: str) -> None:
        nn.Module.__init__(self)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.out_features, self.in_features = weight.shape
        self.slimdiff_live_path = live_path

    def forward(self, x: torch.Tensor, out: Any = None) -> Any:  # noqa: D102 - a tap: hooks do the work
        return out


class Tap(nn.Module):
    """A non-Linear module of the view (block, feed-forward, activation) called by the taps."""

    def forward(self, x: Any = None, *args: Any, out: Any = None, **kwargs: Any) -> Any:  # noqa: D102
        return out


class ViewTransformerBlock(Tap):
    """A diffusers transformer block of the view (the core recognises blocks by this name ending)."""


class ViewFeedForward(Tap):
    """A diffusers FeedForward of the view: ``net[0].proj`` (up), ``net[2]`` (down)."""


class ViewRoot(nn.Module):
    """The root of the view; called by a pre-hook on ComfyUI's diffusion model with that call's arguments."""

    def forward(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        return None


class ProbeModel(nn.Module):
    """ComfyUI's diffusion model under the view's block names, for the propagation probe (which replays
    recorded calls and perturbs each block's output by name)."""

    def __init__(self, live: nn.Module, blocks: dict[str, nn.Module]) -> None:
        super().__init__()
        object.__setattr__(self, "live", live)  # not a child: named_modules lists only the named blocks
        for path, module in blocks.items():
            _place(self, path, module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self.live(*args, **kwargs)


def _place(root: nn.Module, path: str, module: nn.Module,
           factory: Callable[[str], nn.Module] | None = None) -> None:
    """Put ``module`` at ``path`` below ``root``, creating containers (ModuleLists for numeric names)."""
    parts = path.split(".")
    node = root
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, nn.ModuleList):
            index = int(name)
            while len(node) <= index:
                node.append(nn.Identity())
            if last:
                node[index] = module
                return
            child = node[index]
            if isinstance(child, nn.Identity):
                child = node[index] = _container(".".join(parts[: i + 1]), parts[i + 1], factory)
        else:
            if last:
                setattr(node, name, module)
                return
            child = getattr(node, name, None)
            if child is None:
                child = _container(".".join(parts[: i + 1]), parts[i + 1], factory)
                setattr(node, name, child)
        node = child


def _container(path: str, next_name: str, factory: Callable[[str], nn.Module] | None) -> nn.Module:
    if next_name.isdigit():
        return nn.ModuleList()
    made = factory(path) if factory else None
    return made if made is not None else Tap()


@dataclass
class View:
    """The view of one live ComfyUI diffusion model, and how its modules are tapped."""

    root: ViewRoot
    live: nn.Module
    family: ComfyTransformerFamily
    key_map: dict[str, Any]
    # live module path -> view modules fed with that module's *input* (q/k/v and proj_mlp rows of a fused layer)
    inputs: dict[str, list[nn.Module]]
    # live module path -> view modules called with (input, output) of that module
    calls: dict[str, list[nn.Module]]
    # live block path -> view block
    blocks: dict[str, nn.Module]
    leaves: dict[str, TapLinear]  # view Linear path -> its original leaf

    def probe_model(self) -> ProbeModel:
        live_modules = dict(self.live.named_modules())
        return ProbeModel(self.live, {view_path: live_modules[live_path]
                                      for live_path, view_path in self._block_paths().items()})

    def _block_paths(self) -> dict[str, str]:
        view_modules = {id(m): p for p, m in self.root.named_modules()}
        return {live: view_modules[id(block)] for live, block in self.blocks.items()}

    @contextlib.contextmanager
    def tapped(self) -> Iterator[None]:
        """Hooks on the live ComfyUI modules that call the view (removed on exit, also on error)."""
        live_modules = dict(self.live.named_modules())
        handles = []

        def root_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            self.root(*args, **kwargs)

        def input_hook(taps: list[nn.Module]) -> Callable:
            def hook(_m: nn.Module, args: tuple) -> None:
                for tap in taps:
                    tap(args[0])
            return hook

        def call_hook(taps: list[nn.Module]) -> Callable:
            def hook(_m: nn.Module, args: tuple, out: Any) -> None:
                for tap in taps:
                    tap(args[0], out=out)
            return hook

        def block_hooks(block: nn.Module) -> tuple[Callable, Callable]:
            # ComfyUI's blocks update streams in place (``txt +=``, ``x +=``): keep the inputs before the call.
            saved: list[tuple[Any, Any]] = []

            def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                h, c = self.family.streams(args, kwargs)
                saved.append((h.detach().clone() if isinstance(h, torch.Tensor) else None,
                              c.detach().clone() if isinstance(c, torch.Tensor) else None))

            def post(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
                h, c = saved.pop()
                if h is not None:
                    block(h, encoder_hidden_states=c, out=out)
            return pre, post

        try:
            handles.append(self.live.register_forward_pre_hook(root_hook, with_kwargs=True))
            for path, taps in self.inputs.items():
                handles.append(live_modules[path].register_forward_pre_hook(input_hook(taps)))
            for path, taps in self.calls.items():
                handles.append(live_modules[path].register_forward_hook(call_hook(taps)))
            for path, block in self.blocks.items():
                pre, post = block_hooks(block)
                handles.append(live_modules[path].register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(live_modules[path].register_forward_hook(post, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


_ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _is_view_linear(module_path: str, block_prefixes: tuple[str, ...]) -> bool:
    parts = module_path.split(".")
    if len(parts) < 3 or parts[0] not in block_prefixes or not parts[1].isdigit():
        return False
    inner = ".".join(parts[2:])
    return parts[-1] in _ATTENTION_LEAVES or inner.endswith("to_out.0") or inner in (
        "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def build_view(live: nn.Module, unet_config: dict[str, Any], family: ComfyTransformerFamily) -> View:
    """The diffusers-shaped view of a live ComfyUI transformer (weights shared, nothing of ``live`` changed)."""
    key_map = key_map_of(family, unet_config)
    live_modules = dict(live.named_modules())
    live_params = dict(live.named_parameters())
    heads = family.heads(live)
    block_prefixes = tuple(view for view, _ in family.blocks)
    attention_class = type(family.attention_class, (Tap,), {})

    def factory(path: str) -> nn.Module | None:
        parts = path.split(".")
        if len(parts) == 2 and parts[0] in block_prefixes:
            return ViewTransformerBlock()
        if len(parts) == 3 and parts[2] in ("ff", "ff_context"):
            return ViewFeedForward()
        if len(parts) == 3 and parts[2].startswith("attn"):
            module = attention_class()
            module.heads = heads
            norm = key_map.get(f"{path}.norm_q.weight")
            norm_target = norm if isinstance(norm, str) or norm is None else norm[0]
            if norm_target is not None and norm_target in live_params:
                module.norm_q = nn.Identity()  # QK-norm (and RoPE in Flux): the core keeps QK whole
            return module
        return None

    root = ViewRoot()
    inputs: dict[str, list[nn.Module]] = {}
    calls: dict[str, list[nn.Module]] = {}
    leaves: dict[str, TapLinear] = {}
    for key, target in key_map.items():
        module_path, _, leaf = key.rpartition(".")
        if leaf != "weight" or not _is_view_linear(module_path, block_prefixes):
            continue
        name = target if isinstance(target, str) else target[0]
        live_path = name.rpartition(".")[0]
        layer = live_modules.get(live_path)
        if not isinstance(layer, nn.Linear) or getattr(layer, "weight", None) is None:
            continue
        weight, bias = layer.weight.detach(), (layer.bias.detach() if layer.bias is not None else None)
        if not isinstance(target, str) and target[1] is not None:
            _, start, size = target[1]
            weight = weight[start: start + size]
            bias = bias[start: start + size] if bias is not None else None
        tap = TapLinear(weight, bias, live_path)
        _place(root, module_path, tap, factory)
        leaves[module_path] = tap
        role = module_path.rpartition(".")[2]
        if role in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "proj_mlp"):
            inputs.setdefault(live_path, []).append(tap)
        elif module_path.endswith(("to_out.0", "to_add_out", "proj_out", "net.2")):
            calls.setdefault(live_path, []).append(tap)
            if module_path.endswith("net.2"):  # the feed-forward module itself: its output energy
                ff_view = root.get_submodule(module_path.rsplit(".", 2)[0])
                calls.setdefault(live_path.rpartition(".")[0], []).append(ff_view)
    for module in root.modules():
        # a cross-attention: its queries and keys come from different ComfyUI layers (PixArt's q_linear, kv_linear)
        q, k = getattr(module, "to_q", None), getattr(module, "to_k", None)
        if isinstance(q, TapLinear) and isinstance(k, TapLinear) and q.slimdiff_live_path != k.slimdiff_live_path:
            module.is_cross_attention = True
    blocks: dict[str, nn.Module] = {}
    for view_prefix, live_prefix in family.blocks:
        view_list = getattr(root, view_prefix, None)
        live_list = live_modules.get(live_prefix)
        if view_list is None or live_list is None:
            continue
        for index, view_block in enumerate(view_list):
            live_path = f"{live_prefix}.{index}"
            blocks[live_path] = view_block
            for view_name, live_name in family.hidden_taps:
                if f"{live_path}.{live_name}" in live_modules and hasattr(view_block, "proj_mlp"):
                    tap = Tap()
                    setattr(view_block, view_name, tap)
                    calls.setdefault(f"{live_path}.{live_name}", []).append(tap)
    # Calibrator hooks a feed-forward's down projection by its input and the feed-forward by its output: the
    # same live module may feed both (registered once per live module, in order).
    return View(root=root, live=live, family=family, key_map=key_map, inputs=inputs, calls=calls, blocks=blocks,
                leaves=leaves)


# ---------------------------------------------------------------------------------------------------
# Materialisation: narrowed view leaves -> ComfyUI layers
# ---------------------------------------------------------------------------------------------------


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def slim_linear(weight: torch.Tensor, bias: torch.Tensor | None, layout: slim_format.FusedLayout | None
                ) -> SlimOps.Linear:
    """A ComfyUI layer holding a slim weight, standing in for its full-width original."""
    layer = SlimOps.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                           dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
    layer.out_features, layer.in_features = weight.shape
    if layout is not None:
        layer.set_slim_layout(layout.in_index, layout.out_index, layout.full_out)
    return layer


def apply_layouts(model: nn.Module, layouts: dict[str, slim_format.FusedLayout]) -> None:
    """Give the loaded ComfyUI layers their slim layouts (after ComfyUI's loader built them with SlimOps)."""
    for path, layout in layouts.items():
        layer = model.get_submodule(path)
        if not isinstance(layer, SlimOps.Linear):
            raise TypeError(f"{path} is a {type(layer).__name__}, not a SlimDiff layer")
        layer.set_slim_layout(layout.in_index, layout.out_index, layout.full_out)


def install_slim_layers(view: View, target: nn.Module, spec: Any, file_name: str = "the slim model") -> None:
    """Replace, in ``target`` (an independent copy of the live model), every ComfyUI layer that a narrowed view
    leaf belongs to by a :func:`slim_linear` built exactly as the loader builds it from a file."""
    narrowed: dict[str, torch.Tensor] = {}
    touched: set[str] = set()
    for path, original in view.leaves.items():
        current = view.root.get_submodule(path)
        if current is original:
            continue
        touched.add(original.slimdiff_live_path)
    # Every part of a touched fused layer is needed to rebuild it, narrowed or not.
    for path, original in view.leaves.items():
        if original.slimdiff_live_path in touched:
            current = view.root.get_submodule(path)
            narrowed[f"{path}.weight"] = current.weight.detach()
            if current.bias is not None:
                narrowed[f"{path}.bias"] = current.bias.detach()
    tensors, layouts = slim_format.dit_to_comfy_state(narrowed, spec, view.key_map, file_name)
    for live_path in sorted(touched):
        weight = tensors[f"{live_path}.weight"].contiguous()
        bias = tensors.get(f"{live_path}.bias")
        _set_module(target, live_path, slim_linear(weight, bias.contiguous() if bias is not None else None,
                                                   layouts.get(live_path)))
