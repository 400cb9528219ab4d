"""Slim-aware counterparts of diffusers' transformer attention processors (Flux, SD3/MMDiT joint attention).

After slimming, a head's value vectors (``to_v``/``add_v_proj``) may be narrower than its query/key vectors,
and on SD3 with ``qk_norm=None`` q/k may be narrowed too. The stock processors reshape every projection by one
head width (``attn.head_dim``, or the key width) and let the kernel derive the softmax scale from it, which is
wrong or fails on a slimmed module. These processors:

* read the per-head widths from the projected tensors (``unflatten(-1, (heads, -1))``), q/k and v separately;
* leave QK-norm (``norm_q``/``norm_k``/``norm_added_*``) and Flux's RoPE exactly where the stock ones apply them
  (SlimDiff never narrows q/k where those sit, so they still see full head widths);
* keep the original softmax scale ``head_dim ** -0.5``;
* zero-pad the narrower side to one head width inside the attention call and slice the padding off the output
  (zero channels change no logit and no output; fused kernels need one width), as
  :class:`~slimdiff_diffusers.LowRankAttnProcessor` does; where q/k and v widths agree nothing is padded or
  sliced, so the operations are the stock processor's;
* run fused projections (``fuse_qkv_projections()`` on a slimmed model) by splitting ``to_qkv``/``to_added_qkv``
  at the unequal q/k/v widths (diffusers' fused processors split in thirds);
* call the same attention function as the stock processor: diffusers' ``dispatch_attention_fn`` for Flux (so the
  backend chosen with ``set_attention_backend`` still runs), PyTorch SDPA for SD3's ``JointAttnProcessor2_0``.

On an unslimmed module each computes exactly what the stock processor computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from ..core.errors import UnsupportedProcessorError


def _original_scale(attn: torch.nn.Module, qk_width: int) -> float:
    """``head_dim ** -0.5`` of the unslimmed module (``attn.slimdiff_head_dim`` when slimmed)."""
    head_dim = getattr(attn, "slimdiff_head_dim", None) or qk_width
    return head_dim ** -0.5


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def _unpad(t: torch.Tensor, width: int) -> torch.Tensor:
    """The first ``width`` channels; the tensor itself (no slice op) when it has no padding."""
    return t if t.shape[-1] == width else t[..., :width]


def _projections(attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """(q, k, v, encoder q, k, v) from separate or fused projections (``fuse_qkv_projections()``).

    A fused ``to_qkv``/``to_added_qkv`` of a slimmed module concatenates outputs of *unequal* widths (q/k and v
    differ), so it is split at the widths of the separate layers diffusers keeps beside it, never in thirds.
    """
    fused = getattr(attn, "fused_projections", False)
    if fused and getattr(attn, "to_qkv", None) is None:
        raise UnsupportedProcessorError("a fused attention without `to_qkv` (fused cross-attention) is not a "
                                        "transformer joint attention: call unfuse_qkv_projections()")
    if fused:
        widths = [attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features]
        query, key, value = attn.to_qkv(hidden_states).split(widths, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    encoder = (None, None, None)
    if encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None:
        if fused and getattr(attn, "to_added_qkv", None) is not None:
            widths = [attn.add_q_proj.out_features, attn.add_k_proj.out_features, attn.add_v_proj.out_features]
            encoder = tuple(attn.to_added_qkv(encoder_hidden_states).split(widths, dim=-1))
        else:
            encoder = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                       attn.add_v_proj(encoder_hidden_states))
    return (query, key, value, *encoder)


class SlimFluxAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` for slimmed ``FluxAttention`` modules (double- and single-stream blocks).

    Goes through ``dispatch_attention_fn`` with the processor's ``_attention_backend`` / ``_parallel_config``,
    which ``model.set_attention_backend(...)`` sets, like the stock processor.
    """

    _attention_backend = None
    _parallel_config = None
    slimdiff_compatible = True

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        heads = attn.heads
        joint = encoder_hidden_states is not None and getattr(attn, "added_kv_proj_dim", None) is not None
        q, k, v, eq, ek, ev = _projections(attn, hidden_states, encoder_hidden_states if joint else None)
        query = attn.norm_q(q.unflatten(-1, (heads, -1)))
        key = attn.norm_k(k.unflatten(-1, (heads, -1)))
        value = v.unflatten(-1, (heads, -1))
        if joint:
            encoder_query = attn.norm_added_q(eq.unflatten(-1, (heads, -1)))
            encoder_key = attn.norm_added_k(ek.unflatten(-1, (heads, -1)))
            encoder_value = ev.unflatten(-1, (heads, -1))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        qk_width, v_width = query.shape[-1], value.shape[-1]
        width = max(qk_width, v_width)
        hidden_states = dispatch_attention_fn(
            _pad_to(query, width), _pad_to(key, width), _pad_to(value, width), attn_mask=attention_mask,
            scale=_original_scale(attn, qk_width), backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = _unpad(hidden_states, v_width).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


class SlimJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3/SD3.5 MMDiT joint attention) for slimmed modules.

    Handles narrowed V (always) and narrowed Q/K (SD3 with ``qk_norm=None``), the ``context_pre_only`` last block
    (no ``to_add_out``: the text stream's outputs are dropped) and QK-norm, with PyTorch SDPA like the stock one.
    """

    slimdiff_compatible = True

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        batch_size, heads = hidden_states.shape[0], attn.heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch_size, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v, eq, ek, ev = _projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = split_heads(q), split_heads(k), split_heads(v)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value = split_heads(eq), split_heads(ek), split_heads(ev)
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=2)
            key = torch.cat([key, encoder_key], dim=2)
            value = torch.cat([value, encoder_value], dim=2)
        qk_width, v_width = query.shape[-1], value.shape[-1]
        width = max(qk_width, v_width)
        hidden_states = F.scaled_dot_product_attention(
            _pad_to(query, width), _pad_to(key, width), _pad_to(value, width), dropout_p=0.0, is_causal=False,
            scale=_original_scale(attn, qk_width))
        hidden_states = _unpad(hidden_states, v_width).transpose(1, 2).reshape(batch_size, -1, heads * v_width)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


TRANSFORMER_PROCESSORS = (SlimFluxAttnProcessor, SlimJointAttnProcessor)


def stock_transformer_translations() -> dict[type, type]:
    """Stock processor type → its slim counterpart (exact types; subclasses are not translated)."""
    from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    # SD3's fuse_qkv_projections() installs FusedJointAttnProcessor2_0; the slim one reads fused projections too.
    return {FluxAttnProcessor: SlimFluxAttnProcessor, JointAttnProcessor2_0: SlimJointAttnProcessor,
            FusedJointAttnProcessor2_0: SlimJointAttnProcessor}
