"""Quality of SlimDiff vs the baselines of method.md §9, at equal compressible-parameter budgets.

Models:

* ``anime64``: the real, trained 64x64 anime-face DDPM UNet (../shared/models/anime64); attention only (it has
  no feed-forward). Calibration: the original model's own DDIM trajectories of ``--cal-samples`` images;
  evaluation: held-out trajectories (other seeds).
* ``default``: the embedded trained text-to-image pipeline (``slimdiff_diffusers.default_model``, sd-tiny);
  attention and feed-forward. Calibration: :func:`calibrate_pipeline` (its own DDIM sampler, CFG on) on the first
  ``--cal-samples`` calibration prompts; evaluation: the held-out prompts.
* ``flux_tiny``: the embedded Flux-architecture pipeline (flux-tiny), the same way (true CFG).

Both embedded models are calibrated and sampled as their registry entry says they were trained
(``EmbeddedModel.generation_kwargs``, as ``slimdiff slim`` and benchmarks/stack.py do); ``--steps`` overrides the
steps.

Metrics, for every (method, keep ratio):

* ``rel_eps_error``: relative noise-prediction error ``‖ε_slim − ε_orig‖ / ‖ε_orig‖`` of the slimmed model fed the
  *original* model's sampling trajectory (every step, every row; CFG rows for ``default``), averaged over steps;
  ``rel_eps_error_per_step`` keeps the curve;
* ``psnr`` / ``ssim`` of the slimmed model's final samples vs the original model's samples from the same noise;
* ``adherence`` (``default`` and ``flux_tiny``): automatic prompt-adherence score of the slimmed model's samples;
* ``rel_guided_eps_error`` (``default`` and ``flux_tiny``, rows measured from 2026-12-02 on): the same error of the
  prediction the sampler reads under CFG, ``ε_u + w (ε_c − ε_u)`` per step; on flux-tiny it is about twice
  ``rel_eps_error`` (decisions.md rows 32 and 34: the two can rank candidates differently).

Methods: ``slimdiff`` (the full method, ``SlimConfig`` defaults) and the baselines of benchmarks/baselines.py.
Ablations of the full method (``--ablations``) are measured with the same metrics; the ``cal_samples_*`` ones
re-calibrate with another number of samples.

    PYTHONPATH=. python benchmarks/quality.py --model anime64 --keep 0.8 0.6 0.4 0.2 --ablations
    PYTHONPATH=. python benchmarks/quality.py --model default --keep 0.8 0.6 0.4 --ablations
    PYTHONPATH=. python benchmarks/quality.py --model default --methods obs_pruning --append
    PYTHONPATH=. python benchmarks/quality.py --model flux_tiny --keep 0.8 0.6 0.4 --eval-seeds 4 --threads 1
    PYTHONPATH=. python benchmarks/quality.py --model flux_tiny --keep 0.6 --methods slimdiff --threads 1 --append

Writes ``benchmarks/results/quality_<model>.json`` after every measured row (a partial run keeps its rows).

``--eval-set validation`` evaluates on calibration prompts that the calibration does not use (those after the
first ``--cal-samples``, skipping ``--eval-offset`` more for a fresh slice) instead of the held-out prompts, and writes
``benchmarks/results/validation/quality_<model>.json``: settings are chosen there, and the held-out prompts are
left for reporting (decisions.md row 20).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import slimdiff_diffusers as sd  # noqa: E402
from benchmarks import baselines as bl  # noqa: E402
from benchmarks.common import anime64_dir, machine_info, write_json  # noqa: E402
from slimdiff_diffusers.evaluation.image_metrics import psnr, psnr_per_image, ssim  # noqa: E402

METHODS = ("slimdiff", *bl.BASELINES)
NUM_BUCKETS = 5  # calibration keeps 5 timestep buckets so that weighting ablations need no re-calibration
CALIBRATION_BATCH = 8  # prompts per pipeline call while calibrating (both passes, so their calls are the same)

# Ablations of the full method: name -> SlimConfig overrides. Bucket 0 holds the lowest timesteps (least noise,
# the last sampling steps); bucket 4 the highest (most noise, the first sampling steps).
ABLATIONS: dict[str, dict[str, Any]] = {
    "tw_equal_buckets": {"timestep_weighting": [1.0] * NUM_BUCKETS},
    "tw_high_noise_only": {"timestep_weighting": [0.0, 0.0, 0.0, 1.0, 1.0]},
    "tw_low_noise_only": {"timestep_weighting": [1.0, 1.0, 0.0, 0.0, 0.0]},
    "vo_attention_output": {"vo_statistics": "attention_output"},
    "vo_input": {"vo_statistics": "input"},
    "vo_attention_output_joint": {"vo_statistics": {"plain": "input", "joint": "attention_output", "single": "input"}},
    "vo_attention_output_single": {"vo_statistics": {"plain": "input", "joint": "input", "single": "attention_output"}},
    "prop_block_influence": {"propagation": "block_influence"},
    "prop_none": {"propagation": "none"},
    "prop_power_1": {"propagation_power": 1.0},
    "ffn_no_bias_refit": {"ffn_refit_bias": False},
    "ffn_greedy": {"ffn_selection": "greedy"},
    "ffn_leverage": {"ffn_selection": "leverage"},
    "grid_fine": {"rank_multiple": 4, "ffn_multiple": 16},
    "alloc_exchange": {"allocation_refinement": "exchange"},
    "alloc_refill_only": {"allocation_refinement": "refill"},
    "alloc_descent_only": {"allocation_refinement": "none"},
    "vo_refit_attention_output": {"vo_output_refit": "attention_output"},
    "vo_refit_none": {"vo_output_refit": "none"},
}
ABLATION_DESCRIPTIONS = {
    "slimdiff": "full method (SlimConfig defaults: SIS + ARA, refined by refill and 1-exchange on Flux/SD3 "
                "transformers and the descent alone on UNets/PixArt, probe propagation, power 2, VO whitened with the value "
                "input (with the attention output in Flux single-stream attention, decisions row 31), VO readers "
                "refit in joint and single-stream attention, FFN channels by greedy selection (decisions row 35), "
                "uniform-over-steps weighting)",
    "tw_equal_buckets": "timestep weighting: equal weight per timestep bucket (5 buckets)",
    "tw_high_noise_only": "timestep weighting: only the two highest-noise buckets (first sampling steps)",
    "tw_low_noise_only": "timestep weighting: only the two lowest-noise buckets (last sampling steps)",
    "vo_attention_output": "VO whitened with each head's attention output ('P-aware') in every attention",
    "vo_input": "VO whitened with the value input in every attention",
    "vo_attention_output_joint": "VO whitened with the attention output in joint (double-stream) attention only, "
                                 "with the value input elsewhere",
    "vo_attention_output_single": "VO whitened with the attention output in Flux single-stream attention only, "
                                  "with the value input elsewhere (the default's choice since decisions row 31)",
    "prop_block_influence": "propagation factor = MoDeGPT block influence instead of the perturbation probe",
    "prop_none": "no propagation factor (π = 1)",
    "prop_power_1": "influence α = π·ε (power 1) instead of π²·ε",
    "ffn_no_bias_refit": "FFN refit keeps the original down bias (no intercept in the least-squares refit)",
    "ffn_greedy": "FFN channels chosen by output-aware greedy forward selection (ffn_selection='greedy', "
                  "method.md §3.1.1; the default since decisions row 35)",
    "ffn_leverage": "FFN channels chosen by top ridge leverage scores of the hidden activation (ffn_selection="
                    "'leverage', method.md §3.1, MoDeGPT's Nyström selection; the default before decisions row 35)",
    "grid_fine": "a finer rank grid: per-head ranks in steps of 4 (default 8), FFN widths in steps of 16 (default 64)",
    "alloc_exchange": "ARA's greedy descent, then refill and 1-exchange local search (allocation_refinement="
                      "'exchange'; the default on Flux/SD3 transformers)",
    "alloc_refill_only": "ARA's greedy descent, then refill of the budget it left unused, without the 1-exchange "
                         "search (allocation_refinement='refill')",
    "alloc_descent_only": "ARA's greedy descent alone, the allocation before decisions.md row 22 "
                          "(allocation_refinement='none')",
    "vo_refit_attention_output": "VO readers (to_out.0, to_add_out, single-stream proj_out's attention columns) "
                                 "refit by least squares against the head outputs they read, in every attention "
                                 "(vo_output_refit='attention_output')",
    "vo_refit_none": "VO readers keep the SVD's own factor in every attention (vo_output_refit='none')",
}


# --------------------------------------------------------------------------------------------------
# Workloads: a model, how to calibrate it and how to evaluate a candidate
# --------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One model under test."""

    name: str
    model: nn.Module
    targets: tuple[str, ...]
    calibrate: Callable[[int, bool], bl.BaselineCalibration | sd.Calibration]  # (samples, with_extras)
    evaluate: Callable[[nn.Module, bool], dict[str, Any]]  # (candidate, with_samples) -> metrics
    settings: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)  # metrics of the original model itself


def _step_errors(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> list[float]:
    return [float((b.double() - a.double()).norm() / a.double().norm().clamp_min(1e-30)) for a, b in zip(reference, candidate)]


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    return ((x.double().clamp(-1, 1) + 1) / 2)


def anime64_workload(args: argparse.Namespace) -> Workload:
    """The trained anime64 UNet with its DDIM sampler (attention q/k/v/out are the compressible set)."""
    sys.path.insert(0, str(anime64_dir()))
    from anime64 import load_anime64  # type: ignore
    from diffusers import DDIMScheduler

    unet, train_scheduler = load_anime64()
    scheduler = DDIMScheduler.from_config(train_scheduler.config, clip_sample=True, set_alpha_to_one=True)
    steps = args.steps or 12

    @torch.no_grad()
    def sample(model: nn.Module, seed: int, count: int) -> tuple[list[tuple[torch.Tensor, int]], list[torch.Tensor], torch.Tensor]:
        """(trajectory of (x_t, t), ε per step, final x_0) of ``model``'s DDIM sampling from seeded noise."""
        scheduler.set_timesteps(steps)
        x = torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        trajectory, eps_list = [], []
        for t in scheduler.timesteps:
            trajectory.append((x.clone(), int(t)))
            eps = model(x, t).sample
            eps_list.append(eps)
            x = scheduler.step(eps, t, x).prev_sample
        return trajectory, eps_list, x

    eval_traj, eval_eps, eval_final = sample(unet, 1000, args.eval_samples)

    def calibrate(samples: int, with_extras: bool):
        cal_traj, _, _ = sample(unet, 0, samples)

        def run() -> None:
            for x, t in cal_traj:
                unet(x, t)

        config = sd.CalibrationConfig(num_train_timesteps=300, num_timestep_buckets=NUM_BUCKETS,
                                      attention_output_statistics=True)  # the vo_* ablations
        if with_extras:
            return bl.calibrate_with_extras(unet, run, config)
        return sd.calibrate(unet, run, config)

    @torch.no_grad()
    def evaluate(candidate: nn.Module, with_samples: bool) -> dict[str, Any]:
        per_step = _step_errors(eval_eps, [candidate(x, t).sample for x, t in eval_traj])
        out: dict[str, Any] = {"rel_eps_error": float(np.mean(per_step)), "rel_eps_error_per_step": per_step}
        if with_samples:
            _, _, final = sample(candidate, 1000, args.eval_samples)
            out["psnr"] = psnr(_to_unit_range(eval_final), _to_unit_range(final))
            out["ssim"] = ssim(_to_unit_range(eval_final), _to_unit_range(final))
        return out

    settings = {"steps": steps, "sampler": "DDIM (clip_sample, set_alpha_to_one), eta 0", "eval_seed": 1000,
                "calibration_seed": 0, "image_size": 64}
    return Workload("anime64", unet, ("qk", "vo"), calibrate, evaluate, settings)


def _clone(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def pipeline_workload(args: argparse.Namespace, name: str, pipe, embedded, sampler: str,
                      pipeline_label: str) -> Workload:
    """An embedded text-to-image pipeline (sd-tiny's UNet or flux-tiny's transformer): calibration prompts for
    calibration, held-out prompts for evaluation, sampled as the embedded model's registry entry ``embedded``
    says it was trained (``EmbeddedModel.generation_kwargs``: steps, guidance and how it is passed, negative
    prompt, image size, text length; CFG for sd-tiny, true CFG with an empty negative prompt for flux-tiny), as
    ``slimdiff slim`` and benchmarks/stack.py sample it. ``--steps`` overrides the steps."""
    from slimdiff_diffusers.default_model import CALIBRATION_PROMPTS, HELDOUT_PROMPTS
    from slimdiff_diffusers.default_model.evaluate import generate_images
    from slimdiff_diffusers.diffusers_adapter.pipeline import calibrate_pipeline
    from slimdiff_diffusers.diffusers_adapter.slimset import SlimSet
    from slimdiff_diffusers.evaluation.adherence import evaluate_adherence, summarize_adherence

    attr = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    denoiser = getattr(pipe, attr)
    steps = args.steps or embedded.num_inference_steps
    guidance = embedded.guidance_scale

    def call_kwargs(batch: int) -> dict[str, Any]:
        """Every argument of one pipeline call of ``batch`` prompts but the prompt, the generators and the output
        type: the registry's, one negative prompt per prompt."""
        return embedded.generation_kwargs(num_inference_steps=steps, batch_size=batch)

    # Every held-out prompt with --eval-seeds seeds: adherence is a mean of per-image scores, and 32 images
    # alone leave it a standard error of ~0.08, larger than the differences between good methods.
    if args.eval_set == "validation":
        # Calibration prompts that the calibration does not use (those after the first --cal-samples): a set to
        # choose settings on, so that the held-out prompts stay for reporting.
        start = args.cal_samples + args.eval_offset
        held_out = list(CALIBRATION_PROMPTS)[start: start + args.eval_samples]
        if len(held_out) < args.eval_samples:
            raise SystemExit(f"--eval-set validation: only {len(held_out)} calibration prompts after the first "
                             f"{start}")
    else:
        held_out = list(HELDOUT_PROMPTS)[: args.eval_samples]
    prompts = held_out * args.eval_seeds
    seeds = [10_000 + i for i in range(len(prompts))]
    batch_size = 32

    @torch.no_grad()
    def record_calls(model: nn.Module) -> tuple[list[tuple[tuple, dict]], list[torch.Tensor], np.ndarray]:
        """Generate the held-out images with ``model`` as the pipeline's denoiser; record every call and output."""
        calls: list[tuple[tuple, dict]] = []
        outputs: list[torch.Tensor] = []

        def pre(_m, a, kw):
            calls.append((tuple(_clone(v) for v in a), {k: _clone(v) for k, v in kw.items()}))

        def post(_m, _a, _kw, out):
            outputs.append((out[0] if isinstance(out, tuple) else out.sample).clone())

        handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
                   model.register_forward_hook(post, with_kwargs=True)]
        original = getattr(pipe, attr)
        setattr(pipe, attr, model)
        try:
            images = generate_images(pipe, prompts, seeds, num_inference_steps=steps, batch_size=batch_size,
                                     model=embedded)  # the registry's sampler (pipeline_call_kwargs)
        finally:
            setattr(pipe, attr, original)
            for h in handles:
                h.remove()
        return calls, outputs, images

    ref_calls, ref_outputs, ref_images = record_calls(denoiser)
    batches = -(-len(prompts) // batch_size)
    calls_per_step = len(ref_calls) // (batches * steps)  # 2 for flux-tiny's true CFG (two calls per step)

    def guided(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each step's prediction as the sampler combines it, ``ε_u + w (ε_c − ε_u)``: true CFG calls the denoiser
        for the conditional rows, then the unconditional ones (diffusers' Flux pipelines); CFG calls it once on
        ``[unconditional; conditional]`` rows (diffusers' Stable Diffusion pipelines)."""
        if calls_per_step == 2:
            return [u + guidance * (c - u) for c, u in zip(outputs[0::2], outputs[1::2])]
        if outputs[0].shape[0] % 2:
            raise RuntimeError("a CFG call with an odd number of rows: not [unconditional; conditional]")
        half = outputs[0].shape[0] // 2
        return [o[:half] + guidance * (o[half:] - o[:half]) for o in outputs]
    guided_prediction = guided if guidance > 1.0 else None

    def adherence(images: np.ndarray) -> tuple[float, list[float]]:
        """Mean adherence and the per-image scores (the report pairs them image by image across methods)."""
        results = [evaluate_adherence(img, p) for img, p in zip(images, prompts)]
        return summarize_adherence(results)["overall"], [float(r.overall) for r in results]

    ref_adherence, ref_per_image = adherence(ref_images)
    reference = {"adherence": ref_adherence, "adherence_per_image": ref_per_image}

    def calibrate(samples: int, with_extras: bool):
        slimset = SlimSet(list(CALIBRATION_PROMPTS[:samples]), list(range(samples)))
        config = sd.CalibrationConfig(num_timestep_buckets=NUM_BUCKETS,
                                      attention_output_statistics=True)  # the vo_* ablations
        # calibrate_pipeline repeats the negative prompt per prompt (flux-tiny's true CFG needs "" in every call)
        # and buckets Flux's t / 1000 over [0, 1] (num_train_timesteps 1), as the weighting ablations need.
        calibration = calibrate_pipeline(pipe, slimset, batch_size=CALIBRATION_BATCH, config=config, progress=False,
                                         **embedded.generation_kwargs(num_inference_steps=steps))
        if not with_extras:
            return calibration
        # The extra statistics come from a second pass over the same prompts, seeds and sampler: calibrate_pipeline
        # also runs propagation probes, whose perturbed forward passes must not enter these statistics.
        with bl.collect_extra_statistics(denoiser, calibration.sites) as result, torch.no_grad():
            for i in range(0, samples, CALIBRATION_BATCH):
                gens = [torch.Generator().manual_seed(s) for s in slimset.seeds[i:i + CALIBRATION_BATCH]]
                batch = slimset.prompts[i:i + CALIBRATION_BATCH]
                pipe(prompt=batch, generator=gens, output_type="latent", **call_kwargs(len(batch)))
        return bl.BaselineCalibration(calibration, result())

    @torch.no_grad()
    def evaluate(candidate: nn.Module, with_samples: bool) -> dict[str, Any]:
        cand = [(candidate(*a, **kw)[0] if not kw.get("return_dict", True) else candidate(*a, **kw).sample)
                for a, kw in ref_calls]
        errors = _step_errors(ref_outputs, cand)
        # calls are batch-major, then step, then the CFG calls of one step
        per_call_step = [(i % (steps * calls_per_step)) // calls_per_step for i in range(len(errors))]
        per_step = [float(np.mean([e for e, k in zip(errors, per_call_step) if k == i])) for i in range(steps)]
        out: dict[str, Any] = {"rel_eps_error": float(np.mean(errors)), "rel_eps_error_per_step": per_step}
        if guided_prediction is not None:  # what the sampler reads under CFG (decisions.md rows 32 and 34)
            out["rel_guided_eps_error"] = float(np.mean(_step_errors(guided_prediction(ref_outputs),
                                                                     guided_prediction(cand))))
        if with_samples:
            _, _, images = record_calls(candidate)
            out["psnr_per_image"] = psnr_per_image(ref_images, images)  # paired standard errors between methods
            out["psnr"] = float(np.mean(out["psnr_per_image"]))  # what psnr() returns, without measuring twice
            out["ssim"] = ssim(ref_images, images)
            out["adherence"], out["adherence_per_image"] = adherence(images)
        return out

    settings = {"steps": steps, "guidance_scale": guidance, "sampler": sampler, "pipeline": pipeline_label,
                "sampler_from": f"the {embedded.name} registry entry (EmbeddedModel.generation_kwargs)",
                "eval_prompts": len(held_out), "eval_images": len(prompts), "eval_seeds": f"{seeds[0]}..{seeds[-1]}",
                "image_size": call_kwargs(1).get("height") or denoiser.config.sample_size * pipe.vae_scale_factor,
                "denoiser_calls_per_step": calls_per_step}
    return Workload(name, denoiser, ("qk", "vo", "ffn"), calibrate, evaluate, settings, reference)


def default_workload(args: argparse.Namespace) -> Workload:
    """The embedded UNet text-to-image pipeline (sd-tiny), sampled as its registry entry says (25 DDIM steps,
    CFG 7.5)."""
    from slimdiff_diffusers.default_model import DEFAULT_MODEL_NAME, get_embedded_model

    embedded = get_embedded_model(DEFAULT_MODEL_NAME)
    if args.pipeline_dir:  # another folder in the default model's format (development, or a retrained model)
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.pipeline_dir, torch_dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = embedded.load()
    return pipeline_workload(args, "default", pipe, embedded, "DDIM (pipeline default)",
                             str(args.pipeline_dir or "slimdiff_diffusers/default_model/pipeline"))


def flux_tiny_workload(args: argparse.Namespace) -> Workload:
    """The embedded Flux-architecture pipeline (flux-tiny), sampled as its registry entry says: 25 flow-matching
    Euler steps, true CFG 4 with an empty negative prompt (docs/flux_tiny_model.md). QK stays whole (QK-norm +
    RoPE)."""
    from slimdiff_diffusers.default_model import get_embedded_model

    embedded = get_embedded_model("flux-tiny")
    return pipeline_workload(args, "flux_tiny", embedded.load(), embedded,
                             "FlowMatchEulerDiscrete (pipeline default), true CFG, empty negative prompt",
                             "slimdiff_diffusers/default_model/flux_tiny")


WORKLOADS = {"anime64": anime64_workload, "default": default_workload, "flux_tiny": flux_tiny_workload}


# --------------------------------------------------------------------------------------------------
# Running methods
# --------------------------------------------------------------------------------------------------


def build(method: str, workload: Workload, calibration: bl.BaselineCalibration | sd.Calibration,
          keep: float, overrides: dict[str, Any] | None = None) -> nn.Module:
    """The slimmed model of ``method`` (a baseline name, or "slimdiff" with optional SlimConfig overrides)."""
    if method == "slimdiff":
        cal = calibration.calibration if isinstance(calibration, bl.BaselineCalibration) else calibration
        return sd.slim(workload.model, cal, sd.SlimConfig(keep_ratio=keep, targets=workload.targets, **(overrides or {})))
    return bl.BASELINES[method](workload.model, calibration, keep, targets=workload.targets)


def allocation_of(model: nn.Module) -> dict[str, Any] | None:
    """Per-group kept rank / full rank, predicted error and influence of a SlimDiff-built model."""
    report = getattr(model, "slimdiff_report", None)
    if report is None:
        return None
    return {g.name: {"rank": g.rank, "full": g.full_rank, "predicted_error": g.predicted_error,
                     "influence": g.influence} for g in report.groups}


# Settings that must agree for rows of two runs to share one results file (and one reference).
_SHARED_SETTINGS = ("cal_samples", "eval_samples", "eval_seeds", "steps", "guidance_scale", "pipeline", "targets",
                    "timestep_buckets", "eval_images", "eval_set", "eval_offset")


def _appended(payload: dict[str, Any], old: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``payload`` carrying ``old``'s rows, after checking both runs measured the same thing the same way."""
    defaults = {"eval_set": "heldout", "eval_offset": 0}  # results written before these options existed
    mismatched = [k for k in _SHARED_SETTINGS
                  if old["settings"].get(k, defaults.get(k)) != payload["settings"].get(k, defaults.get(k))]
    if old.get("model") != payload["model"] or mismatched:
        raise SystemExit(f"--append: the existing results differ in {mismatched or ['model']}; use --out elsewhere")
    ref_old, ref_new = old.get("reference", {}).get("adherence"), payload["reference"].get("adherence")
    if (ref_old is None) != (ref_new is None) or (ref_old is not None and abs(ref_old - ref_new) > 1e-9):
        raise SystemExit(f"--append: the original model's reference adherence differs ({ref_old} vs {ref_new}): "
                         "not the same model or sampler")
    payload["results"] = list(old["results"])
    payload["command"] = f"{old['command']} ; then {payload['command']}"
    payload["calibration_seconds"] = old.get("calibration_seconds", payload["calibration_seconds"])
    payload["settings"]["methods"] = list(dict.fromkeys([*old["settings"].get("methods", []), *args.methods]))
    payload["settings"]["keep"] = sorted({*old["settings"].get("keep", []), *args.keep}, reverse=True)
    # The ablations of every part (a merged file's settings say what its rows measured, not only the last part)
    payload["settings"]["ablations"] = list(dict.fromkeys([*(old["settings"].get("ablations") or []),
                                                           *(payload["settings"].get("ablations") or [])]))
    payload["settings"]["ablation_keep"] = sorted({*(old["settings"].get("ablation_keep") or []),
                                                   *(payload["settings"].get("ablation_keep") or [])}, reverse=True)
    payload["total_seconds_previous_runs"] = old.get("total_seconds", 0.0) + old.get("total_seconds_previous_runs", 0.0)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(WORKLOADS), default="anime64")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--keep", nargs="+", type=float, default=None,
                        help="keep ratios (default: 0.8 0.6 0.4 0.2 for anime64, 0.8 0.6 0.4 for default)")
    parser.add_argument("--ablations", nargs="*", default=None,
                        help="ablation names (no names: all that apply to the model); see ABLATIONS")
    parser.add_argument("--cal-sample-ablation", nargs="*", type=int, default=[],
                        help="other numbers of calibration samples to measure the full method with")
    parser.add_argument("--ablation-keep", nargs="+", type=float, default=None, help="keep ratios of the ablations")
    parser.add_argument("--ablation-samples", action="store_true", help="also PSNR/SSIM/adherence for ablations")
    parser.add_argument("--cal-samples", type=int, default=None, help="calibration images (anime64) / prompts (default)")
    parser.add_argument("--eval-samples", type=int, default=None, help="evaluation images / held-out prompts")
    parser.add_argument("--eval-seeds", type=int, default=4,
                        help="default model: images per held-out prompt (different seeds)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (anime64: 12, default: 25)")
    parser.add_argument("--eval-set", choices=["heldout", "validation"], default="heldout",
                        help="default / flux_tiny: evaluate on the held-out prompts (reported results) or on "
                             "calibration prompts the calibration does not use (for choosing settings)")
    parser.add_argument("--eval-offset", type=int, default=0,
                        help="--eval-set validation: skip this many prompts after the calibration's (a fresh "
                             "validation slice once the first has been used for a decision)")
    parser.add_argument("--pipeline-dir", default=None, help="default model only: load this pipeline folder instead")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an existing results file (same settings, same reference) and add or "
                             "replace only the rows measured now (a long benchmark in parts, or a new baseline)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="measure nothing: merge these results files of one model (parts run in parallel, same "
                             "settings and reference, checked) into --out")
    args = parser.parse_args(argv)
    if args.merge:
        out_path = Path(args.out or ROOT / "benchmarks" / "results" / f"quality_{args.model}.json")
        parts = [json.loads(p.read_text()) for p in args.merge]
        merged = parts[0]
        for part in parts[1:]:
            rows = part["results"]
            merged = _appended(part, merged, argparse.Namespace(methods=part["settings"]["methods"],
                                                                 keep=part["settings"]["keep"]))
            measured = {(r["kind"], r["method"], r["keep_ratio"]) for r in rows}
            merged["results"] = [r for r in merged["results"]
                                 if (r["kind"], r["method"], r["keep_ratio"]) not in measured] + rows
        write_json(out_path, merged)
        print(f"merged {len(parts)} files into {out_path} ({len(merged['results'])} rows)")
        return
    torch.set_num_threads(args.threads)
    defaults = {"anime64": ([0.8, 0.6, 0.4, 0.2], 8, 8), "default": ([0.8, 0.6, 0.4], 100, 32),
                "flux_tiny": ([0.8, 0.6, 0.4], 32, 32)}[args.model]
    args.keep = args.keep or defaults[0]
    args.cal_samples = args.cal_samples or defaults[1]
    args.eval_samples = args.eval_samples or defaults[2]
    args.ablation_keep = args.ablation_keep or args.keep
    if args.ablations is not None and not args.ablations:
        args.ablations = [a for a in ABLATIONS if args.model != "anime64" or not a.startswith("ffn_")]
    if args.eval_set == "validation" and args.model == "anime64":
        raise SystemExit("--eval-set validation is for the prompt-driven models (default, flux_tiny)")
    if args.eval_offset and args.eval_set != "validation":
        raise SystemExit("--eval-offset picks another validation slice: it needs --eval-set validation")
    if args.model == "anime64":
        args.eval_seeds = None  # no prompts: --eval-samples images, one seed each (recorded as before the option)
    # Validation results live in their own folder: benchmarks/report.py reads every results/quality_*.json as a
    # model's reported (held-out) results.
    results = ROOT / "benchmarks" / "results" / ("validation" if args.eval_set == "validation" else "")
    out_path = Path(args.out or results / f"quality_{args.model}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    workload = WORKLOADS[args.model](args)
    t0 = time.perf_counter()
    calibration = workload.calibrate(args.cal_samples, True)
    calibration_seconds = time.perf_counter() - t0
    cal = calibration.calibration
    diagnostics = {
        "blocks": {b: {"propagation_probe": (cal.propagation or {}).get(b), "block_influence": cal.block_influence(b)}
                   for b in cal.sites.blocks},
        "total_compressible_params": bl.compressible_params(workload.model, cal.sites, workload.targets),
        "model_params": sum(p.numel() for p in workload.model.parameters()),
    }
    payload: dict[str, Any] = {
        "benchmark": "quality", "model": args.model,
        "command": "PYTHONPATH=. python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(), "slimdiff_version": sd.__version__,
        "settings": vars(args) | workload.settings | {"targets": list(workload.targets), "timestep_buckets": NUM_BUCKETS},
        "calibration_seconds": calibration_seconds, "reference": workload.reference,
        "ablation_descriptions": ABLATION_DESCRIPTIONS, "diagnostics": diagnostics, "results": [],
    }

    if args.append and out_path.is_file():
        payload = _appended(payload, json.loads(out_path.read_text()), args)

    def measure(kind: str, method: str, keep: float, cal, overrides: dict[str, Any] | None = None,
                with_samples: bool = True, cal_samples: int | None = None) -> None:
        """Build ``method`` (an ablation name builds "slimdiff" with ``overrides``), evaluate it, save the row."""
        t = time.perf_counter()
        try:
            model = build(method if method in METHODS else "slimdiff", workload, cal, keep, overrides)
        except (sd.BudgetError, ValueError) as exc:  # a cap or floor that cannot reach the budget, a weighting
            # with no data in its buckets: recorded, not hidden
            payload["results"].append({"kind": kind, "method": method, "keep_ratio": keep, "error": str(exc)})
            print(f"{kind:>8} {method:>22} keep={keep:.2f} cannot be built: {exc}", flush=True)
            return
        build_seconds = time.perf_counter() - t
        metrics = workload.evaluate(model, with_samples)
        row = {"kind": kind, "method": method, "keep_ratio": keep,
               "compressible_kept": bl.compressible_params(model, cal.sites, workload.targets)
               / diagnostics["total_compressible_params"],
               "model_params": sum(p.numel() for p in model.parameters()),
               "build_seconds": build_seconds, "seconds": time.perf_counter() - t, **metrics}
        if cal_samples is not None:
            row["cal_samples"] = cal_samples
        payload["results"] = [r for r in payload["results"]
                              if (r["kind"], r["method"], r["keep_ratio"]) != (kind, method, keep)]
        if kind == "main" and method == "slimdiff":
            row["allocation"] = allocation_of(model)
        if kind == "main" and method == "modegpt_madac":
            row["block_keep"] = bl.modegpt_rank_pattern(workload.model, calibration, keep, workload.targets)[1]
        payload["results"].append(row)
        extras = " ".join(f"{k}={row[k]:.4f}" for k in ("psnr", "ssim", "adherence") if k in row)
        print(f"{kind:>8} {method:>22} keep={keep:.2f} kept={row['compressible_kept']:.3f} "
              f"rel_eps={row['rel_eps_error']:.5f} {extras} ({row['seconds']:.0f}s)", flush=True)
        payload["total_seconds"] = time.perf_counter() - started
        write_json(out_path, payload)

    for keep in args.keep:
        for method in args.methods:
            measure("main", method, keep, calibration)
    for name in args.ablations or []:
        for keep in args.ablation_keep:
            measure("ablation", name, keep, calibration, ABLATIONS[name], args.ablation_samples)
    for samples in args.cal_sample_ablation:
        t = time.perf_counter()
        other = workload.calibrate(samples, False)
        print(f"calibration with {samples} samples: {time.perf_counter() - t:.0f}s", flush=True)
        for keep in args.ablation_keep:
            measure("ablation", f"cal_samples_{samples}", keep, other, {}, args.ablation_samples, cal_samples=samples)
    payload["total_seconds"] = time.perf_counter() - started
    write_json(out_path, payload)
    print(f"wrote {out_path} ({payload['total_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
