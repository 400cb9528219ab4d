"""The residual streams of a block: which input and output tensors are its image (hidden) and text (context) streams.

diffusers' joint blocks (Flux, SD3) take ``hidden_states`` and ``encoder_hidden_states`` and return both streams
(``(encoder_hidden_states, hidden_states)``; ComfyUI's double-stream blocks return ``(img, txt)``); the calibrator's
energy hooks and the propagation probe both need to tell them apart.
"""
from __future__ import annotations

from typing import Any

import torch

from .propagation import first_tensor


def context_stream(block: str) -> str:
    """The key of a joint block's second (text) stream: its input energy and its propagation factor."""
    return f"{block}:context"


def block_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(hidden_states, encoder_hidden_states) of a block call, positional or keyword (diffusers' transformer
    blocks are called with keywords; UNet blocks and ComfyUI's with positional hidden states)."""
    h_in = args[0] if args and isinstance(args[0], torch.Tensor) else \
        next((kwargs[k] for k in ("hidden_states", "x") if isinstance(kwargs.get(k), torch.Tensor)), None)
    context = kwargs.get("encoder_hidden_states")
    if context is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        context = args[1]
    return h_in, context if isinstance(context, torch.Tensor) else None


def stream_output(out: Any, h_in: torch.Tensor | None) -> torch.Tensor | None:
    """The block output that continues the residual stream ``h_in``.

    A block may return one tensor or a tuple of streams (diffusers' Flux and SD3 blocks return
    ``(encoder_hidden_states, hidden_states)``, SD3's last block ``(None, hidden_states)``). Among the outputs of
    ``h_in``'s shape, the one closest to ``h_in`` (cosine) is its continuation: a residual block changes its
    stream by a small update, the other stream is another residual altogether.
    """
    if not isinstance(h_in, torch.Tensor):
        return None
    if isinstance(out, torch.Tensor):
        return out if out.shape == h_in.shape else None
    candidates = [o for o in (out if isinstance(out, (tuple, list)) else [first_tensor(out)])
                  if isinstance(o, torch.Tensor) and o.shape == h_in.shape]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    ref = h_in.detach().float().flatten()
    return max(candidates, key=lambda o: float(torch.nn.functional.cosine_similarity(o.detach().float().flatten(),
                                                                                      ref, dim=0)))
