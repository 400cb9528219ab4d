"""Peak memory of ``pipe.slim()``: is slimming bounded by the model plus its statistics?

Builds a real ``StableDiffusionPipeline`` whose UNet has the real SD1.5 (or SDXL) configuration with random
weights (memory depends on shapes only), with a small text encoder of the right width and a small VAE, then
runs ``pipe.slim()`` (calibration through the pipeline's own sampler, plan, in-place apply) in a fresh process.
Reports the process's peak resident memory above what it held before the UNet existed, against the UNet's
size plus the statistics' size.

    python benchmarks/memory.py --arch sd15 --keep 0.6
    python benchmarks/memory.py --arch sd15 --keep 0.6 --memory-limit-mib 512   # statistics spilled to disk

Writes benchmarks/results/memory_<arch>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_json  # noqa: E402
from benchmarks.cost import _peak_rss_mib, _rss_mib  # noqa: E402

RESULT_PREFIX = "MEMORY-RESULT "


def _pipeline(arch: str, dtype: torch.dtype):
    """A StableDiffusionPipeline with the real UNet configuration and small text encoder / VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from benchmarks.speed import CONFIGS
    from slimdiff_diffusers.default_model import load_default_pipeline

    unet_config = dict(CONFIGS[arch][0])
    if arch != "sd15":
        raise SystemExit("only --arch sd15 builds a text-to-image pipeline here (SDXL needs two text encoders)")
    tokenizer: CLIPTokenizer = load_default_pipeline().tokenizer  # the embedded model's small tokenizer
    text = CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=unet_config["cross_attention_dim"],
                                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
                                        max_position_embeddings=77)).eval()
    vae = AutoencoderKL(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=8).eval()
    before_unet = _rss_mib()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config).to(dtype).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe, before_unet


def worker(arch: str, keep: float, resolution: int, prompts: int, steps: int, probe_calls: int,
           memory_limit: int | None) -> dict[str, Any]:
    import slimdiff_diffusers as sd

    pipe, before_unet = _pipeline(arch, torch.float32)
    sd.enable_slimdiff(pipe)
    unet_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    loaded = _rss_mib()
    t0 = time.perf_counter()
    report = pipe.slim(prompts=[f"a photo of object {i}" for i in range(prompts)], num_prompts=prompts,
                       selection="random", keep_ratio=keep, budget="flops", num_inference_steps=steps,
                       height=resolution, width=resolution, batch_size=prompts, progress=False,
                       calibration_config=sd.CalibrationConfig(propagation_probe_calls=probe_calls,
                                                               memory_limit=memory_limit),
                       propagation="probe")
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mib()
    statistics = report.calibration_memory_bytes  # with memory_limit: the largest pass's statistics
    bound = (unet_bytes + statistics) / 2**20
    return {"arch": arch, "dtype": "float32", "memory_limit_mib": memory_limit / 2**20 if memory_limit else None,
            "keep_ratio": keep, "budget": "flops", "resolution": resolution,
            "prompts": prompts, "steps": steps, "probe_calls": probe_calls, "seconds": round(seconds, 1),
            "unet_mib": unet_bytes / 2**20, "statistics_mib": statistics / 2**20,
            "rss_before_unet_mib": before_unet, "rss_loaded_mib": loaded, "peak_rss_mib": peak,
            "peak_above_before_unet_mib": peak - before_unet,
            "peak_over_model_plus_statistics": (peak - before_unet) / bound,
            "params_before": report.slim.params_before, "params_after": report.slim.params_after,
            "stage_seconds": report.slim.stage_seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15", choices=["sd15"])
    parser.add_argument("--keep", type=float, default=0.6)
    parser.add_argument("--resolution", type=int, default=32, help="image size (the small VAE does not downsample)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--probe-calls", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit-mib", type=int, default=None,
                        help="CalibrationConfig.memory_limit: statistics held in memory at once (spilled to disk)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        limit = args.memory_limit_mib * 2**20 if args.memory_limit_mib else None
        result = worker(args.arch, args.keep, args.resolution, args.prompts, args.steps, args.probe_calls, limit)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    command = [sys.executable, __file__, "--worker", "--arch", args.arch, "--keep", str(args.keep), "--resolution",
               str(args.resolution), "--prompts", str(args.prompts), "--steps", str(args.steps), "--probe-calls",
               str(args.probe_calls), "--threads", str(args.threads)]
    if args.memory_limit_mib:
        command += ["--memory-limit-mib", str(args.memory_limit_mib)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    print(json.dumps(result, indent=1))
    suffix = f"_limit{args.memory_limit_mib}mib" if args.memory_limit_mib else ""
    out = args.out or ROOT / "benchmarks" / "results" / f"memory_{args.arch}{suffix}.json"
    write_json(out, {"machine": machine_info(), "command": "python benchmarks/memory.py " + " ".join(argv or sys.argv[1:]),
                     "results": [result]})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
