"""Issue 15: bad slim specs, single files and saved folders are refused with a clear error before any work.

Each case is a file a careless user or a damaged download could produce; each must raise a ``SlimFileError``
subclass that names the file and the entry, before any tensor is read or any model memory is allocated, and
must leave the model it is applied to unchanged.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import slimdiff_diffusers as sd
from slimdiff_diffusers.core import SlimFileError, SlimSpec
from slimdiff_diffusers.core.errors import SlimSpecError, SlimWeightsError

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff"


@pytest.fixture(scope="module")
def slim_unet(sd15_unet, sd15_calibration):
    return sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8)


@pytest.fixture(scope="module")
def slim_file(slim_unet, tmp_path_factory):
    path = tmp_path_factory.mktemp("file") / "slim.safetensors"
    sd.save_slim_unet_file(slim_unet, path)
    return path


def _spec_dict(slim_unet) -> dict:
    return copy.deepcopy(slim_unet.slimdiff_spec.to_dict())


def _rewrite(src, dst, tensors=None, metadata=None):
    """Copy a slim file, changing its tensors and/or metadata (a hand-edited or damaged file)."""
    with safe_open(str(src), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    state = tensors(state) if tensors else state
    meta = metadata(meta) if metadata else meta
    save_file(state, str(dst), metadata=meta)
    return dst


def _with_spec(edit):
    def metadata(meta):
        spec = json.loads(meta["slimdiff.spec"])
        edit(spec)
        return {**meta, "slimdiff.spec": json.dumps(spec)}
    return metadata


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if tensor data is loaded: validation must come first."""
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("tensors were loaded before the file was validated")
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)


# ---- slim spec schema --------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["attention"][ATTN].update(qk_rank=10_000), "larger than the full width"),
    (lambda s: s["attention"][ATTN].update(vo_rank=0), ">= 1"),
    (lambda s: s["attention"][ATTN].update(qk_rank=-4), ">= 1"),
    (lambda s: s["attention"][ATTN].update(qk_rank="4"), "must be an integer"),
    (lambda s: s["attention"][ATTN].update(heads=2.0), "must be an integer"),
    (lambda s: s["attention"][ATTN].update(qk_rank=True), "must be an integer"),
    (lambda s: s["attention"][ATTN].update(layout="interleaved"), "unknown head layout"),
    (lambda s: s["attention"][ATTN].pop("head_dim"), "missing ['head_dim']"),
    (lambda s: s["attention"][ATTN].update(rank=3), "unknown ['rank']"),
    (lambda s: s["feed_forward"][FF].update(width=10_000), "larger than the full width"),
    (lambda s: s["feed_forward"][FF].update(gated="yes"), "gated must be true or false"),
    (lambda s: s["feed_forward"][FF].update(inner_dim=0), ">= 1"),
    (lambda s: s.update(attention=[1, 2]), "must map module paths"),
    (lambda s: s["attention"].update({ATTN: 7}), "must be an object"),
])
def test_spec_schema_errors_name_the_entry(slim_unet, edit, message):
    data = _spec_dict(slim_unet)
    edit(data)
    with pytest.raises(SlimSpecError) as info:
        SlimSpec.from_dict(data, source="model.safetensors")
    text = str(info.value)
    assert message in text and "model.safetensors" in text
    assert ATTN in text or FF in text or "module paths" in text


def test_spec_versions(slim_unet):
    data = _spec_dict(slim_unet)
    with pytest.raises(SlimSpecError, match="upgrade slimdiff-diffusers"):
        SlimSpec.from_dict({**data, "version": 2})
    with pytest.raises(SlimSpecError, match="version True"):
        SlimSpec.from_dict({**data, "version": True})
    with pytest.raises(SlimSpecError, match="not valid JSON"):
        SlimSpec.from_json("{'attention': ")
    assert SlimSpec.from_dict(data) == slim_unet.slimdiff_spec


def test_apply_slim_spec_checks_everything_before_changing_a_module(slim_unet):
    """A spec whose last entry does not fit is refused without narrowing the entries before it."""
    from tiny_models import tiny_sd15_unet

    model = tiny_sd15_unet()
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = SlimSpec.from_dict(_spec_dict(slim_unet))
    bad.attention["up_blocks.9.attentions.0.transformer_blocks.0.attn1"] = next(iter(bad.attention.values()))
    with pytest.raises(SlimSpecError, match="does not have attention 'up_blocks.9"):
        sd.apply_slim_spec(model, bad)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == before
    assert not hasattr(model, "slimdiff_spec")
    wide = SlimSpec.from_dict(_spec_dict(slim_unet))
    first = next(iter(wide.feed_forward))
    wide.feed_forward[first].inner_dim *= 2  # a spec of a wider base model
    with pytest.raises(SlimSpecError, match="wrong base model"):
        sd.apply_slim_spec(model, wide)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == before


# ---- single file -------------------------------------------------------------------------------------------


def test_single_file_metadata_errors(slim_file, tmp_path, no_tensor_reads):
    cases = {
        "no_spec": (lambda m: {k: v for k, v in m.items() if k != "slimdiff.spec"}, SlimSpecError, "no 'slimdiff.spec'"),
        "bad_json": (lambda m: {**m, "slimdiff.spec": m["slimdiff.spec"][:-5]}, SlimSpecError, "not valid JSON"),
        "string_rank": (_with_spec(lambda s: s["attention"][ATTN].update(qk_rank="6")), SlimSpecError, ATTN),
        "layout": (_with_spec(lambda s: s["attention"][ATTN].update(layout="blocked")), SlimSpecError, "head layout"),
        "base_config": (lambda m: {**m, "slimdiff.base_config": "{not json"}, SlimFileError, "slimdiff.base_config"),
        "base_list": (lambda m: {**m, "slimdiff.base_config": "[1, 2]"}, SlimFileError, "JSON object"),
        "key_layout": (lambda m: {**m, "slimdiff.key_layout": "comfy"}, SlimFileError, "key layout"),
    }
    for name, (edit, error, message) in cases.items():
        path = _rewrite(slim_file, tmp_path / f"{name}.safetensors", metadata=edit)
        with pytest.raises(error) as info:
            sd.load_slim_unet_file(path)
        assert message in str(info.value) and str(path) in str(info.value), name


def test_single_file_tensor_shapes_are_checked_before_loading(slim_file, slim_unet, tmp_path, no_tensor_reads):
    spec = slim_unet.slimdiff_spec.attention[ATTN]
    missing = _rewrite(slim_file, tmp_path / "missing.safetensors",
                       tensors=lambda s: {k: v for k, v in s.items() if k != f"{ATTN}.to_k.weight"})
    with pytest.raises(SlimWeightsError, match=r"missing.*to_k\.weight"):
        sd.load_slim_unet_file(missing)
    # one value channel per head more than the spec says (whatever rank the allocation gave this attention)
    wider = _rewrite(slim_file, tmp_path / "wider.safetensors",
                     tensors=lambda s: {**s, f"{ATTN}.to_v.weight": torch.zeros(spec.heads * (spec.vo_width + 1),
                                                                                 s[f"{ATTN}.to_v.weight"].shape[1])})
    with pytest.raises(SlimWeightsError, match=r"to_v\.weight has shape .* the spec needs"):
        sd.load_slim_unet_file(wider)
    # Narrowed layers that agree with the spec, but a stock tensor of another model: found on the meta skeleton.
    conv = _rewrite(slim_file, tmp_path / "conv.safetensors",
                    tensors=lambda s: {**s, "conv_in.weight": torch.zeros(8, 4, 3, 3)})
    with pytest.raises(SlimWeightsError, match=r"conv_in\.weight is \(8, 4, 3, 3\)"):
        sd.load_slim_unet_file(conv)
    extra = _rewrite(slim_file, tmp_path / "extra.safetensors", tensors=lambda s: {**s, "lora.weight": torch.zeros(2)})
    with pytest.raises(SlimWeightsError, match="unexpected tensor"):
        sd.load_slim_unet_file(extra)


def test_zero_ranks_consistent_with_the_weights_are_refused(slim_file, tmp_path):
    """Before: a zero-rank spec with zero-row weights loaded silently and failed at the first forward."""
    def tensors(s):
        s = dict(s)
        for name in ("to_q", "to_k"):
            s[f"{ATTN}.{name}.weight"] = s[f"{ATTN}.{name}.weight"][:0]
            if f"{ATTN}.{name}.bias" in s:
                s[f"{ATTN}.{name}.bias"] = s[f"{ATTN}.{name}.bias"][:0]
        return s
    path = _rewrite(slim_file, tmp_path / "zero.safetensors", tensors=tensors,
                    metadata=_with_spec(lambda s: s["attention"][ATTN].update(qk_rank=0)))
    with pytest.raises(SlimSpecError, match="qk_rank must be >= 1"):
        sd.load_slim_unet_file(path)


def test_single_file_non_finite_weights(slim_file, tmp_path):
    def poison(s):
        s = dict(s)
        w = s[f"{FF}.net.2.weight"].clone()
        w[0, 0] = math.nan
        s[f"{FF}.net.2.weight"] = w
        s["conv_out.bias"] = torch.full_like(s["conv_out.bias"], math.inf)
        return s
    path = _rewrite(slim_file, tmp_path / "nan.safetensors", tensors=poison)
    with pytest.raises(SlimWeightsError, match="NaN or inf") as info:
        sd.load_slim_unet_file(path)
    assert f"{FF}.net.2.weight" in str(info.value) and "conv_out.bias" in str(info.value)
    with pytest.raises(SlimWeightsError):
        sd.core.load_slim_file(path)


def test_single_file_truncated_and_folder(slim_file, tmp_path):
    data = slim_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlimFileError, match="cut.safetensors"):
        sd.load_slim_unet_file(cut)
    with pytest.raises(SlimFileError, match="is a folder"):
        sd.load_slim_unet_file(tmp_path)


def test_single_file_round_trip_still_exact(slim_file, slim_unet):
    loaded = sd.load_slim_unet_file(slim_file)
    for key, value in slim_unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not any(p.is_meta for p in loaded.parameters())


# ---- saved folder ------------------------------------------------------------------------------------------


@pytest.fixture
def slim_folder(slim_unet, tmp_path):
    slim_unet.save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_folder_spec_edited_against_its_weights(slim_folder, no_tensor_reads):
    """Before: diffusers' wall of 'size mismatch for ...' lines; now one error naming the folder and tensor."""
    qk = json.loads((slim_folder / "config.json").read_text())["slimdiff_spec"]["attention"][ATTN]["qk_rank"]
    _edit_config(slim_folder, lambda c: c["slimdiff_spec"]["attention"][ATTN].update(qk_rank=qk - 2))
    with pytest.raises(SlimWeightsError) as info:
        sd.SlimUNet2DConditionModel.from_pretrained(slim_folder)
    assert str(slim_folder) in str(info.value) and f"{ATTN}.to_q.weight" in str(info.value)


def test_folder_spec_schema_and_json(slim_folder):
    _edit_config(slim_folder, lambda c: c["slimdiff_spec"]["feed_forward"][FF].update(gated=1))
    with pytest.raises(SlimSpecError, match="config.json") as info:
        sd.SlimUNet2DConditionModel.from_pretrained(slim_folder)
    assert FF in str(info.value)
    (slim_folder / "config.json").write_text('{"slimdiff_spec": ')
    with pytest.raises(SlimFileError, match="not valid JSON"):
        sd.SlimUNet2DConditionModel.from_pretrained(slim_folder)


def test_folder_non_finite_weights(slim_folder):
    from safetensors.torch import load_file

    weights = slim_folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state[f"{ATTN}.to_out.0.weight"][0, 0] = math.inf
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(SlimWeightsError, match=r"to_out\.0\.weight"):
        sd.SlimUNet2DConditionModel.from_pretrained(slim_folder)


def test_folder_valid_still_loads(slim_folder, slim_unet):
    loaded = sd.SlimUNet2DConditionModel.from_pretrained(slim_folder)
    assert loaded.slimdiff_spec == slim_unet.slimdiff_spec
    model, info = sd.SlimUNet2DConditionModel.from_pretrained(slim_folder, output_loading_info=True)
    assert not info["missing_keys"] and model.slimdiff_spec == slim_unet.slimdiff_spec
