"""benchmarks/stack.py's embedded-model workloads sample as the model was trained, calibration included.

The stack benchmark measures what a slim model loses; calibrating it in another setting than the one it is
evaluated in (flux-tiny: without its true CFG) would measure a different slimming than `slimdiff slim` makes.
Both take the sampler from the embedded-model registry; these tests hold them to it.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
from conftest import ROOT
from tiny_models import NegativeBranchRecorder

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import stack  # noqa: E402
from slimdiff_diffusers.cli import _generation, build_parser  # noqa: E402
from slimdiff_diffusers.default_model import EMBEDDED_MODELS  # noqa: E402

MODEL_NAMES = {"default": "sd-tiny", "flux-tiny": "flux-tiny"}


def _args(**overrides) -> types.SimpleNamespace:
    return types.SimpleNamespace(**({"eval_prompts": 2, "eval_seeds": 1, "steps": 3, "cal_prompts": 4} | overrides))


@pytest.mark.parametrize("model", ["default", "flux-tiny"])
def test_stack_calibrates_with_the_cli_sampler(model, monkeypatch):
    """The workload's calibration passes calibrate_pipeline what `slimdiff slim NAME --steps 3` passes: the
    registry's sampler (flux-tiny: true CFG 4 against the empty caption, 32x32, 16 T5 tokens)."""
    import slimdiff_diffusers.diffusers_adapter.pipeline as pipeline_module

    seen: dict = {}

    def spy(pipe, slimset, **kwargs):
        seen.update(kwargs)
        return "calibration"

    monkeypatch.setattr(pipeline_module, "calibrate_pipeline", spy)
    workload = stack.MODELS[model](_args(), torch.device("cpu"), torch.float32)
    assert workload.calibrate() == "calibration"
    name = MODEL_NAMES[model]
    cli_args = build_parser().parse_args(["calibrate", name, "--steps", "3"])
    expected = _generation(cli_args, workload.pipe, name)
    assert {k: v for k, v in seen.items() if k != "progress"} == expected
    assert expected == EMBEDDED_MODELS[name].generation_kwargs(num_inference_steps=3)
    # and the evaluation images are generated with the same sampler, one negative prompt per prompt
    generation = stack._pipeline_kwargs(workload, 0, 2)
    assert {k: v for k, v in generation.items() if k not in ("generator", "prompt")} == \
        EMBEDDED_MODELS[name].generation_kwargs(num_inference_steps=3, batch_size=2)
    if model == "flux-tiny":
        assert seen["true_cfg_scale"] == 4.0 and seen["negative_prompt"] == ""
        assert generation["negative_prompt"] == ["", ""]
    else:
        assert seen == {"num_inference_steps": 3, "guidance_scale": 7.5, "progress": False}  # as before


def test_stack_flux_tiny_calibration_runs_true_cfg(monkeypatch, one_thread):
    """Run for real: every sampling step of the calibration calls the transformer on the prompts and on the empty
    negative prompt (whose text states are the same for every row), as flux-tiny is sampled."""
    from diffusers import FluxPipeline

    recorder = NegativeBranchRecorder(FluxPipeline)
    monkeypatch.setattr(FluxPipeline, "__call__", recorder.patched_call)
    workload = stack.MODELS["flux-tiny"](_args(steps=2, cal_prompts=2), torch.device("cpu"), torch.float32)
    handle = workload.denoiser.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True)
    try:
        calibration = workload.calibrate()
    finally:
        handle.remove()
    assert recorder.negative_branch == [False, True] * 2  # one batch of 2 distinct prompts, 2 steps
    assert calibration.meta["num_forward_calls"] == 4
