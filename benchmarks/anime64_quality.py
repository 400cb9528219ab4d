"""Quality of slimming on the real, trained anime64 DDPM UNet: a thin wrapper over benchmarks/quality.py.

Kept for its original command line (issue 2). The protocol, metrics and baselines are those of
``benchmarks/quality.py --model anime64``; the old method names map to them:

=============  ========================================================
``sis``         ``slimdiff`` (the full method)
``uniform``     ``uniform_madac`` (baseline d)
``sis_p1``      ablation ``prop_power_1``
``sis_bi``      ablation ``prop_block_influence``
``sis_nopi``    ablation ``prop_none``
``sis_paware``  ablation ``vo_attention_output``
=============  ========================================================

    PYTHONPATH=. python benchmarks/anime64_quality.py --methods sis uniform --keep 0.8 0.6 0.4 0.2

Writes benchmarks/results/anime64_quality.json (and prints a table).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import quality  # noqa: E402

OLD_MAIN_METHODS = {"sis": "slimdiff", "uniform": "uniform_madac"}
OLD_ABLATIONS = {"sis_p1": "prop_power_1", "sis_bi": "prop_block_influence", "sis_nopi": "prop_none",
                 "sis_paware": "vo_attention_output"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["sis", "uniform"],
                        choices=[*OLD_MAIN_METHODS, *OLD_ABLATIONS])
    parser.add_argument("--keep", nargs="+", type=float, default=[0.8, 0.6, 0.4, 0.2])
    parser.add_argument("--cal-images", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "anime64_quality.json"))
    args = parser.parse_args()
    main_methods = [OLD_MAIN_METHODS[m] for m in args.methods if m in OLD_MAIN_METHODS]
    ablations = [OLD_ABLATIONS[m] for m in args.methods if m in OLD_ABLATIONS]
    argv = ["--model", "anime64", "--keep", *map(str, args.keep), "--cal-samples", str(args.cal_images),
            "--eval-samples", str(args.eval_images), "--steps", str(args.steps), "--threads", str(args.threads),
            "--out", args.out, "--methods", *(main_methods or ["slimdiff"])]
    if ablations:
        argv += ["--ablations", *ablations, "--ablation-samples"]
    quality.main(argv)


if __name__ == "__main__":
    main()
