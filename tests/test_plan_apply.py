"""plan_slim / apply_plan: the plan never touches the model, apply is all or nothing, settings fail early."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_unet
from tiny_models import tiny_sd15_unet

import slimdiff_diffusers as sd
from slimdiff_diffusers.core import (
    CalibrationMismatchError,
    ConfigError,
    SlimConfig,
    apply_plan,
    plan_slim,
)
from slimdiff_diffusers.core import rewrite
from slimdiff_diffusers.diffusers_adapter.slimming import apply_slim_plan
from slimdiff_diffusers.core.influence import group_influence_calls

SMALL = dict(rank_multiple=2, ffn_multiple=8)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def test_plan_leaves_the_model_alone_and_apply_equals_slim(sd15_unet, sd15_calibration):
    before = _state(sd15_unet)
    plan = plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, **SMALL)
    assert _same_state(before, _state(sd15_unet))
    assert plan.spec.attention and plan.spec.feed_forward
    assert {g.kind for g in plan.groups} == {"qk", "vo", "ffn"}
    assert all(g.rank <= g.full_rank for g in plan.groups)
    applied = apply_plan(copy.deepcopy(sd15_unet), plan)
    reference = sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.5, **SMALL)
    assert _same_state(_state(applied), _state(reference))
    assert applied.slimdiff_spec.to_dict() == reference.slimdiff_spec.to_dict()
    assert applied.slimdiff_report.compressible_params_after == reference.slimdiff_report.compressible_params_after


def test_plan_does_not_need_the_statistics_after_planning(sd15_unet, sd15_calibration):
    calibration = copy.copy(sd15_calibration)
    calibration.tensors = dict(sd15_calibration.tensors)
    plan = plan_slim(sd15_unet, calibration, keep_ratio=0.5, **SMALL)
    calibration.tensors.clear()  # what pipe.slim() frees before applying
    applied = apply_plan(copy.deepcopy(sd15_unet), plan)
    reference = sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.5, **SMALL)
    assert _same_state(_state(applied), _state(reference))


@pytest.mark.parametrize("basis_maps", [False, True])
def test_released_statistics_give_the_same_plan_and_cannot_be_reused(sd15_unet, sd15_calibration, tmp_path, basis_maps):
    """pipe.slim frees each feed-forward's moment once its refit is done (release_statistics=True): the plan is
    the same, and the spent calibration refuses to be read or saved instead of giving a wrong answer."""
    calibration = copy.copy(sd15_calibration)
    calibration.tensors, calibration.meta = dict(sd15_calibration.tensors), dict(sd15_calibration.meta)
    size = calibration.nbytes
    released = plan_slim(sd15_unet, calibration, keep_ratio=0.5, basis_maps=basis_maps, release_statistics=True,
                         **SMALL)
    kept = plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, basis_maps=basis_maps, **SMALL)
    assert released.ranks == kept.ranks
    for a, b in zip(released.groups, kept.groups):
        if a.kind == "ffn":  # QK/VO factors do not read the feed-forward statistics
            assert a.factors.keys() == b.factors.keys()
            assert all(torch.equal(a.factors[k], b.factors[k]) for k in a.factors)
    applied = [apply_plan(copy.deepcopy(sd15_unet), plan) for plan in (released, kept)]
    assert _same_state(_state(applied[0]), _state(applied[1]))
    narrowed = [g for g in released.groups if g.kind == "ffn"]
    assert narrowed and calibration.nbytes < size
    with pytest.raises(sd.CalibrationError, match="released"):
        calibration.input_moment(narrowed[0].site.hidden_key)
    with pytest.raises(sd.CalibrationError, match="released"):
        calibration.save(tmp_path / "spent.safetensors")
    assert not (tmp_path / "spent.safetensors").exists()
    with pytest.raises(ConfigError, match="decomposition_cache"):
        plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, release_statistics=True, decomposition_cache={})


@pytest.mark.parametrize("buckets", [1, 3])
def test_augmented_input_moment_is_augment_of_the_input_moment(sd15_unet, buckets):
    """The one-allocation accessor gives exactly augment(E[xxᵀ], E[x]), for fp64 and fp32 accumulators."""
    from slimdiff_diffusers.core.decompositions import augment
    for dtype in (torch.float64, torch.float32):
        calibration = sd.calibrate(sd15_unet, run_unet(sd15_unet, batches=3), sd.CalibrationConfig(
            num_timestep_buckets=buckets, accumulate_dtype=dtype, propagation_probe_calls=0))
        for path in [calibration.sites.feed_forward[0].hidden_key, calibration.sites.attention[0].q]:
            expected = augment(*calibration.input_moment(path))
            assert torch.equal(calibration.augmented_input_moment(path), expected), (path, dtype)


def test_apply_refuses_another_model(sd15_unet, sd15_calibration):
    plan = plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, **SMALL)
    other = tiny_sd15_unet(seed=1)
    before = _state(other)
    with pytest.raises(CalibrationMismatchError, match="slim plan does not belong"):
        apply_plan(other, plan)
    assert _same_state(before, _state(other))


@pytest.mark.parametrize("fail_at", [1, 7, "finish"])
@pytest.mark.parametrize("exception", [OverflowError("fp16 overflow"), KeyboardInterrupt()])
def test_failed_in_place_slimming_rolls_back(sd15_calibration, monkeypatch, fail_at, exception):
    """A failure midway (fp16 overflow, out of memory, Ctrl-C) leaves the model exactly as it was."""
    from slimdiff_diffusers.diffusers_adapter import slimming

    unet = tiny_sd15_unet()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 24)
    reference = unet(x, 500, encoder_hidden_states=ctx).sample
    before = _state(unet)
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    classes = {name: type(m) for name, m in unet.named_modules()}
    calls = {"n": 0}
    narrow = rewrite.narrow_linear

    def failing_narrow(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise exception
        return narrow(*args, **kwargs)

    def failing_class(*args, **kwargs):
        raise exception

    if fail_at == "finish":
        monkeypatch.setattr(slimming, "as_slim_class", failing_class)
    else:
        monkeypatch.setattr(rewrite, "narrow_linear", failing_narrow)
    with pytest.raises(type(exception)):
        slimming.slim(unet, sd15_calibration, keep_ratio=0.5, inplace=True, **SMALL)
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert not hasattr(unet, "slimdiff_spec") and "slimdiff_spec" not in unet.config
    assert _same_state(before, _state(unet))
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors
    assert {name: type(m) for name, m in unet.named_modules()} == classes  # guarded attention classes undone too
    assert torch.equal(unet(x, 500, encoder_hidden_states=ctx).sample, reference)


def test_invalid_patterns_are_refused_when_the_config_is_built():
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        SlimConfig(keep_ratio=0.5, exclude=["up_blocks[0"])
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        SlimConfig(keep_ratio=0.5, rank_pattern={"(mid_block:ffn": 8})
    with pytest.raises(ConfigError, match="timestep_weighting"):
        SlimConfig(keep_ratio=0.5, timestep_weighting=[0, 0])
    with pytest.raises(ConfigError, match="unknown SlimConfig option"):
        SlimConfig.resolve(None, keep_ratio=0.5, kep_ratio=0.3)


def test_patterns_that_match_nothing_are_errors_listing_candidates(sd15_unet, sd15_calibration):
    with pytest.raises(ConfigError, match=r"exclude pattern 'down_blocks.9.\*' matches no .*such as: 'down_blocks"):
        sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.5, exclude=["down_blocks.9.*"], **SMALL)
    with pytest.raises(ConfigError, match=r"rank_pattern key 'mid_block.*:ff' matches no group.*:qk"):
        sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.5, rank_pattern={"mid_block.*:ff": 8}, **SMALL)
    slimmed = sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.7, rank_pattern={"mid_block.*:ffn": 16},
                      exclude=[r"down_blocks\.0\..*"], **SMALL)
    assert all(spec.width == 16 for path, spec in slimmed.slimdiff_spec.feed_forward.items() if path.startswith("mid_block"))
    assert not any(path.startswith("down_blocks.0.") for path in slimmed.slimdiff_spec.attention)


def test_pipe_slim_checks_settings_before_calibrating(tmp_path):
    from tiny_models import tiny_sd_pipeline

    pipe = sd.enable_slimdiff(tiny_sd_pipeline(tmp_path))
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match="matches no"):
        pipe.slim(prompts=["a", "b"], num_prompts=2, keep_ratio=0.5, exclude=["no_such_block.*"], **SMALL)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        pipe.slim(prompts=["a", "b"], num_prompts=2, keep_ratio=0.5, exclude=["(("], **SMALL)
    assert calls == [], "settings errors must come before any calibration forward pass"


def test_decomposition_cache_serves_several_plans(sd15_unet, sd15_calibration):
    cache: dict = {}
    first = plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.7, decomposition_cache=cache, **SMALL)
    entries = len(cache)
    second = plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, decomposition_cache=cache, **SMALL)
    assert len(cache) == entries and sum(g.params for g in second.groups) < sum(g.params for g in first.groups)
    uncached = plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, **SMALL)
    assert second.ranks == uncached.ranks


def test_estimated_statistics_size_matches_the_run():
    unet = tiny_sd15_unet()
    calibration = sd.calibrate(unet, run_unet(unet, batches=1), sd.CalibrationConfig(propagation_probe_calls=0))
    estimate = sd.core.estimate_statistics_bytes(calibration.sites, sd.CalibrationConfig())
    assert estimate == calibration.meta["memory_bytes"]


def test_long_steps_report_progress_and_can_be_cancelled(sd15_unet, sd15_calibration):
    seen: list[tuple[int, int]] = []
    plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, progress=lambda d, t: seen.append((d, t)), **SMALL)
    total = seen[-1][1]
    sites = sd15_calibration.sites
    assert total == len(sites.attention) + 2 * len(sites.feed_forward)
    assert [d for d, _ in seen] == list(range(1, total + 1))

    def cancel(done, total):
        if done == 2:
            raise KeyboardInterrupt
    before = _state(sd15_unet)
    with pytest.raises(KeyboardInterrupt):
        plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, progress=cancel, **SMALL)
    assert _same_state(before, _state(sd15_unet))

    probe: list[tuple[int, int]] = []
    unet = tiny_sd15_unet()
    calibration = sd.calibrate(unet, run_unet(unet, batches=3), progress=lambda d, t: probe.append((d, t)))
    # every replayed call: the block probe's, then the measured group influence's (method.md §4.1.1)
    blocks = (len(calibration.sites.blocks) + 1) * 3
    assert probe[-1] == (blocks + group_influence_calls(calibration.sites, 3),) * 2
    assert [d for d, _ in probe] == list(range(1, probe[-1][0] + 1))
    with pytest.raises(KeyboardInterrupt):
        sd.calibrate(unet, run_unet(unet, batches=3), progress=cancel)
    before = _state(unet)

    def cancel_while_a_group_is_slimmed(done, total):
        if done == blocks + 3 + 2:  # the clean replay is done; the first group is slimmed in place
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        sd.calibrate(unet, run_unet(unet, batches=3), progress=cancel_while_a_group_is_slimmed)
    assert _same_state(before, _state(unet))  # the group's parameters were put back


def test_fp32_accumulated_statistics_slim_like_fp64_ones(sd15_unet, sd15_calibration):
    # CalibrationConfig.accumulate_dtype=float32 halves the statistics; the decompositions still run in fp64
    # (the accessors promote), and the slim model stays close to the one planned from fp64 sums.
    calibration = sd.calibrate(sd15_unet, run_unet(sd15_unet, batches=6),
                               sd.CalibrationConfig(accumulate_dtype=torch.float32))
    assert calibration.tensors[next(k for k in calibration.tensors if k.endswith("/xx"))].dtype == torch.float32
    fp32 = plan_slim(sd15_unet, calibration, keep_ratio=0.5, **SMALL)
    fp64 = plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, **SMALL)
    assert fp32.spec.to_dict() == fp64.spec.to_dict()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    context = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = apply_slim_plan(copy.deepcopy(sd15_unet), fp32)(x, 500, encoder_hidden_states=context).sample
        b = apply_slim_plan(copy.deepcopy(sd15_unet), fp64)(x, 500, encoder_hidden_states=context).sample
    assert ((a - b).norm() / b.norm()).item() < 1e-3


def _storages(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def test_slim_copy_does_not_copy_the_layers_it_narrows(sd15_unet, sd15_calibration):
    """slim() on a copy: the copy shares only the layers apply_plan replaces (so they are never duplicated,
    issue 9), and the slim result shares no storage with the model, which is left as it was."""
    from slimdiff_diffusers.core.slim import copy_for_narrowing

    before = _state(sd15_unet)
    plan = plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, **SMALL)
    target, shared = copy_for_narrowing(sd15_unet, plan)
    narrowed = {p for g in plan.groups for p in ([*g.site.input_paths, *g.site.output_paths]
                                                   if g.kind != "ffn" else [g.site.up, g.site.down])}
    for name, param in target.named_parameters():
        original = sd15_unet.get_parameter(name)
        assert (param is original) == (name.rsplit(".", 1)[0] in narrowed), name
    assert len(shared) == sum(1 for n, _ in sd15_unet.named_parameters() if n.rsplit(".", 1)[0] in narrowed)
    slimmed = sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.5, **SMALL)
    assert not _storages(slimmed) & _storages(sd15_unet)
    assert _same_state(before, _state(sd15_unet))
    reference = apply_plan(copy.deepcopy(sd15_unet), plan)
    assert _same_state(_state(slimmed), _state(reference))


def test_slim_copy_of_a_transformer_shares_nothing():
    """Flux (QK whole under QK-norm and RoPE; VO, FFN and the single-stream blocks narrowed): the slim copy shares
    no storage with the original, so writing to it never reaches the original."""
    from tiny_models import flux_inputs, tiny_flux_transformer

    model = tiny_flux_transformer()
    with torch.no_grad():
        calibration = sd.calibrate(model, lambda: [model(**flux_inputs(model, seed=s)) for s in range(2)],
                                   sd.CalibrationConfig(propagation_probe_calls=0))
    before = _state(model)
    slimmed = sd.slim(model, calibration, keep_ratio=0.6, rank_multiple=2, ffn_multiple=8,
                      propagation="block_influence")
    assert not _storages(slimmed) & _storages(model)
    with torch.no_grad():
        for p in slimmed.parameters():
            p.add_(1.0)
    assert _same_state(before, _state(model))


def test_unshare_copies_what_is_still_shared_and_keeps_ties():
    """The safety net after applying: a parameter the rewrite did not replace is copied, once per tie."""
    from slimdiff_diffusers.core.slim import unshare

    first, second = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    second.weight = first.weight  # tied
    model = torch.nn.Sequential(first, second)
    copied = copy.deepcopy(model, memo={id(first.weight): first.weight})
    shared = {id(first.weight): first.weight}
    assert copied[0].weight is first.weight
    unshare(copied, shared)
    assert copied[0].weight is not first.weight and copied[0].weight is copied[1].weight
    assert torch.equal(copied[0].weight, first.weight)
    assert copied[0].bias is not first.bias
