"""pytest plugin: every stock UNet2DConditionModel that diffusers' tests build is slimmed right after __init__.

Load with `-p slim_unet_plugin`, this folder and the repository root on PYTHONPATH (docs/upstream_tests.md).
Slimming: calibrate on seeded random inputs (the global RNG is left untouched), then every attention's q/k narrowed to half the head dim and v kept at full
width in the new basis (targets qk+vo, fixed rank_pattern: q/k narrower than v, the case issue 12 is about).
Widths depend only on the config, so a slim folder saved by a test loads again. Models built on the meta device
(from_pretrained with low_cpu_mem_usage) get the spec recorded for the same config by an earlier real build.
Kept cheap (a pipeline test builds several UNets): one calibration call, no propagation probe (the fixed
rank_pattern makes the allocation, so `propagation="none"`).
"""
import functools
import json
import os
import threading

import torch
from diffusers import UNet2DConditionModel

import slimdiff_diffusers as sd
from slimdiff_diffusers.core.rewrite import apply_slim_spec
from slimdiff_diffusers.core.sites import find_sites
from slimdiff_diffusers.diffusers_adapter.attention_processor import install_processors
from slimdiff_diffusers.diffusers_adapter.models import as_slim_class

_orig_init = UNet2DConditionModel.__init__
_guard = threading.local()
_specs: dict = {}
LOG = os.environ.get("SLIMPLUG_LOG", "/tmp/slimplug_slimmed.log")  # one line per UNet built: slimmed or why not


def _key(model):
    return json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")}, sort_keys=True, default=str)


def _inputs(cfg, gen):
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    size = min(size or 16, 32)
    b = 2
    kw = {"sample": torch.randn(b, cfg.in_channels, size, size, generator=gen), "timestep": torch.tensor([10])}
    cross = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    if cfg.encoder_hid_dim is not None:
        cross = cfg.encoder_hid_dim
    kw["encoder_hidden_states"] = torch.randn(b, 4, cross, generator=gen)
    if cfg.time_cond_proj_dim:
        kw["timestep_cond"] = torch.randn(b, cfg.time_cond_proj_dim, generator=gen)
    if cfg.class_embed_type in ("projection", "simple_projection"):  # a Linear on float class vectors
        kw["class_labels"] = torch.randn(b, cfg.projection_class_embeddings_input_dim, generator=gen)
    elif cfg.class_embed_type is not None or cfg.num_class_embeds is not None:
        kw["class_labels"] = torch.zeros(b, dtype=torch.long)
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(b, text, generator=gen), "time_ids": torch.randn(b, 6, generator=gen)}
    return kw


def _slim_in_place(model):
    if any(p.device.type == "meta" for p in model.parameters()):
        spec = _specs.get(_key(model))
        if spec is None:
            return "meta, no spec recorded for this config: left stock"
        apply_slim_spec(model, spec)
        sites = find_sites(model)
        install_processors(model, {s.name: "replace" for s in sites.attention if s.name in spec.attention})
        as_slim_class(model, spec)
        return "meta: spec applied"
    gen = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()

    def run():
        with torch.no_grad():
            model(**_inputs(model.config, gen))

    with torch.random.fork_rng(devices=[]):
        calibration = sd.calibrate(model, run, sd.CalibrationConfig(propagation_probe_calls=0))
        ranks = {f"{s.name}:{k}": (max(1, s.head_dim // 2) if k == "qk" else s.head_dim)
                 for s in calibration.sites.attention for k in ("qk", "vo")}
        sd.slim(model, calibration, targets=("qk", "vo"), rank_pattern=ranks, rank_multiple=1, inplace=True,
                lora_maps=True, propagation="none")
    model.train(was_training)
    _specs[_key(model)] = model.slimdiff_spec
    return "slimmed"


@functools.wraps(_orig_init)  # keeps the signature: diffusers' from_config reads the init keys from it
def patched_init(self, *args, **kwargs):
    _orig_init(self, *args, **kwargs)
    if type(self) is not UNet2DConditionModel or getattr(_guard, "on", False):
        return
    _guard.on = True
    try:
        status = _slim_in_place(self)
    except Exception as exc:  # noqa: BLE001 - recorded; the model is left stock
        status = f"not slimmed: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        _guard.on = False
    with open(LOG, "a") as f:
        f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}\t{status}\n")


UNet2DConditionModel.__init__ = patched_init


# A slim folder is loaded with the Slim class (the documented route: SlimUNet2DConditionModel.from_pretrained, or
# a pipeline, whose model_index.json names it); diffusers' tests call the stock class, so redirect those calls.
from slimdiff_diffusers import SlimUNet2DConditionModel  # noqa: E402

_orig_from_pretrained = UNet2DConditionModel.from_pretrained.__func__


def _is_slim_folder(path, subfolder):
    config = os.path.join(str(path), subfolder or "", "config.json")
    try:
        return os.path.isfile(config) and "slimdiff_spec" in json.load(open(config))
    except Exception:  # noqa: BLE001
        return False


@classmethod
def patched_from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    if cls is UNet2DConditionModel and _is_slim_folder(pretrained_model_name_or_path, kwargs.get("subfolder")):
        return SlimUNet2DConditionModel.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
    return _orig_from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs)


UNet2DConditionModel.from_pretrained = patched_from_pretrained

if os.environ.get("SLIMPLUG_IP_NAME"):  # classification only: let the tests' class-name check pass to run the rest
    from slimdiff_diffusers.diffusers_adapter.ip_adapter import SlimIPAdapterAttnProcessor
    SlimIPAdapterAttnProcessor.__name__ = "IPAdapterAttnProcessor2_0"

if os.environ.get("SLIMPLUG_MARK_UNMARKED"):
    # classification only: a LoRA state dict handed over without metadata (so without SlimDiff's mark) is declared
    # made on the model it is loaded onto, to show that the rest of such a test passes once the LoRA is marked
    from slimdiff_diffusers.core.lora_mark import MARK_KEY

    _orig_load_lora_adapter = SlimUNet2DConditionModel.load_lora_adapter

    def _load_marked(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False, **kwargs):
        metadata = kwargs.get("metadata") or {}
        if isinstance(pretrained_model_name_or_path_or_dict, dict) and not any(k.endswith(MARK_KEY) for k in metadata):
            kwargs["metadata"] = {**metadata, **sd.slim_lora_metadata(self, prefix)}
        return _orig_load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix, hotswap, **kwargs)

    SlimUNet2DConditionModel.load_lora_adapter = _load_marked
