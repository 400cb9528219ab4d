"""Whether an attention processor still computes attention when the q/k and v head widths change.

SlimDiff narrows q/k and v to their own per-head widths. diffusers' stock processors are translated to slim ones by
exact type (the diffusers adapter); any other processor on plain attention is judged by behaviour:
:func:`processor_is_slim_aware` runs it on the module as is and on a copy whose heads are widened by zero channels
(which change no logit and no output). :func:`check_attention_processors` applies that probe to every plain
attention of a model before calibration runs, so a processor that would be refused when slimming is refused before
the run function is called. Pure torch: it calls processors the way diffusers' ``Attention.forward`` does
(``processor(attn, hidden_states, encoder_hidden_states=..., attention_mask=...)``) and imports no diffusers.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn as nn

from .errors import UnsupportedAttentionProcessorError
from .sites import RefusedProcessor, Sites

logger = logging.getLogger("slimdiff")


def _concat_linear(layers: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([layer.weight.detach() for layer in layers])
    has_bias = layers[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias).to(weight)
    fused.weight.data.copy_(weight)
    if has_bias:
        fused.bias.data.copy_(torch.cat([layer.bias.detach() for layer in layers]))
    return fused


def _pad_heads(attn: nn.Module, qk_pad: int, v_pad: int) -> nn.Module:
    """A copy of ``attn`` whose q/k (v) heads are widened by ``qk_pad`` (``v_pad``) zero channels.

    Zero channels change no logit and no output, so a processor that reads head dims from the tensors and
    keeps ``attn.scale`` gives the same result on the copy; one that derives the scale or one shared head
    dim from the widths does not. Fused projections (``to_qkv`` / ``to_kv``) are rebuilt from the widened ones.
    """
    padded = copy.deepcopy(attn)
    heads = attn.heads

    def widen_rows(layer: nn.Linear, pad: int) -> nn.Linear:
        w = layer.weight.detach()
        dh = w.shape[0] // heads
        w = torch.cat([w.view(heads, dh, -1), w.new_zeros(heads, pad, w.shape[1])], 1).view(heads * (dh + pad), -1)
        new = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None).to(w)
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
    new_out = nn.Linear(w.shape[1], w.shape[0], bias=out.bias is not None).to(w)
    new_out.weight.data.copy_(w)
    if out.bias is not None:
        new_out.bias.data.copy_(out.bias.detach())
    padded.to_out[0] = new_out
    if getattr(padded, "to_qkv", None) is not None:
        padded.to_qkv = _concat_linear([padded.to_q, padded.to_k, padded.to_v])
    if getattr(padded, "to_kv", None) is not None:
        padded.to_kv = _concat_linear([padded.to_k, padded.to_v])
    return padded


@torch.no_grad()
def processor_is_slim_aware(attn: nn.Module, is_cross: bool, processor: Any | None = None) -> bool:
    """Probe whether a processor computes the same output when q/k and v head widths change.

    Runs ``processor`` (default: ``attn.processor``) on random inputs with the module as is and with
    zero-widened heads (q/k and v by different amounts); a slim-aware processor gives the same output on both.
    The processor is called directly (as ``Attention.forward`` does), so ``attn`` is not changed.
    """
    processor = attn.processor if processor is None else processor
    if getattr(attn, "spatial_norm", None) is not None:
        return False  # needs a conditioning tensor we cannot invent; refuse rather than guess
    if not isinstance(getattr(attn, "to_out", None), nn.ModuleList):
        return False  # not diffusers' Attention layout (a model's own attention class): nothing to probe with
    gen = torch.Generator().manual_seed(0)
    dtype, device = attn.to_q.weight.dtype, attn.to_q.weight.device
    dim = attn.to_q.in_features
    if getattr(attn, "group_norm", None) is not None and not is_cross:
        x = torch.randn(1, dim, 4, 4, generator=gen).to(device, dtype)
    else:
        x = torch.randn(1, 6, dim, generator=gen).to(device, dtype)
    context = torch.randn(1, 5, attn.to_k.in_features, generator=gen).to(device, dtype) if is_cross else None
    try:  # run a copy: probing must not touch a stateful processor's counters or caches
        processor = copy.deepcopy(processor)
    except Exception:  # noqa: BLE001 - an uncopyable processor is probed as is
        pass
    try:
        reference = processor(attn, x, encoder_hidden_states=context, attention_mask=None)
        padded = _pad_heads(attn, qk_pad=8, v_pad=16)
        probe = processor(padded, x, encoder_hidden_states=context, attention_mask=None)
    except Exception as exc:  # a processor that assumes equal widths may fail outright
        logger.debug("processor probe of %s raised %r", type(processor).__name__, exc)
        return False
    if not isinstance(reference, torch.Tensor) or not isinstance(probe, torch.Tensor) or reference.shape != probe.shape:
        return False
    return bool(torch.allclose(reference.float(), probe.float(), rtol=1e-3, atol=1e-4 * (1 + reference.abs().max().item())))


def _trusted_without_probe(processor: Any) -> bool:
    """Processors the structural rules already decide (``sites._processor_reason``): diffusers' own (stock ones are
    translated, model-specific ones kept whole), SlimDiff's, and classes that declare ``slimdiff_compatible``."""
    cls = type(processor)
    return (processor is None or getattr(processor, "slimdiff_compatible", False)
            or cls.__module__.startswith(("diffusers.", "slimdiff_diffusers")))


def unaware_processors(model: nn.Module, sites: Sites) -> list[tuple[str, RefusedProcessor]]:
    """``(path, reason)`` for every plain attention of ``sites`` whose custom processor fails
    :func:`processor_is_slim_aware`. Modules whose weights have no data (``meta``: offloaded or not yet loaded) are
    not probed; ``slim()`` probes them again when it has the weights."""
    refused = []
    for site in sites.attention:
        if site.kind != "plain":
            continue  # joint / single-stream attention: find_sites refuses custom processors there
        attn = model.get_submodule(site.name)
        processor = getattr(attn, "processor", None)
        if _trusted_without_probe(processor) or attn.to_q.weight.is_meta:
            continue
        if not processor_is_slim_aware(attn, site.is_cross):
            refused.append((site.name, RefusedProcessor(
                f"custom processor {type(processor).__name__} does not compute the same attention when the q/k and "
                "v head widths change (probed with zero-widened heads), so on slimmed projections it would compute "
                "something else. If it reads per-head widths from the projected tensors and scales logits by "
                "`attn.scale`, declare `slimdiff_compatible = True` on its class; otherwise set the stock processor "
                "back before calibrating (with head_layout='uniform' any processor runs on the slim model: set "
                "yours again after slimming)")))
    return refused


def check_attention_processors(model: nn.Module, sites: Sites, model_name: str = "the model") -> None:
    """Raise :class:`UnsupportedAttentionProcessorError` naming every plain attention whose custom processor would
    be refused when slimming (:func:`unaware_processors`), before anything runs; the model is not changed."""
    refused = unaware_processors(model, sites)
    if refused:
        listed = "; ".join(f"{p}: {r}" for p, r in refused[:4])
        more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
        raise UnsupportedAttentionProcessorError(
            f"{model_name} has {len(refused)} attention module(s) whose processor SlimDiff cannot run narrowed: "
            f"{listed}{more}. Nothing was run or changed.")
