"""LoRAs made for the original transformer on slim Flux and PixArt (issue 10: "the slim model still takes their
LoRAs"; method.md §3.5).

Nearly every Flux LoRA (kohya / ai-toolkit / diffusers-trained) targets ``single_transformer_blocks.N.proj_out``,
a Linear over ``concat[attention heads, MLP]`` that slimming narrows on both sides. PixArt LoRAs are PEFT adapters
on attn1/attn2 and the FFN, and stock PixArt has no diffusers adapter API. Real parts: tiny
``FluxTransformer2DModel``/``PixArtTransformer2DModel``s (tests/tiny_models.py), PEFT adapters with random factors
saved the way their trainers save them, ``FluxPipeline.load_lora_weights`` and the model-level ``load_lora_adapter``.

"Slimming W + ΔW with the same bases" is computed here two ways that do not go through the LoRA translation: the
stored maps applied by this file's own code to the fused original's weights (after checking that the maps applied
to the original's weights give the slim weights), and for ``proj_out`` straight from the plan's decompositions.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")
from diffusers import FluxPipeline  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tiny_models import (  # noqa: E402
    flux_inputs,
    fused_lora_copy,
    pixart_inputs,
    random_lora,
    tiny_flux_transformer,
    tiny_pixart_transformer,
)
from tiny_models import relative_difference as _rel  # noqa: E402

import slimdiff_diffusers as sd  # noqa: E402
from slimdiff_diffusers.core import CalibrationConfig, calibrate  # noqa: E402
from slimdiff_diffusers.core.basis_maps import (  # noqa: E402
    LORA_MAPS_FILE,
    MAPS_FORMAT,
    SINGLE_OUT,
    BasisMaps,
    lora_map_key,
    narrowed_linear_roles,
)
from slimdiff_diffusers.core.decompositions import FFNDecomposition, LinearRef, VODecomposition  # noqa: E402
from slimdiff_diffusers.core.errors import LoraMappingError, SlimFileError  # noqa: E402
from slimdiff_diffusers.diffusers_adapter.slimming import slim  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SINGLE_PROJ_OUT = r".*single_transformer_blocks\.\d+\.proj_out"
# q/k/v/proj_mlp/proj_out of the single-stream blocks, both streams of the double blocks and their FFNs
MIXED = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
         "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
SETTINGS = dict(rank_multiple=2, ffn_multiple=8)


@pytest.fixture(scope="module")
def flux(one_thread):
    """The original tiny Flux, its calibration, and slim copies at keep 1.0, 0.6 and 0.4, and at 0.4 with the VO
    readers refit (one decomposition cache)."""
    model = tiny_flux_transformer()
    # attention-output statistics: the "refit" slim model refits its VO readers against them (vo_output_refit)
    config = CalibrationConfig(num_train_timesteps=1, num_timestep_buckets=1, propagation_probe_calls=2,
                               attention_output_statistics=True)
    # 8 calls: every refit sees more tokens (the text stream: 80) than its width (64), so it is well determined
    calibration = calibrate(model, lambda: [model(**flux_inputs(model, seed=s)) for s in range(8)], config)
    cache: dict = {}
    slims = {keep: slim(model, calibration, keep_ratio=keep, decomposition_cache=cache, vo_output_refit="none",
                        **SETTINGS) for keep in (1.0, 0.6, 0.4)}
    # keep 0.4: the first budget here that narrows the joint attentions' VO as well
    slims["refit"] = slim(model, calibration, keep_ratio=0.4, decomposition_cache=cache,
                          vo_output_refit="attention_output", **SETTINGS)
    spec = slims[0.6].slimdiff_spec
    # keep 0.6 narrows both sides of every single-stream proj_out (the case the maps must get right)
    assert all(a.vo_rank < a.head_dim for p, a in spec.attention.items() if a.kind == "single")
    assert all(f.width < f.inner_dim for f in spec.feed_forward.values() if f.kind == "single")
    return SimpleNamespace(model=model, calibration=calibration, cache=cache, slims=slims)


def _lora(model, targets, seed: int = 1, **config):
    """(donor: ``model`` + a random LoRA, its PEFT state dict, its LoraConfig); ``model`` is not changed."""
    return random_lora(model, targets, seed=seed, std=0.1, **config)


def _fused(donor):
    """The original with the LoRA merged into its weights (diffusers' fuse_lora, then the adapter removed)."""
    return fused_lora_copy(donor)


def _out(model, seed: int = 9) -> torch.Tensor:
    with torch.no_grad():
        return model(**flux_inputs(model, seed=seed))[0]


def _pipeline(transformer) -> FluxPipeline:
    """A FluxPipeline around the transformer: load_lora_weights is FluxLoraLoaderMixin's (the text side is empty)."""
    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


def _load(route: str, model, state, cfg, folder):
    """Load the LoRA on ``model`` (changed in place) through the model-level or the pipeline-level route."""
    if route == "model":
        model.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict())
    else:
        if not (folder / "pytorch_lora_weights.safetensors").exists():
            FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                           transformer_lora_adapter_metadata=cfg.to_dict())
        _pipeline(model).load_lora_weights(folder)
    return model


def _mapped(slim_model, original, weights_from):
    """The slim model with every narrowed Linear recomputed as "the slimming's bases applied to ``weights_from``"
    (a model of the original shapes), by this file's own reading of the maps (BasisMaps' docstring)."""
    maps: BasisMaps = slim_model.slimdiff_basis_maps
    out = copy.deepcopy(slim_model)
    roles = narrowed_linear_roles(slim_model, slim_model.slimdiff_spec, maps)
    with torch.no_grad():  # layers slimming did not touch are the same function of W: W itself
        for name, tensor in out.state_dict().items():
            if name.rpartition(".")[0] not in roles:
                tensor.copy_(weights_from.state_dict()[name])
    for path, role in roles.items():
        src, orig, dst = weights_from.get_submodule(path), original.get_submodule(path), out.get_submodule(path)
        w, b = src.weight.double(), (src.bias.double() if src.bias is not None else None)
        key = lora_map_key(path, maps)
        if role in ("q", "k", "v"):
            t = maps.output[key].double()
            heads, dh = t.shape[0], t.shape[2]
            new_w = torch.cat([t[h] @ w.reshape(heads, dh, -1)[h] for h in range(heads)])
            new_b = None if b is None else torch.cat([t[h] @ b.reshape(heads, dh)[h] for h in range(heads)])
        elif role == "out":
            s = maps.input[key].double()
            dh = s.shape[1]
            new_w = torch.cat([w[:, h * dh:(h + 1) * dh] @ s[h] for h in range(s.shape[0])], 1)
            new_b = b
        elif role == "up":
            rows = maps.rows[key]
            new_w, new_b = w[rows], (None if b is None else b[rows])
        else:
            heads_map = maps.attention_input.get(key) if role == SINGLE_OUT else None
            mlp_map = maps.mlp_input.get(key) if role == SINGLE_OUT else maps.input[key]
            d_attn = 0
            parts = []
            if role == SINGLE_OUT:
                if heads_map is None:  # the attention columns were kept: all but the MLP's last m
                    d_attn = w.shape[1] - mlp_map.shape[0]
                    parts.append(w[:, :d_attn])
                else:
                    d_attn = heads_map.shape[0] * heads_map.shape[1]
                    s = heads_map.double()
                    dh = s.shape[1]
                    parts += [w[:, h * dh:(h + 1) * dh] @ s[h] for h in range(s.shape[0])]
            w_mlp = w[:, d_attn:] if role == SINGLE_OUT else w
            parts.append(w_mlp @ mlp_map.double() if mlp_map is not None else w_mlp)
            new_w = torch.cat(parts, 1)
            new_b = dst.bias.double()
            if key in maps.bias:  # the intercept: the slim bias moves with the MLP columns' change
                w0 = orig.weight.double()
                new_b = new_b + (w_mlp - (w0[:, d_attn:] if role == SINGLE_OUT else w0)) @ maps.bias[key].double()
        with torch.no_grad():
            dst.weight.copy_(new_w)
            if new_b is not None and dst.bias is not None:
                dst.bias.copy_(new_b)
    return out


# --------------------------------------------------------------------------------------------------- the maps


def test_maps_cover_single_stream_proj_out_and_reproduce_the_slim_weights(flux):
    """Applied to the original's weights, the maps give the slim weights of every narrowed layer, both sides of
    each single-stream proj_out (and its refit bias) included: they are the slimming's own bases."""
    slim_model = flux.slims[0.6]
    maps = slim_model.slimdiff_basis_maps
    roles = narrowed_linear_roles(slim_model, slim_model.slimdiff_spec, maps)
    single = [p for p, r in roles.items() if r == SINGLE_OUT]
    assert single == ["single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"]
    assert set(maps.attention_input) == set(maps.mlp_input) == set(single) and set(single) <= set(maps.bias)
    assert not set(single) & set(maps.input)  # the heads' map is not mistaken for a down projection's
    rebuilt = _mapped(slim_model, flux.model, flux.model)
    for path in roles:
        for name in ("weight", "bias"):
            got, want = getattr(rebuilt.get_submodule(path), name), getattr(slim_model.get_submodule(path), name)
            if want is not None:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"{path}.{name}")
    for path, bias_map in maps.bias.items():  # the refit intercept: slim bias = b + W_mlp M_b (M[m, k] = 1 − O(δ))
        layer, d_attn = flux.model.get_submodule(path), 0
        if path in maps.attention_input:
            d_attn = maps.attention_input[path].shape[0] * maps.attention_input[path].shape[1]
        torch.testing.assert_close(layer.bias + layer.weight[:, d_attn:] @ bias_map,
                                   slim_model.get_submodule(path).bias, atol=1e-5, rtol=1e-4, msg=path)


def test_proj_out_map_equals_the_slimming_of_the_fused_weights(flux):
    """Layer-level, from the decompositions themselves (not the maps): slimming proj_out's W + ΔW with the plan's
    VO bases (Ŵ_o = Σ_r^{-1/2} U_rᵀ R W_o per head) and its MLP refit (same channels J, same moment) equals the slim
    proj_out with the translated LoRA merged (its lora_B bias included)."""
    donor, state, cfg = _lora(flux.model, SINGLE_PROJ_OUT)
    fused = _fused(donor)
    slim_model = copy.deepcopy(flux.slims[0.6])
    slim_model.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict())
    slim_model.fuse_lora()
    spec = slim_model.slimdiff_spec
    decompositions = {key[0]: value for key, value in flux.cache.items() if isinstance(key, tuple)}
    for block in ("single_transformer_blocks.0", "single_transformer_blocks.1"):
        attention, mlp = spec.attention[f"{block}.attn"], spec.feed_forward[block]
        vo: VODecomposition = decompositions[f"{block}.attn:vo"]
        ffn: FFNDecomposition = decompositions[f"{block}:ffn"]
        layer = fused.get_submodule(f"{block}.proj_out")
        w, heads, dh, r = layer.weight.double(), attention.heads, attention.head_dim, attention.vo_rank
        d_attn = heads * dh
        wo = w[:, :d_attn].T.reshape(heads, dh, -1)  # math layout per head (dh, d_out)
        s = vo.s[:, :r]
        attn_cols = (s.rsqrt()[:, :, None] * vo.u[:, :, :r].transpose(1, 2) @ vo.r @ wo)  # (H, r, d_out)
        refit = dataclasses.replace(ffn, down=LinearRef.of(layer.weight[:, d_attn:], layer.bias)).weights(mlp.width)
        expected_w = torch.cat([attn_cols.reshape(heads * r, -1).T, refit["down.weight"]], 1)
        merged = slim_model.get_submodule(f"{block}.proj_out").get_base_layer()
        torch.testing.assert_close(merged.weight.double(), expected_w, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged.bias.double(), refit["down.bias"], atol=1e-5, rtol=1e-4)


def test_refit_readers_have_their_own_maps_and_take_the_lora_exactly(flux, tmp_path):
    """vo_output_refit: every VO reader is refit against the head outputs it reads, so a joint attention's
    to_add_out (text queries) gets a map of its own, apart from to_out.0's (image queries). The maps still give the
    slim weights from the original's, a LoRA on every stream maps exactly, and the saved maps (format 3) keep
    to_add_out's own map."""
    slim_model, plain = flux.slims["refit"], flux.slims[0.4]
    maps = slim_model.slimdiff_basis_maps
    joint = [p for p, a in slim_model.slimdiff_spec.attention.items() if a.kind == "joint" and a.vo_rank < a.head_dim]
    assert joint, "keep 0.4 should narrow the VO of a joint attention"
    for path in joint:
        own, first = maps.input[f"{path}.to_add_out"], maps.input[f"{path}.to_out.0"]
        assert lora_map_key(f"{path}.to_add_out", maps) == f"{path}.to_add_out"
        assert (own - first).abs().max() > 1e-3  # refit against different head outputs: a different map
        # the refit changed the weights, not the widths or the value bases
        assert slim_model.get_submodule(f"{path}.to_v").weight.equal(plain.get_submodule(f"{path}.to_v").weight)
        assert not slim_model.get_submodule(f"{path}.to_add_out").weight.equal(
            plain.get_submodule(f"{path}.to_add_out").weight)
    rebuilt = _mapped(slim_model, flux.model, flux.model)
    for path in narrowed_linear_roles(slim_model, slim_model.slimdiff_spec, maps):
        torch.testing.assert_close(rebuilt.get_submodule(path).weight, slim_model.get_submodule(path).weight,
                                   atol=1e-5, rtol=1e-4, msg=path)
    donor, state, cfg = _lora(flux.model, MIXED)
    expected = _out(_mapped(slim_model, flux.model, _fused(donor)))
    loaded = _load("model", copy.deepcopy(slim_model), state, cfg, tmp_path)
    assert _rel(_out(loaded), expected) < 1e-4
    assert _rel(_out(loaded) - _out(slim_model), expected - _out(slim_model)) < 1e-3
    slim_model.save_pretrained(tmp_path / "slim")
    with safe_open(str(tmp_path / "slim" / LORA_MAPS_FILE), framework="pt") as f:
        assert f.metadata()["slimdiff.lora_maps.format"] == MAPS_FORMAT == "3"
        assert f"input:{joint[0]}.to_add_out" in set(f.keys())
    reloaded = BasisMaps.load(tmp_path / "slim" / LORA_MAPS_FILE, slim_model.slimdiff_spec)
    torch.testing.assert_close(reloaded.input[f"{joint[0]}.to_add_out"], maps.input[f"{joint[0]}.to_add_out"])


# --------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("route", ["model", "pipeline"])
@pytest.mark.parametrize("targets", [SINGLE_PROJ_OUT, MIXED], ids=["proj_out", "mixed"])
def test_full_rank_slim_flux_with_lora_is_the_original_with_lora(flux, route, targets, tmp_path):
    donor, state, cfg = _lora(flux.model, targets)
    expected = _out(donor)
    assert _rel(expected, _out(flux.model)) > 0.02  # the LoRA does change the output
    loaded = _load(route, copy.deepcopy(flux.slims[1.0]), state, cfg, tmp_path)
    assert any("single_transformer_blocks.0.proj_out.lora_A" in k for k in loaded.state_dict())
    assert _rel(_out(loaded), expected) < 1e-4


@pytest.mark.parametrize("route", ["model", "pipeline"])
@pytest.mark.parametrize("targets", [SINGLE_PROJ_OUT, MIXED], ids=["proj_out", "mixed"])
def test_reduced_slim_flux_with_lora_is_the_slimming_of_the_fused_original(flux, route, targets, tmp_path):
    """keep 0.6: the slim model + translated LoRA computes what the slimming's bases make of the LoRA-fused
    original's weights (the map is exact), through both loading routes."""
    donor, state, cfg = _lora(flux.model, targets)
    slim_model = flux.slims[0.6]
    expected = _out(_mapped(slim_model, flux.model, _fused(donor)))
    assert _rel(expected, _out(slim_model)) > 0.02
    loaded = _load(route, copy.deepcopy(slim_model), state, cfg, tmp_path)
    # no narrowed layer was resized (diffusers' Flux pipelines widen layers narrower than a LoRA's factors)
    for path in narrowed_linear_roles(slim_model, slim_model.slimdiff_spec, slim_model.slimdiff_basis_maps):
        layer = loaded.get_submodule(path)
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        assert layer.weight.shape == slim_model.get_submodule(path).weight.shape, path
    assert _rel(_out(loaded), expected) < 1e-4
    # the LoRA's own effect is carried, not just the slim model's output
    assert _rel(_out(loaded) - _out(slim_model), expected - _out(slim_model)) < 1e-3


@pytest.mark.parametrize("targets", [("vo",), ("ffn",)], ids=["only-vo", "only-mlp"])
def test_proj_out_with_one_side_narrowed(flux, targets):
    """Only one of proj_out's column blocks changed (the other group not slimmed): that block has its map, the other
    is kept as it is, and the LoRA's A passes unchanged there."""
    slim_model = slim(flux.model, flux.calibration, keep_ratio=0.6, targets=targets, **SETTINGS)
    maps, spec = slim_model.slimdiff_basis_maps, slim_model.slimdiff_spec
    roles = narrowed_linear_roles(slim_model, spec, maps)
    assert roles["single_transformer_blocks.0.proj_out"] == SINGLE_OUT
    assert bool(maps.attention_input) == (targets == ("vo",)) and bool(maps.mlp_input) == (targets == ("ffn",))
    donor, state, cfg = _lora(flux.model, MIXED)
    expected = _out(_mapped(slim_model, flux.model, _fused(donor)))
    slim_model.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict())
    assert _rel(_out(slim_model), expected) < 1e-4


def test_kohya_flux_lora_on_linear2_loads_through_the_pipeline(flux, tmp_path):
    """A kohya/sd-scripts Flux LoRA (``lora_unet_single_blocks_N_linear2``, lora_down/lora_up/alpha) goes through
    diffusers' converter to ``single_transformer_blocks.N.proj_out``, then through the maps."""
    gen = torch.Generator().manual_seed(3)
    kohya = {}
    for i in range(2):
        layer = flux.model.single_transformer_blocks[i].proj_out
        kohya[f"lora_unet_single_blocks_{i}_linear2.lora_down.weight"] = torch.randn(4, layer.in_features,
                                                                                     generator=gen) * 0.1
        kohya[f"lora_unet_single_blocks_{i}_linear2.lora_up.weight"] = torch.randn(layer.out_features, 4,
                                                                                   generator=gen) * 0.1
        kohya[f"lora_unet_single_blocks_{i}_linear2.alpha"] = torch.tensor(8.0)
    path = tmp_path / "kohya_flux.safetensors"
    save_file(kohya, str(path))
    reference = _pipeline(copy.deepcopy(flux.model))
    reference.load_lora_weights(str(path))
    expected = _out(reference.transformer)
    assert _rel(expected, _out(flux.model)) > 0.02
    full = _pipeline(copy.deepcopy(flux.slims[1.0]))
    full.load_lora_weights(str(path))
    assert _rel(_out(full.transformer), expected) < 1e-4
    reference.fuse_lora()
    reference.unload_lora_weights()
    reduced = _pipeline(copy.deepcopy(flux.slims[0.6]))
    reduced.load_lora_weights(str(path))
    assert _rel(_out(reduced.transformer), _out(_mapped(flux.slims[0.6], flux.model, reference.transformer))) < 1e-4


def test_fuse_scale_and_unload_on_the_slim_flux(flux, tmp_path):
    """set_adapters scales every part of the update (proj_out's lora_B bias too), fuse/unfuse/unload as usual."""
    _, state, cfg = _lora(flux.model, MIXED)
    slim_model = copy.deepcopy(flux.slims[0.6])
    without = _out(slim_model)
    slim_model.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict(), adapter_name="style")
    with_lora = _out(slim_model)
    assert slim_model.single_transformer_blocks[0].proj_out.lora_B["style"].bias is not None  # the refit intercept
    slim_model.set_adapters(["style"], [0.0])
    assert _rel(_out(slim_model), without) < 1e-6
    slim_model.set_adapters(["style"], [1.0])
    slim_model.fuse_lora()
    assert _rel(_out(slim_model), with_lora) < 1e-5
    slim_model.unfuse_lora()
    slim_model.unload_lora()
    assert _rel(_out(slim_model), without) < 1e-6


def test_lora_bias_on_a_refit_proj_out_is_refused_as_on_a_down_projection(flux):
    """PEFT's lora_bias on proj_out: its image through the MLP refit needs a rank-one weight term (the rule and
    error of a feed-forward down projection); refused before anything loads."""
    _, state, cfg = _lora(flux.model, SINGLE_PROJ_OUT, lora_bias=True)
    slim_model = copy.deepcopy(flux.slims[0.6])
    with pytest.raises(LoraMappingError, match=r"single_transformer_blocks\.0\.proj_out.*lora_B bias.*refit"):
        slim_model.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict())
    assert not any("lora_" in k for k in slim_model.state_dict())


# --------------------------------------------------------------------------------------------------- files


def test_saved_slim_flux_keeps_the_single_stream_maps(flux, tmp_path):
    slim_model = flux.slims[0.6]
    slim_model.save_pretrained(tmp_path / "slim")
    maps_file = tmp_path / "slim" / LORA_MAPS_FILE
    with safe_open(str(maps_file), framework="pt") as f:
        # no reader refit apart: the oldest format holding these maps, so older SlimDiff versions still read it
        assert f.metadata()["slimdiff.lora_maps.format"] == "2" != MAPS_FORMAT
        keys = set(f.keys())
    assert {"attention_input:single_transformer_blocks.0.proj_out", "mlp_input:single_transformer_blocks.0.proj_out",
            "bias:single_transformer_blocks.0.proj_out"} <= keys
    _, state, cfg = _lora(flux.model, MIXED)
    in_memory = copy.deepcopy(slim_model)
    in_memory.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict())
    expected = _out(in_memory)
    loaded = sd.SlimFluxTransformer2DModel.from_pretrained(tmp_path / "slim")
    loaded.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict())
    assert _rel(_out(loaded), expected) < 1e-6


def test_flux_pipeline_pushed_to_the_hub_keeps_its_maps_and_takes_the_lora(tmp_path, monkeypatch):
    """A complete tiny FluxPipeline slimmed with pipe.slim(), pushed (hub_fakes.FakeHub intercepts HfApi: no
    network), loaded with stock DiffusionPipeline.from_pretrained from the Hub cache: the single-stream maps travel
    and pipe.load_lora_weights gives what it gives on the pipeline that was pushed."""
    from diffusers import DiffusionPipeline
    from hub_fakes import FakeHub
    from safetensors.torch import load as load_bytes
    from test_transformer_pipelines import PROMPTS, SMALL, call_kwargs, latents, tiny_pipeline

    pipe = sd.enable_slimdiff(tiny_pipeline("flux", tmp_path / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    original = copy.deepcopy(pipe.transformer)
    pipe.slim(prompts=PROMPTS, num_prompts=4, keep_ratio=0.6, call_kwargs=call_kwargs("flux"), progress=False, **SMALL)
    _, state, cfg = _lora(original, MIXED)
    FluxPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=cfg.to_dict())
    hub = FakeHub().install(monkeypatch)
    pipe.push_to_hub("someone/slim-flux", token="hf_test")
    maps = load_bytes(hub.files("someone/slim-flux")[f"transformer/{LORA_MAPS_FILE}"])
    assert {"attention_input:single_transformer_blocks.0.proj_out", "mlp_input:single_transformer_blocks.0.proj_out"} \
        <= set(maps)
    loaded = DiffusionPipeline.from_pretrained("someone/slim-flux", cache_dir=hub.materialize(tmp_path / "cache"),
                                               local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    without = latents(loaded, "flux")
    pipe.load_lora_weights(tmp_path / "lora")
    loaded.load_lora_weights(tmp_path / "lora")
    expected = latents(pipe, "flux")
    assert _rel(expected, without) > 1e-3
    torch.testing.assert_close(latents(loaded, "flux"), expected, rtol=1e-4, atol=1e-5)


def _write_format_1(maps: BasisMaps, spec, path) -> None:
    """The maps file an older SlimDiff wrote (format 1): one entry per Linear, so a single-stream proj_out got the
    map written last (the attention's, after its block's MLP) under ``input``, and its MLP's bias map."""
    tensors = {f"{kind}:{p}": t.contiguous() for kind in ("output", "input", "rows", "bias")
               for p, t in getattr(maps, kind).items()}
    for p, t in maps.attention_input.items():
        tensors[f"input:{p}"] = t.contiguous()
    save_file(tensors, str(path), metadata={"slimdiff.lora_maps.format": "1",
                                            "slimdiff.spec": json.dumps(spec.to_dict()),
                                            "slimdiff.lora_maps.identity": json.dumps(sorted(maps.identity))})


def test_old_maps_file_still_loads_its_loras_and_refuses_proj_out_clearly(flux, tmp_path):
    slim_model = flux.slims[0.6]
    slim_model.save_pretrained(tmp_path / "slim")
    _write_format_1(slim_model.slimdiff_basis_maps, slim_model.slimdiff_spec, tmp_path / "slim" / LORA_MAPS_FILE)
    covered = [t for t in MIXED if t != "proj_out"]
    _, state, cfg = _lora(flux.model, covered)
    reference = copy.deepcopy(slim_model)
    reference.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict())
    loaded = sd.SlimFluxTransformer2DModel.from_pretrained(tmp_path / "slim")
    loaded.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict())  # q/k/v, proj_mlp, double blocks: mapped
    assert _rel(_out(loaded), _out(reference)) < 1e-6
    _, with_proj_out, cfg2 = _lora(flux.model, SINGLE_PROJ_OUT, seed=2)
    fresh = sd.SlimFluxTransformer2DModel.from_pretrained(tmp_path / "slim")
    before = _out(fresh)
    with pytest.raises(LoraMappingError, match=r"single_transformer_blocks\.0\.proj_out.*format 1.*calibration"):
        fresh.load_lora_adapter(with_proj_out, prefix=None, metadata=cfg2.to_dict())
    assert torch.equal(_out(fresh), before) and not getattr(fresh, "peft_config", None)
    # saved again, the maps keep saying which layers they lack (and still load)
    fresh.save_pretrained(tmp_path / "again")
    again = sd.SlimFluxTransformer2DModel.from_pretrained(tmp_path / "again")
    with pytest.raises(LoraMappingError, match="format 1"):
        again.load_lora_adapter(with_proj_out, prefix=None, metadata=cfg2.to_dict())
    again.load_lora_adapter(state, prefix=None, metadata=cfg.to_dict())
    assert _rel(_out(again), _out(reference)) < 1e-6


def test_maps_file_of_an_unknown_format_or_missing_a_part_is_refused(flux, tmp_path):
    slim_model = flux.slims[0.6]
    maps, spec = slim_model.slimdiff_basis_maps, slim_model.slimdiff_spec
    path = tmp_path / LORA_MAPS_FILE
    maps.save(path, spec)
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(path), metadata=meta | {"slimdiff.lora_maps.format": "4"})
    with pytest.raises(SlimFileError, match="format this version reads.*'4'"):
        BasisMaps.load(path, spec)
    del tensors["mlp_input:single_transformer_blocks.1.proj_out"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(SlimFileError, match=r"single_transformer_blocks\.1\.proj_out \(MLP columns\): missing"):
        BasisMaps.load(path, spec)


# --------------------------------------------------------------------------------------------------- PixArt

PIXART_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]  # attn1 and attn2, the FFN


@pytest.fixture(scope="module")
def pixart(one_thread, tmp_path_factory):
    """The original tiny PixArt, slim copies at keep 1.0 and 0.6, and a LoRA saved as PixArt's LoRA trainers save
    one (PEFT's ``save_pretrained``: ``adapter_config.json`` + ``adapter_model.safetensors``)."""
    model = tiny_pixart_transformer()
    calibration = calibrate(model, lambda: [model(**pixart_inputs(model, seed=s)) for s in range(8)],
                            CalibrationConfig(propagation_probe_calls=2))
    slims = {keep: slim(model, calibration, keep_ratio=keep, **SETTINGS) for keep in (1.0, 0.6)}
    spec = slims[0.6].slimdiff_spec
    assert any(a.vo_rank < a.head_dim or a.qk_rank < a.head_dim for a in spec.attention.values())
    assert any(f.width < f.inner_dim for f in spec.feed_forward.values())
    donor = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            target_modules=PIXART_TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in donor.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    folder = tmp_path_factory.mktemp("pixart_lora")
    donor.save_pretrained(folder)
    expected = _pixart_out(donor.get_base_model())
    fused = donor.merge_and_unload()
    return SimpleNamespace(model=model, slims=slims, folder=folder, expected=expected, fused=fused)


def _pixart_out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**pixart_inputs(model, seed=9))[0]


def _load_peft_folder(model, folder) -> None:
    """The README's recipe for a PEFT-saved LoRA: its keys without PEFT's wrapper prefix, its config as metadata."""
    state = load_file(str(folder / "adapter_model.safetensors"))
    model.load_lora_adapter({k.removeprefix("base_model.model."): v for k, v in state.items()}, prefix=None,
                            metadata=LoraConfig.from_pretrained(str(folder)).to_dict())


def test_pixart_lora_at_full_rank_is_the_original_with_lora(pixart):
    assert _rel(pixart.expected, _pixart_out(pixart.model)) > 0.02
    slim_model = copy.deepcopy(pixart.slims[1.0])
    _load_peft_folder(slim_model, pixart.folder)
    assert {k.split(".lora_")[0].rsplit(".", 2)[-2] for k in slim_model.state_dict() if ".lora_A" in k} >= \
        {"attn1", "attn2"}
    assert _rel(_pixart_out(slim_model), pixart.expected) < 1e-4


def test_pixart_lora_below_full_rank_is_the_slimming_of_the_fused_original(pixart, tmp_path):
    slim_model = pixart.slims[0.6]
    expected = _pixart_out(_mapped(slim_model, pixart.model, pixart.fused))
    loaded = copy.deepcopy(slim_model)
    _load_peft_folder(loaded, pixart.folder)
    assert _rel(_pixart_out(loaded), expected) < 1e-4
    assert _rel(_pixart_out(loaded) - _pixart_out(slim_model), expected - _pixart_out(slim_model)) < 1e-3
    # diffusers' adapter API (which stock PixArt lacks) works on the slim model: scale, fuse, unload
    loaded.set_adapters(["default_0"], [0.0])
    assert _rel(_pixart_out(loaded), _pixart_out(slim_model)) < 1e-6
    loaded.set_adapters(["default_0"], [1.0])
    loaded.fuse_lora()
    assert _rel(_pixart_out(loaded), expected) < 1e-4
    loaded.unfuse_lora()
    loaded.unload_lora()
    assert _rel(_pixart_out(loaded), _pixart_out(slim_model)) < 1e-6
    # saved and reloaded, the slim PixArt reads its maps and takes the LoRA the same way
    slim_model.save_pretrained(tmp_path / "slim")
    reloaded = sd.SlimPixArtTransformer2DModel.from_pretrained(tmp_path / "slim")
    _load_peft_folder(reloaded, pixart.folder)
    assert _rel(_pixart_out(reloaded), expected) < 1e-4
