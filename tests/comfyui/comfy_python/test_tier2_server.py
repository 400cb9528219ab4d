"""Tier 2 (opt-in): a real ComfyUI server with the pack; the example workflows' API twins through POST /prompt.

Runs only under ComfyUI's python with ``SLIMDIFF_IN_COMFY_PYTHON=1`` and ``COMFYUI_DIR`` (the launcher
``tests/comfyui/test_comfyui_optin.py`` does that). The server is always stopped by its PID.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("SLIMDIFF_IN_COMFY_PYTHON") != "1" or not os.environ.get("COMFYUI_DIR"):
    pytest.skip("tier 2 runs under COMFYUI_PYTHON via tests/comfyui/test_comfyui_optin.py", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import comfy_harness as harness  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = harness.prepare_base_dir(tmp_path_factory.mktemp("comfy_base"), harness.tiny_checkpoint())
    with harness.ComfyServer(base, base / "server.log") as srv:
        yield srv


def _assert_success(run: harness.PromptRun, server) -> None:
    assert run.status_code == 200, run.response
    assert run.response["node_errors"] == {}
    assert run.status == "success", f"{run.history.get('status')}\n{server.log_tail()}"


def _image(server, output: dict) -> np.ndarray:
    image = output["images"][0]
    return np.asarray(Image.open(server.base / "output" / image["subfolder"] / image["filename"]))


def test_object_info_lists_the_pack(server):
    info = server.get("/object_info")
    for node_id in ("SlimCalibrate", "SlimCalibratePrompts", "SlimModel", "SlimSaveModel", "SlimLoadModel"):
        assert info[node_id]["python_module"] == f"custom_nodes.{harness.PACK_NAME}"
    assert info["SlimSaveModel"]["output_node"] is True
    # workflows/ at the pack root is listed in the front end's Templates browser.
    templates = server.get("/api/workflow_templates")[harness.PACK_NAME]
    assert sorted(templates) == sorted(p.stem for p in (harness.REPO_ROOT / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def calibrate_slim_save(server):
    return server.run(harness.fast(harness.load_api_workflow("slimdiff_calibrate_slim_save"), steps=STEPS))


def test_calibrate_slim_save_workflow(server, calibrate_slim_save):
    run = calibrate_slim_save
    _assert_success(run, server)
    outputs = run.history["outputs"]
    assert "calibrated" in outputs["5"]["text"][0] and "M ->" in outputs["6"]["text"][0]
    saved = outputs["10"]["slim_models"][0]
    assert (server.base / "models" / "slim_models" / saved["subfolder"] / saved["filename"]).is_file()
    assert _image(server, outputs["9"]).shape[:2] == (128, 128)
    # Progress of the calibration node reaches the client for the whole node: the sampler steps, then every
    # replayed call of the propagation probe (each step and each probe call is also a cancellation point).
    progress = [m["data"] for m in run.messages if m["type"] == "progress" and m["data"]["node"] == "5"]
    total = progress[-1]["max"]
    assert [p["value"] for p in progress] == list(range(1, total + 1)) and total > STEPS
    assert all(p["max"] == total for p in progress)
    assert "propagation probe" in outputs["5"]["text"][0]


def test_reloaded_slim_model_reproduces_the_in_memory_one(server, calibrate_slim_save):
    _assert_success(calibrate_slim_save, server)
    run = server.run(harness.fast(harness.load_api_workflow("slimdiff_load_slim_model"), steps=STEPS))
    _assert_success(run, server)
    np.testing.assert_array_equal(_image(server, run.history["outputs"]["8"]),
                                  _image(server, calibrate_slim_save.history["outputs"]["9"]))


def test_prompt_list_workflow(server):
    run = server.run(harness.fast(harness.load_api_workflow("slimdiff_calibrate_prompt_list"), steps=4))
    _assert_success(run, server)
    assert "6 run(s) x 4 steps" in run.history["outputs"]["3"]["text"][0]


def test_interrupt_during_calibration(server):
    prompt = harness.fast(harness.load_api_workflow("slimdiff_calibrate_slim_save"), steps=STEPS)
    prompt["5"]["inputs"]["steps"] = 400
    prompt["5"]["inputs"]["seed"] = 7  # not cached from earlier runs
    run = server.run(prompt, interrupt_when=lambda m: m["type"] == "progress" and m["data"]["node"] == "5"
                     and m["data"]["value"] >= 2)
    interrupted = run.message("execution_interrupted")
    assert interrupted is not None, [m["type"] for m in run.messages]
    assert interrupted["node_id"] == "5" and interrupted["node_type"] == "SlimCalibrate"
    assert any(kind == "execution_interrupted" for kind, _ in run.history["status"]["messages"])


def test_calibration_of_another_model_is_an_execution_error(server):
    prompt = harness.fast(harness.load_api_workflow("slimdiff_calibrate_slim_save"), steps=STEPS)
    # The user patches the model after calibrating it: the calibration no longer describes its weights.
    prompt["20"] = {"class_type": "UNetSelfAttentionMultiply",
                    "inputs": {"model": ["1", 0], "q": 2.0, "k": 1.0, "v": 1.0, "out": 1.0}}
    prompt["6"]["inputs"]["model"] = ["20", 0]
    run = server.run(prompt)
    error = run.message("execution_error")
    assert error is not None, [m["type"] for m in run.messages]
    assert error["node_type"] == "SlimModel" and error["exception_type"].endswith("CalibrationMismatchError")
    assert "does not belong to the given model" in error["exception_message"]
    assert run.status == "error"


def test_validation_errors(server):
    prompt = harness.fast(harness.load_api_workflow("slimdiff_calibrate_slim_save"), steps=STEPS)
    prompt["6"]["inputs"]["keep_ratio"] = 5.0
    status, response = server.post("/prompt", {"prompt": prompt})
    assert status == 400 and "keep_ratio" in str(response["node_errors"])
    missing = harness.fast(harness.load_api_workflow("slimdiff_load_slim_model"))
    missing["1"]["inputs"]["slim_name"] = "nope.safetensors"
    status, response = server.post("/prompt", {"prompt": missing})
    assert status == 400
    assert "'nope.safetensors' is not a file in slim_models" in str(response["node_errors"]["1"])


# Tier 3 (browser): SLIMDIFF_PLAYWRIGHT_NODE_PATH (node_modules with playwright-core) and CHROMIUM run the
# real front end; SLIMDIFF_FRONTEND_ROOTS (os.pathsep-separated) names other comfyui-frontend-package versions
# to check beside the one ComfyUI pins, e.g. the newest release unpacked with
# `pip install --no-deps --target DIR comfyui-frontend-package`. Skip reasons start with "browser tier:"
# (tests/comfyui/test_comfyui_optin.py accepts those skips only while the tier is not configured).
NEEDS_BROWSER = pytest.mark.skipif(not os.environ.get("SLIMDIFF_PLAYWRIGHT_NODE_PATH"),
                                   reason="browser tier: set SLIMDIFF_PLAYWRIGHT_NODE_PATH (node_modules with "
                                          "playwright-core) and CHROMIUM")


def _front_end_roots() -> list[Path]:
    roots = []
    for entry in filter(None, os.environ.get("SLIMDIFF_FRONTEND_ROOTS", "").split(os.pathsep)):
        root = Path(entry)
        if (root / "comfyui_frontend_package" / "static").is_dir():  # a `pip install --target` folder
            root = root / "comfyui_frontend_package" / "static"
        assert (root / "index.html").is_file(), f"{entry} is not a comfyui-frontend-package (no static/index.html)"
        roots.append(root)
    return roots


def _check_workflows_in_front_end(url: str) -> str:
    """The shipped UI-format files open in the front end served at ``url``, with every node known, and the
    front end's own UI->API conversion gives exactly the API twins the server tests run."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / "frontend" / "build_workflows.mjs"
    env = dict(os.environ, NODE_PATH=os.environ["SLIMDIFF_PLAYWRIGHT_NODE_PATH"])
    result = subprocess.run(["node", str(script), url, "--check"], env=env, capture_output=True, text=True,
                            timeout=300)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("API twin matches") == len(list(harness.WORKFLOWS_API.glob("*.json")))
    # A workflow saved before SlimDiff Slim offered its SlimConfig combos loads with its values and their defaults.
    from comfyui_nodes.node_specs import SLIM_CONFIG_COMBOS

    removed = ", ".join(f"SlimModel.{name}" for name in SLIM_CONFIG_COMBOS)
    assert f"saved without {removed}: loads with the defaults" in result.stdout
    return result.stdout


@NEEDS_BROWSER
def test_ui_workflows_load_in_the_pinned_front_end(server, calibrate_slim_save):
    output = _check_workflows_in_front_end(server.url)
    assert "front end 1." in output


@NEEDS_BROWSER
@pytest.mark.skipif(not os.environ.get("SLIMDIFF_FRONTEND_ROOTS"),
                    reason="browser tier: set SLIMDIFF_FRONTEND_ROOTS to the newest comfyui-frontend-package")
def test_ui_workflows_load_in_other_front_ends(tmp_path_factory):
    for root in _front_end_roots():
        base = harness.prepare_base_dir(tmp_path_factory.mktemp("comfy_front_end"), harness.tiny_checkpoint())
        with harness.ComfyServer(base, base / "server.log", ("--front-end-root", str(root))) as srv:
            output = _check_workflows_in_front_end(srv.url)
        assert "front end 1." in output, output


# ---------------------------------------------------------------------------------------------------
# SD3 (MMDiT) through the server: ComfyUI's stock UNETLoader, Calibrate -> Slim -> KSampler -> Save, then Load
# ---------------------------------------------------------------------------------------------------


def _sd3_graph(model: dict, prefix: str, *, calibrate: bool) -> dict:
    """API graph: prompts encoded by the tiny checkpoint's CLIP-L (the tiny SD3 reads 768-wide text), a 16-channel
    SD3 latent, KSampler, SaveLatent (the latent itself: the tiny checkpoint's VAE has 4 channels)."""
    graph = {
        "1": model,
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": harness.CHECKPOINT_NAME}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "seed": 3, "steps": 4, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
            "model": ["7" if calibrate else "1", 0], "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["5", 0]}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": prefix}},
    }
    if calibrate:
        graph["6"] = {"class_type": "SlimCalibrate", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": 4, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0]}}
        graph["7"] = {"class_type": "SlimModel", "inputs": {
            "model": ["1", 0], "calibration": ["6", 0], "keep_ratio": 0.6, "params_to_remove_millions": 0.0,
            "targets": "attention+ffn"}}
        graph["10"] = {"class_type": "SlimSaveModel", "inputs": {
            "model": ["7", 0], "filename_prefix": "slimdiff/sd3_server", "destination": "slim_models"}}
    return graph


def _latent(server, output: dict):
    from safetensors.torch import load_file

    item = output["latents"][0]
    return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]


def test_sd3_calibrate_slim_save_then_load_is_pixel_identical(server, tmp_path_factory):
    import subprocess

    import torch

    python = os.environ.get("SLIMDIFF_DIFFUSERS_PYTHON")
    if not python:
        pytest.fail("SLIMDIFF_DIFFUSERS_PYTHON is not set: run these tiers through tests/comfyui/test_comfyui_optin.py")
    folder = server.base / "models" / "diffusion_models"
    subprocess.run([python, str(harness.REPO_ROOT / "tests" / "comfyui" / "diffusers_side.py"), "make-sd3-clip768",
                    str(folder)], check=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(harness.REPO_ROOT)))
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3_clip768.safetensors",
                                                   "weight_dtype": "default"}}
    run = server.run(_sd3_graph(unet, "slimdiff/sd3_in_memory", calibrate=True))
    _assert_success(run, server)
    outputs = run.history["outputs"]
    assert "calibrated 2 attentions + 3 feed-forwards" in outputs["6"]["text"][0]
    assert "M ->" in outputs["7"]["text"][0]
    saved = outputs["10"]["slim_models"][0]
    name = f"{saved['subfolder']}/{saved['filename']}" if saved["subfolder"] else saved["filename"]
    loaded = server.run(_sd3_graph({"class_type": "SlimLoadModel", "inputs": {"slim_name": name}},
                                   "slimdiff/sd3_reloaded", calibrate=False))
    _assert_success(loaded, server)
    in_memory, reloaded = _latent(server, outputs["9"]), _latent(server, loaded.history["outputs"]["9"])
    assert in_memory.shape == (1, 16, 16, 16) and torch.isfinite(in_memory).all()
    assert torch.equal(reloaded, in_memory)
