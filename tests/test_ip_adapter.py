"""IP-Adapter on slimmed cross-attention (issue 12): the adapter's to_k_ip / to_v_ip mapped into the slim bases.

Tiny SD1.5 UNet; the adapters are random, made here in the layout diffusers' loader reads (no Hub access).
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0, IPAdapterAttnProcessor2_0
from test_attention_api import inputs, run  # noqa: F401  (inputs: the same module fixture, same UNet call)

import slimdiff_diffusers as sd
from slimdiff_diffusers.diffusers_adapter import LowRankAttnProcessor
from slimdiff_diffusers.diffusers_adapter.ip_adapter import SlimIPAdapterAttnProcessor

EMBED_DIM = 12


def ip_adapter_state_dict(unet, seed: int = 0) -> dict:
    """A random IP-Adapter in the layout `_load_ip_adapter_weights` reads, sized by the *original* widths."""
    gen = torch.Generator().manual_seed(seed)
    cross_dim = unet.config.cross_attention_dim
    ip, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        spec = getattr(attn, "slimdiff_spec", None)
        hidden = spec.heads * spec.head_dim if spec is not None else attn.to_out[0].out_features
        for short in ("k", "v"):
            ip[f"{key_id}.to_{short}_ip.weight"] = torch.randn(hidden, cross_dim, generator=gen) * cross_dim ** -0.5
        key_id += 2
    proj = {"proj.weight": torch.randn(4 * cross_dim, EMBED_DIM, generator=gen) * EMBED_DIM ** -0.5,
            "proj.bias": torch.zeros(4 * cross_dim), "norm.weight": torch.ones(cross_dim),
            "norm.bias": torch.zeros(cross_dim)}
    return {"image_proj": proj, "ip_adapter": ip}


def image_kwargs(batch: int = 2, **extra):
    embeds = torch.randn(batch, 1, EMBED_DIM, generator=torch.Generator().manual_seed(3))
    return {"added_cond_kwargs": {"image_embeds": [embeds]}, **extra}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def adapter_effect(unet, inputs, state, **kwargs):
    """eps(with image) - eps(without), on a copy of ``unet`` with the adapter loaded; and that copy."""
    unet = copy.deepcopy(unet)
    without = run(unet, inputs)
    unet._load_ip_adapter_weights(copy.deepcopy(state))
    return run(unet, inputs, **image_kwargs(**kwargs)) - without, unet


def full_ranks(calibration):
    return {f"{s.name}:{k}": s.head_dim for s in calibration.sites.attention for k in ("qk", "vo")}


def cross_paths(unet):
    return [p for p in unet.slimdiff_spec.attention if p.endswith("attn2")]


@pytest.fixture(scope="module")
def full_rank_slim(sd15_unet, sd15_calibration):
    """Every attention slimmed at full rank: a new (whitened) basis, the original function."""
    return sd.slim(sd15_unet, sd15_calibration, targets=("qk", "vo"), rank_pattern=full_ranks(sd15_calibration))


@pytest.fixture(scope="module")
def narrow_slim(sd15_unet, sd15_calibration):
    """q/k narrower than v (4 and 6 of 8/16 channels per head) in every attention, cross-attention included."""
    return sd.slim(sd15_unet, sd15_calibration, targets=("qk", "vo"), rank_pattern={".*:qk": 4, ".*:vo": 6},
                   rank_multiple=2)


@pytest.fixture(scope="module")
def state(sd15_unet):
    return ip_adapter_state_dict(sd15_unet)


@pytest.fixture(scope="module")
def original_effect(sd15_unet, inputs, state):
    effect, _ = adapter_effect(sd15_unet, inputs, state)
    assert effect.norm() / run(sd15_unet, inputs).norm() > 0.05  # the adapter does something
    return effect


def test_full_rank_mapped_adapter_equals_the_original(full_rank_slim, inputs, state, original_effect):
    effect, unet = adapter_effect(full_rank_slim, inputs, state)
    assert cross_paths(unet)
    for path in cross_paths(unet):
        assert type(unet.get_submodule(path).processor) is SlimIPAdapterAttnProcessor
    assert rel(effect, original_effect) < 1e-4


def test_uniform_layout_full_rank_mapped_adapter_equals_the_original(sd15_unet, sd15_calibration, inputs, state,
                                                                     original_effect):
    slim = sd.slim(sd15_unet, sd15_calibration, targets=("qk", "vo"), rank_pattern=full_ranks(sd15_calibration),
                   head_layout="uniform")
    effect, _ = adapter_effect(slim, inputs, state)
    assert rel(effect, original_effect) < 1e-4


def test_narrowed_cross_attention_takes_the_adapter_in_its_own_widths(narrow_slim, sd15_unet, inputs, state,
                                                                      original_effect):
    """Before: a shape error (or, where shapes fit, an effect 194% off). Now the adapter is mapped into the slim
    key/value widths, and its effect stays close to the original's (forced ranks 4/6 of 8: the tiny model's
    slim-only error is itself large, so the bound is loose; the embedded model's figures are in the README)."""
    effect, unet = adapter_effect(narrow_slim, inputs, state)
    for path in cross_paths(unet):
        attn, proc = unet.get_submodule(path), unet.get_submodule(path).processor
        assert type(proc) is SlimIPAdapterAttnProcessor
        assert proc.to_k_ip[0].out_features == attn.to_k.out_features == 4 * attn.heads
        assert proc.to_v_ip[0].out_features == attn.to_v.out_features == 6 * attn.heads
    slim_error = rel(run(narrow_slim, inputs), run(sd15_unet, inputs))
    assert rel(effect, original_effect) < max(0.5, 3 * slim_error)


def test_ip_adapter_scale_and_masks_work_on_mapped_processors(narrow_slim, inputs, state):
    effect, unet = adapter_effect(narrow_slim, inputs, state)
    pipe_like = type("P", (), {"unet": unet})()  # set_ip_adapter_scale only reads .unet
    from diffusers.loaders import IPAdapterMixin

    IPAdapterMixin.set_ip_adapter_scale(pipe_like, 0.0)
    assert all(p.scale == [0.0] for p in unet.attn_processors.values() if isinstance(p, SlimIPAdapterAttnProcessor))
    base = copy.deepcopy(narrow_slim)
    assert rel(run(unet, inputs, **image_kwargs()), run(base, inputs)) < 1e-6
    IPAdapterMixin.set_ip_adapter_scale(pipe_like, 1.0)
    ones = [torch.ones(1, 1, 8, 8)]  # a mask over the whole image: the same as no mask
    masked = run(unet, inputs, **image_kwargs(cross_attention_kwargs={"ip_adapter_masks": ones}))
    assert rel(masked - run(base, inputs), effect) < 1e-5
    half = torch.zeros(1, 1, 8, 8)
    half[..., :4] = 1
    masked = run(unet, inputs, **image_kwargs(cross_attention_kwargs={"ip_adapter_masks": [half]}))
    assert 0.05 < rel(masked - run(base, inputs), effect) < 0.95  # the mask restricts the effect


def test_unload_ip_adapter_restores_the_slim_processors(tmp_path, narrow_slim, inputs, state):
    from tiny_models import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path)
    pipe.unet = copy.deepcopy(narrow_slim)
    ref = run(pipe.unet, inputs)
    pipe.unet._load_ip_adapter_weights(copy.deepcopy(state))
    assert any(isinstance(p, SlimIPAdapterAttnProcessor) for p in pipe.unet.attn_processors.values())
    pipe.unload_ip_adapter()  # stock puts AttnProcessor2_0 back where it finds IP-Adapter processors
    assert all(type(pipe.unet.get_submodule(p).processor) is LowRankAttnProcessor
               for p in pipe.unet.slimdiff_spec.attention)
    assert pipe.unet.encoder_hid_proj is None
    assert rel(run(pipe.unet, inputs), ref) < 1e-6


def test_pipeline_load_ip_adapter_from_a_folder_and_sample(tmp_path, full_rank_slim, sd15_unet, state):
    """The public route: `pipe.load_ip_adapter(folder, subfolder, weight_name)` + `ip_adapter_image_embeds`,
    on a slim UNet saved and loaded again (its basis maps are read from beside the weights)."""
    from safetensors.torch import save_file
    from tiny_models import tiny_sd_pipeline

    flat = {f"{part}.{k}": v for part in ("image_proj", "ip_adapter") for k, v in state[part].items()}
    (tmp_path / "adapter" / "models").mkdir(parents=True)
    save_file(flat, str(tmp_path / "adapter" / "models" / "ip.safetensors"))
    full_rank_slim.save_pretrained(tmp_path / "slim")
    images = []
    for unet in (copy.deepcopy(sd15_unet), sd.SlimUNet2DConditionModel.from_pretrained(tmp_path / "slim")):
        pipe = tiny_sd_pipeline(tmp_path)
        pipe.unet = unet
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(str(tmp_path / "adapter"), subfolder="models", weight_name="ip.safetensors",
                             image_encoder_folder=None)
        embeds = torch.randn(2, 1, EMBED_DIM, generator=torch.Generator().manual_seed(5))  # (uncond, cond)
        images.append(pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="latent",
                           ip_adapter_image_embeds=[embeds], generator=torch.Generator().manual_seed(0)).images)
    assert rel(images[1], images[0]) < 1e-4


def test_without_basis_maps_the_adapter_is_refused_before_any_change(tmp_path, sd15_unet, sd15_calibration, inputs,
                                                                    state):
    unet = sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8, lora_maps=False)
    assert unet.slimdiff_basis_maps is None and cross_paths(unet)
    ref = run(unet, inputs)
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    with pytest.raises(sd.IncompatibleAdapterError, match="adapter_compatible=True"):
        unet._load_ip_adapter_weights(copy.deepcopy(state))
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert rel(run(unet, inputs), ref) == 0
    from tiny_models import tiny_sd_pipeline  # unload after a refused load: still a working slim model

    pipe = tiny_sd_pipeline(tmp_path)
    pipe.unet = unet
    pipe.unload_ip_adapter()
    assert all(type(unet.get_submodule(p).processor) is LowRankAttnProcessor for p in unet.slimdiff_spec.attention)
    assert rel(run(unet, inputs), ref) < 1e-6


def test_a_failed_load_leaves_the_slim_unet_as_it_was(narrow_slim, inputs):
    """diffusers' loader fails on an adapter made for another model (its own shape error); by then stock has
    dropped encoder_hid_proj: the slim UNet puts everything back."""
    unet = copy.deepcopy(narrow_slim)
    ref = run(unet, inputs)
    bad = ip_adapter_state_dict(unet)
    key = next(k for k in bad["ip_adapter"] if k.endswith("to_k_ip.weight"))
    bad["ip_adapter"][key] = torch.zeros(40, unet.config.cross_attention_dim)
    with pytest.raises((RuntimeError, ValueError), match="40"):
        unet._load_ip_adapter_weights(bad)
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert all(type(unet.get_submodule(p).processor) is LowRankAttnProcessor for p in unet.slimdiff_spec.attention)
    assert rel(run(unet, inputs), ref) == 0


def test_ip_adapter_processor_set_by_hand_is_mapped_custom_diffusion_is_refused(narrow_slim, full_rank_slim):
    unet = copy.deepcopy(narrow_slim)
    path = cross_paths(unet)[0]
    spec = unet.get_submodule(path).slimdiff_spec
    hidden = spec.heads * spec.head_dim
    stock = IPAdapterAttnProcessor2_0(hidden, 24, num_tokens=4)
    unet.set_attn_processor({n: (stock if n == f"{path}.processor" else p) for n, p in unet.attn_processors.items()})
    assert type(unet.get_submodule(path).processor) is SlimIPAdapterAttnProcessor
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    custom = CustomDiffusionAttnProcessor2_0(train_kv=True, hidden_size=hidden, cross_attention_dim=24)
    with pytest.raises(sd.UnsupportedProcessorError, match="adapter_compatible"):
        unet.set_attn_processor({n: (custom if n == f"{path}.processor" else p)
                                 for n, p in unet.attn_processors.items()})
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before
