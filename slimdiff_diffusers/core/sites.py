"""Find the compressible groups of a denoiser: attention modules and feed-forward modules.

Discovery is structural, not tied to one library: diffusers' ``Attention``/``FeedForward`` and
ComfyUI's (ldm) ``CrossAttention``/``FeedForward`` use the same attribute names, so one finder serves
both. Everything the rest of the core needs about a group (paths of its Linear layers, heads, widths)
is recorded here as plain data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass(frozen=True)
class AttentionSite:
    """One multi-head attention module with separate ``to_q``/``to_k``/``to_v``/``to_out[0]`` projections.

    Attributes:
        name: module path of the attention module inside the root model.
        block: module path of the residual block whose input energy normalises this group's
            influence (a ``*TransformerBlock`` parent, or the attention itself).
        heads: number of heads (unchanged by slimming).
        head_dim: the original per-head width of q/k/v.
        query_dim: input width of ``to_q``.
        kv_dim: input width of ``to_k``/``to_v`` (the text width for cross-attention).
        out_dim: output width of ``to_out[0]``.
        is_cross: whether keys/values read a different input than queries (decided by calibration when
            it sees the tensors; ``kv_dim != query_dim`` or ``is_cross_attention`` flag otherwise).
        qk_decomposable: False when a per-head normalisation sits between projection and dot product
            (QK-norm), which makes the bilinear QK decomposition invalid.
    """

    name: str
    block: str
    heads: int
    head_dim: int
    query_dim: int
    kv_dim: int
    out_dim: int
    is_cross: bool
    qk_decomposable: bool = True

    @property
    def q(self) -> str:
        return f"{self.name}.to_q"

    @property
    def k(self) -> str:
        return f"{self.name}.to_k"

    @property
    def v(self) -> str:
        return f"{self.name}.to_v"

    @property
    def out(self) -> str:
        return f"{self.name}.to_out.0"


@dataclass(frozen=True)
class FeedForwardSite:
    """One feed-forward module ``down(act(up(x)))``; gated (GEGLU/SwiGLU) when ``up`` is twice as wide.

    Attributes:
        name: module path of the feed-forward module.
        block: module path of the residual block it belongs to.
        up: path of the up projection Linear (``net.0.proj`` or ``net.0.0``).
        down: path of the down projection Linear.
        dim: model width (input of ``up``, output of ``down``).
        inner_dim: hidden width m (input of ``down``).
        gated: ``up`` produces ``[values, gates]`` (``chunk(2)``), each of width m.
    """

    name: str
    block: str
    up: str
    down: str
    dim: int
    inner_dim: int
    gated: bool


@dataclass
class Sites:
    """All compressible groups of a model, and the candidates that were skipped with the reason."""

    attention: list[AttentionSite] = field(default_factory=list)
    feed_forward: list[FeedForwardSite] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.attention) + len(self.feed_forward)

    @property
    def blocks(self) -> list[str]:
        """Residual block paths, in model order, without duplicates."""
        seen: dict[str, None] = {}
        for site in [*self.attention, *self.feed_forward]:
            seen.setdefault(site.block, None)
        return list(seen)

    def linear_paths(self) -> list[str]:
        """Paths of every Linear layer slimming may replace."""
        paths: list[str] = []
        for a in self.attention:
            paths += [a.q, a.k, a.v, a.out]
        for f in self.feed_forward:
            paths += [f.up, f.down]
        return paths


# Attributes whose presence means an attention module does more than the four plain projections
# (joint/added-KV attention, fused projections). Such modules are skipped with a reason.
_UNSUPPORTED_ATTENTION_ATTRS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_qkv", "to_kv")
_QK_NORM_ATTRS = ("norm_q", "norm_k", "q_norm", "k_norm")


def _parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _is_transformer_block(module: nn.Module) -> bool:
    return type(module).__name__.endswith("TransformerBlock")


def _attention_site(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite | str:
    """Describe ``module`` as an AttentionSite, or return why it cannot be slimmed."""
    to_q, to_k, to_v = module.to_q, module.to_k, module.to_v
    to_out = module.to_out
    out0 = to_out[0] if isinstance(to_out, (nn.Sequential, nn.ModuleList)) and len(to_out) > 0 else to_out
    if not all(isinstance(m, nn.Linear) for m in (to_q, to_k, to_v, out0)):
        return "projections are not nn.Linear layers"
    for attr in _UNSUPPORTED_ATTENTION_ATTRS:
        if getattr(module, attr, None) is not None:
            return f"has `{attr}` (joint or fused attention is not supported)"
    heads = module.heads
    if to_q.out_features % heads or to_k.out_features != to_q.out_features or to_v.out_features != to_q.out_features:
        return "q/k/v widths are not equal multiples of the head count (already slimmed, or grouped-query attention)"
    if out0.in_features != to_v.out_features:
        return "to_out input width differs from to_v output width"
    qk_norm = any(getattr(module, attr, None) is not None for attr in _QK_NORM_ATTRS)
    parent = _parent_path(name)
    block = parent if parent in modules and _is_transformer_block(modules[parent]) else name
    is_cross = bool(getattr(module, "is_cross_attention", False)) or to_k.in_features != to_q.in_features
    return AttentionSite(
        name=name,
        block=block,
        heads=int(heads),
        head_dim=to_q.out_features // heads,
        query_dim=to_q.in_features,
        kv_dim=to_k.in_features,
        out_dim=out0.out_features,
        is_cross=is_cross,
        qk_decomposable=not qk_norm,
    )


def _feed_forward_site(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> FeedForwardSite | str | None:
    """Describe a ``FeedForward``-like module, None if it is not one, or a reason string if unsupported."""
    net = getattr(module, "net", None)
    if not isinstance(net, (nn.Sequential, nn.ModuleList)) or len(net) < 2:
        return None
    first = net[0]
    if isinstance(getattr(first, "proj", None), nn.Linear):
        up_path, up = f"{name}.net.0.proj", first.proj
    elif isinstance(first, nn.Sequential) and len(first) > 0 and isinstance(first[0], nn.Linear):
        up_path, up = f"{name}.net.0.0", first[0]
    else:
        return None
    down_index = max((i for i, m in enumerate(net) if isinstance(m, nn.Linear)), default=None)
    if down_index is None or down_index == 0:
        return "no down projection Linear found"
    down = net[down_index]
    inner = down.in_features
    if up.out_features == 2 * inner:
        gated = True
    elif up.out_features == inner:
        gated = False
    else:
        return f"up projection width {up.out_features} does not match the hidden width {inner}"
    if up.in_features != down.out_features:
        return "input and output widths differ"
    parent = _parent_path(name)
    block = parent if parent in modules and _is_transformer_block(modules[parent]) else name
    return FeedForwardSite(
        name=name, block=block, up=up_path, down=f"{name}.net.{down_index}",
        dim=up.in_features, inner_dim=inner, gated=gated,
    )


def find_sites(model: nn.Module) -> Sites:
    """Find every attention and feed-forward group of ``model`` that slimming can decompose.

    Args:
        model: any ``torch.nn.Module`` (a diffusers UNet, a ComfyUI ``UNetModel``, ...).

    Returns:
        A :class:`Sites` with the groups in module order. Attention-like or feed-forward-like modules
        that cannot be decomposed exactly are listed in ``Sites.skipped`` with the reason.
    """
    modules = dict(model.named_modules())
    sites = Sites()
    for name, module in modules.items():
        if all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads")):
            site = _attention_site(name, module, modules)
            if isinstance(site, str):
                sites.skipped.append((name, site))
            else:
                sites.attention.append(site)
            continue
        if hasattr(module, "net"):
            ff = _feed_forward_site(name, module, modules)
            if isinstance(ff, str):
                sites.skipped.append((name, ff))
            elif ff is not None:
                sites.feed_forward.append(ff)
    return sites
