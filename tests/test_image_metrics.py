"""PSNR/SSIM/relative error: identical images score perfectly, and the scores fall as images diverge."""
import numpy as np
import pytest
import torch

from slimdiff_diffusers.evaluation.image_metrics import psnr, psnr_per_image, relative_error, ssim


def test_identical_and_degraded_images():
    rng = np.random.default_rng(0)
    img = rng.random((2, 32, 32, 3))
    assert psnr(img, img) == float("inf") and ssim(img, img) == pytest.approx(1.0)
    slightly = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
    very = np.clip(img + rng.normal(0, 0.2, img.shape), 0, 1)
    assert psnr(img, slightly) > psnr(img, very) > 0
    assert 1.0 > ssim(img, slightly) > ssim(img, very)
    # 0.01 noise: MSE ~1e-4 -> ~40 dB
    assert psnr(img, slightly) == pytest.approx(40, abs=1.5)


def test_uint8_and_tensor_inputs_agree():
    rng = np.random.default_rng(1)
    a = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    b = np.clip(a.astype(int) + 5, 0, 255).astype(np.uint8)
    ta = torch.from_numpy(a).permute(2, 0, 1).double() / 255
    tb = torch.from_numpy(b).permute(2, 0, 1).double() / 255
    assert psnr(a, b) == pytest.approx(psnr(ta, tb))
    assert ssim(a, b) == pytest.approx(ssim(ta, tb))


def test_relative_error():
    x = torch.ones(10)
    assert relative_error(x, x) == 0.0
    assert relative_error(x, 1.1 * x) == pytest.approx(0.1)


def test_psnr_per_image_is_what_the_mean_averages():
    # one untouched image (inf), one with a uniform 0.1 offset (MSE 0.01 -> exactly 20 dB)
    img = np.full((2, 8, 8, 3), 0.5)
    other = img.copy()
    other[1] += 0.1
    values = psnr_per_image(img, other)
    assert values[0] == float("inf") and values[1] == pytest.approx(20.0)
    rng = np.random.default_rng(2)
    a, b = rng.random((3, 16, 16, 3)), rng.random((3, 16, 16, 3))
    assert psnr(a, b) == pytest.approx(float(np.mean(psnr_per_image(a, b))))
    assert len(set(psnr_per_image(a, b))) == 3
