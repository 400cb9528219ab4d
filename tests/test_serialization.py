"""Saving and loading slimmed models: diffusers folders, stock pipeline loading, the Hub cache, single files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_sd_pipeline

import slimdiff_diffusers as sd
from slimdiff_diffusers.core import SlimFileError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slim_unet(sd15_unet, sd15_calibration):
    return sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8)


def _eps(unet, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 24, generator=gen)
    with torch.no_grad():
        return unet(x, 321, encoder_hidden_states=ctx).sample


def test_model_save_pretrained_round_trip(tmp_path, slim_unet):
    slim_unet.save_pretrained(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "SlimUNet2DConditionModel" and config["slimdiff_spec"]["attention"]
    loaded = sd.SlimUNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert torch.equal(_eps(loaded), _eps(slim_unet))
    half = sd.SlimUNet2DConditionModel.from_pretrained(tmp_path / "unet", torch_dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16


def test_stock_diffusion_pipeline_from_pretrained(tmp_path, sd15_calibration):
    from diffusers import DiffusionPipeline

    pipe = tiny_sd_pipeline(tmp_path)
    pipe.unet = sd.slim(pipe.unet, sd15_calibration, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["slimdiff_diffusers", "SlimUNet2DConditionModel"]
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")

    def image(p):
        return p("a red circle", num_inference_steps=3, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert type(reloaded.unet).__name__ == "SlimUNet2DConditionModel"
    assert (image(reloaded) == image(pipe)).all()


def test_pipeline_save_options_reach_the_slim_unet(tmp_path, sd15_calibration):
    """pipe.save_pretrained(variant=..., safe_serialization=False) saves the slim UNet as it saves every component
    (diffusers passes these only to a save_pretrained whose signature names them), and it loads back by variant."""
    from diffusers import DiffusionPipeline

    pipe = tiny_sd_pipeline(tmp_path)
    pipe.unet = sd.slim(pipe.unet, sd15_calibration, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8)
    pipe.save_pretrained(tmp_path / "pipe", variant="fp16", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "pipe" / "unet").iterdir() if p.name.startswith("diffusion")) == \
        ["diffusion_pytorch_model.fp16.bin"]
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", variant="fp16")
    assert torch.equal(_eps(reloaded.unet), _eps(pipe.unet))


def test_hub_cache_offline(tmp_path, slim_unet):
    """A slim model in the real huggingface_hub cache layout loads by repo id with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-slim-unet"
    slim_unet.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    torch.save(_eps(slim_unet), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch, sys
        sys.path.insert(0, {str(ROOT)!r})
        import slimdiff_diffusers as sd
        torch.set_num_threads({torch.get_num_threads()})
        unet = sd.SlimUNet2DConditionModel.from_pretrained("someone/tiny-slim-unet")
        gen = torch.Generator().manual_seed(3)
        x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 24, generator=gen)
        with torch.no_grad():
            out = unet(x, 321, encoder_hidden_states=ctx).sample
        # another process may pick other kernels: bit-identity is checked in-process, here a tight tolerance
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6), f"outputs differ by {{(out - expected).abs().max()}}"
        try:
            sd.SlimUNet2DConditionModel.from_pretrained("someone/not-in-cache")
        except Exception as exc:
            print("MISSING:", type(exc).__name__)
        print("OK")
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout and "MISSING:" in result.stdout


def test_push_to_hub_uploads_a_loadable_folder(tmp_path, slim_unet, monkeypatch):
    """push_to_hub cannot reach the Hub here: hub_fakes.FakeHub replaces HfApi.create_repo / create_branch /
    upload_folder (the Hub boundary) and keeps the files upload_folder would send. They are read back from the
    real huggingface_hub cache layout by repo id, as a Hub user would, and must load identically."""
    from hub_fakes import FakeHub
    from huggingface_hub import ModelCard, hf_hub_download

    hub = FakeHub().install(monkeypatch)
    slim_unet.push_to_hub("someone/tiny-slim-unet", token="not-used")
    assert set(hub.files("someone/tiny-slim-unet")) == {
        ".gitattributes", "config.json", "diffusion_pytorch_model.safetensors", "README.md",
        "images/rank_allocation.png", "slim_unet.safetensors", "slimdiff_lora_maps.safetensors"}
    cache = hub.materialize(tmp_path / "cache")
    loaded = sd.SlimUNet2DConditionModel.from_pretrained("someone/tiny-slim-unet", cache_dir=cache,
                                                         local_files_only=True)
    assert torch.equal(_eps(loaded), _eps(slim_unet))
    card = ModelCard.load(hf_hub_download("someone/tiny-slim-unet", "README.md", cache_dir=cache,
                                          local_files_only=True))
    assert "slimdiff" in card.data.tags and card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "text-to-image" and card.data.slimdiff["kind"] == "model"
    assert 'SlimUNet2DConditionModel.from_pretrained("someone/tiny-slim-unet"' in card.text
    single = hf_hub_download("someone/tiny-slim-unet", "slim_unet.safetensors", cache_dir=cache, local_files_only=True)
    assert torch.equal(_eps(sd.load_slim_unet_file(single)), _eps(slim_unet))


def test_single_file_round_trip(tmp_path, slim_unet):
    path = tmp_path / "model.safetensors"
    sd.save_slim_unet_file(slim_unet, path)
    loaded = sd.load_slim_unet_file(path)
    assert type(loaded).__name__ == "SlimUNet2DConditionModel"
    assert torch.equal(_eps(loaded), _eps(slim_unet))
    spec, meta = sd.core.read_slim_header(path)
    assert spec == slim_unet.slimdiff_spec and meta["slimdiff.key_layout"] == "diffusers"


def test_single_file_bad_inputs(tmp_path, sd15_unet):
    from safetensors.torch import save_file

    foreign = tmp_path / "sd15.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(SlimFileError, match="not a SlimDiff slim model"):
        sd.load_slim_unet_file(foreign)
    with pytest.raises(FileNotFoundError):
        sd.load_slim_unet_file(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not slimmed"):
        sd.save_slim_unet_file(sd15_unet, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_apply_slim_spec_rejects_a_spec_of_another_model(slim_unet):
    from tiny_models import tiny_sdxl_unet

    with pytest.raises(SlimFileError, match="does not have"):
        sd.apply_slim_spec(tiny_sdxl_unet(), slim_unet.slimdiff_spec)
