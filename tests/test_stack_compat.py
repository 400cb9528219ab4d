"""Slim models stacked with the other speed-ups users combine them with (issue 13, item 1).

Quantization (torchao ``quantize_``, diffusers' ``PipelineQuantizationConfig`` / ``TorchAoConfig`` / ``QuantoConfig``,
optimum-quanto, bitsandbytes), step caching (DeepCache on SD UNets, diffusers' cache hooks on transformers),
token merging (tomesd) and ``torch.compile``.

Where a library runs on the slim model, the test checks that it *uses* the slim layers and processors (not a
silently different computation): at full rank a slim model computes what the original computes, so the library
applied to both must give the same output; at a real budget, the narrow layers must be quantized / called.
Optional libraries are skipped cleanly when absent (``pip install -e ".[stack]"`` installs them).
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
from tiny_models import (flux_inputs, sd3_inputs, tiny_flux_transformer, tiny_sd3_transformer,
                         tiny_sd_pipeline)

import slimdiff_diffusers as sd
from slimdiff_diffusers.diffusers_adapter.attention_processor import LowRankAttnProcessor

SLIM = dict(rank_multiple=2, ffn_multiple=8)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_torchao = pytest.mark.skipif(not _has("torchao"), reason="torchao not installed (pip install '.[stack]')")
needs_quanto = pytest.mark.skipif(not _has("optimum.quanto") if _has("optimum") else True,
                                  reason="optimum-quanto not installed (pip install '.[stack]')")


def _inputs(batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    return x, {"encoder_hidden_states": torch.randn(batch, 7, 24, generator=gen)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def slim_unet(sd15_unet, sd15_calibration):
    return sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.6, **SLIM)


def _narrow_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear-like modules the slim spec narrowed (their paths come from the spec)."""
    spec = model.slimdiff_spec
    paths = [f"{p}.{n}" for p in spec.attention for n in ("to_q", "to_k", "to_v", "to_out.0")]
    paths += [name for name, m in model.named_modules()  # the FFN's up (net.0.proj) and down (net.2) layers
              if hasattr(m, "in_features") and any(name.startswith(f"{p}.") for p in spec.feed_forward)]
    return {p: model.get_submodule(p) for p in paths}


# ------------------------------------------------------------------------------------------------
# Quantization
# ------------------------------------------------------------------------------------------------


@needs_torchao
@pytest.mark.parametrize("mode", ["int8_weight_only", "int8_dynamic"])
def test_torchao_quantize_slim_unet(slim_unet, mode):
    """torchao ``quantize_`` quantizes the narrow layers too, and the result stays close to the slim model."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    config = {"int8_weight_only": Int8WeightOnlyConfig(), "int8_dynamic": Int8DynamicActivationInt8WeightConfig()}[mode]
    x, kw = _inputs()
    with torch.no_grad():
        reference = slim_unet(x, 500, **kw).sample
    quantized = copy.deepcopy(slim_unet)
    quantize_(quantized, config)
    narrow = _narrow_linears(quantized)
    assert narrow
    for path, layer in narrow.items():  # every narrow layer holds an int8 weight of its narrow shape
        assert type(layer.weight) is not torch.Tensor and type(layer.weight) is not nn.Parameter, path
        assert tuple(layer.weight.shape) == tuple(slim_unet.get_submodule(path).weight.shape)
    assert all(isinstance(m.processor, LowRankAttnProcessor)
               for p, m in quantized.named_modules() if p in quantized.slimdiff_spec.attention)
    with torch.no_grad():
        out = quantized(x, 500, **kw).sample
    err = _rel(out, reference)
    assert 0 < err < 0.03, f"int8 ({mode}) changed the slim output by {err:.3e}"


@pytest.fixture(scope="module")
def slim_flux():
    """(original tiny Flux transformer, its keep-0.6 slim copy, call(model, x, t, ctx), one call's x and ctx)."""
    model, call, latent, context = tiny_flux()
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, *context, generator=gen)
    xs = [torch.randn(2, *latent, generator=gen) for _ in range(4)]
    with torch.no_grad():
        calibration = sd.calibrate(model, lambda: [call(model, x, t, ctx) for x, t in zip(xs, (900, 600, 300, 100))])
    slim = sd.slim(model, calibration, keep_ratio=0.6, **SLIM)
    return model, slim, call, xs[0], ctx


@needs_torchao
def test_torchao_int8_weight_only_on_slim_flux(slim_flux, one_thread):
    """torchao int8 weight-only ``quantize_`` on a slim Flux transformer: the narrow joint-attention, single-stream
    and FFN layers hold int8 weights of their narrow shapes, the slim processors stay, the output stays close."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from slimdiff_diffusers.diffusers_adapter.transformer_processors import SlimFluxAttnProcessor

    original, slim, call, x, ctx = slim_flux
    with torch.no_grad():
        reference = call(slim, x, 500, ctx)
    quantized = copy.deepcopy(slim)
    quantize_(quantized, Int8WeightOnlyConfig())
    narrow = _narrowed_linears(quantized, original)
    assert any(".single_transformer_blocks." in f".{n}" for n in narrow) and \
        any(".transformer_blocks." in f".{n}" for n in narrow)
    for path, layer in narrow.items():
        assert type(layer.weight) not in (torch.Tensor, nn.Parameter), f"{path} was not quantized"
        assert tuple(layer.weight.shape) == tuple(slim.get_submodule(path).weight.shape)
    assert all(isinstance(m.processor, SlimFluxAttnProcessor)
               for p, m in quantized.named_modules() if p in quantized.slimdiff_spec.attention)
    with torch.no_grad():
        err = _rel(call(quantized, x, 500, ctx), reference)
    assert 0 < err < 0.03, f"int8 weight-only changed the slim Flux output by {err:.3e}"


def test_compile_slim_flux(slim_flux, one_thread):
    """The whole slim Flux transformer traces into one graph (no break at the narrow layers or the slim processor),
    and inductor compiles a slim single-stream block (narrow proj_mlp / proj_out columns, SlimFluxAttnProcessor)
    to code that computes the same thing."""
    original, slim, call, x, ctx = slim_flux
    torch._dynamo.reset()
    compiled = torch.compile(slim, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(call(compiled, x, 500, ctx), call(slim, x, 500, ctx), atol=1e-5)
    torch._dynamo.reset()
    block = slim.single_transformer_blocks[0]
    assert block.proj_mlp.out_features < original.single_transformer_blocks[0].proj_mlp.out_features or \
        block.attn.to_v.out_features < original.single_transformer_blocks[0].attn.to_v.out_features
    captured = {}
    hook = block.register_forward_pre_hook(lambda _m, a, kw: captured.update(args=a, kwargs=kw), with_kwargs=True)
    with torch.no_grad():
        call(slim, x, 500, ctx)
    hook.remove()
    compiled_block = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        expected = block(*captured["args"], **captured["kwargs"])
        got = compiled_block(*captured["args"], **captured["kwargs"])
    for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert torch.allclose(a, b, atol=1e-5)
    torch._dynamo.reset()


@needs_torchao
def test_calibrating_or_slimming_a_quantized_model_is_refused(sd15_unet, sd15_calibration):
    """Quantize after slimming, not before: a quantized model gets a clear error, not torchao's missing-operator."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from conftest import run_unet

    quantized = copy.deepcopy(sd15_unet)
    quantize_(quantized, Int8WeightOnlyConfig())
    with pytest.raises(sd.UnsupportedModelError, match="Slim first, then quantize"):
        sd.calibrate(quantized, run_unet(quantized, batches=1))
    with pytest.raises(sd.UnsupportedModelError, match="Slim first, then quantize"):
        sd.slim(quantized, sd15_calibration, keep_ratio=0.6, **SLIM)


@pytest.fixture(scope="module")
def saved_slim_pipeline(tmp_path_factory, sd15_calibration):
    """A tiny SD pipeline whose UNet is slimmed (keep 0.6), saved with save_pretrained; and a reference image."""
    tmp = tmp_path_factory.mktemp("slim_pipe")
    pipe = tiny_sd_pipeline(tmp)
    pipe.unet = sd.slim(pipe.unet, sd15_calibration, keep_ratio=0.6, **SLIM)
    pipe.save_pretrained(tmp / "saved")
    return tmp / "saved", _image(pipe)


def _image(pipe, steps: int = 3):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=steps, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _check_quantized_slim_pipeline(pipe, reference_image, quantized_type_check) -> None:
    unet = pipe.unet
    assert type(unet).__name__ == "SlimUNet2DConditionModel"
    for path, layer in _narrow_linears(unet).items():
        assert quantized_type_check(layer), f"{path} was not quantized: {type(layer).__name__}"
    image = _image(pipe)
    diff = abs(image - reference_image).max()
    assert 0 < diff < 0.05, f"the quantized slim pipeline's image differs by {diff:.3e}"


@needs_torchao
def test_saved_slim_pipeline_loads_with_torchao_config(saved_slim_pipeline):
    """``DiffusionPipeline.from_pretrained(slim_folder, quantization_config=PipelineQuantizationConfig(...))``."""
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    folder, reference = saved_slim_pipeline
    config = PipelineQuantizationConfig(quant_mapping={"unet": TorchAoConfig(Int8WeightOnlyConfig())})
    # diffusers' torchao quantizer defaults the dtype to bf16; fp32 keeps the comparison about int8 alone
    pipe = DiffusionPipeline.from_pretrained(folder, quantization_config=config, dtype=torch.float32)
    _check_quantized_slim_pipeline(pipe, reference,
                                   lambda layer: type(layer.weight) not in (torch.Tensor, nn.Parameter))


@needs_quanto
def test_saved_slim_pipeline_loads_with_quanto_config(saved_slim_pipeline):
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig, QuantoConfig

    folder, reference = saved_slim_pipeline
    config = PipelineQuantizationConfig(quant_mapping={"unet": QuantoConfig(weights_dtype="int8")})
    pipe = DiffusionPipeline.from_pretrained(folder, quantization_config=config)
    _check_quantized_slim_pipeline(pipe, reference, lambda layer: type(layer).__name__ == "QLinear")


@needs_quanto
def test_optimum_quanto_quantize_freeze(slim_unet):
    from optimum.quanto import freeze, qint8, quantize

    x, kw = _inputs()
    with torch.no_grad():
        reference = slim_unet(x, 500, **kw).sample
    quantized = copy.deepcopy(slim_unet)
    quantize(quantized, weights=qint8)
    freeze(quantized)
    assert all(type(layer).__name__ == "QLinear" for layer in _narrow_linears(quantized).values())
    with torch.no_grad():
        err = _rel(quantized(x, 500, **kw).sample, reference)
    assert 0 < err < 0.03


@pytest.mark.skipif(not _has("bitsandbytes"), reason="bitsandbytes not installed")
def test_bitsandbytes_layers_on_slim_unet(slim_unet):
    """bitsandbytes' int8 / nf4 layers replace the narrow Linears (their own CPU kernels).

    diffusers' ``BitsAndBytesConfig`` loading path refuses to run without a GPU ("No GPU found. A GPU is needed
    for quantization.", diffusers' bnb quantizer ``validate_environment``), so on this CPU machine the layers are
    swapped in directly, as diffusers' ``replace_with_bnb_linear`` would do; the loading path itself is
    :func:`test_bitsandbytes_config_on_gpu`.
    """
    import bitsandbytes as bnb

    x, kw = _inputs()
    with torch.no_grad():
        reference = slim_unet(x, 500, **kw).sample
    for kind, tolerance in (("int8", 0.03), ("nf4", 0.3)):
        quantized = copy.deepcopy(slim_unet)
        for path, layer in _narrow_linears(quantized).items():
            parent_path, _, name = path.rpartition(".")
            parent = quantized.get_submodule(parent_path)
            weight = layer.weight.data.clone()
            if kind == "int8":
                new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                          has_fp16_weights=False)
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                        compute_dtype=torch.float32)
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if layer.bias is not None:
                new.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
            parent._modules[name] = new.to("cpu")  # moving the parameters quantizes them
        with torch.no_grad():
            err = _rel(quantized(x, 500, **kw).sample, reference)
        assert 0 < err < tolerance, f"bitsandbytes {kind}: {err:.3e}"


@pytest.mark.skipif(not torch.cuda.is_available() or not _has("bitsandbytes"), reason="needs a GPU and bitsandbytes")
def test_bitsandbytes_config_on_gpu(saved_slim_pipeline):
    from diffusers import BitsAndBytesConfig, DiffusionPipeline, PipelineQuantizationConfig

    folder, reference = saved_slim_pipeline
    config = PipelineQuantizationConfig(quant_mapping={"unet": BitsAndBytesConfig(load_in_8bit=True)})
    pipe = DiffusionPipeline.from_pretrained(folder, quantization_config=config, dtype=torch.float16).to("cuda")
    pipe.unet.to("cuda")
    assert type(pipe.unet).__name__ == "SlimUNet2DConditionModel"
    image = _image(pipe)
    assert abs(image - reference).max() < 0.1


# ------------------------------------------------------------------------------------------------
# DeepCache and tomesd on SD UNets: the same library on the original and on a full-rank slim UNet
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def sd_pipelines(tmp_path, sd15_calibration):
    """(original pipeline, full-rank slim pipeline, keep-0.6 slim pipeline): same components but the UNet."""
    original = tiny_sd_pipeline(tmp_path)
    full, slim = tiny_sd_pipeline(tmp_path / "a"), tiny_sd_pipeline(tmp_path / "b")
    full.unet = sd.slim(original.unet, sd15_calibration, keep_ratio=1.0)
    slim.unet = sd.slim(original.unet, sd15_calibration, keep_ratio=0.6, **SLIM)
    assert full.unet.slimdiff_spec.attention and slim.unet.slimdiff_spec.attention
    return original, full, slim


class _CountingProcessor(LowRankAttnProcessor):
    """LowRankAttnProcessor that counts its calls (slim-aware by declaration: it computes the same thing)."""

    slimdiff_compatible = True

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


@pytest.mark.skipif(not _has("tomesd"), reason="tomesd not installed (pip install '.[stack]')")
def test_tomesd_runs_through_the_slim_processors(sd_pipelines):
    import tomesd

    original, full, slim = sd_pipelines
    # merge tokens at the 16x16 latent's full resolution (the default only merges at the highest resolution)
    patch = dict(ratio=0.5, max_downsample=8, sx=2, sy=2)
    plain = _image(slim)
    for pipe in sd_pipelines:
        tomesd.apply_patch(pipe, **patch)
    merged_original = _image(original)
    # full rank: the slim UNet under tomesd computes what the original computes under tomesd
    assert abs(_image(full) - merged_original).max() < 1e-4
    counter = _CountingProcessor()
    slim.unet.set_attn_processor(counter)
    merged_slim = _image(slim)
    assert counter.calls > 0, "tomesd bypassed the slim attention processor"
    assert abs(merged_slim - plain).max() > 0, "tomesd did not merge any token"
    tomesd.remove_patch(slim)
    slim.unet.set_attn_processor(LowRankAttnProcessor())
    assert (_image(slim) == plain).all()


@pytest.mark.skipif(not _has("DeepCache"), reason="DeepCache not installed (pip install '.[stack]')")
def test_deepcache_on_slim_unet(sd_pipelines):
    from DeepCache import DeepCacheSDHelper

    original, full, slim = sd_pipelines
    plain = _image(slim, steps=4)
    images = []
    for pipe in sd_pipelines:
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=2, cache_branch_id=0)
        helper.enable()
        images.append(_image(pipe, steps=4))
        helper.disable()
    cached_original, cached_full, cached_slim = images
    assert abs(cached_full - cached_original).max() < 1e-4  # full rank: DeepCache computes the same thing
    assert abs(cached_slim - plain).max() > 0  # the cache was used on the slim UNet
    assert (_image(slim, steps=4) == plain).all()  # and removed cleanly


# ------------------------------------------------------------------------------------------------
# diffusers' cache hooks on transformer denoisers
# ------------------------------------------------------------------------------------------------


def tiny_pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=3,
                                     num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                     caption_channels=24, norm_num_groups=8, use_additional_conditions=False).eval()

    def call(m, x, t, ctx):
        return m(x, encoder_hidden_states=ctx, timestep=torch.tensor([t] * x.shape[0]),
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    return model, call, (4, 8, 8), (6, 24)


def tiny_flux(seed: int = 0):
    """Flux.1 layout (double + single-stream blocks, RoPE, QK-norm): 16 packed latent tokens, 5 text tokens; the
    pipeline's ``timestep / 1000``."""
    model = tiny_flux_transformer(seed)
    fixed = flux_inputs(model)  # ids and pooled text; latents, text and timestep come per call

    def call(m, x, t, ctx):
        return m(**(fixed | {"hidden_states": x, "encoder_hidden_states": ctx,
                             "timestep": torch.full((x.shape[0],), t / 1000)}))[0]

    return model, call, (16, model.config.in_channels), (5, model.config.joint_attention_dim)


def tiny_sd3(seed: int = 0):
    """SD3 layout (joint blocks, ``context_pre_only`` last block, no QK-norm: q/k are narrowed too)."""
    model = tiny_sd3_transformer(seed)
    fixed = sd3_inputs(model)

    def call(m, x, t, ctx):
        return m(**(fixed | {"hidden_states": x, "encoder_hidden_states": ctx,
                             "timestep": torch.full((x.shape[0],), float(t))}))[0]

    cfg = model.config
    return model, call, (cfg.in_channels, cfg.sample_size, cfg.sample_size), (5, cfg.joint_attention_dim)


# Transformer denoisers: name -> builder returning (model, call(model, x, t, ctx), latent shape, context shape)
TRANSFORMERS = {"pixart": tiny_pixart, "flux": tiny_flux, "sd3": tiny_sd3}


def _enable_cache(model: nn.Module, config) -> None:
    """``model.enable_cache(config)`` where the model class has diffusers' CacheMixin (Flux, SD3, ...), else the
    hook function ``enable_cache`` itself calls (PixArt has no CacheMixin)."""
    if hasattr(model, "enable_cache"):
        model.enable_cache(config)
        return
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig,
                                 TaylorSeerCacheConfig, apply_faster_cache, apply_first_block_cache,
                                 apply_pyramid_attention_broadcast, apply_taylorseer_cache)

    apply = {FirstBlockCacheConfig: apply_first_block_cache,
             PyramidAttentionBroadcastConfig: apply_pyramid_attention_broadcast,
             FasterCacheConfig: apply_faster_cache, TaylorSeerCacheConfig: apply_taylorseer_cache}[type(config)]
    apply(model, config)


def _cache_configs(timestep_box: list[int], arch: str = ""):
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig,
                                 TaylorSeerCacheConfig)

    return {
        "first_block": FirstBlockCacheConfig(threshold=0.5),
        "pyramid_broadcast": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: timestep_box[0]),
        # guidance-distilled mode (Flux.1-schnell/-dev style): attention reuse with FasterCache's weighting, no
        # unconditional-batch skipping (these tests run one conditional batch)
        "faster_cache": FasterCacheConfig(  # its default range: the first, high-noise steps (t >= 681) are computed
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=lambda: timestep_box[0], attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=True),
        # fp32 factors: the full-rank comparison below is about the slim layers, not bf16 rounding of the forecast.
        # Its default module patterns end in "attn" (Flux, SD3); PixArt's attentions are attn1 / attn2.
        "taylorseer": TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=1, max_order=1, taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"^transformer_blocks\.\d+\.attn\d"] if arch == "pixart" else None),
    }


def _narrowed_linears(slim: nn.Module, original: nn.Module) -> dict[str, nn.Module]:
    """The slim model's Linear layers whose weight is narrower than the original's at the same path."""
    originals = dict(original.named_modules())
    return {name: m for name, m in slim.named_modules()
            if isinstance(m, nn.Linear) and name in originals and m.weight.shape != originals[name].weight.shape}


# (arch, cache) pairs that fail in diffusers itself, on the stock model: the test checks that they still do
_FAILS_IN_DIFFUSERS: dict[tuple[str, str], str] = {
    ("sd3", "first_block"): "diffusers' First Block Cache subtracts the text-stream output of SD3's last block, "
                            "which is None there (context_pre_only): a TypeError on the stock SD3 model",
}


@pytest.mark.parametrize("arch", list(TRANSFORMERS))
@pytest.mark.parametrize("cache", ["first_block", "pyramid_broadcast", "faster_cache", "taylorseer"])
def test_diffusers_cache_hooks_on_slim_transformer(arch, cache, one_thread):
    """Each diffusers cache hook on a slim transformer: at full rank it computes what it computes on the original;
    at keep 0.6 it runs on the slim model, calls its narrow layers and reuses something."""
    from diffusers.models.cache_utils import CacheMixin

    build = TRANSFORMERS[arch]
    model, call, latent, context = build()
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, *context, generator=gen)
    steps = [(torch.randn(2, *latent, generator=gen), t) for t in (900, 700, 500, 300, 100)]
    calibration = sd.calibrate(model, lambda: [call(model, x, t, ctx) for x, t in steps])
    full = sd.slim(model, calibration, keep_ratio=1.0)
    slim = sd.slim(model, calibration, keep_ratio=0.6, **SLIM)
    narrow = _narrowed_linears(slim, model)
    assert narrow, f"keep 0.6 narrowed nothing in the tiny {arch}"

    # consecutive sampling steps are close, as in a real loop, so the caches have something to reuse
    base = steps[0][0]
    trajectory = [(base + 0.01 * i * torch.randn(base.shape, generator=gen), t) for i, (_, t) in enumerate(steps)]

    def run(m):
        box = [0]
        _enable_cache(m, _cache_configs(box, arch)[cache])
        outs = []
        with torch.no_grad():
            for i, (x, t) in enumerate(trajectory):
                box[0] = t
                # what a pipeline wraps each denoiser call in (CacheMixin.cache_context; PixArt lacks the mixin)
                with CacheMixin.cache_context(m, "cond", step_index=i, timestep=t):
                    outs.append(call(m, x, t, ctx))
        return outs

    def plain(m):
        with torch.no_grad():
            return [call(m, x, t, ctx) for x, t in trajectory]

    if (arch, cache) in _FAILS_IN_DIFFUSERS:
        with pytest.raises(TypeError):
            run(copy.deepcopy(model))
        pytest.skip(_FAILS_IN_DIFFUSERS[arch, cache])
    plain_slim = plain(slim)
    calls = dict.fromkeys(narrow, 0)
    handles = [layer.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
               for name, layer in narrow.items()]
    cached_original, cached_full, cached_slim = run(copy.deepcopy(model)), run(full), run(slim)
    for h in handles:
        h.remove()
    for i, (a, b) in enumerate(zip(cached_full, cached_original)):  # full rank: the hook computes the same thing
        assert _rel(a, b) < 1e-4, f"step {i}: {cache} on the full-rank slim {arch} differs by {_rel(a, b):.2e}"
    assert all(torch.isfinite(o).all() for o in cached_slim)
    uncalled = [name for name, n in calls.items() if n == 0]
    assert not uncalled, f"{cache} on the slim {arch} never called the narrow layers {uncalled}"
    reused = [i for i, (a, b) in enumerate(zip(cached_slim, plain_slim)) if not torch.equal(a, b)]
    assert reused, f"{cache} never reused anything on the slim {arch}"
    assert torch.equal(cached_slim[0], plain_slim[0])  # the first step is always computed


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


def test_compile_slim_unet_fullgraph(slim_unet):
    """The whole slim UNet traces into one graph (no graph break at the narrow layers or LowRankAttnProcessor)."""
    torch._dynamo.reset()
    x, kw = _inputs()
    compiled = torch.compile(slim_unet, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x, 500, **kw).sample, slim_unet(x, 500, **kw).sample, atol=1e-5)
    torch._dynamo.reset()


def test_compile_inductor_slim_transformer_block(slim_unet):
    """Inductor (CPU) compiles a slim transformer block (narrow q/k/v/out, FFN, LowRankAttnProcessor) to code that
    computes the same thing. One block keeps the compile short; the full model is compiled in benchmarks/stack.py."""
    torch._dynamo.reset()
    path = next(iter(slim_unet.slimdiff_spec.attention)).rsplit(".", 1)[0]  # ...transformer_blocks.0
    block = slim_unet.get_submodule(path)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, block.attn1.to_q.in_features, generator=gen)
    ctx = torch.randn(2, 7, 24, generator=gen)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(hidden, encoder_hidden_states=ctx), block(hidden, encoder_hidden_states=ctx),
                              atol=1e-5)
    torch._dynamo.reset()
