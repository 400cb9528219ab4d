"""What the attention-output statistics cost during calibration (decisions.md row 26).

``CalibrationConfig.attention_output_statistics="auto"`` collects the per-head moments of each VO reader's input
for joint and single-stream attention, because ``SlimConfig.vo_output_refit="auto"`` refits those readers. This
measures what that adds to a calibration of an embedded model, in its trained sampler setting: the same prompt
batches run plain, hooked without the head-output moments and hooked with them ("auto"), interleaved batch by
batch so that drift of a shared machine falls on all three alike.

    python benchmarks/attention_output_cost.py --model flux-tiny --prompts 32 --threads 1

Writes benchmarks/results/attention_output_cost_<model>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, write_json  # noqa: E402

BATCH = 8


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux-tiny", help="an embedded model name (default flux-tiny)")
    parser.add_argument("--prompts", type=int, default=32, help="calibration prompts, in batches of 8 (default 32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from slimdiff_diffusers import CalibrationConfig, Calibrator
    from slimdiff_diffusers.default_model import CALIBRATION_PROMPTS, EMBEDDED_MODELS

    model = EMBEDDED_MODELS[args.model]
    pipe = model.load()
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    prompts = list(CALIBRATION_PROMPTS[:args.prompts])
    batches = [prompts[i:i + BATCH] for i in range(0, len(prompts), BATCH)]
    calibrators = {setting: Calibrator(denoiser, CalibrationConfig(
        num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps), attention_output_statistics=setting))
        for setting in (False, "auto")}

    def sample(i: int) -> None:
        pipe(prompt=batches[i], output_type="latent", generator=[torch.Generator().manual_seed(s) for s in
                                                                   range(i * BATCH, i * BATCH + len(batches[i]))],
             **model.generation_kwargs(batch_size=len(batches[i])))

    seconds: dict[str, list[float]] = {"plain": [], "without": [], "auto": []}
    with torch.no_grad():
        sample(0)  # warm-up (first-call allocations), not timed
        for i in range(len(batches)):
            for name, setting in (("plain", None), ("without", False), ("auto", "auto")):
                t = time.perf_counter()
                if setting is None:
                    sample(i)
                else:
                    with calibrators[setting].attach(denoiser):
                        sample(i)
                seconds[name].append(time.perf_counter() - t)
    stats = {setting: calibrators[setting].finalize(probe_model=None) for setting in (False, "auto")}
    ratio = {name: sum(seconds[name]) / sum(seconds["plain"]) for name in ("without", "auto")}
    per_batch = [a / w for a, w in zip(seconds["auto"], seconds["without"])]
    payload = {
        "benchmark": "attention_output_cost", "model": args.model,
        "command": "python benchmarks/attention_output_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info() | {"threads": args.threads},
        "settings": {"prompts": len(prompts), "batch": BATCH, **{k: str(v) for k, v in
                                                                 model.generation_kwargs().items()}},
        "seconds": seconds,
        "hooked_over_plain": ratio,
        "auto_over_without_median_per_batch": statistics.median(per_batch),
        "statistics_mib": {str(k): v.nbytes / 2**20 for k, v in stats.items()},
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"attention_output_cost_{args.model}.json"
    write_json(out, payload)
    print(f"hooked / plain: without head outputs {ratio['without']:.3f}x, with (auto) {ratio['auto']:.3f}x; "
          f"auto / without per batch (median) {payload['auto_over_without_median_per_batch']:.3f}; statistics "
          f"{payload['statistics_mib']['False']:.1f} -> {payload['statistics_mib']['auto']:.1f} MiB; wrote {out}")


if __name__ == "__main__":
    main()
