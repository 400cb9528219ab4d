"""``pipe.slim(...)``: calibrate a pipeline on its own sampler and slim its denoiser in one call."""
from __future__ import annotations

import logging
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core import distributed
from ..core.calibration import Calibration
from ..core.calibrator import CalibrationConfig, calibrate
from ..core.config import SlimConfig
from ..core.plan import plan_slim
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
    guidance_scale: float
    calibration_seconds: float
    calibration_memory_bytes: int
    calibration_forward_calls: int
    prompts: list[str] = field(default_factory=list)
    seed: int | None = None  # of the SlimSet selection and the calibration sampling (None: calibration reused)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self) | {"slim": self.slim.to_dict()}

    def __str__(self) -> str:
        s = self.slim
        return (f"SlimDiff: {s.params_before:,} -> {s.params_after:,} parameters "
                f"({s.params_removed:,} removed; compressible kept {s.compressible_params_after / s.compressible_params_before:.1%}); "
                f"calibration {self.num_prompts} prompts x {self.num_inference_steps} steps in "
                f"{self.calibration_seconds:.1f}s, {self.calibration_memory_bytes / 2**20:.0f} MiB of statistics; "
                f"slimming {s.seconds:.1f}s")


def _denoiser_name(pipe) -> str:
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has no `unet` or `transformer` to slim")


def calibrate_pipeline(pipe, slimset: SlimSet, *, num_inference_steps: int = 25, guidance_scale: float = 7.5,
                       batch_size: int = 8, height: int | None = None, width: int | None = None,
                       negative_prompt: str | None = None, config: CalibrationConfig | None = None,
                       progress: bool = True, **call_kwargs: Any) -> Calibration:
    """Run the pipeline's own sampling loop (CFG on) on ``slimset`` and collect the denoiser's statistics.

    Only latents are produced (``output_type="latent"``): the VAE decode is not needed for statistics. Under
    ``torch.distributed`` (``torchrun``, ``accelerate launch``) each rank samples its own contiguous share of
    the prompt batches and the statistics are summed over ranks: every rank gets the same calibration.
    """
    if len(slimset) == 0:
        raise ValueError("no calibration prompts: give at least one non-empty prompt")
    denoiser = getattr(pipe, _denoiser_name(pipe))
    config = config or CalibrationConfig()
    if config.num_train_timesteps == 1000 and hasattr(pipe, "scheduler"):
        config.num_train_timesteps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    batches = [(slimset.prompts[i:i + batch_size], slimset.seeds[i:i + batch_size])
               for i in range(0, len(slimset), batch_size)]
    batches = distributed.shard(batches)
    previous_bar = getattr(pipe, "_progress_bar_config", {}).copy()
    pipe.set_progress_bar_config(disable=True)  # one bar over prompts, not one per batch

    def run() -> None:
        for prompts, seeds in tqdm(batches, desc="SlimDiff calibration", unit="batch",
                                   disable=not progress or distributed.rank() > 0):
            generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
            pipe(prompt=prompts, negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
                 generator=generators, output_type="latent", **call_kwargs)

    probe_bar = None

    def probe_progress(done: int, total: int) -> None:
        nonlocal probe_bar
        if progress and distributed.rank() == 0:
            if probe_bar is None:
                probe_bar = tqdm(total=total, desc="SlimDiff propagation probe", unit="call")
            probe_bar.update(done - probe_bar.n)

    try:
        with torch.no_grad():
            return calibrate(denoiser, run, config, progress=probe_progress)
    finally:
        if probe_bar is not None:
            probe_bar.close()
        pipe._progress_bar_config = previous_bar


def slim_pipeline(pipe, prompts: list[str] | None = None, keep_ratio: float | None = None, *,
                  params_to_remove: int | None = None, config: SlimConfig | None = None,
                  calibration: Calibration | str | Path | None = None, num_prompts: int = 500,
                  selection: str = "kmeans", num_inference_steps: int = 25, guidance_scale: float = 7.5,
                  batch_size: int = 8, height: int | None = None, width: int | None = None,
                  negative_prompt: str | None = None, calibration_config: CalibrationConfig | None = None,
                  save_calibration: str | Path | None = None, seed: int = 0, progress: bool = True,
                  lora_maps: bool = True, strict_weights: bool = True, **config_overrides: Any) -> PipelineSlimReport:
    """Calibrate ``pipe`` on a SlimSet and slim its denoiser in place (all or nothing). Returns a report.

    Args:
        prompts: calibration prompt pool (default: the shipped pool). ``num_prompts`` of them are selected
            (``selection="kmeans"`` or ``"random"``); pass ``num_prompts=len(prompts)`` to use them all.
        keep_ratio / params_to_remove / config / config_overrides: the budget and settings (:class:`SlimConfig`).
        calibration: reuse a :class:`Calibration` (or a path to a saved one) instead of running the model.
        num_inference_steps, guidance_scale, height, width, negative_prompt: the sampler settings used for
            calibration; use the ones you will generate with.
        save_calibration: write the calibration to this path (to slim again at other budgets, or with a LoRA
            fused: the exact LoRA route of the README).
        lora_maps: keep the basis maps that translate LoRAs made for the original model
            (``pipe.load_lora_weights``; saved by ``save_pretrained``). ``False`` saves one m×k matrix per narrowed
            feed-forward; such a slim model refuses LoRAs on its narrowed layers.
        strict_weights: refuse a ``calibration`` made on other weights of the same architecture. ``False`` slims
            a model whose weights changed since it was calibrated, e.g. with a LoRA fused (``pipe.fuse_lora()``):
            the base model's statistics then stand in for the fused model's.
    """
    name = _denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    config = SlimConfig.resolve(config, keep_ratio=keep_ratio, params_to_remove=params_to_remove, **config_overrides)
    if not config.has_budget and not config.rank_pattern:
        raise ValueError("give a budget: keep_ratio=... or params_to_remove=...")
    # Everything that can fail without the statistics fails here, before minutes of calibration.
    decisions = check_slimmable(denoiser, config)
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration.load(calibration)
    if prompts is not None and not [p for p in prompts if p and p.strip()]:
        raise ValueError("the prompt list is empty: give at least one non-empty prompt, or prompts=None for the "
                         "default pool")

    started = time.perf_counter()
    used_prompts: list[str] = []
    if calibration is None:
        slimset = build_slimset(pipe, num_prompts=num_prompts, pool=prompts, method=selection, seed=seed)
        calibration = calibrate_pipeline(pipe, slimset, num_inference_steps=num_inference_steps,
                                         guidance_scale=guidance_scale, batch_size=batch_size, height=height,
                                         width=width, negative_prompt=negative_prompt, config=calibration_config,
                                         progress=progress)
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
                         strict_weights=strict_weights)
    # The plan no longer needs the statistics: free them (the caller's own object stays alive) before the
    # narrow layers are built, so the peak is the model plus the statistics, not both plus the new layers.
    del calibration
    apply_slim_plan(denoiser, plan, decisions, check=False)  # in place, all or nothing
    setattr(pipe, name, denoiser)  # DiffusionPipeline.__setattr__ records the Slim* class in model_index
    report = PipelineSlimReport(
        slim=denoiser.slimdiff_report, num_prompts=len(used_prompts), num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, calibration_seconds=round(calibration_seconds, 2),
        calibration_memory_bytes=calibration_memory, calibration_forward_calls=calibration_calls,
        prompts=used_prompts, seed=seed if used_prompts else None)
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
