"""The Hub model card of a slim model: one writer for ``pipe.push_to_hub``, ``slimdiff slim`` and ``slimdiff push``.

The card is a ``huggingface_hub.ModelCard`` whose metadata is a ``ModelCardData`` (``base_model``,
``library_name: diffusers``, ``pipeline_tag``, tags, the base model's licence) and whose body tells a reader what
was done (budget, parameters and FLOPs before/after, measured quality and latency, calibration settings) and how
to load the result in diffusers and ComfyUI.

What the card states is gathered in :class:`SlimCardFacts`, which is also stored in the card's metadata under the
``slimdiff`` key. That makes a card re-renderable (``slimdiff push`` fills in the repo id) and lets a pipeline
loaded back from a SlimDiff folder be pushed with its measurements intact.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..core.io_utils import atomic_path
from ..core.report import describe_allocation, describe_ffn_selection, describe_vo_output_refit, describe_vo_statistics
from ..core.spec import SlimSpec
from .base_model import BaseModelInfo, resolve_base_model
from .layout import CARD_NAME, COMFYUI_MODELS_SUBFOLDER, GRID_IMAGE, RANKS_IMAGE, SINGLE_FILE_NAME

logger = logging.getLogger("slimdiff")

PROJECT_URL = "https://github.com/slimdiff/slimdiff-diffusers"
CARD_TAGS = ("slimdiff", "diffusers", "low-rank", "compressed", "training-free")
REPO_ID_PLACEHOLDER = "<repo_id>"  # in a card written before the repo is known (slimdiff slim)
_METADATA_KEY = "slimdiff"
_FACTS_VERSION = 1


@dataclass
class SlimCardFacts:
    """Everything a SlimDiff card states about the slim model, as plain data (stored in the card's metadata).

    ``None`` means "not recorded" (e.g. no quality measurement after ``pipe.slim``); the card then says how to
    measure it instead of printing a number.
    """

    slimdiff_version: str
    kind: str  # "pipeline" or "model"
    denoiser_class: str
    denoiser_name: str = "unet"  # the pipeline component that was slimmed
    family: str = ""  # "UNet", "Flux", "SD3", "PixArt" (models.SLIM_MODEL_FAMILIES); "" in cards of SlimDiff <= 0.1 UNets
    pipeline_class: str | None = None
    pipeline_tag: str | None = None
    base_description: str = "an unknown model"
    spec_sha256: str = ""
    budget: dict[str, Any] | None = None  # keep_ratio / params_to_remove, budget ("params"/"flops"), targets, ...
    params_before: int | None = None
    params_after: int | None = None
    compressible_params_before: int | None = None
    compressible_params_after: int | None = None
    flops_before: float | None = None  # multiply-accumulates of the compressible layers per sample row
    flops_after: float | None = None
    calibration: dict[str, Any] | None = None  # prompts, steps, guidance_scale, seed, slimset_sha256 (or reused)
    quality: dict[str, Any] | None = None  # psnr_db, ssim, eps_relative_error, adherence, prompts, steps, ...
    latency: dict[str, Any] | None = None  # unet_ms {original, slim}, speedup, seconds_per_image, device, ...
    images: dict[str, str] = field(default_factory=dict)  # {"grid": path in repo, "ranks": path in repo}
    single_file: str | None = None  # the ComfyUI single file's name in the repo
    repo_id: str | None = None  # the repo the card was rendered for (None: not known yet)
    version: int = _FACTS_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlimCardFacts | None:
        """The facts stored in a card, or None for a card of another (or a newer, unknown) version."""
        if not isinstance(data, dict) or data.get("version") != _FACTS_VERSION:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError:
            return None


# --------------------------------------------------------------------------------------------------
# Gathering the facts
# --------------------------------------------------------------------------------------------------


def slimset_sha256(prompts: list[str]) -> str:
    """SHA-256 of the SlimSet prompts, one per line in selection order (identifies the calibration set)."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def spec_sha256(spec: SlimSpec) -> str:
    return hashlib.sha256(spec.to_json().encode("utf-8")).hexdigest()


def pipeline_tag_for(pipeline_class: str | None, denoiser: nn.Module) -> str | None:
    """The Hub task of a pipeline class (by diffusers' naming), or of a bare denoiser."""
    name = pipeline_class or ""
    if pipeline_class is None:  # a model repository: the task of the pipelines the denoiser serves
        get = getattr(getattr(denoiser, "config", {}), "get", lambda k, d=None: d)
        conditional = any(get(k) for k in ("cross_attention_dim", "joint_attention_dim", "caption_channels"))
        return "text-to-image" if conditional else "unconditional-image-generation"
    if "Video" in name or "Vid" in name:
        return "image-to-video" if ("Img2Vid" in name or "ImageToVideo" in name) else "text-to-video"
    if "Audio" in name or "Music" in name:
        return "text-to-audio"
    if any(k in name for k in ("Img2Img", "Inpaint", "InstructPix2Pix", "Upscale", "Depth2Img", "ImageVariation")):
        return "image-to-image"
    if name in ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline", "ScoreSdeVePipeline", "KarrasVePipeline",
                "LDMPipeline", "DiTPipeline", "DanceDiffusionPipeline", "ConsistencyModelPipeline"):
        return "unconditional-image-generation"
    return "text-to-image"


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _params_before_from_spec(model: nn.Module, spec: SlimSpec) -> tuple[int, int, int]:
    """(model, compressible before, compressible after) parameter counts of a slim model that has no report.

    The original is the stock class of the model's config built on the ``meta`` device (shapes only, no memory).
    "Compressible" counts the tensors the spec narrows (``core.slim_state.expected_slim_shapes``, the one owner of
    that list, for every family: UNet attention and FFNs, joint and single-stream attention, Flux's
    ``proj_mlp``/``proj_out``), less q/k of attentions whose QK is not a group (``qk_decomposable``); output
    biases do not depend on the ranks and are not counted, as in ``core.slim``'s report. A model slimmed with
    ``targets`` or ``exclude`` leaving out groups the spec still lists at full width counts those as compressible.
    """
    import torch

    from ..core.sites import find_sites
    from ..core.slim_state import expected_slim_shapes
    from ..diffusers_adapter.models import family_of

    family = family_of(model)
    if family is None:
        raise ValueError(f"{type(model).__name__} is not a SlimDiff model class; cannot count its original size")
    config = {k: v for k, v in dict(model.config).items() if k != "slimdiff_spec" and not k.startswith("_")}
    with torch.device("meta"):
        original = family.base.from_config(config)
    slim_tensors = dict(model.state_dict())
    original_tensors = dict(original.state_dict())
    narrowed = expected_slim_shapes(spec, {k: tuple(v.shape) for k, v in slim_tensors.items()}, type(model).__name__)
    # An attention whose QK cannot be decomposed (QK-norm, RoPE: Flux, SD3.5) keeps q/k whole: not compressible.
    whole_qk = tuple(f"{site.name}.{name}." for site in find_sites(original).attention if not site.qk_decomposable
                     for name in ("to_q", "to_k", "add_q_proj", "add_k_proj"))
    keys = [k for k in narrowed if k in slim_tensors and not k.startswith(whole_qk)]
    before = sum(original_tensors[k].numel() for k in keys)
    after = sum(slim_tensors[k].numel() for k in keys)
    return _count_params(original), before, after


def _model_spec(denoiser: nn.Module) -> SlimSpec:
    spec = getattr(denoiser, "slimdiff_spec", None)
    if spec is None:
        spec_dict = getattr(getattr(denoiser, "config", None), "get", lambda k, d=None: d)("slimdiff_spec")
        if spec_dict is None:
            raise ValueError(f"this {type(denoiser).__name__} is not slimmed (no slimdiff_spec); slim it first")
        spec = SlimSpec.from_dict(spec_dict)
    return spec


def _version() -> str:
    from .. import __version__

    return __version__


def collect_card_facts(denoiser: nn.Module, *, pipeline: Any | None = None, denoiser_name: str = "unet",
                       report: Any | None = None, comparison: Any | None = None,
                       measured_on: dict[str, Any] | None = None, images: dict[str, str] | None = None,
                       single_file: str | None = None, base: BaseModelInfo | None = None) -> SlimCardFacts:
    """The facts of a slim ``denoiser`` (and its ``pipeline``, for a pipeline repository).

    Args:
        report: a ``PipelineSlimReport`` (``pipe.slim``: calibration settings and the slimming report) or a core
            ``SlimReport`` (``slim(model, ...)``); None for a model loaded from disk (sizes come from its spec).
        comparison: an ``evaluation.Comparison`` (quality and latency measured against the original).
        measured_on: where the latency was measured: ``{"device": ..., "threads": ..., "dtype": ...}``.
        images: paths in the repository of the pictures written next to the card (see ``hub.layout``).
        single_file: the name of the ComfyUI single file in the repository, if one is uploaded.
    """
    spec = _model_spec(denoiser)
    slim_report = getattr(report, "slim", report) if report is not None else getattr(denoiser, "slimdiff_report", None)
    pipeline_class = type(pipeline).__name__ if pipeline is not None else None
    facts = SlimCardFacts(
        slimdiff_version=_version(), kind="pipeline" if pipeline is not None else "model",
        denoiser_class=type(denoiser).__name__, denoiser_name=denoiser_name,
        family=getattr(denoiser, "slimdiff_family", ""), pipeline_class=pipeline_class,
        pipeline_tag=pipeline_tag_for(pipeline_class, denoiser), spec_sha256=spec_sha256(spec),
        images=dict(images or {}), single_file=single_file,
        base_description=(base or BaseModelInfo()).description)
    if slim_report is not None:
        config = dict(slim_report.config or {})
        facts.budget = {k: config.get(k) for k in ("keep_ratio", "params_to_remove", "budget", "targets",
                                                   "head_layout", "allocation", "allocation_refinement",
                                                   "ffn_selection")}
        # what the allocation ran ("auto" resolved for this model; None for the uniform allocation)
        facts.budget["allocation_refinement_used"] = getattr(slim_report, "allocation_refinement", None)
        # how the group influences were obtained ("auto" resolved); only written where recorded, so older cards
        # read (and re-render) as before
        if getattr(slim_report, "propagation", None):
            facts.budget["propagation_used"] = slim_report.propagation
        # how the VO readers were fit, per attention kind; only written where some were refit, so cards of models
        # without refit readers read (and re-render) as before
        refits = dict(getattr(slim_report, "vo_output_refit", None) or {})
        if describe_vo_output_refit(refits):
            facts.budget["vo_output_refit_used"] = refits
        # what whitened the VO bases, per attention kind; only written where some kind used the attention outputs
        statistics = dict(getattr(slim_report, "vo_statistics", None) or {})
        if describe_vo_statistics(statistics):
            facts.budget["vo_statistics_used"] = statistics
        facts.params_before, facts.params_after = int(slim_report.params_before), int(slim_report.params_after)
        facts.compressible_params_before = int(slim_report.compressible_params_before)
        facts.compressible_params_after = int(slim_report.compressible_params_after)
        facts.flops_before, facts.flops_after = float(slim_report.flops_before), float(slim_report.flops_after)
    else:
        facts.params_before, facts.compressible_params_before, facts.compressible_params_after = \
            _params_before_from_spec(denoiser, spec)
        facts.params_after = _count_params(denoiser)
    if report is not None and hasattr(report, "num_inference_steps"):  # a PipelineSlimReport
        prompts = list(getattr(report, "prompts", []) or [])
        facts.calibration = {"prompts": int(report.num_prompts), "steps": int(report.num_inference_steps),
                             "guidance_scale": None if report.guidance_scale is None else float(report.guidance_scale),
                             "seed": getattr(report, "seed", None),
                             "slimset_sha256": slimset_sha256(prompts) if prompts else None,
                             "reused": not prompts}
    if comparison is not None:
        c = comparison
        facts.quality = {"psnr_db": float(c.psnr_db), "ssim": float(c.ssim),
                         "eps_relative_error": float(c.eps_relative_error),
                         "adherence": ({k: float(v["mean"]) for k, v in c.adherence.items()} if c.adherence else None),
                         "prompts": len(c.prompts), "steps": c.settings.get("num_inference_steps"),
                         "guidance_scale": c.settings.get("guidance_scale")}
        facts.latency = {"unet_ms": {k: float(v) for k, v in c.unet_latency_ms.items()},
                         "speedup": float(c.speedup),
                         "seconds_per_image": {k: float(v) for k, v in c.image_seconds.items()},
                         **(measured_on or {})}
        facts.quality, facts.latency = _rounded(facts.quality), _rounded(facts.latency)
    return facts


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _ratio(after: float | None, before: float | None) -> str:
    return f"{after / before:.1%}" if after is not None and before else "–"


def _num(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:,.0f}"


def _budget_sentence(facts: SlimCardFacts) -> str:
    b = facts.budget
    if not b:
        kept = _ratio(facts.compressible_params_after, facts.compressible_params_before)
        return (f"Budget: not recorded with this model (it was loaded from disk); {kept} of the compressible "
                "parameters are kept.")
    what = "multiply-accumulates (FLOPs)" if b.get("budget") == "flops" else "parameters"
    if b.get("keep_ratio") is not None:
        head = f"Budget: keep **{b['keep_ratio']:.0%}** of the compressible {what}"
    elif b.get("params_to_remove") is not None:
        head = f"Budget: remove **{b['params_to_remove']:,}** parameters"
    else:
        head = "Budget: per-group ranks given explicitly (`rank_pattern`)"
    targets = ", ".join(str(t).upper() for t in (b.get("targets") or []))
    # Cards written before the refinement was recorded have no "allocation_refinement_used": their wording stays
    # (rerender_for_repo compares bodies).
    allocation = describe_allocation(b.get("allocation"), b.get("allocation_refinement_used"),
                                     b.get("allocation_refinement"), b.get("propagation_used"))
    readers = describe_vo_output_refit(b.get("vo_output_refit_used"))
    bases = describe_vo_statistics(b.get("vo_statistics_used"))
    channels = describe_ffn_selection(b.get("ffn_selection")) if "ffn" in (b.get("targets") or []) else None
    return (f"{head} (attention query-key and value-output, feed-forward; slimmed groups: {targets}; "
            f"head layout `{b.get('head_layout')}`, allocation `{allocation}`)."
            + (f" The value-output bases were {bases}." if bases else "")
            + (f" The value-output readers were {readers}." if readers else "")
            + (f" The feed-forward channels were {channels}." if channels else ""))


def _body(facts: SlimCardFacts, base: BaseModelInfo) -> str:
    repo = facts.repo_id or REPO_ID_PLACEHOLDER
    den = facts.denoiser_name
    # Transformer families get their name in the text ("its Flux transformer"); UNet cards keep the wording of
    # the first version, so cards written by it still re-render (rerender_for_repo compares bodies).
    is_transformer = den != "unet"
    den_named = f"{facts.family} {den}" if is_transformer and facts.family else den
    lines: list[str] = []
    if facts.repo_id:
        title = facts.repo_id.split("/")[-1]
    else:
        title = f"{base.hub_id.split('/')[-1]}, slimmed" if base.hub_id else f"Slim {facts.pipeline_class or facts.denoiser_class}"
    lines += [f"# {title}", ""]
    if base.hub_id:
        origin = f"[`{base.hub_id}`](https://huggingface.co/{base.hub_id})"
    else:
        origin = base.description
    lines += [f"A slimmed version of {origin}, made with [SlimDiff]({PROJECT_URL}) {facts.slimdiff_version}: the "
              f"attention (query-key, value-output) and feed-forward weights of its {den_named} were replaced by "
              "physically narrower layers computed in closed form from activation statistics over the denoising "
              "timesteps. No training or fine-tuning was done. The other components are unchanged.", ""]
    if not base.hub_id:
        lines += [f"**Base model: unknown on the Hub.** It was slimmed from {base.description}, which has no Hub id, "
                  "so the metadata has no `base_model` and this model is not listed under a base model."
                  + ("" if base.license else " Its licence is not known either: check the original's terms before "
                     "using or sharing this model."), ""]
    elif not base.license:
        lines += ["The base model's licence could not be read (its model card was not available when this card was "
                  "written): the base model's licence applies; see its page.", ""]

    lines += ["## Size", "", _budget_sentence(facts), "",
              "| | original | slim | kept |", "|---|---:|---:|---:|",
              f"| parameters ({den}) | {_num(facts.params_before)} | {_num(facts.params_after)} | "
              f"{_ratio(facts.params_after, facts.params_before)} |",
              f"| compressible parameters (attention + feed-forward) | {_num(facts.compressible_params_before)} | "
              f"{_num(facts.compressible_params_after)} | "
              f"{_ratio(facts.compressible_params_after, facts.compressible_params_before)} |",
              f"| compressible FLOPs (multiply-accumulates per sample) | {_num(facts.flops_before)} | "
              f"{_num(facts.flops_after)} | {_ratio(facts.flops_after, facts.flops_before)} |", ""]

    lines += ["## Quality and speed", ""]
    q, lat = facts.quality, facts.latency
    if q and lat:
        call = "one call as the pipeline makes it" if is_transformer else "one CFG call"
        lines += [f"Measured by `slimdiff slim` against the original on {q['prompts']} held-out prompts (same prompts "
                  f"and seeds, {q['steps']} steps, guidance {q['guidance_scale']}).", "",
                  "| metric | original | slim |", "|---|---:|---:|",
                  f"| {den} latency, {call} (ms, median) | {lat['unet_ms']['original']:.2f} | "
                  f"{lat['unet_ms']['slim']:.2f} ({lat['speedup']:.2f}x) |",
                  f"| seconds per image (whole pipeline) | {lat['seconds_per_image']['original']:.3f} | "
                  f"{lat['seconds_per_image']['slim']:.3f} |"]
        if q.get("adherence"):
            lines.append(f"| prompt adherence | {q['adherence']['original']:.3f} | {q['adherence']['slim']:.3f} |")
        lines += ["", "| slim vs original | value |", "|---|---:|",
                  f"| image PSNR (dB) | {q['psnr_db']:.2f} |", f"| image SSIM | {q['ssim']:.4f} |",
                  f"| relative noise-prediction error | {q['eps_relative_error']:.4f} |", ""]
        where = ", ".join(f"{k} {lat[k]}" for k in ("device", "dtype", "threads") if lat.get(k) is not None)
        if where:
            lines += [f"Latency measured on: {where}. Speed-ups depend on the hardware and the attention backend.", ""]
    else:
        lines += ["Not measured for this upload. `slimdiff eval ORIGINAL SLIM` compares two saved pipelines "
                  "(PSNR, SSIM, noise-prediction error, latency); `slimdiff slim` measures them while slimming.", ""]
    if facts.images.get("grid"):
        lines += [f"![original (top) vs slim (bottom), same prompts and seeds]({facts.images['grid']})", ""]
    if facts.images.get("ranks"):
        lines += ["## Rank allocation", "", "The kept fraction of every attention (QK, VO) and feed-forward group, "
                  "chosen by SlimDiff's spectral influence allocation under the budget:", "",
                  f"![rank allocation]({facts.images['ranks']})", ""]

    lines += ["## Calibration", ""]
    cal = facts.calibration
    if cal and not cal.get("reused"):
        lines += ["| SlimSet prompts | steps | guidance scale | seed | SlimSet SHA-256 |", "|---:|---:|---:|---:|---|",
                  f"| {cal['prompts']} | {cal['steps']} | {cal['guidance_scale']} | {cal.get('seed', '–')} | "
                  f"`{cal['slimset_sha256']}` |", "",
                  "The SHA-256 is of the SlimSet prompts, one per line in selection order.", ""]
    elif cal:
        lines += [f"A saved calibration was reused (sampler settings: {cal['steps']} steps, guidance "
                  f"{cal['guidance_scale']}); its prompts are not recorded here.", ""]
    else:
        lines += ["Not recorded with this model.", ""]

    lines += ["## Use it", "", "### diffusers", "",
              "The slim model classes are in the `slimdiff-diffusers` package, which must be installed "
              f"(`{'model_index.json' if facts.kind == 'pipeline' else 'config.json'}` names them) and imported: "
              "diffusers loads component classes only from libraries the program has imported.", "",
              "```bash", "pip install slimdiff-diffusers", "```", ""]
    if facts.kind == "pipeline":
        call = '"a photo of a lighthouse at sunset"' if facts.pipeline_tag != "unconditional-image-generation" else ""
        lines += ["```python", "import torch", "from diffusers import DiffusionPipeline", "",
                  "import slimdiff_diffusers  # noqa: F401  (registers the slim model classes with diffusers)", "",
                  f'pipe = DiffusionPipeline.from_pretrained("{repo}", torch_dtype=torch.float16).to("cuda")',
                  f"image = pipe({call}).images[0]", "```", ""]
    else:
        base_ref = base.hub_id or "<the original pipeline>"
        lines += ["```python", "import torch", "from diffusers import DiffusionPipeline",
                  f"from slimdiff_diffusers import {facts.denoiser_class}", "",
                  f'{den} = {facts.denoiser_class}.from_pretrained("{repo}", torch_dtype=torch.float16)',
                  f'pipe = DiffusionPipeline.from_pretrained("{base_ref}", {den}={den}, '
                  'torch_dtype=torch.float16).to("cuda")', "```", ""]
    lines += ["### ComfyUI", ""]
    if facts.single_file:
        lines += ["1. Install the SlimDiff node pack (ComfyUI Manager: *SlimDiff*, or clone "
                  f"{PROJECT_URL} into `ComfyUI/custom_nodes/`).",
                  f"2. Put `{facts.single_file}` (the slim {den} in one file) into "
                  f"`ComfyUI/models/{COMFYUI_MODELS_SUBFOLDER}/`:", "",
                  "   ```bash",
                  f"   hf download {repo} {facts.single_file} --local-dir ComfyUI/models/{COMFYUI_MODELS_SUBFOLDER}",
                  "   ```", "",
                  "3. Load it with the **SlimDiff Load Slim Model** node; take the text encoder"
                  f"{'s' if is_transformer else ' (CLIP)'} and the VAE from the original model "
                  f"({f'`{base.hub_id}`' if base.hub_id else 'see above'}).", ""]
    else:
        lines += ["This repository has no single-file export of the slim model; ComfyUI's SlimDiff nodes can slim "
                  "the original checkpoint directly (*SlimDiff Calibrate* -> *SlimDiff Slim*).", ""]
    command = _reproduce_command(facts, base)
    lines += ["## How it was made", "",
              f"With SlimDiff {facts.slimdiff_version} ({PROJECT_URL})." + (" To make it again:" if command else "")]
    if command:
        lines += ["", "```bash", command, "```"]
    lines.append("")
    return "\n".join(lines)


def _reproduce_command(facts: SlimCardFacts, base: BaseModelInfo) -> str | None:
    """The `slimdiff slim` call with the recorded budget and calibration (None when they are not recorded)."""
    b, cal = facts.budget, facts.calibration
    if not b or not cal or cal.get("reused") or (b.get("keep_ratio") is None and b.get("params_to_remove") is None):
        return None
    from .base_model import EMBEDDED_MODEL_DESCRIPTION

    parts = ["slimdiff slim"]
    if base.hub_id:
        parts.append(base.hub_id)
    elif base.description != EMBEDDED_MODEL_DESCRIPTION:
        parts.append("ORIGINAL_MODEL_FOLDER")
    parts.append(f"--keep-ratio {b['keep_ratio']}" if b.get("keep_ratio") is not None
                 else f"--params-to-remove {b['params_to_remove']}")
    parts += [f"--budget {b.get('budget', 'params')}", f"--targets {' '.join(b.get('targets') or [])}"]
    if b.get("allocation_refinement_used"):  # the resolved one: "auto" may resolve otherwise in another version
        parts.append(f"--allocation-refinement {b['allocation_refinement_used']}")
    if b.get("propagation_used"):  # the resolved one, for the same reason
        parts.append(f"--propagation {b['propagation_used']}")
    refits = set((b.get("vo_output_refit_used") or {}).values())
    if len(refits) == 1:  # one setting for every attention kind present reproduces it in any version
        parts.append(f"--vo-output-refit {refits.pop()}")
    statistics = set((b.get("vo_statistics_used") or {}).values())
    if len(statistics) == 1:  # recorded only where some kind used the attention outputs: here every kind did
        parts.append(f"--vo-statistics {statistics.pop()}")
    if b.get("ffn_selection") and "ffn" in (b.get("targets") or []):  # recorded since the option exists
        parts.append(f"--ffn-selection {b['ffn_selection']}")
    parts += [f"--num-prompts {cal['prompts']}", f"--steps {cal['steps']}"]
    if cal.get("guidance_scale") is not None:  # None (Qwen-Image): the pipeline's default, i.e. no --guidance-scale
        parts.append(f"--guidance-scale {cal['guidance_scale']}")
    if cal.get("seed") is not None:
        parts.append(f"--seed {cal['seed']}")
    return " ".join(parts)


def _rounded(value: Any) -> Any:
    """Measurements rounded to 6 significant digits (the card's metadata stays readable)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def render_model_card(facts: SlimCardFacts, base: BaseModelInfo):
    """The ``ModelCard`` for ``facts``: ``ModelCardData`` metadata plus the Markdown body."""
    from huggingface_hub import ModelCard, ModelCardData

    facts = dataclasses.replace(facts, base_description=base.description)
    data = ModelCardData(base_model=base.hub_id, library_name="diffusers", pipeline_tag=facts.pipeline_tag,
                         tags=list(CARD_TAGS), license=base.license, license_name=base.license_name,
                         license_link=base.license_link, **{_METADATA_KEY: facts.to_dict()})
    # The YAML block is huggingface_hub's own serialisation of the ModelCardData (as in ModelCard.from_template).
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_body(facts, base)}")


def card_facts(card) -> SlimCardFacts | None:
    """The facts a SlimDiff card stores in its metadata (None for a card SlimDiff did not write)."""
    if card is None or "slimdiff" not in (card.data.tags or []):
        return None
    return SlimCardFacts.from_dict(card.data.get(_METADATA_KEY))


def base_from_card(card) -> BaseModelInfo:
    data = card.data
    facts = card_facts(card)
    return BaseModelInfo(hub_id=data.base_model if isinstance(data.base_model, str) else None,
                         description=facts.base_description if facts else "an unknown model",
                         license=data.license, license_name=data.get("license_name"),
                         license_link=data.get("license_link"))


def _reusable_facts(source: str | os.PathLike | None, spec_digest: str) -> SlimCardFacts | None:
    """Facts of the SlimDiff card in the folder the model was loaded from, if it describes the same slim model."""
    if source is None or not Path(source).expanduser().is_dir():
        return None
    root = Path(source).expanduser()
    if not (root / CARD_NAME).is_file() and (root.parent / CARD_NAME).is_file():
        root = root.parent  # a component folder: the card is in the pipeline folder
    try:
        from huggingface_hub import ModelCard

        facts = card_facts(ModelCard.load(root / CARD_NAME, ignore_metadata_errors=True))
    except Exception:  # no card, or not one of ours
        return None
    return facts if facts is not None and facts.spec_sha256 == spec_digest else None


def write_model_card(folder: str | os.PathLike, model: Any, *, source: str | os.PathLike | None = None,
                     report: Any | None = None, comparison: Any | None = None,
                     measured_on: dict[str, Any] | None = None, images: dict[str, str] | None = None,
                     single_file: str | None = None, repo_id: str | None = None,
                     base: BaseModelInfo | None = None) -> Path:
    """Write ``folder/README.md``: the Hub model card of a slim pipeline or slim denoiser ``model``.

    Args:
        folder: where the card goes (the folder that becomes the repository root).
        model: a slimmed diffusers pipeline, or a slimmed denoiser (``SlimUNet2DConditionModel``,
            ``SlimFluxTransformer2DModel``, ...).
        source: what the original was loaded from (Hub id or folder); default: the model's ``_name_or_path``.
            It gives ``base_model`` and the licence (:func:`resolve_base_model`); pass ``base`` to set them.
        report, comparison, measured_on: what ``pipe.slim`` / ``slimdiff slim`` measured
            (:func:`collect_card_facts`). Without them, facts recorded in the source folder's SlimDiff card are
            reused when they describe the same slim weights; otherwise the card says what was not recorded.
        images: ``{"grid": ..., "ranks": ...}`` paths, relative to ``folder``, of pictures written there.
        single_file: name of the ComfyUI single file that is (or will be) uploaded with the card.
        repo_id: the repository the card is for (used in the loading snippets); None: a placeholder.

    Returns the path of the card. The write is atomic.
    """
    folder = Path(folder)
    is_pipeline = hasattr(model, "components")
    if is_pipeline:
        denoiser_name = next((n for n in ("unet", "transformer") if getattr(model, n, None) is not None), None)
        if denoiser_name is None:
            raise ValueError(f"{type(model).__name__} has no `unet` or `transformer`: not a slim pipeline")
        denoiser = getattr(model, denoiser_name)
    else:
        from ..diffusers_adapter.models import family_of

        family = family_of(model)
        denoiser, denoiser_name = model, (family.component if family else
                                          "unet" if "UNet" in type(model).__name__ else "transformer")
    if report is None:  # what pipe.slim() recorded on the pipeline (a slim model carries its own)
        report = getattr(model, "_slimdiff_report", None)
    if source is None:
        source = getattr(getattr(model, "config", None), "get", lambda k, d=None: d)("_name_or_path")
    base = base or resolve_base_model(source)
    facts = None
    if report is None and comparison is None:
        facts = _reusable_facts(source, spec_sha256(_model_spec(denoiser)))
        if facts is not None:
            logger.info("model card: reusing the measurements recorded in %s", source)
            facts = dataclasses.replace(facts, images={k: v for k, v in (images or facts.images).items()
                                                       if (folder / v).is_file()},
                                        single_file=single_file)
    if facts is None:
        facts = collect_card_facts(denoiser, pipeline=model if is_pipeline else None, denoiser_name=denoiser_name,
                                   report=report, comparison=comparison, measured_on=measured_on, images=images,
                                   single_file=single_file, base=base)
    facts.repo_id = repo_id
    return save_card(render_model_card(facts, base), folder / CARD_NAME)


def save_card(card, path: str | os.PathLike) -> Path:
    """Save a ``ModelCard`` atomically, with the permissions of a normal new file (umask)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        card.save(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    return path


def rerender_for_repo(card_path: str | os.PathLike, repo_id: str) -> bool:
    """Fill in ``repo_id`` in a SlimDiff card written before the repo was known (``slimdiff slim``).

    Only a card whose body is exactly what SlimDiff wrote is re-rendered; an edited card is left as it is.
    Returns whether the card was rewritten.
    """
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_path, ignore_metadata_errors=True)
    facts = card_facts(card)
    if facts is None or facts.repo_id == repo_id:
        return False
    base = base_from_card(card)
    if card.text.strip() != _body(dataclasses.replace(facts, base_description=base.description), base).strip():
        logger.warning("%s was edited after SlimDiff wrote it: uploading it as it is (its snippets may not name %s)",
                       card_path, repo_id)
        return False
    save_card(render_model_card(dataclasses.replace(facts, repo_id=repo_id), base), card_path)
    return True


__all__ = ["SlimCardFacts", "card_facts", "collect_card_facts", "pipeline_tag_for", "render_model_card",
           "rerender_for_repo", "slimset_sha256", "write_model_card", "GRID_IMAGE", "RANKS_IMAGE", "SINGLE_FILE_NAME"]
