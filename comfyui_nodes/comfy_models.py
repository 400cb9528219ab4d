"""ComfyUI model handling for the SlimDiff nodes: family check, calibration by sampling, independent slim
copies, and rebuilding a slim model from a file. Imports ComfyUI; no compression maths here (that is
``slimdiff_diffusers.core``).
"""
from __future__ import annotations

import copy
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.sd
import comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from slimdiff_diffusers.core import (
    Calibration,
    CalibrationConfig,
    Calibrator,
    SlimConfig,
    SlimSpec,
    find_sites,
    load_slim_file,
    apply_plan,
    plan_slim,
)
from slimdiff_diffusers.core.basis_maps import basis_maps_from_plan
from slimdiff_diffusers.core.errors import SlimFileError, UnsupportedModelError
from slimdiff_diffusers.core.influence import group_influence_calls

from . import comfy_dit, slim_format
from .slim_ops import SlimOps

logger = logging.getLogger("slimdiff.comfyui")

SUPPORTED_FAMILIES = ("SD1.x, SD2.x and SDXL-family UNets (ComfyUI's UNetModel: SD15, SD20, SDXL, SDXLRefiner, SSD1B, "
                      f"...) and the transformer families {comfy_dit.SUPPORTED}")
_WRAPPER_KEY = "slimdiff_calibrate"


# ---------------------------------------------------------------------------------------------------
# Family check
# ---------------------------------------------------------------------------------------------------


def transformer_family(patcher: comfy.model_patcher.ModelPatcher) -> comfy_dit.ComfyTransformerFamily | None:
    """The SlimDiff transformer family of a MODEL (Flux, ...), or None for UNets and unsupported models."""
    model_config = patcher.model.model_config
    return comfy_dit.family_of_unet_config(model_config.unet_config, type(model_config).__name__)


def _attention_like_modules(module: nn.Module) -> list[str]:
    """Paths of the modules that hold attention projections, to name them when a family is refused."""
    names = ("qkv", "to_q", "q_linear", "to_qkv", "linear1", "w1q", "wqkv")
    return [path for path, m in module.named_modules() if any(isinstance(getattr(m, n, None), nn.Module) for n in names)]


def check_supported(patcher: comfy.model_patcher.ModelPatcher, node: str) -> None:
    """Raise :class:`UnsupportedModelError` unless the MODEL is a family SlimDiff supports (nothing has run)."""
    base = patcher.model
    family = type(base.model_config).__name__
    diffusion_model = getattr(base, "diffusion_model", None)
    if transformer_family(patcher) is not None:
        refusal = transformer_family(patcher).refusal(diffusion_model)
        if refusal:
            raise UnsupportedModelError(f"{node}: this {family} model cannot be slimmed exactly: {refusal}. Nothing "
                                        "was run.")
        if spec_of(patcher) is not None:
            # The view slices ComfyUI's fused layers at their stock sizes; a slim model's are narrower.
            raise UnsupportedModelError(f"{node}: this {family} model is already slim; calibrate and slim the "
                                        "original model (slimming twice is not supported for transformers)")
        return
    if not isinstance(diffusion_model, UNetModel):
        found = _attention_like_modules(diffusion_model) if isinstance(diffusion_model, nn.Module) else []
        listed = f" Its attention modules ({len(found)}, e.g. {', '.join(found[:3])}) have a layout SlimDiff " \
                 "does not map to its groups." if found else ""
        raise UnsupportedModelError(
            f"{node}: this model ({family}, diffusion model {type(diffusion_model).__name__}, image_model "
            f"{base.model_config.unet_config.get('image_model')!r}) is not supported.{listed} Nothing was run. "
            f"SlimDiff supports {SUPPORTED_FAMILIES}.")
    if base.model_config.unet_config.get("use_temporal_attention") or base.model_config.unet_config.get("use_temporal_resblock"):
        raise UnsupportedModelError(
            f"{node}: video UNets ({family}) are not supported. SlimDiff supports {SUPPORTED_FAMILIES}.")


def spec_of(patcher: comfy.model_patcher.ModelPatcher) -> SlimSpec | None:
    """The slim spec of a MODEL produced by SlimDiff Slim / Load Slim Model, else None."""
    return getattr(getattr(patcher.model, "diffusion_model", None), "slimdiff_spec", None)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------
# Calibration by sampling
# ---------------------------------------------------------------------------------------------------


@dataclass
class SamplingSettings:
    """The KSampler settings of a calibration run."""

    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str


def calibrate_by_sampling(model: comfy.model_patcher.ModelPatcher, conditionings: Sequence[tuple[Any, Any]],
                          latent: dict[str, Any], sampling: SamplingSettings, node: str,
                          config: CalibrationConfig | None = None) -> Calibration:
    """Sample once per (positive, negative) pair while the core Calibrator hooks the live UNet.

    The hooks are attached inside an APPLY_MODEL wrapper registered on a clone, so they see exactly the
    tree that runs (weights patched, on whatever device) and never outlive a forward pass; the input
    MODEL is not modified. Each run uses ``seed + i``. Every sampler step updates a ProgressBar, which is
    also ComfyUI's cancellation point.
    """
    if not conditionings:
        raise ValueError(f"{node}: nothing to calibrate on (no prompts)")
    check_supported(model, node)
    # The Calibrate node cannot know what the Slim nodes fed by its CALIBRATION will ask for (one calibration may be
    # slimmed several ways, and the node has no statistics options), so it collects what every Slim setting may
    # read: the head outputs of every attention too (vo_output_refit="attention_output" on a UNet; ~3% of sampling).
    config = config or CalibrationConfig(attention_output_statistics=True)
    patcher = model.clone()
    # Effective weights (LoRAs applied before this node) are what the fingerprint and statistics describe;
    # SlimDiff Slim loads the same way, so its compatibility check compares like with like.
    comfy.model_management.load_models_gpu([patcher], force_patch_weights=True)
    live_unet = patcher.model.diffusion_model
    family = transformer_family(patcher)
    views: dict[int, comfy_dit.View] = {}

    def view_of(diffusion_model: nn.Module) -> comfy_dit.View:
        # Transformers are calibrated through their diffusers-shaped view (comfy_dit): the core hooks the view,
        # taps on ComfyUI's modules feed it.
        if id(diffusion_model) not in views:
            views[id(diffusion_model)] = comfy_dit.build_view(diffusion_model, patcher.model.model_config.unet_config,
                                                              family)
        return views[id(diffusion_model)]

    calibrated = view_of(live_unet).root if family else live_unet
    calibrator = Calibrator(calibrated, config, record_calls=config.propagation_probe_calls)

    def apply_model_wrapper(executor, *args, **kwargs):
        # executor.class_obj is the live BaseModel; its diffusion_model is called inside executor().
        diffusion_model = executor.class_obj.diffusion_model
        if family is None:
            with calibrator.attach(diffusion_model):
                return executor(*args, **kwargs)
        view = view_of(diffusion_model)
        with calibrator.attach(view.root), view.tapped():
            return executor(*args, **kwargs)

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, _WRAPPER_KEY, apply_model_wrapper)

    sampling_steps = sampling.steps * len(conditionings)
    # One bar for the whole node: the sampler steps, then the propagation probe's and the group influence's
    # replayed calls.
    probe_calls = (len(calibrator.sites.blocks) + 1) * config.propagation_probe_calls
    if config.group_influence:
        probe_calls += group_influence_calls(calibrator.sites, config.propagation_probe_calls)
    total_steps = sampling_steps + probe_calls
    pbar = comfy.utils.ProgressBar(total_steps)
    started = time.perf_counter()
    latent_image = comfy.sample.fix_empty_latent_channels(patcher, latent["samples"])
    for index, (positive, negative) in enumerate(conditionings):
        seed = sampling.seed + index
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
        done = index * sampling.steps

        def on_step(step: int, _x0, _x, _total: int, done: int = done) -> None:
            # The ProgressBar hook checks for interruption only inside the server; check here too.
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update_absolute(done + step + 1, total_steps)

        comfy.sample.sample(patcher, noise, sampling.steps, sampling.cfg, sampling.sampler_name, sampling.scheduler,
                            positive, negative, latent_image, noise_mask=latent.get("noise_mask"),
                            callback=on_step, disable_pbar=True, seed=seed)
    probe_model = influence_model = None
    if calibrator.recorded_calls:
        # Measure each block's propagation factor by replaying recorded calls on the live UNet (re-loaded in
        # case sampling freed it), after sampling and without our statistics hooks.
        comfy.model_management.throw_exception_if_processing_interrupted()
        comfy.model_management.load_models_gpu([patcher], force_patch_weights=True)
        probe_model = patcher.model.diffusion_model
        # The group influence slims each group in place in the weights the live model computes with (restored
        # bit for bit after each group): a UNet's own layers, or a view built now, whose layers are slices of
        # the weights as loaded for this replay (a view from before a reload could hold stale tensors).
        influence_model = probe_model
        if family is not None:
            influence_model = comfy_dit.build_view(probe_model, patcher.model.model_config.unet_config, family).root
            probe_model = view_of(probe_model).probe_model()
        if not config.group_influence:
            influence_model = None
    sampled = time.perf_counter()

    def on_probe_call(done: int, total: int) -> None:
        # Every replayed UNet call is a cancellation point and a progress step.
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(sampling_steps + done, sampling_steps + total)

    calibration = calibrator.finalize(probe_model=probe_model, influence_model=influence_model, progress=on_probe_call)
    calibration.meta["comfyui"] = {
        "runs": len(conditionings), "steps": sampling.steps, "cfg": sampling.cfg, "sampler": sampling.sampler_name,
        "scheduler": sampling.scheduler, "seed": sampling.seed, "seconds": round(time.perf_counter() - started, 2),
        "sampling_seconds": round(sampled - started, 2), "probe_seconds": round(time.perf_counter() - sampled, 2),
        "model_config": type(patcher.model.model_config).__name__,
    }
    return calibration


# ---------------------------------------------------------------------------------------------------
# Independent slim copies
# ---------------------------------------------------------------------------------------------------

# BaseModel attributes ModelPatcher uses to track what is loaded where; a new model starts unloaded.
_LOAD_STATE = {"model_loaded_weight_memory": 0, "lowvram_patch_counter": 0, "model_lowvram": False,
               "current_weight_patches_uuid": None}


def _shallow_parameter_copy(base: nn.Module) -> nn.Module:
    """deepcopy of a BaseModel that shares every parameter tensor (new Parameter objects, same storage).

    Slimming then replaces only the layers it narrows, so untouched weights cost no memory, and the
    original module tree (shared by every clone of the input MODEL and by ComfyUI's cache) is never touched.
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.data, requires_grad=False) for p in base.parameters()}
    memo[id(base.model_config)] = base.model_config  # configuration object, shared like clones share it
    if getattr(base, "current_patcher", None) is not None:
        memo[id(base.current_patcher)] = None
    new_base = copy.deepcopy(base, memo)
    for module in new_base.modules():
        # Per-module flags ModelPatcher.load() sets while the *original* is loaded; on the copy they would
        # make load() skip patching or keep lowvram casting state that belongs to the original.
        if hasattr(module, "comfy_patched_weights"):
            del module.comfy_patched_weights
        comfy.model_patcher.wipe_lowvram_weight(module)
    for key, value in _LOAD_STATE.items():
        setattr(new_base, key, value)
    new_base.current_patcher = None
    return new_base


def _patcher_like(template: comfy.model_patcher.ModelPatcher, new_base: nn.Module) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher for ``new_base`` that keeps the template's options, wrappers, callbacks and object
    patches (attention patches, model_sampling, ...) but not its weight patches (already baked in)."""
    cloned = template.clone()  # ComfyUI's own way of copying every per-patcher collection
    patcher = comfy.model_patcher.ModelPatcher(new_base, load_device=template.load_device,
                                               offload_device=template.offload_device,
                                               weight_inplace_update=template.weight_inplace_update)
    for attr in ("model_options", "object_patches", "attachments", "additional_models", "callbacks", "wrappers",
                 "injections", "force_cast_weights"):
        setattr(patcher, attr, getattr(cloned, attr))
    keys = set(new_base.state_dict().keys())
    patcher.weight_wrapper_patches = {k: v for k, v in cloned.weight_wrapper_patches.items() if k in keys}
    dropped_hooks = [k for group in cloned.hook_patches.values() for k in group if k not in keys]
    if dropped_hooks:
        logger.warning("SlimDiff: %d hook (scheduled LoRA) patches target slimmed layers and are dropped; "
                       "apply LoRAs before SlimDiff Slim", len(dropped_hooks))
    patcher.hook_patches = {ref: {k: v for k, v in group.items() if k in keys} for ref, group in cloned.hook_patches.items()}
    patcher.patches_uuid = uuid.uuid4()
    return patcher


@dataclass
class SlimResult:
    model: comfy.model_patcher.ModelPatcher
    params_before: int
    params_after: int
    baked_patches: int
    seconds: float
    report: Any


def slim_model(model: comfy.model_patcher.ModelPatcher, calibration: Calibration, config: SlimConfig,
               node: str) -> SlimResult:
    """An independent, slimmed MODEL; ``model`` and its clones are left exactly as they were."""
    started = time.perf_counter()
    check_supported(model, node)
    # Bake weight patches (LoRAs applied before slimming) into the live tensors, as save_checkpoint does.
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    base = model.model
    family = transformer_family(model)
    if family is not None:
        # Plan and narrow on the diffusers-shaped view of the live model (its leaves share the live weights and
        # are replaced, never written to), then put the narrowed layers into an independent copy exactly as
        # the loader builds them from a file.
        view = comfy_dit.build_view(base.diffusion_model, base.model_config.unet_config, family)
        # Separate q/k and v/o widths: the fused layers pad both back to the head width with zeros, so ComfyUI's
        # attention keeps the original softmax scale (the uniform layout exists for UNets' narrow attention).
        config = SlimConfig.resolve(config, head_layout="separate")
        plan = plan_slim(view.root, calibration, config, basis_maps=True)
        apply_plan(view.root, plan, check=False)
        new_base = _shallow_parameter_copy(base)
        comfy_dit.install_slim_layers(view, new_base.diffusion_model, view.root.slimdiff_spec)
        new_base.diffusion_model.slimdiff_spec = view.root.slimdiff_spec
        new_base.diffusion_model.slimdiff_report = getattr(view.root, "slimdiff_report", None)
        # In diffusers' names, like the spec: SlimDiff Load LoRA splits ComfyUI's fused patches into those layers.
        new_base.diffusion_model.slimdiff_basis_maps = basis_maps_from_plan(plan, model.model_dtype())
    else:
        # Plan on the live model (read only), then narrow an independent copy that shares the untouched tensors.
        # basis_maps: what SlimDiff Load LoRA maps LoRAs made for the original model through (kept on the CPU)
        plan = plan_slim(base.diffusion_model, calibration, config, basis_maps=True)
        new_base = _shallow_parameter_copy(base)
        apply_plan(new_base.diffusion_model, plan, check=False)  # same weights as the live model: checked by the plan
        new_base.diffusion_model.slimdiff_basis_maps = basis_maps_from_plan(plan, model.model_dtype())
    new_base.to(model.offload_device)  # a fresh ModelPatcher expects its model on the offload device
    new_base.device = model.offload_device
    patcher = _patcher_like(model, new_base)
    return SlimResult(
        model=patcher,
        params_before=count_parameters(base.diffusion_model),
        params_after=count_parameters(new_base.diffusion_model),
        baked_patches=len(model.patches),
        seconds=time.perf_counter() - started,
        report=getattr(new_base.diffusion_model, "slimdiff_report", None),
    )


# ---------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------


def slim_file_contents(model: comfy.model_patcher.ModelPatcher, node: str
                       ) -> tuple[dict[str, torch.Tensor], SlimSpec, slim_format.SlimFileFields]:
    """(state dict, spec, base-model fields) to write for a slimmed MODEL, with all patches baked in."""
    spec = spec_of(model)
    if spec is None:
        raise ValueError(f"{node}: this MODEL is not a SlimDiff model (it has no slim spec). Connect the output of "
                         "SlimDiff Slim or SlimDiff Load Slim Model; to save a regular model use ModelSave.")
    from .lora import check_weight_patches  # LoRAs of the original shapes would be skipped, not saved

    check_weight_patches(model, node)
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    base = model.model
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in base.diffusion_model.state_dict().items()}
    try:
        import comfyui_version  # ComfyUI's root module; absent in embedded setups
        version = comfyui_version.__version__
    except ImportError:
        version = None
    fields = slim_format.comfy_file_fields(base.model_config.unet_config, type(base.model_config).__name__,
                                           base.model_type.name, type(base.latent_format).__name__, version)
    family = transformer_family(model)
    if family is not None:
        # Transformer families are written in diffusers' names (the spec names diffusers' modules; ComfyUI's are
        # fused), with the diffusers config, so the file loads in diffusers as well as here.
        unet_config = dict(base.model_config.unet_config)
        try:
            diffusers_config = family.to_diffusers_config(unet_config)
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedModelError(f"{node}: this {family.name} model has no diffusers counterpart ({exc})") from exc
        state_dict = {k: v for k, v in state_dict.items() if k not in family.comfy_only}
        state_dict = slim_format.comfy_to_dit_state(state_dict, spec, comfy_dit.key_map_of(family, unet_config),
                                                    "the slim model")
        fields = slim_format.SlimFileFields(slim_format.LAYOUT_DIFFUSERS, diffusers_config, fields.metadata)
    return state_dict, spec, fields


def _diffusers_to_ldm(state_dict: dict[str, torch.Tensor], spec: SlimSpec, info: slim_format.BaseModelInfo,
                      file_name: str) -> tuple[dict[str, torch.Tensor], SlimSpec]:
    """A diffusers-layout file in ComfyUI's ("ldm") key names, renamed with ComfyUI's own key map.

    The map depends on the UNet config: ComfyUI's detection of diffusers UNets (it reads only unslimmed shapes
    and knows the standard SD1.x/2.x/XL sizes), else the diffusers config the file records.
    """
    model_config = comfy.model_detection.model_config_from_diffusers_unet(state_dict)
    if model_config is None and info.base_config.get("block_out_channels"):
        try:
            unet_config = slim_format.ldm_unet_config_from_diffusers(info.base_config)
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedModelError(f"{file_name}: cannot map the recorded diffusers UNet config to ComfyUI "
                                        f"({exc}). SlimDiff in ComfyUI supports {SUPPORTED_FAMILIES}.") from exc
        model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if model_config is None:
        raise UnsupportedModelError(f"{file_name}: ComfyUI does not recognise the diffusers UNet this file was "
                                    f"slimmed from. SlimDiff in ComfyUI supports {SUPPORTED_FAMILIES}.")
    key_map = comfy.utils.unet_to_diffusers(model_config.unet_config)
    return (slim_format.rename_state_dict(state_dict, key_map, file_name),
            slim_format.rename_spec(spec, key_map, file_name))


def _check_loaded(unet: nn.Module, spec: SlimSpec, file_keys: set[str], file_name: str) -> None:
    """Refuse a model that does not hold exactly the file's tensors, in the widths its spec records.

    ComfyUI's loader loads with ``strict=False`` and only logs missing or unexpected keys, which would leave
    uninitialised layers in a model that samples noise; a slim file always holds the whole UNet.
    """
    unsized = [name for name, m in unet.named_modules() if isinstance(m, SlimOps.Linear) and m.weight is None]
    model_keys = set(unet.state_dict())
    missing = sorted((model_keys - file_keys) | {f"{name}.weight" for name in unsized})
    unexpected = sorted(file_keys - model_keys - {f"{name}.weight" for name in unsized})
    if missing or unexpected:
        raise SlimFileError(f"{file_name} does not match the model ComfyUI detected from it "
                            f"({type(unet).__name__}): {len(missing)} tensors missing {missing[:3]}, "
                            f"{len(unexpected)} unexpected {unexpected[:3]}")
    wrong = []
    for path, attention in spec.attention.items():
        try:
            attn = unet.get_submodule(path)
            widths = {"to_q": attention.qk_width, "to_k": attention.qk_width, "to_v": attention.vo_width}
            ok = getattr(attn, "heads", None) == attention.heads and all(
                getattr(attn, name).out_features == attention.heads * width for name, width in widths.items()
            ) and attn.to_out[0].in_features == attention.heads * attention.vo_width
        except (AttributeError, TypeError):
            ok = False
        if not ok:
            wrong.append(path)
    sites = {site.name: site for site in find_sites(unet).feed_forward}
    for path, ff in spec.feed_forward.items():
        site = sites.get(path)
        if site is None or site.inner_dim != ff.width or site.gated != ff.gated:
            wrong.append(path)
    if wrong:
        raise SlimFileError(f"{file_name}: {len(wrong)} slimmed modules do not have the heads and widths its slim "
                            f"spec records, e.g. {wrong[:3]} (damaged or edited file, or another base model)")


def load_slim_model(path: str, file_name: str, node: str) -> comfy.model_patcher.ModelPatcher:
    """Load a slim file through ComfyUI's own diffusion-model loader.

    ComfyUI detects the family, picks the dtypes, builds the stock UNet and returns its ModelPatcher; the
    narrowed layers get their shapes from the file through :class:`SlimOps` (``custom_operations``, as
    ComfyUI-GGUF loads quantised weights). Our own code is only what ComfyUI has no hook for: renaming a
    diffusers-layout file (ComfyUI's loader does not know non-standard diffusers UNets, and the spec must be
    renamed with the weights), the uniform head layout, the checks of what ComfyUI loads with ``strict=False``,
    the model type the file records, and the spec the Save node and Slim's checks read.
    """
    try:
        state_dict, spec, metadata = load_slim_file(path)
    except SlimFileError as exc:
        raise SlimFileError(f"{node}: {file_name} is not a valid SlimDiff file: {exc}") from exc
    except Exception as exc:  # e.g. a truncated download: safetensors raises its own error types
        raise SlimFileError(f"{node}: cannot read {file_name} as a SlimDiff file ({type(exc).__name__}: {exc})") from exc
    info = slim_format.read_base_model_info(metadata, file_name)
    unsupported = slim_format.unsupported_class(info.base_config)
    if unsupported is not None:  # checked before ComfyUI builds anything: the UNet path would fail obscurely
        raise UnsupportedModelError(
            f"{node}: {file_name} holds a slim {unsupported} (saved by SlimDiff's diffusers side); SlimDiff in "
            f"ComfyUI loads {SUPPORTED_FAMILIES}. Load this file with diffusers instead "
            "(slimdiff_diffusers.load_slim_model_file, or the slim pipeline folder with DiffusionPipeline.from_pretrained)")
    if slim_format.transformer_family(info.base_config) is not None:
        return _load_transformer(state_dict, spec, info, file_name, node)
    if info.key_layout == slim_format.LAYOUT_DIFFUSERS:
        state_dict, spec = _diffusers_to_ldm(state_dict, spec, info, file_name)
    # ComfyUI's attention backends need one per-head width: convert "separate" layouts (diffusers side). The
    # softmax-scale correction is folded into to_q, so the stock CrossAttention computes the original logits.
    state_dict, spec = slim_format.to_uniform_layout_state(state_dict, spec)

    file_keys = set(state_dict)
    patcher = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options={"custom_operations": SlimOps})
    if patcher is None:
        raise UnsupportedModelError(f"{node}: ComfyUI does not recognise the model {file_name} was slimmed from. "
                                    f"SlimDiff in ComfyUI supports {SUPPORTED_FAMILIES}.")
    base = patcher.model
    detected = type(base.model_config).__name__
    if info.model_config_name and detected != info.model_config_name:
        raise SlimFileError(f"{node}: {file_name} was slimmed from a {info.model_config_name} model, but ComfyUI "
                            f"detects {detected} from its tensors; this ComfyUI version cannot load it as saved")
    if not isinstance(base.diffusion_model, UNetModel):
        raise UnsupportedModelError(f"{node}: {file_name}: base model {detected} is not supported; SlimDiff "
                                    f"supports {SUPPORTED_FAMILIES}.")
    try:
        _check_loaded(base.diffusion_model, spec, file_keys, file_name)
    except SlimFileError as exc:
        raise SlimFileError(f"{node}: {exc}") from exc
    if info.model_type and info.model_type != base.model_type.name:
        # The loader has no model-type option; e.g. a v-prediction fine-tune saved after ModelSamplingDiscrete.
        base.model_type = comfy.model_base.ModelType[info.model_type]
        base.model_sampling = comfy.model_base.model_sampling(base.model_config, base.model_type)
    base.diffusion_model.slimdiff_spec = spec  # what spec_of() reads (Save node, Slim's structure check)
    return patcher


def _load_transformer(state_dict: dict[str, torch.Tensor], spec: SlimSpec, info: slim_format.BaseModelInfo,
                      file_name: str, node: str) -> comfy.model_patcher.ModelPatcher:
    """Load a transformer-family slim file (always in diffusers' key layout) as ComfyUI's own model.

    ComfyUI builds the model (its model config class, dtypes, ``SlimOps`` through ``custom_operations``, its
    ``load_model_weights``); we give it the ``unet_config`` instead of letting it detect one, because ComfyUI's
    detection of Flux hard-codes Flux-dev's sizes (hidden 3072, 24 heads, T5 width 4096) and
    ``load_diffusion_model_state_dict`` takes no config. Then the fused layers get their slim layouts.
    """
    family_name = slim_format.transformer_family(info.base_config)
    family = comfy_dit.family_by_name(family_name)
    if family is None:
        raise UnsupportedModelError(f"{node}: {file_name} holds a slim {family_name} transformer; SlimDiff in "
                                    f"ComfyUI supports {SUPPORTED_FAMILIES}.")
    try:
        unet_config = family.from_diffusers_config(info.base_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedModelError(f"{node}: {file_name}: its {family.name} config cannot be built by ComfyUI "
                                    f"({exc})") from exc
    key_map = comfy_dit.key_map_of(family, unet_config)
    try:
        comfy_sd, layouts = slim_format.dit_to_comfy_state(state_dict, spec, key_map, file_name)
    except SlimFileError as exc:
        raise SlimFileError(f"{node}: {exc}") from exc
    if family.detect:  # ComfyUI's own detection reads this family's config from tensors slimming keeps whole
        unet_config = comfy.model_detection.detect_unet_config(comfy_sd, "")
        if unet_config is None:
            raise UnsupportedModelError(f"{node}: ComfyUI does not recognise {file_name}'s {family.name} model")
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, comfy_sd)
    if model_config is None:
        raise UnsupportedModelError(f"{node}: this ComfyUI version has no model for {file_name}'s {family.name} "
                                    "config")
    # The steps of comfy.sd.load_diffusion_model_state_dict after its detection, with ComfyUI's own choices.
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    parameters = comfy.utils.calculate_parameters(comfy_sd)
    unet_dtype = comfy.model_management.unet_dtype(model_params=parameters,
                                                   supported_dtypes=list(model_config.supported_inference_dtypes),
                                                   weight_dtype=comfy.utils.weight_dtype(comfy_sd))
    manual_cast_dtype = comfy.model_management.unet_manual_cast(unet_dtype, load_device,
                                                                model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    model_config.custom_operations = SlimOps
    base = model_config.get_model(comfy_sd, "")
    base = base.to(offload_device)
    file_keys = set(comfy_sd)
    base.load_model_weights(comfy_sd, "")
    unsized = [name for name, m in base.diffusion_model.named_modules()
               if isinstance(m, SlimOps.Linear) and m.weight is None]
    model_keys = set(base.diffusion_model.state_dict())
    missing = sorted((model_keys - file_keys - set(family.comfy_only)) | {f"{name}.weight" for name in unsized})
    unexpected = sorted(file_keys - model_keys)
    if missing or unexpected:
        raise SlimFileError(f"{node}: {file_name} does not match ComfyUI's {family.name} model of its config: "
                            f"{len(missing)} tensors missing {missing[:3]}, {len(unexpected)} unexpected "
                            f"{unexpected[:3]}")
    try:
        comfy_dit.apply_layouts(base.diffusion_model, layouts)
    except (TypeError, ValueError) as exc:
        raise SlimFileError(f"{node}: {file_name}: {exc}") from exc
    if info.model_type and info.model_type != base.model_type.name:
        base.model_type = comfy.model_base.ModelType[info.model_type]
        base.model_sampling = comfy.model_base.model_sampling(base.model_config, base.model_type)
    base.diffusion_model.slimdiff_spec = spec
    return comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)


def file_fingerprint(path: str | None) -> str:
    """Changes whenever the file is replaced or rewritten (ComfyUI re-runs the loader then)."""
    if path is None or not os.path.exists(path):
        return "missing"
    stat = os.stat(path)
    return f"{stat.st_mtime_ns}:{stat.st_size}"
