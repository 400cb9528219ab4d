"""Run the README's main job (`slimdiff slim` on the embedded model) and record its report for the README.

    python benchmarks/default_run.py [extra slimdiff slim arguments]

Writes benchmarks/results/default_run.json (report.json plus machine info) and copies the before/after grid
and the rank-allocation plot to docs/images/, then refreshes the README region with render_readme.py.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine_info, write_json  # noqa: E402
from benchmarks.render_readme import main as render_readme  # noqa: E402

from slimdiff_diffusers.cli import main as slimdiff  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "slim-out"
        args = ["slim", "--out", str(out), *sys.argv[1:]]
        started = time.perf_counter()
        code = slimdiff(args)
        if code != 0:
            raise SystemExit(code)
        report = json.loads((out / "report.json").read_text())
        report["command"] = " ".join(["slimdiff slim", *sys.argv[1:], "--out slim-out"])
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        m = machine_info()
        report["machine"] = f"CPU, {m['cpu_count']} cores, torch {m['torch']}, {m['date'][:10]}"
        write_json(ROOT / "benchmarks" / "results" / "default_run.json", report)
        images = ROOT / "docs" / "images"
        images.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "before_after.png", images / "default_before_after.png")
        shutil.copy(out / "rank_allocation.png", images / "default_rank_allocation.png")
    render_readme()


if __name__ == "__main__":
    main()
