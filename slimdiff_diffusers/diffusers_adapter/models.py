"""diffusers model classes that know their slim layer shapes, so stock loading just works.

A slimmed denoiser is an instance of ``Slim<StockClass>`` (:class:`SlimUNet2DConditionModel`,
:class:`SlimUNet2DModel`, :class:`SlimFluxTransformer2DModel`, :class:`SlimChromaTransformer2DModel`,
:class:`SlimSD3Transformer2DModel`, :class:`SlimPixArtTransformer2DModel`, :class:`SlimDiTTransformer2DModel`, and
for the families whose attention is kept whole and only the feed-forwards are slimmed,
:class:`SlimQwenImageTransformer2DModel`, :class:`SlimWanTransformer3DModel`, :class:`SlimLTXVideoTransformer3DModel`,
:class:`SlimCogView4Transformer2DModel`, :class:`SlimHunyuanDiT2DModel`): the stock class plus one config entry,
``slimdiff_spec`` (the per-module widths). Its ``__init__`` narrows the layers named by the spec, so
``save_pretrained`` / ``from_pretrained`` (of the model, or of a whole pipeline through
``DiffusionPipeline.from_pretrained``, whose ``model_index.json`` then names ``slimdiff_diffusers``) round-trip with
no custom loading code, Hub downloads and ``torch_dtype`` included.

The classes are data: one row of :data:`SLIM_MODEL_FAMILIES` each (stock class, family name, denoiser
component name), built by :func:`make_slim_class` from one mixin. Supporting another diffusers denoiser whose
groups the core finds is one more row.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch.nn as nn
from diffusers import (
    ChromaTransformer2DModel,
    CogView4Transformer2DModel,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    HunyuanDiT2DModel,
    LTXVideoTransformer3DModel,
    ModelMixin,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    WanTransformer3DModel,
)

from diffusers.loaders.peft import PeftAdapterMixin

from ..core.rewrite import apply_slim_spec
from ..core.sites import find_sites
from ..core.spec import SlimSpec
from .attention_api import SlimAttentionAPIMixin, guard_slim_attention


class SlimModelMixin:
    """Shared behaviour of every Slim* model: build the narrowed layers from ``slimdiff_spec`` at construction,
    validate folders before diffusers loads them, and push with SlimDiff's model card.

    Slimmed attention modules are guarded (:func:`guard_slim_attention`): their freshly built stock processors
    become slim-aware ones, and every later processor switch is translated or refused.
    """

    slimdiff_family: str = ""  # "UNet", "Flux", "SD3", "Wan", ...: what reports and model cards call the model

    def _init_slim(self, slimdiff_spec: dict | None) -> None:
        if slimdiff_spec is None:
            return
        self.register_to_config(slimdiff_spec=slimdiff_spec)
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

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """diffusers' ``add_adapter``; the adapter's config then carries this slim model's mark, so the LoRA saved
        from it (``save_lora_adapter``, or ``save_lora_weights`` with its ``to_dict()`` as metadata) loads back
        untranslated here and is refused on another slim model (:mod:`slimdiff_diffusers.core.lora_mark`)."""
        from ..core.lora_mark import model_mark
        from .lora import mark_adapter_configs

        mark = model_mark(self)  # first: a model whose weights cannot be sketched (meta) is refused unchanged
        super().add_adapter(adapter_config, adapter_name)
        mark_adapter_configs(self, mark, renew=(adapter_name,))

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap: bool = False,
                          **kwargs):
        """diffusers' ``load_lora_adapter`` (what ``pipe.load_lora_weights`` calls). A LoRA made for the original
        model has its updates of narrowed layers translated into the slim bases first; one made on this slim model
        (marked, see :meth:`add_adapter`) loads as diffusers loads it; one made on another slim model is refused
        (:mod:`.lora`)."""
        from .lora import load_lora_adapter

        return load_lora_adapter(self, super().load_lora_adapter, pretrained_model_name_or_path_or_dict, prefix,
                                 hotswap, kwargs)

    @property
    def slimdiff_spec_dict(self) -> dict | None:
        return self.config.get("slimdiff_spec")

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, subfolder: str | None = None, revision: str | None = None):
        """Upload the slim model with SlimDiff's model card and its single-file export.

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


# DiffusionPipeline.save_pretrained passes `variant`, `safe_serialization` and `max_shard_size` to a component only if
# its save_pretrained signature names them: show diffusers' signature, not (*args, **kwargs).
SlimModelMixin.save_pretrained.__signature__ = inspect.signature(ModelMixin.save_pretrained)


@dataclass(frozen=True)
class SlimModelFamily:
    """One supported denoiser: its stock diffusers class, the family name reports use, and the pipeline
    component it is (``unet`` or ``transformer``)."""

    base: type
    family: str
    component: str
    description: str


SLIM_MODEL_FAMILIES: tuple[SlimModelFamily, ...] = (
    SlimModelFamily(UNet2DConditionModel, "UNet", "unet",
                    "text-conditioned UNet (SD 1.x/2.x, SDXL, the embedded default model)"),
    SlimModelFamily(UNet2DModel, "UNet", "unet", "unconditional UNet (DDPM-style pipelines)"),
    SlimModelFamily(FluxTransformer2DModel, "Flux", "transformer",
                    "Flux.1 transformer (double- and single-stream blocks; dev, schnell and models built on it)"),
    SlimModelFamily(ChromaTransformer2DModel, "Chroma", "transformer",
                    "Chroma transformer (Flux.1's double- and single-stream blocks and attention, with a distilled "
                    "modulation approximator instead of per-block AdaLN projections)"),
    SlimModelFamily(SD3Transformer2DModel, "SD3", "transformer", "Stable Diffusion 3 / 3.5 MMDiT transformer"),
    SlimModelFamily(PixArtTransformer2DModel, "PixArt", "transformer", "PixArt-α / PixArt-Σ transformer"),
    SlimModelFamily(DiTTransformer2DModel, "DiT", "transformer", "class-conditional DiT transformer"),
    # Partially supported: their attention runs a model-specific diffusers processor and is kept whole; only the
    # feed-forwards are narrowed (core.sites), so the class only has to rebuild those.
    SlimModelFamily(QwenImageTransformer2DModel, "Qwen-Image", "transformer",
                    "Qwen-Image MMDiT transformer; attention kept whole, feed-forwards slimmed"),
    SlimModelFamily(WanTransformer3DModel, "Wan", "transformer",
                    "Wan 2.x video transformer; attention kept whole, feed-forwards slimmed"),
    SlimModelFamily(LTXVideoTransformer3DModel, "LTX-Video", "transformer",
                    "LTX-Video transformer; attention kept whole, feed-forwards slimmed"),
    SlimModelFamily(CogView4Transformer2DModel, "CogView4", "transformer",
                    "CogView4 transformer; attention kept whole, feed-forwards slimmed"),
    SlimModelFamily(HunyuanDiT2DModel, "HunyuanDiT", "transformer",
                    "HunyuanDiT transformer; attention kept whole, feed-forwards slimmed"),
)


def make_slim_class(family: SlimModelFamily) -> type:
    """``Slim<Base>``: ``family.base`` plus :class:`SlimModelMixin` (and :class:`SlimAttentionAPIMixin` where the
    base has diffusers' model-level attention API), with ``slimdiff_spec`` added to the ``__init__`` signature
    that diffusers reads config keys from.

    A base without diffusers' adapter API (``PeftAdapterMixin``: PixArt's transformer) gets it too. A slim model
    needs that API to take a LoRA made for the original: PEFT's own loaders (``PeftModel.from_pretrained``,
    ``set_peft_model_state_dict``) cannot know the slim bases, and at full width would load such a LoRA silently
    wrong; ``load_lora_adapter`` translates it (:mod:`.lora`)."""
    base = family.base
    bases = (SlimModelMixin, SlimAttentionAPIMixin) if hasattr(base, "set_attn_processor") else (SlimModelMixin,)
    bases += (base,) if issubclass(base, PeftAdapterMixin) else (PeftAdapterMixin, base)

    def __init__(self, *args, slimdiff_spec: dict | None = None, **kwargs):
        base.__init__(self, *args, **kwargs)
        self._init_slim(slimdiff_spec)

    sig = inspect.signature(base.__init__)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params.append(inspect.Parameter("slimdiff_spec", inspect.Parameter.KEYWORD_ONLY, default=None))
    __init__.__signature__ = sig.replace(parameters=params)
    name = f"Slim{base.__name__}"
    __init__.__qualname__ = f"{name}.__init__"
    api = (" Its attention API (``set_attn_processor``, ``fuse_qkv_projections``, ...) keeps slimmed modules "
           "right: see :class:`~slimdiff_diffusers.diffusers_adapter.attention_api.SlimAttentionAPIMixin`."
           if SlimAttentionAPIMixin in bases else
           " It has no model-level processor API; its slimmed attention modules are guarded, so the per-module "
           "one (``attn.set_processor``) is translated or refused.")
    doc = (f"``{base.__name__}`` ({family.description}) with narrowed attention / feed-forward layers (see "
           f"``config.slimdiff_spec``).{api}")
    # __module__ is what model_index.json records as the library: the package, which exports every class.
    return type(name, bases, {"__init__": __init__, "__doc__": doc, "__module__": "slimdiff_diffusers",
                              "__qualname__": name, "slimdiff_family": family.family})


SLIM_CLASSES: dict[type, type] = {f.base: make_slim_class(f) for f in SLIM_MODEL_FAMILIES}

SlimUNet2DConditionModel = SLIM_CLASSES[UNet2DConditionModel]
SlimUNet2DModel = SLIM_CLASSES[UNet2DModel]
SlimFluxTransformer2DModel = SLIM_CLASSES[FluxTransformer2DModel]
SlimChromaTransformer2DModel = SLIM_CLASSES[ChromaTransformer2DModel]
SlimDiTTransformer2DModel = SLIM_CLASSES[DiTTransformer2DModel]
SlimSD3Transformer2DModel = SLIM_CLASSES[SD3Transformer2DModel]
SlimPixArtTransformer2DModel = SLIM_CLASSES[PixArtTransformer2DModel]
SlimQwenImageTransformer2DModel = SLIM_CLASSES[QwenImageTransformer2DModel]
SlimWanTransformer3DModel = SLIM_CLASSES[WanTransformer3DModel]
SlimLTXVideoTransformer3DModel = SLIM_CLASSES[LTXVideoTransformer3DModel]
SlimCogView4Transformer2DModel = SLIM_CLASSES[CogView4Transformer2DModel]
SlimHunyuanDiT2DModel = SLIM_CLASSES[HunyuanDiT2DModel]

SLIM_CLASS_NAMES: tuple[str, ...] = tuple(c.__name__ for c in SLIM_CLASSES.values())


def family_of(model: nn.Module | type) -> SlimModelFamily | None:
    """The :class:`SlimModelFamily` of a stock or Slim* model (or class), or None for anything else."""
    cls = model if isinstance(model, type) else type(model)
    for family in SLIM_MODEL_FAMILIES:
        if cls is family.base or cls is SLIM_CLASSES[family.base]:
            return family
    return None


def as_slim_class(model: nn.Module, spec: SlimSpec) -> nn.Module:
    """Turn a slimmed stock model into its Slim* class (same object), record the spec in its config and guard its
    slimmed attention modules (:func:`guard_slim_attention`)."""
    guard_slim_attention(model, spec)  # every later processor switch on a slimmed module is translated or refused
    family = family_of(model)
    if family is not None:
        model.__class__ = SLIM_CLASSES[family.base]
        model.register_to_config(slimdiff_spec=spec.to_dict())
    return model  # other nn.Modules keep their class; their spec lives in .slimdiff_spec


def supported_for_pretrained(model: nn.Module) -> bool:
    """Whether ``model`` has a Slim* class (so ``save_pretrained`` and the single file keep its slim shapes)."""
    return family_of(model) is not None


__all__ = ["SLIM_CLASSES", "SLIM_MODEL_FAMILIES", "SlimChromaTransformer2DModel", "SlimCogView4Transformer2DModel",
           "SlimDiTTransformer2DModel", "SlimFluxTransformer2DModel", "SlimHunyuanDiT2DModel",
           "SlimLTXVideoTransformer3DModel", "SlimModelFamily", "SlimModelMixin", "SlimPixArtTransformer2DModel",
           "SlimQwenImageTransformer2DModel", "SlimSD3Transformer2DModel", "SlimUNet2DConditionModel",
           "SlimUNet2DModel", "SlimWanTransformer3DModel", "as_slim_class", "family_of", "find_sites",
           "make_slim_class"]
