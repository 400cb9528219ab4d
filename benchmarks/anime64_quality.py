"""Quality of slimming on the real, trained anime64 DDPM UNet (../shared/models/anime64).

Protocol (issue 2's target): calibrate on N_CAL images x S DDIM steps of the original model's own sampling
trajectories; evaluate on held-out trajectories (other seeds): at every step feed the original trajectory's
x_t to the original and the slimmed UNet and measure the relative noise-prediction error
||eps_slim - eps_orig|| / ||eps_orig||, averaged over steps. Budgets are keep ratios of the compressible
(attention q/k/v/out) parameters.

    python benchmarks/anime64_quality.py --methods sis uniform --keep 0.8 0.6 0.4 0.2

Writes benchmarks/results/anime64_quality.json (and prints a table).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import anime64_dir, machine_info  # noqa: E402

import slimdiff_diffusers as sd  # noqa: E402


def load_anime64():
    sys.path.insert(0, str(anime64_dir()))
    from anime64 import load_anime64 as _load  # type: ignore

    from diffusers import DDIMScheduler

    unet, scheduler = _load()
    ddim = DDIMScheduler.from_config(scheduler.config, clip_sample=True, set_alpha_to_one=True)
    return unet, ddim


@torch.no_grad()
def trajectories(unet, scheduler, seeds: list[int], steps: int) -> list[tuple[torch.Tensor, int]]:
    """The original model's DDIM trajectory: list of (x_t batch, t) for every step."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seeds[0])
    x = torch.randn(len(seeds), 3, 64, 64, generator=gen)
    out = []
    for t in scheduler.timesteps:
        out.append((x.clone(), int(t)))
        eps = unet(x, t).sample
        x = scheduler.step(eps, t, x).prev_sample
    return out


@torch.no_grad()
def relative_error(reference, candidate, trajectory) -> float:
    errs = []
    for x, t in trajectory:
        a, b = reference(x, t).sample, candidate(x, t).sample
        errs.append(((b - a).norm() / a.norm()).item())
    return sum(errs) / len(errs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["sis", "uniform"])
    parser.add_argument("--keep", nargs="+", type=float, default=[0.8, 0.6, 0.4, 0.2])
    parser.add_argument("--cal-images", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "anime64_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    unet, scheduler = load_anime64()
    started = time.perf_counter()
    cal_traj = trajectories(unet, scheduler, list(range(args.cal_images)), args.steps)
    eval_traj = trajectories(unet, scheduler, list(range(1000, 1000 + args.eval_images)), args.steps)

    def run():
        for x, t in cal_traj:
            unet(x, t)

    calibration = sd.calibrate(unet, run, sd.CalibrationConfig(num_train_timesteps=300))
    cal_seconds = time.perf_counter() - started
    results = []
    for method in args.methods:
        for keep in args.keep:
            t0 = time.perf_counter()
            config = method_config(method, keep)
            slim = sd.slim(unet, calibration, config)
            err = relative_error(unet, slim, eval_traj)
            rep = slim.slimdiff_report
            results.append({"method": method, "keep_ratio": keep, "rel_eps_error": err,
                            "compressible_kept": rep.compressible_params_after / rep.compressible_params_before,
                            "params_after": rep.params_after, "seconds": time.perf_counter() - t0})
            print(f"{method:>10} keep={keep:.1f} kept={results[-1]['compressible_kept']:.3f} rel_eps_err={err:.5f}",
                  flush=True)
    payload = {"benchmark": "anime64_quality", "command": " ".join(sys.argv), "machine": machine_info(),
               "calibration_seconds": cal_seconds, "settings": vars(args), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))


def method_config(method: str, keep: float) -> sd.SlimConfig:
    """SlimConfig of each named method (targets: attention only: anime64 has no feed-forward)."""
    base = dict(keep_ratio=keep, targets=("qk", "vo"))
    if method == "sis":
        return sd.SlimConfig(**base)
    if method == "uniform":
        return sd.SlimConfig(**base, allocation="uniform")
    if method == "sis_p1":
        return sd.SlimConfig(**base, propagation_power=1.0)
    if method == "sis_bi":
        return sd.SlimConfig(**base, propagation="block_influence")
    if method == "sis_nopi":
        return sd.SlimConfig(**base, propagation="none")
    if method == "sis_paware":
        return sd.SlimConfig(**base, vo_statistics="attention_output")
    raise ValueError(f"unknown method {method}")


if __name__ == "__main__":
    main()
