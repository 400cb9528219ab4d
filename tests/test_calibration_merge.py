"""Calibrations combine exactly (merge, torch.distributed) and damaged files are refused by name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_sd15_unet

import slimdiff_diffusers as sd
from slimdiff_diffusers.core import CalibrationMismatchError, SlimFileError

ROOT = Path(__file__).resolve().parents[1]


def _batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randn(4, 7, 24, generator=gen)
    return [(torch.randn(4, 4, 8, 8, generator=gen), t, ctx) for t in torch.linspace(950, 50, n).long().tolist()]


def _calibrate(unet, batches, **config):
    def run():
        for x, t, ctx in batches:
            unet(x, t, encoder_hidden_states=ctx)
    return sd.calibrate(unet, run, sd.CalibrationConfig(**config))


def assert_equal_calibrations(a: sd.Calibration, b: sd.Calibration) -> None:
    """Moments within 1e-9 relative, every other statistic within 1e-6 (issue 9's acceptance)."""
    assert a.tensors.keys() == b.tensors.keys() and a.linear_inputs == b.linear_inputs
    for key, x in a.tensors.items():
        y = b.tensors[key]
        tol = 1e-9 if key.startswith(("input/", "heads/")) else 1e-6
        assert (x.double() - y.double()).abs().max() <= tol * x.double().abs().max().clamp_min(1e-30), key
    for path, tokens in a.tokens_per_row.items():
        assert tokens == pytest.approx(b.tokens_per_row[path], rel=1e-6)
    assert (a.propagation is None) == (b.propagation is None)
    assert (a.propagation or {}).keys() == (b.propagation or {}).keys()
    for block, pi in (a.propagation or {}).items():
        assert pi == pytest.approx(b.propagation[block], rel=1e-6)


def test_merge_of_two_shares_equals_one_run(tmp_path):
    unet = tiny_sd15_unet()
    batches = _batches(6)
    whole = _calibrate(unet, batches)
    # the probe replays the first 4 calls of a run: the first share holds them, as the single run does
    first, second = _calibrate(unet, batches[:4]), _calibrate(unet, batches[4:])
    first.save(tmp_path / "a.safetensors")
    second.save(tmp_path / "b.safetensors")
    merged = sd.Calibration.merge([sd.Calibration.load(tmp_path / "a.safetensors"),
                                   sd.Calibration.load(tmp_path / "b.safetensors")])
    assert_equal_calibrations(whole, merged)
    assert merged.meta["num_forward_calls"] == whole.meta["num_forward_calls"] == 6
    # The statistics add exactly, so an allocation that reads only them and the probe's π_b agrees exactly
    a = sd.slim(unet, whole, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8, propagation="probe")
    b = sd.slim(unet, merged, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8, propagation="probe")
    assert a.slimdiff_spec.to_dict() == b.slimdiff_spec.to_dict()
    # The measured group influence is the first share's: its reference factors came from that share's statistics
    # (method.md §4.1.1), so it is close to the single run's, not equal
    assert merged.group_influence == first.group_influence
    assert merged.group_influence.keys() == whole.group_influence.keys()
    for group, alpha in whole.group_influence.items():
        assert merged.group_influence[group] == pytest.approx(alpha, rel=0.5), group


def test_split_between_trajectories_equals_one_run_where_short_calls_are_folded():
    """Short calls (here the 2 text tokens every cross-attention reads, and the 4×4 level) are folded into one
    fp32 product over several calls (moments.py). A fold never spans two sampling trajectories, so calibrations of
    separate trajectories (prompt batches on separate ranks or machines) sum to the single run within 1e-9."""
    from slimdiff_diffusers.core.moments import MomentAccumulator

    assert MomentAccumulator(24, 1, torch.float64, "cpu").fold_rows > 2  # the text states' calls are folded
    unet = tiny_sd15_unet()
    gen = torch.Generator().manual_seed(1)
    trajectories = [[(torch.randn(1, 4, 8, 8, generator=gen), t, torch.randn(1, 2, 24, generator=gen) * 3)
                     for t in (900, 900, 500, 100)]  # a repeated timestep, as true CFG's two calls per step
                    for _ in range(3)]
    config = {"propagation_probe_calls": 0}
    whole = _calibrate(unet, [call for trajectory in trajectories for call in trajectory], **config)
    parts = [_calibrate(unet, trajectories[0], **config), _calibrate(unet, trajectories[1] + trajectories[2], **config)]
    assert_equal_calibrations(whole, sd.Calibration.merge(parts))


def test_merge_refuses_other_models_and_settings():
    unet = tiny_sd15_unet()
    base = _calibrate(unet, _batches(2), propagation_probe_calls=0)
    with pytest.raises(CalibrationMismatchError, match="different weights"):
        sd.Calibration.merge([base, _calibrate(tiny_sd15_unet(seed=3), _batches(2), propagation_probe_calls=0)])
    with pytest.raises(CalibrationMismatchError, match="num_timestep_buckets"):
        sd.Calibration.merge([base, _calibrate(unet, _batches(2), propagation_probe_calls=0, num_timestep_buckets=2)])
    from tiny_models import tiny_sdxl_unet
    from conftest import run_unet

    other = tiny_sdxl_unet()
    xl = sd.calibrate(other, run_unet(other, batches=1, sdxl=True), sd.CalibrationConfig(propagation_probe_calls=0))
    with pytest.raises(CalibrationMismatchError, match="layer structure"):
        sd.Calibration.merge([base, xl])


def _rewrite(path: Path, out: Path, *, tensors=None, header=None, raw_header: str | None = None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    head = json.loads(meta["slimdiff.calibration"])
    if tensors:
        tensors(data)
    if header:
        header(head)
    meta["slimdiff.calibration"] = raw_header if raw_header is not None else json.dumps(head)
    save_file(data, str(out), metadata=meta)
    return out


@pytest.fixture(scope="module")
def saved_calibration(tmp_path_factory, sd15_calibration):
    path = tmp_path_factory.mktemp("cal") / "cal.safetensors"
    sd15_calibration.save(path)
    return path


def _first_input_key(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return next(k.rsplit("/", 1)[0] for k in f.keys() if k.startswith("input/") and k.endswith("/xx"))


@pytest.mark.parametrize("damage, message", [
    ("nan_moment", "contains NaN or inf"),
    ("inf_energy", "contains NaN or inf"),
    ("negative_count", "is negative"),
    ("missing_tensor", "is missing"),
    ("wrong_shape", "has shape"),
    ("bad_json", "not valid JSON"),
    ("sites_not_a_dict", "header entry 'sites'"),
    ("bad_site", "header entry 'sites'"),
    ("bad_propagation", "header entry 'propagation'"),
])
def test_damaged_calibration_files_are_refused_by_name(tmp_path, saved_calibration, damage, message):
    key = _first_input_key(saved_calibration)
    energy = next(k for k in sd.Calibration.load(saved_calibration).tensors if k.startswith("energy/") and k.endswith("/sum"))
    edits = {
        "nan_moment": dict(tensors=lambda d: d[f"{key}/xx"].view(-1)[3:4].fill_(float("nan"))),
        "inf_energy": dict(tensors=lambda d: d[energy].fill_(float("inf"))),
        "negative_count": dict(tensors=lambda d: d[f"{key}/n"].fill_(-1.0)),
        "missing_tensor": dict(tensors=lambda d: d.pop(f"{key}/x")),
        "wrong_shape": dict(tensors=lambda d: d.__setitem__(f"{key}/xx", d[f"{key}/xx"][:, :3, :3].contiguous())),
        "bad_json": dict(raw_header="{not json"),
        "sites_not_a_dict": dict(header=lambda h: h.__setitem__("sites", [])),
        "bad_site": dict(header=lambda h: h["sites"]["attention"][0].__setitem__("heads", "eight")),
        "bad_propagation": dict(header=lambda h: h.__setitem__("propagation", {"nowhere": 1.0})),
    }[damage]
    damaged = _rewrite(saved_calibration, tmp_path / f"{damage}.safetensors", **edits)
    with pytest.raises(SlimFileError, match=message) as info:
        sd.Calibration.load(damaged)
    assert str(damaged) in str(info.value)


def test_header_naming_modules_the_model_lacks_is_a_mismatch(tmp_path, saved_calibration, sd15_unet):
    def rename(h):
        site = h["sites"]["attention"][0]
        site["name"] = site["name"].replace("attn1", "attn9")
    damaged = _rewrite(saved_calibration, tmp_path / "renamed.safetensors", header=rename)
    with pytest.raises((SlimFileError, CalibrationMismatchError)):
        sd.slim(sd15_unet, sd.Calibration.load(damaged), keep_ratio=0.5)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_process_torchrun_calibration_equals_one_process(tmp_path):
    """Real torch.distributed (gloo, two processes under torchrun) against one process on the same prompts."""
    common = ["calibrate", "--num-prompts", "8", "--steps", "2", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single = subprocess.run([sys.executable, "-m", "slimdiff_diffusers", *common, "--out", str(tmp_path / "one.safetensors")],
                            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "slimdiff_diffusers", *common, "--out", str(tmp_path / "two.safetensors")],
                              env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = sd.Calibration.load(tmp_path / "one.safetensors")
    two = sd.Calibration.load(tmp_path / "two.safetensors")
    assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1
    assert_equal_calibrations(one, two)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == ["one.safetensors", "two.safetensors"]
    # the two halves merged by file equal the single run too
    halves = []
    for part, share in (("a", "0:4"), ("b", "4:8")):
        out = tmp_path / f"{part}.safetensors"
        r = subprocess.run([sys.executable, "-m", "slimdiff_diffusers", *common, "--prompt-range", share, "--out", str(out)],
                           env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        halves.append(str(out))
    merged = tmp_path / "merged.safetensors"
    r = subprocess.run([sys.executable, "-m", "slimdiff_diffusers", "calibrate", "--merge", *halves, "--out", str(merged)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_equal_calibrations(one, sd.Calibration.load(merged))


def _repeatable_run(unet, batches: int = 4):
    """Like conftest.run_unet, but every call draws the same inputs (its generator is created inside)."""
    def run():
        gen = torch.Generator().manual_seed(0)
        ctx = torch.randn(4, 7, 24, generator=gen)
        for t in torch.linspace(950, 50, batches).long().tolist():
            unet(torch.randn(4, 4, 8, 8, generator=gen), t, encoder_hidden_states=ctx)
    return run


def test_calibration_in_passes_under_a_memory_limit_equals_one_pass(tmp_path, sd15_unet):
    """memory_limit below the statistics: several passes over the same prompts, spilled to shards, same result."""
    from slimdiff_diffusers.core.calibrator import _sites_of_blocks

    whole = sd.calibrate(sd15_unet, _repeatable_run(sd15_unet))
    config = sd.CalibrationConfig()
    # the largest single block: every pass holds at most that (the tiny model's mid block is most of the total)
    limit = max(sd.core.estimate_statistics_bytes(_sites_of_blocks(whole.sites, [b]), config) for b in whole.sites.blocks)
    spill = tmp_path / "spill"
    parts = sd.calibrate(sd15_unet, _repeatable_run(sd15_unet),
                         sd.CalibrationConfig(memory_limit=limit, spill_dir=str(spill)))
    assert parts.meta["passes"] >= 2 and parts.meta["memory_bytes"] <= limit
    assert limit < sd.core.estimate_statistics_bytes(whole.sites, config)
    assert len(list(spill.glob("pass-*.safetensors"))) == parts.meta["passes"]
    assert parts.meta["num_forward_calls"] == whole.meta["num_forward_calls"]
    for site in whole.sites.attention:
        for path in (site.q, site.k, site.v):
            a, b = whole.input_moment(path), parts.input_moment(path)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert whole.output_energy(site.out) == parts.output_energy(site.out)
    for block in whole.sites.blocks:
        assert whole.block_input_energy(block) == parts.block_input_energy(block)
        assert whole.propagation[block] == pytest.approx(parts.propagation[block], rel=1e-6)
    config = dict(keep_ratio=0.5, rank_multiple=2, ffn_multiple=8)
    a, b = sd.slim(sd15_unet, whole, **config), sd.slim(sd15_unet, parts, **config)
    assert a.slimdiff_spec.to_dict() == b.slimdiff_spec.to_dict()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert (x - y).abs().max() <= 1e-6 * x.abs().max().clamp_min(1e-12), name
    # the spilled calibration saves by streaming and loads back (lazily) to the same statistics
    parts.save(tmp_path / "parts.safetensors")
    lazy = sd.Calibration.load(tmp_path / "parts.safetensors", lazy=True)
    assert set(lazy.tensors) == set(parts.tensors)
    assert all(torch.equal(lazy.tensors[k], parts.tensors[k]) for k in parts.tensors)
    c = sd.slim(sd15_unet, lazy, **config)
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), c.state_dict().values()))


def test_memory_limit_below_one_block_is_refused_before_running(sd15_unet):
    calls = []
    with pytest.raises(sd.CalibrationError, match="below the statistics of one group"):
        sd.calibrate(sd15_unet, lambda: calls.append(1), sd.CalibrationConfig(memory_limit=1000))
    assert calls == []


def test_run_function_that_does_not_repeat_is_refused(sd15_unet):
    from conftest import run_unet

    from slimdiff_diffusers.core.calibrator import _sites_of_blocks

    sites, config = sd.find_sites(sd15_unet), sd.CalibrationConfig()
    limit = max(sd.core.estimate_statistics_bytes(_sites_of_blocks(sites, [b]), config) for b in sites.blocks)
    # conftest.run_unet draws new noise on every call: a second pass would see other inputs
    with pytest.raises(sd.CalibrationError, match="repeats the same forward passes"):
        sd.calibrate(sd15_unet, run_unet(sd15_unet, batches=2), sd.CalibrationConfig(memory_limit=limit))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_memory_limit_below_one_block_splits_the_block_into_its_groups(family, one_thread):
    """A limit below one block's statistics (a Flux.1-dev double block holds two 12288² FFN moments) calibrates
    the block's groups in separate passes: joint attention, single-stream attention/MLP split across passes and
    the text stream's ff_context give the same statistics and the same slim model as one pass."""
    from tiny_models import flux_inputs, sd3_inputs, tiny_flux_transformer, tiny_sd3_transformer

    from slimdiff_diffusers.core.calibrator import _sites_of_blocks, plan_passes

    model, inputs = (tiny_flux_transformer(), flux_inputs) if family == "flux" else \
        (tiny_sd3_transformer(qk_norm=None), sd3_inputs)

    def run():
        for seed in range(2):
            model(**inputs(model, seed=seed))

    whole = sd.calibrate(model, run, sd.CalibrationConfig(propagation_probe_calls=1))
    config = sd.CalibrationConfig()
    estimate = sd.core.estimate_statistics_bytes
    biggest_group = max(estimate(sd.core.Sites(attention=[s]) if isinstance(s, sd.core.AttentionSite) else
                                 sd.core.Sites(feed_forward=[s]), config)
                        for s in [*whole.sites.attention, *whole.sites.feed_forward])
    smallest_block = min(estimate(_sites_of_blocks(whole.sites, [b]), config) for b in whole.sites.blocks)
    assert biggest_group < smallest_block
    limit = biggest_group
    passes = plan_passes(whole.sites, sd.CalibrationConfig(memory_limit=limit))
    assert all(estimate(p, config) <= limit for p in passes)
    assert sum(len(p) for p in passes) == len(whole.sites)
    assert any(len(p.blocks) == 1 and len(p) < len(_sites_of_blocks(whole.sites, p.blocks)) for p in passes)

    parts = sd.calibrate(model, run, sd.CalibrationConfig(propagation_probe_calls=1, memory_limit=limit))
    assert parts.meta["passes"] == len(passes) and parts.meta["memory_bytes"] <= limit
    assert parts.linear_inputs.keys() == whole.linear_inputs.keys()
    for path in whole.linear_inputs:  # pass-local accumulator names differ; the moments do not
        a, b = whole.input_moment(path), parts.input_moment(path)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), path
    others = [k for k in whole.tensors if not k.startswith("input/")]
    assert others and set(others) == {k for k in parts.tensors if not k.startswith("input/")}
    for key in others:  # energies, head moments, cosines: a split block's copies agree
        assert torch.equal(whole.tensors[key], parts.tensors[key]), key
    options = dict(keep_ratio=0.6, rank_multiple=2, ffn_multiple=8)
    a, b = sd.slim(model, whole, **options), sd.slim(model, parts, **options)
    assert a.slimdiff_spec.to_dict() == b.slimdiff_spec.to_dict()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert (x - y).abs().max() <= 1e-6 * x.abs().max().clamp_min(1e-12), name
