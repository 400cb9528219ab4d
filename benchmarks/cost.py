"""Cost of compressing: calibration time and peak memory versus prompts and steps, and the slimming stages.

Two kinds of workload:

* ``default``: the embedded, trained text-to-image pipeline with real prompts. For every (prompts, steps) it runs
  :func:`calibrate_pipeline` (the pipeline's own sampler, CFG on, batches of 8) and, for comparison, the same
  sampling without hooks; then slims at keep 0.6 and records the stage times of :func:`slim`.
* ``sd15`` / ``sdxl``: the real UNet configuration with random weights (statistics sizes and decomposition times
  depend on shapes only). It calibrates ``--calls`` CFG UNet calls (batch 2) at ``--resolution`` and reports the
  cost per UNet call, with and without hooks, the propagation probe, the statistics' size and the stage times
  of :func:`slim`. Calibration cost is linear in UNet calls (prompts x steps), which the ``default`` grid shows.

Every measurement runs in a fresh Python process, so its peak resident memory (``ru_maxrss``) is its own; the
table reports it above the process's memory once the model is loaded.

    python benchmarks/cost.py --model default --prompts 50 100 500 --steps 25 --extra-steps 10 50
    python benchmarks/cost.py --model sd15 --resolution 256 --calls 4

Writes benchmarks/results/cost_<model>.json (one file per model; a rerun replaces it).
"""
from __future__ import annotations

import argparse
import json
import resource
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

RESULT_PREFIX = "COST-RESULT "
KEEP_RATIO = 0.6


def _rss_mib() -> float:
    """Current resident memory of this process (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _slim_stages(model, calibration) -> dict[str, Any]:
    import slimdiff_diffusers as sd

    slim = sd.slim(model, calibration, keep_ratio=KEEP_RATIO)
    report = slim.slimdiff_report
    return {"slim_seconds": report.seconds, "stage_seconds": report.stage_seconds,
            "params_removed": report.params_removed, "slim_keep_ratio": KEEP_RATIO}


class _LegacyAccumulation:
    """The accumulation before the cheaper-calibration changes (one full fp32 product per call, cast to fp64
    into a temporary, then added; the finite check on every element rather than on the column sums), swapped in
    to measure old and new interleaved in one process."""

    def __enter__(self):
        from slimdiff_diffusers.core import moments

        def add(acc, x, bucket):
            rows = x.reshape(-1, acc.dim).float()
            torch.isfinite(rows).all()  # the old check's cost (the calibrator still checks the running sums)
            acc.xx[bucket] += (rows.T @ rows).to(acc.xx.dtype)
            acc.x[bucket] += rows.sum(0).to(acc.x.dtype)
            acc.counts[bucket] += rows.shape[0]

        self._saved = moments.MomentAccumulator.add
        moments.MomentAccumulator.add = add
        return self

    def __exit__(self, *exc):
        from slimdiff_diffusers.core import moments

        moments.MomentAccumulator.add = self._saved


def _interleaved(run_plain, run_hooked, run_legacy, units: int) -> dict[str, Any]:
    """Time ``units`` runs of each, interleaved (rotating the order), so that the load of a shared machine
    falls on all three alike. Returns the per-unit seconds and the overhead ratios."""
    runs = {"plain": run_plain, "hooked": run_hooked}
    if run_legacy is not None:
        runs["legacy"] = run_legacy
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for i in range(units):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            t0 = time.perf_counter()
            runs[name](i)
            seconds[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {f"{k}_seconds": v for k, v in seconds.items()}
    ratios = [h / p for h, p in zip(seconds["hooked"], seconds["plain"])]
    out["overhead_ratio"] = sum(seconds["hooked"]) / sum(seconds["plain"])
    out["overhead_ratio_median"] = sorted(ratios)[len(ratios) // 2]
    if "legacy" in seconds:
        legacy = [h / p for h, p in zip(seconds["legacy"], seconds["plain"])]
        out["legacy_overhead_ratio"] = sum(seconds["legacy"]) / sum(seconds["plain"])
        out["legacy_overhead_ratio_median"] = sorted(legacy)[len(legacy) // 2]
    return out


def worker_default(prompts: int, steps: int, legacy: bool = False, slim: bool = True) -> dict[str, Any]:
    """Calibrate the embedded pipeline on ``prompts`` calibration prompts with ``steps`` sampling steps.

    The same batches as :func:`calibrate_pipeline` (8 prompts, CFG on, their seeds) run plain and hooked,
    interleaved batch by batch; the hooked runs make the calibration, then the propagation probe runs.
    """
    from slimdiff_diffusers import CalibrationConfig, Calibrator
    from slimdiff_diffusers.default_model import CALIBRATION_PROMPTS, load_default_pipeline
    from slimdiff_diffusers.diffusers_adapter.slimset import SlimSet

    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    slimset = SlimSet(list(CALIBRATION_PROMPTS[:prompts]), list(range(prompts)))
    batches = [(slimset.prompts[i:i + 8], slimset.seeds[i:i + 8]) for i in range(0, prompts, 8)]
    config = CalibrationConfig(num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps))
    loaded = _rss_mib()
    started = time.perf_counter()
    calibrator = Calibrator(pipe.unet, config, record_calls=config.propagation_probe_calls)
    legacy_calibrator = Calibrator(pipe.unet, config) if legacy else None
    setup = time.perf_counter() - started

    def sample(i: int) -> None:
        prompts_i, seeds = batches[i]
        pipe(prompt=prompts_i, num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
             generator=[torch.Generator().manual_seed(s) for s in seeds])

    def hooked(i: int) -> None:
        with calibrator.attach(pipe.unet):
            sample(i)

    def legacy_hooked(i: int) -> None:
        with _LegacyAccumulation(), legacy_calibrator.attach(pipe.unet):
            sample(i)

    with torch.no_grad():
        timing = _interleaved(sample, hooked, legacy_hooked if legacy else None, len(batches))
    t0 = time.perf_counter()
    calibration = calibrator.finalize(probe_model=pipe.unet)
    finalize = time.perf_counter() - t0
    probe = calibration.meta["probe_seconds"]
    seconds = setup + sum(timing["hooked_seconds"]) + finalize
    peak = _peak_rss_mib()
    return {"prompts": prompts, "steps": steps, "unet_calls": calibration.meta["num_forward_calls"],
            "calibration_seconds": seconds, "probe_seconds": probe, "probe_share": probe / seconds,
            "plain_sampling_seconds": sum(timing["plain_seconds"]), **timing,
            "statistics_mib": calibration.nbytes / 2**20,
            "rss_loaded_mib": loaded, "peak_rss_mib": peak, "peak_above_loaded_mib": peak - loaded,
            **(_slim_stages(pipe.unet, calibration) if slim else {})}


def worker_unet(arch: str, resolution: int, calls: int, accumulate: str, legacy: bool = False,
                slim: bool = True) -> dict[str, Any]:
    """Calibrate a random-weight UNet of the real ``arch`` configuration on ``calls`` CFG calls (batch 2).

    Each call runs plain and hooked (and with the legacy accumulation), interleaved; a first hooked call, not
    timed in the ratio, allocates the accumulators (reported as ``setup_seconds``).
    """
    import slimdiff_diffusers as sd
    from benchmarks.speed import CONFIGS, inputs
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[arch][0]).eval()
    x, kw = inputs(arch, 2, resolution, "cpu", torch.float32)
    timesteps = torch.linspace(950, 50, calls).round().int().tolist()
    config = sd.CalibrationConfig(accumulate_dtype=getattr(torch, accumulate))
    with torch.no_grad():
        unet(x, 500, **kw)  # warm-up
        loaded = _rss_mib()
        calibrator = sd.Calibrator(unet, config, record_calls=config.propagation_probe_calls)
        legacy_calibrator = sd.Calibrator(unet, config) if legacy else None
        t0 = time.perf_counter()
        with calibrator.attach(unet):  # allocates the accumulators (a fixed cost, whatever the run's length)
            unet(x, 500, **kw)
        setup = time.perf_counter() - t0
        if legacy:
            with _LegacyAccumulation(), legacy_calibrator.attach(unet):
                unet(x, 500, **kw)

        def plain(i: int) -> None:
            unet(x, timesteps[i], **kw)

        def hooked(i: int) -> None:
            with calibrator.attach(unet):
                unet(x, timesteps[i], **kw)

        def legacy_hooked(i: int) -> None:
            with _LegacyAccumulation(), legacy_calibrator.attach(unet):
                unet(x, timesteps[i], **kw)

        timing = _interleaved(plain, hooked, legacy_hooked if legacy else None, calls)
    del legacy_calibrator
    t0 = time.perf_counter()
    calibration = calibrator.finalize(probe_model=unet)
    finalize = time.perf_counter() - t0
    peak = _peak_rss_mib()
    probe = calibration.meta["probe_seconds"]
    per_call_hooked = sum(timing["hooked_seconds"]) / calls
    per_call_plain = sum(timing["plain_seconds"]) / calls
    # What the probe would weigh in a 500-prompt x 25-step run (batches of 8 prompts, CFG: 63 x 25 calls of
    # batch 16); per-call costs scale with the batch alike, so the ratio of calls is the ratio of times.
    run_calls = -(-500 // 8) * 25
    probe_calls = (len(calibration.sites.blocks) + 1) * config.propagation_probe_calls
    return {"arch": arch, "resolution": resolution, "batch": 2, "unet_calls": calls, "accumulate_dtype": accumulate,
            "calibration_seconds": setup + sum(timing["hooked_seconds"]) + finalize, "setup_seconds": setup,
            "probe_seconds": probe, "probe_calls": config.propagation_probe_calls,
            "blocks": len(calibration.sites.blocks),
            "seconds_per_call_calibrating": per_call_hooked, "seconds_per_call_plain": per_call_plain, **timing,
            "probe_share_500x25": probe_calls * per_call_plain / (run_calls * per_call_hooked + probe_calls * per_call_plain),
            "statistics_mib": calibration.nbytes / 2**20, "rss_loaded_mib": loaded, "peak_rss_mib": peak,
            "peak_above_loaded_mib": peak - loaded, **(_slim_stages(unet, calibration) if slim else {})}


def run_worker(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one measurement in a fresh process and return its result row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["default", "sd15", "sdxl"], default="default")
    parser.add_argument("--prompts", nargs="+", type=int, default=[50, 100, 500], help="default model: prompt counts")
    parser.add_argument("--steps", type=int, default=25, help="default model: steps of the prompt-count series")
    parser.add_argument("--extra-steps", nargs="*", type=int, default=[10, 50],
                        help="default model: other step counts, measured at --steps-prompts prompts")
    parser.add_argument("--steps-prompts", type=int, default=100)
    parser.add_argument("--resolution", nargs="+", type=int, default=[256], help="sd15/sdxl: pixels")
    parser.add_argument("--calls", type=int, default=4, help="sd15/sdxl: CFG UNet calls to calibrate on")
    parser.add_argument("--accumulate-dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--legacy", action="store_true",
                        help="also time the accumulation before the cheaper-calibration change, interleaved")
    parser.add_argument("--no-slim", action="store_true", help="skip the slimming stages (timing of calibration only)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.worker:
        spec = json.loads(args.worker)
        kind = spec.pop("kind")
        row = worker_default(**spec) if kind == "default" else worker_unet(**spec)
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        return

    if args.model == "default":
        specs = [{"kind": "default", "prompts": n, "steps": args.steps, "legacy": args.legacy, "slim": not args.no_slim}
                 for n in args.prompts]
        specs += [{"kind": "default", "prompts": args.steps_prompts, "steps": s, "legacy": args.legacy,
                   "slim": not args.no_slim}
                  for s in args.extra_steps]
    else:
        specs = [{"kind": "unet", "arch": args.model, "resolution": r, "calls": args.calls,
                  "accumulate": args.accumulate_dtype, "legacy": args.legacy,
                  "slim": not args.no_slim} for r in args.resolution]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"cost_{args.model}.json")
    payload = {"benchmark": "cost", "model": args.model,
               "command": "python benchmarks/cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": machine_info() | {"torch_threads": args.threads}, "results": []}
    for spec in specs:
        row = run_worker(dict(spec), args.threads)
        payload["results"].append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
