"""pipe.slim() on the pipelines of the partially supported families (attention kept whole, feed-forwards slimmed):
QwenImagePipeline, WanPipeline (2.1), LTXPipeline, CogView4Pipeline and HunyuanDiTPipeline.

Each pipeline is real and complete (``partial_pipelines``: the zoo's tiny transformer, a real VAE and scheduler,
the family's own text encoder(s) with character tokenizers; no download). Checked per family, through the
pipeline's own call: the calibration's timestep buckets are those of the pipeline's timestep convention (Qwen-Image
passes t / 1000, the others the scheduler's t), keep 1.0 reproduces the denoiser, keep 0.6 narrows feed-forwards
only, and save_pretrained -> stock DiffusionPipeline.from_pretrained gives the slim transformer back bit for bit.
Then what is refused before any work (Wan 2.2's second expert, a timestep convention SlimDiff cannot read with
buckets), the SlimSet's embeddings, and `slimdiff slim` on a saved folder.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DiffusionPipeline
from partial_pipelines import PIPELINES, wan

import slimdiff_diffusers as sd
from slimdiff_diffusers.cli import main
from slimdiff_diffusers.core.errors import ConfigError
from slimdiff_diffusers.diffusers_adapter.pipeline import _resolve_timestep_scale, denoiser_timestep_scale
from slimdiff_diffusers.diffusers_adapter.slimset import embed_prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread

FAMILIES = list(PIPELINES)
PROMPTS = [f"{c} {s} number {i}" for i, (c, s) in enumerate(
    (c, s) for c in ("red", "blue", "green") for s in ("circle", "square", "star", "moon"))]
STEPS, BUCKETS, NUM_PROMPTS = 3, 4, 3
SMALL = dict(num_prompts=NUM_PROMPTS, num_inference_steps=STEPS, batch_size=NUM_PROMPTS, rank_multiple=2,
             ffn_multiple=8, progress=False)

# What each diffusers pipeline does, stated here from its __call__ (diffusers 0.42), so that SlimDiff's reading of
# it is checked against the truth: the denoiser's timestep per unit of scheduler timestep (Qwen-Image passes
# t / 1000), the default guidance, and how CFG reaches the denoiser with the default (empty) negative prompt:
# "batch" (both halves in one call), "calls" (a second call per step) or None (no CFG).
TRUTH = {
    "qwen_image": dict(timestep_per_t=1e-3, guidance=None, cfg=None, cls="SlimQwenImageTransformer2DModel"),
    "wan": dict(timestep_per_t=1.0, guidance=5.0, cfg="calls", cls="SlimWanTransformer3DModel"),
    "ltx_video": dict(timestep_per_t=1.0, guidance=3.0, cfg="batch", cls="SlimLTXVideoTransformer3DModel"),
    "cogview4": dict(timestep_per_t=1.0, guidance=5.0, cfg="calls", cls="SlimCogView4Transformer2DModel"),
    "hunyuan_dit": dict(timestep_per_t=1.0, guidance=5.0, cfg="batch", cls="SlimHunyuanDiT2DModel"),
}


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _positional(args: tuple, kwargs: dict) -> dict:
    """A denoiser call's arguments by name (HunyuanDiT passes hidden_states and the timestep positionally)."""
    return dict(zip(("hidden_states", "timestep"), args)) | kwargs


def _first_denoiser_call(pipe, name: str) -> dict:
    """The arguments the pipeline's own call gives its denoiser at the first step (text states, masks, sizes)."""
    seen: list[dict] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(_clone(_positional(args, kwargs))) if not seen else None,
        with_kwargs=True)
    try:
        _latents(pipe, name)
    finally:
        handle.remove()
    return seen[0]


def _denoise(model, call: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**call)[0].float()


def _latents(pipe, name: str, prompt: str = "a red circle") -> torch.Tensor:
    out = pipe(prompt, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
               **PIPELINES[name].call)
    return out.frames if hasattr(out, "frames") else out.images


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _same_weights(a, b) -> bool:
    return _same_weights_dict(a, b.state_dict())


def _same_weights_dict(model, state: dict) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(now[k].dtype == state[k].dtype and torch.equal(now[k], state[k])
                                              for k in state)


@pytest.fixture(scope="module", params=FAMILIES)
def slimmed(request, tmp_path_factory, one_thread):
    """Per family: the pipeline after pipe.slim(keep_ratio=0.6) through its own call with 4 timestep buckets, the
    report, the denoiser calls calibration made (timestep, rows, arguments), the original transformer, the first
    step's denoiser arguments and the saved calibration."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    pipe = sd.enable_slimdiff(PIPELINES[name].make())
    pipe.set_progress_bar_config(disable=True)
    original = copy.deepcopy(pipe.transformer)
    first_call = _first_denoiser_call(pipe, name)
    calls: list[dict] = []

    def record(module, args, kwargs):
        call = _positional(args, kwargs)
        calls.append({"t": float(call["timestep"].float().max()), "rows": call["hidden_states"].shape[0],
                      "shape": tuple(call["hidden_states"].shape), "kwargs": call})
    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    config = sd.CalibrationConfig(num_timestep_buckets=BUCKETS, propagation_probe_calls=2)
    report = pipe.slim(prompts=PROMPTS, keep_ratio=0.6, calibration_config=config,
                       save_calibration=tmp / "calibration.safetensors", **SMALL, **PIPELINES[name].slim_kwargs())
    handle.remove()
    return dict(name=name, pipe=pipe, report=report, calls=calls, original=original, first_call=first_call,
                calibration=tmp / "calibration.safetensors", config=config)


# --------------------------------------------------------------------------------------------------
# pipe.slim() through the pipeline's own call
# --------------------------------------------------------------------------------------------------


def test_calibration_runs_the_pipelines_own_call(slimmed):
    """Guidance is the pipeline's own default (none for Qwen-Image, whose guidance_scale is a distilled model's
    embedding); CFG reaches the denoiser as the pipeline sends it; the video pipelines get the frames asked for."""
    name, calls, report = slimmed["name"], slimmed["calls"], slimmed["report"]
    truth = TRUTH[name]
    assert report.guidance_scale == truth["guidance"]
    assert report.num_prompts == NUM_PROMPTS and report.pipeline_class == type(slimmed["pipe"]).__name__
    per_step = 2 if truth["cfg"] == "calls" else 1
    rows = NUM_PROMPTS * (2 if truth["cfg"] == "batch" else 1)
    sampling = calls[:STEPS * per_step]
    assert [c["rows"] for c in sampling] == [rows] * len(sampling)
    timesteps = [c["t"] for c in sampling]
    assert timesteps[::per_step] == timesteps[per_step - 1::per_step]  # CFG's two calls share the step
    assert len(set(timesteps)) == STEPS  # one trajectory: the stopped timestep probe call is not seen here
    if name == "wan":  # 5 frames -> (5 - 1) // 4 + 1 = 2 latent frames
        assert sampling[0]["shape"][2] == 2
    if name == "ltx_video":  # 9 frames -> (9 - 1) // 8 + 1 = 2 latent frames of 4x4 tokens
        assert sampling[0]["kwargs"]["num_frames"] == 2 and sampling[0]["shape"][1] == 2 * 4 * 4


def test_timestep_buckets_follow_the_pipelines_timestep_convention(slimmed):
    """Each call's statistics land in the bucket of its scheduler timestep: Qwen-Image's t / 1000 spans the
    buckets like the others' t (a fixed scale of 1000 would have put every Qwen-Image call in the first)."""
    name, calls = slimmed["name"], slimmed["calls"]
    calibration = sd.Calibration.load(slimmed["calibration"])
    counts = next(v for k, v in calibration.tensors.items() if k.endswith("/n"))
    filled = {i for i, n in enumerate(counts.tolist()) if n > 0}
    scheduled = [c["t"] / TRUTH[name]["timestep_per_t"] / 1000 for c in calls]  # fraction of the schedule
    expected = {min(int(f * BUCKETS), BUCKETS - 1) for f in scheduled}
    assert filled == expected and len(filled) > 1, (counts, scheduled)
    assert denoiser_timestep_scale(slimmed["pipe"], lambda: _latents(slimmed["pipe"], name)) == \
        (1 if name == "qwen_image" else 1000)
    assert slimmed["config"].num_train_timesteps == 1000  # the caller's config is not modified


def test_keep_one_reproduces_the_denoiser(slimmed):
    """pipe.slim at keep 1.0 (the saved calibration, made through the pipeline's call): the same denoiser output
    on the pipeline's own first-step arguments, and the same latents."""
    name = slimmed["name"]
    pipe = sd.enable_slimdiff(PIPELINES[name].make())
    pipe.set_progress_bar_config(disable=True)
    before = _latents(pipe, name)
    reference = _denoise(pipe.transformer, slimmed["first_call"])
    report = pipe.slim(keep_ratio=1.0, calibration=slimmed["calibration"], **SMALL, **PIPELINES[name].slim_kwargs())
    assert type(pipe.transformer).__name__ == TRUTH[name]["cls"] and report.num_prompts == 0
    assert _rel(_denoise(pipe.transformer, slimmed["first_call"]), reference) < 1e-4
    assert _rel(_latents(pipe, name), before) < 1e-4


def test_keep_06_narrows_feed_forwards_only(slimmed):
    name, pipe, report, original = slimmed["name"], slimmed["pipe"], slimmed["report"], slimmed["original"]
    transformer = pipe.transformer
    assert type(transformer).__name__ == TRUTH[name]["cls"] and report.family == transformer.slimdiff_family
    assert pipe.config["transformer"] == ("slimdiff_diffusers", TRUTH[name]["cls"])
    spec = transformer.slimdiff_spec
    assert not spec.attention and any(f.width < f.inner_dim for f in spec.feed_forward.values())
    s = report.slim
    assert s.params_after < s.params_before == sum(p.numel() for p in original.parameters())
    assert s.params_after == sum(p.numel() for p in transformer.parameters())
    kept = {k: v for k, v in original.state_dict().items() if not any(k.startswith(f + ".") for f in spec.feed_forward)}
    assert len(kept) < len(original.state_dict())
    now = transformer.state_dict()
    assert all(torch.equal(now[k], v) for k, v in kept.items())  # attention and the rest untouched
    out = _denoise(transformer, slimmed["first_call"])
    assert torch.isfinite(out).all() and out.shape == _denoise(original, slimmed["first_call"]).shape


def test_save_pretrained_round_trips_through_stock_from_pretrained(slimmed, tmp_path):
    name, pipe = slimmed["name"], slimmed["pipe"]
    pipe.save_pretrained(tmp_path / "slim")
    index = json.loads((tmp_path / "slim" / "model_index.json").read_text())
    assert index["transformer"] == ["slimdiff_diffusers", TRUTH[name]["cls"]]
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "slim")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe) and type(loaded.transformer).__name__ == TRUTH[name]["cls"]
    assert _same_weights(pipe.transformer, loaded.transformer)
    assert loaded.transformer.config.slimdiff_spec == pipe.transformer.config.slimdiff_spec
    # copied to fresh memory (safetensors maps tensors at unaligned addresses): the same output bit for bit
    aligned = copy.deepcopy(loaded.transformer)
    assert torch.equal(_denoise(aligned, slimmed["first_call"]), _denoise(pipe.transformer, slimmed["first_call"]))
    torch.testing.assert_close(_latents(loaded, name), _latents(pipe, name), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Guidance, SlimSet, refusals
# --------------------------------------------------------------------------------------------------


def test_qwen_image_true_cfg_runs_with_a_negative_prompt():
    """Qwen-Image's CFG is true_cfg_scale (default 4.0) and runs only with a negative prompt: negative_prompt=" "
    makes every step two calls (conditional, then unconditional), at the same timestep."""
    pipe = sd.enable_slimdiff(PIPELINES["qwen_image"].make())
    calls: list[float] = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(float(kwargs["timestep"].max())), with_kwargs=True)
    report = pipe.slim(prompts=PROMPTS, keep_ratio=0.9, negative_prompt=" ",
                       calibration_config=sd.CalibrationConfig(propagation_probe_calls=1), **SMALL,
                       **PIPELINES["qwen_image"].slim_kwargs())
    sampling = calls[:2 * STEPS]  # the propagation probe's replays of one recorded call follow
    assert sampling[0::2] == sampling[1::2] and len(set(sampling)) == STEPS, calls
    assert set(calls[2 * STEPS:]) <= set(sampling)
    assert max(calls) <= 1.0
    assert report.guidance_scale is None


def test_slimset_embeds_with_the_pipelines_own_encoders():
    """One part per (tokenizer, text encoder) pair, each of the encoder's hidden width: Qwen-Image's Qwen2.5-VL
    through its language model (not its logits over the vocabulary), HunyuanDiT's BERT + mT5 concatenated."""
    widths = {"qwen_image": 12, "wan": 16, "ltx_video": 16, "cogview4": 8, "hunyuan_dit": 8 + 8}
    for name, width in widths.items():
        pipe = PIPELINES[name].make()
        emb = embed_prompts(pipe, PROMPTS[:5])
        assert emb.shape == (5, width) and torch.allclose(emb.norm(dim=1), torch.ones(5)), name
        assert torch.cdist(emb, emb).triu(1).max() > 0  # the prompts are told apart
    slimset = sd.build_slimset(PIPELINES["qwen_image"].make(), num_prompts=4, pool=PROMPTS)
    assert len(set(slimset.prompts)) == 4


def test_a_second_denoiser_is_refused_before_any_work():
    """Wan 2.2's layout (transformer + transformer_2, switched at boundary_ratio): pipe.slim() would calibrate
    `transformer` on the high-noise steps only and leave the other expert whole, so it refuses, naming both."""
    pipe = sd.enable_slimdiff(wan(second_expert=True))
    state = copy.deepcopy(pipe.transformer.state_dict())
    calls: list[int] = []
    for model in (pipe.transformer, pipe.transformer_2):
        model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match="transformer, transformer_2") as info:
        pipe.slim(prompts=PROMPTS, keep_ratio=0.6, **SMALL, **PIPELINES["wan"].slim_kwargs())
    assert "Nothing was changed" in str(info.value) and not calls
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel" and _same_weights_dict(pipe.transformer, state)


def test_a_timestep_convention_it_cannot_read_is_refused_with_buckets():
    """A denoiser given neither the scheduler's t nor t / 1000 (here 1 - t / 1000, Lumina 2's and Z-Image's
    convention, whose models SlimDiff refuses anyway): no scale is guessed. With timestep buckets calibration is
    refused before it runs; with one bucket the scale is unused and the scheduler's is recorded."""
    pipe = PIPELINES["cogview4"].make()
    pipe.set_progress_bar_config(disable=True)
    call = _first_denoiser_call(pipe, "cogview4")

    def sampling(convention):
        def first_step():  # what a pipeline does: set the schedule, then call the denoiser at its first timestep
            pipe.scheduler.set_timesteps(3)
            pipe.transformer(**call | {"timestep": convention(pipe.scheduler.timesteps[:1].expand(1))})
        return first_step
    reversed_convention = sampling(lambda t: 1 - t / 1000)
    assert denoiser_timestep_scale(pipe, reversed_convention) is None
    assert denoiser_timestep_scale(pipe, sampling(lambda t: t)) == 1000
    assert denoiser_timestep_scale(pipe, sampling(lambda t: t / 1000)) == 1
    with pytest.raises(ConfigError, match="cannot tell which of the 4 timestep buckets"):
        _resolve_timestep_scale(pipe, sd.CalibrationConfig(num_timestep_buckets=4), reversed_convention)
    assert _resolve_timestep_scale(pipe, sd.CalibrationConfig(), reversed_convention).num_train_timesteps == 1000
    explicit = sd.CalibrationConfig(num_timestep_buckets=4, num_train_timesteps=1)  # the caller's word is kept
    assert _resolve_timestep_scale(pipe, explicit, reversed_convention) is explicit


# --------------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------------


def test_cli_slims_a_saved_qwen_image_pipeline_and_refuses_a_video_one(tmp_path, capsys):
    """`slimdiff slim` on a saved QwenImagePipeline folder (guidance: the pipeline's own None) writes a slim
    pipeline that stock DiffusionPipeline.from_pretrained loads; a video pipeline (Wan) is refused in one line
    before calibration, with the Python route."""
    PIPELINES["qwen_image"].make().save_pretrained(tmp_path / "qwen")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:6]) + "\n")
    common = ["--prompts", str(tmp_path / "prompts.txt"), "--eval-prompts", str(tmp_path / "prompts.txt"),
              "--steps", "2", "--num-prompts", "3", "--num-eval-prompts", "2", "--batch-size", "3", "--keep-ratio",
              "0.6", "--rank-multiple", "2", "--ffn-multiple", "8", "--height", "32", "--width", "32"]
    out = tmp_path / "run"
    code = main(["slim", str(tmp_path / "qwen"), *common, "--max-sequence-length", "64", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"] == "QwenImagePipeline" and report["calibration"]["guidance_scale"] is None
    assert report["size"]["compressible_after"] <= 0.6 * report["size"]["compressible_before"]
    card = (out / "pipeline" / "README.md").read_text()
    assert "--guidance-scale" not in card  # the reproduce command leaves the pipeline's default
    loaded = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(loaded.transformer).__name__ == "SlimQwenImageTransformer2DModel"

    PIPELINES["wan"].make().save_pretrained(tmp_path / "wan")
    code = main(["slim", str(tmp_path / "wan"), *common, "--out", str(tmp_path / "wan-run")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (diffusers' loading bars come before it)
    assert code == 2 and last.startswith("slimdiff: error:") and "WanPipeline generates video" in last
    assert "call_kwargs={'num_frames'" in last and not (tmp_path / "wan-run").exists()
