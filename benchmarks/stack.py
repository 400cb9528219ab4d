"""What SlimDiff buys stacked with int8 quantization, step caching and torch.compile (issue 13).

Variants (each also compiled, ``+compile``, where ``--compile`` asks for it and compilation runs):

* ``original``; ``slim`` (SlimDiff at ``--keep`` of the FLOPs, default 0.6);
* ``int8``: torchao ``quantize_`` (``--int8 dynamic``: int8 activations and weights, or ``weight_only``);
* ``slim+int8``; ``cache`` (DeepCache on UNets, ``--cache-interval`` steps; diffusers' First Block Cache on
  transformers); ``slim+cache``; ``slim+int8+cache``.

Measurements, one process, variants interleaved round by round so drifting machine load hits all alike:

* ``call_ms``: median wall time of one denoiser call (batch 2: the CFG pair), non-cache variants (a cache acts
  across steps: its gain is in ``loop_ms``);
* ``loop_ms``: median wall time of the full pipeline call (``--steps`` steps with CFG, VAE decode);
* ``disk_bytes``: the denoiser's state dict saved with ``torch.save`` (quantized tensors included);
  ``weight_bytes``: its tensors' bytes in memory; ``peak_memory_bytes`` (CUDA only): the denoiser's weights plus
  the peak one sampling loop allocates above everything resident (the other variants stay loaded meanwhile);
* quality against the original: ``rel_eps_error`` (the variant fed the original's own sampling trajectory,
  every call in order, so a cache's reuse is part of it), PSNR / SSIM of the final images, and on the embedded
  model prompt adherence with its paired standard error against the original (same prompts and seeds).

Models (:data:`MODELS`; a builder returns a :class:`Workload`): ``default`` (the embedded trained UNet
text-to-image pipeline, ``sd-tiny``, 32 px), ``flux-tiny`` (the embedded trained Flux-architecture pipeline, 32 px,
true CFG 4: its cache variant is diffusers' First Block Cache, ``transformer.enable_cache(FirstBlockCacheConfig)``;
both embedded models are calibrated and sampled with the settings of their registry entry, as ``slimdiff slim``)
and ``sd15`` (the real SD1.5 UNet and VAE configurations, random weights: timing is real, quality only says how
far each variant moves the output).

A variant whose library is missing or fails is recorded with its reason (``skipped``), never crashes the run.
Results are written after every step to ``benchmarks/results/stack_<model>_<device>.json``; render the README
table with ``python benchmarks/render_readme.py`` and the plot with ``python benchmarks/stack.py --plot-only``.

    python benchmarks/stack.py --model default                      # CPU, ~25 min on 2 loaded cores
    python benchmarks/stack.py --model default --quick              # smoke test (a minute or two)
    python benchmarks/stack.py --model flux-tiny                    # the trained transformer default
    python benchmarks/stack.py --model sd15 --device cuda --dtype float16 --compile both
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import statistics
import sys
import tempfile
import time
import types
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
from benchmarks.common import machine_info, write_json  # noqa: E402
from slimdiff_diffusers.evaluation.image_metrics import psnr, ssim  # noqa: E402

VARIANTS = ("original", "slim", "int8", "slim+int8", "cache", "slim+cache", "slim+int8+cache")


# --------------------------------------------------------------------------------------------------
# Workloads: a pipeline, how to calibrate its denoiser, and what to feed it
# --------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One model under test: a diffusers pipeline and how to drive it."""

    name: str
    pipe: Any
    denoiser_name: str  # "unet" or "transformer"
    calibrate: Callable[[], sd.Calibration]
    call_inputs: Callable[[], tuple[tuple, dict]]  # one denoiser call (batch 2)
    prompts: list[str] | None  # None: precomputed embeddings (``embeddings``)
    seeds: list[int]
    generate_kwargs: dict[str, Any]
    embeddings: Callable[[int], dict] | None = None  # batch -> pipeline kwargs (no text encoder)
    batch_kwargs: Callable[[int], dict] | None = None  # batch -> further per-batch kwargs (Flux's negative prompts)
    adherence: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    slim_options: dict[str, Any] = field(default_factory=dict)  # extra SlimConfig settings for this workload

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_name)


def _sd15_workload(args, device, dtype) -> Workload:
    """The SD1.5 UNet/VAE configurations with random weights (benchmarks/speed.py), no text encoder."""
    from diffusers import UNet2DConditionModel

    from benchmarks.speed import SD15, inputs, prompt_embeddings, sampling_pipeline

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15).eval().to(device, dtype)
    pipe = sampling_pipeline("sd15", unet, device, dtype)
    resolution = args.resolution or 256
    steps = args.steps or 10
    count = args.eval_prompts * args.eval_seeds

    # random weights carry no structure: ranks only need the shapes' statistics, so no propagation probe
    # (block influence instead, as benchmarks/speed.py does)
    def calibrate() -> sd.Calibration:
        x, kw = inputs("sd15", 2, resolution, device, dtype)
        return sd.calibrate(unet, lambda: [unet(x, t, **kw) for t in (800, 500, 200)],
                            sd.CalibrationConfig(propagation_probe_calls=0, accumulate_dtype=torch.float32))

    def call_inputs():
        x, kw = inputs("sd15", 2, resolution, device, dtype)
        return (x, 500), kw

    return Workload("sd15", pipe, "unet", calibrate, call_inputs, None, [20_000 + i for i in range(count)],
                    {"num_inference_steps": steps, "guidance_scale": 7.5, "height": resolution, "width": resolution},
                    embeddings=lambda batch: prompt_embeddings("sd15", batch, device, dtype),
                    settings={"steps": steps, "guidance_scale": 7.5, "resolution": resolution, "eval_images": count,
                              "weights": "random (real SD1.5 UNet and VAE configurations)"},
                    slim_options={"propagation": "block_influence"})


def _embedded_workload(name: str, args, device, dtype) -> Workload:
    """An embedded trained pipeline (``sd-tiny``, ``flux-tiny``), sampled as its registry entry says it was trained
    (``EmbeddedModel.generation_kwargs``: steps, guidance and how it is passed, negative prompt, image size, text
    length), calibration and evaluation alike, as ``slimdiff slim NAME`` does: calibrated on its calibration
    prompts through the pipeline's own call (``calibrate_pipeline``: flux-tiny's true CFG runs the conditional and
    the empty-caption call of every step; its ``t / 1000`` timesteps are bucketed over [0, 1]), evaluated on
    held-out prompts. ``--steps`` overrides the trained steps."""
    from slimdiff_diffusers.default_model import CALIBRATION_PROMPTS, HELDOUT_PROMPTS, get_embedded_model
    from slimdiff_diffusers.diffusers_adapter.pipeline import calibrate_pipeline
    from slimdiff_diffusers.diffusers_adapter.slimset import SlimSet

    embedded = get_embedded_model(name)
    pipe = embedded.load(torch_dtype=dtype, device=device)
    prompts = list(HELDOUT_PROMPTS)[: args.eval_prompts] * args.eval_seeds
    seeds = [10_000 + i for i in range(len(prompts))]
    steps = args.steps or embedded.num_inference_steps
    # One string negative prompt: calibrate_pipeline repeats it per prompt; generation uses batch_kwargs below.
    sampler = embedded.generation_kwargs(num_inference_steps=steps)

    def calibrate() -> sd.Calibration:
        n = args.cal_prompts
        return calibrate_pipeline(pipe, SlimSet(list(CALIBRATION_PROMPTS[:n]), list(range(n))), progress=False,
                                  **sampler)

    def batch_kwargs(batch: int) -> dict:  # the guidance arguments with one negative prompt per prompt
        return embedded.guidance_kwargs(batch_size=batch)

    transformer = getattr(pipe, "transformer", None) is not None
    guidance = (f"true CFG {embedded.guidance_scale} (negative prompt {embedded.negative_prompt!r})"
                if "true_cfg_scale" in sampler else f"CFG {embedded.guidance_scale}")
    settings = {"steps": steps, "guidance": guidance, "guidance_scale": embedded.guidance_scale,
                "sampler_from": f"the {name} registry entry (EmbeddedModel.generation_kwargs)",
                "image_size": sampler.get("height") or pipe.unet.config.sample_size * pipe.vae_scale_factor,
                "eval_images": len(prompts), "eval_prompts": args.eval_prompts, "eval_seeds": args.eval_seeds,
                "calibration_prompts": args.cal_prompts}
    if transformer:
        settings["call_batch"] = "2 (two images; a sampling step makes two batch-1 calls: cond, uncond)"
        call_inputs = _flux_call_inputs(pipe, sampler, device, dtype)
    else:
        call_inputs = _unet_call_inputs(pipe, device, dtype)
    per_call = {k: v for k, v in sampler.items() if k not in batch_kwargs(1)}  # steps, size, text length
    return Workload(name, pipe, "transformer" if transformer else "unet",
                    calibrate, call_inputs, prompts, seeds, per_call, batch_kwargs=batch_kwargs, adherence=True,
                    settings=settings)


def _unet_call_inputs(pipe, device, dtype) -> Callable[[], tuple[tuple, dict]]:
    """One UNet call of two latents (the CFG pair) with random text states."""
    def call_inputs():
        unet = pipe.unet
        gen = torch.Generator().manual_seed(0)
        size = unet.config.sample_size
        x = torch.randn(2, unet.config.in_channels, size, size, generator=gen).to(device, dtype)
        ctx = torch.randn(2, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, generator=gen)
        return (x, 500), {"encoder_hidden_states": ctx.to(device, dtype)}
    return call_inputs


def _flux_call_inputs(pipe, sampler: dict, device, dtype) -> Callable[[], tuple[tuple, dict]]:
    """One Flux transformer call of two images at the sampled size and T5 length, with random states."""
    def call_inputs():
        model = pipe.transformer
        gen = torch.Generator().manual_seed(0)
        rows, cols = sampler["height"] // pipe.vae_scale_factor // 2, sampler["width"] // pipe.vae_scale_factor // 2
        text = sampler["max_sequence_length"]
        img_ids = torch.zeros(rows, cols, 3)
        img_ids[..., 1] += torch.arange(rows)[:, None]
        img_ids[..., 2] += torch.arange(cols)[None, :]
        kw = {"hidden_states": torch.randn(2, rows * cols, model.config.in_channels, generator=gen),
              "encoder_hidden_states": torch.randn(2, text, model.config.joint_attention_dim, generator=gen),
              "pooled_projections": torch.randn(2, model.config.pooled_projection_dim, generator=gen),
              "timestep": torch.full((2,), 0.5), "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(text, 3)}
        kw = {k: v.to(device, dtype) for k, v in kw.items()}
        return (), kw | {"return_dict": False}
    return call_inputs


def _default_workload(args, device, dtype) -> Workload:
    """The embedded default pipeline (``sd-tiny``): 25 DDIM steps, CFG 7.5, from its registry entry."""
    return _embedded_workload("sd-tiny", args, device, dtype)


def _flux_tiny_workload(args, device, dtype) -> Workload:
    """The embedded trained Flux-architecture pipeline (``flux-tiny``, 32 px, 64 image + 16 text tokens), from its
    registry entry: 25 Euler steps, true classifier-free guidance 4 (``true_cfg_scale`` with an empty negative
    prompt: two transformer calls per step, in diffusers' ``cond`` / ``uncond`` cache contexts), calibration
    included."""
    return _embedded_workload("flux-tiny", args, device, dtype)


# name -> builder(args, device, dtype) -> Workload. A transformer's cache variant uses diffusers' First Block Cache.
MODELS: dict[str, Callable[..., Workload]] = {"default": _default_workload, "sd15": _sd15_workload,
                                              "flux-tiny": _flux_tiny_workload}


# --------------------------------------------------------------------------------------------------
# Building variants
# --------------------------------------------------------------------------------------------------


class Skip(Exception):
    """A variant that cannot be built here (missing library, unsupported combination): recorded, not fatal."""


def quantize_int8(model: nn.Module, mode: str) -> nn.Module:
    """torchao ``quantize_`` on a copy of ``model``: int8 weight-only or dynamic int8 activations + weights."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise Skip(f"torchao is not installed ({exc}); pip install 'slimdiff-diffusers[stack]'") from exc
    config = Int8DynamicActivationInt8WeightConfig() if mode == "dynamic" else Int8WeightOnlyConfig()
    quantized = copy.deepcopy(model)
    quantize_(quantized, config)
    return quantized


class Cache:
    """A step cache around one pipeline's denoiser: DeepCache for UNets, First Block Cache for transformers."""

    def __init__(self, pipe, denoiser_name: str, interval: int, threshold: float):
        self.pipe, self.denoiser_name, self.interval, self.threshold = pipe, denoiser_name, interval, threshold
        self.helper = None

    def enable(self) -> None:
        if self.denoiser_name == "unet":
            try:
                from DeepCache import DeepCacheSDHelper
            except ImportError as exc:
                raise Skip(f"DeepCache is not installed ({exc}); pip install 'slimdiff-diffusers[stack]'") from exc
            self.helper = DeepCacheSDHelper(pipe=self.pipe)
            self.helper.set_params(cache_interval=self.interval, cache_branch_id=0)
            self.helper.enable()
        else:
            from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

            denoiser = getattr(self.pipe, self.denoiser_name)
            config = FirstBlockCacheConfig(threshold=self.threshold)
            if hasattr(denoiser, "enable_cache"):  # diffusers' CacheMixin (Flux, SD3, ...)
                denoiser.enable_cache(config)
            else:
                apply_first_block_cache(denoiser, config)

    def disable(self) -> None:
        if self.helper is not None:
            self.helper.disable()
            self.helper = None
        else:
            denoiser = getattr(self.pipe, self.denoiser_name)
            if hasattr(denoiser, "disable_cache"):
                denoiser.disable_cache()
            else:
                from diffusers.hooks import HookRegistry

                HookRegistry.check_if_exists_or_initialize(denoiser).remove_hook("fbc_leader_block_hook", recurse=True)
                HookRegistry.check_if_exists_or_initialize(denoiser).remove_hook("fbc_block_hook", recurse=True)


def compile_denoiser(model: nn.Module, scope: str) -> nn.Module:
    """Regional compilation (diffusers' ``compile_repeated_blocks``: the transformer blocks, where SlimDiff acts) on
    a copy; it composes with DeepCache, which re-routes whole UNet blocks. ``scope="full"`` compiles the module."""
    compiled = copy.deepcopy(model)
    # A slim model's blocks have different widths: each shape is its own compiled graph, more than dynamo's
    # default recompile limit (8) allows before it silently falls back to eager for the rest.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    if scope == "full":
        compiled.compile()
    else:
        compiled.compile_repeated_blocks(fullgraph=True)
    return compiled


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors in memory (a quantized tensor counts its inner data and scales)."""
    total = 0
    for t in model.state_dict().values():
        if type(t) is torch.Tensor:
            total += t.numel() * t.element_size()
        elif hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


def disk_bytes(model: nn.Module) -> int:
    """Size of the model's state dict saved with ``torch.save`` (safetensors cannot hold torchao tensors)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        torch.save(model.state_dict(), path)
        return path.stat().st_size


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def call_ms(model: nn.Module, workload: Workload, device) -> float:
    args, kw = workload.call_inputs()
    _sync(device)
    t0 = time.perf_counter()
    model(*args, **kw)
    _sync(device)
    return (time.perf_counter() - t0) * 1000


def _pipeline_kwargs(workload: Workload, start: int, stop: int) -> dict:
    kw = dict(workload.generate_kwargs)
    kw["generator"] = [torch.Generator().manual_seed(s) for s in workload.seeds[start:stop]]
    if workload.prompts is not None:
        kw["prompt"] = workload.prompts[start:stop]
    else:
        kw |= workload.embeddings(stop - start)
    if workload.batch_kwargs is not None:
        kw |= workload.batch_kwargs(stop - start)
    return kw


@torch.no_grad()
def generate(workload: Workload, model: nn.Module, batch: int = 8, start: int = 0, stop: int | None = None,
             output_type: str = "np") -> np.ndarray:
    """Images of ``model`` as the pipeline's denoiser for the evaluation prompts/seeds."""
    pipe, name = workload.pipe, workload.denoiser_name
    original = getattr(pipe, name)
    setattr(pipe, name, model)
    try:
        stop = len(workload.seeds) if stop is None else stop
        out = [pipe(**_pipeline_kwargs(workload, i, min(i + batch, stop)), output_type=output_type).images
               for i in range(start, stop, batch)]
    finally:
        setattr(pipe, name, original)
    return np.concatenate([np.asarray(o) for o in out])


@torch.no_grad()
def loop_ms(workload: Workload, model: nn.Module, device) -> float:
    """One full pipeline call (first evaluation prompt, every step, VAE decode)."""
    _sync(device)
    t0 = time.perf_counter()
    generate(workload, model, batch=1, start=0, stop=1)
    _sync(device)
    return (time.perf_counter() - t0) * 1000


@dataclass
class RecordedCall:
    """One denoiser call of the original's sampling: its inputs, which pipeline call (batch) it belongs to, and the
    diffusers cache context it ran in (``"cond"`` / ``"uncond"`` for Flux's true CFG; None for UNets)."""

    args: tuple
    kwargs: dict
    batch: int
    context: str | None


@torch.no_grad()
def record_reference(workload: Workload, batch: int = 8) -> tuple[list[RecordedCall], list, np.ndarray]:
    """Every denoiser call (inputs, output) of the original generating the evaluation images, and the images."""
    calls, outputs = [], []
    model = workload.denoiser
    state: dict[str, Any] = {"batch": 0, "context": None}

    def pre(_m, a, kw):
        calls.append(RecordedCall(tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in a),
                                  {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()},
                                  state["batch"], state["context"]))

    def post(_m, _a, _kw, out):
        outputs.append((out[0] if isinstance(out, tuple) else out.sample).float().cpu())

    stock_context = getattr(model, "cache_context", None)
    if stock_context is not None:  # diffusers' CacheMixin: note the context each call runs in

        @contextlib.contextmanager
        def recording_context(name):
            state["context"] = name
            try:
                with stock_context(name):
                    yield
            finally:
                state["context"] = None

        model.cache_context = recording_context
    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    images = []
    try:
        for index, start in enumerate(range(0, len(workload.seeds), batch)):
            state["batch"] = index
            images.append(generate(workload, model, batch=batch, start=start,
                                   stop=min(start + batch, len(workload.seeds))))
    finally:
        for h in handles:
            h.remove()
        if stock_context is not None:
            del model.cache_context
    return calls, outputs, np.concatenate(images)


@torch.no_grad()
def eps_error(model: nn.Module, calls: list[RecordedCall], outputs: list) -> float:
    """Mean relative error of ``model`` replaying the original's calls in order (a cache sees its real sequence:
    the calls of each pipeline call in their cache contexts, its state reset between pipeline calls as the
    pipeline resets it)."""
    errors = []
    batch = None
    for call, ref in zip(calls, outputs):
        if call.batch != batch and hasattr(model, "_reset_stateful_cache"):
            model._reset_stateful_cache()
        batch = call.batch
        context = (model.cache_context(call.context) if call.context is not None and hasattr(model, "cache_context")
                   else contextlib.nullcontext())
        with context:
            out = model(*call.args, **call.kwargs)
        out = (out[0] if isinstance(out, tuple) else out.sample).float().cpu()
        errors.append(float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)))
    if hasattr(model, "_reset_stateful_cache"):
        model._reset_stateful_cache()
    return float(np.mean(errors))


def adherence_scores(images: np.ndarray, prompts: list[str]) -> list[float]:
    from slimdiff_diffusers.evaluation.adherence import evaluate_adherence

    return [float(evaluate_adherence(img, p).overall) for img, p in zip(images, prompts)]


def paired(candidate: list[float], reference: list[float]) -> dict[str, float]:
    """Mean difference candidate − reference over the same images, and its standard error."""
    d = np.asarray(candidate) - np.asarray(reference)
    return {"mean_difference": float(d.mean()),
            "standard_error": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="default")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--keep", type=float, default=0.6, help="SlimDiff budget: kept fraction of the FLOPs")
    parser.add_argument("--int8", choices=["dynamic", "weight_only"], default="dynamic")
    parser.add_argument("--cache-interval", type=int, default=3, help="DeepCache: full UNet every N steps")
    parser.add_argument("--cache-threshold", type=float, default=0.1, help="First Block Cache threshold")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both",
                        help="measure without compile, with it, or both")
    parser.add_argument("--compile-scope", choices=["blocks", "full"], default="blocks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of call and loop timings")
    parser.add_argument("--calls-per-round", type=int, default=1,
                        help="denoiser calls timed back to back per variant and round (the median is over all)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 25; sd15: 10)")
    parser.add_argument("--resolution", type=int, default=None, help="sd15: pixels (default 256)")
    parser.add_argument("--cal-prompts", type=int, default=64, help="default model: calibration prompts")
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--eval-seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke test: few prompts, steps and repeats")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot-only", action="store_true",
                        help="only recompute speed-ups and acceptance checks and redraw the plot from the results file")
    args = parser.parse_args(argv)
    if args.quick:
        args.cal_prompts, args.eval_prompts, args.eval_seeds = 8, 4, 1
        args.repeats, args.steps = 2, args.steps or 6
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"stack_{args.model}_{device.type}.json")
    # the published plot beside the published results; a run written elsewhere (--out) draws beside its file
    plot = out.with_suffix(".png") if args.out else ROOT / "docs" / "images" / f"stack_{args.model}_{device.type}.png"
    if args.plot_only:
        import json

        payload = json.loads(out.read_text())
        derive(payload)
        write_json(out, payload)
        write_plot(payload, plot)
        return

    started = time.perf_counter()
    workload = MODELS[args.model](args, device, dtype)
    payload: dict[str, Any] = {
        "benchmark": "stack", "model": args.model,
        "command": "python benchmarks/stack.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(), "libraries": library_versions(), "settings": vars(args) | workload.settings,
        "notes": [], "skipped": [], "results": []}
    payload["settings"]["cache_method"] = (f"DeepCache (full UNet every {args.cache_interval} steps, branch 0)"
                                           if workload.denoiser_name == "unet" else
                                           f"First Block Cache (threshold {args.cache_threshold})")
    payload["settings"]["compile_method"] = ("regional: compile_repeated_blocks(fullgraph=True)"
                                             if args.compile_scope == "blocks" else "whole model: model.compile()")
    if device.type == "cpu":
        payload["notes"].append("CPU timings on a machine shared with other jobs: indicative; variants are timed "
                                "interleaved, round by round, so load drifts hit them alike")

    def save() -> None:
        payload["total_seconds"] = round(time.perf_counter() - started, 1)
        write_json(out, payload)

    print(f"[stack] {args.model}: calibrating", flush=True)
    t0 = time.perf_counter()
    calibration = workload.calibrate()
    original = workload.denoiser
    slim = sd.slim(original, calibration, keep_ratio=args.keep, budget="flops", **workload.slim_options)
    payload["slim"] = {"seconds_calibrate_and_slim": round(time.perf_counter() - t0, 1),
                       "params_before": slim.slimdiff_report.params_before,
                       "params_after": slim.slimdiff_report.params_after}
    del calibration
    gc.collect()

    # Base models (uncompiled): built once, shared by the variants that use them.
    bases: dict[str, nn.Module] = {"original": original, "slim": slim}
    for name in ("int8", "slim+int8"):
        if any(v.startswith(name) for v in args.variants):
            try:
                bases[name] = quantize_int8(bases["slim" if name.startswith("slim") else "original"], args.int8)
            except Skip as exc:
                payload["skipped"].append({"variant": name, "reason": str(exc)})
                print(f"[stack] skip {name}: {exc}", flush=True)
            except Exception as exc:  # a failing library is a result, not a crash
                payload["skipped"].append({"variant": name, "reason": f"{type(exc).__name__}: {exc}"})
                print(f"[stack] skip {name}: {type(exc).__name__}: {exc}", flush=True)

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    compiled_bases: dict[str, nn.Module] = {}  # one compiled copy per base, shared by its cache variant
    variants: list[dict[str, Any]] = []
    for compiled in modes:
        for name in args.variants:
            cached = name == "cache" or name.endswith("+cache")
            base_name = "original" if name == "cache" else name.removesuffix("+cache")
            label = name + ("+compile" if compiled else "")
            if base_name not in bases:
                payload["skipped"].append({"variant": label, "reason": f"{base_name} could not be built"})
                continue
            model = bases[base_name]
            if compiled:
                try:
                    if cached and args.compile_scope == "full":
                        raise Skip("a full-model compile does not compose with DeepCache's block re-routing: "
                                   "use --compile-scope blocks")
                    if base_name not in compiled_bases:
                        compiled_bases[base_name] = compile_denoiser(model, args.compile_scope)
                    model = compiled_bases[base_name]
                except Exception as exc:
                    payload["skipped"].append({"variant": label, "reason": f"{type(exc).__name__}: {exc}"})
                    continue
            cache = None
            if cached:
                holder = types.SimpleNamespace(**{workload.denoiser_name: model, "scheduler": workload.pipe.scheduler})
                cache = Cache(holder, workload.denoiser_name, args.cache_interval, args.cache_threshold)
            variants.append({"label": label, "name": name, "compiled": compiled, "model": model, "cache": cache,
                             "base": base_name})

    def run_with_cache(v, fn):
        if v["cache"] is None:
            return fn()
        v["cache"].enable()
        try:
            return fn()
        finally:
            v["cache"].disable()

    print(f"[stack] recording the original's trajectories ({len(workload.seeds)} images)", flush=True)
    ref_calls, ref_outputs, ref_images = record_reference(workload)
    ref_adherence = adherence_scores(ref_images, workload.prompts) if workload.adherence else None
    if ref_adherence is not None:
        payload["reference"] = {"adherence": float(np.mean(ref_adherence))}

    rows: dict[str, dict[str, Any]] = {}
    for v in list(variants):  # warm-up (compilation happens here), sizes, quality
        label = v["label"]
        try:
            t0 = time.perf_counter()
            run_with_cache(v, lambda: loop_ms(workload, v["model"], device))
            if v["cache"] is None:
                call_ms(v["model"], workload, device)
            warmup = time.perf_counter() - t0
            row: dict[str, Any] = {"variant": label, "compiled": v["compiled"], "warmup_seconds": round(warmup, 2),
                                   "weight_bytes": tensor_bytes(bases[v["base"]]),
                                   "disk_bytes": disk_bytes(bases[v["base"]])}
            if v["cache"] is not None and workload.denoiser_name == "unet":
                # replay with the step index DeepCache reads from the scheduler
                workload.pipe.scheduler.set_timesteps(workload.generate_kwargs["num_inference_steps"])
            row["rel_eps_error"] = run_with_cache(v, lambda: eps_error(v["model"], ref_calls, ref_outputs))
            images = run_with_cache(v, lambda: generate(workload, v["model"]))
            row["psnr"], row["ssim"] = psnr(ref_images, images), ssim(ref_images, images)
            if ref_adherence is not None:
                scores = adherence_scores(images, workload.prompts)
                row["adherence"] = float(np.mean(scores))
                row["adherence_vs_original"] = paired(scores, ref_adherence)
            if device.type == "cuda":  # every variant's weights stay resident: count what one loop adds on top
                torch.cuda.synchronize()
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                run_with_cache(v, lambda: loop_ms(workload, v["model"], device))
                row["loop_peak_above_resident_bytes"] = torch.cuda.max_memory_allocated() - resident
                row["peak_memory_bytes"] = row["weight_bytes"] + row["loop_peak_above_resident_bytes"]
        except Exception as exc:  # recorded with its reason; the other variants go on
            payload["skipped"].append({"variant": label, "reason": f"{type(exc).__name__}: {exc}"})
            print(f"[stack] skip {label}: {type(exc).__name__}: {exc}", flush=True)
            variants.remove(v)
            save()
            continue
        rows[label] = row
        payload["results"].append(row)
        print(f"[stack] {label:<24} eps={row['rel_eps_error']:.4f} psnr={row['psnr']:.2f} ssim={row['ssim']:.4f}"
              + (f" adherence={row['adherence']:.3f}" if "adherence" in row else ""), flush=True)
        save()

    times: dict[str, dict[str, list[float]]] = {v["label"]: {"call": [], "loop": []} for v in variants}
    payload["load_average_1min"] = []  # the machine's load while timing (other jobs share its cores)
    for round_index in range(args.repeats):  # interleaved: every variant once per round
        for v in variants:
            if v["cache"] is None:
                times[v["label"]]["call"] += [call_ms(v["model"], workload, device) for _ in range(args.calls_per_round)]
            times[v["label"]]["loop"].append(run_with_cache(v, lambda: loop_ms(workload, v["model"], device)))
        payload["load_average_1min"].append(round(os.getloadavg()[0], 2))
        for v in variants:
            t = times[v["label"]]
            rows[v["label"]]["call_ms"] = statistics.median(t["call"]) if t["call"] else None
            rows[v["label"]]["loop_ms"] = statistics.median(t["loop"])
            rows[v["label"]]["timing_rounds"] = round_index + 1
        print(f"[stack] timing round {round_index + 1}/{args.repeats}", flush=True)
        save()

    derive(payload)
    save()
    write_plot(payload, plot)
    print(f"[stack] wrote {out} and {plot} ({time.perf_counter() - started:.0f}s)", flush=True)


def derive(payload: dict) -> None:
    """Speed-ups against the eager original (so compile's own gain shows), and the issue's two acceptance checks
    (within one compile setting: speed-ups there are against the original with the same setting)."""
    rows = {r["variant"]: r for r in payload["results"]}
    base = rows.get("original")
    for r in payload["results"]:
        if base is None:
            break
        for kind in ("call", "loop"):
            if r.get(f"{kind}_ms") and base.get(f"{kind}_ms"):
                r[f"{kind}_speedup"] = base[f"{kind}_ms"] / r[f"{kind}_ms"]
    checks = {}
    for suffix in ("", "+compile"):
        o, s, q, sq = (rows.get(name + suffix) for name in ("original", "slim", "int8", "slim+int8"))
        if not (s and q and sq):
            continue
        bound = s["rel_eps_error"] + q["rel_eps_error"]
        check = {"eps_slim": s["rel_eps_error"], "eps_int8": q["rel_eps_error"], "eps_slim_int8": sq["rel_eps_error"],
                 "eps_ratio_to_sum": sq["rel_eps_error"] / bound,
                 "eps_within_20pct": sq["rel_eps_error"] <= 1.2 * bound}
        if o and all(x.get("call_ms") for x in (o, s, q, sq)):
            speed = {name: o["call_ms"] / x["call_ms"] for name, x in (("slim", s), ("int8", q), ("slim_int8", sq))}
            product = speed["slim"] * speed["int8"]
            check |= {"call_speedup_slim": speed["slim"], "call_speedup_int8": speed["int8"],
                      "call_speedup_slim_int8": speed["slim_int8"],
                      "speedup_ratio_to_product": speed["slim_int8"] / product,
                      "speedup_at_least_085_product": speed["slim_int8"] >= 0.85 * product}
        checks["compiled" if suffix else "eager"] = check
    payload["acceptance"] = checks


def library_versions() -> dict[str, str | None]:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "diffusers", "torchao", "DeepCache", "tomesd", "optimum-quanto", "bitsandbytes"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def write_plot(payload: dict, path: Path) -> None:
    """Speed-up of the full sampling loop vs ε error, the Pareto front (faster and closer) drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["results"] if r.get("loop_speedup")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for compiled, marker in ((False, "o"), (True, "s")):
        sub = [r for r in rows if r["compiled"] == compiled]
        ax.scatter([r["rel_eps_error"] for r in sub], [r["loop_speedup"] for r in sub], marker=marker,
                   label="compiled" if compiled else "eager")
        for r in sub:
            ax.annotate(r["variant"].replace("+compile", ""), (r["rel_eps_error"], r["loop_speedup"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["rel_eps_error"], -r["loop_speedup"])):
        if r["loop_speedup"] > best:
            front.append(r)
            best = r["loop_speedup"]
    ax.plot([r["rel_eps_error"] for r in front], [r["loop_speedup"] for r in front], "k--", lw=0.8,
            label="Pareto front")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("relative ε error vs the original (lower is better)")
    ax.set_ylabel("sampling-loop speed-up vs the eager original")
    m = payload["machine"]
    ax.set_title(f"SlimDiff stack: {payload['model']} model, {m.get('gpu') or 'CPU'}, {payload['settings']['dtype']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from slimdiff_diffusers.core.io_utils import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
