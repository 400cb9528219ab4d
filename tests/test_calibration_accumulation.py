"""How statistics are accumulated: upper-block Gram products, deferred finite checks, statistics_device, and
calibration under diffusers' group offloading."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import run_unet
from tiny_models import tiny_sd15_unet

import slimdiff_diffusers as sd
from slimdiff_diffusers.core import ConfigError, NonFiniteActivationError, moments
from slimdiff_diffusers.core.moments import MomentAccumulator, add_upper_gram_, mirror_upper_blocks_


@pytest.mark.parametrize("dim", [5, 8, 13, 16, 33])
def test_upper_block_gram_equals_the_full_product(dim):
    gen = torch.Generator().manual_seed(dim)
    rows = [torch.randn(3, 11, dim, generator=gen) + 0.5 for _ in range(4)]
    acc = MomentAccumulator(dim, 2, torch.float64, "cpu")
    for x in rows[:2]:
        acc.add(x, 1)
    reference = sum(x.reshape(-1, dim).double().T @ x.reshape(-1, dim).double() for x in rows[:2])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(moments, "CPU_GRAM_BLOCK", 4)  # several column blocks even at these small widths
        small = MomentAccumulator(dim, 2, torch.float64, "cpu")
        for x in rows[:2]:
            small.add(x, 1)
        first = small.freeze()[1].clone()
        assert torch.equal(small.freeze()[1], first), "freezing twice changes nothing"
        for x in rows[2:]:  # accumulating after a freeze, then freezing again, is still right
            small.add(x, 1)
        later = small.freeze()[1]
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(acc.freeze()[1], reference) < 1e-6
    assert rel(first, reference) < 1e-6
    off_diagonal_blocks = first.clone()
    for start in range(0, dim, 4):
        off_diagonal_blocks[start:start + 4, start:start + 4] = 0
    assert torch.equal(off_diagonal_blocks, off_diagonal_blocks.T), "mirrored blocks are exact transposes"
    full = reference + sum(x.reshape(-1, dim).double().T @ x.reshape(-1, dim).double() for x in rows[2:])
    assert rel(later, full) < 1e-6
    assert acc.xx[0].abs().max() == 0 and small.xx[0].abs().max() == 0, "other buckets untouched"


def test_mirroring_fills_only_the_lower_blocks():
    xx = torch.triu(torch.arange(1.0, 101.0).reshape(10, 10))
    upper = xx.clone()
    mirror_upper_blocks_(xx, block=4)
    for i in range(10):
        for j in range(10):
            if j // 4 < i // 4:  # strictly lower block: mirrored
                assert xx[i, j] == upper[j, i]
            else:  # diagonal and upper blocks: untouched (diagonal blocks are computed whole by the products)
                assert xx[i, j] == upper[i, j]
    out = torch.zeros(10, 10, dtype=torch.float64)
    rows = torch.randn(7, 10)
    add_upper_gram_(out, rows, block=4)
    assert out[4:, :4].abs().max() == 0 and out[8:, 4:8].abs().max() == 0, "lower blocks are skipped"


def test_calibration_with_narrow_gram_blocks_equals_the_direct_moments(monkeypatch):
    """The whole calibration path (shared inputs, freeze at finalize) with several blocks per matrix."""
    monkeypatch.setattr(moments, "CPU_GRAM_BLOCK", 8)
    unet = tiny_sd15_unet()
    site = sd.find_sites(unet).feed_forward[0]
    captured = []
    handle = unet.get_submodule(site.down).register_forward_pre_hook(
        lambda m, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    calibration = sd.calibrate(unet, run_unet(unet), sd.CalibrationConfig(propagation_probe_calls=0))
    handle.remove()
    x = torch.cat(captured).double()
    assert x.shape[1] > 8
    xx, _ = calibration.input_moment(site.down)
    reference = x.T @ x / x.shape[0]
    assert float((xx - reference).norm() / reference.norm()) < 1e-6
    assert float((xx - xx.T).norm() / xx.norm()) < 1e-12


def test_nonfinite_activation_is_reported_with_its_layer_and_call():
    unet = tiny_sd15_unet()
    ctx = torch.randn(1, 7, 24)

    def run():
        unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=ctx)
        unet(torch.full((1, 4, 8, 8), float("inf")), 10, encoder_hidden_states=ctx)  # the second call only

    with pytest.raises(NonFiniteActivationError, match=r"input of .* \(forward call 2\)"):
        sd.calibrate(unet, run, sd.CalibrationConfig(propagation_probe_calls=0))
    # The last call's checks are read when the hooks come off, so a bad last call is not missed either.
    with pytest.raises(NonFiniteActivationError, match=r"forward call 1\)"):
        sd.calibrate(unet, lambda: unet(torch.full((1, 4, 8, 8), float("nan")), 10, encoder_hidden_states=ctx),
                     sd.CalibrationConfig(propagation_probe_calls=0))
    sd.calibrate(unet, lambda: unet(torch.full((1, 4, 8, 8), float("nan")), 10, encoder_hidden_states=ctx),
                 sd.CalibrationConfig(propagation_probe_calls=0, check_finite=False))


@pytest.mark.parametrize("poison", ["nan", "inf", "opposite infinities in one column"])
def test_one_nonfinite_element_is_caught_at_its_layer(poison):
    """The finite check reads the accumulator's column sums instead of every element: one bad element among
    all of a call's rows must still be reported at the layer and call where it appears."""
    unet = tiny_sd15_unet()
    site = sd.find_sites(unet).feed_forward[0]
    ctx = torch.randn(1, 7, 24)
    calls = []

    def poison_second_call(_module, args):  # registered before calibrate's hooks, so they see its output
        calls.append(None)
        if len(calls) != 2:
            return None
        x = args[0].clone()
        if poison == "nan":
            x[0, 3, 5] = float("nan")
        elif poison == "inf":
            x[0, 3, 5] = float("inf")
        else:
            x[0, 3, 5], x[0, 4, 5] = float("inf"), float("-inf")
        return (x,)

    unet.get_submodule(site.down).register_forward_pre_hook(poison_second_call)
    with pytest.raises(NonFiniteActivationError, match=rf"input of {re.escape(site.down)} \(forward call 2\)"):
        sd.calibrate(unet, lambda: [unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=ctx) for _ in range(3)],
                     sd.CalibrationConfig(propagation_probe_calls=0))


def test_statistics_device_is_validated():
    assert sd.CalibrationConfig(statistics_device="cpu").statistics_device == torch.device("cpu")
    assert sd.CalibrationConfig().to_dict()["statistics_device"] is None
    assert sd.CalibrationConfig(statistics_device="cpu").to_dict()["statistics_device"] == "cpu"
    with pytest.raises(ConfigError, match="not a device"):
        sd.CalibrationConfig(statistics_device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no cuda device"):
            sd.CalibrationConfig(statistics_device="cuda")


def test_statistics_device_holds_the_accumulators():
    unet = tiny_sd15_unet()
    calibrator = sd.Calibrator(unet, sd.CalibrationConfig(statistics_device="cpu", propagation_probe_calls=0))
    with torch.no_grad(), calibrator.attach(unet):
        run_unet(unet, batches=1)()
    assert calibrator._inputs and all(acc.xx.device.type == "cpu" for acc in calibrator._inputs.values())
    assert all(acc.xx.device.type == "cpu" for acc in calibrator._heads.values())
    calibration = calibrator.finalize()
    assert calibration.meta["config"]["statistics_device"] == "cpu"


def test_calibration_under_group_offloading_equals_plain_calibration():
    """diffusers' group offloading (its hooks wrap each block's forward) with onload and offload on the CPU:
    the calibration hooks still see every layer, and the statistics are the same numbers."""
    from diffusers.hooks import apply_group_offloading

    config = sd.CalibrationConfig(propagation_probe_calls=1, statistics_device="cpu")
    reference = tiny_sd15_unet()
    plain = sd.calibrate(reference, run_unet(reference), config)
    unet = tiny_sd15_unet()
    apply_group_offloading(unet, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1)
    assert any(hasattr(m, "_diffusers_hook") for m in unet.modules()), "offloading hooks are attached"
    offloaded = sd.calibrate(unet, run_unet(unet), config)
    assert offloaded.linear_inputs == plain.linear_inputs
    assert set(offloaded.tensors) == set(plain.tensors)
    for name in plain.tensors:
        assert torch.equal(offloaded.tensors[name], plain.tensors[name]), name
    assert offloaded.propagation == pytest.approx(plain.propagation, rel=1e-6)


def test_short_calls_are_folded_and_give_the_same_moments():
    """Calls with fewer rows than the fold buffer are buffered (across buckets and partial buffers too)."""
    dim = 64
    acc = MomentAccumulator(dim, 2, torch.float64, "cpu")
    assert acc.fold_rows == 16
    gen = torch.Generator().manual_seed(0)
    calls = [(torch.randn(n, dim, generator=gen), bucket) for n, bucket in
             [(3, 0), (5, 0), (7, 0), (2, 0), (4, 1), (16, 1), (9, 0), (1, 1), (30, 0), (6, 0)]]
    for x, bucket in calls:
        acc.add(x, bucket)
    assert acc._filled > 0, "the last short call is still waiting in the buffer"
    xx = acc.freeze()
    assert acc._buffer is None, "freezing frees the buffer"
    for bucket in (0, 1):
        rows = torch.cat([x for x, b in calls if b == bucket]).double()
        assert float((xx[bucket] - rows.T @ rows).norm() / (rows.T @ rows).norm()) < 1e-6
        assert torch.allclose(acc.x[bucket], rows.sum(0), rtol=1e-6, atol=1e-5)
        assert acc.n[bucket] == rows.shape[0]


def test_token_cosines_equal_torchs_on_both_layouts():
    """The block cosines are written out for speed; they must equal ``F.cosine_similarity``, zero vectors
    included, for channel-first UNet activations and token-major transformer activations."""
    from slimdiff_diffusers.core.calibrator import _token_cosines

    gen = torch.Generator().manual_seed(0)
    for shape, dim in [((2, 8, 4, 4), 1), ((2, 16, 8), -1)]:
        a, b = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
        a[0].zero_()  # one sample's vectors all zero
        expected = torch.nn.functional.cosine_similarity(a, b, dim=dim)
        assert torch.allclose(_token_cosines(a, b, dim), expected, atol=1e-6)
