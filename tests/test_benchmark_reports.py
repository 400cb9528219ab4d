"""The benchmark scripts that write the README: claims follow the data, and the cost benchmark really measures."""
from __future__ import annotations

import json
import sys

import pytest
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


def test_transformer_speed_table_renders_speedup_against_the_flop_bound(tmp_path, monkeypatch):
    machine = {"date": "2026-12-01T00:00:00", "cpu_count": 2, "torch_threads": 1}
    breakdown = {"matmul (linear/addmm/mm/bmm)": 900.0, "attention (SDPA)": 50.0, "padding / concat / copies": 20.0,
                 "other": 30.0}
    data = {"kind": "transformer", "arch": "flux-dev", "blocks_label": "1 double-stream + 2 single-stream blocks",
            "params": 680e6, "dtype": "float32", "batch": 1, "image_tokens": 256, "text_tokens": 128, "repeats": 9,
            "command": "python benchmarks/speed.py --arch flux-dev", "machine": machine, "skipped_groups": [],
            "results": [{"keep_ratio": 0.5, "budget": "flops", "params_removed": 200e6, "compressible_kept": 0.5,
                         "compressible_macs_kept": 0.5, "flops_ratio": 0.55, "latency_ms_original": 1000.0,
                         "latency_ms_slim": 600.0, "speedup": 1000 / 600, "flop_bound": 1 / 0.55,
                         "speedup_over_bound": (1000 / 600) * 0.55, "time_breakdown_ms_original": breakdown,
                         "time_breakdown_ms_slim": breakdown}]}
    (tmp_path / "speed_flux_dev_cpu_flops.json").write_text(json.dumps(data))
    monkeypatch.setattr(render_readme, "RESULTS", tmp_path)
    text = render_readme.transformer_speed_table()
    assert "FLUX.1-dev" in text and "1 double-stream + 2 single-stream blocks" in text
    assert "| 1.67× | 1.82× | **92%** |" in text
    assert "No speed results" in render_readme.speed_table()  # the UNet table skips transformer files


def test_supported_models_are_counted_on_real_configurations():
    from benchmarks import supported_models as sm

    flux = sm.describe("flux-tiny", *sm.MODELS["flux-tiny (embedded)"])
    assert flux["supported"] and flux["groups"] == {"joint attention": 2, "single-stream attention": 4, "FFN": 2,
                                                    "FFN (text stream)": 2, "single-stream MLP": 4}
    assert flux["qk_whole"] == 6 and 0 < flux["compressible_params"] < flux["params"]
    assert flux["slim_class"] == "SlimFluxTransformer2DModel"
    sana = sm.describe("Sana", *sm.MODELS["Sana 1600M"])
    assert not sana["supported"] and "linear attention" in sana["refusal"] and "slim_class" not in sana


def test_quality_append_refuses_other_settings_or_reference():
    import argparse

    import pytest

    from benchmarks import quality

    def payload(steps, adherence):
        return {"model": "flux_tiny", "command": "x", "calibration_seconds": 1.0, "results": [{"method": "slimdiff"}],
                "settings": {"steps": steps, "cal_samples": 32, "methods": ["slimdiff"], "keep": [0.6]},
                "reference": {"adherence": adherence}}

    args = argparse.Namespace(methods=["obs_pruning"], keep=[0.6])
    merged = quality._appended(payload(25, 0.3), payload(25, 0.3), args)
    assert merged["results"] == [{"method": "slimdiff"}] and merged["settings"]["methods"] == ["slimdiff", "obs_pruning"]
    with pytest.raises(SystemExit, match="steps"):
        quality._appended(payload(20, 0.3), payload(25, 0.3), args)
    with pytest.raises(SystemExit, match="reference adherence"):
        quality._appended(payload(25, 0.31), payload(25, 0.3), args)
    first, second = payload(25, 0.3), payload(25, 0.3)
    first["settings"] |= {"ablations": ["grid_fine"], "ablation_keep": [0.6]}
    second["settings"] |= {"ablations": ["vo_input"], "ablation_keep": [0.8, 0.4]}
    merged = quality._appended(second, first, args)  # the settings name every part's ablations
    assert merged["settings"]["ablations"] == ["grid_fine", "vo_input"]
    assert merged["settings"]["ablation_keep"] == [0.8, 0.6, 0.4]
    # validation results (--eval-set validation) never join held-out ones; files from before --eval-set are held-out
    heldout = payload(25, 0.3)
    heldout["settings"]["eval_set"] = "heldout"
    quality._appended(heldout, payload(25, 0.3), args)
    validation = payload(25, 0.3)
    validation["settings"]["eval_set"] = "validation"
    with pytest.raises(SystemExit, match="eval_set"):
        quality._appended(validation, payload(25, 0.3), args)


@pytest.mark.parametrize("workload_name, embedded_name", [("default", "sd-tiny"), ("flux_tiny", "flux-tiny")])
def test_quality_samples_the_embedded_models_as_their_registry_entry_says(workload_name, embedded_name, monkeypatch,
                                                                            one_thread):
    """benchmarks/quality.py takes the embedded models' sampler from the registry (EmbeddedModel.generation_kwargs),
    so its calls are the ones `slimdiff slim` and stack.py make: every pipeline call it makes on a reduced setting
    (the calibration, the baselines' second pass, the original's and a candidate's held-out images) passes exactly
    the registry's arguments besides the prompt, the generators and the output type; calibration samples seeds
    0.., evaluation 10000... (The published results files were made with these calls: a check run before and after
    the change recorded identical calls, calibration statistics and metrics.)"""
    import argparse
    import functools

    import diffusers

    from benchmarks import quality
    from slimdiff_diffusers.default_model import get_embedded_model

    embedded = get_embedded_model(embedded_name)
    pipeline_class = getattr(diffusers, embedded.pipeline_class)
    real_call = pipeline_class.__call__
    calls: list[dict] = []

    @functools.wraps(real_call)  # keeps the signature calibrate_pipeline checks call arguments against
    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", spy)
    steps, cal_samples = 2, 3
    args = argparse.Namespace(steps=steps, eval_set="heldout", cal_samples=cal_samples, eval_samples=2, eval_seeds=1,
                              pipeline_dir=None)
    workload = quality.WORKLOADS[workload_name](args)
    workload.calibrate(cal_samples, True)
    workload.evaluate(workload.model, True)

    # reference, the timestep probe (the first calibration batch's own call, stopped at the denoiser's first
    # forward: calibrate_pipeline reads the timestep scale from it), 2 calibration, candidate
    assert [c["output_type"] for c in calls] == ["np", "latent", "latent", "latent", "np"]
    same = ("generator",)  # fresh generators with the same seeds (checked below)
    assert {k: v for k, v in calls[1].items() if k not in same} == {k: v for k, v in calls[2].items() if k not in same}
    for call in calls:
        sampler = {k: v for k, v in call.items() if k not in ("prompt", "generator", "output_type")}
        assert sampler == embedded.generation_kwargs(num_inference_steps=steps, batch_size=len(call["prompt"])), call
        first_seed = 0 if call["output_type"] == "latent" else 10_000
        assert [g.initial_seed() for g in call["generator"]] == list(range(first_seed, first_seed + len(call["prompt"])))
    if embedded.guidance_argument == "true_cfg_scale":  # what the registry says flux-tiny needs, in every call
        assert all(c["true_cfg_scale"] == 4.0 and c["negative_prompt"] == [""] * len(c["prompt"]) for c in calls)
    assert workload.settings["guidance_scale"] == embedded.guidance_scale and workload.settings["steps"] == steps
    assert workload.settings["image_size"] == 32
    assert workload.settings["sampler_from"] == f"the {embedded_name} registry entry (EmbeddedModel.generation_kwargs)"
