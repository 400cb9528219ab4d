"""Compare a slimmed pipeline with the original: images, noise predictions, adherence and speed."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .image_metrics import psnr, relative_error, ssim


@dataclass
class Comparison:
    """Original vs slimmed pipeline on the same prompts and seeds."""

    prompts: list[str]
    seeds: list[int]
    psnr_db: float
    ssim: float
    eps_relative_error: float
    unet_latency_ms: dict[str, float]
    image_seconds: dict[str, float]
    adherence: dict[str, dict[str, float]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    images: dict[str, list] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("images")
        return d

    @property
    def speedup(self) -> float:
        return self.unet_latency_ms["original"] / self.unet_latency_ms["slim"]


def _per_prompt(kwargs: dict[str, Any], count: int) -> dict[str, Any]:
    """``kwargs`` with one string ``negative_prompt`` repeated for each of ``count`` prompts (FluxPipeline encodes
    a single string once and cannot pair it with a batch of prompts)."""
    if isinstance(kwargs.get("negative_prompt"), str):
        return kwargs | {"negative_prompt": [kwargs["negative_prompt"]] * count}
    return kwargs


def _generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch_size: int,
              **kwargs: Any) -> tuple[list, float]:
    images, started = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[i:i + batch_size]]
        out = pipe(prompt=prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, **_per_prompt(kwargs, len(gens)))
        images += out.images
    return images, (time.perf_counter() - started) / max(len(prompts), 1)


@torch.no_grad()
def _eps_error(original, slim, prompts: list[str], seeds: list[int], steps: int, guidance: float,
               batch_size: int, **kwargs: Any) -> float:
    """Relative noise-prediction error of the slim denoiser on the original pipeline's own trajectories."""
    denoiser_name = "unet" if getattr(original, "unet", None) is not None else "transformer"
    reference, slim_model = getattr(original, denoiser_name), getattr(slim, denoiser_name)
    errors: list[float] = []

    def hook(module, args, kwargs_, output):
        out_ref = output[0] if isinstance(output, tuple) else output.sample
        out_slim = slim_model(*args, **kwargs_)
        out_slim = out_slim[0] if isinstance(out_slim, tuple) else out_slim.sample
        errors.append(relative_error(out_ref, out_slim))

    handle = reference.register_forward_hook(hook, with_kwargs=True)
    try:
        _generate(original, prompts, seeds, steps, guidance, batch_size, output_type="latent", **kwargs)
    finally:
        handle.remove()
    return sum(errors) / len(errors)


@torch.no_grad()
def unet_latencies_ms(pipes: dict[str, Any], batch: int = 2, repeats: int = 15, height: int | None = None,
                      width: int | None = None, call_kwargs: dict[str, Any] | None = None) -> dict[str, float]:
    """Median wall time of one denoiser call per pipeline, timed interleaved so machine load hits all alike.

    ``call_kwargs``: further pipeline arguments for the step that records a transformer's inputs."""
    runs = {name: _unet_call(p, batch, height, width, call_kwargs or {}) for name, p in pipes.items()}
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for i in range(repeats + 1):
        for name, run in runs.items():
            elapsed = run()
            if i:  # the first round is warm-up
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def _unet_call(pipe, batch: int, height: int | None, width: int | None, call_kwargs: dict[str, Any] | None = None):
    """A zero-argument function that runs one denoiser call and returns its wall time in ms."""
    if getattr(pipe, "unet", None) is None:
        return _recorded_call(pipe, batch, height, width, call_kwargs or {})
    unet = pipe.unet
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    h = (height or unet.config.sample_size * scale) // scale
    w = (width or unet.config.sample_size * scale) // scale
    device, dtype = unet.device, unet.dtype
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, unet.config.in_channels, h, w, generator=gen).to(device, dtype)
    ctx_dim = unet.config.cross_attention_dim
    ctx = torch.randn(batch, pipe.tokenizer.model_max_length, ctx_dim, generator=gen).to(device, dtype)

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        unet(x, 500, encoder_hidden_states=ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1000
    return run


def _recorded_call(pipe, batch: int, height: int | None, width: int | None, call_kwargs: dict[str, Any]):
    """Timing of ``pipe.transformer`` (Flux, SD3, PixArt) on the inputs its own pipeline gives it: one sampling
    step is run to record the first call's arguments (text states, ids, guidance, CFG rows as the family
    uses them), which each timed call replays."""
    model = pipe.transformer
    recorded: dict[str, Any] = {}

    def record(module, args, kwargs):
        if not recorded:
            recorded["args"], recorded["kwargs"] = args, kwargs

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
        # Two steps, not one: PixArtAlphaPipeline treats a single step as a DMD one-step sampler and reads a
        # second output from the scheduler's step, which other schedulers (its default DPM-Solver) do not return.
        pipe(prompt=["a photo"] * batch, num_inference_steps=2, output_type="latent",
             generator=torch.Generator(device="cpu").manual_seed(0), **size, **_per_prompt(call_kwargs, batch))
    finally:
        handle.remove()
    args, kwargs = recorded["args"], recorded["kwargs"]
    device = model.device

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) * 1000
    return run


def compare_pipelines(original, slim, prompts: list[str], seeds: list[int] | None = None, *,
                      num_inference_steps: int = 25, guidance_scale: float = 7.5, batch_size: int = 8,
                      adherence_fn=None, latency_repeats: int = 15, **kwargs: Any) -> Comparison:
    """Generate the same prompts with the same seeds on both pipelines and measure the differences.

    Args:
        adherence_fn: optional ``(image, prompt) -> float in [0, 1]`` (e.g. the default model's scene metric).
        kwargs: further pipeline call arguments (height, width, negative_prompt, ...). A PixArt whose transformer
            ``sample_size`` diffusers has no aspect-ratio bins for runs with ``use_resolution_binning=False`` (the
            adapter's rule, ``resolve_resolution_binning``: one warning; an explicit ``True`` is refused).
    """
    from ..diffusers_adapter.pipeline import resolve_resolution_binning

    if not prompts:
        raise ValueError("no evaluation prompts")
    kwargs = resolve_resolution_binning(original, kwargs, height=kwargs.get("height"), width=kwargs.get("width"))
    seeds = seeds or list(range(1000, 1000 + len(prompts)))
    settings = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size)
    settings |= {k: kwargs[k] for k in ("negative_prompt", "true_cfg_scale") if k in kwargs}
    ref_images, ref_seconds = _generate(original, prompts, seeds, num_inference_steps, guidance_scale, batch_size,
                                        output_type="pil", **kwargs)
    slim_images, slim_seconds = _generate(slim, prompts, seeds, num_inference_steps, guidance_scale, batch_size,
                                          output_type="pil", **kwargs)
    eps = _eps_error(original, slim, prompts, seeds, num_inference_steps, guidance_scale, batch_size, **kwargs)
    adherence = None
    if adherence_fn is not None:
        adherence = {name: {"mean": sum(adherence_fn(img, p) for img, p in zip(images, prompts)) / len(prompts)}
                     for name, images in (("original", ref_images), ("slim", slim_images))}
    latency = unet_latencies_ms({"original": original, "slim": slim}, repeats=latency_repeats,
                                height=kwargs.get("height"), width=kwargs.get("width"),
                                call_kwargs={k: v for k, v in kwargs.items() if k not in ("height", "width")})
    return Comparison(
        prompts=prompts, seeds=seeds, psnr_db=psnr(ref_images, slim_images), ssim=ssim(ref_images, slim_images),
        eps_relative_error=eps, unet_latency_ms=latency,
        image_seconds={"original": ref_seconds, "slim": slim_seconds}, adherence=adherence, settings=settings,
        images={"original": ref_images, "slim": slim_images},
    )
