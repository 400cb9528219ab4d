"""What the slim attention processors' zero-padding costs, and whether SDPA can take unequal head widths directly.

A slimmed attention has q/k and v head widths that may differ (``qk_rank`` vs ``vo_rank``). The slim processors
(``LowRankAttnProcessor``, ``SlimFluxAttnProcessor``, ``SlimJointAttnProcessor``) zero-pad the narrower side to one
width inside SDPA and slice the padding off the output; where the widths agree they run exactly the stock
processor's operations. This script measures, interleaved round by round (medians), on the current device:

* ``sdpa``: one ``F.scaled_dot_product_attention`` call with unequal widths, *direct* (PyTorch picks the kernel:
  on CPU the math fallback; on CUDA the memory-efficient kernel accepts a v width different from q/k's) against
  *padded* (the processors' way), with the largest difference between the two and against an fp64 reference;
* ``processor``: one call of ``LowRankAttnProcessor`` against diffusers' ``AttnProcessor2_0`` on an unslimmed
  ``Attention`` (equal widths: the slim processor must cost nothing extra there).

    python benchmarks/attention_padding.py                       # CPU, 1 thread
    python benchmarks/attention_padding.py --device cuda --dtype float16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_json  # noqa: E402

# (tokens, q/k width, v width) per head, 8 heads, batch 2: SD1.5-like widths at its 64x64 (4096) and 32x32 (1024)
# latent resolutions; 40 is SD1.5's head width, 24/32 what keep 0.6 leaves.
CASES = [(1024, 24, 40), (1024, 40, 24), (1024, 40, 40), (4096, 24, 40), (4096, 40, 24), (4096, 32, 32)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1000


def padded_sdpa(q, k, v, scale):
    """The slim processors' path: pad the narrower side, one fused call, slice the output."""
    dqk, dv = q.shape[-1], v.shape[-1]
    if dqk == dv:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    width = max(dqk, dv)
    if dqk < width:
        q, k = F.pad(q, (0, width - dqk)), F.pad(k, (0, width - dqk))
    else:
        v = F.pad(v, (0, width - dv))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :dv]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"attention_padding_{device.type}.json")
    payload = {"benchmark": "attention_padding",
               "command": "python benchmarks/attention_padding.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": machine_info(), "settings": vars(args), "sdpa": [], "processor": {}}
    gen = torch.Generator().manual_seed(0)
    scale = 40 ** -0.5  # the original head width's scale, as a slimmed SD1.5 attention keeps it

    # --- SDPA: direct (unequal widths) vs padded ---------------------------------------------------------------
    tensors = {}
    for tokens, dqk, dv in CASES:
        q, k = (torch.randn(2, 8, tokens, dqk, generator=gen) for _ in range(2))
        v = torch.randn(2, 8, tokens, dv, generator=gen)
        reference = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, -1) @ v.double()
        q, k, v = (t.to(device, dtype) for t in (q, k, v))
        row = {"tokens": tokens, "qk_width": dqk, "v_width": dv}
        with torch.no_grad():
            padded = padded_sdpa(q, k, v, scale)
            row["padded_max_error_vs_fp64"] = float((padded.double().cpu() - reference).abs().max())
            try:
                direct = F.scaled_dot_product_attention(q, k, v, scale=scale)
                row["direct_max_error_vs_fp64"] = float((direct.double().cpu() - reference).abs().max())
                row["direct_vs_padded_max_difference"] = float((direct - padded).abs().max())
            except RuntimeError as exc:  # a backend that refuses unequal widths: recorded, not fatal
                row["direct_error"] = f"{type(exc).__name__}: {exc}"
        tensors[(tokens, dqk, dv)] = (q, k, v)
        payload["sdpa"].append(row)
    times = {key: {"padded": [], "direct": []} for key in tensors}
    for _ in range(args.repeats):
        for key, (q, k, v) in tensors.items():
            with torch.no_grad():
                times[key]["padded"].append(_timed(lambda: padded_sdpa(q, k, v, scale), device))
                if key[1] != key[2] and "direct_error" not in payload["sdpa"][list(tensors).index(key)]:
                    times[key]["direct"].append(
                        _timed(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), device))
    for row, key in zip(payload["sdpa"], tensors):
        row["padded_ms"] = statistics.median(times[key]["padded"])
        if times[key]["direct"]:
            row["direct_ms"] = statistics.median(times[key]["direct"])
            row["direct_over_padded"] = row["direct_ms"] / row["padded_ms"]
        print(row, flush=True)

    # --- processor on an unslimmed attention: LowRankAttnProcessor vs AttnProcessor2_0 -------------------------
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from slimdiff_diffusers.diffusers_adapter.attention_processor import LowRankAttnProcessor

    torch.manual_seed(0)
    attn = Attention(320, heads=8, dim_head=40).eval().to(device, dtype)
    x = torch.randn(2, 1024, 320, generator=gen).to(device, dtype)
    processors = {"AttnProcessor2_0": AttnProcessor2_0(), "LowRankAttnProcessor": LowRankAttnProcessor()}
    with torch.no_grad():
        outs = {name: p(attn, x) for name, p in processors.items()}
        ptimes = {name: [] for name in processors}
        for _ in range(args.repeats * 4):
            for name, p in processors.items():
                ptimes[name].append(_timed(lambda: p(attn, x), device))
    payload["processor"] = {
        "shape": "batch 2, 1024 tokens, 8 heads of 40 (unslimmed SD1.5 320-wide attention)",
        "max_difference": float((outs["LowRankAttnProcessor"] - outs["AttnProcessor2_0"]).abs().max()),
        **{f"{name}_ms": statistics.median(t) for name, t in ptimes.items()}}
    payload["processor"]["ratio"] = (payload["processor"]["LowRankAttnProcessor_ms"]
                                     / payload["processor"]["AttnProcessor2_0_ms"])
    print(payload["processor"], flush=True)
    payload["load_average_1min"] = round(os.getloadavg()[0], 2)
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
