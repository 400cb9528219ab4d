"""Fill the generated regions of README.md from benchmark results (numbers are never typed by hand).

    python benchmarks/render_readme.py

Regions: <!-- BENCHMARK-SPEED:START --> ... <!-- BENCHMARK-SPEED:END --> from benchmarks/results/speed_*.json (UNets),
BENCHMARK-SPEED-TRANSFORMER from the transformer speed_*.json (speed.py --arch flux-dev / sd35-medium),
SUPPORTED-MODELS from benchmarks/results/supported_models.json (benchmarks/supported_models.py),
BENCHMARK-QUALITY from quality_*.json (the table of benchmarks/report.py, which also writes docs/benchmarks.md),
BENCHMARK-COST from benchmarks/results/cost_*.json, BENCHMARK-MEMORY from benchmarks/results/memory_*.json,
BENCHMARK-STACK from benchmarks/results/stack_*.json, BENCHMARK-WALL from calibration_wall_*.json, LORA-TRANSFER from benchmarks/results/lora_transfer_*.json,
IP-ADAPTER from benchmarks/results/ip_adapter_*.json,
and <!-- DEFAULT-RUN:START --> ... <!-- DEFAULT-RUN:END --> from benchmarks/results/default_run.json (the
report.json of `slimdiff slim`).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
from slimdiff_diffusers.core.io_utils import atomic_path  # noqa: E402


def replace_region(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:START -->\n).*?(<!-- {name}:END -->)", re.S)
    if not pattern.search(text):
        print(f"note: README has no {name} region", file=sys.stderr)
        return text
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def _machine(m: dict) -> str:
    threads = m["torch_threads"]
    return m.get("gpu") or f"CPU ({m['cpu_count']} cores, {threads} thread{'s' if threads != 1 else ''})"


def _budget(r: dict, data: dict) -> str:
    if "keep_ratio" in r:
        return f"keep {r['keep_ratio']:.1f} ({r.get('budget', data.get('budget', 'params'))})"
    return f"−{r['params_to_remove'] / 1e6:.0f}M params"


def _interrupted(data: dict) -> str:
    measured, _, total = data.get("budgets_measured", "").partition(" of ")
    return f" (stopped after {measured} of {total} budgets)" if total and measured != total else ""


def speed_table() -> str:
    """One UNet table (and one sampling-loop table when measured) per speed_*.json."""
    rows = []
    for path in sorted(RESULTS.glob("speed_*.json")):
        data = json.loads(path.read_text())
        if data.get("kind") == "transformer":  # transformer_speed_table()
            continue
        m = data["machine"]
        mode = data.get("compile_mode")
        compiled = (", torch.compile" + (f" ({mode})" if mode and mode != "default" else "")) if data.get("compiled") else ""
        rows.append(f"\n**{data['arch'].upper()} UNet, {data['dtype']}{compiled}, {_machine(m)}**, allocation "
                    f"`{data['allocation']}`, measured {m['date'][:10]} with `{data['command']}`"
                    f"{_interrupted(data)}\n")
        rows.append("| budget | resolution | batch | params removed | compressible kept | FLOPs ratio | latency original (ms) "
                    "| latency slim (ms) | latency ratio | speed-up | FLOP bound |")
        rows.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in (r for r in data["results"] if not r.get("loop")):
            rows.append(f"| {_budget(r, data)} | {r['resolution']} | {r['batch']} | {r['params_removed'] / 1e6:.1f}M | "
                        f"{r['compressible_kept']:.2f} | {r['flops_ratio']:.3f} | {r['latency_ms_original']:.0f} | "
                        f"{r['latency_ms_slim']:.0f} | {r['latency_ratio']:.3f} | {1 / r['latency_ratio']:.2f}× | "
                        f"{1 / r['flops_ratio']:.2f}× |")
        loops = [r for r in data["results"] if r.get("loop")]
        if loops:
            runs = loops[0].get("repeats", 1)
            rows.append(f"\nFull sampling loop (pipeline call: {loops[0]['steps']} DDIM steps with CFG and the VAE decode; "
                        f"text encoder left out; {'median of ' + str(runs) + ' interleaved runs' if runs > 1 else 'one run each'}):\n")
            rows.append("| budget | resolution | images | loop original (s) | loop slim (s) | loop ratio | speed-up |")
            rows.append("|---|---:|---:|---:|---:|---:|---:|")
            for r in loops:
                rows.append(f"| {_budget(r, data)} | {r['resolution']} | {r['batch']} | {r['loop_ms_original'] / 1000:.1f} | "
                            f"{r['loop_ms_slim'] / 1000:.1f} | {r['loop_ratio']:.3f} | {1 / r['loop_ratio']:.2f}× |")
    return "\n".join(rows) if rows else "_No speed results yet: run `python benchmarks/speed.py`._"


def transformer_speed_table() -> str:
    """One table per transformer speed file (speed.py --arch flux-dev / sd35-medium): speed-up against the FLOP bound."""
    rows = []
    for path in sorted(RESULTS.glob("speed_*.json")):
        data = json.loads(path.read_text())
        if data.get("kind") != "transformer":
            continue
        m = data["machine"]
        name = {"flux-dev": "FLUX.1-dev", "sd35-medium": "SD3.5-medium"}.get(data["arch"], data["arch"])
        rows.append(f"\n**{name} transformer configuration, {data['blocks_label']} at the real width (random weights, "
                    f"{data['params'] / 1e6:,.0f}M parameters), {data['dtype']}, {_machine(m)}**; one call: batch "
                    f"{data['batch']}, {data['image_tokens']} image + {data['text_tokens']} text tokens; median of "
                    f"{data['repeats']} interleaved calls each; measured {m['date'][:10]} with `{data['command']}`"
                    f"{_interrupted(data)}\n")
        rows.append("| budget | params removed | compressible kept | compressible MACs kept | FLOPs ratio | latency original (ms) "
                    "| latency slim (ms) | speed-up | FLOP bound | speed-up / bound |")
        rows.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in data["results"]:
            rows.append(f"| keep {r['keep_ratio']:.1f} ({r['budget']}) | {r['params_removed'] / 1e6:.1f}M | "
                        f"{r['compressible_kept']:.2f} | {r['compressible_macs_kept']:.2f} | {r['flops_ratio']:.3f} | "
                        f"{r['latency_ms_original']:.0f} | {r['latency_ms_slim']:.0f} | {r['speedup']:.2f}× | "
                        f"{r['flop_bound']:.2f}× | **{r['speedup_over_bound']:.0%}** |")
        for r in data["results"]:
            pairs = sorted(b / a for a, b in zip(r.get("latency_ms_original_all", []), r.get("latency_ms_slim_all", [])))
            if pairs:
                rows.append(f"\nKeep {r['keep_ratio']:.1f}: the {len(pairs)} interleaved pairs' slim/original ratios range "
                            f"{pairs[0]:.2f}–{pairs[-1]:.2f}, median {pairs[len(pairs) // 2]:.3f} (speed-up "
                            f"{1 / pairs[len(pairs) // 2]:.2f}×); FLOPs counted: "
                            f"{', '.join(sorted(r['flops_by_op_slim']))} (torch's counter has no formula for the CPU "
                            "flash-attention kernel, so the attention's own FLOPs, which slimming does not change here, "
                            "are outside the bound).")
        for r in data["results"]:
            o, sl = r["time_breakdown_ms_original"], r["time_breakdown_ms_slim"]
            parts = ", ".join(f"{k} {o[k]:.0f} → {sl[k]:.0f}" for k in o)
            rows.append(f"\nWhere the time goes at keep {r['keep_ratio']:.1f} (profiler, ms of one call, original → slim): {parts}.")
        if data.get("skipped_groups"):
            reasons = sorted({g["reason"].split(":")[0] for g in data["skipped_groups"]})
            rows.append(f"\nKept whole: {len(data['skipped_groups'])} groups ({'; '.join(reasons)}).")
    return "\n".join(rows) if rows else "_No transformer speed results yet: run `python benchmarks/speed.py --arch flux-dev`._"


def supported_models_table() -> str:
    """The "Supported models" table from supported_models.json (real configurations, structure only)."""
    path = RESULTS / "supported_models.json"
    if not path.is_file():
        return "_Run `python benchmarks/supported_models.py`._"
    data = json.loads(path.read_text())
    lines = [f"Groups found in each model's real configuration (built on the meta device, no weights) by "
             f"`{data['command']}`; compressible parameters counted as `slim` counts them.", "",
             "| model | diffusers class / pipelines | slim class (`save_pretrained`, single file) | ComfyUI "
             "| groups slimmed | QK | compressible / all parameters |",
             "|---|---|---|---|---|---|---:|"]
    for r in data["results"]:
        slim_class = f"`{r['slim_class']}`" if r.get("slim_class") and r["supported"] else "–"
        head = (f"| {r['model']} | `{r['class']}` / {', '.join(f'`{p.strip()}`' for p in r['pipelines'].split(','))} "
                f"| {slim_class} | {r['comfyui']} | ")
        if not r["supported"]:
            first = r["refusal"].split(": ", 1)[1].split(";")[0] if ": " in r["refusal"] else r["refusal"]
            what = "nothing to slim, refused before anything runs" if r.get("nothing_slimmable") else \
                "refused before anything runs"
            lines.append(head + f"{what}: {first} | – | – |")
            continue
        groups = ", ".join(f"{n} {k}" for k, n in r["groups"].items())
        if r.get("attention_kept_whole"):
            groups += (f"; {r['attention_kept_whole']} attention kept whole (model-specific "
                       f"{', '.join(f'`{p}`' for p in r['kept_whole_processors'])})")
        if not r["attentions"]:
            qk = "–"
        elif r["qk_whole"] == 0:
            qk = "slimmed"
        elif r["qk_slimmed"] == 0:
            qk = "whole (QK-norm" + (" + RoPE" if r["class"].startswith(("Flux", "Chroma")) else "") + ")"
        else:
            qk = f"whole in {r['qk_whole']} of {r['attentions']} (QK-norm)"
        lines.append(head + f"{groups} | {qk} | {r['compressible_params'] / 1e6:,.1f}M / {r['params'] / 1e6:,.1f}M "
                     f"({r['compressible_params'] / r['params']:.0%}) |")
    return "\n".join(lines)


def quality_table() -> str:
    """The quality region, as benchmarks/report.py writes it (one owner of that table's format)."""
    from benchmarks.report import load_results, readme_table

    results = load_results(RESULTS)
    return readme_table(results) if results else "_No quality results yet: run `python benchmarks/quality.py`._"


def _overhead(row: dict) -> str:
    """Hooked / plain time of the same calls, interleaved (cost.py); with ``--legacy`` also the accumulation and
    finite check before decisions rows 13 and 21, timed in the same rotation."""
    if "overhead_ratio" not in row:
        return "not measured"
    text = f"{row['overhead_ratio']:.2f}×"
    if "legacy_overhead_ratio" in row:
        text += f" (before rows 13 and 21: {row['legacy_overhead_ratio']:.2f}×)"
    return text


def cost_table() -> str:
    """Calibration and slimming cost tables from cost_*.json."""
    out = []
    default = RESULTS / "cost_default.json"
    if default.is_file():
        data = json.loads(default.read_text())
        m = data["machine"]
        out.append(f"\n**Embedded text-to-image model, {_machine(m)}**, measured {m['date'][:10]} with "
                   f"`{data['command']}`\n")
        out.append("| prompts | steps | UNet calls | calibration (s) | of which probe (s) | same sampling without hooks (s) "
                   "| hook overhead (hooked / plain sampling) | probe share | statistics (MiB) "
                   "| calibration peak memory above the loaded model (MiB) | decomposition (s) | allocation (s) "
                   "| rewrite (s) |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in data["results"]:
            st = r["stage_seconds"]
            out.append(f"| {r['prompts']} | {r['steps']} | {r['unet_calls']} | {r['calibration_seconds']:.1f} | "
                       f"{r['probe_seconds']:.1f} | {r['plain_sampling_seconds']:.1f} | {_overhead(r)} | "
                       f"{r['probe_seconds'] / r['calibration_seconds']:.1%} | {r['statistics_mib']:.1f} | "
                       f"{r['peak_above_loaded_mib']:.0f} | {st['decomposition']:.2f} | {st['allocation']:.3f} | "
                       f"{st['rewrite']:.2f} |")
    for path in sorted(RESULTS.glob("cost_sd*.json")):
        data = json.loads(path.read_text())
        m = data["machine"]
        out.append(f"\n**{data['model'].upper()} UNet configuration (random weights), {_machine(m)}**, measured "
                   f"{m['date'][:10]} with `{data['command']}`\n")
        out.append("| resolution | s / CFG call calibrating | s / CFG call plain | hook overhead | probe (s) "
                   "| probe share of a 500-prompt × 25-step run "
                   "| statistics (GiB) | calibration peak memory above the loaded model (GiB) | decomposition (s) | allocation (s) "
                   "| rewrite (s) |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in data["results"]:
            st = r["stage_seconds"]
            share = f"{r['probe_share_500x25']:.1%}" if "probe_share_500x25" in r else "not measured"
            out.append(f"| {r['resolution']} | {r['seconds_per_call_calibrating']:.2f} | {r['seconds_per_call_plain']:.2f} | "
                       f"{_overhead(r)} | {r['probe_seconds']:.0f} (({r['blocks']} + 1) × {r['probe_calls']} calls) | {share} | "
                       f"{r['statistics_mib'] / 1024:.2f} ({r['accumulate_dtype']}) | {r['peak_above_loaded_mib'] / 1024:.2f}"
                       f"{' (two sets of statistics: --legacy)' if 'legacy_overhead_ratio' in r else ''} | "
                       f"{st['decomposition']:.0f} | {st['allocation']:.2f} | {st['rewrite']:.1f} |")
    return "\n".join(out) if out else "_No cost results yet: run `python benchmarks/cost.py`._"


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


def wall_table() -> str:
    """pipe.slim() wall time and peak memory on an accelerator, from calibration_wall_*.json."""
    lines = []
    for path in sorted(RESULTS.glob("calibration_wall_*.json")):
        data = json.loads(path.read_text())
        if data.get("status") != "done":
            continue
        m, st = data["machine"], data["settings"]
        lines += [f"**`pipe.slim()` on the SD1.5 configuration (random weights), {st['dtype']}, {_machine(m)}**, "
                  f"measured {m['date'][:10]} with `{data['command']}`", "",
                  "| prompts × steps | resolution | pipe.slim() (s) | calibration (s) | of which probe (s) | slimming (s) "
                  "| statistics (MiB) | peak GPU memory (MiB) | peak RSS (MiB) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {st['prompts']} × {st['steps']} | {st['resolution']} | {data['pipe_slim_seconds']:.1f} | "
                  f"{data['calibration_seconds']:.1f} | {data['probe_seconds']:.1f} | {data['slimming_seconds']:.1f} | "
                  f"{data['statistics_mib']:,.0f} | {data['peak_gpu_mib']:,.0f} | {data['peak_rss_mib_final']:,.0f} |", ""]
    return "\n".join(lines) if lines else "_No accelerator wall-time results yet: run `python benchmarks/calibration_wall.py`._"


def memory_table() -> str:
    lines = []
    for path in sorted(RESULTS.glob("memory_*.json")):
        data = json.loads(path.read_text())
        m = data["machine"]
        lines += [f"**Peak memory of `pipe.slim()`, {m['date'][:10]}, {_machine(m)}**, measured with `{data['command']}`",
                  "", "| denoiser | dtype | budget | memory_limit | UNet (MiB) | statistics in memory (MiB) "
                  "| peak above the process without the UNet (MiB) | peak / (UNet + statistics) |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        for r in data["results"]:
            limit = f"{r['memory_limit_mib']:,.0f} MiB" if r.get("memory_limit_mib") else "none"
            lines.append(f"| {r['arch'].upper()} configuration | {r['dtype']} | keep {r['keep_ratio']:.1f} ({r['budget']}) | "
                         f"{limit} | {r['unet_mib']:,.0f} | {r['statistics_mib']:,.0f} | "
                         f"{r['peak_above_before_unet_mib']:,.0f} | {r['peak_over_model_plus_statistics']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def stack_table() -> str:
    """One table per stack_*.json (benchmarks/stack.py): every variant's speed, size and quality vs the original."""
    out = []
    for path in sorted(RESULTS.glob("stack_*.json")):
        data = json.loads(path.read_text())
        m, st = data["machine"], data["settings"]
        out.append(f"\n**{data['model']} model, {st['dtype']}, {_machine(m)}**, SlimDiff keep {st['keep']} of the FLOPs, "
                   f"int8 = torchao {st['int8'].replace('_', ' ')}, cache = {st['cache_method']}, compile = {st['compile_method']}; "
                   f"{st['steps']} steps; measured {m['date'][:10]} with `{data['command']}`"
                   + (f" (load average {min(data['load_average_1min']):.1f}–{max(data['load_average_1min']):.1f} on "
                      f"{m['cpu_count']} cores while timing)" if data.get("load_average_1min") else "") + "\n")
        gpu = any("peak_memory_bytes" in r for r in data["results"])
        adherence = any("adherence" in r for r in data["results"])
        # speed-ups are against the eager original
        head = ["variant", "call (ms)", "call speed-up", "loop (ms)", "loop speed-up", "on disk (MB)", "ε error",
                "PSNR (dB)", "SSIM"] + (["adherence (Δ vs original ± SE)"] if adherence else []) + (
                ["peak memory (MiB)"] if gpu else [])
        out.append("| " + " | ".join(head) + " |")
        out.append("|---|" + "---:|" * (len(head) - 1))

        def num(value, fmt):
            return "–" if value is None else format(value, fmt)

        for r in data["results"]:
            cells = [r["variant"], num(r.get("call_ms"), ".1f"), num(r.get("call_speedup"), ".2f"),
                     num(r.get("loop_ms"), ".0f"), num(r.get("loop_speedup"), ".2f"), f"{r['disk_bytes'] / 1e6:.1f}",
                     f"{r['rel_eps_error']:.4f}",
                     "∞" if r["psnr"] == float("inf") else f"{r['psnr']:.2f}", f"{r['ssim']:.4f}"]
            if adherence:
                d = r["adherence_vs_original"]
                cells.append(f"{r['adherence']:.3f} ({d['mean_difference']:+.3f} ± {d['standard_error']:.3f})")
            if gpu:
                cells.append(num(r.get("peak_memory_bytes") and r["peak_memory_bytes"] / 2**20, ".0f"))
            out.append("| " + " | ".join(cells) + " |")
        for name, check in data.get("acceptance", {}).items():
            line = (f"\n{name}: ε error of slim+int8 {check['eps_slim_int8']:.4f} vs slim + int8 "
                    f"{check['eps_slim']:.4f} + {check['eps_int8']:.4f} (ratio {check['eps_ratio_to_sum']:.2f})")
            if "speedup_ratio_to_product" in check:
                line += (f"; call speed-up of slim+int8 {check['call_speedup_slim_int8']:.2f} vs the product "
                         f"{check['call_speedup_slim']:.2f} × {check['call_speedup_int8']:.2f} "
                         f"(ratio {check['speedup_ratio_to_product']:.2f})")
            out.append(line + ".")
        if not any(r.get("loop_ms") for r in data["results"]):
            out.append("\nPartial run: quality measured, timing rounds not reached (rerun the command above).")
        for skipped in data.get("skipped", []):
            out.append(f"\nNot measured: {skipped['variant']} ({skipped['reason']}).")
        for note in data.get("notes", []):
            out.append(f"\nNote: {note}.")
    return "\n".join(out)
def lora_transfer_table() -> str:
    """One table per lora_transfer_*.json (benchmarks/lora_transfer.py), the trained LoRA first."""
    lines = []
    paths = sorted(RESULTS.glob("lora_transfer_*.json"), key=lambda p: (json.loads(p.read_text())["settings"]["lora"]
                                                                         != "trained", p.name))
    for path in paths:
        data = json.loads(path.read_text())
        m, st = data["machine"], data["settings"]
        trained = st["lora"] == "trained"
        if trained:
            info = st.get("lora_training") or {}
            kind = (f"the warm-filter LoRA trained by `scripts/train_lora.py` ({info.get('settings', {}).get('steps')} "
                    f"PEFT steps, `{st.get('lora_file')}`)")
        else:
            kind = "a random LoRA (seeded, ~10% of each layer's norm)"
        lines += [f"**LoRA on slim models, embedded default model, {kind}, rank {st['rank']}, {m['date'][:10]}, "
                  f"{_machine(m)}**, measured with `{data['command']}` ({st['eval_prompts']} held-out prompts, "
                  f"{st['calibration_prompts']} calibration prompts, timesteps {', '.join(map(str, st['timesteps']))}; "
                  f"images: {st['steps']}-step samples)", ""]
        head = ("| keep | params kept | ε error: slim vs original | ε error: slim + mapped LoRA vs original + LoRA "
                "| ratio (≤ 1.5) | ε error: exact route | LoRA effect error | PSNR slim vs original (dB) "
                "| PSNR slim + LoRA (dB) | PSNR exact route (dB) |")
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        if "warmth_mean" in data["results"][0]:
            head += " warmth: slim + LoRA / exact route | style kept: mapped / exact | effect present |"
            rule += "---:|---:|---|"
        else:
            head += " effect present |"
            rule += "---|"
        lines += [head, rule]
        for r in data["results"]:
            e, q = r["eps_rel_error"], r["psnr_db"]
            row = (f"| {r['keep_ratio']:.1f} | {r['params_kept_vs_original']:.0%} | "
                   f"{e['slim_only_vs_original']:.2e} | {e['slim_mapped_lora_vs_original_lora']:.2e} | "
                   f"{r['mapped_over_slim_only']:.2f}× | {e['exact_route_vs_original_lora']:.2e} | "
                   f"{r['lora_effect_rel_error']:.1%} | {q['slim_only_vs_original']:.1f} | "
                   f"{q['slim_mapped_lora_vs_original_lora']:.1f} | {q['exact_route_vs_original_lora']:.1f} |")
            if "warmth_mean" in r:
                w, k = r["warmth_mean"], r["style_kept"]
                row += (f" {w['slim_mapped_lora']:+.3f} / {w['exact_route']:+.3f} | "
                        f"{k['slim_mapped_lora']:.0%} / {k['exact_route']:.0%} |")
            lines.append(row + f" {r['effect_present']} |")
        first = data["results"][0]
        note = (f"The LoRA moves the original's noise prediction by {first['lora_effect_rel_norm']:.1%} (relative "
                f"norm); the original + LoRA images are at {first['psnr_db']['original_lora_vs_original']:.1f} dB PSNR "
                "from the original's. *Ratio*: the slim + mapped LoRA ε error over the slim-only ε error (issue 11's "
                "acceptance: at most 1.5). *LoRA effect error*: ‖(ε_slim+L − ε_slim) − (ε_orig+L − ε_orig)‖ / "
                "‖ε_orig+L − ε_orig‖. ")
        if "warmth_mean" in first:
            w = first["warmth_mean"]
            note += (f"*Warmth*: mean red minus mean blue of the samples, {w['original']:+.3f} for the original and "
                     f"{w['original_lora']:+.3f} with the LoRA. *Style kept*: the slim + LoRA warmth shift over the "
                     "original's. *Effect present*: the slim + LoRA image's warmth is closer to the original + LoRA "
                     "image's than to the original image's.")
        else:
            note += "*Effect present*: the slim + LoRA image is closer to the original + LoRA image than to the original without it."
        lines += ["", note, ""]
        if data.get("image"):
            lines += [f"![original, original + LoRA, slim + mapped LoRA per keep]({data['image']})", "",
                      "*Rows: the original, the original + LoRA, then the slim model + mapped LoRA at each keep "
                      f"({', '.join(str(r['keep_ratio']) for r in data['results'])}); the first held-out prompts.*", ""]
    return "\n".join(lines)


def _share(x: float) -> str:
    return f"{x:.1%}" if x >= 1e-3 else f"{x:.1e}"


def ip_adapter_table() -> str:
    """IP-Adapter on slim models: the adapter's effect, mapped mode vs compatible mode, per budget."""
    lines = []
    for path in sorted(RESULTS.glob("ip_adapter_*.json")):
        data = json.loads(path.read_text())
        if "mapped" not in data["results"][0]:
            continue  # an older layout (compatible mode only)
        m, st = data["machine"], data["settings"]
        lines += [f"**IP-Adapter on slim models, embedded default model, {m['date'][:10]}, {_machine(m)}**, measured "
                  f"with `{data['command']}` (adapter: {st['adapter']}; {st['eval_prompts']} held-out prompts, "
                  f"timesteps {', '.join(map(str, st['timesteps']))}; calibration {st['calibration_prompts']} "
                  f"prompts × {st['steps']} steps)",
                  "", "| keep | mode | params kept | slimmed cross-attentions | ε error: slim vs original "
                  "| adapter effect error |", "|---|---|---:|---:|---:|---:|"]
        for r in data["results"]:
            for mode, label in (("mapped", "mapped (cross-attention slimmed)"),
                                ("compatible", "compatible (`adapter_compatible=True`)")):
                x = r[mode]
                lines.append(f"| {r['keep_ratio']:.1f} | {label} | {x['params_kept_vs_original']:.0%} | "
                             f"{x['cross_attention_slimmed']} | {x['slim_eps_rel_error']:.2e} | "
                             f"{_share(x['adapter_effect_rel_difference'])} |")
        first = data["results"][0]
        lines += ["", f"The adapter moves the original's noise prediction by {first['adapter_effect_rel_norm']:.1%} "
                  "(relative norm). *Adapter effect error*: ‖(ε_slim+IP − ε_slim) − (ε_orig+IP − ε_orig)‖ / "
                  "‖ε_orig+IP − ε_orig‖.", ""]
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = replace_region(text, "BENCHMARK-QUALITY", quality_table())
    text = replace_region(text, "BENCHMARK-SPEED", speed_table())
    text = replace_region(text, "BENCHMARK-SPEED-TRANSFORMER", transformer_speed_table())
    text = replace_region(text, "SUPPORTED-MODELS", supported_models_table())
    text = replace_region(text, "BENCHMARK-COST", cost_table())
    text = replace_region(text, "DEFAULT-RUN", default_run_table())
    text = replace_region(text, "BENCHMARK-MEMORY", memory_table())
    text = replace_region(text, "BENCHMARK-WALL", wall_table())
    text = replace_region(text, "BENCHMARK-STACK", stack_table())
    text = replace_region(text, "LORA-TRANSFER", lora_transfer_table())
    text = replace_region(text, "IP-ADAPTER", ip_adapter_table())
    with atomic_path(readme) as tmp:
        tmp.write_text(text)
    print("README regions updated")


if __name__ == "__main__":
    main()
