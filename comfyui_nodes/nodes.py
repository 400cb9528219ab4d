"""The SlimDiff ComfyUI nodes (V3 schema API). Thin: each node checks its inputs, calls
``comfy_models`` / the core, and turns the result into ComfyUI outputs.

Interfaces are declared once, as data, in ``node_specs.py``; :func:`build_schema` turns them into
``io.Schema`` objects here.
"""
from __future__ import annotations

import logging
import os

from typing_extensions import override

import comfy.samplers
import folder_paths
from comfy_api.latest import ComfyExtension, io, ui

from slimdiff_diffusers.core import Calibration, save_slim_file
from slimdiff_diffusers.core.errors import BudgetError, CalibrationMismatchError, LoraMappingError
from slimdiff_diffusers.core.lora_mark import file_mark

from . import comfy_models
from . import lora as slim_lora
from .node_inputs import parse_prompt_list, slim_config_for
from .node_specs import (
    SLIM_CALIBRATE,
    SLIM_CALIBRATE_PROMPTS,
    SLIM_CALIBRATION,
    SLIM_LOAD_LORA,
    SLIM_LOAD_MODEL,
    SLIM_MODEL,
    SLIM_SAVE_MODEL,
    InputSpec,
    NodeSpec,
)

logger = logging.getLogger("slimdiff.comfyui")

SLIM_MODELS_FOLDER = "slim_models"
# Registered at import, like core model folders; users can add more paths with `slim_models:` in
# extra_model_paths.yaml.
folder_paths.add_model_folder_path(SLIM_MODELS_FOLDER, os.path.join(folder_paths.models_dir, SLIM_MODELS_FOLDER),
                                   is_default=True)
folder_paths.folder_names_and_paths[SLIM_MODELS_FOLDER][1].add(".safetensors")

SlimCalibrationIO = io.Custom(SLIM_CALIBRATION)

# ---------------------------------------------------------------------------------------------------
# Schema construction from the specs
# ---------------------------------------------------------------------------------------------------

_SOCKETS = {"MODEL": io.Model, "CLIP": io.Clip, "CONDITIONING": io.Conditioning, "LATENT": io.Latent,
            SLIM_CALIBRATION: SlimCalibrationIO}


def _options(name: str) -> list[str]:
    if name == "samplers":
        return list(comfy.samplers.KSampler.SAMPLERS)
    if name == "schedulers":
        return list(comfy.samplers.KSampler.SCHEDULERS)
    if name == "slim_models":
        return folder_paths.get_filename_list(SLIM_MODELS_FOLDER)
    if name == "loras":
        return folder_paths.get_filename_list("loras")
    raise KeyError(name)


def _input(spec: InputSpec):
    common = {"tooltip": spec.tooltip or None, "optional": spec.optional}
    if spec.type in _SOCKETS:
        return _SOCKETS[spec.type].Input(spec.name, **common)
    if spec.type == "INT":
        return io.Int.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step,
                            control_after_generate=spec.control_after_generate or None, **common)
    if spec.type == "FLOAT":
        return io.Float.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step,
                              round=spec.round, **common)
    if spec.type == "STRING":
        return io.String.Input(spec.name, default=spec.default, multiline=spec.multiline, **common)
    if spec.type == "BOOLEAN":
        return io.Boolean.Input(spec.name, default=spec.default, **common)
    if spec.type == "COMBO":
        options = list(spec.options) if isinstance(spec.options, tuple) else _options(spec.options)
        default = spec.default if spec.default in options else (options[0] if options else None)
        return io.Combo.Input(spec.name, options=options, default=default, **common)
    raise ValueError(f"unknown input type {spec.type!r} in the spec of {spec.name!r}")


def _output(name: str, type_: str, tooltip: str):
    cls = _SOCKETS[type_]
    return cls.Output(display_name=name, tooltip=tooltip or None)


def build_schema(spec: NodeSpec) -> io.Schema:
    """The V3 schema of a node from its declarative spec (called on every /object_info request, so the
    file list of the loader is always current)."""
    return io.Schema(
        node_id=spec.node_id,
        display_name=spec.display_name,
        category=spec.category,
        description=spec.description,
        inputs=[_input(i) for i in spec.inputs],
        outputs=[_output(o.name, o.type, o.tooltip) for o in spec.outputs],
        is_output_node=spec.is_output_node,
    )


# ---------------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------------


def _calibration_summary(calibration: Calibration) -> str:
    meta = calibration.meta
    comfy_meta = meta.get("comfyui", {})
    return (f"calibrated {len(calibration.sites.attention)} attentions + {len(calibration.sites.feed_forward)} "
            f"feed-forwards on {meta.get('num_forward_calls', '?')} diffusion model calls "
            f"({comfy_meta.get('runs', '?')} run(s) x {comfy_meta.get('steps', '?')} steps), "
            f"{calibration.nbytes / 2**20:.1f} MiB of statistics, {comfy_meta.get('seconds', '?')} s "
            f"(sampling {comfy_meta.get('sampling_seconds', '?')} s, propagation probe "
            f"{comfy_meta.get('probe_seconds', '?')} s)")


class SlimCalibrate(io.ComfyNode):
    """Calibrate by sampling with the given conditioning (the KSampler inputs)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(SLIM_CALIBRATE)

    @classmethod
    def execute(cls, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                positive, negative, latent_image) -> io.NodeOutput:
        calibration = comfy_models.calibrate_by_sampling(
            model, [(positive, negative)], latent_image,
            comfy_models.SamplingSettings(seed, steps, cfg, sampler_name, scheduler), SLIM_CALIBRATE.display_name)
        return io.NodeOutput(calibration, ui=ui.PreviewText(_calibration_summary(calibration)))


def _encode(clip, text: str):
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


class SlimCalibratePrompts(io.ComfyNode):
    """Calibrate over a list of prompts (one sampling run per prompt)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(SLIM_CALIBRATE_PROMPTS)

    @classmethod
    def execute(cls, model, clip, prompts: str, negative_prompt: str, seed: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, latent_image) -> io.NodeOutput:
        node = SLIM_CALIBRATE_PROMPTS.display_name
        prompt_list = parse_prompt_list(prompts)
        if not prompt_list:
            raise ValueError(f"{node}: the prompt list is empty. Write at least one prompt (one per line).")
        if clip is None:
            raise RuntimeError(f"{node}: the clip input is empty (None). If it comes from a checkpoint loader, the "
                               "checkpoint has no text encoder: load one with a CLIP loader node.")
        negative = _encode(clip, negative_prompt)
        conditionings = [(_encode(clip, text), negative) for text in prompt_list]
        calibration = comfy_models.calibrate_by_sampling(
            model, conditionings, latent_image,
            comfy_models.SamplingSettings(seed, steps, cfg, sampler_name, scheduler), node)
        return io.NodeOutput(calibration, ui=ui.PreviewText(_calibration_summary(calibration)))


class SlimModel(io.ComfyNode):
    """Slim a MODEL with a calibration; returns an independent, smaller MODEL."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(SLIM_MODEL)

    @classmethod
    def execute(cls, model, calibration: Calibration, keep_ratio: float, params_to_remove_millions: float,
                targets: str, **options: str) -> io.NodeOutput:
        # options: the SlimConfig combos (node_specs.SLIM_CONFIG_COMBOS), by name; absent in prompts made before
        # one was offered
        node = SLIM_MODEL.display_name
        if not isinstance(calibration, Calibration):
            raise TypeError(f"{node}: the calibration input is not a SlimDiff calibration ({type(calibration).__name__})")
        config = slim_config_for(keep_ratio, params_to_remove_millions, targets, **options)
        try:
            result = comfy_models.slim_model(model, calibration, config, node)
        except (BudgetError, CalibrationMismatchError) as exc:
            raise type(exc)(f"{node}: {exc}") from exc
        text = (f"{result.params_before / 1e6:.2f}M -> {result.params_after / 1e6:.2f}M parameters "
                f"({100 * result.params_after / max(result.params_before, 1):.1f}%), "
                f"{len(comfy_models.spec_of(result.model).attention)} attentions + "
                f"{len(comfy_models.spec_of(result.model).feed_forward)} feed-forwards slimmed in {result.seconds:.1f} s")
        if result.report is not None:  # the allocation it ran, with "auto" resolved for this model
            text += f"; allocation {result.report.allocation_summary}"
            if result.report.vo_readers_summary:  # the VO readers, where some were refit (vo_output_refit)
                text += f"; VO readers {result.report.vo_readers_summary}"
            if result.report.vo_bases_summary:  # the VO bases, where some kind used the attention outputs
                text += f"; VO bases {result.report.vo_bases_summary}"
            if result.report.ffn_channels_summary:  # ffn_selection, where some feed-forward was slimmed
                text += f"; feed-forward channels {result.report.ffn_channels_summary}"
        if result.baked_patches:
            text += f"; {result.baked_patches} weight patches (LoRA) baked in"
        logger.info("SlimDiff Slim: %s", text)
        return io.NodeOutput(slim_lora.install_guard(result.model), ui=ui.PreviewText(text))


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def _give_default_permissions(path: str) -> None:
    """Give a saved file the mode ComfyUI's own outputs get (0666 minus the umask, e.g. 0644).

    The atomic write goes through a temporary file, which ``tempfile.mkstemp`` creates as 0600; renaming keeps
    that mode, so without this a slim model would be unreadable to other users of a shared ComfyUI.
    """
    os.chmod(path, 0o666 & ~_current_umask())


class SlimSaveModel(io.ComfyNode):
    """Save a slimmed MODEL as one .safetensors file (output node)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(SLIM_SAVE_MODEL)

    @classmethod
    def execute(cls, model, filename_prefix: str, destination: str) -> io.NodeOutput:
        node = SLIM_SAVE_MODEL.display_name
        if destination == "slim_models":
            root = folder_paths.get_folder_paths(SLIM_MODELS_FOLDER)[0]
        elif destination == "output":
            root = folder_paths.get_output_directory()
        else:
            raise ValueError(f"{node}: destination must be 'slim_models' or 'output', got {destination!r}")
        state_dict, spec, fields = comfy_models.slim_file_contents(model, node)
        os.makedirs(root, exist_ok=True)
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, root)
        file_name = f"{filename}_{counter:05}_.safetensors"
        path = os.path.join(folder, file_name)
        save_slim_file(path, state_dict, spec, key_layout=fields.key_layout, base_config=fields.base_config,
                       metadata=fields.metadata)  # atomic: temp file + os.replace
        _give_default_permissions(path)
        relative = os.path.join(subfolder, file_name) if subfolder else file_name
        logger.info("SlimDiff: saved %s", path)
        return io.NodeOutput(ui={"text": [f"saved {destination}/{relative}"],
                                 "slim_models": [{"filename": file_name, "subfolder": subfolder, "type": destination}]})


class SlimLoadModel(io.ComfyNode):
    """Load a SlimDiff .safetensors file from models/slim_models."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(SLIM_LOAD_MODEL)

    @classmethod
    def fingerprint_inputs(cls, slim_name: str) -> str:
        return comfy_models.file_fingerprint(folder_paths.get_full_path(SLIM_MODELS_FOLDER, slim_name))

    @classmethod
    def validate_inputs(cls, slim_name: str) -> bool | str:
        # V3 combo values are not checked by ComfyUI's validation (0.3.64); taking slim_name here means we must.
        if folder_paths.get_full_path(SLIM_MODELS_FOLDER, slim_name) is None:
            folders = ", ".join(folder_paths.get_folder_paths(SLIM_MODELS_FOLDER))
            return f"{SLIM_LOAD_MODEL.display_name}: {slim_name!r} is not a file in slim_models ({folders})"
        return True

    @classmethod
    def execute(cls, slim_name: str) -> io.NodeOutput:
        node = SLIM_LOAD_MODEL.display_name
        path = folder_paths.get_full_path(SLIM_MODELS_FOLDER, slim_name)
        if path is None:
            raise FileNotFoundError(f"{node}: {slim_name!r} is not a file in slim_models")
        return io.NodeOutput(slim_lora.install_guard(comfy_models.load_slim_model(path, slim_name, node)))


class SlimLoadLora(io.ComfyNode):
    """Apply a LoRA made for the original model to a slim MODEL, mapped into the narrowed layers."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return build_schema(SLIM_LOAD_LORA)

    @classmethod
    def validate_inputs(cls, lora_name: str) -> bool | str:
        if folder_paths.get_full_path("loras", lora_name) is None:
            return f"{SLIM_LOAD_LORA.display_name}: {lora_name!r} is not a file in models/loras"
        return True

    @classmethod
    def execute(cls, model, lora_name: str, strength_model: float) -> io.NodeOutput:
        import comfy.utils

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if file_mark(path) is not None:  # made on a diffusers slim model: in its bases, never to be translated
            raise LoraMappingError(
                f"{SLIM_LOAD_LORA.display_name}: {lora_name!r} was made on a slim model in diffusers (its metadata "
                "carries SlimDiff's mark): its updates are in that model's slim bases, not the original's, so it "
                "cannot be mapped here. Load it in diffusers on the slim model it was made on")
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        patched, text = slim_lora.apply_lora(model, lora, strength_model)
        return io.NodeOutput(patched, ui=ui.PreviewText(text))


NODES: list[type[io.ComfyNode]] = [SlimCalibrate, SlimCalibratePrompts, SlimModel, SlimSaveModel, SlimLoadModel,
                                   SlimLoadLora]


class SlimDiffExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> SlimDiffExtension:
    return SlimDiffExtension()
