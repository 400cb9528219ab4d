"""Opt-in tiers 1 and 2: run tests/comfyui/comfy_python under ComfyUI's own python.

Skipped unless ``COMFYUI_DIR`` (a ComfyUI checkout) and ``COMFYUI_PYTHON`` (the python of its environment,
with pytest) are set. See docs/comfyui.md ("Testing against ComfyUI").
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (os.environ.get("COMFYUI_DIR") and os.environ.get("COMFYUI_PYTHON")),
                    reason="set COMFYUI_DIR and COMFYUI_PYTHON to run the ComfyUI tiers")
@pytest.mark.skipif(os.environ.get("SLIMDIFF_IN_COMFY_PYTHON") == "1", reason="already inside the ComfyUI run")
def test_comfyui_tiers_pass_under_comfyui_python():
    env = dict(os.environ, SLIMDIFF_IN_COMFY_PYTHON="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [os.environ["COMFYUI_PYTHON"], "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         # the repository conftest imports diffusers, which ComfyUI environments usually lack
         "--confcutdir", str(REPO / "tests" / "comfyui" / "comfy_python"),
         str(REPO / "tests" / "comfyui" / "comfy_python")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    print(result.stdout[-20000:])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]
