"""The benchmark scripts that write the README: claims follow the data, and the cost benchmark really measures."""
from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import cost, render_readme, report  # noqa: E402


def _payload(slim_scores: list[float], other_scores: list[float]) -> dict:
    def row(method, scores, eps):
        return {"kind": "main", "method": method, "keep_ratio": 0.6, "rel_eps_error": eps,
                "adherence": sum(scores) / len(scores), "adherence_per_image": scores}

    return {"model": "default", "results": [row("slimdiff", slim_scores, 0.01), row("whitened_svd", other_scores, 0.05)]}


def test_adherence_lead_within_noise_is_a_tie_not_a_win():
    slim = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    other = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]  # one image better: well within two standard errors
    lines = report.win_loss(_payload(slim, other))
    adherence = next(line for line in lines if line.startswith("- adherence"))
    assert "ties within noise" in adherence and "whitened SVD" in adherence
    assert any("rel_eps_error" in line and "wins against every baseline" in line for line in lines)


def test_adherence_clear_lead_is_reported_as_a_loss():
    slim = [0.0] * 20
    other = [1.0] * 19 + [0.0]
    lines = report.win_loss(_payload(slim, other))
    adherence = next(line for line in lines if line.startswith("- adherence"))
    assert "is beaten by" in adherence
    table = report.readme_table({"default": _payload(slim, other)})
    assert "except:" in table and "is beaten by" in table


def test_cost_benchmark_measures_the_embedded_model(tmp_path):
    out = tmp_path / "cost.json"
    cost.main(["--model", "default", "--prompts", "3", "--steps", "2", "--extra-steps", "--threads", "1",
               "--out", str(out)])
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert row["prompts"] == 3 and row["steps"] == 2 and row["unet_calls"] == 2  # one CFG batch per step
    assert row["calibration_seconds"] > row["probe_seconds"] > 0
    assert row["statistics_mib"] > 0 and row["peak_rss_mib"] >= row["rss_loaded_mib"]
    assert set(row["stage_seconds"]) == {"decomposition", "allocation", "rewrite"}
    assert row["params_removed"] > 0
    assert data["machine"]["torch"] and data["command"].startswith("python benchmarks/cost.py")


def test_readme_speed_and_cost_tables_render_from_results(tmp_path, monkeypatch):
    machine = {"date": "2026-11-22T00:00:00", "cpu_count": 2, "torch_threads": 2}
    speed = {"arch": "sd15", "dtype": "float32", "allocation": "sis", "command": "python benchmarks/speed.py",
             "machine": machine, "results": [
                 {"resolution": 256, "batch": 2, "keep_ratio": 0.6, "budget": "flops", "params_removed": 150e6,
                  "compressible_kept": 0.38, "flops_ratio": 0.8, "latency_ms_original": 1000.0,
                  "latency_ms_slim": 850.0, "latency_ratio": 0.85},
                 {"loop": True, "resolution": 256, "batch": 1, "steps": 25, "keep_ratio": 0.6, "budget": "flops",
                  "params_removed": 150e6, "loop_ms_original": 30000.0, "loop_ms_slim": 27000.0, "loop_ratio": 0.9}]}
    (tmp_path / "speed_sd15_cpu_flops.json").write_text(json.dumps(speed))
    monkeypatch.setattr(render_readme, "RESULTS", tmp_path)
    text = render_readme.speed_table()
    assert "1.18× | 1.25× |" in text  # measured speed-up next to the FLOP bound
    assert "| 30.0 | 27.0 | 0.900 | 1.11× |" in text
    assert "No cost results" in render_readme.cost_table()
