"""Does this CPU run bf16 convolutions and matmuls at a usable speed? (The SDXL speed run is in bf16.)

Times one SDXL-sized 3×3 convolution (1280 channels, 16×16, batch 2) and one 2048×1280 × 1280×1280 matmul in fp32
and in bf16, on ``--threads`` threads. CPUs without native bf16 (AVX-512-BF16 / AMX) fall back to slow paths,
which makes a bf16 SDXL UNet call take minutes instead of about a second.

    python benchmarks/bf16_probe.py --threads 1

Writes benchmarks/results/bf16_probe_cpu.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_json  # noqa: E402


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bf16_probe_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split() \
        if Path("/proc/cpuinfo").exists() else []
    results = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            conv = torch.nn.Conv2d(1280, 1280, 3, padding=1).to(dtype)
            x = torch.randn(2, 1280, 16, 16, dtype=dtype)
            a, b = torch.randn(2048, 1280, dtype=dtype), torch.randn(1280, 1280, dtype=dtype)
            name = str(dtype).removeprefix("torch.")
            results[name] = {"conv_seconds": seconds(lambda: conv(x), 1 if dtype == torch.bfloat16 else 5),
                             "matmul_seconds": seconds(lambda: a @ b, 5)}
            print(name, results[name], flush=True)
    write_json(args.out, {"benchmark": "bf16_probe", "command": "python " + " ".join(sys.argv), "machine": machine_info(),
                          "cpu_flags": sorted(f for f in flags if f.startswith(("avx512", "amx")) or f == "avx2"),
                          "results": results,
                          "bf16_slowdown": {k: results["bfloat16"][k] / results["float32"][k]
                                            for k in ("conv_seconds", "matmul_seconds")}})


if __name__ == "__main__":
    main()
