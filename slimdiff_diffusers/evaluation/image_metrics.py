"""Image and prediction similarity metrics: PSNR, SSIM, relative noise-prediction error."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensor(images) -> torch.Tensor:
    """(N, C, H, W) float64 in [0, 1] from a PIL image, a list of them, an (N,H,W,C)/(H,W,C) array or a tensor."""
    if isinstance(images, torch.Tensor):
        t = images.detach().double()
        return t if t.dim() == 4 else t[None]
    if isinstance(images, list):
        return torch.cat([_as_tensor(i) for i in images])
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float64) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim == 3:
        arr = arr[None]
    return torch.from_numpy(np.ascontiguousarray(arr)).double().permute(0, 3, 1, 2)


def psnr_per_image(reference, candidate) -> list[float]:
    """PSNR (dB) of each image of the batch, for images in [0, 1] (uint8 PIL/arrays are scaled). Identical: inf."""
    a, b = _as_tensor(reference), _as_tensor(candidate)
    mse = (a - b).pow(2).flatten(1).mean(1)
    values = torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-30)), torch.full_like(mse, float("inf")))
    return [float(v) for v in values]


def psnr(reference, candidate) -> float:
    """Mean PSNR (dB) over the batch (:func:`psnr_per_image`)."""
    values = psnr_per_image(reference, candidate)
    return sum(values) / len(values)


def ssim(reference, candidate, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004; Gaussian window, C1=(0.01)², C2=(0.03)², data range 1) over the batch.

    The window is capped at the image size so 32×32 images are measured with the same formula.
    """
    a, b = _as_tensor(reference), _as_tensor(candidate)
    window = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=x.shape[1])

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return float(ssim_map.flatten(1).mean(1).mean())


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """‖candidate − reference‖ / ‖reference‖ over the whole tensor."""
    reference, candidate = reference.double(), candidate.double()
    return float((candidate - reference).norm() / reference.norm().clamp_min(1e-30))
