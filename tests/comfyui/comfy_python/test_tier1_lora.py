"""Tier 1 (in-process ComfyUI): LoRAs on slim MODELs (issue 11). Runs under COMFYUI_PYTHON like tier 1.

The LoRA here is made for the tiny SD1.5 checkpoint in kohya's format (``lora_unet_...``, read by ComfyUI's own
``comfy.lora.load_lora``), on every Linear of the transformer blocks: the layers SlimDiff narrows and others.
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("SLIMDIFF_IN_COMFY_PYTHON") != "1" or not os.environ.get("COMFYUI_DIR"):
    pytest.skip("tier 1 runs under COMFYUI_PYTHON via tests/comfyui/test_comfyui_optin.py", allow_module_level=True)

import test_tier1_inprocess as tier1  # noqa: E402  (sets ComfyUI up: CPU, base directory, the tiny checkpoint)

import comfy.lora  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from slimdiff_diffusers.core.errors import LoraMappingError  # noqa: E402

env = tier1.env  # the module-scoped fixture (the tiny checkpoint, its prompts and calibration)
node, sample, slim, relative = tier1.node, tier1.sample, tier1.slim, tier1.relative
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def make_lora(model, rank: int = 4, seed: int = 0, scale: float = 0.3, only: tuple[str, ...] = TARGETS,
              shape_of=None) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA for ``model``'s UNet: random factors, each update ~``scale`` of its layer's norm."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for lora_key, model_key in sorted(key_map.items()):
        if not (lora_key.startswith("lora_unet_") and isinstance(model_key, str)
                and any(model_key.endswith(f".{t}.weight") for t in only)):
            continue
        weight = comfy.utils.get_attr(model.model, model_key)
        out_dim, in_dim = shape_of(model_key, weight) if shape_of else weight.shape[:2]
        kernel = tuple(weight.shape[2:])  # proj_in/proj_out are 1x1 convolutions in this checkpoint
        down = torch.randn(rank, in_dim, *kernel, generator=generator) / in_dim ** 0.5
        up = torch.randn(out_dim, rank, *(1,) * len(kernel), generator=generator)
        up *= scale * weight.float().norm() / (up.flatten(1) @ down.flatten(1)).norm()
        state |= {f"{lora_key}.lora_down.weight": down, f"{lora_key}.lora_up.weight": up,
                  f"{lora_key}.alpha": torch.tensor(float(rank))}
    assert state, "no LoRA target found"
    return state


def lora_file(state: dict[str, torch.Tensor], name: str) -> str:
    folder = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, name))
    return name


def stock_lora(model, name: str, strength: float = 1.0):
    with torch.inference_mode():
        return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def slim_lora(model, name: str, strength: float = 1.0):
    with torch.inference_mode():
        out = node("SlimLoadLora").execute(model, name, strength)
    return out.args[0], out.ui.as_dict()["text"][0]


@pytest.fixture(scope="module")
def lora(env):
    return lora_file(make_lora(env["model"]), "slimdiff_test_lora.safetensors")


@pytest.fixture(scope="module")
def full(env):
    return slim(env, keep_ratio=1.0)[0]


@pytest.fixture(scope="module")
def half(env):
    return slim(env, keep_ratio=0.5)[0]


def test_full_rank_slim_with_the_mapped_lora_equals_the_original_with_it(env, lora, full):
    mapped, text = slim_lora(full, lora)
    assert "narrowed by SlimDiff" in text
    reference = sample(stock_lora(env["model"], lora), env)
    assert relative(sample(env["model"], env), reference) > 0.05  # the LoRA changes the output
    assert relative(sample(mapped, env), reference) < 1e-3
    half_strength, _ = slim_lora(full, lora, 0.5)  # strength scales it as the stock loader's does
    assert relative(sample(half_strength, env), sample(stock_lora(env["model"], lora, 0.5), env)) < 1e-3
    same, text = slim_lora(full, lora, 0.0)
    assert same is full and "nothing applied" in text


def test_reduced_slim_keeps_the_lora_effect(env, lora):
    # A random checkpoint and a random LoRA (30% of each layer's norm, in directions the calibration never saw):
    # a hard case; the embedded model with a trained LoRA is measured in benchmarks/lora_transfer.py. The FFN
    # channels are chosen by leverage here: the default greedy selection keeps the channels the original down
    # projection reads, and a random update of that projection reads the others too (in this case it moves the
    # output away; on the embedded model a trained LoRA transfers as well with either, decisions.md row 35).
    half, _ = slim(env, keep_ratio=0.5, ffn_selection="leverage")
    mapped, _ = slim_lora(half, lora)
    dense, dense_lora = sample(env["model"], env), sample(stock_lora(env["model"], lora), env)
    slim_only, slim_with = sample(half, env), sample(mapped, env)
    assert relative(slim_with, dense_lora) < relative(slim_only, dense_lora)  # the LoRA moves it the right way
    effect, slim_effect = dense_lora - dense, slim_with - slim_only
    cosine = torch.nn.functional.cosine_similarity(effect.flatten(), slim_effect.flatten(), dim=0).item()
    assert cosine > 0.5, cosine


def test_stock_lora_loader_after_slim_is_refused_when_sampling_and_saving(env, lora, half):
    patched = stock_lora(half, lora)  # ComfyUI accepts the patches; they would fail to apply one by one
    with pytest.raises(LoraMappingError, match="SlimDiff Load LoRA") as info:
        sample(patched, env)
    assert "narrowed" in str(info.value) and "diffusion_model." in str(info.value)
    with pytest.raises(LoraMappingError, match="SlimDiff Load LoRA"):
        node("SlimSaveModel").execute(patched, "slimdiff_lora_refused", "output")


def test_loaded_slim_file_has_no_maps_and_says_what_to_do(env, lora, half):
    with torch.inference_mode():
        saved = node("SlimSaveModel").execute(half, "slimdiff_lora_file", "slim_models")
    name = saved.ui["slim_models"][0]["filename"]
    loaded = node("SlimLoadModel").execute(name).args[0]
    with pytest.raises(LoraMappingError, match="no LoRA maps.*before SlimDiff Slim"):
        slim_lora(loaded, lora)
    with pytest.raises(LoraMappingError, match="SlimDiff Load LoRA"):  # the guard is on loaded models too
        sample(stock_lora(loaded, lora), env)


def test_lora_on_untouched_layers_loads_on_any_slim_model(env, half):
    untouched = lora_file(make_lora(env["model"], only=("proj_in", "proj_out")), "slimdiff_untouched.safetensors")
    mapped, text = slim_lora(half, untouched)
    assert "narrowed" not in text
    stock = stock_lora(half, untouched)
    assert relative(sample(mapped, env), sample(stock, env)) < 1e-5  # the stock loader passes the guard too
    assert relative(sample(mapped, env), sample(half, env)) > 1e-3


def test_lora_for_another_model_is_refused_naming_the_layer(env, half):
    def wider(key, weight):
        return weight.shape[0], weight.shape[1] + 8

    foreign = lora_file(make_lora(env["model"], shape_of=wider, only=("attn1.to_q",)), "slimdiff_foreign.safetensors")
    with pytest.raises(LoraMappingError, match=r"attn1\.to_q.*another model"):
        slim_lora(half, foreign)
    nothing = lora_file({"lora_te_text_model_x.lora_down.weight": torch.zeros(1, 2),
                         "lora_te_text_model_x.lora_up.weight": torch.zeros(2, 1)}, "slimdiff_te_only.safetensors")
    with pytest.raises(LoraMappingError, match="no entry of this LoRA"):
        slim_lora(half, nothing)
