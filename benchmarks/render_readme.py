"""Fill the generated regions of README.md from benchmark results (numbers are never typed by hand).

    python benchmarks/render_readme.py

Regions: <!-- BENCHMARK-SPEED:START --> ... <!-- BENCHMARK-SPEED:END --> from benchmarks/results/speed_*.json,
and <!-- DEFAULT-RUN:START --> ... <!-- DEFAULT-RUN:END --> from benchmarks/results/default_run.json (the
report.json of `slimdiff slim`). The quality region is written by benchmarks/report.py.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def replace_region(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:START -->\n).*?(<!-- {name}:END -->)", re.S)
    if not pattern.search(text):
        print(f"note: README has no {name} region", file=sys.stderr)
        return text
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def speed_table() -> str:
    rows = []
    for path in sorted(RESULTS.glob("speed_*.json")):
        data = json.loads(path.read_text())
        m = data["machine"]
        threads = m["torch_threads"]
        where = m.get("gpu") or f"CPU ({m['cpu_count']} cores, {threads} thread{'s' if threads != 1 else ''})"
        rows.append(f"\n**{data['arch'].upper()} UNet, {data['dtype']}, {where}**, allocation `{data['allocation']}`, "
                    f"measured {m['date'][:10]} with `{data['command']}`\n")
        rows.append("| budget | resolution | batch | params removed | compressible kept | FLOPs ratio | latency original (ms) | latency slim (ms) | latency ratio |")
        rows.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in data["results"]:
            budget = (f"keep {r['keep_ratio']:.1f} ({r.get('budget', data.get('budget', 'params'))})" if "keep_ratio" in r
                      else f"−{r['params_to_remove'] / 1e6:.0f}M params")
            rows.append(f"| {budget} | {r['resolution']} | {r['batch']} | {r['params_removed'] / 1e6:.1f}M | "
                        f"{r['compressible_kept']:.2f} | {r['flops_ratio']:.3f} | {r['latency_ms_original']:.0f} | "
                        f"{r['latency_ms_slim']:.0f} | {r['latency_ratio']:.3f} |")
    return "\n".join(rows) if rows else "_No speed results yet: run `python benchmarks/speed.py`._"


def default_run_table() -> str:
    path = RESULTS / "default_run.json"
    if not path.is_file():
        return "_No default run recorded yet: run `python benchmarks/default_run.py`._"
    r = json.loads(path.read_text())
    s, sp, q, c = r["size"], r["speed"], r["quality"], r["calibration"]
    adherence = q.get("adherence") or {}
    lines = [f"Measured with `{r['command']}` ({r.get('machine', 'this machine')}; {r['seconds_total']:.0f} s in total).", "",
             "| | original | slim |", "|---|---:|---:|",
             f"| UNet parameters | {s['params_before']:,} | {s['params_after']:,} |",
             f"| compressible parameters | {s['compressible_before']:,} | {s['compressible_after']:,} |",
             f"| UNet latency, one CFG call (ms) | {sp['unet_latency_ms']['original']:.2f} | {sp['unet_latency_ms']['slim']:.2f} |"]
    if adherence:
        lines.append(f"| prompt adherence (held-out prompts) | {adherence['original']['mean']:.3f} | {adherence['slim']['mean']:.3f} |")
    lines += ["", f"Slim vs original on the same prompts and seeds: PSNR {q['psnr_db']:.2f} dB, SSIM {q['ssim']:.4f}, "
              f"relative noise-prediction error {q['eps_relative_error']:.4f}. Calibration: {c['prompts']} prompts × "
              f"{c['steps']} steps in {c['seconds']:.0f} s."]
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = replace_region(text, "BENCHMARK-SPEED", speed_table())
    text = replace_region(text, "DEFAULT-RUN", default_run_table())
    readme.write_text(text)
    print("README regions updated")


if __name__ == "__main__":
    main()
