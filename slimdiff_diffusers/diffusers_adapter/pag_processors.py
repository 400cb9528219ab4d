"""Perturbed-attention guidance (PAG) on slimmed self-attention (issue 12).

diffusers' PAG pipelines (``StableDiffusionPAGPipeline``, ``AutoPipelineForText2Image.from_pipe(pipe,
enable_pag=True)``, ...) assign ``PAGCFGIdentitySelfAttnProcessor2_0`` / ``PAGIdentitySelfAttnProcessor2_0`` to the
self-attention layers named by ``pag_applied_layers`` for the duration of a call. Those split the batch into the
normal part (ordinary attention) and the perturbed part (identity attention: ``to_out(to_v(x))``), derive one
head width from the key and let SDPA take the scale from it: on a slimmed module (q/k narrower than v, or the
original scale needed) they fail or compute something else. The classes here are the same computation with
q/k and v head widths read separately and ``attn.scale`` (the original head dim's). The identity path needs
nothing new: the slim ``to_out`` reads the slim value channels directly.

The guarded slim attention modules translate the stock PAG processors into these by exact type
(``attention_processor.TRANSLATIONS``), whichever way they are set (PAG assigns ``module.processor``).
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import (
    Attention,
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGIdentitySelfAttnProcessor2_0,
)


class _SlimPAGIdentitySelfAttention:
    """The batch's last ``1/chunks`` runs identity attention, the rest ordinary (slim) attention."""

    slimdiff_compatible = True
    chunks = 2

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        from .attention_processor import _LowRankAttention  # the shared slim SDPA (imported late: no cycle)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            _, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(hidden_states.shape[0], channel, height * width).transpose(1, 2)
        parts = hidden_states.chunk(self.chunks)
        states_org, states_ptb = torch.cat(parts[:-1]), parts[-1]

        # normal path: self-attention with separate q/k and v head widths and the original scale
        batch_size, sequence_length, _ = states_org.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            states_org = attn.group_norm(states_org.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(states_org), attn.to_k(states_org), attn.to_v(states_org)
        qk_dim, v_dim = query.shape[-1] // attn.heads, value.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, qk_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, qk_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, v_dim).transpose(1, 2)
        out_org = _LowRankAttention._sdpa(attn, query, key, value, attention_mask)
        out_org = out_org.transpose(1, 2).reshape(batch_size, -1, attn.heads * v_dim).to(query.dtype)
        out_org = attn.to_out[1](attn.to_out[0](out_org))
        if input_ndim == 4:
            out_org = out_org.transpose(-1, -2).reshape(batch_size, channel, height, width)

        # perturbed path: identity attention, to_out(to_v(x)); the slim to_out reads the slim value channels
        if attn.group_norm is not None:
            states_ptb = attn.group_norm(states_ptb.transpose(1, 2)).transpose(1, 2)
        out_ptb = attn.to_out[1](attn.to_out[0](attn.to_v(states_ptb).to(query.dtype)))
        if input_ndim == 4:
            out_ptb = out_ptb.transpose(-1, -2).reshape(states_ptb.shape[0], channel, height, width)

        hidden_states = torch.cat([out_org, out_ptb])
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class SlimPAGIdentitySelfAttnProcessor(_SlimPAGIdentitySelfAttention):
    """``PAGIdentitySelfAttnProcessor2_0`` (PAG without classifier-free guidance: batch = [normal, perturbed]) for
    slimmed self-attention."""

    slimdiff_compatible = True
    chunks = 2


class SlimPAGCFGIdentitySelfAttnProcessor(_SlimPAGIdentitySelfAttention):
    """``PAGCFGIdentitySelfAttnProcessor2_0`` (PAG with classifier-free guidance: batch = [uncond, cond,
    perturbed]) for slimmed self-attention."""

    slimdiff_compatible = True
    chunks = 3


# Stock PAG processor (exact type) → its slim counterpart; merged into attention_processor.TRANSLATIONS.
PAG_TRANSLATIONS: dict[type, Any] = {
    PAGIdentitySelfAttnProcessor2_0: lambda p: SlimPAGIdentitySelfAttnProcessor(),
    PAGCFGIdentitySelfAttnProcessor2_0: lambda p: SlimPAGCFGIdentitySelfAttnProcessor(),
}

__all__ = ["PAG_TRANSLATIONS", "SlimPAGCFGIdentitySelfAttnProcessor", "SlimPAGIdentitySelfAttnProcessor"]
