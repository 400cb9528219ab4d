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
  :class:`~slimdiff_diffusers.LowRankAttnProcessor` does;
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


def _refuse_fused(attn: torch.nn.Module, name: str) -> None:
    if getattr(attn, "fused_projections", False) or getattr(attn, "to_qkv", None) is not None:
        raise UnsupportedProcessorError(
            f"{name} runs slimmed attention with separate projections (q/k and v have different widths, so a fused "
            "to_qkv cannot be split in thirds): call unfuse_qkv_projections() on the model")


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
        _refuse_fused(attn, type(self).__name__)
        heads = attn.heads
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (heads, -1)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (heads, -1)))
        value = attn.to_v(hidden_states).unflatten(-1, (heads, -1))
        joint = encoder_hidden_states is not None and getattr(attn, "added_kv_proj_dim", None) is not None
        if joint:
            encoder_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (heads, -1)))
            encoder_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (heads, -1)))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (heads, -1))
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
        hidden_states = hidden_states[..., :v_width].flatten(2, 3).to(query.dtype)
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
        _refuse_fused(attn, type(self).__name__)
        residual = hidden_states
        batch_size, heads = hidden_states.shape[0], attn.heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch_size, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        query = split_heads(attn.to_q(hidden_states))
        key = split_heads(attn.to_k(hidden_states))
        value = split_heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            encoder_query = split_heads(attn.add_q_proj(encoder_hidden_states))
            encoder_key = split_heads(attn.add_k_proj(encoder_hidden_states))
            encoder_value = split_heads(attn.add_v_proj(encoder_hidden_states))
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
        hidden_states = hidden_states[..., :v_width].transpose(1, 2).reshape(batch_size, -1, heads * v_width)
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
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return {FluxAttnProcessor: SlimFluxAttnProcessor, JointAttnProcessor2_0: SlimJointAttnProcessor}
