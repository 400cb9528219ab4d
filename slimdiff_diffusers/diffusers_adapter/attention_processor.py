"""The attention processor for slimmed diffusers ``Attention`` modules, and processor compatibility checks.

After slimming, q/k have ``qk_rank`` and v has ``vo_rank`` channels per head, and the logits must still be
scaled by the *original* ``head_dim ** -0.5`` (method.md §5.2). diffusers' ``AttnProcessor2_0`` derives one
head dim from the key width and lets SDPA pick the scale from it, so it cannot run a slimmed module.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    AttnProcessorNPU,
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
    CustomDiffusionXFormersAttnProcessor,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
    XLAFlashAttnProcessor2_0,
)

from ..core.errors import UnsupportedArchitectureError, UnsupportedProcessorError
from ..core.processor_probe import processor_is_slim_aware
from .pag_processors import PAG_TRANSLATIONS
from .transformer_processors import TRANSFORMER_PROCESSORS, stock_transformer_translations

logger = logging.getLogger("slimdiff")


class _LowRankAttention:
    """What the slim processors share: the module's pre/post steps and attention with two head widths."""

    # Marks processors that read head dims from the projected tensors and use ``attn.scale``. Trusted only when
    # a class declares it itself (see :func:`declares_slim_aware`): a subclass that changes the computation must
    # pass the behavioural probe instead.
    slimdiff_compatible = True

    @staticmethod
    def _prepare(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                 temb: torch.Tensor | None):
        """Spatial/group norm and 4D→3D, like ``AttnProcessor2_0``. Returns (states, context, restore info)."""
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None or not isinstance(getattr(attn, "to_out", None), torch.nn.ModuleList):
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        shape = hidden_states.shape
        if input_ndim == 4:
            batch_size, channel, height, width = shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, (residual, input_ndim, shape)

    @staticmethod
    def _context(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        if encoder_hidden_states is None:
            return hidden_states
        if attn.norm_cross:
            return attn.norm_encoder_hidden_states(encoder_hidden_states)
        return encoder_hidden_states

    @staticmethod
    def _heads(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """(batch, tokens, heads·d) → (batch, heads, tokens, d), with q/k and v head widths read separately."""
        batch_size, heads = query.shape[0], attn.heads
        qk_head_dim, v_head_dim = query.shape[-1] // heads, value.shape[-1] // heads
        query = query.view(batch_size, -1, heads, qk_head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, heads, qk_head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, heads, v_head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return query, key, value

    @staticmethod
    def _mask(attn: Attention, attention_mask: torch.Tensor | None, key_tokens: int, batch_size: int):
        if attention_mask is None:
            return None
        attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch_size)
        return attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

    @staticmethod
    def _sdpa(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA over (batch, heads, tokens, d) with q/k and v widths that may differ; the original scale."""
        qk_head_dim, v_head_dim = query.shape[-1], value.shape[-1]
        # attn.scale is the original head_dim ** -0.5; it is never recomputed from the narrowed width.
        if qk_head_dim == v_head_dim:  # nothing to pad: exactly the stock processor's operations
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                  is_causal=False, scale=attn.scale)
        # PyTorch's fused CPU kernel needs one head width for q, k and v; with unequal widths SDPA falls back to
        # its math kernel (3-4x slower on CPU, measured: docs/decisions.md). Zero channels change no logit and
        # no output, so pad the narrower side to the common width and slice the padding off the output.
        width = max(qk_head_dim, v_head_dim)
        if qk_head_dim < width:
            query = F.pad(query, (0, width - qk_head_dim))
            key = F.pad(key, (0, width - qk_head_dim))
        else:
            value = F.pad(value, (0, width - v_head_dim))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False, scale=attn.scale)
        return out[..., :v_head_dim]

    @staticmethod
    def _finish(attn: Attention, hidden_states: torch.Tensor, restore) -> torch.Tensor:
        """(batch, heads, tokens, dv) → output projection, 3D→4D, residual and rescale."""
        residual, input_ndim, shape = restore
        batch_size, heads, _, v_head_dim = hidden_states.shape
        dtype = hidden_states.dtype
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * v_head_dim).to(dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(*shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class LowRankAttnProcessor(_LowRankAttention):
    """``AttnProcessor2_0`` with separate q/k and v head dims and the original softmax scale.

    Projections run at their narrowed widths (the parameter and FLOP savings); inside SDPA the narrower of q/k
    and v is zero-padded to the common width so PyTorch's fused kernels stay eligible.

    Supports self- and cross-attention, 3D and 4D (spatial) inputs, attention masks, ``group_norm``,
    ``spatial_norm``, ``norm_cross``, QK-norm, residual connections and ``rescale_output_factor`` exactly
    like ``AttnProcessor2_0``. On an unslimmed module it computes the same thing as ``AttnProcessor2_0``.
    """

    slimdiff_compatible = True

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        hidden_states, restore = self._prepare(attn, hidden_states, encoder_hidden_states, temb)
        context = self._context(attn, hidden_states, encoder_hidden_states)
        query, key, value = self._heads(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
        mask = self._mask(attn, attention_mask, context.shape[1], context.shape[0])
        return self._finish(attn, self._sdpa(attn, query, key, value, mask), restore)


class SlicedLowRankAttnProcessor(_LowRankAttention):
    """diffusers' ``SlicedAttnProcessor`` for slimmed modules: attention computed ``slice_size`` (batch·head)
    rows at a time, with separate q/k and v head widths and the original softmax scale (``attn.scale``).

    What ``set_attention_slice`` / ``pipe.enable_attention_slicing`` install on a slimmed attention. The stock
    processor sizes its output from the query width, which fails when v is wider than q/k.
    """

    slimdiff_compatible = True

    def __init__(self, slice_size: int):
        if int(slice_size) < 1:
            raise ValueError(f"slice_size must be >= 1, got {slice_size}")
        self.slice_size = int(slice_size)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        hidden_states, restore = self._prepare(attn, hidden_states, encoder_hidden_states, temb)
        context = self._context(attn, hidden_states, encoder_hidden_states)
        query, key, value = self._heads(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
        batch_size, heads, query_tokens, _ = query.shape
        v_head_dim = value.shape[-1]
        rows = batch_size * heads
        query, key, value = (t.reshape(rows, t.shape[2], t.shape[3]) for t in (query, key, value))
        mask = None
        if attention_mask is not None:  # (batch·heads, 1 or query tokens, key tokens), like the stock processor
            mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch_size)
        out = query.new_empty(rows, query_tokens, v_head_dim)
        for start in range(0, rows, self.slice_size):
            end = start + self.slice_size
            # get_attention_scores scales by attn.scale (the original head dim) and honours upcasting.
            scores = attn.get_attention_scores(query[start:end], key[start:end],
                                               mask[start:end] if mask is not None else None)
            out[start:end] = torch.bmm(scores, value[start:end])
        return self._finish(attn, out.view(batch_size, heads, query_tokens, v_head_dim), restore)


class FusedLowRankAttnProcessor(_LowRankAttention):
    """diffusers' ``FusedAttnProcessor2_0`` for slimmed modules: one fused projection (``to_qkv`` for
    self-attention, ``to_kv`` for cross-attention) split at the unequal q/k and v widths.

    What ``fuse_qkv_projections()`` installs on a slimmed attention. The split widths are read from the
    unfused layers (``to_q``/``to_k``/``to_v``), which diffusers keeps next to the fused one.
    """

    slimdiff_compatible = True

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        hidden_states, restore = self._prepare(attn, hidden_states, encoder_hidden_states, temb)
        q_width, k_width, v_width = attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features
        if encoder_hidden_states is None and getattr(attn, "to_qkv", None) is not None:
            context = hidden_states
            query, key, value = attn.to_qkv(hidden_states).split([q_width, k_width, v_width], dim=-1)
        elif getattr(attn, "to_kv", None) is not None:
            context = self._context(attn, hidden_states, encoder_hidden_states)
            query = attn.to_q(hidden_states)
            key, value = attn.to_kv(context).split([k_width, v_width], dim=-1)
        else:
            raise UnsupportedProcessorError(
                "FusedLowRankAttnProcessor needs fused projections: call `fuse_qkv_projections()` on the model "
                "(it installs this processor), or use LowRankAttnProcessor")
        query, key, value = self._heads(attn, query, key, value)
        mask = self._mask(attn, attention_mask, context.shape[1], context.shape[0])
        return self._finish(attn, self._sdpa(attn, query, key, value, mask), restore)


SLIM_PROCESSORS = (LowRankAttnProcessor, SlicedLowRankAttnProcessor, FusedLowRankAttnProcessor, *TRANSFORMER_PROCESSORS)

# Transformer attention (joint MMDiT, Flux single-stream): the stock processor → its slim counterpart. These
# modules have no behavioural probe (it would need both streams and RoPE), so only these translations, SlimDiff's
# own processors and classes that declare `slimdiff_compatible` run on them.
TRANSFORMER_TRANSLATIONS: dict[type, type] = stock_transformer_translations()

# Linear attention (Sana): the logits are not a softmax of q·k, so the QK decomposition does not apply.
_LINEAR_ATTENTION_PROCESSORS = ("SanaLinearAttnProcessor2_0", "PAGCFGSanaLinearAttnProcessor2_0",
                                "PAGIdentitySanaLinearAttnProcessor2_0", "LinearAttnProcessor")


def is_linear_attention(processor: Any) -> bool:
    return type(processor).__name__ in _LINEAR_ATTENTION_PROCESSORS


# Stock processors whose computation a slim processor reproduces exactly, keyed by *exact* type: a subclass may
# change the computation, so it is probed like any custom processor instead (never replaced silently).
# xformers / NPU / XLA flash kernels need one head width; on a slimmed module PyTorch SDPA (with its own
# memory-efficient and flash kernels) computes the same attention.
TRANSLATIONS: dict[type, Callable[[Any], Any]] = {
    AttnProcessor: lambda p: LowRankAttnProcessor(),
    AttnProcessor2_0: lambda p: LowRankAttnProcessor(),
    XFormersAttnProcessor: lambda p: LowRankAttnProcessor(),
    AttnProcessorNPU: lambda p: LowRankAttnProcessor(),
    XLAFlashAttnProcessor2_0: lambda p: LowRankAttnProcessor(),
    SlicedAttnProcessor: lambda p: SlicedLowRankAttnProcessor(p.slice_size),
    FusedAttnProcessor2_0: lambda p: FusedLowRankAttnProcessor(),
    **PAG_TRANSLATIONS,  # perturbed-attention guidance's identity self-attention (pag_processors.py)
}
_KERNEL_SWAPS = (XFormersAttnProcessor, AttnProcessorNPU, XLAFlashAttnProcessor2_0)

# Kept for callers of the old name: the stock processors `slim()` replaces (exact types only).
REPLACEABLE_PROCESSORS = (AttnProcessor, AttnProcessor2_0)

# Processors that carry weights trained against the original q/k/v/out bases. A slimmed module's projections
# live in a new (whitened) basis even at full rank, so these compute something meaningless there.
ADAPTER_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor,
                      CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0,
                      CustomDiffusionXFormersAttnProcessor)


def declares_slim_aware(processor: Any) -> bool:
    """True if the processor's own class (not a base class) sets ``slimdiff_compatible = True``."""
    return type(processor).__dict__.get("slimdiff_compatible", False) is True


def _carries_projection_weights(attn: Attention, processor: Any) -> bool:
    """True for IP-Adapter / Custom Diffusion processors, and for any processor with a parameter shaped like
    the module's q/k/v/out projections (one of its dims is a projection width, original or narrowed).

    Such weights were trained against the original projections; a scalar or other unrelated parameter is not
    evidence of that, and the behavioural probe decides for those processors.
    """
    if isinstance(processor, ADAPTER_PROCESSORS):
        return True
    if not isinstance(processor, torch.nn.Module):
        return False
    widths = {attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features}
    spec = getattr(attn, "slimdiff_spec", None)
    if spec is not None:
        widths.add(spec.heads * spec.head_dim)
    return any(param.ndim >= 1 and widths.intersection(param.shape) for param in processor.parameters())


_WIDTHS_HELP = ("A processor works on a slimmed attention if it reads per-head dims from the projected tensors "
                "(q/k and v separately) and scales logits by `attn.scale`; set `slimdiff_compatible = True` on "
                "such a processor class, or subclass LowRankAttnProcessor.")


def resolve_processor(attn: Attention, processor: Any, path: str = "", is_cross: bool | None = None) -> Any:
    """The processor a slimmed attention module runs when asked to run ``processor``; raises if none is right.

    ``attn.slimdiff_spec`` (set when the module was narrowed) says whether and how the module is slimmed:

    - not slimmed: ``processor`` itself (the module has its original weights);
    - processors that carry weights trained on the original projections (IP-Adapter, Custom Diffusion, any
      processor with a parameter shaped like the projections) are refused unless their class declares
      ``slimdiff_compatible``;
    - ``"uniform"`` layout (one head width, scale folded into ``to_q``): every other processor runs as is;
    - ``"separate"`` layout: SlimDiff's own processors (exact type) are kept; stock processors are translated
      by *exact* type (``AttnProcessor2_0`` → :class:`LowRankAttnProcessor`, ``SlicedAttnProcessor(n)`` →
      :class:`SlicedLowRankAttnProcessor` ``(n)``, ``FusedAttnProcessor2_0`` → :class:`FusedLowRankAttnProcessor`,
      xformers/NPU/XLA → :class:`LowRankAttnProcessor`); any other processor is kept if its class declares
      ``slimdiff_compatible`` or it passes :func:`processor_is_slim_aware`, and refused otherwise.

    Raises :class:`UnsupportedProcessorError` (the module is left unchanged).
    """
    spec = getattr(attn, "slimdiff_spec", None)
    if spec is None or processor is None:
        return processor
    where = f"{path or 'a slimmed attention'} ({spec.qk_width} q/k and {spec.vo_width} v channels per head, " \
            f"originally {spec.head_dim})"
    name = type(processor).__name__
    if not declares_slim_aware(processor) and _carries_projection_weights(attn, processor):
        raise UnsupportedProcessorError(
            f"{name} cannot run on {where}: its weights were trained against the original q/k/v/out projections, "
            "and a slimmed attention computes in a new basis even at full rank, so the result would be "
            "meaningless. Slim the model with cross-attention kept in its original basis "
            "(SlimConfig(adapter_compatible=True), `slimdiff slim --adapter-compatible`; or this attention left "
            "out with exclude), or apply the adapter before slimming and calibrate with it. (diffusers' "
            "IP-Adapter processors are mapped into the slim bases through the model's set_attn_processor / "
            "load_ip_adapter.)")
    if spec.layout == "uniform":
        return processor
    kind = type(processor)
    if getattr(spec, "kind", "plain") != "plain":
        if kind in TRANSFORMER_PROCESSORS or declares_slim_aware(processor):
            return processor
        if kind in TRANSFORMER_TRANSLATIONS:
            return TRANSFORMER_TRANSLATIONS[kind]()
        raise UnsupportedProcessorError(
            f"{name} cannot run on {where}, a slimmed {spec.kind} transformer attention: only diffusers' stock "
            f"{' / '.join(t.__name__ for t in TRANSFORMER_TRANSLATIONS)} (translated to SlimDiff's "
            f"{' / '.join(t.__name__ for t in TRANSFORMER_PROCESSORS)}) and processors whose class declares "
            f"`slimdiff_compatible = True` run there. {_WIDTHS_HELP}")
    fused = getattr(attn, "to_qkv", None) is not None or getattr(attn, "to_kv", None) is not None
    if kind in (FusedLowRankAttnProcessor, FusedAttnProcessor2_0) and not fused:
        raise UnsupportedProcessorError(f"{name} on {where} needs fused projections: call "
                                        "`fuse_qkv_projections()` on the model instead of setting it by hand")
    if kind in SLIM_PROCESSORS:
        return processor
    if kind in TRANSFORMER_TRANSLATIONS:  # e.g. SD3.5's second (self-)attention runs JointAttnProcessor2_0
        return TRANSFORMER_TRANSLATIONS[kind]()
    if kind in TRANSLATIONS:
        translated = TRANSLATIONS[kind](processor)
        if kind in _KERNEL_SWAPS:
            logger.info("%s needs one head width; slimmed attention runs %s (PyTorch SDPA, whose fused kernels "
                        "compute the same attention)", name, type(translated).__name__)
        return translated
    if declares_slim_aware(processor):
        return processor
    cross = getattr(attn, "is_cross_attention", False) if is_cross is None else is_cross
    if processor_is_slim_aware(attn, cross, processor):
        return processor
    base = next((b.__name__ for b in kind.__mro__[1:] if b in TRANSLATIONS), None)
    inherited = f" It subclasses {base}, whose computation assumes one head width and derives the softmax " \
                "scale from it." if base else ""
    raise UnsupportedProcessorError(
        f"{name} computes something else on {where}: it does not give the same output when the q/k and v head "
        f"widths change.{inherited} {_WIDTHS_HELP} Or use the default processor (`set_default_attn_processor()`).")


def check_processors(model: torch.nn.Module, attention_paths: list[str], cross: dict[str, bool],
                     kinds: dict[str, str] | None = None) -> dict[str, str]:
    """Decide, before slimming, what happens to each attention's processor.

    Returns ``{path: "replace" | "keep"}``. A processor is replaced only if its *exact* type is a stock one
    (``AttnProcessor``/``AttnProcessor2_0``); a subclass, like any custom processor, is kept only if its class
    declares ``slimdiff_compatible`` or it passes :func:`processor_is_slim_aware`. Raises
    :class:`UnsupportedProcessorError` naming every module whose processor would silently compute the wrong
    thing on narrowed projections (or carries weights trained on the original ones).
    """
    decisions: dict[str, str] = {}
    refused: list[str] = []
    linear = [f"{p} ({type(model.get_submodule(p).processor).__name__})" for p in attention_paths
              if is_linear_attention(model.get_submodule(p).processor)]
    if linear:
        raise UnsupportedArchitectureError(
            f"{len(linear)} attention module(s) run linear attention: {', '.join(linear[:4])}"
            f"{' …' if len(linear) > 4 else ''}. Its logits are not a softmax of q·k, so SlimDiff's QK/VO "
            "decompositions do not apply; Sana-style linear-attention models are not supported. Nothing was changed.")
    kinds = kinds or {}
    for path in attention_paths:
        attn = model.get_submodule(path)
        processor = attn.processor
        if kinds.get(path, "plain") != "plain":
            if type(processor) in TRANSFORMER_TRANSLATIONS or type(processor) in TRANSFORMER_PROCESSORS:
                decisions[path] = "replace"
            elif declares_slim_aware(processor) and not _carries_projection_weights(attn, processor):
                decisions[path] = "keep"
            else:
                refused.append(f"{path} ({type(processor).__name__}: {kinds[path]} transformer attention runs only "
                               "diffusers' stock processor or a slim-aware one)")
            continue
        if type(processor) in REPLACEABLE_PROCESSORS or type(processor) is LowRankAttnProcessor or \
                type(processor) in TRANSFORMER_TRANSLATIONS:
            decisions[path] = "replace"
        elif not declares_slim_aware(processor) and _carries_projection_weights(attn, processor):
            refused.append(f"{path} ({type(processor).__name__}: carries weights for the original projections)")
        elif declares_slim_aware(processor) or processor_is_slim_aware(attn, cross[path]):
            decisions[path] = "keep"
        else:
            refused.append(f"{path} ({type(processor).__name__})")
    if refused:
        raise UnsupportedProcessorError(
            f"{len(refused)} attention module(s) use a processor that does not work with narrowed q/k/v "
            f"projections: {', '.join(refused[:4])}{' …' if len(refused) > 4 else ''}. {_WIDTHS_HELP} Otherwise "
            "reset these modules to the default processor (`set_default_attn_processor()`), or exclude them "
            "with SlimConfig(exclude=[...]).")
    return decisions


def install_processors(model: torch.nn.Module, decisions: dict[str, str]) -> None:
    """Put the slim processor on every slimmed attention whose processor was replaceable: a
    :class:`LowRankAttnProcessor` on plain attention, :class:`SlimFluxAttnProcessor` /
    :class:`SlimJointAttnProcessor` in place of diffusers' Flux / joint (SD3) processors."""
    for path, decision in decisions.items():
        if decision != "replace":
            continue
        attn = model.get_submodule(path)
        kind = type(attn.processor)
        if kind in TRANSFORMER_TRANSLATIONS:
            attn.set_processor(TRANSFORMER_TRANSLATIONS[kind]())
        elif kind not in TRANSFORMER_PROCESSORS:
            attn.set_processor(LowRankAttnProcessor())
