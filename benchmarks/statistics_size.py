"""Predicted size of the calibration statistics of the real SD1.5, SDXL, Flux.1-dev and SD3.5-large denoisers.

Builds each configuration on the meta device (no weights are allocated), finds its sites as ``calibrate`` would
(:func:`find_sites`) and applies :func:`estimate_statistics_bytes` (the formula of docs/statistics_size.md) for
fp64 and fp32 accumulation, without and with the attention-output moments. ``Calibrator`` logs the same estimate
before its first forward pass, and a test checks that it equals the real size on tiny configurations.

    python benchmarks/statistics_size.py

Writes benchmarks/results/statistics_size.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_json  # noqa: E402
from benchmarks.speed import CONFIGS, FLUX_DEV  # noqa: E402

import slimdiff_diffusers as sd  # noqa: E402

SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")


def build(family: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        if family in CONFIGS:
            return UNet2DConditionModel(**CONFIGS[family][0])
        if family == "flux-dev":
            return FluxTransformer2DModel(**FLUX_DEV)
        return SD3Transformer2DModel(**SD35_LARGE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "statistics_size.json"))
    args = parser.parse_args()
    rows = []
    for family in ("sd15", "sdxl", "flux-dev", "sd35-large"):
        sites = sd.find_sites(build(family))
        row = {"family": family, "attention_sites": len(sites.attention), "feed_forward_sites": len(sites.feed_forward)}
        for dtype in (torch.float64, torch.float32):
            for heads in (False, True):
                config = sd.CalibrationConfig(accumulate_dtype=dtype, attention_output_statistics=heads)
                key = f"{str(dtype).removeprefix('torch.')}{'_with_attention_output' if heads else ''}_gib"
                row[key] = sd.core.estimate_statistics_bytes(sites, config) / 2**30
        rows.append(row)
        print(row, flush=True)
    write_json(Path(args.out), {"benchmark": "statistics_size", "command": "python " + " ".join(sys.argv),
                                "machine": machine_info(), "results": rows})


if __name__ == "__main__":
    main()
