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

Writes benchmarks/results/speed_<arch>_<device>_<budget>[_compile].json.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine_info, write_json  # noqa: E402

import slimdiff_diffusers as sd  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(CONFIGS), default="sd15")
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
    calibration = sd.calibrate(unet, lambda: [unet(x, t, **kw) for t in (800, 200)],
                               sd.CalibrationConfig(propagation_probe_calls=0, accumulate_dtype=torch.float32))
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
        save(measured=index + 1)


if __name__ == "__main__":
    main()
