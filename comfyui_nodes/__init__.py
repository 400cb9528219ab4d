"""SlimDiff nodes for ComfyUI (V3 schema API).

Importable without ComfyUI: then it exports no nodes (``COMFY_AVAILABLE`` is False), so the package, its
pure-python helpers and the tests work in any Python environment. Inside ComfyUI it exports
``comfy_entrypoint`` (and deliberately no ``NODE_CLASS_MAPPINGS``: ComfyUI ignores ``comfy_entrypoint``
when a module defines both).
"""
from __future__ import annotations

import importlib.util

from .node_specs import NODE_SPECS, SPECS_BY_ID  # noqa: F401  (pure data, always available)

# ComfyUI puts its own root (with the `comfy` package) on sys.path; nothing else provides `comfy`.
COMFY_AVAILABLE = importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("comfy_api") is not None

if COMFY_AVAILABLE:
    # A failure here is a real error inside ComfyUI (e.g. a too-old ComfyUI without comfy_api.latest):
    # let it propagate so ComfyUI reports "IMPORT FAILED" with the traceback instead of silently
    # showing no nodes.
    from .nodes import SlimDiffExtension, comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint", "SlimDiffExtension", "COMFY_AVAILABLE", "NODE_SPECS"]
else:
    __all__ = ["COMFY_AVAILABLE", "NODE_SPECS"]
