"""Regenerate the quality report from the JSON results: no number is typed by hand.

Reads ``benchmarks/results/quality_*.json`` (written by benchmarks/quality.py) and writes:

* ``docs/benchmarks.md``: settings, main tables (every metric, every budget), win/loss summary, ablations,
  allocation diagnostics;
* ``docs/images/quality_vs_params.png``: quality vs kept compressible parameters (matplotlib);
* the region between ``<!-- BENCHMARK-QUALITY:START -->`` and ``<!-- BENCHMARK-QUALITY:END -->`` of README.md
  (a compact table). Nothing else in README.md is touched; without the markers README.md is left alone.

    PYTHONPATH=. python benchmarks/report.py
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from slimdiff_diffusers.core.io_utils import atomic_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- BENCHMARK-QUALITY:START -->", "<!-- BENCHMARK-QUALITY:END -->"
MODEL_ORDER = ("default", "flux_tiny", "anime64")
METHOD_ORDER = ("slimdiff", "uniform_madac", "modegpt_madac", "whitened_svd", "obs_pruning", "magnitude_pruning",
                "truncated_svd")
METHOD_LABELS = {
    "slimdiff": "SlimDiff (full)",
    "uniform_madac": "(d) uniform MADAC",
    "modegpt_madac": "(e) MoDeGPT alloc. + MADAC",
    "whitened_svd": "(b) whitened SVD per matrix",
    "magnitude_pruning": "(c) activation-magnitude pruning",
    "truncated_svd": "(a) truncated SVD per matrix",
    "obs_pruning": "(f) OBS structured pruning (OBS-Diff style)",
}
MODEL_LABELS = {"anime64": "anime64 (trained 64x64 DDPM UNet; attention only)",
                "default": "default model (embedded trained text-to-image pipeline; attention + FFN)",
                "flux_tiny": "flux-tiny (embedded trained Flux-architecture pipeline; joint + single-stream blocks, "
                             "QK whole under QK-norm and RoPE)"}
# metric -> (label, higher is better, format)
METRICS = {
    "rel_eps_error": ("relative ε-prediction error (lower is better)", False, "{:.2e}"),
    "psnr": ("PSNR of final samples vs the original model, dB (higher is better)", True, "{:.2f}"),
    "ssim": ("SSIM of final samples vs the original model (higher is better)", True, "{:.4f}"),
    "adherence": ("prompt adherence of final samples (higher is better)", True, "{:.3f}"),
}


def load_results(folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """model name -> payload of its ``quality_<model>.json``."""
    out = {}
    for path in sorted(folder.glob("quality_*.json")):
        payload = json.loads(path.read_text())
        payload["_file"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        out[payload["model"]] = payload
    return dict(sorted(out.items(), key=lambda kv: MODEL_ORDER.index(kv[0]) if kv[0] in MODEL_ORDER else 99))


def _fmt(value: float | None, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return fmt.format(value)


def _rows(payload: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in payload["results"] if r.get("kind") == kind and "error" not in r]


def _table(rows: list[dict[str, Any]], methods: list[str], keeps: list[float], metric: str,
           labels: dict[str, str], bold_best: bool = True) -> list[str]:
    label, higher, fmt = METRICS[metric]
    by = {(r["method"], r["keep_ratio"]): r for r in rows}
    lines = ["| method | " + " | ".join(f"keep {k:g}" for k in keeps) + " |",
             "|---|" + "---:|" * len(keeps)]
    best: dict[float, float] = {}
    for k in keeps:
        values = [by[(m, k)][metric] for m in methods if (m, k) in by and metric in by[(m, k)]]
        if values:
            best[k] = max(values) if higher else min(values)
    for m in methods:
        cells = []
        for k in keeps:
            r = by.get((m, k))
            v = r.get(metric) if r else None
            text = _fmt(v, fmt)
            if bold_best and v is not None and k in best and v == best[k]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def _kept_table(rows: list[dict[str, Any]], methods: list[str], keeps: list[float]) -> list[str]:
    by = {(r["method"], r["keep_ratio"]): r for r in rows}
    lines = ["| method | " + " | ".join(f"keep {k:g}" for k in keeps) + " |", "|---|" + "---:|" * len(keeps)]
    for m in methods:
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(
            f"{by[(m, k)]['compressible_kept']:.3f}" if (m, k) in by else "–" for k in keeps) + " |")
    return lines


def _paired_difference(ours: dict[str, Any], theirs: dict[str, Any], metric: str) -> tuple[float, float] | None:
    """Mean and standard error of (theirs − ours) over the same images, when both rows kept per-image scores."""
    a, b = ours.get(f"{metric}_per_image"), theirs.get(f"{metric}_per_image")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    diffs = [y - x for x, y in zip(a, b)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def win_loss(payload: dict[str, Any]) -> list[str]:
    """For every budget and metric: does SlimDiff beat every baseline? Names the ones it does not beat.

    Metrics with per-image scores (adherence) are compared image by image: a baseline beats SlimDiff only when
    the mean paired difference exceeds two standard errors; a smaller lead is reported as a tie within noise.
    """
    rows = _rows(payload, "main")
    by = {(r["method"], r["keep_ratio"]): r for r in rows}
    keeps = sorted({r["keep_ratio"] for r in rows}, reverse=True)
    lines = []
    for metric, (label, higher, fmt) in METRICS.items():
        for k in keeps:
            ours = by.get(("slimdiff", k), {}).get(metric)
            if ours is None:
                continue
            losers, ties = [], []
            for m in METHOD_ORDER[1:]:
                theirs = by.get((m, k), {}).get(metric)
                if theirs is None or not ((theirs > ours) if higher else (theirs < ours)):
                    continue
                paired = _paired_difference(by[("slimdiff", k)], by[(m, k)], metric)
                text = f"{METHOD_LABELS[m]} ({_fmt(theirs, fmt)} vs {_fmt(ours, fmt)}"
                if paired is None:
                    losers.append(text + ")")
                elif abs(paired[0]) > 2 * paired[1]:
                    losers.append(text + f"; paired difference {paired[0]:+.3f} ± {paired[1]:.3f})")
                else:
                    ties.append(text + f"; paired difference {paired[0]:+.3f} ± {paired[1]:.3f})")
            if losers:
                status = "is beaten by " + "; ".join(losers)
            elif ties:
                status = "ties within noise (less than two standard errors) with " + "; ".join(ties)
            else:
                status = "wins against every baseline"
            lines.append(f"- {metric}, keep {k:g}: SlimDiff {status}")
    return lines


def versus_original(payload: dict[str, Any]) -> str | None:
    """SlimDiff's adherence against the original model's on the same images (paired), per budget."""
    reference = payload.get("reference", {})
    if not reference.get("adherence_per_image"):
        return None
    parts = []
    for r in sorted((r for r in _rows(payload, "main") if r["method"] == "slimdiff"), key=lambda r: -r["keep_ratio"]):
        paired = _paired_difference(reference, r, "adherence")
        if paired is not None:
            verdict = "within" if abs(paired[0]) <= 2 * paired[1] else "outside"
            parts.append(f"keep {r['keep_ratio']:g}: {r['adherence']:.3f} ({paired[0]:+.3f} ± {paired[1]:.3f}, {verdict} two SE)")
    if not parts:
        return None
    return (f"SlimDiff's prompt adherence against the original model's ({reference['adherence']:.3f}) on the same "
            "images, paired difference ± standard error: " + "; ".join(parts) + ".")


def model_section(payload: dict[str, Any]) -> list[str]:
    model = payload["model"]
    s = payload["settings"]
    m = payload["machine"]
    rows = _rows(payload, "main")
    keeps = sorted({r["keep_ratio"] for r in rows}, reverse=True)
    methods = [x for x in METHOD_ORDER if any(r["method"] == x for r in rows)]
    diag = payload["diagnostics"]
    lines = [f"## {MODEL_LABELS.get(model, model)}", "",
             f"- command: `{payload['command']}` (results: `{payload['_file']}`)",
             f"- date {m['date']}; {m['platform']}; {m['cpu_count']} CPUs, torch threads {m['torch_threads']}; "
             f"torch {m['torch']}, diffusers {m.get('diffusers', '?')}; slimdiff {payload.get('slimdiff_version', '?')}",
             f"- calibration: {s['cal_samples']} {'images' if model == 'anime64' else 'prompts'} x {s['steps']} "
             f"steps ({payload['calibration_seconds']:.0f}s incl. propagation probing); evaluation: "
             f"{s['eval_samples']} held-out {'images' if model == 'anime64' else 'prompts'}"
             + (f" × {s['eval_images'] // s['eval_samples']} seeds" if s.get("eval_images") else "")
             + f", sampler {s['sampler']}"
             + (f", guidance {s['guidance_scale']}" if "guidance_scale" in s else ""),
             f"- compressible parameters (targets {', '.join(s['targets'])}): {diag['total_compressible_params']:,} "
             f"of {diag['model_params']:,} in the model; total run time "
             f"{(payload.get('total_seconds', 0) + payload.get('total_seconds_previous_runs', 0)) / 60:.1f} min"
             + (" (all parts)" if payload.get("total_seconds_previous_runs") else ""),
             ""]
    if payload.get("reference"):
        scalars = {k: v for k, v in payload["reference"].items() if isinstance(v, (int, float))}
        lines += ["Original (uncompressed) model: " + ", ".join(f"{k} {v:.3f}" for k, v in scalars.items()), ""]
    for metric in METRICS:
        if not any(metric in r for r in rows):
            continue
        lines += [f"### {METRICS[metric][0]}", "", *_table(rows, methods, keeps, metric, METHOD_LABELS), ""]
        if metric == "adherence" and s.get("eval_images"):
            lines += [f"Mean over {s['eval_images']} images ({s['eval_prompts']} held-out prompts × "
                      f"{s['eval_images'] // s['eval_prompts']} seeds); the summary below compares methods image by "
                      "image.", ""]
    lines += ["### Compressible parameters actually kept (fraction)", "",
              "Every method is measured with the same counter (`benchmarks.baselines.compressible_params`) on the "
              "model it produced; no method keeps more than its budget.", "",
              *_kept_table(rows, methods, keeps), "", "### Does SlimDiff beat every baseline?", "", *win_loss(payload), ""]
    if versus_original(payload):
        lines += [versus_original(payload), ""]

    ablations = _rows(payload, "ablation")
    if ablations:
        names = ["slimdiff"] + list(dict.fromkeys(r["method"] for r in ablations))
        ab_keeps = sorted({r["keep_ratio"] for r in ablations}, reverse=True)
        all_rows = ablations + [r for r in rows if r["method"] == "slimdiff"]
        labels = {"slimdiff": "**full method**"} | {n: f"`{n}`" for n in names[1:]}
        lines += ["### Ablations of the full method", "",
                  "Each row changes one setting of the full method (same calibration unless the row says "
                  "`cal_samples_N`, which re-calibrates with N samples).", ""]
        for metric in METRICS:
            if any(metric in r for r in ablations):
                lines += [f"{METRICS[metric][0]}:", "", *_table(all_rows, names, ab_keeps, metric, labels), ""]
        descriptions = payload.get("ablation_descriptions", {})
        lines += [f"- `{n}`: {descriptions[n]}" for n in names[1:] if n in descriptions]
        lines += [f"- `{n}`: full method calibrated on {n.rsplit('_', 1)[1]} samples instead of {s['cal_samples']}"
                  for n in names if n.startswith("cal_samples_")]
        lines += [""]

    blocks = diag.get("blocks", {})
    if blocks:
        lines += ["### Propagation diagnostics per block", "",
                  "| block | probe π | block influence 1−cos |", "|---|---:|---:|"]
        for b, v in blocks.items():
            probe = v.get("propagation_probe")
            lines.append(f"| `{b}` | {_fmt(probe, '{:.3f}')} | {v['block_influence']:.4f} |")
        lines += [""]
    alloc_rows = sorted((r for r in rows if r["method"] == "slimdiff" and r.get("allocation")),
                        key=lambda r: -r["keep_ratio"])  # budgets in order, whatever order the parts ran in
    if alloc_rows:
        groups = list(alloc_rows[0]["allocation"])
        lines += ["### SlimDiff's allocation (kept rank / full rank per group)", "",
                  "| group | influence α | " + " | ".join(f"keep {r['keep_ratio']:g}" for r in alloc_rows) + " |",
                  "|---|---:|" + "---:|" * len(alloc_rows)]
        for g in groups:
            first = alloc_rows[0]["allocation"][g]
            cells = [f"{r['allocation'][g]['rank']}/{r['allocation'][g]['full']}" for r in alloc_rows]
            lines.append(f"| `{g}` | {first['influence']:.2e} | " + " | ".join(cells) + " |")
        lines += [""]
    failed = [r for r in payload["results"] if "error" in r]
    if failed:
        lines += ["Rows that could not be built:", ""] + [f"- {r['method']} keep {r['keep_ratio']}: {r['error']}" for r in failed]
        lines += [""]
    return lines


def write_markdown(results: dict[str, dict[str, Any]], path: Path, plot: Path | None) -> None:
    lines = ["# Quality benchmarks", "",
             "Generated by `benchmarks/report.py` from `benchmarks/results/quality_*.json` "
             "(written by `benchmarks/quality.py`); do not edit by hand.", "",
             "All methods slim the same groups to the same budget: a fraction (*keep ratio*) of the compressible "
             "parameters of the targeted groups (q/k/v/out projections, and the FFN up/down projections for the "
             "default model). The baselines are those of method.md §9, implemented in `benchmarks/baselines.py`:", "",
             "- **(a) truncated SVD per matrix**: data-free SVD of every matrix into two Linear layers, one uniform "
             "kept fraction of every matrix's parameters;",
             "- **(b) whitened SVD per matrix** (SVD-LLM style): truncation in the metric of each matrix's input second "
             "moment (the input augmented with a constant 1 when the layer has a bias, so bias and mean are refit);",
             "- **(c) activation-magnitude pruning**: heads and FFN channels scored by mean |activation|, normalised per "
             "layer, pruned below a global threshold, no refit (anime64's attentions have one head each, so a pruned "
             "head removes the whole attention branch, leaving its output bias);",
             "- **(d) uniform MADAC**: SlimDiff's decompositions, the same kept fraction in every group;",
             "- **(e) MoDeGPT allocation + MADAC**: per-block keep ratio from the block influence by MoDeGPT's "
             "softmax(−s/ε) rule (ε = 0.015, sparsity cap 0.8), same ratio for every group of a block;",
             "- **(f) OBS structured pruning** (OBS-Diff's structured setting): whole heads and FFN channels removed, "
             "the reader layer updated by Optimal Brain Surgeon from the inverse Hessian of its input, sequentially; "
             "uniform head and channel fractions per layer (method.md §9.1).", "",
             "On flux-tiny every method slims the groups the core finds in a Flux model: joint attention over both "
             "streams, single-stream blocks (`proj_out` columns), `ff` and `ff_context`; QK stays whole (QK-norm, "
             "RoPE) and is outside the budget.", "",
             "Metrics: relative noise-prediction error of the slimmed model along the original model's sampling "
             "trajectories (every step); PSNR / SSIM of the slimmed model's final samples against the original model's "
             "samples from the same noise; prompt adherence (default model).", ""]
    if plot is not None:
        lines += [f"![quality vs kept parameters]({plot.relative_to(path.parent).as_posix()})", ""]
    for payload in results.values():
        lines += model_section(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines).rstrip() + "\n")


def write_plot(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("rel_eps_error", "psnr") if any(m in r for p in results.values() for r in _rows(p, "main"))]
    if not results or not metrics:
        return None
    fig, axes = plt.subplots(len(metrics), len(results), figsize=(5.2 * len(results), 3.8 * len(metrics)), squeeze=False)
    for col, (model, payload) in enumerate(results.items()):
        rows = _rows(payload, "main")
        for row_index, metric in enumerate(metrics):
            ax = axes[row_index][col]
            for method in METHOD_ORDER:
                points = sorted((r["compressible_kept"], r[metric]) for r in rows
                                if r["method"] == method and metric in r and not math.isinf(r[metric]))
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o", linewidth=2.2 if method == "slimdiff" else 1.2,
                            label=METHOD_LABELS[method])
            if metric == "rel_eps_error":
                ax.set_yscale("log")
            ax.set_xlabel("compressible parameters kept (fraction)")
            ax.set_ylabel(METRICS[metric][0].split(" (")[0])
            ax.set_title(model)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def readme_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["Relative noise-prediction error of the slimmed model (lower is better) at equal compressible-parameter "
             "budgets; full tables, image metrics and settings in [docs/benchmarks.md](docs/benchmarks.md).", ""]
    for model, payload in results.items():
        rows = _rows(payload, "main")
        keeps = sorted({r["keep_ratio"] for r in rows}, reverse=True)
        methods = [x for x in METHOD_ORDER if any(r["method"] == x for r in rows)]
        lines += [f"**{model}**", "", *_table(rows, methods, keeps, "rel_eps_error", METHOD_LABELS), ""]
        not_won = [line for line in win_loss(payload) if "wins against every baseline" not in line]
        metrics = ", ".join(m for m in METRICS if any(m in r for r in rows))
        if not_won:
            lines += [f"On {model}, SlimDiff beats every baseline at every budget on {metrics}, except:", "", *not_won, ""]
        else:
            lines += [f"On {model}, SlimDiff beats every baseline at every budget on {metrics}.", ""]
        if versus_original(payload):
            lines += [versus_original(payload), ""]
    return "\n".join(lines).rstrip()


def update_readme(results: dict[str, dict[str, Any]], readme: Path) -> bool:
    if not readme.is_file():
        print(f"note: {readme} does not exist; README not updated")
        return False
    text = readme.read_text()
    if START not in text or END not in text or text.index(START) > text.index(END):
        print(f"note: {readme} has no {START} ... {END} markers; README not updated")
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with atomic_path(readme) as tmp:
        tmp.write_text(f"{head}{START}\n{readme_table(results)}\n{END}{tail}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "images" / "quality_vs_params.png")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    results = load_results(args.results)
    if not results:
        raise SystemExit(f"no quality_*.json results in {args.results}")
    plot = write_plot(results, args.plot)
    write_markdown(results, args.markdown, plot)
    updated = update_readme(results, args.readme)
    print(f"wrote {args.markdown}" + (f", {plot}" if plot else "") + (f", {args.readme}" if updated else ""))


if __name__ == "__main__":
    main()
