"""``pipe.slim(...)``: calibrate a pipeline on its own sampler and slim its denoiser in one call.

The denoiser is the pipeline's ``unet`` (Stable Diffusion 1.x/2.x/XL, the embedded default model) or its
``transformer`` (Flux, Chroma, SD3/3.5, PixArt-α/Σ, and the families whose attention is kept whole: Qwen-Image,
Wan 2.1, LTX-Video, CogView4, HunyuanDiT). Calibration runs the pipeline's own ``__call__``, so each family
conditions its denoiser as it does when generating: CFG rows for SD/SDXL/SD3/PixArt/LTX-Video/HunyuanDiT, separate
conditional and unconditional calls for Wan and CogView4 (and Flux / Qwen-Image's true CFG, which runs only with a
negative prompt), the distilled guidance embedding for Flux.1-dev-style models (``guidance_scale`` is then the
embedded guidance, not CFG), nothing for Flux.1-schnell-style ones. The timestep convention of the denoiser (the
scheduler's timesteps, or fractions of them) is read from the pipeline's own call, not from a list of families
(:func:`denoiser_timestep_scale`).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core import distributed
from ..core.calibration import Calibration
from ..core.calibrator import CalibrationConfig, calibrate, timestep_argument
from ..core.config import SlimConfig
from ..core.errors import ConfigError
from ..core.plan import plan_slim
from ..core.sites import check_supported, find_sites
from ..core.report import SlimReport
from .slimming import apply_slim_plan, check_slimmable
from .slimset import SlimSet, build_slimset

logger = logging.getLogger("slimdiff")


@dataclass
class PipelineSlimReport:
    """What ``pipe.slim`` did: the slimming report plus how the calibration was obtained."""

    slim: SlimReport
    num_prompts: int
    num_inference_steps: int
    guidance_scale: float | None  # None: the pipeline's own default is None (Qwen-Image: no guidance embedding)
    calibration_seconds: float
    calibration_memory_bytes: int
    calibration_forward_calls: int
    prompts: list[str] = field(default_factory=list)
    seed: int | None = None  # of the SlimSet selection and the calibration sampling (None: calibration reused)
    denoiser: str = "unet"  # the pipeline component that was slimmed ("unet" or "transformer")
    family: str = ""  # "UNet", "Flux", "SD3", "PixArt" (models.SLIM_MODEL_FAMILIES)
    pipeline_class: str = ""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self) | {"slim": self.slim.to_dict()}

    def __str__(self) -> str:
        s = self.slim
        what = f" ({self.family} {self.denoiser})" if self.family else ""
        return (f"SlimDiff{what}: {s.params_before:,} -> {s.params_after:,} parameters "
                f"({s.params_removed:,} removed; compressible kept {s.compressible_params_after / s.compressible_params_before:.1%}); "
                f"calibration {self.num_prompts} prompts x {self.num_inference_steps} steps in "
                f"{self.calibration_seconds:.1f}s, {self.calibration_memory_bytes / 2**20:.0f} MiB of statistics; "
                f"slimming {s.seconds:.1f}s")


def denoiser_component(pipe) -> str:
    """The name of the pipeline component SlimDiff slims: ``"unet"`` or ``"transformer"``.

    A pipeline with no denoiser, or with a second one (Wan 2.2's ``transformer_2``, the low-noise expert its call
    switches to below ``boundary_ratio``), is refused with a :class:`ConfigError` before any work: ``pipe.slim()``
    calibrates and slims one denoiser, and calibrating ``transformer`` through such a pipeline would see only the
    steps above the boundary while the other expert stayed at full size.
    """
    names = [name for name in ("unet", "transformer") if getattr(pipe, name, None) is not None]
    if not names:
        raise ConfigError(f"{type(pipe).__name__} has no `unet` or `transformer` to slim")
    components = getattr(pipe, "components", None) or {}
    others = sorted(name for name, value in components.items()
                    if name != names[0] and name.startswith(("unet", "transformer"))
                    and isinstance(value, torch.nn.Module))
    if others:
        raise ConfigError(
            f"{type(pipe).__name__} has more than one denoiser ({', '.join([names[0], *others])}; e.g. Wan 2.2's "
            "high- and low-noise experts): pipe.slim() and `slimdiff` calibrate and slim one, and through this "
            "pipeline each expert would see only its share of the steps. Slim each with sd.calibrate(model, run_fn) "
            "+ sd.slim on its own, with a run function that samples through that expert's steps. Nothing was "
            "changed.")
    return names[0]


# Arguments calibrate_pipeline sets itself; call_kwargs may not override them.
_RESERVED_CALL_ARGS = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width",
                       "generator", "output_type")


def default_guidance_scale(pipe, fallback: float = 7.5) -> float | None:
    """The pipeline's own default ``guidance_scale`` (its ``__call__`` signature): 7.5 for SD, 7.0 for SD3,
    4.5 for PixArt, 3.5 for Flux (the guidance embedding), 5.0 for Wan, CogView4 and HunyuanDiT, 3.0 for LTX-Video.

    ``None`` where the pipeline's default is ``None``: Qwen-Image, whose ``guidance_scale`` is the guidance
    embedding of distilled variants only (its CFG is ``true_cfg_scale`` with a negative prompt); passing a number
    there would make the pipeline warn that it is ignored. ``fallback`` for a pipeline without a numeric or
    ``None`` default."""
    param = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    default = getattr(param, "default", inspect.Parameter.empty)
    if default is None:
        return None
    return float(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else fallback


def check_call_kwargs(pipe, call_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Validate extra arguments for the pipeline's calibration calls before anything runs (a
    :class:`ConfigError`, which is also a ``ValueError``)."""
    call_kwargs = dict(call_kwargs or {})
    reserved = sorted(set(call_kwargs) & set(_RESERVED_CALL_ARGS))
    if reserved:
        raise ConfigError(f"call_kwargs may not set {', '.join(reserved)}: pass them as pipe.slim(...) arguments")
    accepted = inspect.signature(type(pipe).__call__).parameters
    unknown = sorted(k for k in call_kwargs if k not in accepted)
    if unknown:  # pipelines with **kwargs would swallow a typo silently
        raise ConfigError(f"{type(pipe).__name__}.__call__ has no argument {', '.join(map(repr, unknown))} "
                          "(call_kwargs are passed to the pipeline's own call)")
    return call_kwargs


def pixart_binned_sample_sizes(pipe) -> list[int] | None:
    """The transformer ``sample_size`` values whose images diffusers' resolution binning of this PixArt pipeline
    can bin, or ``None`` when it is not a PixArt pipeline with binning.

    diffusers' PixArt pipelines (PixArt-α, PixArt-Σ and PixArt-Σ PAG) bin ``height`` x ``width`` to the nearest
    entry of ``ASPECT_RATIO_<8·sample_size>_BIN`` from their own module (α: 256, 512, 1024; Σ: 2048 too) and raise
    ``ValueError("Invalid sample size")`` for any other ``sample_size``: read from the module of the diffusers class
    whose ``__call__`` runs (a user's subclass has none of these tables)."""
    import re
    import sys

    if "use_resolution_binning" not in inspect.signature(type(pipe).__call__).parameters:
        return None
    from diffusers import PixArtTransformer2DModel

    if not isinstance(getattr(pipe, "transformer", None), PixArtTransformer2DModel):  # Slim* subclasses included
        return None
    owner = next((klass for klass in type(pipe).__mro__
                  if "__call__" in vars(klass) and klass.__module__.startswith("diffusers.")), None)
    module = sys.modules.get(owner.__module__) if owner is not None else None
    if module is None:
        return None
    return sorted(int(match.group(1)) // 8 for name in vars(module)
                  if (match := re.fullmatch(r"ASPECT_RATIO_(\d+)_BIN", name)))


def resolve_resolution_binning(pipe, call_kwargs: dict[str, Any] | None = None, *, height: int | None = None,
                               width: int | None = None) -> dict[str, Any]:
    """``call_kwargs`` with PixArt's ``use_resolution_binning`` set where the pipeline's default cannot run: the
    one rule for every caller that drives a pipeline call (``pipe.slim()``, :func:`calibrate_pipeline`,
    ``compare_pipelines``, ``generate_images``, the ``slimdiff`` commands).

    diffusers' PixArt pipelines bin sizes by default (``use_resolution_binning=True``) but only have bins for the
    transformer ``sample_size`` values of the released models (:func:`pixart_binned_sample_sizes`); for any other
    their call raises "Invalid sample size" before doing anything. For such a pipeline:

    * ``use_resolution_binning`` not given: ``False`` is added, with one warning through the ``slimdiff`` logger
      (the pipeline then runs at exactly ``height`` x ``width``, by default its ``sample_size`` times the VAE
      factor);
    * ``use_resolution_binning=True``: refused with a :class:`ConfigError` (it cannot run), before any work;
    * ``use_resolution_binning=False``: respected, silently.

    Any other pipeline, or a PixArt whose ``sample_size`` has bins, gets ``call_kwargs`` unchanged (the pipeline's
    own default: binning on). Returns a new dict.
    """
    call_kwargs = dict(call_kwargs or {})
    binned = pixart_binned_sample_sizes(pipe)
    if binned is None:
        return call_kwargs
    sample_size = pipe.transformer.config.sample_size
    if sample_size in binned:
        return call_kwargs
    name, sizes = type(pipe).__name__, "/".join(map(str, binned))
    if "use_resolution_binning" in call_kwargs:
        if call_kwargs["use_resolution_binning"]:
            raise ConfigError(f"use_resolution_binning=True cannot run on this {name}: diffusers bins image sizes "
                              f"only for a transformer sample_size of {sizes}, and this one's is {sample_size} (the "
                              "pipeline would raise 'Invalid sample size'). Pass use_resolution_binning=False, or "
                              "leave it out and SlimDiff turns it off")
        return call_kwargs
    factor = getattr(pipe, "vae_scale_factor", 8)
    logger.warning("%s bins image sizes only for a transformer sample_size of %s; this one's is %s: calling it "
                   "without resolution binning (use_resolution_binning=False), at exactly the requested size "
                   "(%dx%d). Generate with use_resolution_binning=False too.", name, sizes, sample_size,
                   height or sample_size * factor, width or sample_size * factor)
    return call_kwargs | {"use_resolution_binning": False}


class _DenoiserReached(Exception):
    """Raised by :func:`denoiser_timestep_scale`'s hook at the denoiser's first call, before it runs."""


def denoiser_timestep_scale(pipe, call: Callable[[], Any]) -> int | None:
    """The timestep scale of the pipeline's denoiser (``CalibrationConfig.num_train_timesteps``: a call's timestep
    divided by it gives its place in the timestep buckets), read from what the pipeline really passes.

    ``call()`` runs the pipeline's own call; a hook stops it at the denoiser's first forward, before the denoiser
    runs (the probe costs the text encoding of one batch), and compares the timestep the denoiser is given with the
    scheduler's timestep of that step (the one the pipeline has just set up, at the scheduler's step or begin index;
    failing that, any of its timesteps):

    * that timestep: the denoiser takes the scheduler's timesteps (SD, SDXL, SD3, PixArt, Wan, LTX-Video, CogView4,
      HunyuanDiT): the scheduler's ``num_train_timesteps``;
    * that timestep divided by ``num_train_timesteps``: fractions in [0, 1] (Flux, Chroma, Qwen-Image): ``1``;
    * neither (another convention, e.g. ``1 - t / 1000``), both, or no denoiser call: ``None``.

    Hooks the caller registered on the denoiser do not see the stopped call (this one runs first).
    """
    scheduler = getattr(pipe, "scheduler", None)
    config = getattr(scheduler, "config", None)
    if config is None:
        return None
    denoiser = getattr(pipe, denoiser_component(pipe))
    seen: dict[str, Any] = {}

    def stop(module, args, kwargs):
        seen["timestep"] = timestep_argument(args, kwargs)
        seen["schedule"] = getattr(scheduler, "timesteps", None)
        raise _DenoiserReached

    handle = denoiser.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
    try:
        call()
    except _DenoiserReached:
        pass
    finally:
        handle.remove()
    passed, schedule = seen.get("timestep"), seen.get("schedule")
    if passed is None or schedule is None:
        return None
    passed = float(torch.as_tensor(passed).detach().float().max())  # Wan 2.2 ti2v: per-token timesteps, max = t
    schedule = torch.as_tensor(schedule).detach().float().flatten().cpu()
    steps = int(config.get("num_train_timesteps", 1000))
    # The step being taken: no scheduler.step() has run yet, so the begin index (img2img's start) or 0.
    index = getattr(scheduler, "step_index", None)
    index = getattr(scheduler, "begin_index", None) if index is None else index
    index = 0 if index is None else int(index)
    if 0 <= index < len(schedule):
        schedule_now = schedule[index:index + 1]
        scale = _scale_from(passed, schedule_now, steps)
        if scale is not None:
            return scale
    return _scale_from(passed, schedule, steps)  # a pipeline that does not keep the scheduler's index


def _scale_from(passed: float, schedule: torch.Tensor, steps: int) -> int | None:
    """``steps`` if ``passed`` is one of the ``schedule``'s timesteps, 1 if it is one divided by ``steps``, None if
    neither or both."""
    def scheduled(value: float) -> bool:
        # 1% tolerance: a bf16 pipeline casts the timestep to the latents' dtype (8-bit mantissa, 0.4%)
        return bool(((schedule - value).abs() <= 1e-2 * schedule.abs().clamp_min(1.0 / steps)).any())
    as_given, as_fraction = scheduled(passed), scheduled(passed * steps)
    if as_given == as_fraction:
        return None
    return steps if as_given else 1


def _resolve_timestep_scale(pipe, config: CalibrationConfig, call: Callable[[], Any]) -> CalibrationConfig:
    """``config`` with ``num_train_timesteps`` read from the pipeline (:func:`denoiser_timestep_scale`), unless the
    caller set it (anything but the default 1000). A convention the probe cannot tell is refused when timestep
    buckets need it (a :class:`ConfigError` before calibration), and harmless with one bucket (the scheduler's
    ``num_train_timesteps`` is recorded)."""
    if config.num_train_timesteps != 1000 or getattr(pipe, "scheduler", None) is None:
        return config
    scale = denoiser_timestep_scale(pipe, call)
    if scale is None:
        steps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
        if config.num_timestep_buckets > 1:
            raise ConfigError(
                f"{type(pipe).__name__} passes its {denoiser_component(pipe)} a timestep that is neither one of its "
                f"scheduler's timesteps nor one divided by num_train_timesteps ({steps}), so SlimDiff cannot tell "
                f"which of the {config.num_timestep_buckets} timestep buckets a call belongs to. Pass "
                "calibration_config=CalibrationConfig(num_timestep_buckets=..., num_train_timesteps=<the "
                "denoiser's largest timestep>), or use one bucket")
        logger.debug("timestep convention of %s not recognised; one bucket: recording num_train_timesteps=%d",
                     type(pipe).__name__, steps)
        scale = steps
    return dataclasses.replace(config, num_train_timesteps=scale)


def calibrate_pipeline(pipe, slimset: SlimSet, *, num_inference_steps: int = 25, guidance_scale: float | None = None,
                       batch_size: int = 8, height: int | None = None, width: int | None = None,
                       negative_prompt: str | None = None, config: CalibrationConfig | None = None,
                       progress: bool = True, **call_kwargs: Any) -> Calibration:
    """Run the pipeline's own sampling loop on ``slimset`` and collect the denoiser's statistics.

    ``guidance_scale`` (default: the pipeline's own) is passed as the pipeline reads it: CFG for SD/SDXL/SD3/
    PixArt, the guidance embedding for Flux.1-dev-style transformers. ``call_kwargs`` are further arguments of
    the pipeline's ``__call__`` (e.g. ``max_sequence_length``, PixArt's ``use_resolution_binning``, which
    :func:`resolve_resolution_binning` sets to ``False`` for a PixArt without bins for its ``sample_size``).
    Only latents are produced (``output_type="latent"``): the VAE decode is not needed for statistics. Unless
    ``config`` sets ``num_train_timesteps``, the denoiser's timestep scale is read from the first batch's own call,
    stopped at the denoiser (:func:`denoiser_timestep_scale`). Under
    ``torch.distributed`` (``torchrun``, ``accelerate launch``) each rank samples its own contiguous share of
    the prompt batches and the statistics are summed over ranks: every rank gets the same calibration.
    """
    if len(slimset) == 0:
        raise ValueError("no calibration prompts: give at least one non-empty prompt")
    denoiser = getattr(pipe, denoiser_component(pipe))
    call_kwargs = resolve_resolution_binning(pipe, check_call_kwargs(pipe, call_kwargs), height=height, width=width)
    if guidance_scale is None:
        guidance_scale = default_guidance_scale(pipe)
    config = config or CalibrationConfig()
    all_batches = [(slimset.prompts[i:i + batch_size], slimset.seeds[i:i + batch_size])
                   for i in range(0, len(slimset), batch_size)]
    batches = distributed.shard(all_batches)
    previous_bar = getattr(pipe, "_progress_bar_config", {}).copy()
    pipe.set_progress_bar_config(disable=True)  # one bar over prompts, not one per batch
    # Unset optional arguments are left to the pipeline's defaults (PixArt's negative_prompt is "", not None;
    # Wan's and LTX-Video's height, width and num_frames are ints): only what is given is passed.
    optional = {k: v for k, v in (("height", height), ("width", width)) if v is not None}

    def sample(prompts: list[str], seeds: list[int]) -> None:
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        # "" is a negative prompt too: it turns on Flux's and Qwen-Image's true CFG (true_cfg_scale > 1)
        negative = {"negative_prompt": [negative_prompt] * len(prompts)} if negative_prompt is not None else {}
        pipe(prompt=prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
             generator=generators, output_type="latent", **negative, **optional, **call_kwargs)

    def run() -> None:
        for prompts, seeds in tqdm(batches, desc="SlimDiff calibration", unit="batch",
                                   disable=not progress or distributed.rank() > 0):
            sample(prompts, seeds)

    probe_bar = None

    def probe_progress(done: int, total: int) -> None:
        nonlocal probe_bar
        if progress and distributed.rank() == 0:
            if probe_bar is None:
                probe_bar = tqdm(total=total, desc="SlimDiff influence probes", unit="call")
            probe_bar.update(done - probe_bar.n)

    try:
        with torch.no_grad():
            # A model calibrate() would refuse is refused before the timestep probe encodes any text; the sites
            # found here are the ones calibrate() uses.
            sites = find_sites(denoiser)
            check_supported(sites, type(denoiser).__name__)
            # the first batch's own call, stopped at the denoiser: every rank reads the same convention
            config = _resolve_timestep_scale(pipe, config, lambda: sample(*all_batches[0]))
            return calibrate(denoiser, run, config, sites=sites, progress=probe_progress)
    finally:
        if probe_bar is not None:
            probe_bar.close()
        pipe._progress_bar_config = previous_bar


def slim_pipeline(pipe, prompts: list[str] | None = None, keep_ratio: float | None = None, *,
                  params_to_remove: int | None = None, config: SlimConfig | None = None,
                  calibration: Calibration | str | Path | None = None, num_prompts: int = 500,
                  selection: str = "kmeans", num_inference_steps: int = 25, guidance_scale: float | None = None,
                  batch_size: int = 8, height: int | None = None, width: int | None = None,
                  negative_prompt: str | None = None, calibration_config: CalibrationConfig | None = None,
                  save_calibration: str | Path | None = None, seed: int = 0, progress: bool = True,
                  call_kwargs: dict[str, Any] | None = None, lora_maps: bool = True,
                  strict_weights: bool = True, **config_overrides: Any) -> PipelineSlimReport:
    """Calibrate ``pipe`` on a SlimSet and slim its denoiser in place (all or nothing). Returns a report.

    Args:
        prompts: calibration prompt pool (default: the shipped pool). ``num_prompts`` of them are selected
            (``selection="kmeans"`` or ``"random"``); pass ``num_prompts=len(prompts)`` to use them all.
        keep_ratio / params_to_remove / config / config_overrides: the budget and settings (:class:`SlimConfig`).
        calibration: reuse a :class:`Calibration` (or a path to a saved one) instead of running the model.
        num_inference_steps, guidance_scale, height, width, negative_prompt: the sampler settings used for
            calibration; use the ones you will generate with. ``guidance_scale`` defaults to the pipeline's own
            (CFG scale for SD/SD3/PixArt; for Flux the guidance embedding, Flux runs no CFG).
        call_kwargs: further arguments of the pipeline's ``__call__`` for the calibration runs (e.g.
            ``{"max_sequence_length": 256}``); checked against its signature before anything runs. A PixArt
            whose transformer ``sample_size`` diffusers has no aspect-ratio bins for is calibrated with
            ``use_resolution_binning=False`` (one warning; an explicit ``True`` is refused, an explicit ``False``
            kept): :func:`resolve_resolution_binning`.

        save_calibration: write the calibration to this path (to slim again at other budgets, or with a LoRA
            fused: the exact LoRA route of the README).
        lora_maps: keep the basis maps that translate LoRAs made for the original model
            (``pipe.load_lora_weights``; saved by ``save_pretrained``). ``False`` saves one m×k matrix per narrowed
            feed-forward; such a slim model refuses LoRAs on its narrowed layers.
        strict_weights: refuse a ``calibration`` made on other weights of the same architecture. ``False`` slims
            a model whose weights changed since it was calibrated, e.g. with a LoRA fused (``pipe.fuse_lora()``):
            the base model's statistics then stand in for the fused model's.

    The denoiser is ``pipe.unet`` or ``pipe.transformer`` (Flux, Chroma, SD3/3.5, PixArt-α/Σ; Qwen-Image, Wan 2.1,
    LTX-Video, CogView4 and HunyuanDiT with their attention kept whole; a pipeline with a second denoiser, such as
    Wan 2.2's ``transformer_2``, is refused before any work: :func:`denoiser_component`); the SlimSet is embedded
    with the pipeline's own text encoder(s) (:func:`~.slimset.embed_prompts`). Video pipelines take their size
    as ``height``/``width`` and their length as ``call_kwargs={"num_frames": ...}``.
    """
    name = denoiser_component(pipe)
    denoiser = getattr(pipe, name)
    config = SlimConfig.resolve(config, keep_ratio=keep_ratio, params_to_remove=params_to_remove, **config_overrides)
    if not config.has_budget and not config.rank_pattern:
        raise ValueError("give a budget: keep_ratio=... or params_to_remove=...")
    # Everything that can fail without the statistics fails here, before minutes of calibration.
    decisions = check_slimmable(denoiser, config)
    call_kwargs = check_call_kwargs(pipe, call_kwargs)
    if calibration is None:  # the pipeline will be called: PixArt's binning decided (or refused) here, once
        call_kwargs = resolve_resolution_binning(pipe, call_kwargs, height=height, width=width)
    if guidance_scale is None:
        guidance_scale = default_guidance_scale(pipe)
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration.load(calibration)
    if prompts is not None and not [p for p in prompts if p and p.strip()]:
        raise ValueError("the prompt list is empty: give at least one non-empty prompt, or prompts=None for the "
                         "default pool")

    started = time.perf_counter()
    used_prompts: list[str] = []
    owns_calibration = calibration is None  # statistics made here may be freed as planning goes
    if calibration is None:
        calibration_config = calibration_config or CalibrationConfig()
        if any(not calibration_config.collects_attention_outputs(kind)
               for kind in config.attention_kinds_reading_outputs(required=True)):
            # the VO the config asks for reads them; without them planning would refuse after the calibration
            calibration_config = dataclasses.replace(calibration_config, attention_output_statistics=True)
        slimset = build_slimset(pipe, num_prompts=num_prompts, pool=prompts, method=selection, seed=seed)
        calibration = calibrate_pipeline(pipe, slimset, num_inference_steps=num_inference_steps,
                                         guidance_scale=guidance_scale, batch_size=batch_size, height=height,
                                         width=width, negative_prompt=negative_prompt, config=calibration_config,
                                         progress=progress, **call_kwargs)
        used_prompts = slimset.prompts
        if save_calibration is not None and distributed.rank() == 0:
            calibration.save(save_calibration)
    calibration_seconds = time.perf_counter() - started
    calibration_memory = calibration.meta.get("memory_bytes", 0)
    calibration_calls = calibration.meta.get("num_forward_calls", 0)

    with tqdm(desc="SlimDiff decomposition", unit="step", disable=not progress or distributed.rank() > 0) as bar:
        def plan_progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        plan = plan_slim(denoiser, calibration, config, progress=plan_progress, basis_maps=lora_maps,
                         strict_weights=strict_weights, release_statistics=owns_calibration)
    # The plan no longer needs the statistics: free them (the caller's own object stays alive) before the
    # narrow layers are built, so the peak is the model plus the statistics, not both plus the new layers.
    del calibration
    apply_slim_plan(denoiser, plan, decisions, check=False)  # in place, all or nothing
    setattr(pipe, name, denoiser)  # DiffusionPipeline.__setattr__ records the Slim* class in model_index
    report = PipelineSlimReport(
        slim=denoiser.slimdiff_report, num_prompts=len(used_prompts), num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, calibration_seconds=round(calibration_seconds, 2),
        calibration_memory_bytes=calibration_memory, calibration_forward_calls=calibration_calls,
        prompts=used_prompts, seed=seed if used_prompts else None, denoiser=name,
        family=getattr(denoiser, "slimdiff_family", ""), pipeline_class=type(pipe).__name__)
    # What the model card states (pipe.push_to_hub): kept on the pipeline, which now pushes with SlimDiff's card.
    pipe._slimdiff_report = report
    if not isinstance(pipe, SlimDiffPipelineMixin):
        pipe.push_to_hub = types.MethodType(SlimDiffPipelineMixin.push_to_hub, pipe)
    logger.info("%s", report)
    return report


class SlimDiffPipelineMixin:
    """Adds ``slim(...)`` to a diffusers pipeline class.

    Example::

        class MyPipeline(SlimDiffPipelineMixin, StableDiffusionPipeline): ...
        pipe = MyPipeline.from_pretrained(repo_id)
        report = pipe.slim(keep_ratio=0.6)

    For a pipeline you already have, :func:`enable_slimdiff` adds the method to that instance instead.
    """

    def slim(self, prompts: list[str] | None = None, keep_ratio: float | None = None, **kwargs: Any) -> PipelineSlimReport:
        return slim_pipeline(self, prompts, keep_ratio, **kwargs)

    slim.__doc__ = slim_pipeline.__doc__

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, revision: str | None = None):
        """Upload the slimmed pipeline with SlimDiff's model card (base model, budget, sizes, calibration, how to
        load it), the rank plot and the single-file denoiser for ComfyUI, instead of diffusers' generic card.

        Arguments as diffusers' ``push_to_hub``; ``revision`` pushes to a branch (created if needed). Pushing
        again updates the repository. Returns the commit info.
        """
        from ..hub.push import is_slimmed_pipeline, push_pipeline_to_hub

        if not is_slimmed_pipeline(self) and revision is None:  # nothing slim to describe: diffusers' own push
            from diffusers.utils import PushToHubMixin

            return PushToHubMixin.push_to_hub(self, repo_id, commit_message=commit_message, private=private,
                                              token=token, create_pr=create_pr,
                                              safe_serialization=safe_serialization, variant=variant)
        return push_pipeline_to_hub(self, repo_id, commit_message=commit_message, private=private, token=token,
                                    create_pr=create_pr, safe_serialization=safe_serialization, variant=variant,
                                    revision=revision)


def enable_slimdiff(pipe):
    """Give an existing pipeline instance ``slim(...)`` and SlimDiff's ``push_to_hub`` (with the SlimDiff model
    card); its class, config and saving are unchanged. Also use it on a slim pipeline loaded from disk before
    pushing it."""
    pipe.slim = types.MethodType(SlimDiffPipelineMixin.slim, pipe)
    pipe.push_to_hub = types.MethodType(SlimDiffPipelineMixin.push_to_hub, pipe)
    return pipe
