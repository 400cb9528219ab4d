"""Opt-in tiers 1 and 2: run tests/comfyui/comfy_python under ComfyUI's own python.

Skipped unless ``COMFYUI_DIR`` (a ComfyUI checkout) and ``COMFYUI_PYTHON`` (the python of its environment,
with pytest) are set. See docs/comfyui.md ("Testing against ComfyUI").
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The optional browser tier (tier 3, in comfy_python/test_tier2_server.py): its variables and the words its
# skip reasons start with.
BROWSER_TIER_VARIABLES = ("SLIMDIFF_PLAYWRIGHT_NODE_PATH", "SLIMDIFF_FRONTEND_ROOTS")
BROWSER_TIER_SKIP = "browser tier:"


@pytest.mark.skipif(not (os.environ.get("COMFYUI_DIR") and os.environ.get("COMFYUI_PYTHON")),
                    reason="set COMFYUI_DIR and COMFYUI_PYTHON to run the ComfyUI tiers")
@pytest.mark.skipif(os.environ.get("SLIMDIFF_IN_COMFY_PYTHON") == "1", reason="already inside the ComfyUI run")
def test_comfyui_tiers_pass_under_comfyui_python():
    # SLIMDIFF_DIFFUSERS_PYTHON: this python (it has diffusers) runs the diffusers side of the transformer-family
    # tests (tests/comfyui/diffusers_side.py); ComfyUI's python need not have diffusers.
    env = dict(os.environ, SLIMDIFF_IN_COMFY_PYTHON="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               SLIMDIFF_DIFFUSERS_PYTHON=sys.executable)
    result = subprocess.run(
        [os.environ["COMFYUI_PYTHON"], "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         # the repository conftest imports diffusers, which ComfyUI environments usually lack
         "--confcutdir", str(REPO / "tests" / "comfyui" / "comfy_python"),
         str(REPO / "tests" / "comfyui" / "comfy_python")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    print(result.stdout[-20000:])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary, result.stdout[-2000:]
    # Only the optional browser tier may skip, and only when it is not configured: any other skip inside
    # the ComfyUI run means a tier silently did not run.
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    browser_tier = all(os.environ.get(name) for name in BROWSER_TIER_VARIABLES)
    unexpected = [line for line in skips if browser_tier or BROWSER_TIER_SKIP not in line]
    assert not unexpected, "\n".join(unexpected)
    skipped = int(re.search(r"(\d+) skipped", summary).group(1)) if "skipped" in summary else 0
    assert skipped == sum(int(re.match(r"SKIPPED \[(\d+)\]", line).group(1)) for line in skips), summary
