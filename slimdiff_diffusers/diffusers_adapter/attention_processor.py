"""The attention processor for slimmed diffusers ``Attention`` modules, and processor compatibility checks.

After slimming, q/k have ``qk_rank`` and v has ``vo_rank`` channels per head, and the logits must still be
scaled by the *original* ``head_dim ** -0.5`` (method.md §5.2). diffusers' ``AttnProcessor2_0`` derives one
head dim from the key width and lets SDPA pick the scale from it, so it cannot run a slimmed module.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from ..core.errors import UnsupportedProcessorError

logger = logging.getLogger("slimdiff")


class LowRankAttnProcessor:
    """``AttnProcessor2_0`` with separate q/k and v head dims and the original softmax scale.

    Projections run at their narrowed widths (the parameter and FLOP savings); inside SDPA the narrower of q/k
    and v is zero-padded to the common width so PyTorch's fused kernels stay eligible.

    Supports self- and cross-attention, 3D and 4D (spatial) inputs, attention masks, ``group_norm``,
    ``spatial_norm``, ``norm_cross``, QK-norm, residual connections and ``rescale_output_factor`` exactly
    like ``AttnProcessor2_0``. On an unslimmed module it computes the same thing as ``AttnProcessor2_0``.
    """

    # Marks processors that read head dims from the projected tensors and use ``attn.scale``.
    slimdiff_compatible = True

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        qk_head_dim = query.shape[-1] // heads
        v_head_dim = value.shape[-1] // heads
        query = query.view(batch_size, -1, heads, qk_head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, heads, qk_head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, heads, v_head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Fused SDPA kernels need one head width for q, k and v; with unequal widths PyTorch falls back to the
        # math kernel (3-5x slower on CPU at 1-4k tokens, measured). Zero channels change no logit and no
        # output, so pad the narrower side to the common width, and slice the padding off the output.
        width = max(qk_head_dim, v_head_dim)
        if qk_head_dim < width:
            query = F.pad(query, (0, width - qk_head_dim))
            key = F.pad(key, (0, width - qk_head_dim))
        elif v_head_dim < width:
            value = F.pad(value, (0, width - v_head_dim))
        # attn.scale is the original head_dim ** -0.5; it is never recomputed from the narrowed width.
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False, scale=attn.scale)
        hidden_states = hidden_states[..., :v_head_dim]
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * v_head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# Processors whose semantics LowRankAttnProcessor reproduces exactly; they are replaced.
REPLACEABLE_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def _pad_heads(attn: Attention, qk_pad: int, v_pad: int) -> Attention:
    """A copy of ``attn`` whose q/k (v) heads are widened by ``qk_pad`` (``v_pad``) zero channels.

    Zero channels change no logit and no output, so a processor that reads head dims from the tensors and
    keeps ``attn.scale`` gives the same result on the copy; one that derives the scale or one shared head
    dim from the widths does not.
    """
    padded = copy.deepcopy(attn)
    heads = attn.heads

    def widen_rows(layer: torch.nn.Linear, pad: int) -> torch.nn.Linear:
        w = layer.weight.detach()
        dh = w.shape[0] // heads
        w = torch.cat([w.view(heads, dh, -1), w.new_zeros(heads, pad, w.shape[1])], 1).view(heads * (dh + pad), -1)
        new = torch.nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None).to(w)
        new.weight.data.copy_(w)
        if layer.bias is not None:
            b = layer.bias.detach().view(heads, dh)
            new.bias.data.copy_(torch.cat([b, b.new_zeros(heads, pad)], 1).view(-1))
        return new

    padded.to_q = widen_rows(attn.to_q, qk_pad)
    padded.to_k = widen_rows(attn.to_k, qk_pad)
    padded.to_v = widen_rows(attn.to_v, v_pad)
    out = attn.to_out[0]
    w = out.weight.detach()
    dh = w.shape[1] // heads
    w = torch.cat([w.view(-1, heads, dh), w.new_zeros(w.shape[0], heads, v_pad)], 2).view(w.shape[0], -1)
    new_out = torch.nn.Linear(w.shape[1], w.shape[0], bias=out.bias is not None).to(w)
    new_out.weight.data.copy_(w)
    if out.bias is not None:
        new_out.bias.data.copy_(out.bias.detach())
    padded.to_out[0] = new_out
    return padded


@torch.no_grad()
def processor_is_slim_aware(attn: Attention, is_cross: bool) -> bool:
    """Probe whether ``attn.processor`` computes the same output when q/k and v head widths change.

    Runs the processor on random inputs with the module as is and with zero-widened heads (q/k and v by
    different amounts); a slim-aware processor gives the same output on both.
    """
    gen = torch.Generator().manual_seed(0)
    dtype, device = attn.to_q.weight.dtype, attn.to_q.weight.device
    dim = attn.to_q.in_features
    kwargs = {}
    if attn.group_norm is not None and attn.spatial_norm is None and not is_cross:
        x = torch.randn(1, dim, 4, 4, generator=gen).to(device, dtype)
    else:
        x = torch.randn(1, 6, dim, generator=gen).to(device, dtype)
    if is_cross:
        kwargs["encoder_hidden_states"] = torch.randn(1, 5, attn.to_k.in_features, generator=gen).to(device, dtype)
    if attn.spatial_norm is not None:
        return False  # needs a conditioning tensor we cannot invent; refuse rather than guess
    try:
        reference = attn(x, **kwargs)
        padded = _pad_heads(attn, qk_pad=8, v_pad=16)
        probe = padded(x, **kwargs)
    except Exception as exc:  # a processor that assumes equal widths may fail outright
        logger.debug("processor probe raised %r", exc)
        return False
    return bool(torch.allclose(reference.float(), probe.float(), rtol=1e-3, atol=1e-4 * (1 + reference.abs().max().item())))


def check_processors(model: torch.nn.Module, attention_paths: list[str], cross: dict[str, bool]) -> dict[str, str]:
    """Decide, before slimming, what happens to each attention's processor.

    Returns ``{path: "replace" | "keep"}``. Raises :class:`UnsupportedProcessorError` naming every module whose
    custom processor would silently compute the wrong thing on narrowed projections.
    """
    decisions: dict[str, str] = {}
    refused: list[str] = []
    for path in attention_paths:
        attn = model.get_submodule(path)
        processor = attn.processor
        if isinstance(processor, REPLACEABLE_PROCESSORS):
            decisions[path] = "replace"
        elif getattr(processor, "slimdiff_compatible", False) or processor_is_slim_aware(attn, cross[path]):
            decisions[path] = "keep"
        else:
            refused.append(f"{path} ({type(processor).__name__})")
    if refused:
        raise UnsupportedProcessorError(
            f"{len(refused)} attention module(s) use a custom processor that does not work with narrowed q/k/v "
            f"projections: {', '.join(refused[:4])}{' …' if len(refused) > 4 else ''}. A processor works if it "
            "reads per-head dims from the projected tensors (q/k and v separately) and scales logits by "
            "`attn.scale`; set `slimdiff_compatible = True` on such a processor class, reset these modules to "
            "the default processor, or exclude them with SlimConfig(exclude=[...])."
        )
    return decisions


def install_processors(model: torch.nn.Module, decisions: dict[str, str]) -> None:
    """Put a :class:`LowRankAttnProcessor` on every slimmed attention whose processor was replaceable."""
    for path, decision in decisions.items():
        if decision == "replace":
            model.get_submodule(path).set_processor(LowRankAttnProcessor())
