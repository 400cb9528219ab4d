"""Calibration under ``memory_limit`` at Flux.1-dev width equals the unbounded run (issue 9's acceptance).

Builds a ``FluxTransformer2DModel`` with Flux.1-dev's real widths (24 heads of 128 = 3072, FFN 12288, T5 width
4096, guidance embedding) but only a few blocks (random weights: statistics and memory depend on shapes only),
then, in one fresh process per run:

* calibrates it on the same inputs without a limit, and with ``memory_limit`` at a fraction of the statistics'
  estimated size (passes over the same inputs, statistics spilled to safetensors shards);
* plans and applies the same FLOP budget, and saves the slim weights.

The parent compares the two SlimSpecs and every slim weight (relative max difference), and records each run's
peak resident memory and wall time.

    python benchmarks/bounded_calibration.py                       # 1 double + 2 single blocks, limit 1/4
    python benchmarks/bounded_calibration.py --double 2 --single 1 --fraction 0.25

Writes benchmarks/results/bounded_calibration_flux_width.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_json  # noqa: E402
from benchmarks.cost import _peak_rss_mib, _rss_mib  # noqa: E402

RESULT_PREFIX = "BOUNDED-RESULT "
# Flux.1-dev's transformer config (black-forest-labs/FLUX.1-dev), with fewer blocks.
FLUX_DEV = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _model(double: int, single: int):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(num_layers=double, num_single_layers=single, **FLUX_DEV).eval()


def _inputs(model, seed: int, side: int, text_len: int, batch: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return {"hidden_states": torch.randn(batch, side * side, FLUX_DEV["in_channels"], generator=g),
            "encoder_hidden_states": torch.randn(batch, text_len, FLUX_DEV["joint_attention_dim"], generator=g),
            "pooled_projections": torch.randn(batch, FLUX_DEV["pooled_projection_dim"], generator=g),
            "timestep": torch.rand(batch, generator=g), "guidance": torch.full((batch,), 3.5),
            "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(text_len, 3), "return_dict": False}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import slimdiff_diffusers as sd
    from safetensors.torch import save_file

    before = _rss_mib()
    model = _model(args.double, args.single)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sites = sd.find_sites(model)
    estimate = sd.core.estimate_statistics_bytes(sites, sd.CalibrationConfig())
    limit = int(estimate * args.fraction) if args.fraction else None

    def run():  # the same inputs on every call: passes repeat the same forward passes
        for call in range(args.calls):
            model(**_inputs(model, call, args.side, args.text_len, args.batch))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slimdiff-bounded-") as spill:
        calibration = sd.calibrate(model, run, sd.CalibrationConfig(memory_limit=limit, spill_dir=spill,
                                                                     propagation_probe_calls=1))
        calibrated = time.perf_counter()
        slim = sd.slim(model, calibration, keep_ratio=args.keep, budget="flops")
        slimmed = time.perf_counter()
        save_file({k: v.contiguous() for k, v in slim.state_dict().items()}, args.save)
    return {"memory_limit_bytes": limit, "statistics_estimate_bytes": estimate, "passes": calibration.meta.get("passes", 1),
            "statistics_in_memory_bytes": calibration.meta["memory_bytes"], "model_bytes": model_bytes,
            "calibration_seconds": round(calibrated - started, 1), "slim_seconds": round(slimmed - calibrated, 1),
            "rss_before_model_mib": before, "peak_rss_mib": _peak_rss_mib(),
            "params_before": sum(p.numel() for p in model.parameters()),
            "params_after": sum(p.numel() for p in slim.parameters()), "spec": slim.slimdiff_spec.to_dict()}


def _run_worker(args: argparse.Namespace, fraction: float, save: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", "--double", str(args.double), "--single", str(args.single),
               "--fraction", str(fraction), "--keep", str(args.keep), "--side", str(args.side), "--text-len",
               str(args.text_len), "--batch", str(args.batch), "--calls", str(args.calls), "--threads",
               str(args.threads), "--save", str(save)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def compare(a: Path, b: Path) -> dict[str, Any]:
    from safetensors.torch import load_file
    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return {"same_keys": False}
    worst, name = 0.0, None
    for key in x:
        if x[key].shape != y[key].shape:
            return {"same_keys": True, "same_shapes": False, "first_mismatch": key}
        scale = x[key].double().abs().max().clamp_min(1e-30)
        rel = float((x[key].double() - y[key].double()).abs().max() / scale)
        if rel >= worst:
            worst, name = rel, key
    return {"same_keys": True, "same_shapes": True, "max_relative_difference": worst, "worst_tensor": name,
            "tensors": len(x)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (Flux.1-dev has 19)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (Flux.1-dev has 38)")
    parser.add_argument("--fraction", type=float, default=0.25, help="memory_limit as a fraction of the statistics")
    parser.add_argument("--keep", type=float, default=0.6, help="FLOP keep ratio of the slim model")
    parser.add_argument("--side", type=int, default=8, help="latent side in patches (side² image tokens)")
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3, help="forward calls in the calibration run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", action="store_true",
                        help="run the unbounded and the bounded process at the same time (needs both in memory)")
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bounded_calibration_flux_width.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return
    if not 0 < args.fraction < 1:
        raise SystemExit("--fraction must be in (0, 1)")
    with tempfile.TemporaryDirectory(prefix="slimdiff-bounded-out-") as folder:
        if args.parallel:  # each process's peak RSS is still its own; wall times then share the machine
            with ThreadPoolExecutor(2) as pool:
                runs = [pool.submit(_run_worker, args, fraction, Path(folder) / name)
                        for fraction, name in ((0.0, "unbounded.safetensors"), (args.fraction, "bounded.safetensors"))]
                unbounded, bounded = (run.result() for run in runs)
        else:
            unbounded = _run_worker(args, 0.0, Path(folder) / "unbounded.safetensors")
            bounded = _run_worker(args, args.fraction, Path(folder) / "bounded.safetensors")
        for run in (unbounded, bounded):
            print(json.dumps({k: v for k, v in run.items() if k != "spec"}), flush=True)
        weights = compare(Path(folder) / "unbounded.safetensors", Path(folder) / "bounded.safetensors")
    result = {"config": {**FLUX_DEV, "num_layers": args.double, "num_single_layers": args.single, "dtype": "float32"},
              "inputs": {"image_tokens": args.side ** 2, "text_tokens": args.text_len, "batch": args.batch,
                         "calls": args.calls},
              "keep_ratio": args.keep, "budget": "flops", "fraction": args.fraction, "parallel": args.parallel,
              "same_spec": unbounded["spec"] == bounded["spec"], "weights": weights,
              "unbounded": {k: v for k, v in unbounded.items() if k != "spec"},
              "bounded": {k: v for k, v in bounded.items() if k != "spec"}}
    print(json.dumps({k: result[k] for k in ("same_spec", "weights")}, indent=1))
    write_json(args.out, {"machine": machine_info(),
                          "command": "python benchmarks/bounded_calibration.py " + " ".join(argv or sys.argv[1:]),
                          "results": [result]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
