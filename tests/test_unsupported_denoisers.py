"""Robustness sweep (issue 10): the diffusers denoisers users point SlimDiff at, beyond the supported families.

For each tiny model (``denoiser_zoo``) SlimDiff must do one of two things, never anything in between:

* **refuse before anything runs**: ``calibrate`` raises a :class:`SlimDiffError` naming the modules and the reason,
  the run function was never called, and the model is bit-identical afterwards;
* **slim correctly**: keep 1.0 reproduces the model (< 1e-4 relative), keep 0.6 runs with a finite output and fewer
  parameters, the original is untouched. Attention that runs a model-specific diffusers processor is kept whole,
  with the reason in ``find_sites(model).skipped`` (only the feed-forwards are slimmed).

Anything else (a traceback from a hook or the probe, a refusal after the run function ran, a wrong output at keep
1.0) fails here.
"""
from __future__ import annotations

import copy

import pytest
import torch
from denoiser_zoo import DENOISERS, Denoiser, available

import slimdiff_diffusers as sd
from slimdiff_diffusers.core.errors import (
    SlimDiffError,
    UnsupportedArchitectureError,
    UnsupportedAttentionProcessorError,
    UnsupportedProcessorError,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread

MODEL_SPECIFIC = "model-specific"
NOTHING = "nothing SlimDiff can slim"

# What SlimDiff does with each model: ("refused", error type, what the message says) or ("slimmed", which attention
# kinds are slimmed, what the skipped reasons say).
EXPECTED: dict[str, tuple] = {
    "ChromaTransformer2DModel": ("slimmed", {"joint", "single"}, "QK-norm and RoPE"),
    "QwenImageTransformer2DModel": ("slimmed", set(), MODEL_SPECIFIC),
    "AuraFlowTransformer2DModel": ("refused", UnsupportedArchitectureError, [NOTHING, "AuraFlowAttnProcessor2_0"]),
    "HunyuanDiT2DModel": ("slimmed", set(), MODEL_SPECIFIC),
    "Lumina2Transformer2DModel": ("refused", UnsupportedArchitectureError, [NOTHING, "Lumina2AttnProcessor2_0"]),
    "SanaTransformer2DModel": ("refused", UnsupportedArchitectureError, ["linear attention", "Nothing was changed"]),
    "CogView4Transformer2DModel": ("slimmed", set(), MODEL_SPECIFIC),
    "HiDreamImageTransformer2DModel": ("refused", UnsupportedArchitectureError, [NOTHING, "HiDreamAttnProcessor"]),
    "WanTransformer3DModel": ("slimmed", set(), MODEL_SPECIFIC),
    "LTXVideoTransformer3DModel": ("slimmed", set(), MODEL_SPECIFIC),
    "DiTTransformer2DModel": ("slimmed", {"plain"}, None),
    "Flux2Transformer2DModel": ("refused", UnsupportedArchitectureError, [NOTHING, "Flux2AttnProcessor"]),
    "ZImageTransformer2DModel": ("refused", UnsupportedArchitectureError, [NOTHING, "ZSingleStreamAttnProcessor"]),
    "FluxTransformer2DModel+fused": ("refused", UnsupportedArchitectureError, ["unfuse_qkv_projections()"]),
    "SD3Transformer2DModel+fused": ("refused", UnsupportedArchitectureError, ["unfuse_qkv_projections()"]),
    "FluxTransformer2DModel+custom-processor": ("refused", UnsupportedAttentionProcessorError,
                                                ["UserFluxProcessor", "slimdiff_compatible"]),
}
TIMESTEPS = (0.9, 0.6, 0.3)  # one trajectory: decreasing, as a sampler calls the denoiser


def _entry(name: str) -> Denoiser:
    entry = next(e for e in DENOISERS if e.name == name)
    if not available(entry):
        pytest.skip(f"{name.split('+')[0]} is not in the installed diffusers {_diffusers_version()}")
    return entry


def _diffusers_version() -> str:
    import diffusers
    return diffusers.__version__


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}, type(model))


def _unchanged(model, snapshot) -> bool:
    state, processors, cls = snapshot
    now = model.state_dict()
    return type(model) is cls and now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state) \
        and processors == {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}


def _counting_run(entry: Denoiser, model):
    calls: list[float] = []

    def run():
        for seed, t in enumerate(TIMESTEPS):
            calls.append(t)
            model(**entry.inputs(model, t, seed))
    return run, calls


def _output(entry: Denoiser, model) -> torch.Tensor:
    with torch.no_grad():
        return entry.output(model(**entry.inputs(model, 0.5, 11))).float()


def _in_fresh_memory(model):
    """``model`` with its tensors copied to fresh allocations. safetensors maps a loaded file's tensors at
    addresses with no SIMD alignment, and with one thread the CPU kernels then take another path for some shapes
    (Wan's, one rounding step off): bit-identical weights are compared directly, outputs on aligned copies."""
    return copy.deepcopy(model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_denoiser_has_an_expected_outcome():
    assert set(EXPECTED) == {e.name for e in DENOISERS}


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e[0] == "refused"])
def test_refused_before_anything_runs(name):
    entry = _entry(name)
    _, error, says = EXPECTED[name]
    model = entry.make()
    snapshot = _snapshot(model)
    run, calls = _counting_run(entry, model)
    with pytest.raises(SlimDiffError) as info:
        sd.calibrate(model, run, sd.CalibrationConfig(propagation_probe_calls=2))
    message = str(info.value)
    assert isinstance(info.value, error), f"{type(info.value).__name__}: {message}"
    assert not calls, "refused after the run function ran"
    for text in says:
        assert text in message
    sites = sd.find_sites(model)
    named = [path for path, _ in sites.refused or sites.skipped]
    assert named and named[0] in message  # names the modules
    assert _unchanged(model, snapshot)
    # the slim entry points refuse the same way, before any decomposition
    from slimdiff_diffusers.diffusers_adapter.slimming import check_slimmable
    if sites.refused:
        with pytest.raises(error):
            check_slimmable(model, sd.SlimConfig(keep_ratio=0.6))
    assert _unchanged(model, snapshot)


@pytest.fixture(scope="module")
def calibrated(one_thread):
    """name -> (entry, model, calibration) for the models SlimDiff slims, calibrated once (lazily)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            entry = _entry(name)
            model = entry.make()
            run, calls = _counting_run(entry, model)
            calibration = sd.calibrate(model, run, sd.CalibrationConfig(propagation_probe_calls=2))
            assert len(calls) == len(TIMESTEPS)
            cache[name] = (entry, model, calibration)
        return cache[name]
    return get


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e[0] == "slimmed"])
def test_slimmed_exactly_at_keep_one_and_runs_at_keep_06(name, calibrated):
    entry, model, calibration = calibrated(name)
    _, kinds, reason = EXPECTED[name]
    sites = sd.find_sites(model)
    assert {s.kind for s in sites.attention} == kinds
    assert sites.feed_forward and not sites.refused
    if reason is not None:  # what is kept whole says why, naming the module
        assert any(reason in r for _, r in sites.skipped), sites.skipped
    if kinds == set():  # only the feed-forwards: every attention is listed as kept whole
        attention = [n for n, m in model.named_modules() if hasattr(m, "to_q") and hasattr(m, "heads")]
        assert attention and {p for p, _ in sites.skipped} >= set(attention)
    snapshot = _snapshot(model)
    reference = _output(entry, model)
    full = sd.slim(model, calibration, keep_ratio=1.0)
    assert _rel(_output(entry, full), reference) < 1e-4
    slimmed = sd.slim(model, calibration, keep_ratio=0.6)
    out = _output(entry, slimmed)
    assert torch.isfinite(out).all() and out.shape == reference.shape
    assert sum(p.numel() for p in slimmed.parameters()) < sum(p.numel() for p in model.parameters())
    assert _unchanged(model, snapshot)


def test_partially_supported_model_logs_what_stays_whole(calibrated, caplog):
    entry, model, calibration = calibrated("WanTransformer3DModel")
    run, _ = _counting_run(entry, model)
    with caplog.at_level("WARNING", logger="slimdiff"):
        sd.calibrate(model, run, sd.CalibrationConfig(propagation_probe_calls=0))
    assert any("not slimmed" in r.message and "WanAttnProcessor" in r.message and "blocks.0.attn1" in r.message
               for r in caplog.records)


def test_chroma_slims_every_group_kind_with_the_flux_processors(calibrated):
    """Chroma is Flux.1's blocks and attention (FluxAttention, FluxAttnProcessor): the joint, single-stream and
    FFN groups are slimmed and the slim Flux processors run them (save/load: the round-trip test below)."""
    from slimdiff_diffusers.diffusers_adapter.transformer_processors import SlimFluxAttnProcessor

    entry, model, calibration = calibrated("ChromaTransformer2DModel")
    slimmed = sd.slim(model, calibration, keep_ratio=0.6)
    assert type(slimmed).__name__ == "SlimChromaTransformer2DModel" and slimmed.slimdiff_family == "Chroma"
    spec = slimmed.config.slimdiff_spec
    kinds = {e.get("kind", "plain") for e in spec["attention"].values()}
    assert kinds == {"joint", "single"}
    assert {e.get("kind", "plain") for e in spec["feed_forward"].values()} >= {"single"}
    block = slimmed.transformer_blocks[0]
    assert isinstance(block.attn.processor, SlimFluxAttnProcessor)
    assert block.attn.to_v.out_features < model.transformer_blocks[0].attn.to_v.out_features or \
        block.ff.net[2].in_features < model.transformer_blocks[0].ff.net[2].in_features


# Every family SlimDiff slims has a Slim* class; the partially supported ones (attention kept whole, FFNs slimmed)
# included. name -> (Slim* class, its diffusers pipeline)
SLIM_CLASSES = {
    "DiTTransformer2DModel": ("SlimDiTTransformer2DModel", "DiTPipeline"),
    "ChromaTransformer2DModel": ("SlimChromaTransformer2DModel", "ChromaPipeline"),
    "QwenImageTransformer2DModel": ("SlimQwenImageTransformer2DModel", "QwenImagePipeline"),
    "WanTransformer3DModel": ("SlimWanTransformer3DModel", "WanPipeline"),
    "LTXVideoTransformer3DModel": ("SlimLTXVideoTransformer3DModel", "LTXPipeline"),
    "CogView4Transformer2DModel": ("SlimCogView4Transformer2DModel", "CogView4Pipeline"),
    "HunyuanDiT2DModel": ("SlimHunyuanDiT2DModel", "HunyuanDiTPipeline"),
}


def test_every_slimmed_denoiser_has_a_slim_class():
    assert set(SLIM_CLASSES) == {n for n, e in EXPECTED.items() if e[0] == "slimmed"}


def _same_weights(a, b) -> bool:
    before, after = a.state_dict(), b.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", list(SLIM_CLASSES))
def test_slim_classes_round_trip_bit_identically(name, calibrated, tmp_path):
    """save_pretrained -> Slim*.from_pretrained and the single file give the same weights and the same output.
    Qwen-Image's RoPE frequencies are plain tensor attributes computed in __init__ (not buffers): the single-file
    loader must compute them for real, not leave them on the meta device it builds the model on."""
    entry, model, calibration = calibrated(name)
    slim_class = SLIM_CLASSES[name][0]
    slimmed = sd.slim(model, calibration, keep_ratio=0.6)
    assert type(slimmed).__name__ == slim_class and slimmed.slimdiff_family
    reference = _output(entry, slimmed)
    slimmed.save_pretrained(tmp_path / "model")
    loaded = getattr(sd, slim_class).from_pretrained(tmp_path / "model").eval()
    assert type(loaded).__name__ == slim_class
    assert loaded.config.slimdiff_spec == slimmed.config.slimdiff_spec
    assert _same_weights(slimmed, loaded)
    assert torch.equal(_output(entry, _in_fresh_memory(loaded)), reference)
    single = sd.load_slim_model_file(sd.save_slim_model_file(slimmed, tmp_path / "model.safetensors"))
    assert type(single).__name__ == slim_class
    assert _same_weights(slimmed, single)
    assert torch.equal(_output(entry, _in_fresh_memory(single.eval())), reference)


def test_single_file_loader_computes_what_init_computes_for_real():
    """A model built on the meta device leaves Qwen-Image's RoPE frequencies (plain tensor attributes, not buffers)
    without data, and load_state_dict cannot fill them; built with only the parameters on meta they are real, the
    parameters cost nothing, and nn.Module.register_parameter is restored even when construction fails."""
    import torch.nn as nn

    from slimdiff_diffusers.diffusers_adapter.single_file import _left_on_meta, _parameters_on_meta

    make = _entry("QwenImageTransformer2DModel").make
    with torch.device("meta"):
        on_meta = make()
    left = _left_on_meta(on_meta)
    assert {"pos_embed.pos_freqs", "pos_embed.neg_freqs"} <= set(left)
    assert "proj_out.weight" in left  # parameters too
    with _parameters_on_meta():
        skeleton = make()
    assert all(p.is_meta for p in skeleton.parameters())
    assert _left_on_meta(skeleton) == [n for n, _ in skeleton.named_parameters()]
    assert torch.equal(skeleton.pos_embed.pos_freqs, make().pos_embed.pos_freqs)
    register = nn.Module.register_parameter
    with pytest.raises(RuntimeError), _parameters_on_meta():
        raise RuntimeError("construction failed")
    assert nn.Module.register_parameter is register


def test_parameters_on_meta_leaves_other_threads_alone():
    """The patch of nn.Module.register_parameter is process-wide; a model another thread builds meanwhile (a
    ComfyUI server loading something else) gets real parameters, and the patch goes when the last user leaves."""
    import threading

    import torch.nn as nn

    from slimdiff_diffusers.diffusers_adapter.single_file import _parameters_on_meta

    register = nn.Module.register_parameter
    inside, built = threading.Event(), threading.Event()
    other: dict[str, nn.Module] = {}

    def build_elsewhere() -> None:
        inside.wait(10)
        other["model"] = nn.Linear(4, 4)
        with _parameters_on_meta():  # a second user of the patch, leaving first
            other["skeleton"] = nn.Linear(4, 4)
        built.set()

    thread = threading.Thread(target=build_elsewhere)
    thread.start()
    with _parameters_on_meta():
        inside.set()
        assert built.wait(10)
        mine = nn.Linear(4, 4)
        assert nn.Module.register_parameter is not register  # still patched for this thread
    thread.join(10)
    assert mine.weight.is_meta and other["skeleton"].weight.is_meta
    assert not other["model"].weight.is_meta and not other["model"].bias.is_meta
    assert nn.Module.register_parameter is register


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e[0] == "slimmed" and e[1] == set()])
def test_partially_supported_slim_model_loads_through_stock_diffusion_pipeline(name, calibrated, tmp_path):
    """The slim denoiser as its pipeline's component: model_index.json names slimdiff_diffusers, and stock
    DiffusionPipeline.from_pretrained builds the Slim* class bit-identically, with the other components saved as
    absent and passed as None when loading, as diffusers allows (complete pipelines through pipe.slim():
    tests/test_partial_pipelines.py)."""
    import inspect
    import json

    import diffusers
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    entry, model, calibration = calibrated(name)
    slim_class, pipeline = SLIM_CLASSES[name]
    slimmed = sd.slim(model, calibration, keep_ratio=0.6)
    reference = _output(entry, slimmed)
    cls = getattr(diffusers, pipeline)
    absent = {k: None for k in inspect.signature(cls.__init__).parameters
              if k not in ("self", "transformer", "scheduler", "requires_safety_checker")}
    cls(transformer=slimmed, scheduler=FlowMatchEulerDiscreteScheduler(), **absent).save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["transformer"] == ["slimdiff_diffusers", slim_class]
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "p", **absent)
    assert type(loaded) is cls and type(loaded.transformer).__name__ == slim_class
    assert _same_weights(slimmed, loaded.transformer)
    assert torch.equal(_output(entry, _in_fresh_memory(loaded.transformer.eval())), reference)


def test_custom_processor_refusal_is_also_a_processor_error():
    entry = _entry("FluxTransformer2DModel+custom-processor")
    model = entry.make()
    with pytest.raises(UnsupportedProcessorError, match="transformer_blocks.0.attn"):
        sd.calibrate(model, lambda: pytest.fail("the run function must not run"))
    # set back to the stock processor, the same model calibrates
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    model.transformer_blocks[0].attn.set_processor(FluxAttnProcessor())
    assert not sd.find_sites(model).refused


def test_a_custom_processor_that_declares_slim_awareness_is_trusted():
    from slimdiff_diffusers.diffusers_adapter.transformer_processors import SlimFluxAttnProcessor

    class Declared(SlimFluxAttnProcessor):
        pass
    entry = _entry("FluxTransformer2DModel+custom-processor")
    model = entry.make()
    model.transformer_blocks[0].attn.set_processor(Declared())
    sites = sd.find_sites(model)
    assert not sites.refused and "transformer_blocks.0.attn" in {s.name for s in sites.attention}


def test_core_knows_every_processor_the_adapter_translates():
    """sites.STOCK_PROCESSORS (core, by name) and the adapter's translation tables must agree: a processor the
    adapter can run narrowed must not be skipped as model-specific by find_sites."""
    from slimdiff_diffusers.core.sites import STOCK_PROCESSORS
    from slimdiff_diffusers.diffusers_adapter import attention_processor as ap

    adapter = {t.__name__ for t in [*ap.TRANSLATIONS, *ap.TRANSFORMER_TRANSLATIONS, *ap.ADAPTER_PROCESSORS]
               if t.__module__.startswith("diffusers.")}
    assert adapter <= STOCK_PROCESSORS, adapter - STOCK_PROCESSORS


def test_chroma_pipeline_slims_and_round_trips_through_stock_from_pretrained(tmp_path):
    """pipe.slim() on a tiny ChromaPipeline (T5 only, t/1000 timesteps like Flux): keep 1.0 gives the same latents,
    the saved folder loads with stock DiffusionPipeline.from_pretrained into the slim class, bit-identically."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
    from test_transformer_pipelines import _t5, _vae, t5_tokenizer

    torch.manual_seed(0)
    tokenizer = t5_tokenizer()
    transformer = ChromaTransformer2DModel(  # 2 latent channels packed 2x2: in_channels 8; T5 width 12
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1).eval()
    pipe = sd.enable_slimdiff(ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(2, True),
                                             text_encoder=_t5(tokenizer, 12), tokenizer=tokenizer,
                                             transformer=transformer))
    pipe.set_progress_bar_config(disable=True)

    def latents(p):
        return p("a red circle", num_inference_steps=2, output_type="latent", height=16, width=16,
                 generator=torch.Generator().manual_seed(0), max_sequence_length=24).images
    reference = latents(pipe)
    prompts = ["a red circle", "a blue square", "green lines", "a yellow star"]
    common = dict(num_prompts=4, num_inference_steps=2, height=16, width=16, progress=False,
                  call_kwargs={"max_sequence_length": 24})
    original = copy.deepcopy(pipe.transformer)
    report = pipe.slim(prompts, keep_ratio=1.0, **common)
    assert type(pipe.transformer).__name__ == "SlimChromaTransformer2DModel" and report.family == "Chroma"
    assert _rel(latents(pipe), reference) < 1e-4

    pipe.transformer = original
    report = pipe.slim(prompts, keep_ratio=0.6, **common)
    assert report.slim.params_after < report.slim.params_before
    slim_latents = latents(pipe)
    assert torch.isfinite(slim_latents).all()
    pipe.save_pretrained(tmp_path / "slim")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "slim")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer).__name__ == "SlimChromaTransformer2DModel"
    assert torch.equal(latents(loaded), slim_latents)


@pytest.mark.parametrize("name", [n for n in SLIM_CLASSES if EXPECTED[n][1] == set()])
def test_loras_on_partially_supported_slim_models_map_exactly(name, calibrated):
    """A LoRA made for the original model on a partially supported family (attention kept whole, feed-forwards
    slimmed): the attention part loads as it is, the feed-forward part goes through the Nyström rows and the refit
    map. With leverage-chosen channels both depend on the calibration's moments only, so the exact expectation is
    the slimming, with the same calibration and ranks, of the original with the LoRA fused in
    (``strict_weights=False``); the default greedy selection reads the down projection too, and would choose other
    channels for the fused model (the map is the same least-squares map for any chosen channels)."""
    from tiny_models import fused_lora_copy, random_lora

    entry, model, calibration = calibrated(name)
    sites = sd.find_sites(model)
    ffn_layers = sorted({path for s in sites.feed_forward for path in (s.up, s.down)})
    attention = [n for n, m in model.named_modules() if hasattr(m, "to_q") and hasattr(m, "heads")][:2]
    targets = ffn_layers + [f"{path}.{linear}" for path in attention for linear in ("to_q", "to_v")]
    donor, state, cfg = random_lora(model, targets, std=0.05)
    fused = fused_lora_copy(donor)
    assert _rel(_output(entry, fused), _output(entry, model)) > 1e-3  # the LoRA changes the output
    slimmed = sd.slim(model, calibration, keep_ratio=0.6, ffn_selection="leverage")
    assert any(f.width < f.inner_dim for f in slimmed.slimdiff_spec.feed_forward.values())
    ranks = {g.name: g.rank for g in slimmed.slimdiff_report.groups}
    expected = sd.slim(fused, calibration, rank_pattern=ranks, strict_weights=False, ffn_selection="leverage")
    loaded = copy.deepcopy(slimmed)
    loaded.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict())
    assert _rel(_output(entry, loaded), _output(entry, expected)) < 1e-4
    # and at keep 1.0 the slim model with the LoRA is the original with it
    full = sd.slim(model, calibration, keep_ratio=1.0)
    full.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict())
    assert _rel(_output(entry, full), _output(entry, fused)) < 1e-4
