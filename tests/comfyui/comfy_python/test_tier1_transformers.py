"""Tier 1 (opt-in): ComfyUI's transformer families (Flux, SD3/SD3.5, PixArt) through the pack's nodes, in this process.

The tiny Flux is the embedded flux-tiny transformer in ComfyUI's format: its diffusers weights converted by
ComfyUI's own ``convert_diffusers_mmdit`` and built by ComfyUI's Flux model class from the matching
``unet_config`` (ComfyUI's detection would build Flux-dev's 3072-wide model whatever the file holds). Its text
encoders (a 64-wide T5 and CLIP) have no ComfyUI loader, so the conditioning is given as tensors of the
transformer's widths. The tiny SD3 (random weights, ComfyUI's MMDiT widths: 64 channels and one head per unit of
depth) is loaded by ComfyUI's stock UNETLoader from a diffusers-format file. The tiny PixArt (random weights,
sampled at its own size, 64 latent pixels) is converted with ComfyUI's key map for its width (ComfyUI's own
diffusers-PixArt conversion assumes PixArt's 1152). The diffusers side (``pipe.slim()``, ``load_slim_model_file``) runs in the repository's
python (``SLIMDIFF_DIFFUSERS_PYTHON``, set by the launcher) through ``tests/comfyui/diffusers_side.py``.
"""
from __future__ import annotations

import math

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

if os.environ.get("SLIMDIFF_IN_COMFY_PYTHON") != "1" or not os.environ.get("COMFYUI_DIR"):
    pytest.skip("tier 1 runs under COMFYUI_PYTHON via tests/comfyui/test_comfyui_optin.py", allow_module_level=True)

import test_tier1_inprocess as tier1  # noqa: E402  (sets ComfyUI up: CPU, base directory, search paths)

harness, BASE = tier1.harness, tier1.BASE
HERE = Path(__file__).resolve().parent

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402

from comfyui_nodes import slim_format  # noqa: E402
from slimdiff_diffusers.core import SlimFileError, UnsupportedModelError, find_sites, load_slim_file  # noqa: E402

FLUX_TINY = harness.REPO_ROOT / "slimdiff_diffusers" / "default_model" / "flux_tiny" / "transformer"
STEPS = 4


def diffusers_python() -> str:
    python = os.environ.get("SLIMDIFF_DIFFUSERS_PYTHON")
    if not python:
        pytest.fail("SLIMDIFF_DIFFUSERS_PYTHON is not set: run these tiers through tests/comfyui/test_comfyui_optin.py")
    return python


def diffusers_side(*argv: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(harness.REPO_ROOT))
    subprocess.run([diffusers_python(), str(HERE.parent / "diffusers_side.py"), *argv], check=True, env=env,
                   timeout=900, cwd=harness.REPO_ROOT)


def tiny_flux() -> comfy.model_patcher.ModelPatcher:
    """flux-tiny as a ComfyUI MODEL (fp32, CPU)."""
    config = json.loads((FLUX_TINY / "config.json").read_text())
    state = load_file(str(next(FLUX_TINY.glob("*.safetensors"))))
    comfy_state = comfy.model_detection.convert_diffusers_mmdit(state, "")
    model_config = comfy.model_detection.model_config_from_unet_config(slim_format.flux_unet_config(config),
                                                                       comfy_state)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model(comfy_state, "")
    base.load_model_weights(comfy_state, "")
    return comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))


def node(node_id: str):
    return nodes.NODE_CLASS_MAPPINGS[node_id]


@pytest.fixture(scope="module")
def pack():
    harness.prepare_base_dir(BASE, harness.tiny_checkpoint())
    if "SlimCalibrate" not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(str(harness.REPO_ROOT)))


@pytest.fixture(scope="module")
def flux(pack, tmp_path_factory):
    fixtures = tmp_path_factory.mktemp("flux_fixtures")
    diffusers_side("make-flux", str(fixtures))
    generator = torch.Generator().manual_seed(5)
    context, pooled = torch.randn(1, 12, 64, generator=generator), torch.randn(1, 64, generator=generator)
    positive = [[context, {"pooled_output": pooled}]]
    negative = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled)}]]
    # Not all zeros: ComfyUI would widen an empty latent to Flux-dev's 16 channels (flux-tiny has 4); with
    # denoise 1 a flow model starts from pure noise, so the values do not matter.
    latent = {"samples": torch.full((1, 4, 16, 16), 0.5)}
    return calibrated_env(tiny_flux(), fixtures, latent, positive, negative, cfg=1.0, scheduler="simple")


def calibrated_env(model, fixtures: Path, latent: dict, positive: list, negative: list, cfg: float,
                   scheduler: str) -> dict:
    """A family's test environment: its model, conditioning and sampler settings, calibrated by SlimCalibrate
    with those settings."""
    env = {"model": model, "fixtures": fixtures, "latent": latent, "positive": positive, "negative": negative,
           "cfg": cfg, "scheduler": scheduler}
    with torch.inference_mode():
        # the calibration slims each group in place in the loaded weights to measure its influence
        env["weights_before"] = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
        env["calibration"] = node("SlimCalibrate").execute(model, 0, STEPS, cfg, "euler", scheduler, positive,
                                                           negative, latent).args[0]
    return env


def assert_group_influence_measured_and_weights_restored(env) -> None:
    """Every group's influence was measured through the view (whose leaves are slices of the live weights), and
    every weight of the input MODEL is bit-identical afterwards."""
    calibration = env["calibration"]
    groups = {f"{s.name}:vo" for s in calibration.sites.attention} | \
        {f"{s.name}:qk" for s in calibration.sites.attention if s.qk_decomposable} | \
        {f"{s.name}:ffn" for s in calibration.sites.feed_forward}
    assert set(calibration.group_influence) == groups
    # 0 only for a group the calibration finds lossless even at its floor (a tiny model's short text stream)
    values = list(calibration.group_influence.values())
    assert all(math.isfinite(v) and v >= 0 for v in values) and sum(v > 0 for v in values) > len(values) / 2
    after = env["model"].model.diffusion_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in env["weights_before"].items())


def sample(model, env, seed: int = 1) -> torch.Tensor:
    """ComfyUI's KSampler on ``model`` with the environment's conditioning and sampler settings."""
    with torch.inference_mode():
        return nodes.common_ksampler(model, seed, STEPS, env["cfg"], "euler", env["scheduler"], env["positive"],
                                     env["negative"], env["latent"])[0]["samples"]


def full_and_attention_slim(env) -> tuple:
    """SlimDiff Slim on the environment's model: keep 1.0 of everything, and keep 0.6 of the attention."""
    with torch.inference_mode():
        full = node("SlimModel").execute(env["model"], env["calibration"], 1.0, 0.0, "attention+ffn").args[0]
        slimmed = node("SlimModel").execute(env["model"], env["calibration"], 0.6, 0.0, "attention").args[0]
    return full, slimmed


def save_reload_and_run_in_diffusers(env, slimmed, family: str) -> tuple:
    """Save ``slimmed`` with SlimDiff Save Model, load it back with SlimDiff Load Model, and run the saved file in
    diffusers on the family's fixed inputs. Returns the loaded MODEL and the diffusers output."""
    with torch.inference_mode():
        saved = node("SlimSaveModel").execute(slimmed, f"tier1/{family}", "slim_models")
    name = f"tier1/{saved.ui['slim_models'][0]['filename']}"
    with torch.inference_mode():
        loaded = node("SlimLoadModel").execute(name).args[0]
    path = Path(folder_paths.get_full_path("slim_models", name))
    out_path = env["fixtures"] / f"comfy_made_{family}_in_diffusers.safetensors"
    diffusers_side("eval", str(path), str(env["fixtures"] / f"{family}_inputs.safetensors"), str(out_path))
    return loaded, load_file(str(out_path))["out"]


def slim(env, keep_ratio: float, model=None, targets: str = "attention+ffn"):
    with torch.inference_mode():
        out = node("SlimModel").execute(model or env["model"], env["calibration"], keep_ratio, 0.0, targets)
    return out.args[0], out.ui.as_dict()["text"][0]


def forward(patcher, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The diffusion model's output on the fixture inputs (ComfyUI's latent layout, t in [0, 1])."""
    with torch.inference_mode():
        return patcher.model.diffusion_model(inputs["x"], inputs["t"], inputs["context"], y=inputs["pooled"])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def install(fixtures: Path, name: str) -> str:
    folder = Path(folder_paths.get_folder_paths("slim_models")[0]) / "flux"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(fixtures / f"{name}.safetensors", folder / f"{name}.safetensors")
    return f"flux/{name}.safetensors"


def test_calibration_hooks_comfyuis_flux_through_the_diffusers_view(flux):
    calibration = flux["calibration"]
    sites = calibration.sites
    assert [s.kind for s in sites.attention] == ["joint"] * 2 + ["single"] * 4
    assert sum(s.kind == "single" for s in sites.feed_forward) == 4 and len(sites.feed_forward) == 8
    assert calibration.meta["num_forward_calls"] == STEPS  # cfg 1: one call per step
    assert calibration.meta["comfyui"]["model_config"] == "FluxSchnell"
    # The V input is the fused qkv's (or linear1's) input, shared with q and k; a single-stream MLP's hidden
    # state (the slice of linear1's output after GELU(tanh)) is recorded at ComfyUI's mlp_act.
    aliases = calibration.linear_inputs
    assert aliases["transformer_blocks.0.attn.to_v"] == "transformer_blocks.0.attn.to_q"
    assert aliases["transformer_blocks.0.attn.add_v_proj"] == "transformer_blocks.0.attn.add_q_proj"
    assert aliases["single_transformer_blocks.0.attn.to_v"] == "single_transformer_blocks.0.attn.to_q"
    assert calibration.input_moment("single_transformer_blocks.0.act_mlp")[0].shape == (384, 384)
    assert calibration.propagation and set(calibration.propagation) == set(sites.blocks)
    # the head outputs every VO reader reads (to_out.0 / to_add_out: img_attn.proj / txt_attn.proj; a single
    # block's linear2 attention columns), which the default slimming refits its readers against
    for site in sites.attention:
        for path in site.output_paths:
            moment = calibration.head_output_moment(path)[0]
            assert moment.shape == (site.heads, site.head_dim, site.head_dim) and moment.diagonal(0, 1, 2).gt(0).all()
    skipped = dict(find_sites_view(flux).skipped)
    assert "QK-norm and RoPE" in skipped["transformer_blocks.0.attn:qk"]
    assert_group_influence_measured_and_weights_restored(flux)


def find_sites_view(env):
    from comfyui_nodes import comfy_dit

    base = env["model"].model
    return find_sites(comfy_dit.build_view(base.diffusion_model, base.model_config.unet_config, comfy_dit.FLUX).root)


def test_full_rank_slim_reproduces_the_dense_model(flux):
    inputs = load_file(str(flux["fixtures"] / "flux_inputs.safetensors"))
    full, _ = slim(flux, 1.0)
    assert relative(forward(full, inputs), forward(flux["model"], inputs)) < 1e-4
    assert relative(sample(full, flux), sample(flux["model"], flux)) < 1e-4


def test_slim_is_independent_smaller_and_leaves_the_input_untouched(flux):
    model = flux["model"]
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    dense = sample(model, flux)
    slimmed, text = slim(flux, 0.6)
    assert "M ->" in text
    assert "allocation sis, refinement exchange (auto)" in text  # the node's default, resolved for Flux
    dm = slimmed.model.diffusion_model
    assert sum(p.numel() for p in dm.parameters()) < sum(p.numel() for p in model.model.diffusion_model.parameters())
    out = sample(slimmed, flux)
    assert torch.isfinite(out).all() and 1e-4 < relative(out, dense) < 0.5
    # Attention only: every fused layer's V part is narrowed (at this budget the allocator may spend 0.6 on the
    # feed-forwards alone).
    slimmed, _ = slim(flux, 0.6, targets="attention")
    dm = slimmed.model.diffusion_model
    spec = dm.slimdiff_spec
    assert not spec.feed_forward and any(a.vo_rank < a.head_dim for a in spec.attention.values())
    assert all(a.qk_rank == a.head_dim for a in spec.attention.values())  # QK whole: QK-norm and RoPE
    for index, block in enumerate(dm.double_blocks):
        attention = spec.attention[f"transformer_blocks.{index}.attn"]
        for attn in (block.img_attn, block.txt_attn):
            # q and k whole, v narrowed: the fused layer holds 2·96 + heads·vo rows and writes 3·96 columns
            assert attn.qkv.weight.shape[0] == 2 * 96 + 3 * attention.vo_rank
            assert attn.proj.weight.shape[1] == 3 * attention.vo_rank
            if attention.vo_rank < attention.head_dim:
                assert attn.qkv.slim_full_out == 3 * 96 and len(attn.proj.slim_in_index) == 3 * attention.vo_rank
    for index, block in enumerate(dm.single_blocks):
        attention = spec.attention[f"single_transformer_blocks.{index}.attn"]
        assert block.linear1.weight.shape[0] == 2 * 96 + 3 * attention.vo_rank + 384
        assert block.linear2.weight.shape[1] == 3 * attention.vo_rank + 384
    out = sample(slimmed, flux)
    assert torch.isfinite(out).all() and 1e-4 < relative(out, dense) < 0.5
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(sample(model, flux), dense)


@pytest.mark.parametrize("targets", ["attention+ffn", "attention"])
def test_save_and_reload_is_pixel_identical_and_loads_in_diffusers(flux, targets):
    slimmed, _ = slim(flux, 0.6, targets=targets)
    with torch.inference_mode():
        saved = node("SlimSaveModel").execute(slimmed, "tier1/flux", "slim_models")
    name = f"tier1/{saved.ui['slim_models'][0]['filename']}"
    with torch.inference_mode():
        loaded = node("SlimLoadModel").execute(name).args[0]
    assert type(loaded.model.model_config).__name__ == "FluxSchnell"
    assert torch.equal(sample(loaded, flux), sample(slimmed, flux))
    reference = slimmed.model.diffusion_model.state_dict()
    state = loaded.model.diffusion_model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    # The file is in diffusers' names with the diffusers config: diffusers loads it and computes the same.
    path = Path(folder_paths.get_full_path("slim_models", name))
    _, spec, metadata = load_slim_file(path)
    assert metadata["slimdiff.key_layout"] == "diffusers"
    assert metadata["slimdiff.base_config"]["_class_name"] == "FluxTransformer2DModel"
    inputs_path = flux["fixtures"] / "flux_inputs.safetensors"
    out_path = flux["fixtures"] / f"comfy_made_in_diffusers_{targets.replace('+', '_')}.safetensors"
    diffusers_side("eval", str(path), str(inputs_path), str(out_path))
    inputs = load_file(str(inputs_path))
    assert relative(forward(loaded, inputs), load_file(str(out_path))["out"]) < 1e-5


@pytest.mark.parametrize("name", ["flux_full", "flux_slim06"])
def test_file_slimmed_in_diffusers_loads_and_matches(flux, name):
    inputs = load_file(str(flux["fixtures"] / "flux_inputs.safetensors"))
    outputs = load_file(str(flux["fixtures"] / "flux_outputs.safetensors"))
    with torch.inference_mode():
        loaded = node("SlimLoadModel").execute(install(flux["fixtures"], name)).args[0]
    out = forward(loaded, inputs)
    assert relative(out, outputs[name]) < 1e-5  # the same slim model, in ComfyUI's fused layers
    if name == "flux_full":
        assert relative(out, outputs["dense"]) < 1e-4
        assert relative(forward(flux["model"], inputs), outputs["dense"]) < 1e-5  # the key maps agree
    else:
        assert sum(p.numel() for p in loaded.model.diffusion_model.parameters()) < \
            sum(p.numel() for p in flux["model"].model.diffusion_model.parameters())
    assert torch.isfinite(sample(loaded, flux)).all()


@pytest.mark.parametrize("mode,memory", [("lowvram", 2**19), ("novram", 0.1)])
def test_partial_loading_of_a_slim_flux_gives_the_same_output(flux, mode, memory):
    """ComfyUI's partial loading (the call load_models_gpu makes under --lowvram / --novram; on a CPU device
    ComfyUI never takes that branch itself) casts the slim layers' weights per call: same output as a full load."""
    inputs = load_file(str(flux["fixtures"] / "flux_inputs.safetensors"))
    with torch.inference_mode():
        patcher = node("SlimLoadModel").execute(install(flux["fixtures"], "flux_slim06")).args[0]

    def run(lowvram_memory: float) -> torch.Tensor:
        comfy.model_management.unload_all_models()
        loaded = comfy.model_management.LoadedModel(patcher)
        loaded.model_load(lowvram_model_memory=lowvram_memory)
        try:
            assert patcher.model.model_lowvram == bool(lowvram_memory)
            return forward(patcher, inputs)
        finally:
            loaded.model_unload()

    assert torch.equal(run(memory), run(0))


def test_slimming_a_slim_transformer_is_refused(flux):
    slimmed, _ = slim(flux, 0.6)
    with pytest.raises(UnsupportedModelError, match="already slim"):
        slim(flux, 0.6, model=slimmed)


def test_damaged_transformer_file_is_a_clear_error(flux, tmp_path):
    from slimdiff_diffusers.core import save_slim_file

    state, spec, metadata = load_slim_file(flux["fixtures"] / "flux_slim06.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("single_transformer_blocks.0.proj_mlp")}
    folder = Path(folder_paths.get_folder_paths("slim_models")[0]) / "flux"
    folder.mkdir(parents=True, exist_ok=True)
    save_slim_file(folder / "damaged.safetensors", state, spec, key_layout="diffusers",
                   base_config=metadata["slimdiff.base_config"])
    with pytest.raises(SlimFileError, match="damaged.safetensors"):
        node("SlimLoadModel").execute("flux/damaged.safetensors")


# ---------------------------------------------------------------------------------------------------
# SD3 / SD3.5 (MMDiT)
# ---------------------------------------------------------------------------------------------------


def sd3_forward(patcher, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return patcher.model.diffusion_model(inputs["x"], inputs["t"] * 1000, context=inputs["context"],
                                             y=inputs["pooled"])


@pytest.fixture(scope="module")
def sd3(pack, tmp_path_factory):
    fixtures = tmp_path_factory.mktemp("sd3_fixtures")
    diffusers_side("make-sd3", str(fixtures))
    diffusers_side("make-sd35", str(fixtures))
    folder = Path(folder_paths.get_folder_paths("diffusion_models")[0])
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(fixtures / "sd3_dense.safetensors", folder / "tiny_sd3.safetensors")
    with torch.inference_mode():
        model = nodes.UNETLoader().load_unet("tiny_sd3.safetensors", "default")[0]  # ComfyUI's stock loader
    generator = torch.Generator().manual_seed(6)
    context, pooled = torch.randn(1, 12, 32, generator=generator), torch.randn(1, 32, generator=generator)
    return calibrated_env(model, fixtures, {"samples": torch.full((1, 16, 16, 16), 0.5)},
                          [[context, {"pooled_output": pooled}]],
                          [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled)}]],
                          cfg=3.0, scheduler="simple")


@pytest.mark.parametrize("name", ["sd3_full", "sd3_slim06", "sd35_full", "sd35_slim06"])
def test_sd3_file_slimmed_in_diffusers_loads_and_matches(sd3, name):
    family = name.split("_")[0]
    inputs = load_file(str(sd3["fixtures"] / f"{family}_inputs.safetensors"))
    outputs = load_file(str(sd3["fixtures"] / f"{family}_outputs.safetensors"))
    with torch.inference_mode():
        loaded = node("SlimLoadModel").execute(install(sd3["fixtures"], name)).args[0]
    assert type(loaded.model.model_config).__name__ == "SD3"
    out = sd3_forward(loaded, inputs)
    assert relative(out, outputs[name]) < 1e-5
    spec = loaded.model.diffusion_model.slimdiff_spec
    if family == "sd35":  # QK-norm: QK whole
        assert all(a.qk_rank == a.head_dim for a in spec.attention.values())
    if name.endswith("full"):
        assert relative(out, outputs["dense"]) < 1e-4
    assert torch.isfinite(sample(loaded, sd3)).all()


def test_sd3_calibrate_slim_save_load(sd3):
    model, calibration = sd3["model"], sd3["calibration"]
    assert [s.kind for s in calibration.sites.attention] == ["joint", "joint"]
    assert [s.has_add_out for s in calibration.sites.attention] == [True, False]  # the last block is context_pre_only
    assert_group_influence_measured_and_weights_restored(sd3)
    assert calibration.meta["num_forward_calls"] == STEPS
    inputs = load_file(str(sd3["fixtures"] / "sd3_inputs.safetensors"))
    full, slimmed = full_and_attention_slim(sd3)
    assert relative(sd3_forward(full, inputs), sd3_forward(model, inputs)) < 1e-4
    spec = slimmed.model.diffusion_model.slimdiff_spec
    # SD3 without QK-norm: q and k are narrowed too, padded back to the head width inside the fused qkv
    assert any(a.qk_rank < a.head_dim for a in spec.attention.values())
    block = slimmed.model.diffusion_model.joint_blocks[0]
    attention = spec.attention["transformer_blocks.0.attn"]
    assert block.x_block.attn.qkv.weight.shape[0] == 2 * (2 * attention.qk_rank) + 2 * attention.vo_rank
    loaded, diffusers_out = save_reload_and_run_in_diffusers(sd3, slimmed, "sd3")
    assert torch.equal(sample(loaded, sd3), sample(slimmed, sd3))
    assert relative(sd3_forward(loaded, inputs), diffusers_out) < 1e-5


# ---------------------------------------------------------------------------------------------------
# PixArt
# ---------------------------------------------------------------------------------------------------


def pixart_forward(patcher, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return patcher.model.diffusion_model(inputs["x"], inputs["t"] * 1000, context=inputs["context"])


def first_channels(reference: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return reference[:, : out.shape[1]]  # ComfyUI's PixArt returns the noise prediction without the sigma channels


@pytest.fixture(scope="module")
def pixart(pack, tmp_path_factory):
    from safetensors import safe_open

    from comfyui_nodes import comfy_dit
    from slimdiff_diffusers.core.spec import SlimSpec

    fixtures = tmp_path_factory.mktemp("pixart_fixtures")
    diffusers_side("make-pixart", str(fixtures))
    dense_path = fixtures / "pixart_dense.safetensors"
    with safe_open(str(dense_path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    unet_config = slim_format.pixart_unet_config(config)
    key_map = comfy_dit.key_map_of(comfy_dit.PIXART, unet_config)
    state, _ = slim_format.dit_to_comfy_state(load_file(str(dense_path)), SlimSpec(attention={}, feed_forward={}),
                                              key_map, dense_path.name)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, state)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model(state, "")
    base.load_model_weights(state, "")
    model = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    generator = torch.Generator().manual_seed(7)
    context = torch.randn(1, 10, 48, generator=generator)
    return calibrated_env(model, fixtures, {"samples": torch.zeros(1, 4, 64, 64)}, [[context, {}]],
                          [[torch.zeros_like(context), {}]], cfg=3.0, scheduler="normal")


@pytest.mark.parametrize("name", ["pixart_full", "pixart_slim06"])
def test_pixart_file_slimmed_in_diffusers_loads_and_matches(pixart, name):
    inputs = load_file(str(pixart["fixtures"] / "pixart_inputs.safetensors"))
    outputs = load_file(str(pixart["fixtures"] / "pixart_outputs.safetensors"))
    with torch.inference_mode():
        loaded = node("SlimLoadModel").execute(install(pixart["fixtures"], name)).args[0]
    assert type(loaded.model.model_config).__name__ == "PixArtSigma"
    out = pixart_forward(loaded, inputs)
    assert relative(out, first_channels(outputs[name], out)) < 1e-5
    if name == "pixart_full":
        assert relative(out, first_channels(outputs["dense"], out)) < 1e-4
        dense = pixart_forward(pixart["model"], inputs)
        assert relative(dense, first_channels(outputs["dense"], dense)) < 1e-5  # the key map agrees
    assert torch.isfinite(sample(loaded, pixart)).all()


def test_pixart_calibrate_slim_save_load(pixart):
    model, calibration = pixart["model"], pixart["calibration"]
    assert [(s.kind, s.is_cross) for s in calibration.sites.attention] == [("plain", False), ("plain", True)] * 2
    assert_group_influence_measured_and_weights_restored(pixart)
    # cross-attention keys and values read the text (one statistic, shared by every block, as in UNets)
    assert calibration.linear_inputs["transformer_blocks.1.attn2.to_v"] == "transformer_blocks.0.attn2.to_k"
    inputs = load_file(str(pixart["fixtures"] / "pixart_inputs.safetensors"))
    full, slimmed = full_and_attention_slim(pixart)
    assert relative(pixart_forward(full, inputs), pixart_forward(model, inputs)) < 1e-4
    spec = slimmed.model.diffusion_model.slimdiff_spec
    assert any(a.qk_rank < a.head_dim for a in spec.attention.values())  # no QK-norm: q/k narrowed and padded
    cross = spec.attention.get("transformer_blocks.0.attn2")
    block = slimmed.model.diffusion_model.blocks[0]
    if cross is not None:
        assert block.cross_attn.q_linear.weight.shape[0] == 2 * cross.qk_rank
        assert block.cross_attn.kv_linear.weight.shape[0] == 2 * (cross.qk_rank + cross.vo_rank)
    loaded, diffusers_out = save_reload_and_run_in_diffusers(pixart, slimmed, "pixart")
    assert torch.equal(sample(loaded, pixart), sample(slimmed, pixart))
    out = pixart_forward(loaded, inputs)
    assert relative(out, first_channels(diffusers_out, out)) < 1e-5


def test_stock_lora_loader_after_slim_is_refused_on_fused_layers(flux):
    """A LoRA made for the original Flux targets the fused qkv/proj layers SlimDiff narrowed: ComfyUI would skip
    those patches with a log line (sampling without them), so the stock loader's output is stopped at sampling,
    saying what to do."""
    import comfy.lora
    import comfy.utils
    import folder_paths
    from safetensors.torch import save_file

    from slimdiff_diffusers.core.errors import LoraMappingError

    model = flux["model"]
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    generator = torch.Generator().manual_seed(0)
    state = {}
    for lora_key, model_key in sorted(key_map.items()):
        if not isinstance(model_key, str) or not model_key.endswith(("img_attn.qkv.weight", "img_attn.proj.weight")):
            continue
        out_dim, in_dim = comfy.utils.get_attr(model.model, model_key).shape
        state |= {f"{lora_key}.lora_down.weight": torch.randn(2, in_dim, generator=generator),
                  f"{lora_key}.lora_up.weight": torch.randn(out_dim, 2, generator=generator) * 1e-2}
        if len(state) >= 8:
            break
    assert state, "no fused-layer LoRA key found"
    folder = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "slimdiff_flux_fused.safetensors"))
    slimmed, _ = slim(flux, 0.6, targets="attention")
    with torch.inference_mode():
        stock = nodes.LoraLoaderModelOnly().load_lora_model_only(slimmed, "slimdiff_flux_fused.safetensors", 1.0)[0]
    with pytest.raises(LoraMappingError, match="narrowed.*SlimDiff Load LoRA"):
        sample(stock, flux)
    # the dense model takes the same LoRA as ComfyUI always does
    with torch.inference_mode():
        dense = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "slimdiff_flux_fused.safetensors", 1.0)[0]
    assert torch.isfinite(sample(dense, flux)).all()


# ---------------------------------------------------------------------------------------------------
# SlimDiff Load LoRA on slim transformers: ComfyUI's patches of fused layers, split into diffusers' Linears
# ---------------------------------------------------------------------------------------------------

# The diffusers Linears of the transformer blocks a LoRA for the original model targets in the tests below.
BLOCK_LINEARS = re.compile(r"(transformer_blocks|single_transformer_blocks)\.\d+\.(attn[12]?\.(to_[qkv]|add_[qkv]_proj|"
                           r"to_out\.0|to_add_out)|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out|norm1\.linear)")
# Per family: its forward on the fixture inputs, and fused ComfyUI Linears a kohya-style LoRA patches as a whole.
LORA_FAMILIES = {
    "flux": (lambda patcher, inputs: forward(patcher, inputs), ("single_blocks.0.linear1", "single_blocks.0.linear2")),
    "sd3": (lambda patcher, inputs: sd3_forward(patcher, inputs), ("joint_blocks.0.x_block.attn.qkv",)),
    "pixart": (lambda patcher, inputs: pixart_forward(patcher, inputs),
               ("blocks.0.attn.qkv", "blocks.0.cross_attn.kv_linear")),
}


def original_lora(model, whole: tuple[str, ...], rank: int = 4, alpha: float = 8.0, seed: int = 0,
                  scale: float = 0.05) -> tuple[dict, dict]:
    """A random LoRA for the original (dense) transformer ``model``, as ComfyUI reads it and as the diffusers side
    reads it.

    ComfyUI's file mixes the formats ComfyUI turns into patches of fused layers: diffusers keys
    (``transformer.<Linear>``: patches of rows of a fused ``qkv``/``linear1``/``kv_linear``, whole patches of
    the others) and kohya keys (``lora_unet_<layer>``) of the ComfyUI Linears in ``whole``, each patched as a
    whole. The diffusers side gets the same updates in PEFT keys: a whole fused layer's rows split into the
    diffusers Linears it holds (one down factor), by ComfyUI's own key map."""
    from comfyui_nodes import comfy_dit

    model_config = model.model.model_config
    family = comfy_dit.family_of_unet_config(model_config.unet_config, type(model_config).__name__)
    key_map = comfy_dit.key_map_of(family, model_config.unet_config)
    diffusion_model = model.model.diffusion_model
    generator = torch.Generator().manual_seed(seed)

    def factors(out_dim: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.randn(rank, in_dim, generator=generator) / in_dim ** 0.5
        return down, torch.randn(out_dim, rank, generator=generator) * scale

    present = dict(diffusion_model.named_parameters())  # the key map also names layers of variants (SD3.5's attn2)

    def targets() -> list[tuple[str, str, slice]]:  # (diffusers Linear, ComfyUI Linear, its rows there)
        out = []
        for key, target in sorted(key_map.items()):
            module = key.removesuffix(".weight")
            name = target if isinstance(target, str) else target[0]
            if key.endswith(".weight") and BLOCK_LINEARS.fullmatch(module) and name in present and \
                    (isinstance(target, str) or target[1] is not None):
                rows = slice(None) if isinstance(target, str) else slice(target[1][1], target[1][1] + target[1][2])
                out.append((module, name.removesuffix(".weight"), rows))
        return out

    comfy_state, peft_state = {}, {}
    for module, layer, rows in targets():
        if layer in whole:
            continue
        weight = comfy.utils.get_attr(diffusion_model, f"{layer}.weight")
        down, up = factors(len(range(weight.shape[0])[rows]), weight.shape[1])
        comfy_state |= {f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up,
                        f"transformer.{module}.alpha": torch.tensor(alpha)}
        peft_state |= {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
    for layer in whole:
        down, up = factors(*comfy.utils.get_attr(diffusion_model, f"{layer}.weight").shape)
        kohya = f"lora_unet_{layer.replace('.', '_')}"
        comfy_state |= {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up,
                        f"{kohya}.alpha": torch.tensor(alpha)}
        parts = [(module, rows) for module, target, rows in targets() if target == layer]
        assert parts, f"{layer} holds no diffusers Linear"
        for module, rows in parts:
            peft_state |= {f"{module}.lora_A.weight": down.clone(),  # no shared storage in a safetensors file
                           f"{module}.lora_B.weight": up[rows].contiguous()}
    return comfy_state, peft_state


@pytest.fixture(scope="module")
def lora_files(pack) -> Callable[[str, dict], tuple[str, Path]]:
    """Writes the family's :func:`original_lora` once: (its name in models/loras, the PEFT file)."""
    made: dict[str, tuple[str, Path]] = {}

    def make(family: str, env: dict) -> tuple[str, Path]:
        from safetensors.torch import save_file

        if family not in made:
            comfy_state, peft_state = original_lora(env["model"], LORA_FAMILIES[family][1])
            folder = Path(folder_paths.get_folder_paths("loras")[0])
            folder.mkdir(parents=True, exist_ok=True)
            save_file(comfy_state, str(folder / f"slimdiff_{family}_original.safetensors"))
            peft_path = env["fixtures"] / f"{family}_lora_peft.safetensors"
            save_file(peft_state, str(peft_path), metadata={"lora_alpha": "8.0"})
            made[family] = (f"slimdiff_{family}_original.safetensors", peft_path)
        return made[family]
    return make


def patched_forward(family: str, patcher, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The family's forward with the MODEL's weight patches (LoRAs) applied, as sampling applies them."""
    comfy.model_management.load_models_gpu([patcher], force_patch_weights=True)
    return LORA_FAMILIES[family][0](patcher, inputs)


@pytest.mark.parametrize("family", list(LORA_FAMILIES))
def test_slimdiff_load_lora_at_full_rank_equals_the_stock_lora_on_the_original(request, lora_files, family):
    """At keep 1.0 the maps are invertible: the slim model with the LoRA SlimDiff Load LoRA mapped computes what the
    original computes with ComfyUI's own Load LoRA (an independent reference: no SlimDiff mapping code)."""
    env = request.getfixturevalue(family)
    name, _ = lora_files(family, env)
    inputs = load_file(str(env["fixtures"] / f"{family}_inputs.safetensors"))
    full, _ = slim(env, 1.0)
    with torch.inference_mode():
        mapped = node("SlimLoadLora").execute(full, name, 1.0).args[0]
        stock = nodes.LoraLoaderModelOnly().load_lora_model_only(env["model"], name, 1.0)[0]
    reference = patched_forward(family, stock, inputs)
    assert relative(reference, patched_forward(family, env["model"], inputs)) > 0.01  # the LoRA does something
    assert relative(patched_forward(family, mapped, inputs), reference) < 1e-4


@pytest.mark.parametrize("targets", ["attention", "attention+ffn"])
@pytest.mark.parametrize("family", list(LORA_FAMILIES))
def test_slimdiff_load_lora_maps_fused_patches_as_the_diffusers_side_does(request, lora_files, family, targets):
    """SlimDiff Load LoRA on a slim transformer: ComfyUI's patches of fused layers (whole, or rows of one part)
    and of the readers of narrowed columns are split into diffusers' Linears, mapped through the slimming's bases
    and put back in the slim layers' layout. The result computes what the diffusers side computes with the same
    slim weights, the same maps and the same LoRA (method.md §3.5), at keep 0.6 of the attention and of
    everything."""
    from slimdiff_diffusers.core.errors import LoraMappingError

    env = request.getfixturevalue(family)
    name, peft_path = lora_files(family, env)
    slimmed, _ = slim(env, 0.6, targets=targets)
    spec = slimmed.model.diffusion_model.slimdiff_spec
    assert any(a.vo_rank < a.head_dim for a in spec.attention.values()) or \
        any(f.width < f.inner_dim for f in spec.feed_forward.values())
    with torch.inference_mode():
        out = node("SlimLoadLora").execute(slimmed, name, 1.0)
    patched, text = out.args[0], out.ui.as_dict()["text"][0]
    assert "narrowed by SlimDiff" in text
    inputs_path = env["fixtures"] / f"{family}_inputs.safetensors"
    inputs = load_file(str(inputs_path))
    with_lora = patched_forward(family, patched, inputs)
    assert relative(with_lora, patched_forward(family, slimmed, inputs)) > 0.01  # the LoRA does something

    with torch.inference_mode():
        saved = node("SlimSaveModel").execute(slimmed, f"tier1/{family}_lora_{targets.replace('+', '_')}",
                                              "slim_models")
    file_name = f"tier1/{saved.ui['slim_models'][0]['filename']}"
    maps_path = env["fixtures"] / f"{family}_lora_maps.safetensors"
    slimmed.model.diffusion_model.slimdiff_basis_maps.save(maps_path, spec)
    out_path = env["fixtures"] / f"{family}_lora_in_diffusers.safetensors"
    diffusers_side("eval-lora", folder_paths.get_full_path("slim_models", file_name), str(maps_path),
                   str(peft_path), str(inputs_path), str(out_path))
    assert relative(with_lora, first_channels(load_file(str(out_path))["out"], with_lora)) < 1e-5

    # A slim MODEL loaded from the file has no maps: the same LoRA is refused, naming the way that works.
    with torch.inference_mode():
        loaded = node("SlimLoadModel").execute(file_name).args[0]
        with pytest.raises(LoraMappingError, match="no LoRA maps"):
            node("SlimLoadLora").execute(loaded, name, 1.0)
