"""LoRAs made *on* a slim model (issue 12): saved marked, loaded back untranslated, refused on another slim model.

Real parts: tiny SD1.5 pipelines slimmed by ``pipe.slim``, PEFT adapters added with diffusers' ``add_adapter`` and
random (non-zero) factors, diffusers' ``save_lora_adapter`` / ``save_lora_weights`` / ``load_lora_adapter`` /
``load_lora_weights``, a tiny Flux transformer slimmed from a real calibration.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("peft")
from diffusers import StableDiffusionPipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_models import relative_difference as _rel  # noqa: E402
from tiny_models import tiny_sd_pipeline  # noqa: E402
from tiny_models import tiny_unet_eps as _eps  # noqa: E402

import slimdiff_diffusers as sd  # noqa: E402
from slimdiff_diffusers.core.errors import LoraMappingError, SlimLoraMismatchError  # noqa: E402
from slimdiff_diffusers.core.lora_mark import MARK_KEY, check_mark, file_mark, model_mark  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
FILE = "pytorch_lora_weights.safetensors"


def _add_random_lora(model, targets=TARGETS, seed: int = 1, name: str = "default", **config):
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets, **config),
                      adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_" in key and f".{name}." in key + ".":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _lora_keys(model):
    return [k for k in model.state_dict() if "lora_" in k]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """Slim copies of one tiny SD1.5 pipeline: keep 1.0 (no layer changes shape), 0.6 and 0.8 from one calibration,
    and keep 1.0 from a second calibration on other prompts (same widths, other bases)."""
    tmp = tmp_path_factory.mktemp("slim_lora")
    original = sd.enable_slimdiff(tiny_sd_pipeline(tmp))
    small = dict(num_inference_steps=2, batch_size=4, height=16, width=16, rank_multiple=2, ffn_multiple=8,
                 progress=False)
    out = {"tmp": tmp, "original": original}
    for name, prompts in (("cal", [f"prompt number {i}" for i in range(4)]),
                          ("cal_b", [f"another scene {i}, red" for i in range(4)])):
        pipe = sd.enable_slimdiff(copy.deepcopy(original))
        pipe.slim(prompts=prompts, num_prompts=4, keep_ratio=1.0, save_calibration=tmp / f"{name}.safetensors",
                  **small)
        out[(name, 1.0)] = pipe
    for keep in (0.6, 0.8):
        pipe = sd.enable_slimdiff(copy.deepcopy(original))
        pipe.slim(calibration=tmp / "cal.safetensors", keep_ratio=keep, rank_multiple=2, ffn_multiple=8,
                  progress=False)
        out[("cal", keep)] = pipe
    return out


def _copy(pipes, key):
    return sd.enable_slimdiff(copy.deepcopy(pipes[key]))


@pytest.mark.parametrize("keep", [0.6, 1.0], ids=["narrowed", "unchanged_shapes"])
def test_model_level_round_trip_loads_back_untranslated(pipes, tmp_path, keep):
    """save_lora_adapter -> unload -> load_lora_adapter on the same slim UNet gives the same output. At keep 1.0 no
    target changes shape: before the mark, the file was read as an original-model LoRA and silently translated."""
    unet = _copy(pipes, ("cal", keep)).unet
    base = _eps(unet)
    _add_random_lora(unet)
    with_lora = _eps(unet)
    assert _rel(with_lora, base) > 1e-2
    unet.save_lora_adapter(tmp_path)
    with safe_open(str(tmp_path / FILE), framework="pt") as f:
        recorded = json.loads(f.metadata()["lora_adapter_metadata"])
    assert recorded[MARK_KEY]["spec_sha256"] == model_mark(unet)["spec_sha256"]
    saved = load_file(tmp_path / FILE)
    unet.unload_lora()
    assert not _lora_keys(unet)
    unet.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    assert _rel(_eps(unet), with_lora) < 1e-6
    reloaded = get_peft_model_state_dict(unet, adapter_name="default_0")
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)  # the factors themselves, untranslated


def test_pipeline_level_round_trip_and_a_reloaded_slim_pipeline(pipes, tmp_path):
    """The training scripts' route: save_lora_weights with the adapter's config as metadata, then
    pipe.load_lora_weights, here on the slim pipeline saved and loaded again (same bases, new objects)."""
    pipe = _copy(pipes, ("cal", 0.6))
    _add_random_lora(pipe.unet, seed=3)
    with_lora = _eps(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    # the file says so (what ComfyUI's SlimDiff Load LoRA reads to refuse it), under the pipeline's "unet." prefix
    assert file_mark(tmp_path / "lora" / FILE) == model_mark(pipe.unet)
    pipe.unet.unload_lora()
    pipe.save_pretrained(tmp_path / "slim")
    from diffusers import DiffusionPipeline

    reloaded = sd.enable_slimdiff(DiffusionPipeline.from_pretrained(tmp_path / "slim"))
    reloaded.load_lora_weights(tmp_path / "lora")
    assert _rel(_eps(reloaded.unet), with_lora) < 1e-6


def test_lora_made_on_another_slim_model_is_refused_and_loses_nothing(pipes, tmp_path):
    """Other widths (keep 0.8 vs 0.6), and the same widths in other bases (keep 1.0 from another calibration)."""
    donor = _copy(pipes, ("cal", 0.6)).unet
    _add_random_lora(donor)
    donor.save_lora_adapter(tmp_path / "narrow")
    donor_full = _copy(pipes, ("cal", 1.0)).unet
    _add_random_lora(donor_full)
    donor_full.save_lora_adapter(tmp_path / "full")
    for folder, key, why in (("narrow", ("cal", 0.8), "other widths"), ("full", ("cal_b", 1.0), "other bases")):
        unet = _copy(pipes, key).unet
        before = _eps(unet)
        with pytest.raises(SlimLoraMismatchError, match=why):
            unet.load_lora_adapter(tmp_path / folder, prefix=None, use_safetensors=True)
        assert not _lora_keys(unet) and not getattr(unet, "peft_config", {})
        assert torch.equal(_eps(unet), before)


def test_marked_lora_on_the_original_model_is_refused_by_diffusers(pipes, tmp_path):
    """Not silently wrong on a stock UNet either: the mark is an unknown LoraConfig field there."""
    unet = _copy(pipes, ("cal", 1.0)).unet
    _add_random_lora(unet)
    unet.save_lora_adapter(tmp_path)
    stock = copy.deepcopy(pipes["original"].unet)
    with pytest.raises(TypeError, match="LoraConfig"):
        stock.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)


def test_unmarked_lora_that_fits_only_the_slim_layers_is_refused_until_marked(pipes, tmp_path):
    unet = _copy(pipes, ("cal", 0.6)).unet
    _add_random_lora(unet)
    with_lora = _eps(unet)
    save_file(get_peft_model_state_dict(unet), str(tmp_path / FILE))  # no LoRA metadata: another tool's file
    unet.unload_lora()
    with pytest.raises(LoraMappingError, match="carries no SlimDiff mark.*mark_slim_lora_file"):
        unet.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    assert not _lora_keys(unet)
    sd.mark_slim_lora_file(tmp_path, unet)
    unet.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    assert _rel(_eps(unet), with_lora) < 1e-6
    # a state dict: its metadata gains the mark
    unet.unload_lora()
    state = load_file(tmp_path / FILE)
    unet.load_lora_adapter(state, prefix=None, metadata={"r": 4, "lora_alpha": 4, "target_modules": TARGETS,
                                                         **sd.slim_lora_metadata(unet)})
    assert _rel(_eps(unet), with_lora) < 1e-6


def test_original_model_lora_is_still_translated_and_saved_again_it_is_the_slim_models(pipes, tmp_path):
    """An original-model LoRA loaded on the slim UNet is translated; saved from there it is in the slim bases, so it
    loads back untranslated (equal outputs)."""
    donor = copy.deepcopy(pipes["original"].unet)
    _add_random_lora(donor, targets=["to_q", "to_k", "to_v", "to_out.0"])
    state = get_peft_model_state_dict(donor)
    donor.save_lora_adapter(tmp_path / "original")  # a stock model's file carries no mark
    assert file_mark(tmp_path / "original" / FILE) is None
    unet = _copy(pipes, ("cal", 1.0)).unet
    unet.load_lora_adapter(state, prefix=None, adapter_name="a")
    assert _rel(_eps(unet), _eps(donor)) < 1e-5  # translated (exact at full rank)
    expected = _eps(unet)
    unet.save_lora_adapter(tmp_path, adapter_name="a")
    unet.delete_adapters("a")
    unet.load_lora_adapter(tmp_path, prefix=None, adapter_name="a", use_safetensors=True)
    assert _rel(_eps(unet), expected) < 1e-6


def test_a_config_taken_from_another_slim_model_gets_this_models_mark(pipes):
    first, second = _copy(pipes, ("cal", 1.0)).unet, _copy(pipes, ("cal_b", 1.0)).unet
    _add_random_lora(first)
    second.add_adapter(first.peft_config["default"])
    assert second.peft_config["default"].to_dict()[MARK_KEY] == model_mark(second) != model_mark(first)
    assert first.peft_config["default"].to_dict()[MARK_KEY] == model_mark(first)


def test_mark_tolerates_a_dtype_change_and_tells_bases_apart(pipes):
    unet = _copy(pipes, ("cal", 1.0)).unet
    mark = model_mark(unet)
    check_mark(mark, copy.deepcopy(unet).to(torch.bfloat16))  # same bases, rounded weights
    with pytest.raises(SlimLoraMismatchError, match="other bases"):
        check_mark(mark, _copy(pipes, ("cal_b", 1.0)).unet)


def test_flux_round_trip_and_refusal(one_thread, tmp_path):
    from tiny_models import flux_inputs, tiny_flux_transformer

    from slimdiff_diffusers.core import CalibrationConfig, calibrate
    from slimdiff_diffusers.diffusers_adapter.slimming import slim

    model = tiny_flux_transformer()
    config = CalibrationConfig(num_train_timesteps=1, num_timestep_buckets=1, propagation_probe_calls=2)
    calibration = calibrate(model, lambda: [model(**flux_inputs(model, seed=s)) for s in range(3)], config)
    slim_model = slim(model, calibration, keep_ratio=0.6, rank_multiple=2, ffn_multiple=8)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out"]
    _add_random_lora(slim_model, targets=targets)
    with torch.no_grad():
        expected = slim_model(**flux_inputs(slim_model, seed=9))[0]
    slim_model.save_lora_adapter(tmp_path)
    slim_model.unload_lora()
    slim_model.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    with torch.no_grad():
        assert _rel(slim_model(**flux_inputs(slim_model, seed=9))[0], expected) < 1e-6
    other = slim(model, calibration, keep_ratio=0.8, rank_multiple=2, ffn_multiple=8)
    with pytest.raises(SlimLoraMismatchError, match="other widths"):
        other.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
