"""Speed and size of slimmed SD1.5 / SDXL UNets (real configurations, random weights: timing only).

For each budget the UNet is slimmed (ranks from a cheap calibration on random inputs; random weights carry no
structure, so the allocation is only representative of shapes), then parameters, FLOPs of one UNet call
(`torch.utils.flop_counter`) and the median latency of one CFG call (batch 2) are measured for the original
and the slim model, interleaved.

With ``--loop-resolution`` it also times the full sampling loop: the real diffusers pipeline
(``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``, DDIM, CFG 7.5, ``--loop-steps`` steps, VAE decode to
pixels; the VAE has the real configuration and random weights) from precomputed text embeddings, so the text
encoder, identical in both, is left out. The loop is what a user waits for: the unchanged VAE and scheduler
dilute the UNet's speed-up.

    python benchmarks/speed.py --arch sd15 --resolution 256 512 --keep 0.8 0.6 0.4 --remove 100e6 --loop-resolution 256
    python benchmarks/speed.py --arch sd15 --device cuda --dtype float16 --resolution 512 --batch 2 8 --loop-resolution 512
    python benchmarks/speed.py --arch sdxl --device cuda --dtype float16 --resolution 1024 --batch 1 4 --compile

With ``--compile`` both the original and every slim model are compiled in place (``nn.Module.compile()``, inductor,
default mode) and the compile time of the first call is recorded apart from the timed calls.

Transformer configurations (issue 10): ``--arch flux-dev`` / ``sd35-medium`` build FLUX.1-dev's / SD3.5-medium's
transformer at the real width with ``--blocks`` blocks (random weights), calibrate on two calls at the timed
shapes, slim under the budget, and time one transformer call (original and slim alternating, ``--repeats`` times,
median), with the FLOP bound (``torch.utils.flop_counter``) and a profiler breakdown of where the time goes:

    python benchmarks/speed.py --arch flux-dev --blocks 1 2 --image-tokens 256 --text-tokens 128 --keep 0.5 \
        --budget flops --batch 1 --threads 1 --repeats 9 --memory-limit 1024
    python benchmarks/speed.py --arch sd35-medium --blocks 3 --image-tokens 256 --text-tokens 128 --keep 0.5 \
        --budget flops --batch 1 --threads 1 --repeats 9

Writes benchmarks/results/speed_<arch>_<device>_<budget>[_compile].json.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine_info, write_json  # noqa: E402

import slimdiff_diffusers as sd  # noqa: E402
from slimdiff_diffusers.core.heap import release_free_heap  # noqa: E402

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
CONFIGS = {"sd15": (SD15, 77, 768), "sdxl": (SDXL, 77, 2048)}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
           block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4)
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}


def sampling_pipeline(arch: str, unet, device, dtype):
    """The arch's real diffusers pipeline around ``unet``: random-weight VAE (real config), DDIM, no text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(1)
    with torch.device(device):
        vae = AutoencoderKL(**VAE, scaling_factor=VAE_SCALING[arch], sample_size=1024 if arch == "sdxl" else 512)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def prompt_embeddings(arch: str, batch: int, device, dtype) -> dict:
    """Random text embeddings of the right shapes, in place of the (unchanged) text encoder's output."""
    _, tokens, ctx_dim = CONFIGS[arch]
    gen = torch.Generator().manual_seed(2)
    kw = {name: torch.randn(batch, tokens, ctx_dim, generator=gen).to(device, dtype)
          for name in ("prompt_embeds", "negative_prompt_embeds")}
    if arch == "sdxl":
        kw |= {name: torch.randn(batch, 1280, generator=gen).to(device, dtype)
               for name in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")}
    return kw


@torch.no_grad()
def sampling_loop_ms(pipe, unet, embeddings: dict, resolution: int, steps: int) -> float:
    """Milliseconds of one pipeline call (``steps`` CFG steps and the VAE decode) with ``unet`` as the denoiser."""
    pipe.unet = unet
    device = next(unet.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe(**embeddings, height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=7.5,
         generator=torch.Generator().manual_seed(0), output_type="np")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000


def inputs(arch: str, batch: int, resolution: int, device, dtype, seed: int = 0):
    _, tokens, ctx_dim = CONFIGS[arch]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, resolution // 8, resolution // 8, generator=gen).to(device, dtype)
    kw = {"encoder_hidden_states": torch.randn(batch, tokens, ctx_dim, generator=gen).to(device, dtype)}
    if arch == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=gen).to(device, dtype),
                                   "time_ids": torch.randn(batch, 6, generator=gen).to(device, dtype)}
    return x, kw


@torch.no_grad()
def latency_ms(model, x, kw, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x, 500, **kw)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _label(budget: dict) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in budget.items())


@torch.no_grad()
def flops(model, x, kw) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        getattr(model, "_orig_mod", model)(x, 500, **kw)  # a compiled module is counted uncompiled
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------------
# Transformer denoisers (issue 10): Flux.1-dev and SD3.5-medium configurations, fewer blocks
# --------------------------------------------------------------------------------------------------

# The real configurations (random weights: timing only). ``--blocks`` builds fewer blocks of the real width.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
TRANSFORMERS = {"flux-dev": FLUX_DEV, "sd35-medium": SD35_MEDIUM}


def build_transformer(arch: str, blocks: list[int]):
    """The arch's transformer at its real width with ``blocks`` blocks (Flux: [double, single]; SD3.5: [joint],
    the first ones dual-attention as in SD3.5-medium, the last one ``context_pre_only`` as in every SD3)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    config = dict(TRANSFORMERS[arch])
    if arch == "flux-dev":
        config.update(num_layers=blocks[0], num_single_layers=blocks[1] if len(blocks) > 1 else 0)
        return FluxTransformer2DModel(**config).eval()
    n = blocks[0]
    config.update(num_layers=n, dual_attention_layers=tuple(i for i in config["dual_attention_layers"] if i < n - 1))
    return SD3Transformer2DModel(**config).eval()


def transformer_inputs(arch: str, model, batch: int, image_tokens: int, text_tokens: int, dtype, seed: int = 0,
                       t: float = 0.5) -> dict:
    """One forward's keyword arguments: ``image_tokens`` latent tokens (a square grid), ``text_tokens`` T5 tokens."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    side = int(round(image_tokens ** 0.5))
    if side * side != image_tokens:
        raise SystemExit(f"--image-tokens must be a square number, got {image_tokens}")

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    kw = {"encoder_hidden_states": randn(batch, text_tokens, cfg.joint_attention_dim),
          "pooled_projections": randn(batch, cfg.pooled_projection_dim), "return_dict": False}
    if arch == "flux-dev":
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        kw |= {"hidden_states": randn(batch, image_tokens, cfg.in_channels), "timestep": torch.full((batch,), t).to(dtype),
               "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(text_tokens, 3), "guidance": torch.full((batch,), 3.5).to(dtype)}
    else:
        px = side * cfg.patch_size
        kw |= {"hidden_states": randn(batch, cfg.in_channels, px, px), "timestep": torch.full((batch,), t * 1000).to(dtype)}
    return kw


@torch.no_grad()
def transformer_latency_ms(model, kw: dict) -> float:
    t0 = time.perf_counter()
    model(**kw)
    return (time.perf_counter() - t0) * 1000


@torch.no_grad()
def transformer_flops(model, kw: dict) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one call and FLOPs per operator (matmuls vs attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(**kw)
    per_op: dict[str, int] = {}
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        per_op[str(op)] = int(count)
    return counter.get_total_flops(), per_op


@torch.no_grad()
def time_breakdown(model, kw: dict) -> dict[str, float]:
    """Milliseconds of one call by operator family (torch.profiler, CPU self time): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**kw)
    families = {"matmul (linear/addmm/mm/bmm)": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"),
                "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                     "aten::_scaled_dot_product_attention_math", "aten::scaled_dot_product_attention"),
                "padding / concat / copies": ("aten::cat", "aten::copy_", "aten::pad", "aten::constant_pad_nd",
                                              "aten::zeros", "aten::new_zeros", "aten::slice_scatter", "aten::contiguous",
                                              "aten::clone")}
    out = {k: 0.0 for k in families} | {"other": 0.0}
    for e in prof.key_averages():
        family = next((k for k, names in families.items() if e.key in names), "other")
        out[family] += e.self_cpu_time_total / 1000
    return out


def _limit_bytes(mib: float | None) -> int | None:
    return int(mib * 2**20) if mib else None


def _peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def transformer_main(args: argparse.Namespace) -> None:
    """Speed and FLOP bound of a transformer configuration under the FLOP (or parameter) budget, interleaved."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    blocks = args.blocks or ([1, 2] if args.arch == "flux-dev" else [3])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_transformer(args.arch, blocks).to(device, dtype)
    build_seconds = time.perf_counter() - t0
    kw = transformer_inputs(args.arch, model, args.batch[0], args.image_tokens, args.text_tokens, dtype)
    # Ranks need statistics: two calls at the timed shapes (random weights: the shapes are what matters). The FFN
    # hidden moments of Flux are 12288² each: one timestep bucket, fp32 accumulation, and with --memory-limit the
    # statistics are spilled to disk (several passes of these two calls) so the run stays within the memory.
    cal_kw = [transformer_inputs(args.arch, model, args.batch[0], args.image_tokens, args.text_tokens, dtype,
                                 seed=s, t=t) for s, t in ((1, 0.8), (2, 0.2))]
    t0 = time.perf_counter()
    config = sd.CalibrationConfig(propagation_probe_calls=0, accumulate_dtype=torch.float32, num_timestep_buckets=1,
                                  memory_limit=_limit_bytes(args.memory_limit))
    with torch.no_grad():
        calibration = sd.calibrate(model, lambda: [model(**k) for k in cal_kw], config)
    cal_seconds = time.perf_counter() - t0
    n_double = blocks[0]
    label = (f"{blocks[0]} double-stream + {blocks[1] if len(blocks) > 1 else 0} single-stream blocks (of 19 + 38)"
             if args.arch == "flux-dev" else f"{n_double} joint blocks (of 24; the last context_pre_only, "
             f"{sum(1 for i in range(n_double - 1) if i in SD35_MEDIUM['dual_attention_layers'])} dual-attention)")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"speed_{args.arch.replace('-', '_')}_{device.type}_{args.budget}.json")
    base_flops, base_ops = transformer_flops(model, kw)
    results: list[dict] = []
    skipped = [{"group": n, "reason": r} for n, r in calibration.sites.skipped]

    def save(measured: int) -> None:
        write_json(out, {"benchmark": "speed", "kind": "transformer", "command": "python " + " ".join(sys.argv),
                         "machine": machine_info(), "arch": args.arch, "config": {k: v for k, v in TRANSFORMERS[args.arch].items()},
                         "blocks": blocks, "blocks_label": label, "dtype": args.dtype, "allocation": args.allocation,
                         "image_tokens": args.image_tokens, "text_tokens": args.text_tokens, "batch": args.batch[0],
                         "repeats": args.repeats, "params": sum(p.numel() for p in model.parameters()),
                         "build_seconds": build_seconds, "calibration_seconds": cal_seconds,
                         "original_flops": base_flops, "original_flops_by_op": base_ops,
                         "skipped_groups": skipped, "budgets_measured": f"{measured} of {len(args.keep)}",
                         "results": results})

    for index, keep in enumerate(args.keep):
        t0 = time.perf_counter()
        slim = sd.slim(model, calibration, keep_ratio=keep, budget=args.budget, allocation=args.allocation,
                       propagation="block_influence").to(device, dtype)
        slim_seconds = time.perf_counter() - t0
        flops_slim, slim_ops = transformer_flops(slim, kw)
        for m in (model, slim):  # warm-up
            transformer_latency_ms(m, kw)
        base, slimmed = [], []
        for _ in range(args.repeats):  # interleaved: drifting load from other processes hits both alike
            base.append(transformer_latency_ms(model, kw))
            slimmed.append(transformer_latency_ms(slim, kw))
        rep = slim.slimdiff_report
        row = {"keep_ratio": keep, "budget": args.budget, "params_before": rep.params_before,
               "params_after": rep.params_after, "params_removed": rep.params_removed,
               "compressible_kept": rep.compressible_params_after / rep.compressible_params_before,
               "compressible_macs_kept": rep.flops_after / max(rep.flops_before, 1),
               "flops_ratio": flops_slim / base_flops, "flops_by_op_slim": slim_ops,
               "latency_ms_original": statistics.median(base), "latency_ms_slim": statistics.median(slimmed),
               "latency_ms_original_all": base, "latency_ms_slim_all": slimmed, "slim_seconds": slim_seconds,
               "time_breakdown_ms_original": time_breakdown(model, kw), "time_breakdown_ms_slim": time_breakdown(slim, kw)}
        row["latency_ratio"] = row["latency_ms_slim"] / row["latency_ms_original"]
        row["speedup"] = 1 / row["latency_ratio"]
        row["flop_bound"] = 1 / row["flops_ratio"]
        row["speedup_over_bound"] = row["speedup"] / row["flop_bound"]
        results.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if not isinstance(v, (list, dict))}), flush=True)
        del slim
        gc.collect()
        save(index + 1)
    save(len(args.keep))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=[*CONFIGS, *TRANSFORMERS], default="sd15")
    parser.add_argument("--blocks", nargs="+", type=int, default=None,
                        help="transformers: blocks to build at the real width (Flux: double single; SD3.5: joint)")
    parser.add_argument("--image-tokens", type=int, default=256, help="transformers: latent tokens (a square)")
    parser.add_argument("--text-tokens", type=int, default=128, help="transformers: text tokens")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="MiB the calibration statistics may hold in memory (the rest is spilled to disk)")
    parser.add_argument("--resolution", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--batch", nargs="+", type=int, default=[2])
    parser.add_argument("--keep", nargs="+", type=float, default=[0.8, 0.6, 0.4])
    parser.add_argument("--remove", nargs="*", type=float, default=[100e6], help="parameters to remove (budgets)")
    parser.add_argument("--allocation", default="sis", choices=["sis", "uniform"])
    parser.add_argument("--budget", default="params", choices=["params", "flops"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loop-resolution", nargs="*", type=int, default=[],
                        help="also time the full sampling loop at these resolutions")
    parser.add_argument("--loop-steps", type=int, default=25)
    parser.add_argument("--loop-batch", nargs="+", type=int, default=[1], help="images per pipeline call in the loop")
    parser.add_argument("--loop-repeats", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models (inductor)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode (reduce-overhead: CUDA graphs, no launch cost)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.arch in TRANSFORMERS:
        transformer_main(args)
        return
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # Built, calibrated and slimmed in the timed device/dtype, as a user would (SDXL in fp32 plus its statistics
    # and a slim copy would not fit this machine's memory; in bf16 it does).
    # fp16's range is too narrow for random weights' activations (inf in the calibration), so an fp16 run is
    # calibrated and slimmed in fp32 and only timed in fp16; bf16 and fp32 are calibrated as they run.
    master_dtype = torch.float32 if dtype == torch.float16 else dtype
    with device:  # initialised where it runs: SDXL's random init takes a minute on CPU, seconds on a GPU
        unet = UNet2DConditionModel(**CONFIGS[args.arch][0]).eval().to(device, master_dtype)
    # Ranks need statistics: two random calls at a low resolution (random weights: shapes are what matters here).
    t0 = time.perf_counter()
    x, kw = inputs(args.arch, 2, 256, device, master_dtype)
    # With --memory-limit the statistics live in safetensors shards on disk (SDXL's are 6.3 GB in fp32): the
    # original, a slim copy and the decomposition cache of all budgets then fit a 24 GB machine.
    calibration = sd.calibrate(unet, lambda: [unet(x, t, **kw) for t in (800, 200)],
                               sd.CalibrationConfig(propagation_probe_calls=0, accumulate_dtype=torch.float32,
                                                    memory_limit=_limit_bytes(args.memory_limit)))
    cal_seconds = time.perf_counter() - t0
    with torch.no_grad():  # the same two calls without hooks: the calibration overhead
        t0 = time.perf_counter()
        for t in (800, 200):
            unet(x, t, **kw)
        plain_seconds = time.perf_counter() - t0
    budgets = [{"keep_ratio": k} for k in args.keep] + [{"params_to_remove": int(r)} for r in args.remove]
    cache: dict = {}  # decompose once for all budgets
    timed_unet = unet if master_dtype == dtype else copy.deepcopy(unet).to(device, dtype)
    pipe = sampling_pipeline(args.arch, timed_unet, device, dtype) if args.loop_resolution else None
    base_flops: dict = {}
    results = []
    suffix = ("_compile" + ("" if args.compile_mode == "default" else "_" + args.compile_mode.replace("-", "_"))
              if args.compile else "")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"speed_{args.arch}_{device.type}_{args.budget}{suffix}.json")
    compile_seconds: dict = {}

    def compiled(model):
        """``torch.compile(model)`` with ``--compile`` (a wrapper: slim copies are made from the plain model);
        its first call per input shape is timed as the compilation."""
        return torch.compile(model, mode=args.compile_mode) if args.compile else model

    timed_unet = compiled(timed_unet)  # after calibration: its hooks are gone

    def save(measured: int) -> None:  # after every budget, so an interrupted run keeps what it measured
        write_json(out, {"benchmark": "speed", "command": "python " + " ".join(sys.argv), "machine": machine_info(),
                         "arch": args.arch, "dtype": args.dtype, "allocation": args.allocation,
                         "compiled": args.compile, "compile_mode": args.compile_mode if args.compile else None,
                         "compile_seconds": compile_seconds,
                         "calibration_seconds": cal_seconds, "plain_forward_seconds": plain_seconds,
                         "decomposition_seconds_first_budget": results[0]["slim_seconds"] if results else None,
                         "memory_limit_mib": args.memory_limit, "statistics_mib": calibration.nbytes / 2**20,
                         "peak_rss_mib": _peak_rss_mib(),
                         "budgets_measured": f"{measured} of {len(budgets)}", "results": results})

    for index, budget in enumerate(budgets):  # one slim model in memory at a time: an SD1.5 copy is 3.4 GB in fp32
        t0 = time.perf_counter()
        slim = sd.slim(unet, calibration, propagation="block_influence", allocation=args.allocation,
                       budget=args.budget if "keep_ratio" in budget else "params", decomposition_cache=cache,
                       **budget).to(device, dtype)
        slim_seconds = time.perf_counter() - t0
        timed_slim = compiled(slim)
        for resolution in args.resolution:
            for batch in args.batch:
                x, kw = inputs(args.arch, batch, resolution, device, dtype)
                if (resolution, batch) not in base_flops:
                    base_flops[resolution, batch] = flops(timed_unet, x, kw)
                for name, model in (("original", timed_unet), (f"slim {_label(budget)}", timed_slim)):  # warm-up (and compilation)
                    first = latency_ms(model, x, kw, 1)[0]
                    compile_seconds.setdefault(f"{name} {resolution}px batch {batch}", first / 1000)
                base, slimmed = [], []
                for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
                    base += latency_ms(timed_unet, x, kw, 1)
                    slimmed += latency_ms(timed_slim, x, kw, 1)
                rep = slim.slimdiff_report
                row = {"resolution": resolution, "batch": batch, **budget,
                       "budget": args.budget if "keep_ratio" in budget else "params",
                       "params_before": rep.params_before, "params_after": rep.params_after,
                       "params_removed": rep.params_removed,
                       "compressible_kept": rep.compressible_params_after / rep.compressible_params_before,
                       "flops_ratio": flops(timed_slim, x, kw) / base_flops[resolution, batch],
                       "latency_ms_original": statistics.median(base), "latency_ms_slim": statistics.median(slimmed),
                       "slim_seconds": slim_seconds}
                row["latency_ratio"] = row["latency_ms_slim"] / row["latency_ms_original"]
                results.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        for resolution in args.loop_resolution:
            for loop_batch in args.loop_batch:
                embeddings = prompt_embeddings(args.arch, loop_batch, device, dtype)
                sampling_loop_ms(pipe, timed_slim, embeddings, resolution, 2)  # warm-up
                sampling_loop_ms(pipe, timed_unet, embeddings, resolution, 2)
                base, slimmed = [], []
                for _ in range(args.loop_repeats):  # interleaved, like the UNet calls
                    base.append(sampling_loop_ms(pipe, timed_unet, embeddings, resolution, args.loop_steps))
                    slimmed.append(sampling_loop_ms(pipe, timed_slim, embeddings, resolution, args.loop_steps))
                rep = slim.slimdiff_report
                row = {"loop": True, "resolution": resolution, "batch": loop_batch, "steps": args.loop_steps,
                       "repeats": args.loop_repeats, **budget,
                       "budget": args.budget if "keep_ratio" in budget else "params",
                       "params_removed": rep.params_removed,
                       "loop_ms_original": statistics.median(base), "loop_ms_slim": statistics.median(slimmed)}
                row["loop_ratio"] = row["loop_ms_slim"] / row["loop_ms_original"]
                results.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        if pipe is not None:
            pipe.unet = timed_unet
        del slim, timed_slim
        gc.collect()
        release_free_heap()  # the next budget's slim copy reuses these pages instead of growing the heap
        save(measured=index + 1)


if __name__ == "__main__":
    main()
