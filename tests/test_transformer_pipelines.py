"""Transformer pipelines (issue 10, item 3): pipe.slim() on Flux, SD3, PixArt-Σ and PixArt-α pipelines, their slim
model classes through save_pretrained -> stock DiffusionPipeline.from_pretrained, the single file, push_to_hub and
`slimdiff slim`.

The pipelines are complete and real (diffusers pipeline classes, VAE, scheduler, CLIP / T5 text encoders and
tokenizers), built from tiny configurations in the test: the CLIP tokenizer is tests/tiny_models' character
tokenizer, the T5 tokenizer a character-level Unigram model that transformers' own ``T5Tokenizer`` builds from a
vocabulary list (no sentencepiece file, no download). Each family is slimmed once per module (the slow part);
the tests then check what users rely on. The Hub is replaced at the HfApi boundary by ``hub_fakes.FakeHub``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
)
from hub_fakes import FakeHub
from tiny_models import (
    flux_inputs,
    pixart_inputs,
    sd3_inputs,
    tiny_flux_transformer,
    tiny_pixart_transformer,
    tiny_sd3_transformer,
    write_char_tokenizer,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

import slimdiff_diffusers as sd
from slimdiff_diffusers.cli import main
from slimdiff_diffusers.diffusers_adapter.pipeline import calibrate_pipeline
from slimdiff_diffusers.diffusers_adapter.slimset import SlimSet, embed_prompts

FAMILIES = ("flux", "flux_schnell", "sd3", "pixart_sigma", "pixart_alpha")
SLIM_CLASS = {"flux": "SlimFluxTransformer2DModel", "flux_schnell": "SlimFluxTransformer2DModel",
              "sd3": "SlimSD3Transformer2DModel", "pixart_sigma": "SlimPixArtTransformer2DModel",
              "pixart_alpha": "SlimPixArtTransformer2DModel"}
PROMPTS = [f"{c} {s} number {i}" for i, (c, s) in enumerate(
    (c, s) for c in ("red", "blue", "green") for s in ("circle", "square", "star", "moon"))]
SIZE = dict(height=16, width=16)
SMALL = dict(num_inference_steps=2, batch_size=2, rank_multiple=2, ffn_multiple=8, **SIZE)


# --------------------------------------------------------------------------------------------------
# Tiny pipelines
# --------------------------------------------------------------------------------------------------


def t5_tokenizer() -> T5Tokenizer:
    """A character-level T5 tokenizer built offline (transformers builds the Unigram model from the list)."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=24)


def _t5(tokenizer, d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=d_model // 2,
                                   num_layers=1, num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0)).eval()


def _clip(tokenizer, hidden: int, projection: int | None = None):
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1, **({"projection_dim": projection} if projection else {}))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(latent_channels: int, flow: bool) -> AutoencoderKL:
    extra = dict(shift_factor=0.1, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False) if flow else {}
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16, **extra).eval()


def tiny_pipeline(family: str, tmp: Path, seed: int = 0):
    """A complete tiny pipeline of ``family`` (the tiny transformer configs are tests/tiny_models')."""
    torch.manual_seed(seed)
    clip_tok = write_char_tokenizer(tmp / "clip_tokenizer")
    if family in ("flux", "flux_schnell"):
        # Flux: CLIP pooled (10 = pooled_projection_dim) + T5 tokens (12 = joint_attention_dim); 2 latent
        # channels packed 2x2 into in_channels 8. "flux" has Flux.1-dev's guidance embedding, schnell has none.
        t5_tok = t5_tokenizer()
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(2, True),
                            text_encoder=_clip(clip_tok, 10), tokenizer=clip_tok, text_encoder_2=_t5(t5_tok, 12),
                            tokenizer_2=t5_tok,
                            transformer=tiny_flux_transformer(seed, guidance_embeds=family == "flux"))
    if family == "sd3":
        # SD3: two CLIPs with projection (5 + 5 = pooled_projection_dim 10; hidden 6 + 6 padded to T5's 12) + T5.
        clip_tok_2, t5_tok = write_char_tokenizer(tmp / "clip_tokenizer_2"), t5_tokenizer()
        return StableDiffusion3Pipeline(
            transformer=tiny_sd3_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4, True),
            text_encoder=_clip(clip_tok, 6, 5), tokenizer=clip_tok, text_encoder_2=_clip(clip_tok_2, 6, 5),
            tokenizer_2=clip_tok_2, text_encoder_3=_t5(t5_tok, 12), tokenizer_3=t5_tok)
    # PixArt: T5 only (12 = caption_channels)
    t5_tok = t5_tokenizer()
    cls = PixArtSigmaPipeline if family == "pixart_sigma" else PixArtAlphaPipeline
    return cls(tokenizer=t5_tok, text_encoder=_t5(t5_tok, 12), vae=_vae(4, False),
               transformer=tiny_pixart_transformer(seed), scheduler=DPMSolverMultistepScheduler())


def call_kwargs(family: str) -> dict:
    """Arguments these tiny pipelines need besides the prompt: short T5 sequences; PixArt's resolution binning
    knows only the real sample sizes; its caption cleaning needs bs4/ftfy (not installed)."""
    extra = {"max_sequence_length": 24}
    if family.startswith("pixart"):
        extra |= {"use_resolution_binning": False, "clean_caption": False}
    return extra


def model_inputs(family: str, model) -> dict:
    if family.startswith("flux"):
        return flux_inputs(model)
    return sd3_inputs(model) if family == "sd3" else pixart_inputs(model)


def denoise(family: str, model) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(family, model))[0]


def latents(pipe, family: str, prompt: str = "a red circle") -> torch.Tensor:
    return pipe(prompt, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                **SIZE, **call_kwargs(family)).images


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module", params=FAMILIES)
def slimmed(request, tmp_path_factory, one_thread):
    """(family, slimmed pipeline, its report, the original transformer, the original latents) per family."""
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    pipe = sd.enable_slimdiff(tiny_pipeline(family, tmp))
    pipe.set_progress_bar_config(disable=True)
    original = tiny_pipeline(family, tmp / "copy").transformer  # same seed: the same weights
    before = latents(pipe, family)
    report = pipe.slim(prompts=PROMPTS, num_prompts=4, keep_ratio=0.6, call_kwargs=call_kwargs(family),
                       progress=False, **SMALL)
    return family, pipe, report, original, before


# --------------------------------------------------------------------------------------------------
# pipe.slim()
# --------------------------------------------------------------------------------------------------


def test_pipe_slim_narrows_the_transformer_in_both_streams(slimmed):
    family, pipe, report, original, before = slimmed
    transformer = pipe.transformer
    assert type(transformer).__name__ == SLIM_CLASS[family]
    assert pipe.config["transformer"] == ("slimdiff_diffusers", SLIM_CLASS[family])
    assert report.denoiser == "transformer" and report.pipeline_class == type(pipe).__name__
    assert report.family == {"flux": "Flux", "flux_schnell": "Flux", "sd3": "SD3"}.get(family, "PixArt")
    assert report.family in str(report)
    s = report.slim
    assert s.compressible_params_after <= 0.6 * s.compressible_params_before
    assert s.params_after < s.params_before == sum(p.numel() for p in original.parameters())
    assert s.params_after == sum(p.numel() for p in transformer.parameters())
    spec = transformer.slimdiff_spec
    # keep 0.6 removes parameters from VO and from FFNs (both streams, and the single-stream blocks for Flux)
    assert any(f.width < f.inner_dim for f in spec.feed_forward.values())
    assert sum(a.vo_rank for a in spec.attention.values()) <= sum(a.head_dim for a in spec.attention.values())
    if family.startswith("flux"):
        assert {a.kind for a in spec.attention.values()} == {"joint", "single"}
        assert any(path.endswith("ff_context") for path in spec.feed_forward)
        assert any(f.kind == "single" for f in spec.feed_forward.values())
    if family == "sd3":
        assert {a.kind for a in spec.attention.values()} == {"joint"}
        assert any(path.endswith("ff_context") for path in spec.feed_forward)
    after = latents(pipe, family)
    assert after.shape == before.shape and torch.isfinite(after).all() and not torch.equal(after, before)


def test_card_states_the_allocation_refinement_that_ran(slimmed, tmp_path):
    """The model card of pipe.slim()'s result records the refinement its allocation ran, "auto" resolved per
    family: the 1-exchange search on Flux / SD3 (joint and single-stream attention), the descent alone on PixArt."""
    from huggingface_hub import ModelCard

    family, pipe, report, _, _ = slimmed
    used = "none" if family.startswith("pixart") else "exchange"
    assert report.slim.allocation_refinement == used
    card = ModelCard.load(sd.write_model_card(tmp_path / "card", pipe))
    assert f"allocation `sis, refinement {used} (auto), influence measured`" in card.text
    budget = card.data.slimdiff["budget"]
    assert budget["propagation_used"] == report.slim.propagation == "measured"
    assert (budget["allocation"], budget["allocation_refinement"], budget["allocation_refinement_used"]) == \
        ("sis", "auto", used)


def test_calibration_runs_the_pipelines_own_call(tmp_path):
    """Flux.1-dev: one row per prompt (no CFG) with the guidance embedding set to guidance_scale; SD3 and PixArt:
    CFG rows (2 per prompt). The default guidance is the pipeline's own."""
    seen: dict[str, list] = {}
    for family in ("flux", "sd3", "pixart_sigma"):
        pipe = sd.enable_slimdiff(tiny_pipeline(family, tmp_path / family))
        calls = seen.setdefault(family, [])

        def record(module, args, kwargs, calls=calls):
            x = kwargs.get("hidden_states", args[0] if args else None)
            calls.append((x.shape[0], kwargs.get("guidance")))
        pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
        report = pipe.slim(prompts=PROMPTS[:2], num_prompts=2, keep_ratio=0.9, call_kwargs=call_kwargs(family),
                           progress=False, **SMALL)
        assert report.guidance_scale == {"flux": 3.5, "sd3": 7.0, "pixart_sigma": 4.5}[family]
    flux_rows, guidance = seen["flux"][0]
    assert flux_rows == 2 and torch.allclose(guidance, torch.full((2,), 3.5))
    assert seen["sd3"][0][0] == 4 and seen["pixart_sigma"][0][0] == 4


def test_flux_calibration_honours_an_empty_negative_prompt_and_its_timestep_scale(tmp_path):
    """negative_prompt="" with true_cfg_scale > 1 is Flux's true CFG (a second, negative call per step): it must
    not be dropped as if unset. Flux passes t / 1000, so timestep buckets span [0, 1]; the caller's config is
    not modified."""
    pipe = sd.enable_slimdiff(tiny_pipeline("flux", tmp_path / "flux"))
    calls: list[float] = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(float(kwargs["timestep"].max())), with_kwargs=True)
    config = sd.CalibrationConfig(num_timestep_buckets=4, propagation_probe_calls=1)
    common = dict(prompts=PROMPTS[:1], num_prompts=1, keep_ratio=0.9, progress=False, calibration_config=config,
                  **SMALL)
    steps = SMALL["num_inference_steps"]
    pipe.slim(call_kwargs=call_kwargs("flux") | {"true_cfg_scale": 2.0}, negative_prompt="", **common)
    # each step is a positive and a negative call at the same timestep (the probe's replays follow)
    sampling = calls[:2 * steps]
    assert sampling[0::2] == sampling[1::2] and len(set(sampling)) == steps and max(calls) <= 1.0, calls
    assert config.num_train_timesteps == 1000
    # the statistics are bucketed over [0, 1]: both buckets hold calls
    pipe = sd.enable_slimdiff(tiny_pipeline("flux", tmp_path / "flux2"))
    saved = tmp_path / "flux.safetensors"
    pipe.slim(call_kwargs=call_kwargs("flux"), save_calibration=saved, **common)
    counts = [v for k, v in sd.Calibration.load(saved).tensors.items() if k.endswith("/n")][0]
    assert int((counts > 0).sum()) == steps, counts  # t = 1 and 0.5: two of the four buckets, not the first alone


def test_slimset_embeds_with_every_text_encoder(tmp_path):
    """The SlimSet embedding concatenates each encoder's masked mean (CLIP + T5 for Flux, 2 CLIPs + T5 for SD3)."""
    sizes = {"flux": 10 + 12, "sd3": 6 + 6 + 12, "pixart_sigma": 12}
    for family, dim in sizes.items():
        emb = embed_prompts(tiny_pipeline(family, tmp_path / family), PROMPTS[:5])
        assert emb.shape == (5, dim) and torch.allclose(emb.norm(dim=1), torch.ones(5))


def test_bad_call_arguments_are_refused_before_calibration(tmp_path):
    pipe = sd.enable_slimdiff(tiny_pipeline("pixart_sigma", tmp_path))
    with pytest.raises(sd.core.errors.ConfigError, match="no argument 'use_resolution_bining'"):
        pipe.slim(prompts=PROMPTS, keep_ratio=0.6, call_kwargs={"use_resolution_bining": False}, **SMALL)
    with pytest.raises(sd.core.errors.ConfigError, match="may not set guidance_scale"):
        pipe.slim(prompts=PROMPTS, keep_ratio=0.6, call_kwargs={"guidance_scale": 2.0}, **SMALL)
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"


# --------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_save_pretrained_round_trips_through_stock_from_pretrained(slimmed, tmp_path):
    family, pipe, _, _, _ = slimmed
    pipe.save_pretrained(tmp_path / "slim")
    index = json.loads((tmp_path / "slim" / "model_index.json").read_text())
    assert index["transformer"] == ["slimdiff_diffusers", SLIM_CLASS[family]]
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "slim")
    assert type(loaded) is type(pipe) and type(loaded.transformer).__name__ == SLIM_CLASS[family]
    _assert_same_weights(pipe.transformer, loaded.transformer)
    # Loaded tensors live in safetensors' memory map at unaligned addresses, so CPU kernels may round the last bit
    # differently (stock diffusers models do the same). Copied to fresh (aligned) memory, the loaded transformer
    # computes bit for bit what the slimmed one does, in the original pipeline's sampling loop too.
    aligned = copy.deepcopy(loaded.transformer)
    assert torch.equal(denoise(family, aligned), denoise(family, pipe.transformer))
    same_encoders = type(pipe).from_pipe(pipe, transformer=aligned)
    assert torch.equal(latents(same_encoders, family), latents(pipe, family))
    torch.testing.assert_close(latents(loaded, family), latents(pipe, family), rtol=1e-4, atol=1e-5)
    # torch_dtype is honoured by the slim class like by the stock one
    half = DiffusionPipeline.from_pretrained(tmp_path / "slim", torch_dtype=torch.bfloat16)
    assert next(half.transformer.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("slimmed", ["flux"], indirect=True)  # family-independent; Flux has every spec kind
def test_damaged_slim_folder_is_refused_with_its_name(slimmed, tmp_path):
    family, pipe, _, _, _ = slimmed
    pipe.transformer.save_pretrained(tmp_path / "transformer")
    config_path = tmp_path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    path, entry = next((p, e) for p, e in config["slimdiff_spec"]["feed_forward"].items() if e.get("kind") == "single")
    entry["width"] += 8  # the weights no longer match the spec
    config_path.write_text(json.dumps(config))
    with pytest.raises(sd.SlimFileError, match="transformer"):
        sd.SlimFluxTransformer2DModel.from_pretrained(tmp_path / "transformer")


def test_single_file_round_trip(slimmed, tmp_path):
    family, pipe, _, _, _ = slimmed
    path = sd.save_slim_model_file(pipe.transformer, tmp_path / "slim_transformer.safetensors")
    loaded = sd.load_slim_model_file(path)
    assert type(loaded).__name__ == SLIM_CLASS[family]
    _assert_same_weights(pipe.transformer, loaded)
    assert torch.equal(denoise(family, copy.deepcopy(loaded)), denoise(family, pipe.transformer))
    assert loaded.config.slimdiff_spec == pipe.transformer.config.slimdiff_spec


# --------------------------------------------------------------------------------------------------
# The Hub
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slimmed", ["flux", "sd3", "pixart_sigma"], indirect=True)  # one per transformer class
def test_push_to_hub_uploads_a_loadable_repository(slimmed, tmp_path, monkeypatch):
    family, pipe, report, _, _ = slimmed
    hub = FakeHub().install(monkeypatch)
    pipe.push_to_hub("someone/tiny-slim", token="hf_test")
    files = hub.files("someone/tiny-slim")
    assert {"README.md", "model_index.json", "transformer/config.json", "slim_transformer.safetensors",
            "images/rank_allocation.png"} <= set(files)
    assert "slim_unet.safetensors" not in files
    cache = hub.materialize(tmp_path / "cache")
    loaded = DiffusionPipeline.from_pretrained("someone/tiny-slim", cache_dir=cache, local_files_only=True)
    _assert_same_weights(pipe.transformer, loaded.transformer)
    card = files["README.md"].decode()
    family_name = {"flux": "Flux", "sd3": "SD3", "pixart_sigma": "PixArt"}[family]
    assert f"feed-forward weights of its {family_name} transformer" in card
    assert "Load Slim Model** node" in card  # the ComfyUI pack loads every family's single file
    assert "`slim_transformer.safetensors`" in card
    # the model's own push: a model repository with its card and single file
    pipe.transformer.push_to_hub("someone/tiny-slim-transformer")
    files = hub.files("someone/tiny-slim-transformer")
    assert {"README.md", "config.json", "diffusion_pytorch_model.safetensors", "slim_transformer.safetensors"} <= \
        set(files)
    assert f"from slimdiff_diffusers import {SLIM_CLASS[family]}" in files["README.md"].decode()
    assert "pipeline_tag: text-to-image" in files["README.md"].decode()


def test_card_counts_of_a_loaded_model_match_the_report(slimmed, tmp_path):
    """A model loaded from disk has no report: the card counts its original size from the spec (meta-built stock
    model + the narrowed tensors), which must agree with what slimming reported."""
    from slimdiff_diffusers.hub.card import collect_card_facts

    family, pipe, report, _, _ = slimmed
    pipe.transformer.save_pretrained(tmp_path / "t")
    loaded = sd.load_slim_model_file(sd.save_slim_model_file(pipe.transformer, tmp_path / "t.safetensors"))
    facts = collect_card_facts(loaded, denoiser_name="transformer")
    s = report.slim
    assert facts.params_before == s.params_before and facts.params_after == s.params_after
    assert (facts.compressible_params_before, facts.compressible_params_after) == \
        (s.compressible_params_before, s.compressible_params_after)
    assert facts.family == report.family and facts.pipeline_tag == "text-to-image"


# --------------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_cli_slim_on_a_saved_transformer_pipeline(family, tmp_path, capsys, monkeypatch):
    tiny_pipeline(family, tmp_path / "parts").save_pretrained(tmp_path / "original")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:6]) + "\n")
    out = tmp_path / "run"
    code = main(["slim", str(tmp_path / "original"), "--prompts", str(tmp_path / "prompts.txt"), "--eval-prompts",
                 str(tmp_path / "prompts.txt"), "--steps", "2", "--num-prompts", "4", "--num-eval-prompts", "2",
                 "--batch-size", "2", "--keep-ratio", "0.6", "--rank-multiple", "2", "--ffn-multiple", "8",
                 "--max-sequence-length", "24", "--height", "16", "--width", "16", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    family_name = {"flux": "Flux transformer", "sd3": "SD3 transformer"}[family]
    assert report["denoiser"] == {"component": "transformer", "family": family_name,
                                  "class": {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel"}[family]}
    assert report["pipeline"] == {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}[family]
    assert report["calibration"]["guidance_scale"] == {"flux": 3.5, "sd3": 7.0}[family]
    assert report["size"]["compressible_after"] <= 0.6 * report["size"]["compressible_before"]
    assert report["speed"]["unet_latency_ms"]["slim"] > 0 and report["quality"]["psnr_db"] > 0
    assert family_name in captured.out and "DiT latency" in captured.out
    # vo_output_refit="auto" refits joint and single-stream readers (decisions row 26): the CLI calibrated with the
    # statistics it needs, and every report says so
    assert report["config"]["vo_output_refit"] == "auto"
    assert report["vo_output_refit"] == {"flux": {"joint": "attention_output", "single": "attention_output"},
                                         "sd3": {"joint": "attention_output"}}[family]
    assert "VO readers (`to_out`, `to_add_out`, `proj_out`): refit by least squares" in (out / "report.md").read_text()
    # vo_statistics="auto" whitens Flux's single-stream VO bases with their attention outputs (decisions row 31)
    assert report["vo_statistics"] == {"flux": {"joint": "input", "single": "attention_output"},
                                       "sd3": {"joint": "input"}}[family]
    bases = "VO bases (`to_v`, `add_v_proj`): whitened with the attention outputs (single attention; joint attention"
    assert (bases in (out / "report.md").read_text()) == (family == "flux")
    card = (out / "pipeline" / "README.md").read_text()
    assert f"its {family_name}" in card and "slim_transformer.safetensors" in card
    assert "value-output readers were refit by least squares" in card and "--vo-output-refit attention_output" in card
    assert ("value-output bases were whitened with the attention outputs (single attention" in card) == \
        (family == "flux")
    loaded = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(loaded.transformer).__name__ == SLIM_CLASS[family]
    # `slimdiff push` adds the transformer's single file and uploads the folder
    hub = FakeHub().install(monkeypatch)
    assert main(["push", str(out), "someone/cli-slim"]) == 0, capsys.readouterr().err
    files = hub.files("someone/cli-slim")
    assert "slim_transformer.safetensors" in files and "transformer/config.json" in files
    single = sd.load_slim_model_file(out / "pipeline" / "slim_transformer.safetensors")
    _assert_same_weights(single, loaded.transformer)
    assert "<repo_id>" not in files["README.md"].decode() and "someone/cli-slim" in files["README.md"].decode()


def _pixart_256_folder(family: str, folder: Path) -> Path:
    """A saved tiny PixArt pipeline in the real 256-pixel layout (transformer sample_size 32, a VAE that
    downsamples 8x), so that the pipeline's own defaults, resolution binning included, run unchanged."""
    torch.manual_seed(0)
    t5_tok = t5_tokenizer()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4,) * 4, layers_per_block=1,
                        latent_channels=4, norm_num_groups=2, sample_size=256).eval()
    cls = PixArtSigmaPipeline if family == "pixart_sigma" else PixArtAlphaPipeline
    cls(tokenizer=t5_tok, text_encoder=_t5(t5_tok, 12), vae=vae, transformer=tiny_pixart_transformer(sample_size=32),
        scheduler=DPMSolverMultistepScheduler()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["pixart_sigma", "pixart_alpha"])
def test_cli_slim_on_a_saved_pixart_pipeline(family, tmp_path, capsys):
    """``slimdiff slim`` on a local PixArt-Σ / -α pipeline folder: the slim folder loads with stock
    ``DiffusionPipeline.from_pretrained``, and at keep 1.0 it generates what the original generates."""
    original_dir = _pixart_256_folder(family, tmp_path / "original")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:6]) + "\n")
    out = tmp_path / "run"
    code = main(["slim", str(original_dir), "--prompts", str(tmp_path / "prompts.txt"), "--eval-prompts",
                 str(tmp_path / "prompts.txt"), "--steps", "2", "--num-prompts", "4", "--num-eval-prompts", "2",
                 "--batch-size", "2", "--keep-ratio", "1.0", "--max-sequence-length", "24", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"] == {"pixart_sigma": "PixArtSigmaPipeline", "pixart_alpha": "PixArtAlphaPipeline"}[family]
    assert report["denoiser"]["class"] == "PixArtTransformer2DModel"
    assert report["calibration"]["guidance_scale"] == 4.5  # the pipeline's own CFG
    assert report["calibration"]["forward_calls"] > 0
    loaded = DiffusionPipeline.from_pretrained(out / "pipeline")
    original = DiffusionPipeline.from_pretrained(original_dir)
    assert type(loaded).__name__ == type(original).__name__
    assert type(loaded.transformer).__name__ == "SlimPixArtTransformer2DModel"
    assert tuple(loaded.config["transformer"]) == ("slimdiff_diffusers", "SlimPixArtTransformer2DModel")

    def generate(pipe) -> torch.Tensor:
        return pipe(PROMPTS[0], num_inference_steps=2, output_type="latent", max_sequence_length=24,
                    generator=torch.Generator().manual_seed(0)).images

    reference, slim = generate(original), generate(loaded)
    assert slim.shape == reference.shape == (1, 4, 32, 32)  # 256 pixels: the pipeline's own default size
    assert float((slim - reference).norm() / reference.norm()) < 1e-4


# PixArt's resolution binning: diffusers' PixArt pipelines snap height x width to an aspect-ratio bin, and have bins
# only for the transformer sample_sizes of the released models (α: 32/64/128; Σ: 256 too); any other sample_size
# makes the pipeline's default call raise "Invalid sample size" before it does anything.

@pytest.mark.parametrize("cls", [PixArtAlphaPipeline, PixArtSigmaPipeline, "PixArtSigmaPAGPipeline"])
def test_slimdiff_knows_which_pixart_sample_sizes_diffusers_bins(cls, tmp_path):
    """The adapter's reading of diffusers' bins agrees with the installed diffusers' own behaviour, per sample size:
    binning on, a call without a prompt raises "Invalid sample size" before its input check exactly when SlimDiff
    says there is no bin (the input check's own error otherwise; nothing is generated either way)."""
    import diffusers

    from slimdiff_diffusers.diffusers_adapter.pipeline import pixart_binned_sample_sizes

    cls = getattr(diffusers, cls) if isinstance(cls, str) else cls
    parts = tiny_pipeline("pixart_sigma", tmp_path).components
    pipe = cls(**{k: parts[k] for k in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")})
    binned = pixart_binned_sample_sizes(pipe)
    assert binned == ([32, 64, 128] if cls is PixArtAlphaPipeline else [32, 64, 128, 256])
    for sample_size in (8, 16, 32, 48, 64, 128, 256, 512):
        pipe.transformer.register_to_config(sample_size=sample_size)
        with pytest.raises(ValueError) as error:
            pipe(prompt=None, use_resolution_binning=True)
        assert ("Invalid sample size" in str(error.value)) == (sample_size not in binned), (sample_size, error.value)
    assert pixart_binned_sample_sizes(tiny_pipeline("flux", tmp_path / "flux")) is None  # no binning there


def test_cli_slims_a_pixart_without_aspect_ratio_bins(tmp_path, capsys):
    """A PixArt whose transformer sample_size has no bin (8 here; 16-pixel images): `slimdiff slim` turns the
    pipeline's resolution binning off for calibration and evaluation, says so once, and slims it (before, the
    pipeline's own call failed inside diffusers: "Invalid sample size")."""
    tiny_pipeline("pixart_sigma", tmp_path / "parts").save_pretrained(tmp_path / "original")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:6]) + "\n")
    out = tmp_path / "run"
    code = main(["slim", str(tmp_path / "original"), "--prompts", str(tmp_path / "prompts.txt"), "--eval-prompts",
                 str(tmp_path / "prompts.txt"), "--steps", "2", "--num-prompts", "4", "--num-eval-prompts", "2",
                 "--batch-size", "2", "--keep-ratio", "0.6", "--rank-multiple", "2", "--ffn-multiple", "8",
                 "--max-sequence-length", "24", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err.count("without resolution binning") == 1, captured.err
    assert "sample_size of 32/64/128/256; this one's is 8" in " ".join(captured.err.split())
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["forward_calls"] > 0 and report["quality"]["psnr_db"] > 0
    assert report["size"]["compressible_after"] <= 0.6 * report["size"]["compressible_before"]
    assert "without resolution binning" in (out / "slimdiff.log").read_text()
    # the slim pipeline is a PixArt too (a subclass of diffusers' transformer): slimming it again, or `slimdiff eval`
    # with it first, gets the same treatment
    from slimdiff_diffusers.diffusers_adapter.pipeline import pixart_binned_sample_sizes

    slim = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(slim.transformer).__name__ == "SlimPixArtTransformer2DModel"
    assert pixart_binned_sample_sizes(slim) == [32, 64, 128, 256]


def _binning_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "slimdiff" and "without resolution binning" in r.getMessage()]


def _record_transformer_calls(pipe) -> list[tuple[int, int]]:
    """The latent (height, width) of every transformer call of ``pipe`` from now on."""
    sizes: list[tuple[int, int]] = []

    def pre(_module, args, kwargs):
        sizes.append(tuple((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[-2:]))
    pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)
    return sizes


@pytest.mark.parametrize("family", ["pixart_sigma", "pixart_alpha"])
def test_pipe_slim_turns_binning_off_for_a_pixart_without_bins(family, tmp_path, caplog):
    """pipe.slim() on a PixArt whose transformer sample_size (8) has no aspect-ratio bin in diffusers: calibrated
    without resolution binning, at exactly the requested size, with one warning through the `slimdiff` logger, and
    slimmed (before, the pipeline's own call raised "Invalid sample size" inside diffusers)."""
    pipe = sd.enable_slimdiff(tiny_pipeline(family, tmp_path))
    sizes = _record_transformer_calls(pipe)
    caplog.set_level("WARNING", logger="slimdiff")
    report = pipe.slim(prompts=PROMPTS, num_prompts=4, keep_ratio=0.6, progress=False,
                       call_kwargs={"max_sequence_length": 24, "clean_caption": False}, **SMALL)
    warnings = _binning_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "sample_size of " + ("32/64/128/256" if family == "pixart_sigma" else "32/64/128") in warnings[0]
    assert "this one's is 8" in warnings[0] and "(16x16)" in warnings[0]
    assert sizes and set(sizes) == {(8, 8)}  # exactly 16x16 pixels: latents 16 / VAE factor 2
    assert type(pipe.transformer).__name__ == "SlimPixArtTransformer2DModel"
    assert report.slim.compressible_params_after <= 0.6 * report.slim.compressible_params_before
    assert report.num_prompts == 4 and report.calibration_forward_calls > 0


def test_pipe_slim_refuses_binning_on_a_pixart_without_bins_before_any_work(tmp_path, caplog):
    """An explicit use_resolution_binning=True on a PixArt without bins for its sample_size cannot run: a clear
    ConfigError before the SlimSet, the calibration or any transformer call; the model is left as it was. An
    explicit False is respected without a warning."""
    pipe = sd.enable_slimdiff(tiny_pipeline("pixart_sigma", tmp_path))
    sizes = _record_transformer_calls(pipe)
    encoder_calls: list[int] = []
    pipe.text_encoder.register_forward_pre_hook(lambda *a: encoder_calls.append(1))
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(sd.core.errors.ConfigError) as error:
        pipe.slim(prompts=PROMPTS, num_prompts=4, keep_ratio=0.6, progress=False,
                  call_kwargs={"max_sequence_length": 24, "clean_caption": False, "use_resolution_binning": True},
                  **SMALL)
    message = " ".join(str(error.value).split())
    assert "use_resolution_binning=True cannot run on this PixArtSigmaPipeline" in message
    assert "sample_size of 32/64/128/256, and this one's is 8" in message
    assert sizes == [] and encoder_calls == []
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    assert all(torch.equal(v, weights[k]) for k, v in pipe.transformer.state_dict().items())
    with pytest.raises(sd.core.errors.ConfigError, match="use_resolution_binning=True cannot run"):
        calibrate_pipeline(pipe, SlimSet(PROMPTS[:2], [0, 1]), num_inference_steps=2, progress=False,
                              use_resolution_binning=True, max_sequence_length=24, clean_caption=False)
    assert sizes == []

    caplog.set_level("WARNING", logger="slimdiff")
    pipe.slim(prompts=PROMPTS, num_prompts=4, keep_ratio=0.6, progress=False, **SMALL,
              call_kwargs={"max_sequence_length": 24, "clean_caption": False, "use_resolution_binning": False})
    assert _binning_warnings(caplog) == [] and sizes
    assert type(pipe.transformer).__name__ == "SlimPixArtTransformer2DModel"


def test_pipe_slim_keeps_binning_on_a_pixart_with_bins(tmp_path, caplog):
    """A PixArt-Σ in the real 256-pixel layout (sample_size 32, which diffusers bins): nothing changes. pipe.slim()
    at 240x240 still calls the pipeline with its binning, which snaps 240x240 to the 256x256 bin (32x32 latents),
    and says nothing about binning."""
    pipe = sd.enable_slimdiff(DiffusionPipeline.from_pretrained(_pixart_256_folder("pixart_sigma", tmp_path / "p")))
    pipe.set_progress_bar_config(disable=True)
    sizes = _record_transformer_calls(pipe)
    caplog.set_level("WARNING", logger="slimdiff")
    pipe.slim(prompts=PROMPTS, num_prompts=2, keep_ratio=0.9, progress=False, num_inference_steps=2, batch_size=2,
              height=240, width=240, rank_multiple=2, ffn_multiple=8,
              call_kwargs={"max_sequence_length": 24, "clean_caption": False})
    assert set(sizes) == {(32, 32)}  # binned: 256 pixels / VAE factor 8
    assert _binning_warnings(caplog) == []
    assert type(pipe.transformer).__name__ == "SlimPixArtTransformer2DModel"


def test_evaluation_turns_binning_off_for_a_pixart_without_bins(tmp_path, caplog):
    """compare_pipelines and generate_images drive the pipeline's call too: the same rule, one warning each, an
    explicit use_resolution_binning=True refused before anything is generated."""
    from slimdiff_diffusers.default_model.evaluate import generate_images
    from slimdiff_diffusers.evaluation.compare import compare_pipelines

    original = tiny_pipeline("pixart_sigma", tmp_path / "a")
    slim = tiny_pipeline("pixart_sigma", tmp_path / "b", seed=1)
    original.set_progress_bar_config(disable=True)
    slim.set_progress_bar_config(disable=True)
    sizes = _record_transformer_calls(original)
    options = dict(num_inference_steps=2, height=16, width=16, max_sequence_length=24, clean_caption=False)
    with pytest.raises(sd.core.errors.ConfigError, match="use_resolution_binning=True cannot run"):
        compare_pipelines(original, slim, PROMPTS[:2], latency_repeats=1, use_resolution_binning=True, **options)
    assert sizes == []
    caplog.set_level("WARNING", logger="slimdiff")
    comparison = compare_pipelines(original, slim, PROMPTS[:2], latency_repeats=1, **options)
    assert len(_binning_warnings(caplog)) == 1 and comparison.psnr_db > 0 and set(sizes) == {(8, 8)}
    caplog.clear()
    images = generate_images(original, PROMPTS[:2], [0, 1], num_inference_steps=2)
    assert len(_binning_warnings(caplog)) == 1 and images.shape == (2, 16, 16, 3)  # its own size: 8 x VAE factor 2


def test_no_resolution_binning_calibrates_at_the_exact_size(tmp_path, capsys, monkeypatch):
    """--no-resolution-binning: a 256-pixel PixArt-Σ calibrated at 240x240 sees 240-pixel latents (30x30), where
    the pipeline's default binning snaps 240x240 to its 256x256 bin (32x32 latents). Pipelines without binning
    refuse the option by name, before any calibration."""
    import slimdiff_diffusers.diffusers_adapter.pipeline as pipeline_module

    real_calibrate = pipeline_module.calibrate_pipeline
    latent_sizes: list[tuple[int, int]] = []

    def calibrate_spy(pipe, slimset, **kwargs):
        def pre(_module, args, kw):
            latent_sizes.append(tuple((kw.get("hidden_states") if "hidden_states" in kw else args[0]).shape[-2:]))
        handle = pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            return real_calibrate(pipe, slimset, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(pipeline_module, "calibrate_pipeline", calibrate_spy)
    original = _pixart_256_folder("pixart_sigma", tmp_path / "original")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    sizes = {}
    for binning in ([], ["--no-resolution-binning"]):
        latent_sizes.clear()
        code = main(["calibrate", str(original), "--prompts", str(tmp_path / "prompts.txt"), "--num-prompts", "2",
                     "--steps", "2", "--height", "240", "--width", "240", "--max-sequence-length", "24",
                     "--out", str(tmp_path / f"calibration{len(binning)}.safetensors"), *binning])
        assert code == 0, capsys.readouterr().err
        sizes[bool(binning)] = set(latent_sizes)
    assert sizes == {False: {(32, 32)}, True: {(30, 30)}}
    assert "without resolution binning" not in capsys.readouterr().err  # binned sizes: no automatic change

    tiny_pipeline("flux", tmp_path / "flux_parts").save_pretrained(tmp_path / "flux")
    latent_sizes.clear()
    code = main(["calibrate", str(tmp_path / "flux"), "--no-resolution-binning", "--out",
                 str(tmp_path / "flux.safetensors")])
    assert code == 2 and latent_sizes == []
    assert "--no-resolution-binning: FluxPipeline has no resolution binning" in capsys.readouterr().err
