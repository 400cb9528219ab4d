"""IP-Adapter on slimmed cross-attention: the adapter's keys and values mapped into the slim bases (issue 12).

An IP-Adapter adds, in every cross-attention, a second attention over image tokens with its own key and value
projections ``to_k_ip`` / ``to_v_ip``, trained against the *original* query and output projections:
``out = to_out(attn(q, k, v) + s · attn(q, W_k_ip c, W_v_ip c))``. A slimmed cross-attention computes per head in
new bases (:mod:`slimdiff_diffusers.core.basis_maps`): slim ``q_h = T_qᵀ q_h``, ``k_h = T_kᵀ k_h``,
``v_h = T_vᵀ v_h`` and ``to_out`` reads ``S_h``-mapped columns. The adapter's weights are mapped with the very
maps of the slim ``to_k`` / ``to_v``:

- keys: ``T_kᵀ W_k_ip[h]``. The logit becomes ``qᵀ T_q T_kᵀ k_ip``, the same low-rank bilinear form the text keys
  get. ``T_kᵀ = Σ_r^{-½} U_rᵀ R_q`` (from ``R_q R_kᵀ = U Σ Vᵀ``), which is exactly the least-squares map
  ``argmin_x E_q (q̂ᵀ x - qᵀ k)²`` under the calibrated query moments: the best image of *any* key (text or
  image) in the slim query basis, not only of keys distributed like the text ones.
- values: ``T_vᵀ W_v_ip[h]``; ``to_out`` then applies the projector ``W_o R⁻¹U_rU_rᵀR`` the VO slimming chose.
  This one is whitened with the text values' statistics, so image values lose what falls outside it; it is the
  only choice a slim model alone allows (the original ``to_out`` is gone), and the benchmark measures its cost.

At full rank both maps are exact (the slim model computes the original function), so the mapped adapter gives
the original adapter's output (``tests/test_ip_adapter.py``). Where a slim model has no basis maps (slimmed with
``lora_maps=False``) the adapter is refused with :class:`IncompatibleAdapterError`, before anything changes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import (
    Attention,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)

from ..core.basis_maps import BasisMaps
from ..core.errors import IncompatibleAdapterError
from .attention_processor import _LowRankAttention

# diffusers' IP-Adapter processors (stock, exact types): what the mapping translates.
STOCK_IP_ADAPTER_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)

ADAPTER_COMPATIBLE_HELP = ("Or slim with cross-attention kept in its original basis, where IP-Adapters load as on "
                           "a stock UNet: pipe.slim(..., adapter_compatible=True) / `slimdiff slim "
                           "--adapter-compatible` (the report states what this keeps).")


class SlimIPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
    """``IPAdapterAttnProcessor2_0`` for a slimmed cross-attention: ``to_k_ip`` / ``to_v_ip`` in the slim key and
    value bases (q/k and v head widths read from the tensors), and the module's softmax scale (``attn.scale``, the
    original head dim's) for both the text and the image attention.

    A subclass of the stock processor, so diffusers' ``set_ip_adapter_scale`` and ``unload_ip_adapter`` treat it
    as an IP-Adapter processor. Built by :func:`map_ip_adapter_processor` (what ``load_ip_adapter`` does on a slim
    UNet); constructing one directly gives the right shapes with untrained weights.

    Args:
        hidden_size: the original width of the attention (``heads · head_dim``).
        cross_attention_dim: the width of the image tokens.
        num_tokens, scale: as in ``IPAdapterAttnProcessor2_0`` (one entry per loaded adapter).
        key_size, value_size: the slim widths of ``to_k`` / ``to_v`` (``heads · qk_width``, ``heads · vo_width``).
    """

    slimdiff_compatible = True

    def __init__(self, hidden_size: int, cross_attention_dim: int | None = None, num_tokens: Any = (4,),
                 scale: Any = 1.0, key_size: int | None = None, value_size: int | None = None):
        super().__init__(hidden_size, cross_attention_dim, num_tokens, scale)
        self.key_size = key_size or hidden_size
        self.value_size = value_size or hidden_size
        n = len(self.num_tokens)
        self.to_k_ip = nn.ModuleList([nn.Linear(cross_attention_dim, self.key_size, bias=False) for _ in range(n)])
        self.to_v_ip = nn.ModuleList([nn.Linear(cross_attention_dim, self.value_size, bias=False) for _ in range(n)])

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, scale: float = 1.0,
                 ip_adapter_masks: Any = None) -> torch.Tensor:
        ops = _LowRankAttention
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        elif encoder_hidden_states is not None:  # diffusers' deprecated layout: image tokens appended to the text
            end = encoder_hidden_states.shape[1] - self.num_tokens[0]
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]]
        else:
            ip_hidden_states = []
        hidden_states, restore = ops._prepare(attn, hidden_states, encoder_hidden_states, temb)
        context = ops._context(attn, hidden_states, encoder_hidden_states)
        query, key, value = ops._heads(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
        batch_size, heads, query_tokens, _ = query.shape
        qk_dim, v_dim = query.shape[-1], value.shape[-1]
        mask = ops._mask(attn, attention_mask, context.shape[1], context.shape[0])
        out = ops._sdpa(attn, query, key, value, mask)  # (batch, heads, tokens, v_dim)
        out = out.transpose(1, 2).reshape(batch_size, query_tokens, heads * v_dim).to(query.dtype)

        masks = self._checked_masks(ip_adapter_masks, ip_hidden_states)
        for states, ip_scale, to_k_ip, to_v_ip, ip_mask in zip(ip_hidden_states, self.scale, self.to_k_ip,
                                                                 self.to_v_ip, masks):
            if (all(s == 0 for s in ip_scale) if isinstance(ip_scale, list) else ip_scale == 0):
                continue
            images = [states[:, i] for i in range(ip_mask.shape[1])] if ip_mask is not None else [states]
            scales = ip_scale if isinstance(ip_scale, list) else [ip_scale] * len(images)
            for i, image_states in enumerate(images):
                ip_key = to_k_ip(image_states).view(batch_size, -1, heads, qk_dim).transpose(1, 2)
                ip_value = to_v_ip(image_states).view(batch_size, -1, heads, v_dim).transpose(1, 2)
                ip_out = ops._sdpa(attn, query, ip_key, ip_value, None)
                ip_out = ip_out.transpose(1, 2).reshape(batch_size, query_tokens, heads * v_dim).to(query.dtype)
                if ip_mask is not None:
                    down = IPAdapterMaskProcessor.downsample(ip_mask[:, i], batch_size, ip_out.shape[1],
                                                             ip_out.shape[2])
                    ip_out = ip_out * down.to(dtype=query.dtype, device=query.device)
                out = out + scales[i] * ip_out
        return ops._finish(attn, out.view(batch_size, query_tokens, heads, v_dim).transpose(1, 2), restore)

    def _checked_masks(self, ip_adapter_masks: Any, ip_hidden_states: list) -> list:
        """diffusers' mask checks (same errors as ``IPAdapterAttnProcessor2_0``); one entry per adapter."""
        if ip_adapter_masks is None:
            return [None] * len(self.scale)
        if not isinstance(ip_adapter_masks, list):
            ip_adapter_masks = list(ip_adapter_masks.unsqueeze(1))
        if not (len(ip_adapter_masks) == len(self.scale) == len(ip_hidden_states)):
            raise ValueError(f"Length of ip_adapter_masks array ({len(ip_adapter_masks)}) must match length of "
                             f"self.scale array ({len(self.scale)}) and number of ip_hidden_states "
                             f"({len(ip_hidden_states)})")
        for index, (mask, ip_scale, state) in enumerate(zip(ip_adapter_masks, self.scale, ip_hidden_states)):
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
                raise ValueError("Each element of the ip_adapter_masks array should be a tensor with shape "
                                 "[1, num_images_for_ip_adapter, height, width]. Please use "
                                 "`IPAdapterMaskProcessor` to preprocess your mask")
            if mask.shape[1] != state.shape[1]:
                raise ValueError(f"Number of masks ({mask.shape[1]}) does not match number of ip images "
                                 f"({state.shape[1]}) at index {index}")
            if isinstance(ip_scale, list) and len(ip_scale) != mask.shape[1]:
                raise ValueError(f"Number of masks ({mask.shape[1]}) does not match number of scales "
                                 f"({len(ip_scale)}) at index {index}")
        return ip_adapter_masks


def _map_rows(weight: torch.Tensor, head_map: torch.Tensor) -> torch.Tensor:
    """``(H·d_h, c)`` original rows → ``(H·w, c)`` slim rows: head h becomes ``head_map[h] @ weight[h]``."""
    heads, width, head_dim = head_map.shape
    per_head = weight.detach().to(torch.float64).reshape(heads, head_dim, -1)
    mapped = head_map.to(device=weight.device, dtype=torch.float64) @ per_head
    return mapped.reshape(heads * width, -1).to(weight.dtype)


def map_ip_adapter_processor(attn: Attention, processor: Any, maps: BasisMaps | None,
                             path: str) -> SlimIPAdapterAttnProcessor:
    """The slim counterpart of a stock IP-Adapter processor whose weights are in the original basis of ``attn``
    (a slimmed cross-attention at ``path``): ``to_k_ip`` / ``to_v_ip`` mapped by the slim ``to_k`` / ``to_v``
    basis maps. Raises :class:`IncompatibleAdapterError` (nothing changed) without maps or on foreign shapes."""
    spec = attn.slimdiff_spec
    k_map = maps.output.get(f"{path}.to_k") if maps is not None else None
    v_map = maps.output.get(f"{path}.to_v") if maps is not None else None
    if k_map is None or v_map is None:
        raise IncompatibleAdapterError(
            f"IP-Adapter cannot be mapped onto {path}: this slim model has no basis maps (it was slimmed with "
            "lora_maps=False, or its slimdiff_lora_maps.safetensors is missing beside the weights). Slim it again "
            f"with the maps (the default). {ADAPTER_COMPATIBLE_HELP} Nothing was changed.")
    original = spec.heads * spec.head_dim
    layers = [*processor.to_k_ip, *processor.to_v_ip]
    bad = [tuple(layer.weight.shape) for layer in layers if layer.weight.shape[0] != original]
    if bad:
        raise IncompatibleAdapterError(
            f"IP-Adapter weights for {path} have shape {bad[0]}, but this attention's original width is {original} "
            f"({spec.heads} heads × {spec.head_dim}); the adapter was made for another model. Nothing was changed.")
    cross_dim = processor.to_k_ip[0].weight.shape[1]
    slim = SlimIPAdapterAttnProcessor(original, cross_dim, list(processor.num_tokens), list(processor.scale),
                                      key_size=k_map.shape[0] * k_map.shape[1],
                                      value_size=v_map.shape[0] * v_map.shape[1])
    weight = processor.to_k_ip[0].weight
    slim.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for src, dst in zip(processor.to_k_ip, slim.to_k_ip):
            dst.weight.copy_(_map_rows(src.weight, k_map))
        for src, dst in zip(processor.to_v_ip, slim.to_v_ip):
            dst.weight.copy_(_map_rows(src.weight, v_map))
    return slim


def map_ip_adapter_requests(model: nn.Module, requested: dict[str, Any], maps_of: Any) -> dict[str, Any]:
    """``requested`` (``{"<path>.processor": processor}``) with every stock IP-Adapter processor aimed at a
    slimmed attention replaced by its mapped :class:`SlimIPAdapterAttnProcessor`. ``maps_of()`` gives the model's
    :class:`BasisMaps` (read only if a mapping is needed). Raises before returning if any cannot be mapped."""
    targets = {name: proc for name, proc in requested.items() if type(proc) in STOCK_IP_ADAPTER_PROCESSORS
               and getattr(model.get_submodule(name[: -len(".processor")]), "slimdiff_spec", None) is not None}
    if not targets:
        return requested
    maps = maps_of()
    mapped = dict(requested)
    for name, proc in targets.items():
        path = name[: -len(".processor")]
        mapped[name] = map_ip_adapter_processor(model.get_submodule(path), proc, maps, path)
    return mapped


__all__ = ["SlimIPAdapterAttnProcessor", "STOCK_IP_ADAPTER_PROCESSORS", "map_ip_adapter_processor",
           "map_ip_adapter_requests"]
