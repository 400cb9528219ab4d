"""Shared helpers of the benchmark scripts: where things are, and what machine a result came from."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from slimdiff_diffusers.core.io_utils import atomic_path

ROOT = Path(__file__).resolve().parents[1]


def anime64_dir() -> Path:
    """The anime64 model folder: $SLIMDIFF_ANIME64_DIR, or ../shared/models/anime64 beside the repository."""
    path = Path(os.environ.get("SLIMDIFF_ANIME64_DIR", ROOT.parent / "shared" / "models" / "anime64"))
    if not (path / "anime64.py").is_file():
        raise FileNotFoundError(f"anime64 model not found at {path}; set SLIMDIFF_ANIME64_DIR")
    return path


def machine_info() -> dict:
    """Machine, library versions and date, recorded with every result."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write a result file atomically, so that an interrupted benchmark never leaves half a JSON behind."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
