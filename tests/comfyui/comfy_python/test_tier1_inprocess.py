"""Tier 1 (opt-in): the pack loaded into a real ComfyUI in this process, nodes called directly.

Runs only under ComfyUI's python with ``SLIMDIFF_IN_COMFY_PYTHON=1`` and ``COMFYUI_DIR`` (the launcher
``tests/comfyui/test_comfyui_optin.py`` does that); skipped everywhere else.
"""
from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

if os.environ.get("SLIMDIFF_IN_COMFY_PYTHON") != "1" or not os.environ.get("COMFYUI_DIR"):
    pytest.skip("tier 1 runs under COMFYUI_PYTHON via tests/comfyui/test_comfyui_optin.py", allow_module_level=True)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, os.environ["COMFYUI_DIR"])
import comfy_harness as harness  # noqa: E402

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
from comfy.cli_args import args  # noqa: E402

args.cpu = True  # before comfy.model_management is imported
BASE = Path(os.environ.get("SLIMDIFF_TIER1_BASE") or (harness.cache_dir() / "tier1_base"))
args.base_directory = str(BASE)

import torch  # noqa: E402

torch.set_num_threads(1)

import comfy.lora  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
from comfy_extras.nodes_attention_multiply import UNetSelfAttentionMultiply  # noqa: E402
from comfy_extras.nodes_pag import PerturbedAttentionGuidance  # noqa: E402

from comfyui_nodes import comfy_models  # noqa: E402
from comfyui_nodes.node_specs import NODE_SPECS  # noqa: E402
from slimdiff_diffusers.core import (  # noqa: E402
    BudgetError,
    CalibrationMismatchError,
    ConfigError,
    SlimFileError,
    UnsupportedModelError,
    save_slim_file,
)

SIZE, STEPS = 128, 8


@pytest.fixture(scope="module")
def env():
    harness.prepare_base_dir(BASE, harness.tiny_checkpoint())
    assert asyncio.run(nodes.load_custom_node(str(harness.REPO_ROOT)))
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(harness.CHECKPOINT_NAME)[:3]
        positive = nodes.CLIPTextEncode().encode(clip, "a cat on a sofa")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
        weights_before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
        calibration = node("SlimCalibrate").execute(model, 0, STEPS, 7.0, "euler", "normal", positive, negative,
                                                    latent).args[0]
    return {"model": model, "clip": clip, "positive": positive, "negative": negative, "latent": latent,
            "calibration": calibration, "weights_before": weights_before}


def node(node_id: str):
    return nodes.NODE_CLASS_MAPPINGS[node_id]


def sample(model, env, seed: int = 1) -> torch.Tensor:
    with torch.inference_mode():
        return nodes.common_ksampler(model, seed, 4, 7.0, "euler", "normal", env["positive"], env["negative"],
                                     env["latent"])[0]["samples"]


def slim(env, model=None, keep_ratio=0.5, calibration=None, targets="attention+ffn", **options):
    with torch.inference_mode():
        out = node("SlimModel").execute(model or env["model"], calibration or env["calibration"], keep_ratio, 0.0, targets,
                                        **options)
    return out.args[0], out.ui.as_dict()["text"][0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_nodes_are_registered_with_the_spec_interfaces(env):
    for spec in NODE_SPECS:
        cls = node(spec.node_id)
        info = cls.GET_NODE_INFO_V1()
        assert info["display_name"] == spec.display_name
        assert info["input_order"]["required"] == [i.name for i in spec.inputs if not i.optional]
        assert info["input_order"].get("optional", []) == [i.name for i in spec.inputs if i.optional]
        for item in spec.inputs:
            io_type, options = info["input"]["optional" if item.optional else "required"][item.name]
            assert io_type == item.type
            if item.default is not None:
                assert options.get("default") == item.default, item.name
            if item.control_after_generate:
                assert options["control_after_generate"] is True
        assert info["output"] == [o.type for o in spec.outputs]
        assert info["output_name"] == [o.name for o in spec.outputs]
        assert info["output_node"] == spec.is_output_node
        assert info["python_module"].startswith("custom_nodes.")
    samplers = node("SlimCalibrate").GET_NODE_INFO_V1()["input"]["required"]["sampler_name"][1]["options"]
    assert "euler" in samplers and "dpmpp_2m" in samplers


def test_calibration_records_every_step(env):
    calibration = env["calibration"]
    assert calibration.meta["num_forward_calls"] == STEPS  # cond+uncond batched in one call per step
    assert calibration.meta["comfyui"]["model_config"] == "SD15"
    assert calibration.propagation and set(calibration.propagation) == set(calibration.sites.blocks)
    # each group's influence, measured by slimming it in place in the loaded UNet, whose weights are then
    # bit-identical to the input MODEL's before calibration
    groups = {f"{s.name}:{kind}" for s in calibration.sites.attention for kind in ("qk", "vo")} | \
        {f"{s.name}:ffn" for s in calibration.sites.feed_forward}
    assert set(calibration.group_influence) == groups and all(v > 0 for v in calibration.group_influence.values())
    after = env["model"].model.diffusion_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in env["weights_before"].items())


def test_full_rank_slim_reproduces_the_dense_model(env):
    # Uniform head layout with the softmax scale folded into to_q, on ComfyUI's own attention backend.
    full, _ = slim(env, keep_ratio=1.0)
    assert relative(sample(full, env), sample(env["model"], env)) < 1e-3


def test_slim_returns_an_independent_model_and_leaves_the_input_untouched(env):
    model = env["model"]
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    lora_keys_before = len(comfy.lora.model_lora_keys_unet(model.model))
    with torch.inference_mode():
        patch_count = len(UNetSelfAttentionMultiply.execute(model, 1.5, 1.0, 1.0, 1.0).args[0].patches)
    dense_before = sample(model, env)
    slimmed, text = slim(env)
    assert "M ->" in text and "parameters" in text
    assert slimmed.model is not model.model
    slim_unet, dense_unet = slimmed.model.diffusion_model, model.model.diffusion_model
    assert sum(p.numel() for p in slim_unet.parameters()) < sum(p.numel() for p in dense_unet.parameters())
    for path, attention in slim_unet.slimdiff_spec.attention.items():
        assert slim_unet.get_submodule(path).to_q.out_features == attention.heads * attention.qk_width
        assert dense_unet.get_submodule(path).to_q.out_features == attention.heads * attention.head_dim
    sample(slimmed, env)  # loads the slim model (evicting nothing it shares)
    after = model.model.diffusion_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(sample(model, env), dense_before)
    # Patches applied to the original afterwards still find every key (see docs/comfyui.md §4.2 pitfall).
    with torch.inference_mode():
        patched = UNetSelfAttentionMultiply.execute(model, 1.5, 1.0, 1.0, 1.0).args[0]
    assert len(patched.patches) == patch_count > 0
    assert len(comfy.lora.model_lora_keys_unet(model.model)) == lora_keys_before


def test_patches_applied_before_slim_are_baked_in(env):
    with torch.inference_mode():
        patched = UNetSelfAttentionMultiply.execute(env["model"], 1.3, 1.0, 0.8, 1.0).args[0]
        calibration = node("SlimCalibrate").execute(patched, 0, STEPS, 7.0, "euler", "normal", env["positive"],
                                                    env["negative"], env["latent"]).args[0]
    full, text = slim(env, model=patched, keep_ratio=1.0, calibration=calibration)
    assert "weight patches (LoRA) baked in" in text
    patched_dense = sample(patched, env)
    assert relative(sample(full, env), patched_dense) < 1e-3
    assert relative(sample(env["model"], env), patched_dense) > 1e-3


def test_attention_patches_run_on_the_slim_model(env):
    slimmed, _ = slim(env)
    with torch.inference_mode():
        pag = PerturbedAttentionGuidance.execute(slimmed, 3.0).args[0]  # attn1 replace patch in the middle block
        multiplied = UNetSelfAttentionMultiply.execute(slimmed, 1.2, 1.0, 1.0, 1.0).args[0]
        dense_patch_count = len(UNetSelfAttentionMultiply.execute(env["model"], 1.2, 1.0, 1.0, 1.0).args[0].patches)
    base = sample(slimmed, env)
    for patched in (pag, multiplied):
        out = sample(patched, env)
        assert torch.isfinite(out).all() and relative(out, base) > 1e-4
    assert len(multiplied.patches) == dense_patch_count  # narrowed layers keep their names: patches still apply


def test_save_and_reload_is_bit_identical_and_fingerprinted(env):
    slimmed, _ = slim(env)
    with torch.inference_mode():
        saved = node("SlimSaveModel").execute(slimmed, "tier1/roundtrip", "slim_models")
    name = f"tier1/{saved.ui['slim_models'][0]['filename']}"
    assert name in folder_paths.get_filename_list("slim_models")
    assert node("SlimLoadModel").validate_inputs(name) is True
    fingerprint = node("SlimLoadModel").fingerprint_inputs(name)
    with torch.inference_mode():
        loaded = node("SlimLoadModel").execute(name).args[0]
    assert torch.equal(sample(loaded, env), sample(slimmed, env))
    path = Path(folder_paths.get_full_path("slim_models", name))
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # like ComfyUI's own outputs, not mkstemp's 0600
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert node("SlimLoadModel").fingerprint_inputs(name) != fingerprint


def test_interrupt_during_calibration(env):
    comfy.model_management.interrupt_current_processing(True)
    try:
        with torch.inference_mode(), pytest.raises(comfy.model_management.InterruptProcessingException):
            node("SlimCalibrate").execute(env["model"], 0, 50, 7.0, "euler", "normal", env["positive"],
                                          env["negative"], env["latent"])
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_calibration_of_another_model_is_refused(env):
    with torch.inference_mode():
        other = UNetSelfAttentionMultiply.execute(env["model"], 2.0, 1.0, 1.0, 1.0).args[0]
    with pytest.raises(CalibrationMismatchError, match="SlimDiff Slim: .*does not belong.*different weights"):
        slim(env, model=other)
    slimmed, _ = slim(env)
    with pytest.raises(CalibrationMismatchError, match="different layer structure"):
        slim(env, model=slimmed)


def test_unsupported_family_is_a_clear_error(env):
    # A MODEL whose diffusion model is not ComfyUI's UNetModel, built the way ComfyUI_TensorRT builds its
    # MODELs (disable_unet_model_creation + a custom diffusion_model): a real pattern, not a mock.
    config = comfy.supported_models.SD15({"disable_unet_model_creation": True, "context_dim": 768, "model_channels": 320,
                                          "use_linear_in_transformer": False, "adm_in_channels": None,
                                          "in_channels": 4})
    base = config.get_model({})
    base.diffusion_model = torch.nn.Linear(4, 4)
    foreign = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(UnsupportedModelError, match="SlimDiff Slim: .*SD1.x, SD2.x and SDXL"):
        slim(env, model=foreign)
    with torch.inference_mode(), pytest.raises(UnsupportedModelError, match="SlimDiff Calibrate: .*not supported"):
        node("SlimCalibrate").execute(foreign, 0, 1, 7.0, "euler", "normal", env["positive"], env["negative"], env["latent"])


def test_budget_errors(env):
    with torch.inference_mode(), pytest.raises(BudgetError, match="SlimDiff Slim: params_to_remove"):
        node("SlimModel").execute(env["model"], env["calibration"], 0.5, 1000.0, "attention+ffn")
    with torch.inference_mode(), pytest.raises(BudgetError, match="keep_ratio must be in"):
        node("SlimModel").execute(env["model"], env["calibration"], 0.0, 0.0, "attention+ffn")


def test_allocation_refinement_reaches_the_core_and_the_node_says_what_ran(env):
    # Left out (as in prompts made before the node offered it): SlimConfig's "auto", which runs none on UNets.
    default, text = slim(env, keep_ratio=0.5)
    report = default.model.diffusion_model.slimdiff_report
    assert (report.config["allocation_refinement"], report.allocation_refinement) == ("auto", "none")
    assert "allocation sis, refinement none (auto), influence measured" in text
    chosen, text = slim(env, keep_ratio=0.5, allocation_refinement="exchange")
    report = chosen.model.diffusion_model.slimdiff_report
    assert (report.config["allocation_refinement"], report.allocation_refinement) == ("exchange", "exchange")
    assert "allocation sis, refinement exchange, influence measured;" in text or \
        text.endswith("allocation sis, refinement exchange, influence measured")
    # exchange first spends what the descent left unused: never fewer kept parameters than the descent alone
    assert report.compressible_params_after >= default.model.diffusion_model.slimdiff_report.compressible_params_after
    with pytest.raises(ConfigError, match="SlimDiff Slim: allocation_refinement must be one of"):
        slim(env, keep_ratio=0.5, allocation_refinement="greedy")


def test_vo_output_refit_reaches_the_core_and_the_node_says_what_ran(env):
    # "auto" keeps the SVD factor of a UNet's (plain) attention; "attention_output" refits its readers, which the
    # Calibrate node's statistics allow (it collects every attention's head outputs); the widths stay the same.
    default, text = slim(env, keep_ratio=0.5)
    report = default.model.diffusion_model.slimdiff_report
    assert report.vo_output_refit == {"plain": "none"} and "VO readers" not in text
    refit, text = slim(env, keep_ratio=0.5, vo_output_refit="attention_output")
    report = refit.model.diffusion_model.slimdiff_report
    assert report.config["vo_output_refit"] == "attention_output"
    assert report.vo_output_refit == {"plain": "attention_output"} and "VO readers refit by least squares" in text
    assert comfy_models.spec_of(refit).to_dict() == comfy_models.spec_of(default).to_dict()
    before, after = default.model.diffusion_model.state_dict(), refit.model.diffusion_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".to_out.0." in k for k in changed), sorted(changed)[:5]
    with pytest.raises(ConfigError, match="SlimDiff Slim: vo_output_refit must be one of"):
        slim(env, keep_ratio=0.5, vo_output_refit="least_squares")


def test_prompt_list_calibration(env):
    with torch.inference_mode():
        with pytest.raises(ValueError, match="prompt list is empty"):
            node("SlimCalibratePrompts").execute(env["model"], env["clip"], " \n\n", "", 0, 2, 7.0, "euler", "normal",
                                                 env["latent"])
        out = node("SlimCalibratePrompts").execute(env["model"], env["clip"], "a cat\n\na dog\n", "blurry", 3, 2,
                                                   7.0, "euler", "normal", env["latent"])
    calibration = out.args[0]
    assert calibration.meta["comfyui"]["runs"] == 2 and calibration.meta["num_forward_calls"] == 4
    assert "2 run(s) x 2 steps" in out.ui.as_dict()["text"][0]


def test_save_refuses_a_model_that_is_not_slim(env):
    with torch.inference_mode(), pytest.raises(ValueError, match="not a SlimDiff model"):
        node("SlimSaveModel").execute(env["model"], "tier1/dense", "slim_models")


def test_bad_files_are_clear_errors(env):
    folder = BASE / "models" / "slim_models" / "tier1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(folder / "foreign.safetensors"))
    for name, message in (("tier1/corrupt.safetensors", "corrupt.safetensors"),
                          ("tier1/foreign.safetensors", "foreign.safetensors.*not a SlimDiff")):
        with torch.inference_mode(), pytest.raises(SlimFileError, match=f"SlimDiff Load Slim Model: .*{message}"):
            node("SlimLoadModel").execute(name)
    message = node("SlimLoadModel").validate_inputs("tier1/missing.safetensors")
    assert isinstance(message, str) and "missing.safetensors" in message


def test_diffusers_layout_of_an_unknown_unet_is_a_clear_error(env):
    # ComfyUI recognises diffusers UNets by their full configuration (SD1.x/2.x/XL); a tiny one is unknown.
    slimmed, _ = slim(env)
    unet = slimmed.model.diffusion_model
    key_map = comfy.utils.unet_to_diffusers(slimmed.model.model_config.unet_config)  # diffusers -> ldm
    to_diffusers = {v: k for k, v in key_map.items()}
    state = {to_diffusers[k]: v for k, v in unet.state_dict().items() if k in to_diffusers}
    from comfyui_nodes import slim_format
    spec = slim_format.rename_spec(unet.slimdiff_spec, to_diffusers, "x")
    path = BASE / "models" / "slim_models" / "tier1" / "diffusers_tiny.safetensors"
    save_slim_file(path, state, spec, key_layout="diffusers", base_config={})
    with torch.inference_mode(), pytest.raises(UnsupportedModelError, match="diffusers_tiny.safetensors.*does not recognise"):
        node("SlimLoadModel").execute("tier1/diffusers_tiny.safetensors")


# The tiny checkpoint's UNet as a diffusers UNet2DConditionModel config.
TINY_DIFFUSERS_CONFIG = {
    "block_out_channels": [320, 320], "layers_per_block": 1, "attention_head_dim": 8, "cross_attention_dim": 768,
    "in_channels": 4, "out_channels": 4, "use_linear_projection": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def test_diffusers_layout_file_loads_and_matches(env):
    from comfyui_nodes import slim_format

    slimmed, _ = slim(env)
    unet = slimmed.model.diffusion_model
    comfy_config = slimmed.model.model_config.unet_config
    mapped = slim_format.ldm_unet_config_from_diffusers(TINY_DIFFUSERS_CONFIG)
    assert {k: comfy_config.get(k) for k in mapped if k != "num_head_channels"} == \
        {k: v for k, v in mapped.items() if k != "num_head_channels"}
    # Write the file the diffusers side would write: diffusers key names (ComfyUI's own map, inverted).
    to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(comfy_config).items()}
    state = {to_diffusers[k]: v for k, v in unet.state_dict().items()}
    spec = slim_format.rename_spec(unet.slimdiff_spec, to_diffusers, "x")
    path = BASE / "models" / "slim_models" / "tier1" / "from_diffusers.safetensors"
    save_slim_file(path, state, spec, key_layout="diffusers", base_config=TINY_DIFFUSERS_CONFIG)
    with torch.inference_mode():
        loaded = node("SlimLoadModel").execute("tier1/from_diffusers.safetensors").args[0]
    assert type(loaded.model.model_config).__name__ == "SD15"
    assert torch.equal(sample(loaded, env), sample(slimmed, env))


# --------------------------------------------------------------------------------------------------
# Loading through ComfyUI's own loader, and ComfyUI's partial ("lowvram"/"novram") loading
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slim_file(env):
    slimmed, _ = slim(env)
    with torch.inference_mode():
        saved = node("SlimSaveModel").execute(slimmed, "tier1/lowvram", "slim_models")
    return slimmed, f"tier1/{saved.ui['slim_models'][0]['filename']}"


def load(name: str):
    with torch.inference_mode():
        return node("SlimLoadModel").execute(name).args[0]


def test_loader_is_comfyuis_with_shape_taking_operations(env, slim_file):
    slimmed, name = slim_file
    loaded = load(name)
    assert type(loaded) is comfy.model_patcher.ModelPatcher
    assert type(loaded.model.model_config).__name__ == "SD15"
    # Set by comfy.sd.load_diffusion_model_state_dict from model_options (ComfyUI imports the pack under a
    # module name made from its path, hence the comparison by name).
    SlimOps = loaded.model.model_config.custom_operations
    assert SlimOps.__module__.endswith("comfyui_nodes.slim_ops") and SlimOps.__name__ == "SlimOps"
    assert issubclass(SlimOps, comfy.ops.manual_cast)
    unet = loaded.model.diffusion_model
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, SlimOps.Linear) and m.weight is not None for m in linears)
    # Exactly the slim model's tensors: the narrowed layers were never allocated at their dense size.
    reference = slimmed.model.diffusion_model.state_dict()
    loaded_state = unet.state_dict()
    assert loaded_state.keys() == reference.keys()
    assert all(loaded_state[k].shape == reference[k].shape and torch.equal(loaded_state[k], reference[k])
               for k in reference)
    assert unet.slimdiff_spec == slimmed.model.diffusion_model.slimdiff_spec


def _denoise_once(patcher, env, lowvram_memory: float = 0) -> torch.Tensor:
    """One UNet call after ComfyUI loaded ``patcher`` with the given weight budget.

    ``LoadedModel.model_load(lowvram_memory)`` is the call ``load_models_gpu`` makes: with ``--lowvram`` a
    budget in bytes, with ``--novram`` 0.1; 0 is a full load. On a CPU device ComfyUI never takes that branch
    itself (``VRAMState.DISABLED``), so the test makes the call directly to run the partial-loading code.
    """
    comfy.model_management.unload_all_models()
    loaded = comfy.model_management.LoadedModel(patcher)
    loaded.model_load(lowvram_model_memory=lowvram_memory)
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=generator)
        with torch.inference_mode():
            out = patcher.model.apply_model(x, torch.tensor([3.0]), c_crossattn=env["positive"][0][0])
        lowvram_modules = sum(1 for m in patcher.model.modules() if hasattr(m, "prev_comfy_cast_weights"))
        assert (lowvram_modules > 0) == bool(lowvram_memory), lowvram_modules
        assert patcher.model.model_lowvram == bool(lowvram_memory)
        return out
    finally:
        loaded.model_unload()


@pytest.mark.parametrize("mode,memory", [("lowvram", 2 * 2**20), ("novram", 0.1)])
def test_partial_loading_gives_the_same_output(env, slim_file, mode, memory):
    slimmed, name = slim_file
    with torch.inference_mode():
        loaded_patched = UNetSelfAttentionMultiply.execute(load(name), 1.3, 1.0, 0.8, 1.0).args[0]
    for patcher in (env["model"], slimmed, load(name), loaded_patched):  # dense control, in-memory, from file
        full = _denoise_once(patcher, env)
        partial = _denoise_once(patcher, env, memory)
        assert torch.isfinite(full).all() and torch.equal(partial, full), (mode, patcher)
    assert not torch.equal(_denoise_once(loaded_patched, env), _denoise_once(load(name), env))  # the patch applied


def test_pack_imports_nothing_comfyui_lacks(env):
    # The pack needs only torch and safetensors inside ComfyUI (requirements.txt); after loading it and
    # running its nodes, none of the diffusers-side libraries may have been imported (huggingface_hub is not
    # checked: ComfyUI's transformers imports it).
    assert not {"diffusers", "matplotlib", "slimdiff_diffusers.diffusers_adapter"} & set(sys.modules)
