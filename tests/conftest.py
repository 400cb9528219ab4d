"""Shared fixtures: tiny SD1.5/SDXL-like UNets with their calibrations, and the real anime64 model."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import sdxl_added_cond, tiny_sd15_unet, tiny_sdxl_unet  # noqa: E402

import slimdiff_diffusers as sd  # noqa: E402


def run_unet(unet, batches: int = 3, batch: int = 4, seed: int = 0, sdxl: bool = False):
    """Forward passes at several timesteps with a shared text context (like CFG sampling)."""
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, 7, 24, generator=gen)
    added = sdxl_added_cond(batch) if sdxl else None

    def run():
        for t in torch.linspace(950, 50, batches).long().tolist():
            x = torch.randn(batch, 4, 8, 8, generator=gen)
            unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added)
    return run


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: faster than two (no OpenMP hand-offs; 20-40x on a loaded
    machine); the previous count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sd15_unet():
    return tiny_sd15_unet()


@pytest.fixture(scope="session")
def sd15_calibration(sd15_unet):
    # with the attention-output moments (off by default) that the vo_statistics tests read
    return sd.calibrate(sd15_unet, run_unet(sd15_unet, batches=6),
                        sd.CalibrationConfig(attention_output_statistics=True))


@pytest.fixture(scope="session")
def sdxl_unet():
    return tiny_sdxl_unet()


@pytest.fixture(scope="session")
def sdxl_calibration(sdxl_unet):
    return sd.calibrate(sdxl_unet, run_unet(sdxl_unet, batches=6, sdxl=True))


def anime64_dir() -> Path:
    return Path(os.environ.get("SLIMDIFF_ANIME64_DIR", ROOT.parent / "shared" / "models" / "anime64"))


@pytest.fixture(scope="session")
def anime64():
    """(unet, ddim scheduler) of the trained anime64 model from ../shared."""
    folder = anime64_dir()
    if not (folder / "anime64.py").is_file():
        pytest.skip(f"anime64 model not found at {folder} (set SLIMDIFF_ANIME64_DIR)")
    sys.path.insert(0, str(folder))
    from anime64 import load_anime64  # type: ignore
    from diffusers import DDIMScheduler

    unet, scheduler = load_anime64()
    return unet, DDIMScheduler.from_config(scheduler.config, clip_sample=True, set_alpha_to_one=True)
