"""FFN channel selection (method.md §3.1 / §3.1.1): the refit error each selection leaves, and what it costs.

For every feed-forward of the embedded models (``flux_tiny``, ``default`` = sd-tiny), calibrated as their quality
benchmark calibrates them (benchmarks/quality.py: the first 32 / 100 calibration prompts, the registry's sampler),
the relative calibration error of the least-squares refit at a quarter, half and three quarters of the width for

* ``leverage``: top ridge leverage scores (``ffn_selection="leverage"``, the default);
* ``greedy``: the shipped output-aware forward selection in rounds of ``GREEDY_BLOCK`` (``ffn_selection="greedy"``);
* ``forward_exact``: forward selection one channel at a time over all channels (the rounds' reference).

Each curve is the decomposition's own exact error (the refit's, tests/test_decompositions.py). Then the time of
one decomposition of each kind on a synthetic m = 3072 moment (d = 768), on one thread.

    PYTHONPATH=. python benchmarks/ffn_selection.py

Writes ``benchmarks/results/ffn_selection.json``.
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
from slimdiff_diffusers.core import decompositions as dec  # noqa: E402
from slimdiff_diffusers.core.moments import MomentMatrix  # noqa: E402

CALIBRATION_PROMPTS = {"flux_tiny": 32, "default": 100}  # quality.py's defaults


def _errors(order_explained_total: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    _, explained, total = order_explained_total
    return ((total - explained) / total).clamp_min(0.0)  # index k: the intercept and k channels


def model_rows(model: str) -> list[dict]:
    from benchmarks import quality

    args = argparse.Namespace(model=model, eval_set="validation", cal_samples=CALIBRATION_PROMPTS[model],
                              eval_samples=1, eval_seeds=1, steps=None, pipeline_dir=None, threads=1)
    workload = quality.WORKLOADS[model](args)
    calibration = workload.calibrate(CALIBRATION_PROMPTS[model], False)
    rows = []
    for site in calibration.sites.feed_forward:
        down = workload.model.get_submodule(site.down)
        weight = down.weight[:, -site.inner_dim:] if site.kind == "single" else down.weight
        target = dec._augmented_weight(weight.detach(), None if down.bias is None else down.bias.detach())
        blocks = calibration.augmented_input_blocks(site.hidden_key)
        m = blocks.size - 1
        full = MomentMatrix(blocks.full())
        curves = {
            "leverage": dec.decompose_ffn_augmented(weight.detach(), down.bias, blocks, selection="leverage").errors,
            "greedy": dec.decompose_ffn_augmented(weight.detach(), down.bias, blocks, selection="greedy").errors,
            "forward_exact": _errors(dec._greedy_order(full, target, block=1, pool=m)),
        }
        widths = [m // 4, m // 2, 3 * m // 4]
        rows.append({"model": model, "ffn": site.name, "inner_dim": m, "widths": widths,
                     **{name: [float(curve[w]) for w in widths] for name, curve in curves.items()}})
        print(f"{model:9s} {site.name:45s} " + "  ".join(f"{n} {[round(v, 5) for v in rows[-1][n]]}"
                                                        for n in curves), flush=True)
    return rows


def timing(m: int = 3072, d: int = 768, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * m, m, generator=gen, dtype=torch.float64) @ torch.randn(m, m, generator=gen, dtype=torch.float64)
    x = torch.nn.functional.gelu(x / m ** 0.5)
    moment = MomentMatrix(dec.augment(x.T @ x / len(x), x.mean(0)))
    del x
    weight, bias = torch.randn(d, m, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    out = {"inner_dim": m, "out_dim": d}
    for selection in dec.FFN_SELECTIONS:
        start = time.perf_counter()
        dec.decompose_ffn_augmented(weight, bias, moment, selection=selection)
        out[f"{selection}_seconds"] = round(time.perf_counter() - start, 2)
    print("timing", out, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CALIBRATION_PROMPTS), choices=list(CALIBRATION_PROMPTS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ffn_selection.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    rows = [row for model in args.models for row in model_rows(model)]
    ratios = {name: [r[name][i] / max(r["leverage"][i], 1e-30) for r in rows for i in range(3)]
              for name in ("greedy", "forward_exact")}
    rounds_vs_exact = [r["greedy"][i] / max(r["forward_exact"][i], 1e-30) for r in rows for i in range(3)]
    summary = {
        "greedy_over_leverage": {"min": min(ratios["greedy"]), "max": max(ratios["greedy"])},
        "greedy_rounds_over_forward_exact": {"min": min(rounds_vs_exact), "max": max(rounds_vs_exact)},
        "greedy_block": dec.GREEDY_BLOCK, "greedy_pool": dec.GREEDY_POOL,
    }
    print("summary", summary)
    write_json(args.out, {"benchmark": "ffn_selection", "command": "python benchmarks/ffn_selection.py",
                          "machine": machine_info(), "rows": rows, "summary": summary, "timing": timing()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
