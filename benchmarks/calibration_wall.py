"""Wall time of ``pipe.slim()`` on the SD1.5 configuration: calibration and slimming, peak GPU memory, peak RSS.

Builds what a user's ``StableDiffusionPipeline.from_pretrained("…stable-diffusion-v1-5")`` holds, with random
weights (time and memory depend on shapes only): the real SD1.5 UNet configuration, a CLIP text encoder of the
real configuration (12 layers, width 768, 77 tokens, vocabulary 49,408), the real VAE configuration and SD1.5's
PNDM scheduler. Nothing is downloaded: the tokenizer is the embedded default model's BPE vocabulary with
SD1.5's 77-token context. Then it runs ``pipe.slim()`` exactly as a user would: k-means SlimSet selection from
the shipped pool, the pipeline's own sampler with CFG on batches of prompts, the propagation probe, planning and
the in-place apply.

Reported separately:

* calibration: SlimSet selection + sampling with hooks + propagation probe (``PipelineSlimReport``), and the
  probe alone (from the library's log);
* slimming: planning (decompositions, allocation) + the in-place rewrite (``SlimReport.seconds``);
* peak GPU memory (``torch.cuda.max_memory_allocated``) at the end of calibration and overall, and the process's
  peak RSS.

Results are written incrementally to ``benchmarks/results/calibration_wall_<device>.json``: at the start, after
the pipeline is built, at every log event of the library and every ``--heartbeat`` seconds (elapsed time, phase,
memory), and at the end. A run cut short by a time limit still leaves what it reached.

    python benchmarks/calibration_wall.py --device cuda --dtype float16              # 500 prompts x 25 steps, 512 px
    python benchmarks/calibration_wall.py --device cpu --dtype float32 --prompts 4 --steps 2 --resolution 64 \
        --selection random --probe-calls 1 --out /tmp/wall.json                  # CPU smoke test (~10 min, 7 GB)
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_json  # noqa: E402
from benchmarks.speed import CONFIGS, VAE  # noqa: E402

# openai/clip-vit-large-patch14's text tower, as SD1.5 ships it (text_encoder/config.json).
SD15_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=768, layer_norm_eps=1e-5)
# SD1.5's scheduler/scheduler_config.json.
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _gpu_peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def build_pipeline(device: torch.device, dtype: torch.dtype):
    """SD1.5's components at their real configurations with random weights, built on ``device`` (no download)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from slimdiff_diffusers.default_model import DEFAULT_MODEL_DIR

    # The embedded model's BPE files (offline) with SD1.5's 77-token context; ids stay inside CLIP's vocabulary.
    tokenizer = CLIPTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "tokenizer", model_max_length=77)
    text_config = CLIPTextConfig(**SD15_TEXT_ENCODER, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: random init of ~1.1B parameters is slow on one core
        unet = UNet2DConditionModel(**CONFIGS["sd15"][0])
        text_encoder = CLIPTextModel(text_config)
        vae = AutoencoderKL(**VAE, scaling_factor=0.18215, sample_size=512)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device, dtype)


class _Recorder(logging.Handler):
    """Keeps the library's log lines with their times and rewrites the result file at each one."""

    def __init__(self, flush, device: torch.device):
        super().__init__(logging.INFO)
        self.events: list[dict[str, Any]] = []
        self.flush_result = flush
        self.device = device

    def emit(self, record: logging.LogRecord) -> None:
        gpu = _gpu_peak_mib(self.device)
        self.events.append({"t": round(time.perf_counter() - STARTED, 2), "message": record.getMessage(),
                            "peak_rss_mib": round(_peak_rss_mib(), 1),
                            "peak_gpu_mib": round(gpu, 1) if gpu is not None else None})
        self.flush_result()

    def first(self, prefix: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["message"].startswith(prefix)), None)


STARTED = time.perf_counter()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--prompts", type=int, default=500, help="SlimSet size (k-means from the shipped pool)")
    parser.add_argument("--selection", default="kmeans", choices=["kmeans", "random"],
                        help="SlimSet selection (kmeans embeds the 2,000-prompt pool with the text encoder: "
                             "minutes on a CPU, so smoke tests use random)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps per prompt")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call (pipe.slim's default)")
    parser.add_argument("--keep", type=float, default=0.6, help="keep ratio (FLOP budget)")
    parser.add_argument("--probe-calls", type=int, default=None,
                        help="propagation probe calls (default: CalibrationConfig's)")
    parser.add_argument("--accumulate-dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--statistics-device", default=None,
                        help="CalibrationConfig.statistics_device (default: the activations' device)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--heartbeat", type=float, default=20.0, help="seconds between progress writes")
    parser.add_argument("--no-progress", action="store_true", help="hide the library's progress bars")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    dtype = getattr(torch, args.dtype)
    out = args.out or ROOT / "benchmarks" / "results" / f"calibration_wall_{device.type}.json"

    import slimdiff_diffusers as sd

    result: dict[str, Any] = {
        "benchmark": "calibration_wall", "status": "starting", "phase": "build",
        "command": "python benchmarks/calibration_wall.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "settings": {"arch": "sd15", "device": str(device), "dtype": args.dtype, "prompts": args.prompts,
                     "steps": args.steps, "resolution": args.resolution, "batch_size": args.batch_size,
                     "keep_ratio": args.keep, "budget": "flops", "selection": args.selection, "guidance_scale": 7.5,
                     "accumulate_dtype": args.accumulate_dtype, "statistics_device": args.statistics_device},
    }
    lock = threading.Lock()

    def flush() -> None:
        with lock:
            result["elapsed_seconds"] = round(time.perf_counter() - STARTED, 2)
            result["rss_mib"] = round(_rss_mib(), 1)
            result["peak_rss_mib"] = round(_peak_rss_mib(), 1)
            if device.type == "cuda":
                result["peak_gpu_mib_so_far"] = round(_gpu_peak_mib(device), 1)
            write_json(out, result)

    recorder = _Recorder(flush, device)
    library_log = logging.getLogger("slimdiff")
    library_log.addHandler(recorder)
    library_log.setLevel(logging.INFO)
    result["events"] = recorder.events
    flush()

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(args.heartbeat):
            flush()

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        t0 = time.perf_counter()
        pipe = build_pipeline(device, dtype)
        sd.enable_slimdiff(pipe)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        unet_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
        result |= {"phase": "pipe.slim", "status": "running", "build_seconds": round(time.perf_counter() - t0, 2),
                   "unet_mib": round(unet_bytes / 2**20, 1), "rss_loaded_mib": round(_rss_mib(), 1),
                   "gpu_loaded_mib": round(torch.cuda.memory_allocated(device) / 2**20, 1)
                   if device.type == "cuda" else None}
        flush()

        options: dict[str, Any] = {"accumulate_dtype": getattr(torch, args.accumulate_dtype)}
        if args.probe_calls is not None:
            options["propagation_probe_calls"] = args.probe_calls
        if args.statistics_device is not None:
            options["statistics_device"] = args.statistics_device
        calibration_config = sd.CalibrationConfig(**options)
        t0 = time.perf_counter()
        report = pipe.slim(num_prompts=args.prompts, selection=args.selection, keep_ratio=args.keep, budget="flops",
                           num_inference_steps=args.steps, height=args.resolution, width=args.resolution,
                           batch_size=args.batch_size, calibration_config=calibration_config,
                           progress=not args.no_progress)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - t0
        sampled = recorder.first("calibration: ")  # logged when the statistics are frozen, after the probe
        probe_start = recorder.first("propagation probe started")
        probe_end = recorder.first("propagation probing:")
        result |= {
            "status": "done", "phase": "done",
            "pipe_slim_seconds": round(total, 2),
            "calibration_seconds": report.calibration_seconds,  # SlimSet selection + sampling + probe
            "probe_seconds": round(probe_end["t"] - probe_start["t"], 2) if probe_start and probe_end else None,
            "calibration_forward_calls": report.calibration_forward_calls,
            "statistics_mib": round(report.calibration_memory_bytes / 2**20, 1),
            "slimming_seconds": report.slim.seconds,  # planning + in-place apply
            "slimming_stage_seconds": report.slim.stage_seconds,
            "params_before": report.slim.params_before, "params_after": report.slim.params_after,
            "peak_gpu_mib": _gpu_peak_mib(device),
            "peak_gpu_mib_calibration": sampled["peak_gpu_mib"] if sampled else None,
            "peak_rss_mib_calibration": sampled["peak_rss_mib"] if sampled else None,
            "peak_rss_mib_final": round(_peak_rss_mib(), 1),
        }
    except BaseException as exc:  # keep what was reached, say what stopped it
        result |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        raise
    finally:
        stop.set()
        flush()
        library_log.removeHandler(recorder)
    print({k: v for k, v in result.items() if k not in ("events", "machine")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
