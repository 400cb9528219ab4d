"""Replace Linear layers by physically narrower ones and keep attention numerics right.

A narrowed layer is a new instance of the *same class* as the original (``nn.Linear``, or e.g. ComfyUI's
``comfy.ops.manual_cast.Linear``) that keeps the original's extra attributes, so framework features that
rely on the layer class (weight casting, offloading) keep working.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .errors import SlimSpecError
from .spec import AttentionSpec, FeedForwardSpec, SlimSpec

FP16_MAX = 6.0e4


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path)
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def narrow_linear(old: nn.Linear, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  shape: tuple[int, int] | None = None, keep_bias: bool | None = None) -> nn.Linear:
    """A new Linear of ``old``'s class, dtype and device with the given weight (torch layout out×in).

    With ``weight=None`` the layer gets uninitialised storage of ``shape`` (used when loading weights later).
    ``bias`` is used only if ``old`` has a bias (``keep_bias`` overrides that).
    """
    cls = type(old)
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in old.__dict__.items():  # extra attributes set by frameworks (e.g. comfy_cast_weights)
        if key not in ("_parameters", "_buffers", "_modules") and not key.startswith("_forward") \
                and not key.startswith("_backward") and not key.startswith("_state_dict") \
                and not key.startswith("_load_state_dict"):
            new.__dict__.setdefault(key, value)
    dtype, device = old.weight.dtype, old.weight.device
    has_bias = old.bias is not None if keep_bias is None else keep_bias
    if weight is None:
        out_features, in_features = shape
        new.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                  requires_grad=old.weight.requires_grad)
        new.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if has_bias else None
    else:
        if dtype == torch.float16 and weight.abs().max() > FP16_MAX:
            raise OverflowError("a slimmed weight exceeds the fp16 range; slim the model in fp32 or bf16")
        out_features, in_features = weight.shape
        new.weight = nn.Parameter(weight.to(device=device, dtype=dtype).contiguous(),
                                  requires_grad=old.weight.requires_grad)
        if has_bias:
            b = bias if bias is not None else torch.zeros(out_features, dtype=torch.float64)
            new.bias = nn.Parameter(b.to(device=device, dtype=dtype).contiguous(), requires_grad=old.weight.requires_grad)
        else:
            new.bias = None
    new.in_features, new.out_features = in_features, out_features
    new.train(old.training)
    return new


def to_uniform_layout(weights: dict[str, torch.Tensor], spec: AttentionSpec) -> dict[str, torch.Tensor]:
    """Zero-pad separate-layout attention weights to one per-head width and fold the softmax scale into q.

    ``weights`` holds ``q.weight q.bias k.weight k.bias v.weight v.bias out.weight`` in the separate layout.
    Padding adds zero rows (q/k/v) and zero columns (out) inside each head, which changes no dot product and
    no output; multiplying q by sqrt(width / head_dim) makes an attention that scales logits by
    width**-0.5 compute exactly the original logits.
    """
    heads, width = spec.heads, max(spec.qk_rank, spec.vo_rank)

    def pad_rows(t: torch.Tensor, rank: int) -> torch.Tensor:
        per_head = t.reshape(heads, rank, *t.shape[1:])
        pad = per_head.new_zeros(heads, width - rank, *t.shape[1:])
        return torch.cat([per_head, pad], dim=1).reshape(heads * width, *t.shape[1:])

    out = {}
    fold = math.sqrt(width / spec.head_dim)
    for name in ("q", "k"):
        for part in ("weight", "bias"):
            t = pad_rows(weights[f"{name}.{part}"], spec.qk_rank)
            out[f"{name}.{part}"] = t * fold if name == "q" else t
    out["v.weight"] = pad_rows(weights["v.weight"], spec.vo_rank)
    out["v.bias"] = pad_rows(weights["v.bias"], spec.vo_rank)
    out["out.weight"] = pad_rows(weights["out.weight"].T, spec.vo_rank).T.contiguous()
    return out


def convert_layout(state_dict: dict[str, torch.Tensor], spec: SlimSpec,
                   layout: str = "uniform") -> tuple[dict[str, torch.Tensor], SlimSpec]:
    """The same slim model's state dict and spec with every attention in the ``"uniform"`` head layout (exact).

    A ``"separate"`` layout (q/k and v/o per-head widths differ) runs only with an attention that reads both
    widths and takes the original softmax scale (diffusers' ``LowRankAttnProcessor``); stock attention functions
    (ComfyUI's backends, xformers, flash) need one per-head width. :func:`to_uniform_layout` does the padding and
    folds the scale into ``to_q``; biases the layers do not have stay absent (their converted values are zero).
    """
    if layout != "uniform":
        raise ValueError("only conversion to the 'uniform' layout is exact and supported")
    state = dict(state_dict)
    attention: dict[str, AttentionSpec] = {}
    for path, a in spec.attention.items():
        if a.layout == "uniform":
            attention[path] = a
            continue
        if a.kind != "plain":
            raise ValueError(f"{path} is {a.kind} attention: only plain attention converts to the 'uniform' layout "
                             "(joint and single-stream attention run with SlimDiff's transformer processors)")
        prefixes = {"q": f"{path}.to_q", "k": f"{path}.to_k", "v": f"{path}.to_v", "out": f"{path}.to_out.0"}
        weights: dict[str, torch.Tensor] = {}
        for short, prefix in prefixes.items():
            weight = state[f"{prefix}.weight"]
            weights[f"{short}.weight"] = weight.double()
            if short != "out":
                bias = state.get(f"{prefix}.bias")
                weights[f"{short}.bias"] = bias.double() if bias is not None else \
                    torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        uniform = AttentionSpec(a.heads, a.head_dim, a.qk_rank, a.vo_rank, layout="uniform")
        converted = to_uniform_layout(weights, uniform)
        for short, prefix in prefixes.items():
            dtype = state[f"{prefix}.weight"].dtype
            state[f"{prefix}.weight"] = converted[f"{short}.weight"].to(dtype).contiguous()
            if short != "out" and f"{prefix}.bias" in state:
                state[f"{prefix}.bias"] = converted[f"{short}.bias"].to(dtype).contiguous()
        attention[path] = uniform
    return state, SlimSpec(attention=attention, feed_forward=dict(spec.feed_forward), version=spec.version)


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _replace_columns(layer: nn.Linear, start: int, stop: int, columns: torch.Tensor | None, width: int,
                     bias: torch.Tensor | None = None) -> nn.Linear:
    """``layer`` with its input columns ``[start, stop)`` replaced by ``columns`` (d_out × width; None: uninitialised
    storage of that width). The other columns are kept; so is the bias unless ``bias`` is given."""
    if columns is None:
        return narrow_linear(layer, None, None, shape=(layer.out_features, layer.in_features - (stop - start) + width))
    w = layer.weight.detach().double()
    weight = torch.cat([w[:, :start], columns.to(w), w[:, stop:]], dim=1)
    if bias is None and layer.bias is not None:
        bias = layer.bias.detach().double()
    return narrow_linear(layer, weight, bias)


def _tp_blocks(block: nn.Module) -> None:
    """Keep diffusers' tensor-parallel column blocks of a single-stream proj_out true after narrowing."""
    proj_out = getattr(block, "proj_out", None)
    if proj_out is not None and hasattr(proj_out, "_tp_packed_row_blocks"):
        mlp = block.proj_mlp.out_features
        proj_out._tp_packed_row_blocks = [proj_out.in_features - mlp, mlp]


def install_attention(attn: nn.Module, spec: AttentionSpec, weights: dict[str, torch.Tensor] | None,
                      root: nn.Module | None = None, path: str = "") -> None:
    """Swap the projections of ``attn`` for narrowed ones (``weights=None``: uninitialised).

    ``spec.kind`` says which: q/k/v and ``to_out[0]``; for ``"joint"`` also ``add_q_proj``/``add_k_proj``/
    ``add_v_proj`` and ``to_add_out`` (if present); for ``"single"`` q/k/v and the attention columns of the parent
    block's ``proj_out`` (``root`` and ``path`` locate it).
    """
    heads = spec.heads
    names = {"q": "to_q", "k": "to_k", "v": "to_v"}
    if spec.kind == "joint":
        names |= {"add_q": "add_q_proj", "add_k": "add_k_proj", "add_v": "add_v_proj"}
    widths = {"q": spec.qk_width, "k": spec.qk_width, "v": spec.vo_width,
              "add_q": spec.qk_width, "add_k": spec.qk_width, "add_v": spec.vo_width}
    old_v_width = attn.to_v.out_features
    for key, attr in names.items():
        old = getattr(attn, attr)
        w = None if weights is None else weights[f"{key}.weight"]
        b = None if weights is None else weights[f"{key}.bias"]
        setattr(attn, attr, narrow_linear(old, w, b, shape=(heads * widths[key], old.in_features)))
    readers = []
    if spec.kind == "single":
        if root is None:
            raise ValueError("single-stream attention needs the root module and its path")
        block = get_module(root, _parent(path))
        block.proj_out = _replace_columns(block.proj_out, 0, old_v_width,
                                          None if weights is None else weights["out.weight"], heads * spec.vo_width)
        _tp_blocks(block)
    else:
        readers.append(("out", attn.to_out, 0))
        if spec.kind == "joint" and getattr(attn, "to_add_out", None) is not None:
            readers.append(("add_out", attn, "to_add_out"))
    for key, holder, slot in readers:
        old_out = holder[slot] if isinstance(slot, int) else getattr(holder, slot)
        w = None if weights is None else weights[f"{key}.weight"]
        b = None if weights is None else (old_out.bias.detach().double() if old_out.bias is not None else None)
        new = narrow_linear(old_out, w, b, shape=(old_out.out_features, heads * spec.vo_width))
        if isinstance(slot, int):
            holder[slot] = new
        else:
            setattr(holder, slot, new)
    # Original per-head dim and softmax scale, for processors that need them (diffusers' LowRankAttnProcessor).
    attn.slimdiff_head_dim = spec.head_dim
    attn.slimdiff_spec = spec
    if spec.layout == "uniform" and hasattr(attn, "scale"):
        attn.scale = spec.qk_width ** -0.5  # the correction lives in to_q


def install_feed_forward(ff: nn.Module, up_path: str, down_path: str, spec: FeedForwardSpec,
                         weights: dict[str, torch.Tensor] | None, root: nn.Module) -> None:
    """Swap the up/down projections of a feed-forward for ones with ``spec.width`` hidden channels.

    ``spec.kind == "single"``: ``down`` is a single-stream block's ``proj_out``, of which only the last
    ``proj_mlp.out_features`` columns (the MLP's) are replaced; the attention columns are kept.
    """
    up, down = get_module(root, up_path), get_module(root, down_path)
    width, m = spec.width, spec.inner_dim
    single = spec.kind == "single"
    current = up.out_features // (2 if spec.gated else 1)  # == m unless rebuilt twice
    if weights is None:
        new_up = narrow_linear(up, None, None, shape=((2 if spec.gated else 1) * width, up.in_features))
        new_down = _replace_columns(down, down.in_features - current, down.in_features, None, width) if single \
            else narrow_linear(down, None, None, shape=(down.out_features, width))
    else:
        keep = weights["channels"].to(up.weight.device)
        rows = torch.cat([keep, keep + m]) if spec.gated else keep
        up_w = up.weight.detach()[rows].double()
        up_b = up.bias.detach()[rows].double() if up.bias is not None else None
        new_up = narrow_linear(up, up_w, up_b)
        if single:
            bias = weights["down.bias"] if down.bias is not None else None
            new_down = _replace_columns(down, down.in_features - current, down.in_features, weights["down.weight"],
                                        width, bias=bias)
        else:
            new_down = narrow_linear(down, weights["down.weight"], weights["down.bias"])
    set_module(root, up_path, new_up)
    set_module(root, down_path, new_down)
    if hasattr(ff, "mlp_hidden_dim"):
        ff.mlp_hidden_dim = width
    if single:
        _tp_blocks(ff)


def check_spec_fits(model: nn.Module, spec: SlimSpec, source: str = "the slim spec") -> None:
    """Raise :class:`SlimSpecError` unless every entry of ``spec`` names a site of ``model`` with the recorded
    full widths (heads, head_dim, inner_dim, gating) and ranks within them. Changes nothing."""
    from .sites import find_sites

    sites = find_sites(model)
    by_name = {s.name: s for s in sites.attention}
    ff_by_name = {s.name: s for s in sites.feed_forward}
    problems: list[str] = []
    for path, a in spec.attention.items():
        site = by_name.get(path)
        if site is None:
            problems.append(f"this {type(model).__name__} does not have attention {path!r}")
        elif site.heads != a.heads or site.head_dim != a.head_dim:
            problems.append(f"attention {path!r} does not have the recorded {a.heads} heads of width {a.head_dim} "
                            f"(it has {site.heads} of width {site.head_dim})")
        elif a.kind != site.kind:
            problems.append(f"attention {path!r} is {site.kind} attention here, the spec records {a.kind}")
        elif max(a.qk_rank, a.vo_rank) > site.head_dim:
            problems.append(f"attention {path!r}: rank {max(a.qk_rank, a.vo_rank)} exceeds the head width "
                            f"{site.head_dim}")
    for path, f in spec.feed_forward.items():
        site = ff_by_name.get(path)
        if site is None:
            problems.append(f"this {type(model).__name__} does not have feed-forward {path!r}")
        elif f.kind != site.kind:
            problems.append(f"feed-forward {path!r} is a {site.kind} feed-forward here, the spec records {f.kind}")
        elif site.inner_dim != f.inner_dim or site.gated != f.gated:
            problems.append(f"feed-forward {path!r} does not have the recorded {f.inner_dim} "
                            f"{'gated ' if f.gated else ''}channels (it has {site.inner_dim}"
                            f"{' gated' if site.gated else ''})")
        elif f.width > site.inner_dim:
            problems.append(f"feed-forward {path!r}: width {f.width} exceeds the full width {site.inner_dim}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SlimSpecError(f"{source} does not fit this model: {'; '.join(problems[:3])}{more}. The slim model was "
                            "made from another base model (wrong base model?): load it with the base model "
                            "configuration it was slimmed from")


def apply_slim_spec(model: nn.Module, spec: SlimSpec, source: str = "the slim spec") -> nn.Module:
    """Give ``model`` (in place) the narrowed layer shapes of ``spec``, with uninitialised weights.

    Used to rebuild a saved slim model: build the stock model, apply the spec, then load the state dict.
    The whole spec is checked against the model first (:func:`check_spec_fits`), so a spec that does not fit
    raises :class:`SlimSpecError` before any module is changed.
    """
    from .sites import find_sites

    check_spec_fits(model, spec, source)
    sites = find_sites(model)
    ff_by_name = {s.name: s for s in sites.feed_forward}
    for path, a_spec in spec.attention.items():
        install_attention(get_module(model, path), a_spec, None, root=model, path=path)
    for path, f_spec in spec.feed_forward.items():
        site = ff_by_name[path]
        install_feed_forward(get_module(model, path), site.up, site.down, f_spec, None, model)
    model.slimdiff_spec = spec
    return model
