"""Transformer denoisers (issue 10 items 1-2): groups of Flux, SD3 (with and without QK-norm) and PixArt, their
exactness at full rank, slimming at keep 0.6, refusals, spec round trips and the slim transformer processors.

All models are tiny random diffusers configurations (tests/tiny_models.py): exactness and shapes, not quality.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffusers import SanaTransformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

import slimdiff_diffusers as sd
from slimdiff_diffusers.core import CalibrationConfig, SlimSpec, apply_slim_spec, calibrate
from slimdiff_diffusers.core.calibration import Calibration
from slimdiff_diffusers.core.decompositions import LinearRef, decompose_qk_joint, decompose_vo_joint
from slimdiff_diffusers.core.errors import (
    CalibrationError,
    ConfigError,
    SlimWeightsError,
    UnsupportedArchitectureError,
    UnsupportedProcessorError,
)
from slimdiff_diffusers.core.slim_state import check_shapes_against_spec
from slimdiff_diffusers.diffusers_adapter import transformer_processors as tp
from slimdiff_diffusers.diffusers_adapter.slimming import check_slimmable, slim
from slimdiff_diffusers.diffusers_adapter.transformer_processors import SlimFluxAttnProcessor, SlimJointAttnProcessor

from tiny_models import (  # noqa: E402 (tests/ is on sys.path, see conftest)
    flux_inputs,
    pixart_inputs,
    sd3_inputs,
    tiny_flux_transformer,
    tiny_pixart_transformer,
    tiny_sd3_transformer,
)

FAMILIES = {
    "flux": (lambda: tiny_flux_transformer(), flux_inputs),
    "flux_guidance": (lambda: tiny_flux_transformer(guidance_embeds=True), flux_inputs),
    "sd3": (lambda: tiny_sd3_transformer(qk_norm=None), sd3_inputs),
    "sd35": (lambda: tiny_sd3_transformer(qk_norm="rms_norm"), sd3_inputs),
    "pixart": (lambda: tiny_pixart_transformer(), pixart_inputs),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def calibrated(one_thread):
    """family -> (model, inputs function, calibration), calibrated once with the propagation probe."""
    out = {}
    with torch.no_grad():
        for name, (make, inputs) in FAMILIES.items():
            model = make()

            def run(model=model, inputs=inputs):
                for seed in range(3):
                    model(**inputs(model, seed=seed))
            config = CalibrationConfig(propagation_probe_calls=2, attention_output_statistics=True)  # vo tests
            out[name] = (model, inputs, calibrate(model, run, config))
    return out


def _rel(model, slimmed, inputs) -> float:
    x = inputs(model, seed=11)
    with torch.no_grad():
        ref, out = model(**x)[0], slimmed(**x)[0]
    return float((out - ref).norm() / ref.norm())


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- discovery ------------------------------------------------------------------------------------------------


def test_flux_groups_and_why_qk_stays_whole():
    sites = sd.find_sites(tiny_flux_transformer())
    kinds = [(a.name, a.kind) for a in sites.attention]
    assert kinds == [("transformer_blocks.0.attn", "joint"), ("transformer_blocks.1.attn", "joint"),
                     ("single_transformer_blocks.0.attn", "single"), ("single_transformer_blocks.1.attn", "single")]
    assert not any(a.qk_decomposable for a in sites.attention)
    reasons = dict(sites.skipped)
    assert all("QK-norm and RoPE" in reasons[f"{a.name}:qk"] for a in sites.attention)
    single = [f for f in sites.feed_forward if f.kind == "single"]
    assert [f.up for f in single] == ["single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_mlp"]
    assert {f.stream for f in sites.feed_forward if f.name.endswith("ff_context")} == {"context"}
    assert not sites.refused


def test_sd3_context_pre_only_block_and_qk_norm():
    sites = sd.find_sites(tiny_sd3_transformer(qk_norm=None))
    assert [a.has_add_out for a in sites.attention] == [True, True, False]  # last block: no to_add_out
    assert all(a.qk_decomposable for a in sites.attention)
    assert [f.name for f in sites.feed_forward][-1] == "transformer_blocks.2.ff"  # no ff_context there
    normed = sd.find_sites(tiny_sd3_transformer(qk_norm="rms_norm"))
    assert not any(a.qk_decomposable for a in normed.attention)
    assert all("QK-norm sits" in r for _, r in normed.skipped)


# --- exactness at full rank -----------------------------------------------------------------------------------


def test_joint_decompositions_are_exact_at_full_rank():
    torch.manual_seed(0)
    heads, dh, d, dc = 2, 4, 6, 5
    def lin(i, o):
        layer = torch.nn.Linear(i, o).double()
        return LinearRef.of(layer.weight, layer.bias)

    def moment(n):
        x = torch.randn(50, n, dtype=torch.float64)
        xa = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1)
        return xa.T @ xa / 50
    q, aq, k, ak = lin(d, heads * dh), lin(dc, heads * dh), lin(d, heads * dh), lin(dc, heads * dh)
    qk = decompose_qk_joint({"q": (q, moment(d), 16.0), "add_q": (aq, moment(dc), 5.0)},
                            {"k": (k, moment(d), 16.0), "add_k": (ak, moment(dc), 5.0)}, heads)
    w = qk.weights(dh)
    for a, b, na, nb in ((q, k, "q", "k"), (q, ak, "q", "add_k"), (aq, k, "add_q", "k"), (aq, ak, "add_q", "add_k")):
        # Every (query stream, key stream) pair keeps its per-head bilinear form, biases included.
        for h in range(heads):
            rows = slice(h * dh, (h + 1) * dh)
            orig = a.augmented()[:, rows] @ b.augmented()[:, rows].T
            new_a = torch.cat([w[f"{na}.weight"][rows].T, w[f"{na}.bias"][None, rows]])
            new_b = torch.cat([w[f"{nb}.weight"][rows].T, w[f"{nb}.bias"][None, rows]])
            torch.testing.assert_close(new_a @ new_b.T, orig)
    assert float(qk.errors[dh]) < 1e-12
    v, av = lin(d, heads * dh), lin(dc, heads * dh)
    out, add_out = torch.randn(7, heads * dh, dtype=torch.float64), torch.randn(3, heads * dh, dtype=torch.float64)
    g = torch.randn(heads, dh, dh, dtype=torch.float64)
    vo = decompose_vo_joint({"v": v, "add_v": av}, {"out": (out, 16.0), "add_out": (add_out, 5.0)}, heads,
                            g @ g.transpose(1, 2) + 0.1 * torch.eye(dh, dtype=torch.float64))
    w = vo.weights(dh)
    for value, name in ((v, "v"), (av, "add_v")):
        for reader, rname in ((out, "out"), (add_out, "add_out")):
            orig = value.augmented() @ torch.block_diag(*[torch.eye(dh)] * heads).double() @ reader.T
            per_head_orig = sum(value.augmented()[:, h * dh:(h + 1) * dh] @ reader[:, h * dh:(h + 1) * dh].T
                                for h in range(heads))
            new_value = torch.cat([w[f"{name}.weight"].T, w[f"{name}.bias"][None]])
            torch.testing.assert_close(new_value @ w[f"{rname}.weight"].T, per_head_orig)
            torch.testing.assert_close(per_head_orig, orig)
    assert float(vo.errors[dh]) < 1e-12


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_one_reproduces_the_model(calibrated, family):
    model, inputs, calibration = calibrated[family]
    for vo_statistics, refit in (("input", "auto"), ("input", "attention_output"), ("input", "none"),
                                  ("attention_output", "attention_output"), ({"joint": "attention_output"}, "auto")):
        slimmed = slim(model, calibration, keep_ratio=1.0, vo_statistics=vo_statistics, vo_output_refit=refit)
        assert _rel(model, slimmed, inputs) < 1e-4, (vo_statistics, refit)


def _same_weights(a, b) -> bool:
    return _same_weights_dict(a.state_dict(), b.state_dict())


def _same_weights_dict(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vo_statistics_per_attention_kind(calibrated):
    """A dict chooses the VO statistics per attention kind; kinds it leaves out take the value input (the
    default). Flux has joint and single-stream attention, PixArt plain attention only."""
    flux, _, flux_calibration = calibrated["flux"]

    def build(model, calibration, vo_statistics):
        return slim(model, calibration, keep_ratio=0.6, targets=("vo",), vo_statistics=vo_statistics)

    both = build(flux, flux_calibration, {"joint": "attention_output", "single": "attention_output"})
    assert _same_weights(both, build(flux, flux_calibration, "attention_output"))
    assert _same_weights(build(flux, flux_calibration, {}), build(flux, flux_calibration, "input"))
    joint_only = build(flux, flux_calibration, {"joint": "attention_output"})
    assert not _same_weights(joint_only, both) and not _same_weights(joint_only, build(flux, flux_calibration, "input"))
    pixart, _, pixart_calibration = calibrated["pixart"]
    assert _same_weights(build(pixart, pixart_calibration, {"joint": "attention_output", "single": "attention_output"}),
                         build(pixart, pixart_calibration, "input"))


def test_vo_statistics_is_validated_in_the_config():
    default = sd.SlimConfig()
    assert default.vo_statistics == "auto"  # decisions.md row 31
    assert [default.vo_statistics_for(k) for k in ("plain", "joint", "single")] == \
        ["input", "input", "attention_output"]
    for bad in ("output", "Auto", {"joint": "outputs"}, {"cross": "input"}, {"single": "auto"}):
        with pytest.raises(ConfigError, match="vo_statistics"):
            sd.SlimConfig(vo_statistics=bad)
    config = sd.SlimConfig(vo_statistics={"single": "attention_output"})
    assert [config.vo_statistics_for(k) for k in ("plain", "joint", "single")] == ["input", "input", "attention_output"]
    assert [sd.SlimConfig(vo_statistics="attention_output").vo_statistics_for(k)
            for k in ("plain", "joint", "single")] == ["attention_output"] * 3
    with pytest.raises(ConfigError, match="attention kind"):
        config.vo_statistics_for("linear")


def test_vo_output_refit_is_validated_and_resolved_in_the_config():
    config = sd.SlimConfig()
    assert config.vo_output_refit == "auto"
    assert [config.vo_output_refit_for(k) for k in ("plain", "joint", "single")] == \
        ["none", "attention_output", "attention_output"]  # decisions.md row 26
    assert config.attention_kinds_reading_outputs() == {"joint", "single"}
    assert config.attention_kinds_reading_outputs(required=True) == set()  # "auto" does without them
    explicit = sd.SlimConfig(vo_output_refit="attention_output")
    assert explicit.attention_kinds_reading_outputs(required=True) == {"plain", "joint", "single"}
    # vo_statistics="auto" still reads the single-stream head outputs, so refit "none" alone does not free them
    assert sd.SlimConfig(vo_output_refit="none").attention_kinds_reading_outputs() == {"single"}
    assert sd.SlimConfig(vo_output_refit="none", vo_statistics="input").attention_kinds_reading_outputs() == set()
    assert sd.SlimConfig(vo_output_refit="none", vo_statistics="attention_output") \
        .attention_kinds_reading_outputs(required=True) == {"plain", "joint", "single"}
    for bad in ("output", True, "least_squares"):
        with pytest.raises(ConfigError, match="vo_output_refit"):
            sd.SlimConfig(vo_output_refit=bad)
    # the calibration's "auto" collects the attention outputs exactly for the kinds the default slimming reads
    auto = CalibrationConfig()
    assert [auto.collects_attention_outputs(k) for k in ("plain", "joint", "single")] == [False, True, True]
    assert not CalibrationConfig(attention_output_statistics=False).collects_attention_outputs("joint")
    with pytest.raises(ConfigError, match="attention_output_statistics"):
        CalibrationConfig(attention_output_statistics="joint")


def test_default_calibration_collects_attention_outputs_for_joint_and_single_stream_only(one_thread):
    """CalibrationConfig's default ("auto"): Flux's joint and single-stream readers get their head-output moments
    (so the default slimming refits them), PixArt's plain attention does not (it would pay ~3% for nothing)."""
    from slimdiff_diffusers.core.calibration import StatKeys
    from slimdiff_diffusers.core.calibrator import estimate_statistics_bytes

    for make, inputs, expected in ((tiny_flux_transformer, flux_inputs, True),
                                   (tiny_pixart_transformer, pixart_inputs, False)):
        model = make()
        with torch.no_grad():
            calibration = calibrate(model, lambda: model(**inputs(model, seed=0)),
                                    CalibrationConfig(propagation_probe_calls=1))
        for site in calibration.sites.attention:
            assert all((StatKeys.heads(p, "n") in calibration.tensors) == expected for p in site.output_paths)
        sites = calibration.sites
        assert (estimate_statistics_bytes(sites, CalibrationConfig()) >
                estimate_statistics_bytes(sites, CalibrationConfig(attention_output_statistics=False))) == expected
        slimmed = slim(model, calibration, keep_ratio=0.6)
        assert set(slimmed.slimdiff_report.vo_output_refit.values()) == {"attention_output" if expected else "none"}


def test_auto_vo_output_refit_without_statistics_keeps_the_svd_factor_and_says_so(calibrated, caplog):
    """A calibration without attention outputs (attention_output_statistics=False, or a file from before they were
    collected by default): "auto" keeps the SVD factor, warns once and records it; the result is exactly the
    "none" slimming."""
    model = tiny_flux_transformer()
    with torch.no_grad():
        calibration = calibrate(model, lambda: model(**flux_inputs(model, seed=0)),
                                CalibrationConfig(propagation_probe_calls=1, attention_output_statistics=False))
    with caplog.at_level(logging.WARNING, logger="slimdiff"):
        auto = slim(model, calibration, keep_ratio=0.6)
    warnings = [r.getMessage() for r in caplog.records if "vo_output_refit='auto'" in r.getMessage()]
    assert len(warnings) == 1 and "joint/single" in warnings[0] and "attention_output_statistics" in warnings[0]
    assert auto.slimdiff_report.vo_output_refit == {"joint": "none", "single": "none"}
    assert auto.slimdiff_report.vo_readers_summary is None
    # vo_statistics="auto" (single-stream VO whitened by its attention outputs) falls back to the value input too
    statistics = [r.getMessage() for r in caplog.records if "vo_statistics='auto'" in r.getMessage()]
    assert len(statistics) == 1 and "single attention" in statistics[0]
    assert auto.slimdiff_report.vo_statistics == {"joint": "input", "single": "input"}
    assert _same_weights(auto, slim(model, calibration, keep_ratio=0.6, vo_output_refit="none",
                                    vo_statistics="input"))


def test_default_whitens_single_stream_vo_with_its_attention_outputs(calibrated):
    """vo_statistics="auto" (decisions.md row 31): Flux's single-stream VO bases come from the head outputs that
    proj_out reads, joint attention keeps the value input; the report records what ran; PixArt (plain attention)
    is exactly the value-input slimming."""
    model, _, calibration = calibrated["flux"]
    settings = dict(keep_ratio=0.4, rank_multiple=2, ffn_multiple=8)
    auto = slim(model, calibration, **settings)
    assert auto.slimdiff_report.vo_statistics == {"joint": "input", "single": "attention_output"}
    explicit = slim(model, calibration, vo_statistics={"single": "attention_output"}, **settings)
    assert _same_weights(auto, explicit)
    assert not _same_weights(auto, slim(model, calibration, vo_statistics="input", **settings))
    pixart, _, pixart_calibration = calibrated["pixart"]
    plain = slim(pixart, pixart_calibration, keep_ratio=0.6)
    assert plain.slimdiff_report.vo_statistics == {"plain": "input"}
    assert _same_weights(plain, slim(pixart, pixart_calibration, keep_ratio=0.6, vo_statistics="input"))


def test_vo_output_refit_changes_the_readers_only_and_is_recorded(calibrated):
    """At keep 0.4 the refit gives the same widths and value projections as the SVD factor and other weights only in
    the readers; the report records what ran."""
    model, inputs, calibration = calibrated["flux"]
    settings = dict(keep_ratio=0.4, rank_multiple=2, ffn_multiple=8)
    plain = slim(model, calibration, vo_output_refit="none", **settings)
    refit = slim(model, calibration, vo_output_refit="attention_output", **settings)
    assert refit.slimdiff_spec.to_dict() == plain.slimdiff_spec.to_dict()
    assert refit.slimdiff_report.vo_output_refit == {"joint": "attention_output", "single": "attention_output"}
    assert plain.slimdiff_report.vo_output_refit == {"joint": "none", "single": "none"}
    assert "joint, single attention" in refit.slimdiff_report.vo_readers_summary
    narrowed = {a.kind for p, a in refit.slimdiff_spec.attention.items() if a.vo_rank < a.head_dim}
    assert narrowed == {"joint", "single"}
    for path in refit.slimdiff_spec.attention:
        assert refit.get_submodule(path).to_v.weight.equal(plain.get_submodule(path).to_v.weight)
    changed = [name for name, p in refit.named_parameters()
               if not p.equal(plain.get_parameter(name))]
    assert changed and all(name.endswith(("to_out.0.weight", "to_add_out.weight", "proj_out.weight"))
                           for name in changed), changed


def test_attention_output_vo_needs_its_statistics():
    """A calibration without attention-output moments: VO whitened by attention outputs (for every kind, or for
    one kind) is refused before any decomposition, saying how to proceed; the value input slims it."""
    model = tiny_flux_transformer()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        calibration = calibrate(model, lambda: model(**flux_inputs(model, seed=0)),
                                CalibrationConfig(propagation_probe_calls=1, attention_output_statistics=False))
    steps: list[int] = []  # plan_slim reports each decomposition; none may have run
    for vo_statistics in ("attention_output", {"single": "attention_output"}):
        with pytest.raises(CalibrationError, match="attention_output_statistics=True.*vo_statistics='input'"):
            sd.core.plan_slim(model, calibration, keep_ratio=0.6, vo_statistics=vo_statistics,
                              progress=lambda done, total: steps.append(done))
    # an explicit refit is refused the same way; "auto" does without (test above)
    with pytest.raises(CalibrationError, match="vo_output_refit='attention_output'.*vo_output_refit='none'"):
        sd.core.plan_slim(model, calibration, keep_ratio=0.6, vo_output_refit="attention_output",
                          progress=lambda done, total: steps.append(done))
    assert steps == []
    assert _same_weights_dict(before, model.state_dict())
    slimmed = slim(model, calibration, keep_ratio=0.6)
    assert _params(slimmed) < _params(model)


@pytest.mark.parametrize("family", ["flux", "sd3", "sd35", "pixart"])
@pytest.mark.parametrize("kind", ["qk", "vo", "ffn"])
def test_keep_one_per_group_kind(calibrated, family, kind):
    model, inputs, calibration = calibrated[family]
    sites = calibration.sites
    if kind == "qk" and not any(a.qk_decomposable for a in sites.attention):
        with pytest.raises(sd.core.errors.BudgetError):  # Flux / SD3.5: no QK group at all, said clearly
            slim(model, calibration, keep_ratio=1.0, targets=(kind,))
        return
    slimmed = slim(model, calibration, keep_ratio=1.0, targets=(kind,))
    assert {g.kind for g in slimmed.slimdiff_report.groups} == {kind}
    assert _rel(model, slimmed, inputs) < 1e-4


# --- slimming -------------------------------------------------------------------------------------------------


def _narrowed(slimmed) -> tuple[dict, dict]:
    spec = slimmed.slimdiff_spec
    attention = {p: a for p, a in spec.attention.items() if a.vo_rank < a.head_dim}
    ffn = {p: f for p, f in spec.feed_forward.items() if f.width < f.inner_dim}
    return attention, ffn


@pytest.mark.parametrize("family", ["flux", "sd3", "sd35"])
def test_keep_06_narrows_vo_and_ffn_in_both_streams(calibrated, family):
    model, inputs, calibration = calibrated[family]
    uniform = slim(model, calibration, keep_ratio=0.6, allocation="uniform")
    attention, ffn = _narrowed(uniform)
    sites = calibration.sites
    assert set(attention) == {a.name for a in sites.attention}  # joint VO: to_v, add_v_proj, to_out, to_add_out
    assert set(ffn) == {f.name for f in sites.feed_forward}  # ff, ff_context and the single-stream MLPs
    joint = uniform.get_submodule("transformer_blocks.0.attn")
    a = uniform.slimdiff_spec.attention["transformer_blocks.0.attn"]
    assert joint.add_v_proj.out_features == joint.to_v.out_features == a.heads * a.vo_rank
    assert joint.to_add_out.in_features == joint.to_out[0].in_features == a.heads * a.vo_rank
    if family == "flux":
        block = uniform.get_submodule("single_transformer_blocks.0")
        s_attn = uniform.slimdiff_spec.attention["single_transformer_blocks.0.attn"]
        s_ffn = uniform.slimdiff_spec.feed_forward["single_transformer_blocks.0"]
        assert block.attn.to_v.out_features == s_attn.heads * s_attn.vo_rank < 16
        assert block.proj_mlp.out_features == s_ffn.width < 64
        assert block.proj_out.in_features == s_attn.heads * s_attn.vo_rank + s_ffn.width
        assert block.proj_out._tp_packed_row_blocks == [s_attn.heads * s_attn.vo_rank, s_ffn.width]
    sis = slim(model, calibration, keep_ratio=0.6)
    for slimmed in (uniform, sis):
        removed = _params(model) - _params(slimmed)
        report = slimmed.slimdiff_report
        compressible = report.compressible_params_before
        assert removed >= 0.3 * compressible
        # The allocator's parameter cost model of every group kind (joint QK/VO over both streams, single-stream
        # VO and MLP sharing proj_out) counts exactly what the narrowed layers remove.
        assert removed == report.compressible_params_before - report.compressible_params_after
        assert _rel(model, slimmed, inputs) < 0.2  # runs, and stays close on random weights


def test_sd3_probe_and_single_stream_statistics(calibrated):
    _, _, calibration = calibrated["sd3"]
    assert set(calibration.propagation) == {"transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"}
    assert all(v > 0 for v in calibration.propagation.values())
    _, _, flux = calibrated["flux_guidance"]
    assert flux.output_energy("single_transformer_blocks.0.proj_out") > 0  # attention's part of proj_out
    assert flux.output_energy("single_transformer_blocks.0") > 0  # the MLP's part
    assert flux.block_input_energy("transformer_blocks.0:context") > 0  # text stream of a joint block


def test_calibration_file_round_trip_with_transformer_sites(calibrated, tmp_path):
    model, inputs, calibration = calibrated["flux"]
    calibration.save(tmp_path / "flux.safetensors")
    loaded = Calibration.load(tmp_path / "flux.safetensors")
    assert loaded.sites == calibration.sites
    a = slim(model, calibration, keep_ratio=0.6)
    b = slim(model, loaded, keep_ratio=0.6)
    assert a.slimdiff_spec.to_dict() == b.slimdiff_spec.to_dict()


def test_flow_matching_timesteps_fill_buckets():
    model = tiny_flux_transformer()

    def run():
        for seed in range(4):
            x = flux_inputs(model, seed=seed)
            x["timestep"] = torch.full((2,), 0.2 + 0.2 * seed)  # Flux pipelines pass t / 1000, in [0, 1]
            model(**x)
    with torch.no_grad():
        calibration = calibrate(model, run, CalibrationConfig(num_timestep_buckets=2, num_train_timesteps=1,
                                                              propagation_probe_calls=0))
    counts = calibration.tensors["energy/transformer_blocks.0#in/n"]
    assert (counts > 0).all()


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
def test_default_allocation_refinement_per_family(calibrated, family):
    """allocation_refinement="auto": the 1-exchange refinement on joint/single-stream transformers (Flux, SD3),
    the descent alone on PixArt's plain attention (decisions row 22); within the budget, never a higher objective."""
    from slimdiff_diffusers.core.plan import plan_slim

    model, _, calibration = calibrated[family]
    cache: dict = {}
    plans = {r: plan_slim(model, calibration, keep_ratio=0.6, allocation_refinement=r, decomposition_cache=cache)
             for r in ("auto", "exchange", "none")}
    assert plans["auto"].ranks == plans["exchange" if family != "pixart" else "none"].ranks
    # the plan records what ran: "auto" resolved for this model
    assert {r: p.allocation_refinement for r, p in plans.items()} == {
        "auto": "exchange" if family != "pixart" else "none", "exchange": "exchange", "none": "none"}
    for plan in plans.values():
        assert sum(g.params for g in plan.groups) <= 0.6 * sum(g.full_params for g in plan.groups) + 8
    objective = {r: sum(g.influence * g.predicted_error for g in plan.groups) for r, plan in plans.items()}
    assert objective["exchange"] <= objective["none"] + 1e-12


# --- spec: rebuild from a spec, check shapes --------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
def test_spec_rebuilds_narrow_shapes(calibrated, family):
    model, inputs, calibration = calibrated[family]
    slimmed = slim(model, calibration, keep_ratio=0.6, allocation="uniform")
    spec = SlimSpec.from_json(slimmed.slimdiff_spec.to_json())
    assert spec.to_dict() == slimmed.slimdiff_spec.to_dict()
    rebuilt = apply_slim_spec(copy.deepcopy(model), spec)
    state = slimmed.state_dict()
    rebuilt.load_state_dict(state, strict=True)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    check_shapes_against_spec(spec, shapes, "test")
    wrong = dict(shapes)
    key = next(k for k in shapes if k.endswith("proj_out.weight") or k.endswith("to_add_out.weight")
               or k.endswith("attn1.to_out.0.weight"))
    wrong[key] = (shapes[key][0], shapes[key][1] + 1)
    with pytest.raises(SlimWeightsError):
        check_shapes_against_spec(spec, wrong, "test")


def test_spec_kinds_are_validated():
    base = {"heads": 2, "head_dim": 8, "qk_rank": 8, "vo_rank": 4}
    assert SlimSpec.from_dict({"version": 1, "attention": {"a": base}}).attention["a"].kind == "plain"
    with pytest.raises(sd.core.errors.SlimSpecError, match="unknown kind"):
        SlimSpec.from_dict({"version": 1, "attention": {"a": base | {"kind": "mystery"}}})
    with pytest.raises(sd.core.errors.SlimSpecError, match="separate"):
        SlimSpec.from_dict({"version": 1, "attention": {"a": base | {"kind": "joint", "layout": "uniform"}}})
    # A plain spec serialises without `kind`, as before transformer support (files written then read the same).
    assert "kind" not in SlimSpec.from_dict({"version": 1, "attention": {"a": base}}).to_dict()["attention"]["a"]


def test_spec_kind_mismatch_is_refused(calibrated):
    model, _, calibration = calibrated["sd3"]
    spec = slim(model, calibration, keep_ratio=0.6).slimdiff_spec
    spec.attention["transformer_blocks.0.attn"].kind = "plain"
    with pytest.raises(sd.core.errors.SlimSpecError, match="joint attention here"):
        apply_slim_spec(copy.deepcopy(model), spec)


# --- refusals -------------------------------------------------------------------------------------------------


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")})


def _unchanged(model, snapshot):
    state, processors = snapshot
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state) and \
        processors == {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}


class _AddedKV(torch.nn.Module):
    """A custom block with added key/value projections only (no add_q_proj): not MMDiT joint attention."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention
        self.attn = Attention(16, heads=2, dim_head=8, added_kv_proj_dim=12)


def _sana():
    torch.manual_seed(0)
    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=12, sample_size=8)


def _fused_flux():
    model = tiny_flux_transformer()
    model.fuse_qkv_projections()
    return model


@pytest.mark.parametrize("make, reason", [(_fused_flux, "unfuse_qkv_projections"), (_sana, "linear attention"),
                                          (_AddedKV, "add_k_proj")])
def test_unsupported_models_are_refused_before_anything_runs(make, reason):
    model = make()
    snapshot = _snapshot(model)
    ran = []
    with pytest.raises(UnsupportedArchitectureError, match=reason) as info:
        calibrate(model, lambda: ran.append(1))
    assert not ran  # refused before the run function (and any hook)
    assert "attn" in str(info.value)  # names the modules
    assert isinstance(info.value, CalibrationError) and isinstance(info.value, sd.core.errors.SlimDiffError)
    with pytest.raises(UnsupportedArchitectureError, match=reason):
        check_slimmable(model, sd.SlimConfig(keep_ratio=0.5))
    assert _unchanged(model, snapshot)


def test_uniform_layout_is_refused_for_transformer_attention(calibrated):
    model, _, calibration = calibrated["sd3"]
    with pytest.raises(ConfigError, match="separate"):
        slim(model, calibration, keep_ratio=0.6, head_layout="uniform")


def test_custom_processor_on_joint_attention_is_refused(calibrated):
    model, _, calibration = calibrated["sd3"]
    custom = copy.deepcopy(model)

    class Custom(JointAttnProcessor2_0):
        pass
    custom.transformer_blocks[0].attn.set_processor(Custom())
    snapshot = _snapshot(custom)
    with pytest.raises(UnsupportedProcessorError, match="transformer_blocks.0.attn"):
        check_slimmable(custom, sd.SlimConfig(keep_ratio=0.6))
    assert _unchanged(custom, snapshot)


def test_slimmed_joint_attention_translates_or_refuses_processor_switches(calibrated):
    model, inputs, calibration = calibrated["sd3"]
    slimmed = slim(model, calibration, keep_ratio=0.6)
    attn = slimmed.transformer_blocks[0].attn
    attn.set_processor(JointAttnProcessor2_0())
    assert type(attn.processor) is SlimJointAttnProcessor
    from diffusers.models.attention_processor import AttnProcessor2_0
    with pytest.raises(UnsupportedProcessorError, match="joint transformer attention"):
        attn.set_processor(AttnProcessor2_0())
    assert type(attn.processor) is SlimJointAttnProcessor


# --- processors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, stock, slim_cls", [("flux", FluxAttnProcessor, SlimFluxAttnProcessor),
                                                     ("sd3", JointAttnProcessor2_0, SlimJointAttnProcessor),
                                                     ("sd35", JointAttnProcessor2_0, SlimJointAttnProcessor)])
def test_slim_processors_match_stock_on_unslimmed_models(family, stock, slim_cls):
    make, inputs = FAMILIES[family]
    model = make()
    x = inputs(model, seed=3)
    with torch.no_grad():
        ref = model(**x)[0]
        for m in model.modules():
            if type(getattr(m, "processor", None)) is stock:
                m.set_processor(slim_cls())
        out = model(**x)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def _reference_attention(q, k, v, scale):
    """Unpadded attention with differing q/k and v widths: softmax(q kᵀ · scale) v, per (batch, head)."""
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def test_narrow_v_is_zero_padded_and_keeps_the_scale(calibrated, monkeypatch):
    model, inputs, calibration = calibrated["flux"]
    slimmed = slim(model, calibration, keep_ratio=0.6, allocation="uniform")
    attn = slimmed.single_transformer_blocks[0].attn
    spec = attn.slimdiff_spec
    assert spec.vo_rank < spec.head_dim and spec.qk_rank == spec.head_dim
    seen = []
    real = tp.dispatch_attention_fn

    def spy(query, key, value, **kwargs):
        seen.append((query.shape[-1], key.shape[-1], value.shape[-1], kwargs.get("scale")))
        out = real(query, key, value, **kwargs)
        # the padded value channels produce exact zeros, which the processor slices off
        assert torch.all(out[..., spec.vo_rank:] == 0)
        ref = _reference_attention(query.transpose(1, 2), key.transpose(1, 2),
                                   value[..., :spec.vo_rank].transpose(1, 2), kwargs["scale"]).transpose(1, 2)
        torch.testing.assert_close(out[..., :spec.vo_rank], ref, rtol=1e-5, atol=1e-6)
        return out
    monkeypatch.setattr(tp, "dispatch_attention_fn", spy)
    x = torch.randn(2, 7, attn.to_q.in_features)
    with torch.no_grad():
        out = attn(x)
    assert out.shape == (2, 7, spec.heads * spec.vo_rank)
    assert seen == [(spec.head_dim, spec.head_dim, spec.head_dim, spec.head_dim ** -0.5)]


def test_sd3_narrow_qk_and_v_against_reference(calibrated):
    model, inputs, calibration = calibrated["sd3"]
    slimmed = slim(model, calibration, keep_ratio=0.6, allocation="uniform")
    attn = slimmed.transformer_blocks[0].attn
    spec = attn.slimdiff_spec
    assert spec.qk_rank < spec.head_dim and spec.vo_rank < spec.head_dim
    h, c = torch.randn(2, 6, attn.to_q.in_features), torch.randn(2, 4, attn.add_q_proj.in_features)
    with torch.no_grad():
        out, context = attn(h, encoder_hidden_states=c)

        def heads(t):
            return t.view(2, -1, spec.heads, t.shape[-1] // spec.heads).transpose(1, 2)
        q = torch.cat([heads(attn.to_q(h)), heads(attn.add_q_proj(c))], 2)
        k = torch.cat([heads(attn.to_k(h)), heads(attn.add_k_proj(c))], 2)
        v = torch.cat([heads(attn.to_v(h)), heads(attn.add_v_proj(c))], 2)
        ref = _reference_attention(q, k, v, spec.head_dim ** -0.5).transpose(1, 2).reshape(2, 10, -1)
        torch.testing.assert_close(out, attn.to_out[0](ref[:, :6]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(context, attn.to_add_out(ref[:, 6:]), rtol=1e-5, atol=1e-6)


def test_flux_attention_backend_choice_reaches_dispatch(calibrated, monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName

    model, inputs, calibration = calibrated["flux"]
    slimmed = slim(model, calibration, keep_ratio=0.6, allocation="uniform")
    x = inputs(model, seed=4)
    with torch.no_grad():
        before = slimmed(**x)[0]
    slimmed.set_attention_backend("_native_math")
    backends = []
    real = tp.dispatch_attention_fn

    def spy(*args, **kwargs):
        backends.append(kwargs.get("backend"))
        return real(*args, **kwargs)
    monkeypatch.setattr(tp, "dispatch_attention_fn", spy)
    with torch.no_grad():
        after = slimmed(**x)[0]
    assert backends and set(backends) == {AttentionBackendName._NATIVE_MATH}
    assert len(backends) == 4  # two double-stream and two single-stream blocks
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_fuse_qkv_projections_on_a_slimmed_transformer(calibrated, family):
    model, inputs, calibration = calibrated[family]
    slimmed = slim(model, calibration, keep_ratio=0.6, allocation="uniform")
    x = inputs(model, seed=5)
    with torch.no_grad():
        before = slimmed(**x)[0]
        slimmed.fuse_qkv_projections()  # unequal q/k and v widths: split at the layers' widths, not in thirds
        attn = slimmed.transformer_blocks[0].attn
        assert attn.fused_projections and attn.to_qkv.out_features == 2 * attn.to_q.out_features + attn.to_v.out_features
        assert attn.to_v.out_features < attn.to_q.out_features or attn.to_q.out_features < 16  # really narrowed
        assert type(slimmed.transformer_blocks[0].attn.processor) in (SlimFluxAttnProcessor, SlimJointAttnProcessor)
        after = slimmed(**x)[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_sd35_dual_attention_block(one_thread):
    """SD3.5-medium's blocks add a second self-attention (attn2) that runs JointAttnProcessor2_0 without a text
    stream: a plain group whose processor is translated to the slim joint one."""
    torch.manual_seed(0)
    from diffusers import SD3Transformer2DModel
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                  pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
                                  dual_attention_layers=(0,)).eval()
    sites = sd.find_sites(model)
    assert ("transformer_blocks.0.attn2", "plain") in [(a.name, a.kind) for a in sites.attention]
    with torch.no_grad():
        calibration = calibrate(model, lambda: [model(**sd3_inputs(model, seed=s)) for s in range(3)])
        for keep, bound in ((1.0, 1e-4), (0.6, 0.2)):
            slimmed = slim(model, calibration, keep_ratio=keep, allocation="uniform")
            assert type(slimmed.transformer_blocks[0].attn2.processor) is SlimJointAttnProcessor
            assert _rel(model, slimmed, sd3_inputs) < bound
        assert slimmed.slimdiff_spec.attention["transformer_blocks.0.attn2"].vo_rank < 8


def test_single_file_round_trip_checks_transformer_shapes(calibrated, tmp_path):
    from slimdiff_diffusers.core import load_slim_file, save_slim_file

    model, inputs, calibration = calibrated["flux"]
    slimmed = slim(model, calibration, keep_ratio=0.6, allocation="uniform")
    state = {k: v.contiguous() for k, v in slimmed.state_dict().items()}
    path = save_slim_file(tmp_path / "flux.safetensors", state, slimmed.slimdiff_spec, key_layout="diffusers")
    loaded, spec, _ = load_slim_file(path)
    assert spec.to_dict() == slimmed.slimdiff_spec.to_dict()
    rebuilt = apply_slim_spec(copy.deepcopy(model), spec)
    rebuilt.load_state_dict(loaded, strict=True)
    for m in rebuilt.modules():  # the stock processors cannot run narrowed V: give the rebuilt model the slim ones
        if type(getattr(m, "processor", None)) is FluxAttnProcessor:
            m.set_processor(SlimFluxAttnProcessor())
    x = inputs(model, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**x)[0], slimmed(**x)[0])
    # a single-stream proj_out whose MLP columns were cut by one is caught from the header, before loading
    bad = dict(state)
    bad["single_transformer_blocks.0.proj_out.weight"] = bad["single_transformer_blocks.0.proj_out.weight"][:, :-1]
    save_slim_file(tmp_path / "bad.safetensors", bad, spec, key_layout="diffusers")
    with pytest.raises(SlimWeightsError, match="single_transformer_blocks.0.proj_out.weight"):
        load_slim_file(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flop_budget_over_transformer_groups(calibrated, family):
    model, inputs, calibration = calibrated[family]
    slimmed = slim(model, calibration, keep_ratio=0.6, budget="flops")
    report = slimmed.slimdiff_report
    assert report.flops_after <= 0.6 * report.flops_before * (1 + 1e-9)
    joint = [g for g in report.groups if g.name == "transformer_blocks.0.attn:vo"][0]
    tokens = calibration.tokens_per_row
    n_img, n_txt = tokens["transformer_blocks.0.attn.to_q"], tokens["transformer_blocks.0.attn.add_q_proj"]
    # joint VO MACs per sample at full rank: both streams' values, the (n_img + n_txt)² mixing, both readers
    d, heads, dh = 16, 2, 8
    expected = heads * dh * (n_img * d + n_txt * d + (n_img + n_txt) ** 2 + n_img * d + n_txt * d)
    assert joint.full_flops == pytest.approx(expected)
    assert _rel(model, slimmed, inputs) < 0.2


def test_modules_kept_whole_for_one_reason_are_one_console_line(caplog):
    """FLUX.1-dev keeps QK whole in all 57 blocks: one warning naming a few and the count, the full list at info."""
    import logging

    from slimdiff_diffusers.core.calibrator import Calibrator

    model = tiny_flux_transformer(num_layers=2, num_single_layers=3)
    with caplog.at_level(logging.INFO, logger="slimdiff"):
        Calibrator(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "not slimmed" in r.getMessage()]
    assert len(warnings) == 1 and "and 2 more (QK stays whole" in warnings[0], warnings
    full = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "not slimmed, all 5" in r.getMessage()]
    assert len(full) == 1 and "single_transformer_blocks.2.attn:qk" in full[0]
