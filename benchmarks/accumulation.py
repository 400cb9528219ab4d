"""Cost of accumulating second moments alone: the current MomentAccumulator against the accumulation before the
cheaper-calibration change (decisions.md row 13), interleaved call by call on the input shapes of one SD1.5 CFG
call (batch 2) at 256 px, plus accuracy against an fp64 reference.

    python benchmarks/accumulation.py --calls 10 --threads 2

Prints one JSON line (no result file: the end-to-end figures come from benchmarks/cost.py --legacy).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slimdiff_diffusers.core.moments import MomentAccumulator  # noqa: E402

# (rows per call, width, transformer blocks) of SD1.5 at 256 px, batch 2: q/k/v input, attn2 q input, FFN hidden.
SD15_256 = [(2048, 320, 5), (512, 640, 5), (128, 1280, 5), (32, 1280, 1)]


def legacy_add(acc: MomentAccumulator, x: torch.Tensor) -> None:
    rows = x.reshape(-1, acc.dim).float()
    acc.xx[0] += (rows.T @ rows).to(acc.xx.dtype)
    acc.x[0] += rows.sum(0).to(acc.x.dtype)
    acc.counts[0] += rows.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [s for n, d, blocks in SD15_256 for _ in range(blocks) for s in ((n, d), (n, d), (n, 4 * d))]
    shapes.append((154, 768))  # the text states, shared by every cross-attention
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, d, generator=gen) for n, d in shapes]
    new = [MomentAccumulator(d, 1, torch.float64, "cpu") for _, d in shapes]
    old = [MomentAccumulator(d, 1, torch.float64, "cpu") for _, d in shapes]
    t_new, t_old = [], []
    for call in range(args.calls):
        for which in (("new", "old") if call % 2 == 0 else ("old", "new")):
            t0 = time.perf_counter()
            if which == "new":
                for x, acc in zip(xs, new):
                    acc.add(x, 0)
                t_new.append(time.perf_counter() - t0)
            else:
                for x, acc in zip(xs, old):
                    legacy_add(acc, x)
                t_old.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    frozen = [acc.freeze()[0] for acc in new]
    t_freeze = time.perf_counter() - t0
    error = max(float((f - x.double().T @ x.double() * args.calls).norm() / (x.double().T @ x.double() * args.calls).norm())
                for f, x in zip(frozen, xs))
    print(json.dumps({"calls": args.calls, "threads": args.threads, "legacy_seconds": t_old, "new_seconds": t_new,
                      "freeze_seconds": t_freeze, "new_over_legacy_per_call": sum(t_new) / sum(t_old),
                      "new_over_legacy_with_freeze": (sum(t_new) + t_freeze) / sum(t_old),
                      "max_relative_error_vs_fp64": error}))


if __name__ == "__main__":
    main()
