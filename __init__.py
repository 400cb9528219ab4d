"""ComfyUI entry point: the repository root is the SlimDiff node pack (see docs/comfyui.md).

ComfyUI imports this file as a package; the nodes live in ``comfyui_nodes``. When SlimDiff is not
pip-installed, the bundled ``slimdiff_diffusers`` next to this file is used (appended to sys.path, so an
installed copy always wins).
"""
import os
import sys

try:
    import slimdiff_diffusers  # noqa: F401
except ImportError:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

from .comfyui_nodes import *  # noqa: E402,F401,F403  (comfy_entrypoint inside ComfyUI; nothing outside it)
