"""diffusers model classes that know their slim layer shapes, so stock loading just works.

A slimmed UNet is an instance of :class:`SlimUNet2DConditionModel` (or :class:`SlimUNet2DModel`): the stock
class plus one config entry, ``slimdiff_spec`` (the per-module widths). Its ``__init__`` narrows the layers
named by the spec, so ``save_pretrained`` / ``from_pretrained`` (of the model, or of a whole pipeline through
``DiffusionPipeline.from_pretrained``, whose ``model_index.json`` then names ``slimdiff_diffusers``) round-trip
with no custom loading code, Hub downloads and ``torch_dtype`` included.
"""
from __future__ import annotations

import inspect

import torch.nn as nn
from diffusers import UNet2DConditionModel, UNet2DModel

from ..core.rewrite import apply_slim_spec
from ..core.sites import find_sites
from ..core.spec import SlimSpec
from .attention_api import SlimAttentionAPIMixin, guard_slim_attention


class _SlimModelMixin:
    """Shared behaviour: build the narrowed layers from ``slimdiff_spec`` at construction.

    Slimmed attention modules are guarded (:func:`guard_slim_attention`): their freshly built stock processors
    become slim-aware ones, and every later processor switch is translated or refused.
    """

    def _apply_slimdiff_spec(self, slimdiff_spec: dict | None) -> None:
        if slimdiff_spec is None:
            return
        spec = SlimSpec.from_dict(slimdiff_spec)
        apply_slim_spec(self, spec)
        guard_slim_attention(self, spec)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``, with the slim folder validated first (config, spec, weight shapes;
        see :mod:`.slim_folder`): a damaged or mismatched folder raises a :class:`SlimFileError` naming it."""
        from .lora import remember_maps_location
        from .slim_folder import load_validated

        model = load_validated(cls, super().from_pretrained, pretrained_model_name_or_path, kwargs)
        loaded = model[0] if isinstance(model, tuple) else model
        remember_maps_location(loaded, pretrained_model_name_or_path, kwargs)  # LoRA maps: read when first needed
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' ``save_pretrained``, plus the LoRA basis maps (``slimdiff_lora_maps.safetensors``) when the
        model has them, so a reloaded slim model still takes LoRAs made for the original (see :mod:`.lora`)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and (not args or args[0]):
            from .lora import save_lora_maps

            save_lora_maps(self, save_directory)
        return result

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap: bool = False,
                          **kwargs):
        """diffusers' ``load_lora_adapter`` (what ``pipe.load_lora_weights`` calls) for LoRAs made for the original
        model: their updates of narrowed layers are translated into the slim bases first (:mod:`.lora`)."""
        from .lora import load_lora_adapter

        return load_lora_adapter(self, super().load_lora_adapter, pretrained_model_name_or_path_or_dict, prefix,
                                 hotswap, kwargs)

    @property
    def slimdiff_spec_dict(self) -> dict | None:
        return self.config.get("slimdiff_spec")

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, subfolder: str | None = None, revision: str | None = None):
        """Upload the slim model with SlimDiff's model card and the single file ComfyUI loads.

        Arguments as diffusers' ``push_to_hub``. With ``subfolder`` (a component of a pipeline repository) only
        the model files are uploaded, as diffusers does: the pipeline's card belongs to the repository root.
        """
        if subfolder:
            return super().push_to_hub(repo_id, commit_message=commit_message, private=private, token=token,
                                       create_pr=create_pr, safe_serialization=safe_serialization, variant=variant,
                                       subfolder=subfolder)
        from ..hub.push import push_model_to_hub

        return push_model_to_hub(self, repo_id, commit_message=commit_message, private=private, token=token,
                                 create_pr=create_pr, safe_serialization=safe_serialization, variant=variant,
                                 revision=revision)


def _with_spec_signature(cls: type, base: type) -> type:
    """Give ``cls.__init__`` the base signature plus ``slimdiff_spec`` (diffusers reads config keys from it)."""
    sig = inspect.signature(base.__init__)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params.append(inspect.Parameter("slimdiff_spec", inspect.Parameter.KEYWORD_ONLY, default=None))
    cls.__init__.__signature__ = sig.replace(parameters=params)
    cls.__module__ = "slimdiff_diffusers"  # what model_index.json records as the library
    return cls


class SlimUNet2DConditionModel(_SlimModelMixin, SlimAttentionAPIMixin, UNet2DConditionModel):
    """``UNet2DConditionModel`` with narrowed attention / feed-forward layers (see ``config.slimdiff_spec``).

    Its attention API (``set_attn_processor``, ``set_default_attn_processor``, ``set_attention_slice``,
    ``fuse_qkv_projections``, xformers, IP-Adapter loading) keeps slimmed modules right: see
    :class:`~slimdiff_diffusers.diffusers_adapter.attention_api.SlimAttentionAPIMixin`.
    """

    def __init__(self, *args, slimdiff_spec: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if slimdiff_spec is not None:
            self.register_to_config(slimdiff_spec=slimdiff_spec)
        self._apply_slimdiff_spec(slimdiff_spec)


class SlimUNet2DModel(_SlimModelMixin, UNet2DModel):
    """``UNet2DModel`` with narrowed attention layers (see ``config.slimdiff_spec``).

    ``UNet2DModel`` has no model-level processor API; its slimmed attention modules are guarded, so the
    per-module one (``attn.set_processor``, ``attn.set_attention_slice``) and xformers are translated or refused.
    """

    def __init__(self, *args, slimdiff_spec: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if slimdiff_spec is not None:
            self.register_to_config(slimdiff_spec=slimdiff_spec)
        self._apply_slimdiff_spec(slimdiff_spec)


_with_spec_signature(SlimUNet2DConditionModel, UNet2DConditionModel)
_with_spec_signature(SlimUNet2DModel, UNet2DModel)

SLIM_CLASSES: dict[type, type] = {UNet2DConditionModel: SlimUNet2DConditionModel, UNet2DModel: SlimUNet2DModel}


def as_slim_class(model: nn.Module, spec: SlimSpec) -> nn.Module:
    """Turn a slimmed stock model into its Slim* class (same object), record the spec in its config and guard its
    slimmed attention modules (:func:`guard_slim_attention`)."""
    guard_slim_attention(model, spec)  # every later processor switch on a slimmed module is translated or refused
    for base, slim_cls in SLIM_CLASSES.items():
        if type(model) is base or type(model) is slim_cls:
            model.__class__ = slim_cls
            model.register_to_config(slimdiff_spec=spec.to_dict())
            return model
    return model  # other nn.Modules keep their class; their spec lives in .slimdiff_spec


def supported_for_pretrained(model: nn.Module) -> bool:
    return type(model) in SLIM_CLASSES or type(model) in SLIM_CLASSES.values()


__all__ = ["SlimUNet2DConditionModel", "SlimUNet2DModel", "as_slim_class", "find_sites"]
