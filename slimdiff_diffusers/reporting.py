"""What a person looks at after slimming: a before/after image grid, a rank-allocation plot, report.md."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .core.report import SlimReport


def image_grid(rows: dict[str, list[Image.Image]], captions: list[str] | None = None, scale: int = 1,
               max_columns: int = 8) -> Image.Image:
    """A grid with one labelled row per entry of ``rows`` (e.g. original / slim), columns = prompts."""
    names = list(rows)
    n = min(len(rows[names[0]]), max_columns)
    w, h = rows[names[0]][0].size
    w, h = w * scale, h * scale
    label_w, caption_h = 72, 28 if captions else 0
    grid = Image.new("RGB", (label_w + n * (w + 4), len(names) * (h + 4) + caption_h), "white")
    draw = ImageDraw.Draw(grid)
    for r, name in enumerate(names):
        draw.text((4, r * (h + 4) + h // 2 - 5), name, fill="black")
        for c in range(n):
            img = rows[name][c].convert("RGB").resize((w, h), Image.NEAREST)
            grid.paste(img, (label_w + c * (w + 4), r * (h + 4)))
    if captions:
        for c in range(n):
            text = captions[c]
            draw.text((label_w + c * (w + 4), len(names) * (h + 4) + 2), text[: max(6, w // 6)], fill="black")
            if len(text) > w // 6:
                draw.text((label_w + c * (w + 4), len(names) * (h + 4) + 14), text[w // 6: 2 * (w // 6)], fill="black")
    return grid


def plot_rank_allocation(report: SlimReport, path: str | Path) -> Path:
    """Bar chart of the kept fraction of every group (QK / VO / FFN coloured), in model order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report.groups
    colors = {"qk": "#4C72B0", "vo": "#DD8452", "ffn": "#55A868"}
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(groups) + 2), 3.6))
    kept = [g.rank / g.full_rank for g in groups]
    ax.bar(range(len(groups)), kept, color=[colors[g.kind] for g in groups])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept rank / full rank")
    ax.set_xlabel("group (model order)")
    total = report.compressible_params_after / max(report.compressible_params_before, 1)
    ax.set_title(f"SlimDiff rank allocation: {total:.0%} of compressible parameters kept")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([_short(g.name) for g in groups], rotation=90, fontsize=6)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=k.upper()) for k, c in colors.items()], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2:qk' -> 'd1.a0.t0.attn2:qk'."""
    for long, short in (("down_blocks.", "d"), ("up_blocks.", "u"), ("mid_block.", "m."), ("attentions.", "a"),
                        ("transformer_blocks.", "t")):
        name = name.replace(long, short)
    return name


def write_report_markdown(path: str | Path, *, model: str, report: SlimReport, comparison: Any | None,
                          calibration: dict[str, Any], files: dict[str, str]) -> Path:
    """A readable summary: size, speed, quality, allocation table, and where the pictures are."""
    lines = [f"# SlimDiff report: {model}", ""]
    lines += ["## Size", "", report.to_markdown(max_rows=0).split("\n\n")[0], "",
              f"Allocation: {report.allocation_summary}.", ""]
    if report.vo_readers_summary:
        lines += [f"VO readers (`to_out`, `to_add_out`, `proj_out`): {report.vo_readers_summary}.", ""]
    if report.vo_bases_summary:
        lines += [f"VO bases (`to_v`, `add_v_proj`): {report.vo_bases_summary}.", ""]
    if report.ffn_channels_summary:
        lines += [f"Feed-forward channels: {report.ffn_channels_summary}.", ""]
    if comparison is not None:
        c = comparison
        lines += ["## Speed (denoiser, one CFG call, median)", "",
                  "| | original | slim | speed-up |", "|---|---:|---:|---:|",
                  f"| latency (ms) | {c.unet_latency_ms['original']:.2f} | {c.unet_latency_ms['slim']:.2f} | "
                  f"{c.speedup:.2f}x |",
                  f"| seconds / image (full pipeline) | {c.image_seconds['original']:.3f} | {c.image_seconds['slim']:.3f} | "
                  f"{c.image_seconds['original'] / c.image_seconds['slim']:.2f}x |", ""]
        lines += ["## Quality (slim vs original, same prompts and seeds)", "",
                  "| metric | value |", "|---|---:|",
                  f"| PSNR (dB) | {c.psnr_db:.2f} |", f"| SSIM | {c.ssim:.4f} |",
                  f"| relative noise-prediction error | {c.eps_relative_error:.4f} |"]
        if c.adherence:
            lines.append(f"| prompt adherence original / slim | {c.adherence['original']['mean']:.3f} / "
                         f"{c.adherence['slim']['mean']:.3f} |")
        lines += ["", f"{len(c.prompts)} held-out prompts, {c.settings['num_inference_steps']} steps, guidance "
                  f"{c.settings['guidance_scale']}.", ""]
    lines += ["## Calibration", "", "```", json.dumps(calibration, indent=1), "```", ""]
    lines += ["## Pictures", ""] + [f"- {k}: `{v}`" for k, v in files.items()] + [""]
    if "grid" in files:
        lines += [f"![before/after]({files['grid']})", ""]
    if "ranks" in files:
        lines += [f"![rank allocation]({files['ranks']})", ""]
    lines += ["## Rank allocation", "", report.to_markdown().split("\n\n", 1)[1], ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
