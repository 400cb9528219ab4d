"""Find the compressible groups of a denoiser: attention modules and feed-forward modules.

Discovery is structural, not tied to one library: diffusers' ``Attention``/``FeedForward`` and
ComfyUI's (ldm) ``CrossAttention``/``FeedForward`` use the same attribute names, so one finder serves
both. Everything the rest of the core needs about a group (paths of its Linear layers, heads, widths)
is recorded here as plain data.

Three attention kinds (``AttentionSite.kind``):

* ``"plain"``: ``to_q``/``to_k``/``to_v``/``to_out[0]`` (UNets, PixArt);
* ``"joint"``: MMDiT joint attention (SD3 ``JointTransformerBlock``, Flux ``FluxTransformerBlock``): a second
  stream's ``add_q_proj``/``add_k_proj``/``add_v_proj`` share every head with the first, and ``to_add_out``
  reads the second stream's queries (absent in SD3's ``context_pre_only`` last block);
* ``"single"``: Flux's single-stream block: ``to_q``/``to_k``/``to_v`` and no ``to_out``; the block's
  ``proj_out`` reads ``concat[attention, act(proj_mlp(x))]``, so the attention's output projection is the
  first ``heads·head_dim`` columns of ``proj_out`` and the block's MLP is a feed-forward (``kind="single"``)
  whose down projection is the remaining columns.

Modules that look like attention but cannot be slimmed exactly (fused ``to_qkv``, added-KV attention without
``add_q_proj``, unknown layouts) are listed in ``Sites.refused``: :func:`check_supported` turns them into an
:class:`UnsupportedArchitectureError` before any hook or decomposition runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .errors import UnsupportedArchitectureError, UnsupportedAttentionProcessorError


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
        kind: ``"plain"``, ``"joint"`` or ``"single"`` (module docstring).
        context_dim: input width of the second stream's ``add_*_proj`` (joint only).
        has_add_out: joint attention whose second stream's queries are read by ``to_add_out`` (False in a
            ``context_pre_only`` block, whose text stream ends there).
        out_layer: the Linear that reads the attention output when it is not ``to_out[0]`` (single: the
            block's ``proj_out``, of which the first ``heads·head_dim`` columns are the attention's).
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
    kind: str = "plain"
    context_dim: int = 0
    has_add_out: bool = False
    out_layer: str | None = None

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
        return self.out_layer or f"{self.name}.to_out.0"

    @property
    def is_joint(self) -> bool:
        return self.kind == "joint"

    @property
    def add_q(self) -> str | None:
        return f"{self.name}.add_q_proj" if self.is_joint else None

    @property
    def add_k(self) -> str | None:
        return f"{self.name}.add_k_proj" if self.is_joint else None

    @property
    def add_v(self) -> str | None:
        return f"{self.name}.add_v_proj" if self.is_joint else None

    @property
    def add_out(self) -> str | None:
        return f"{self.name}.to_add_out" if self.is_joint and self.has_add_out else None

    @property
    def query_paths(self) -> list[str]:
        """Linears whose outputs are this attention's queries (one per stream)."""
        return [self.q, self.add_q] if self.is_joint else [self.q]

    @property
    def key_paths(self) -> list[str]:
        return [self.k, self.add_k] if self.is_joint else [self.k]

    @property
    def value_paths(self) -> list[str]:
        return [self.v, self.add_v] if self.is_joint else [self.v]

    @property
    def output_paths(self) -> list[str]:
        """Linears that read the heads' outputs: ``to_out[0]`` (or ``proj_out``), and ``to_add_out``."""
        return [self.out, self.add_out] if self.add_out else [self.out]

    @property
    def input_paths(self) -> list[str]:
        """Linears whose inputs calibration records (q/k/v projections of every stream)."""
        return [*self.query_paths, *self.key_paths, *self.value_paths]


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
        kind: ``"plain"`` (``net`` of a FeedForward) or ``"single"`` (Flux single-stream MLP: ``up`` is the
            block's ``proj_mlp``, ``down`` its ``proj_out`` of which only the *last* ``inner_dim`` columns
            read the hidden activation, recorded at the output of ``hidden``, the block's ``act_mlp``).
        hidden: module whose output is the hidden activation, when it is not the input of ``down``.
        stream: ``"hidden"``, or ``"context"`` for a joint block's second-stream FFN (``ff_context``): its
            influence is normalised by that stream's energy.
    """

    name: str
    block: str
    up: str
    down: str
    dim: int
    inner_dim: int
    gated: bool
    kind: str = "plain"
    hidden: str | None = None
    stream: str = "hidden"

    @property
    def hidden_key(self) -> str:
        """The path the hidden activation's statistics are recorded under (``down``, or ``hidden``)."""
        return self.hidden or self.down


@dataclass
class Sites:
    """All compressible groups of a model, and the candidates that were skipped with the reason."""

    attention: list[AttentionSite] = field(default_factory=list)
    feed_forward: list[FeedForwardSite] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.attention) + len(self.feed_forward)

    def skipped_by_reason(self) -> dict[str, list[str]]:
        """``{reason: [paths]}`` of :attr:`skipped`, in model order (FLUX.1-dev keeps QK whole in 57 blocks: one
        reason, not 57 messages)."""
        grouped: dict[str, list[str]] = {}
        for path, reason in self.skipped:
            grouped.setdefault(reason, []).append(path)
        return grouped

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
            if a.is_joint:
                paths += [a.add_q, a.add_k, a.add_v] + ([a.add_out] if a.add_out else [])
        for f in self.feed_forward:
            paths += [f.up, f.down]
        return list(dict.fromkeys(paths))  # a single-stream block's proj_out serves two groups

    def input_paths(self) -> list[str]:
        """Paths whose inputs (or, for ``FeedForwardSite.hidden``, outputs) calibration records."""
        return [p for a in self.attention for p in a.input_paths] + [f.hidden_key for f in self.feed_forward]


def check_supported(sites: Sites, model_name: str = "the model") -> None:
    """Raise :class:`UnsupportedArchitectureError` naming every refused module and why (nothing has run yet)."""
    if sites.refused:
        error = UnsupportedAttentionProcessorError if all(isinstance(r, RefusedProcessor) for _, r in sites.refused) \
            else UnsupportedArchitectureError
        listed = "; ".join(f"{p}: {r}" for p, r in sites.refused[:4])
        more = f" (and {len(sites.refused) - 4} more)" if len(sites.refused) > 4 else ""
        raise error(
            f"{model_name} has {len(sites.refused)} module(s) SlimDiff cannot slim exactly: {listed}{more}. "
            "Nothing was changed. Supported: UNet attention/FFN, PixArt, DiT, SD3/SD3.5 and Flux/Chroma transformer "
            "blocks (README, Supported models).")


# Attributes whose presence means an attention module does more than the four plain projections
# (joint/added-KV attention, fused projections). Such modules are skipped with a reason.
_FUSED_ATTRS = ("to_qkv", "to_kv", "to_added_qkv")
_ADDED_ATTRS = ("add_q_proj", "add_k_proj", "add_v_proj")
_QK_NORM_ATTRS = ("norm_q", "norm_k", "q_norm", "k_norm", "norm_added_q", "norm_added_k")


# diffusers' processors whose computation SlimDiff's slim processors reproduce (or translate) on narrowed
# projections, by class name (the diffusers adapter maps each to its slim counterpart; a test checks that every
# processor the adapter translates is listed here). Any other processor defined *in diffusers* is model-specific
# (its own RoPE, norms, masks or head layout: QwenImage, AuraFlow, HunyuanDiT, CogView4, Wan, LTX, Flux.2, ...):
# its attention is kept whole, with the reason in ``Sites.skipped``, so the rest of the model can still be slimmed.
STOCK_PROCESSORS = frozenset({
    "AttnProcessor", "AttnProcessor2_0", "AttnProcessorNPU", "XFormersAttnProcessor", "XLAFlashAttnProcessor2_0",
    "SlicedAttnProcessor", "FusedAttnProcessor2_0", "PAGIdentitySelfAttnProcessor2_0",
    "PAGCFGIdentitySelfAttnProcessor2_0", "JointAttnProcessor2_0", "FusedJointAttnProcessor2_0",
    "FluxAttnProcessor", "FluxAttnProcessor2_0",
    # adapters trained on the original projections: slim() refuses them or maps them into the slim bases
    "IPAdapterAttnProcessor", "IPAdapterAttnProcessor2_0", "IPAdapterXFormersAttnProcessor",
    "CustomDiffusionAttnProcessor", "CustomDiffusionAttnProcessor2_0", "CustomDiffusionXFormersAttnProcessor",
})


class Refused(str):
    """A reason string that makes the whole model unsupported (``Sites.refused``), not just skipped."""


class RefusedProcessor(Refused):
    """A refusal because of an attention processor (custom code on transformer attention), not the layout."""


def _parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _is_transformer_block(module: nn.Module) -> bool:
    return type(module).__name__.endswith("TransformerBlock")


def _processor_reason(module: nn.Module, kind: str) -> str | None:
    """Why ``module``'s attention processor rules out slimming it (a skip reason, or a :class:`Refused` one), or
    None. Modules without a ``processor`` (ComfyUI's) compute plain softmax attention."""
    processor = getattr(module, "processor", None)
    if processor is None:
        return None
    cls = type(processor)
    if getattr(processor, "slimdiff_compatible", False) or cls.__module__.startswith("slimdiff_diffusers"):
        return None
    if cls.__module__.startswith("diffusers."):
        if cls.__name__ in STOCK_PROCESSORS:
            return None
        return (f"runs diffusers' model-specific {cls.__name__} ({type(module).__name__}), which computes "
                "attention its own way (RoPE, norms, masks or head layout) and has no slim-aware counterpart: the "
                "attention is kept whole")
    if kind == "plain":
        return None  # slim() probes a custom processor on narrowed widths and refuses it if it computes otherwise
    return RefusedProcessor(
        f"custom processor {cls.__name__} on {kind} transformer attention: SlimDiff runs only diffusers' stock "
        "processor (translated to its slim counterpart) or a processor whose class declares "
        "`slimdiff_compatible = True` there; set the stock processor back before slimming")


def _attention_site(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSite | str:
    """Describe ``module`` as an AttentionSite, or return why it cannot be slimmed (a :class:`Refused` reason
    when the model must be refused as a whole)."""
    processor = type(getattr(module, "processor", None)).__name__
    if "LinearAttn" in processor:  # diffusers' Sana processors (SanaLinearAttnProcessor2_0, PAG variants)
        return Refused(f"linear attention ({processor}): its logits are not a softmax of q·k, so the QK/VO "
                       "decompositions do not apply (Sana-style models are not supported)")
    for attr in _FUSED_ATTRS:
        if getattr(module, attr, None) is not None or getattr(module, "fused_projections", False):
            return Refused(f"fused projections (`{attr}`, from fuse_qkv_projections()): call "
                           "unfuse_qkv_projections() before slimming (a slimmed model can be fused again)")
    to_q, to_k, to_v = module.to_q, module.to_k, module.to_v
    parent = _parent_path(name)
    reason = _processor_reason(module, "joint" if getattr(module, "add_q_proj", None) is not None else
                               ("single" if getattr(module, "to_out", None) is None else "plain"))
    if reason is not None:
        return reason
    parent_module = modules.get(parent) if parent in modules else None
    to_out = getattr(module, "to_out", None)
    single = to_out is None
    if single:
        proj_out = getattr(parent_module, "proj_out", None)
        proj_mlp = getattr(parent_module, "proj_mlp", None)
        if not (isinstance(proj_out, nn.Linear) and isinstance(proj_mlp, nn.Linear)
                and isinstance(to_v, nn.Linear)
                and proj_out.in_features == to_v.out_features + proj_mlp.out_features):
            return Refused("attention without `to_out` outside a single-stream block (`proj_out` over "
                           "concat[attention, proj_mlp]): unknown layout")
        out0 = proj_out
    elif isinstance(to_out, (nn.Sequential, nn.ModuleList)) and len(to_out) > 0:
        out0 = to_out[0]
    else:
        return Refused(f"`to_out` is a {type(to_out).__name__}, not diffusers' `to_out[0]` (a Linear followed by "
                       "dropout): unknown attention layout")
    if not all(isinstance(m, nn.Linear) for m in (to_q, to_k, to_v, out0)):
        return "projections are not nn.Linear layers"
    added = [attr for attr in _ADDED_ATTRS if getattr(module, attr, None) is not None]
    joint = bool(added)
    if joint:
        if len(added) != 3 or not all(isinstance(getattr(module, a), nn.Linear) for a in _ADDED_ATTRS):
            return Refused(f"has `{'`, `'.join(added)}` but not all of add_q_proj/add_k_proj/add_v_proj as "
                           "nn.Linear (added-KV attention, not MMDiT joint attention): unknown layout")
        add_out = getattr(module, "to_add_out", None)
        if add_out is not None and not isinstance(add_out, nn.Linear):
            return Refused("`to_add_out` is not an nn.Linear: unknown joint layout")
        if single:
            return Refused("joint projections without `to_out`: unknown layout")
    heads = module.heads
    if to_q.out_features % heads or to_k.out_features != to_q.out_features or to_v.out_features != to_q.out_features:
        return "q/k/v widths are not equal multiples of the head count (already slimmed, or grouped-query attention)"
    width = to_v.out_features
    if joint:
        a_q, a_k, a_v = module.add_q_proj, module.add_k_proj, module.add_v_proj
        if {a_q.out_features, a_k.out_features, a_v.out_features} != {width} or \
                a_q.in_features != a_k.in_features or a_k.in_features != a_v.in_features or \
                (add_out is not None and add_out.in_features != width):
            return Refused("joint projections of unequal widths (already slimmed, or an unknown layout)")
    if not single and out0.in_features != width:
        return "to_out input width differs from to_v output width"
    qk_norm = any(getattr(module, attr, None) is not None for attr in _QK_NORM_ATTRS)
    block = parent if parent_module is not None and _is_transformer_block(parent_module) else name
    is_cross = not joint and not single and (bool(getattr(module, "is_cross_attention", False))
                                             or to_k.in_features != to_q.in_features)
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
        kind="joint" if joint else ("single" if single else "plain"),
        context_dim=module.add_k_proj.in_features if joint else 0,
        has_add_out=joint and add_out is not None,
        out_layer=f"{parent}.proj_out" if single else None,
    )


def _qk_whole_reason(module: nn.Module) -> str:
    rope = " and RoPE" if type(module).__name__.startswith("Flux") else ""
    return (f"QK stays whole: QK-norm{rope} {'sit' if rope else 'sits'} between the q/k projections and the dot product, so the "
            "bilinear form q·k is not a product of the projections (VO is slimmed)")


def _single_stream_mlp(block: str, module: nn.Module) -> FeedForwardSite:
    """The MLP branch of a single-stream block: proj_mlp → act_mlp → the last columns of proj_out."""
    return FeedForwardSite(
        name=block, block=block, up=f"{block}.proj_mlp", down=f"{block}.proj_out", dim=module.proj_mlp.in_features,
        inner_dim=module.proj_mlp.out_features, gated=False, kind="single", hidden=f"{block}.act_mlp")


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
    # A joint block's second-stream FFN (`ff_context`) writes to the text stream.
    stream = "context" if block != name and name.rsplit(".", 1)[-1].endswith("_context") else "hidden"
    return FeedForwardSite(
        name=name, block=block, up=up_path, down=f"{name}.net.{down_index}",
        dim=up.in_features, inner_dim=inner, gated=gated, stream=stream,
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
        if all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "heads")) or \
                (hasattr(module, "heads") and any(getattr(module, a, None) is not None for a in _FUSED_ATTRS)):
            site = _attention_site(name, module, modules)
            if isinstance(site, Refused):
                sites.refused.append((name, site))  # a Refused(str): check_supported reads its kind
                sites.skipped.append((name, str(site)))
            elif isinstance(site, str):
                sites.skipped.append((name, site))
            else:
                sites.attention.append(site)
                if not site.qk_decomposable:
                    sites.skipped.append((f"{name}:qk", _qk_whole_reason(module)))
                if site.kind == "single":
                    sites.feed_forward.append(_single_stream_mlp(site.block, modules[site.block]))
            continue
        if hasattr(module, "net"):
            ff = _feed_forward_site(name, module, modules)
            if isinstance(ff, str):
                sites.skipped.append((name, ff))
            elif ff is not None:
                sites.feed_forward.append(ff)
    return sites
