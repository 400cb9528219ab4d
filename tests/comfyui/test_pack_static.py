"""Tier 0 (CI, no ComfyUI): the pack imports without ComfyUI, node interfaces are well-formed, and the
example workflows (UI format) and their API-format twins match the node interfaces and each other."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the pack (comfyui_nodes) lives at the repository root
    sys.path.insert(0, str(REPO))

from comfyui_nodes.node_specs import NODE_SPECS, SOCKET_TYPES, SPECS_BY_ID, WIDGET_TYPES, NodeSpec  # noqa: E402

UI_DIR = REPO / "workflows"
API_DIR = Path(__file__).resolve().parent / "workflows_api"
UI_FILES = sorted(UI_DIR.glob("*.json"))

# Core node classes the examples may use (ComfyUI 0.3.64, nodes.py). Pinned: a workflow using anything
# else would need a node the user may not have.
CORE_NODES = {
    "CheckpointLoaderSimple": ["ckpt_name"],
    "CLIPTextEncode": ["text"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
    "SaveImage": ["filename_prefix"],
    "UNETLoader": ["unet_name", "weight_dtype"],
    "CLIPLoader": ["clip_name", "type", "device"],
    "VAELoader": ["vae_name"],
    "LoraLoader": ["lora_name", "strength_model", "strength_clip"],
    "PreviewImage": [],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
    "TripleCLIPLoader": ["clip_name1", "clip_name2", "clip_name3"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
}
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def _run_python(code: str) -> subprocess.CompletedProcess:
    # A fresh interpreter whose sys.path has only the repository: `comfy` cannot be importable there.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_DIR")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------------------
# Import without ComfyUI
# --------------------------------------------------------------------------------------------------


def test_pack_imports_without_comfyui_and_exports_no_nodes():
    result = _run_python(
        "import importlib.util, json, comfyui_nodes as p\n"
        "assert importlib.util.find_spec('comfy') is None\n"
        "print(json.dumps({'available': p.COMFY_AVAILABLE, 'entry': hasattr(p, 'comfy_entrypoint'),"
        " 'v1': hasattr(p, 'NODE_CLASS_MAPPINGS'), 'specs': len(p.NODE_SPECS)}))")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"available": False, "entry": False, "v1": False, "specs": len(NODE_SPECS)}


def test_root_package_loads_like_comfyui_loads_a_custom_node():
    # ComfyUI imports <pack>/__init__.py with spec_from_file_location + submodule_search_locations
    # (nodes.py:load_custom_node); the same here, without ComfyUI: it must import and export nothing.
    code = (
        "import importlib.util, sys\n"
        f"root = {str(REPO)!r}\n"
        "spec = importlib.util.spec_from_file_location('custom_nodes_x_SlimDiff', root + '/__init__.py',"
        " submodule_search_locations=[root])\n"
        "module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert not hasattr(module, 'comfy_entrypoint') and not hasattr(module, 'NODE_CLASS_MAPPINGS')\n"
        "assert module.COMFY_AVAILABLE is False\n"
        "import slimdiff_diffusers.core\n"
        "print('ok')")
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --------------------------------------------------------------------------------------------------
# Node interfaces
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", NODE_SPECS, ids=lambda s: s.node_id)
def test_node_spec_is_well_formed(spec: NodeSpec):
    assert spec.node_id.startswith("Slim"), "prefixed ids cannot clash with core node names"
    assert spec.node_id not in CORE_NODES
    assert spec.display_name.startswith("SlimDiff ")
    assert spec.description
    names = [i.name for i in spec.inputs]
    assert len(names) == len(set(names)), f"duplicate input names {names}"
    assert spec.outputs or spec.is_output_node, "a node with no output must be an output node"
    for item in spec.inputs:
        assert item.type in SOCKET_TYPES + WIDGET_TYPES, item
        assert item.tooltip, f"{spec.node_id}.{item.name} has no tooltip"
        if item.type in ("INT", "FLOAT"):
            assert item.min is not None and item.max is not None and item.min <= item.default <= item.max, item
        if item.type == "COMBO":
            assert item.options, item
            if isinstance(item.options, tuple):
                assert item.default in item.options, f"{item.name}: default {item.default!r} not an option"
        if item.control_after_generate:
            assert item.type == "INT"
    for out in spec.outputs:
        assert out.type in SOCKET_TYPES


def test_slim_config_combos_are_slim_configs_and_come_last():
    """SlimDiff Slim's SlimConfig combos take choices, default and wording from SlimConfig (their one owner), and
    follow the node's own widgets in list order: UI workflows store widget values by position, so appending is
    what keeps workflows saved before an option was offered loading with their values."""
    from comfyui_nodes.node_specs import SLIM_CONFIG_COMBOS
    from slimdiff_diffusers.core.config import SlimConfig

    widgets = SPECS_BY_ID["SlimModel"].widgets
    assert [w.name for w in widgets] == ["keep_ratio", "params_to_remove_millions", "targets", *SLIM_CONFIG_COMBOS]
    assert {"allocation_refinement", "vo_output_refit"} <= set(SLIM_CONFIG_COMBOS)
    for widget in widgets[-len(SLIM_CONFIG_COMBOS):]:
        assert widget.type == "COMBO" and widget.optional  # optional: older API prompts still validate
        assert widget.options == SlimConfig.option_choices(widget.name)
        assert widget.default == SlimConfig.option_default(widget.name)
        help_text = SlimConfig.option_help(widget.name)
        assert widget.tooltip == help_text[:1].upper() + help_text[1:]


def test_budget_ranges_match_the_core_contract():
    keep = next(i for i in SPECS_BY_ID["SlimModel"].inputs if i.name == "keep_ratio")
    assert 0.0 < keep.min and keep.max == 1.0  # keep_ratio in (0, 1]


# --------------------------------------------------------------------------------------------------
# Workflows
# --------------------------------------------------------------------------------------------------


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _widget_values(node: dict) -> dict[str, object]:
    """Named widget values of a UI-format node, read the way the front end writes them: in the order of the
    node's widget inputs, with one extra control value after a seed that has control_after_generate."""
    spec = SPECS_BY_ID.get(node["type"])
    names = [i["name"] for i in node.get("inputs", []) if "widget" in i]
    if spec is not None:
        assert names == [w.name for w in spec.widgets], f"{node['type']}: widget inputs {names} differ from the spec"
    values = list(node.get("widgets_values") or [])
    out: dict[str, object] = {}
    for name in names:
        out[name] = values.pop(0)
        controlled = (spec is not None and any(w.name == name and w.control_after_generate for w in spec.widgets)) \
            or (spec is None and name in ("seed", "noise_seed"))
        if controlled:
            out[f"{name}:control_after_generate"] = values.pop(0)
    assert not values, f"{node['type']}: {len(values)} widget values left over"
    return out


def test_there_are_example_workflows_and_each_has_an_api_twin():
    assert {p.stem for p in UI_FILES} >= {"slimdiff_calibrate_slim_save", "slimdiff_load_slim_model"}
    assert {p.stem for p in UI_FILES} == {p.stem for p in API_DIR.glob("*.json")}


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_valid(path: Path):
    graph = _load(path)
    assert graph["version"] == 0.4
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert graph["last_node_id"] >= max(nodes)
    for node in nodes.values():
        assert node["type"] in SPECS_BY_ID or node["type"] in CORE_NODES, f"unknown node type {node['type']}"
        # The front end records it for most nodes (not for SaveImage in 1.27.10); when present it is the type.
        assert node["properties"].get("Node name for S&R", node["type"]) == node["type"]
        widgets = _widget_values(node)
        if node["type"] in CORE_NODES:
            assert [k for k in widgets if ":" not in k] == CORE_NODES[node["type"]]
        for key, value in widgets.items():
            if key.endswith(":control_after_generate"):
                assert value == "fixed", f"{node['type']}.{key} must be 'fixed' so the example is reproducible"
    # Links: [id, from_node, from_slot, to_node, to_slot, type], consistent with both ends.
    for link_id, src, src_slot, dst, dst_slot, link_type in graph["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == inp["type"] == link_type
        dst_spec = SPECS_BY_ID.get(nodes[dst]["type"])
        if dst_spec is not None:
            assert next(i for i in dst_spec.inputs if i.name == inp["name"]).type == link_type
    # Every socket input of our nodes is connected (all are required).
    for node in nodes.values():
        spec = SPECS_BY_ID.get(node["type"])
        if spec is None:
            continue
        linked = {i["name"] for i in node["inputs"] if i.get("link") is not None}
        assert linked == {i.name for i in spec.inputs if not i.is_widget and not i.optional}, node["type"]


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_matches_ui_workflow(path: Path):
    graph = _load(path)
    api = _load(API_DIR / path.name)
    nodes = {str(n["id"]): n for n in graph["nodes"]}
    assert set(api) == set(nodes)
    links = {link[0]: link for link in graph["links"]}
    for node_id, node in nodes.items():
        entry = api[node_id]
        assert entry["class_type"] == node["type"]
        expected: dict[str, object] = {k: v for k, v in _widget_values(node).items() if ":" not in k}
        for inp in node["inputs"]:
            if inp.get("link") is not None:
                _, src, src_slot, _, _, _ = links[inp["link"]]
                expected[inp["name"]] = [str(src), src_slot]
        assert entry["inputs"] == expected, f"node {node_id} ({node['type']})"
        spec = SPECS_BY_ID.get(node["type"])
        if spec is not None:
            assert set(entry["inputs"]) == {i.name for i in spec.inputs}


def test_example_budget_values_are_in_range():
    for path in API_DIR.glob("*.json"):
        for node in _load(path).values():
            spec = SPECS_BY_ID.get(node["class_type"])
            for item in spec.widgets if spec else ():
                value = node["inputs"][item.name]
                if item.type in ("INT", "FLOAT"):
                    assert item.min <= value <= item.max, (path.name, item.name, value)
                if item.type == "COMBO" and isinstance(item.options, tuple):
                    assert value in item.options, (path.name, item.name, value)


# --------------------------------------------------------------------------------------------------
# Packaging: what the pack imports inside ComfyUI, requirements.txt, registry metadata
# --------------------------------------------------------------------------------------------------

# Importable in every ComfyUI 0.3.64 environment: ComfyUI's own modules, and packages its requirements.txt
# installs (typing_extensions comes with torch).
COMFYUI_PROVIDES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "comfyui_version",
                    "node_helpers", "torch", "safetensors", "numpy", "typing_extensions"}


def _imports_of(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (also inside functions), relative ones resolved."""
    import ast

    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                module = ".".join([*base, node.module] if node.module else base)
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)  # submodules imported by name
            else:
                names.add(node.module)
    return names


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def pack_imports() -> dict[str, set[str]]:
    """Top-level third-party modules the pack can import inside ComfyUI -> the pack files that import them,
    following the pack's own modules (comfyui_nodes, the bundled slimdiff_diffusers) transitively."""
    stdlib = set(sys.stdlib_module_names)
    todo = [REPO / "__init__.py", *sorted((REPO / "comfyui_nodes").glob("*.py"))]
    seen: set[Path] = set()
    found: dict[str, set[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports_of(path):
            own = _module_file(name)
            if own is not None:
                todo.append(own)
                # importing a.b.c runs a/__init__.py and a/b/__init__.py too
                parts = name.split(".")
                todo += [p for i in range(1, len(parts)) if (p := _module_file(".".join(parts[:i]))) is not None]
                continue
            top = name.split(".")[0]
            if top and top not in stdlib and _module_file(top) is None:
                found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_pack_imports_only_what_comfyui_has():
    imports = pack_imports()
    assert {"torch", "comfy", "comfy_api", "folder_paths"} <= set(imports), imports  # the walk reaches the nodes
    extra = {name: files for name, files in imports.items() if name not in COMFYUI_PROVIDES}
    assert not extra, f"the ComfyUI pack imports packages ComfyUI does not have: {extra}"


def _requirement_names(path: Path) -> list[str]:
    import re

    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_requirements_txt_lists_only_what_the_pack_needs_beyond_comfyui():
    # ComfyUI-Manager pip-installs this file into ComfyUI's environment.
    required = _requirement_names(REPO / "requirements.txt")
    needed = {name.replace("_", "-") for name in pack_imports()} - {n.replace("_", "-") for n in COMFYUI_PROVIDES}
    assert set(required) == needed, f"requirements.txt lists {required}, the pack needs {sorted(needed)} beyond ComfyUI"
    assert "torch" not in required  # would replace ComfyUI's CUDA/ROCm torch


def test_registry_metadata():
    import re
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    # Registry node id rules (docs.comfy.org/registry/specifications).
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,98}", project["name"]) and "comfyui" not in project["name"].lower()
    assert not re.search(r"[._-]{2}", project["name"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert isinstance(project["license"], dict) and set(project["license"]) & {"file", "text"}
    assert project["description"] and project["urls"]["Repository"].startswith("https://")
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"] and isinstance(comfy["Icon"], str) and isinstance(comfy["includes"], list)
    assert comfy["requires-comfyui"] == ">=0.3.64"  # the version the opt-in tiers run against


def test_registry_scan_rules():
    # What `comfy node validate` runs (ruff S102 exec, S307 eval, E702), done with the standard library here
    # for the pack's own code: no exec/eval and no runtime pip installs.
    import ast

    files = [REPO / "__init__.py", *sorted((REPO / "comfyui_nodes").glob("*.py"))]
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not calls & {"exec", "eval"}, path
        assert "pip install" not in path.read_text() and "subprocess" not in _imports_of(path), path
