"""diffusers' attention API on slim models: every processor switch goes through :func:`resolve_processor`.

Two layers, so that no route around the model-level methods can put a wrong processor on a slimmed module:

- :class:`SlimAttentionModuleMixin` guards one slimmed attention *module*. ``set_processor`` (which every
  diffusers route ends in: ``set_attention_slice``, ``set_use_memory_efficient_attention_xformers``,
  ``set_attn_processor``, IP-Adapter loading, ``pipe.enable_*``) translates the request or refuses it, and
  ``forward`` re-checks a processor that was assigned to ``attn.processor`` directly. A slimmed module becomes
  an instance of ``Slim<Class>`` (e.g. :class:`SlimAttention`), the stock class plus this mixin.
- :class:`SlimAttentionAPIMixin` gives a slim *model* the model-level API: atomic ``set_attn_processor``
  (everything is resolved before anything changes), ``set_default_attn_processor``, ``set_attention_slice``,
  ``fuse_qkv_projections`` and xformers that undo themselves on error, and IP-Adapter processors mapped into
  the slim bases (:mod:`.ip_adapter`) or refused before anything changes. It is written against diffusers' ``AttentionMixin`` protocol
  (``attn_processors`` / ``set_attn_processor``), so the transformer slim classes can reuse it.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch.nn as nn
from diffusers.models.attention_processor import (
    ADDED_KV_ATTENTION_PROCESSORS,
    CROSS_ATTENTION_PROCESSORS,
    Attention,
    AttnAddedKVProcessor,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    JointAttnProcessor2_0,
    SlicedAttnProcessor,
)
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from ..core.errors import IncompatibleAdapterError
from ..core.spec import SlimSpec
from .attention_processor import (
    FusedLowRankAttnProcessor,
    LowRankAttnProcessor,
    SlicedLowRankAttnProcessor,
    resolve_processor,
)
from .ip_adapter import ADAPTER_COMPATIBLE_HELP, map_ip_adapter_requests
from .lora import lora_maps
from .transformer_processors import SlimFluxAttnProcessor, SlimJointAttnProcessor

logger = logging.getLogger("slimdiff")

_VETTED = "_slimdiff_vetted_processor"  # kept in __dict__: a processor nn.Module must not become a submodule twice

# What each slim processor stands in for, for diffusers' own "are these all default-like?" checks.
_STOCK_EQUIVALENT = {LowRankAttnProcessor: AttnProcessor2_0, SlicedLowRankAttnProcessor: SlicedAttnProcessor,
                     FusedLowRankAttnProcessor: FusedAttnProcessor2_0,
                     SlimFluxAttnProcessor: FluxAttnProcessor, SlimJointAttnProcessor: JointAttnProcessor2_0}


class SlimAttentionModuleMixin:
    """Makes a slimmed attention module vet every processor it is given (see :func:`resolve_processor`)."""

    def set_processor(self, processor: Any) -> None:
        resolved = resolve_processor(self, processor, getattr(self, "slimdiff_path", ""))
        self._slimdiff_install(resolved)

    def _slimdiff_install(self, processor: Any) -> None:
        """Set an already resolved processor (no second probe)."""
        super().set_processor(processor)
        self.__dict__[_VETTED] = processor

    def forward(self, *args: Any, **kwargs: Any):
        if self.__dict__.get(_VETTED) is not self.processor:  # assigned to .processor directly: vet it now
            self.set_processor(self.processor)
        return super().forward(*args, **kwargs)


class SlimAttention(SlimAttentionModuleMixin, Attention):
    """diffusers' ``Attention`` whose processor switches keep a slimmed module's output right."""


_GUARDED: dict[type, type] = {Attention: SlimAttention}


def _guarded_class(cls: type) -> type:
    if issubclass(cls, SlimAttentionModuleMixin):
        return cls
    if cls not in _GUARDED:  # another attention class (transformer models): the same mixin, made once
        guarded = type(f"Slim{cls.__name__}", (SlimAttentionModuleMixin, cls), {"__module__": __name__})
        globals()[guarded.__name__] = guarded  # importable by name, so pickling works
        _GUARDED[cls] = guarded
    return _GUARDED[cls]


def guard_slim_attention(model: nn.Module, spec: SlimSpec) -> None:
    """Make every attention module named by ``spec`` a guarded ``Slim<Class>`` (same object) and resolve its
    current processor now (stock → slim-aware, custom → kept if slim-aware, else refused)."""
    for path in spec.attention:
        attn = model.get_submodule(path)
        if not hasattr(attn, "set_processor"):
            continue  # not a diffusers attention (e.g. ComfyUI's): nothing to guard
        attn.__class__ = _guarded_class(type(attn))
        attn.slimdiff_path = path
        attn.set_processor(attn.processor)


def _processor_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{"<path>.processor": module}`` in diffusers' ``attn_processors`` order."""
    found: dict[str, nn.Module] = {}

    def walk(name: str, module: nn.Module) -> None:
        if hasattr(module, "get_processor"):
            found[f"{name}.processor"] = module
        for sub_name, child in module.named_children():
            walk(f"{name}.{sub_name}", child)

    for name, module in model.named_children():
        walk(name, module)
    return found


class SlimAttentionAPIMixin:
    """diffusers' model-level attention API for slim models (put it before the diffusers base class).

    Every method ends in :func:`resolve_processor` on each slimmed module: a request is translated into a
    slim-aware processor (same output as :class:`LowRankAttnProcessor`) or refused with a
    :class:`~slimdiff_diffusers.UnsupportedProcessorError`, and a refused request changes nothing.
    """

    @contextlib.contextmanager
    def _slimdiff_processor_transaction(self) -> Iterator[None]:
        """Put every processor back if the block raises."""
        before = {name: (module, module.processor) for name, module in _processor_modules(self).items()}
        try:
            yield
        except BaseException:
            for module, processor in before.values():
                if isinstance(module, SlimAttentionModuleMixin):
                    module._slimdiff_install(processor)
                else:
                    module.set_processor(processor)
            raise

    def set_attn_processor(self, processor: Any) -> None:
        """diffusers' ``set_attn_processor``, resolved for slimmed modules before any module changes.

        ``AttnProcessor``/``AttnProcessor2_0`` (and xformers) become :class:`LowRankAttnProcessor`,
        ``SlicedAttnProcessor`` becomes :class:`SlicedLowRankAttnProcessor`; diffusers' IP-Adapter processors
        become :class:`~.ip_adapter.SlimIPAdapterAttnProcessor` with their weights mapped into the slim bases;
        a custom processor is kept if it is slim-aware; other processors with weights for the original
        projections (Custom Diffusion) and processors that compute something else are refused, naming the
        module.
        """
        modules = _processor_modules(self)
        if isinstance(processor, dict):
            if len(processor) != len(modules):
                raise ValueError(
                    f"A dict of processors was passed, but the number of processors {len(processor)} does not match "
                    f"the number of attention layers: {len(modules)}. Please make sure to pass {len(modules)} "
                    "processor classes.")
            missing = [name for name in modules if name not in processor]
            if missing:
                raise KeyError(f"no processor given for {missing[0]} (keys are `model.attn_processors` keys)")
            requested = dict(processor)
        else:
            requested = {name: processor for name in modules}
        # IP-Adapter processors carry weights for the original bases: mapped into the slim ones (or refused).
        requested = map_ip_adapter_requests(self, requested, lambda: lora_maps(self))
        resolved = {name: resolve_processor(module, requested[name], name[: -len(".processor")])
                    for name, module in modules.items()}  # raises before anything changes
        for name, module in modules.items():
            if isinstance(module, SlimAttentionModuleMixin):
                module._slimdiff_install(resolved[name])
            else:
                module.set_processor(resolved[name])

    def set_default_attn_processor(self) -> None:
        """Disable custom processors: the default attention everywhere, :class:`LowRankAttnProcessor` on
        slimmed modules (the slim equivalent of ``AttnProcessor``; stock diffusers refuses slim processors here).
        """
        kinds = [_STOCK_EQUIVALENT.get(type(p), type(p)) for p in self.attn_processors.values()]
        if all(kind in ADDED_KV_ATTENTION_PROCESSORS for kind in kinds):
            processor = AttnAddedKVProcessor()
        elif all(kind in CROSS_ATTENTION_PROCESSORS for kind in kinds):
            processor = AttnProcessor()
        else:
            custom = next(p for p, k in zip(self.attn_processors.values(), kinds)
                          if k not in CROSS_ATTENTION_PROCESSORS)
            raise ValueError(f"Cannot call `set_default_attn_processor` when attention processors are of type "
                             f"{type(custom).__name__}")
        self.set_attn_processor(processor)

    def set_attention_slice(self, slice_size: Any = "auto") -> None:
        """diffusers' sliced attention; slimmed modules get :class:`SlicedLowRankAttnProcessor`."""
        with self._slimdiff_processor_transaction():
            super().set_attention_slice(slice_size)

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Any = None) -> None:
        """xformers needs one head width: slimmed modules run :class:`LowRankAttnProcessor` (PyTorch SDPA)."""
        with self._slimdiff_processor_transaction():
            super().set_use_memory_efficient_attention_xformers(valid, attention_op)

    def fuse_qkv_projections(self) -> None:
        """Fused QKV (self-attention) / KV (cross-attention) projections, also with unequal q/k and v widths:
        slimmed modules get :class:`FusedLowRankAttnProcessor`, which splits the fused output at those widths."""
        with self._slimdiff_processor_transaction():
            super().fuse_qkv_projections()

    def _load_ip_adapter_weights(self, state_dicts: Any, *args: Any, **kwargs: Any) -> None:
        """diffusers' IP-Adapter loading (``pipe.load_ip_adapter`` ends here), mapped onto slimmed cross-attention.

        On a slimmed cross-attention the adapter's ``to_k_ip``/``to_v_ip`` are mapped into the slim key and value
        bases (:mod:`.ip_adapter`, through :meth:`set_attn_processor`); cross-attention kept whole
        (``adapter_compatible=True`` or ``exclude``) takes the adapter as a stock UNet does. A slim model without
        basis maps refuses the adapter before any change; on any failure the UNet is left as it was.
        """
        targets = [name[: -len(".processor")] for name in self.attn_processors
                   if not name.endswith("attn1.processor") and "motion_modules" not in name]
        slimmed = [path for path in targets if getattr(self.get_submodule(path), "slimdiff_spec", None) is not None]
        if slimmed and lora_maps(self) is None:
            raise IncompatibleAdapterError(
                f"IP-Adapter cannot be loaded into this slim model: {len(slimmed)} of the {len(targets)} "
                f"cross-attention modules it attaches to are slimmed ({slimmed[0]}{', …' if len(slimmed) > 1 else ''}) "
                "and the model has no basis maps to map the adapter's weights into their bases (it was slimmed "
                "with lora_maps=False, or its slimdiff_lora_maps.safetensors is missing beside the weights). Slim "
                f"it again with the maps (the default). {ADAPTER_COMPATIBLE_HELP} Nothing was changed.")
        saved = {name: getattr(self, name, None) for name in ("encoder_hid_proj", "text_encoder_hid_proj")}
        had_text_proj = hasattr(self, "text_encoder_hid_proj")
        hid_dim_type = self.config.encoder_hid_dim_type
        try:
            with self._slimdiff_processor_transaction():
                super()._load_ip_adapter_weights(state_dicts, *args, **kwargs)
        except BaseException:
            self.encoder_hid_proj = saved["encoder_hid_proj"]
            if had_text_proj:
                self.text_encoder_hid_proj = saved["text_encoder_hid_proj"]
            elif hasattr(self, "text_encoder_hid_proj"):
                del self.text_encoder_hid_proj
            self.config.encoder_hid_dim_type = hid_dim_type
            raise


__all__ = ["SlimAttention", "SlimAttentionAPIMixin", "SlimAttentionModuleMixin", "guard_slim_attention"]
