"""Calibration: statistics are right, shared inputs are deduplicated, files round-trip, bad input is refused."""
from __future__ import annotations

import pytest
import torch
from conftest import run_unet
from tiny_models import tiny_sd15_unet

import slimdiff_diffusers as sd
from slimdiff_diffusers.core import CalibrationError, NonFiniteActivationError, SlimFileError


def test_second_moment_equals_direct_computation():
    unet = tiny_sd15_unet()
    site = sd.find_sites(unet).attention[0]
    captured = []
    handle = unet.get_submodule(site.q).register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    calibration = sd.calibrate(unet, run_unet(unet), sd.CalibrationConfig(propagation_probe_calls=0))
    handle.remove()
    x = torch.cat(captured).double()
    xx, mean = calibration.input_moment(site.q)
    assert torch.allclose(xx, x.T @ x / x.shape[0], rtol=1e-5, atol=1e-7)
    assert torch.allclose(mean, x.mean(0), rtol=1e-5, atol=1e-7)


def test_shared_inputs_are_deduplicated(sd15_calibration):
    inputs = sd15_calibration.linear_inputs
    for site in sd15_calibration.sites.attention:
        assert inputs[site.k] == inputs[site.v]
        if site.is_cross:
            assert inputs[site.q] != inputs[site.k]
        else:
            assert inputs[site.q] == inputs[site.k]
    cross_keys = {inputs[s.k] for s in sd15_calibration.sites.attention if s.is_cross}
    assert len(cross_keys) == 1, "every cross-attention reads the same text states: one accumulator"
    stored = {k.split("/")[1] for k in sd15_calibration.tensors if k.startswith("input/")}
    assert stored == set(inputs.values())


def test_save_load_round_trip(tmp_path, sd15_calibration, sd15_unet):
    path = tmp_path / "cal.safetensors"
    sd15_calibration.save(path)
    loaded = sd.Calibration.load(path)
    assert loaded.tensors.keys() == sd15_calibration.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], sd15_calibration.tensors[k]) for k in loaded.tensors)
    assert loaded.sites == sd15_calibration.sites
    assert loaded.propagation == sd15_calibration.propagation
    loaded.check_compatible(sd15_unet)
    a = sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8)
    b = sd.slim(sd15_unet, loaded, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(SlimFileError, match="not a SlimDiff calibration"):
        sd.Calibration.load(foreign)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(SlimFileError, match="not a readable"):
        sd.Calibration.load(corrupt)
    with pytest.raises(FileNotFoundError):
        sd.Calibration.load(tmp_path / "missing.safetensors")


def test_nan_activations_are_reported():
    unet = tiny_sd15_unet()

    def run():
        x = torch.full((1, 4, 8, 8), float("nan"))
        unet(x, 10, encoder_hidden_states=torch.randn(1, 7, 24))
    with pytest.raises(NonFiniteActivationError, match="NaN/inf"):
        sd.calibrate(unet, run)


def test_run_without_forward_pass_is_reported():
    with pytest.raises(CalibrationError, match="no forward pass"):
        sd.calibrate(tiny_sd15_unet(), lambda: None)


def test_interrupted_calibration_leaves_no_hooks_and_no_file(tmp_path):
    unet = tiny_sd15_unet()
    hooks_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())

    def run():
        run_unet(unet, batches=1)()
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        sd.calibrate(unet, run)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules()) == hooks_before
    assert not list(tmp_path.iterdir())


def test_atomic_save_keeps_old_file_on_failure(tmp_path, sd15_calibration, monkeypatch):
    path = tmp_path / "cal.safetensors"
    sd15_calibration.save(path)
    original = path.read_bytes()
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        sd15_calibration.save(path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["cal.safetensors"]


def test_memory_limit():
    unet = tiny_sd15_unet()
    with pytest.raises(CalibrationError, match="max_memory_bytes"):
        sd.calibrate(unet, run_unet(unet, batches=1), sd.CalibrationConfig(max_memory_bytes=10_000))


def test_timestep_buckets_and_weighting():
    unet = tiny_sd15_unet()
    calibration = sd.calibrate(unet, run_unet(unet, batches=5),
                               sd.CalibrationConfig(num_timestep_buckets=5, propagation_probe_calls=0))
    site = calibration.sites.attention[0]
    key = calibration.linear_inputs[site.q]
    counts = calibration.tensors[f"input/{key}/n"]
    assert counts.numel() == 5 and (counts > 0).sum() == 5  # timesteps 950..50 fill every bucket
    uniform, _ = calibration.input_moment(site.q, "tokens")
    late, _ = calibration.input_moment(site.q, [1, 0, 0, 0, 0])
    assert not torch.allclose(uniform, late)
    with pytest.raises(ValueError, match="entries"):
        calibration.input_moment(site.q, [1, 1])
    slimmed = sd.slim(unet, calibration, keep_ratio=0.6, rank_multiple=2, ffn_multiple=8,
                      propagation="block_influence", timestep_weighting=[0, 0, 1, 1, 1])
    assert slimmed.slimdiff_report.compressible_params_after < slimmed.slimdiff_report.compressible_params_before


def test_model_without_groups_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(CalibrationError, match="nothing SlimDiff can slim"):
        sd.calibrate(model, lambda: model(torch.randn(1, 4)))


def test_propagation_factors_are_measured(sd15_calibration):
    prop = sd15_calibration.propagation
    assert prop is not None and set(prop) == set(sd15_calibration.sites.blocks)
    assert all(v > 0 for v in prop.values())
