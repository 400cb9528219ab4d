"""Speed and size of slimmed SD1.5 / SDXL UNets (real configurations, random weights: timing only).

For each budget the UNet is slimmed (ranks from a cheap calibration on random inputs; random weights carry no
structure, so the allocation is only representative of shapes), then parameters, FLOPs of one UNet call
(`torch.utils.flop_counter`) and the median latency of one CFG call (batch 2) are measured for the original
and the slim model, interleaved.

    python benchmarks/speed.py --arch sd15 --resolution 256 512 --keep 0.8 0.6 0.4 --remove 100e6
    python benchmarks/speed.py --arch sd15 --device cuda --dtype float16 --resolution 512 --batch 2 8

Writes benchmarks/results/speed_<arch>_<device>.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine_info  # noqa: E402

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


@torch.no_grad()
def flops(model, x, kw) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x, 500, **kw)
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
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[args.arch][0]).eval()
    # Ranks need statistics: two random calls at a low resolution (random weights: shapes are what matters here).
    t0 = time.perf_counter()
    x, kw = inputs(args.arch, 2, 256, "cpu", torch.float32)
    calibration = sd.calibrate(unet, lambda: [unet(x, t, **kw) for t in (800, 200)],
                               sd.CalibrationConfig(propagation_probe_calls=0, accumulate_dtype=torch.float32))
    cal_seconds = time.perf_counter() - t0
    with torch.no_grad():  # the same two calls without hooks: the calibration overhead
        t0 = time.perf_counter()
        for t in (800, 200):
            unet(x, t, **kw)
        plain_seconds = time.perf_counter() - t0
    budgets = [{"keep_ratio": k} for k in args.keep] + [{"params_to_remove": int(r)} for r in args.remove]
    unet = unet.to(device, dtype)
    cache: dict = {}  # decompose once for all budgets
    base_flops: dict = {}
    results = []
    for budget in budgets:  # one slim model in memory at a time: an SD1.5 copy is 3.4 GB in fp32
        t0 = time.perf_counter()
        slim = sd.slim(unet, calibration, propagation="block_influence", allocation=args.allocation,
                       budget=args.budget if "keep_ratio" in budget else "params", decomposition_cache=cache,
                       **budget).to(device, dtype)
        slim_seconds = time.perf_counter() - t0
        for resolution in args.resolution:
            for batch in args.batch:
                x, kw = inputs(args.arch, batch, resolution, device, dtype)
                if (resolution, batch) not in base_flops:
                    base_flops[resolution, batch] = flops(unet, x, kw)
                latency_ms(unet, x, kw, 1)  # warm-up
                latency_ms(slim, x, kw, 1)
                base, slimmed = [], []
                for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
                    base += latency_ms(unet, x, kw, 1)
                    slimmed += latency_ms(slim, x, kw, 1)
                rep = slim.slimdiff_report
                row = {"resolution": resolution, "batch": batch, **budget,
                       "budget": args.budget if "keep_ratio" in budget else "params",
                       "params_before": rep.params_before, "params_after": rep.params_after,
                       "params_removed": rep.params_removed,
                       "compressible_kept": rep.compressible_params_after / rep.compressible_params_before,
                       "flops_ratio": flops(slim, x, kw) / base_flops[resolution, batch],
                       "latency_ms_original": statistics.median(base), "latency_ms_slim": statistics.median(slimmed),
                       "slim_seconds": slim_seconds}
                row["latency_ratio"] = row["latency_ms_slim"] / row["latency_ms_original"]
                results.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        del slim
        gc.collect()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"speed_{args.arch}_{device.type}_{args.budget}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "speed", "command": " ".join(sys.argv), "machine": machine_info(),
                               "arch": args.arch, "dtype": args.dtype, "allocation": args.allocation,
                               "calibration_seconds": cal_seconds, "plain_forward_seconds": plain_seconds,
                               "decomposition_seconds_first_budget": results[0]["slim_seconds"] if results else None,
                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
