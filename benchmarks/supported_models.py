"""What SlimDiff finds in each supported family, counted on the *real* configurations (structure only).

Every model is built on the meta device (no memory, no weights: ``find_sites`` is structural), and the table
records, per model: its ``Slim*`` class (what a slim model saves and loads as), the groups the core finds by kind
(plain / joint / single-stream attention, FFNs of each stream), whether QK is slimmed or kept whole and why, the
compressible parameters (counted exactly as ``slim`` counts them, ``benchmarks.baselines.compressible_params``)
against all the denoiser's parameters, and for the refused families the refusal itself
(``UnsupportedArchitectureError``, raised before anything runs). The two
embedded models are read from their folders' ``config.json``. ``render_readme.py`` turns the JSON into the
README's "Supported models" table.

    python benchmarks/supported_models.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import slimdiff_diffusers as sd  # noqa: E402
from benchmarks import baselines as bl  # noqa: E402
from benchmarks.common import machine_info, write_json  # noqa: E402
from benchmarks.speed import FLUX_DEV, SD15, SD35_MEDIUM, SDXL  # noqa: E402
from slimdiff_diffusers.core.errors import UnsupportedArchitectureError  # noqa: E402
from slimdiff_diffusers.diffusers_adapter.models import SLIM_CLASSES  # noqa: E402

SD3_MEDIUM = dict(SD35_MEDIUM, qk_norm=None, dual_attention_layers=(), pos_embed_max_size=192)
FLUX_SCHNELL = dict(FLUX_DEV, guidance_embeds=False)
PIXART_SIGMA = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
                    norm_type="ada_norm_single", use_additional_conditions=False)
SANA_1600M = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                  num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                  caption_channels=2304, sample_size=32, patch_size=1)

# Other families users try (issue 10's robustness sweep): the real configurations are these classes' defaults
# in diffusers 0.42 (Chroma1-HD, Qwen-Image, Wan 2.1 T2V-14B, LTX-Video 2B, CogView4-6B, AuraFlow, FLUX.2-dev,
# Z-Image, DiT-XL/2-256) except where given. Their attention runs a model-specific processor: kept whole, or the
# model is refused when nothing else is left (tests/test_unsupported_denoisers.py checks each on a tiny config).
LUMINA2 = dict(cap_feat_dim=2304)  # Gemma-2-2B text features
# HunyuanDiT-v1.2-Diffusers (the class's defaults are not a released model: hidden_size 1152 with 16 x 88 heads)
HUNYUAN_DIT_V12 = dict(num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2, hidden_size=1408,
                       num_layers=40, mlp_ratio=4.3637, learn_sigma=True, sample_size=128, cross_attention_dim=1024,
                       cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256,
                       use_style_cond_and_image_meta_size=False)

# name -> (diffusers class, config or embedded folder, pipelines, ComfyUI support)
MODELS = {
    "SD 1.5 UNet": ("UNet2DConditionModel", SD15, "StableDiffusionPipeline", "yes"),
    "SDXL UNet": ("UNet2DConditionModel", SDXL, "StableDiffusionXLPipeline", "yes"),
    "sd-tiny (embedded)": ("UNet2DConditionModel", "slimdiff_diffusers/default_model/pipeline/unet",
                           "StableDiffusionPipeline", "yes"),
    "FLUX.1-dev": ("FluxTransformer2DModel", FLUX_DEV, "FluxPipeline", "yes"),
    "FLUX.1-schnell": ("FluxTransformer2DModel", FLUX_SCHNELL, "FluxPipeline", "yes"),
    "flux-tiny (embedded)": ("FluxTransformer2DModel", "slimdiff_diffusers/default_model/flux_tiny/transformer",
                             "FluxPipeline", "yes"),
    "SD3-medium": ("SD3Transformer2DModel", SD3_MEDIUM, "StableDiffusion3Pipeline", "yes"),
    "SD3.5-medium": ("SD3Transformer2DModel", SD35_MEDIUM, "StableDiffusion3Pipeline", "yes (MMDiT-X `attn2` untested)"),
    "PixArt-Σ": ("PixArtTransformer2DModel", PIXART_SIGMA, "PixArtSigmaPipeline, PixArtAlphaPipeline", "yes"),
    "Chroma1-HD": ("ChromaTransformer2DModel", {}, "ChromaPipeline", "untested"),
    "DiT-XL/2-256": ("DiTTransformer2DModel", {}, "DiTPipeline", "untested"),
    "Qwen-Image": ("QwenImageTransformer2DModel", {}, "QwenImagePipeline", "–"),
    "Wan 2.1 T2V-14B": ("WanTransformer3DModel", {}, "WanPipeline", "–"),
    "LTX-Video 2B": ("LTXVideoTransformer3DModel", {}, "LTXPipeline", "–"),
    "CogView4-6B": ("CogView4Transformer2DModel", {}, "CogView4Pipeline", "–"),
    "HunyuanDiT-v1.2": ("HunyuanDiT2DModel", HUNYUAN_DIT_V12, "HunyuanDiTPipeline", "–"),
    "Sana 1600M": ("SanaTransformer2DModel", SANA_1600M, "SanaPipeline", "–"),
    "AuraFlow": ("AuraFlowTransformer2DModel", {}, "AuraFlowPipeline", "–"),
    "FLUX.2-dev": ("Flux2Transformer2DModel", {}, "Flux2Pipeline", "–"),
    "Lumina-Image-2.0": ("Lumina2Transformer2DModel", LUMINA2, "Lumina2Pipeline", "–"),
    "Z-Image": ("ZImageTransformer2DModel", {}, "ZImagePipeline", "–"),
}


def build_on_meta(cls_name: str, config):
    import diffusers

    cls = getattr(diffusers, cls_name)
    if isinstance(config, str):
        config = {k: v for k, v in cls.load_config(ROOT / config).items() if not k.startswith("_")}
    with torch.device("meta"):
        return cls(**config)


def describe(name: str, cls_name: str, config, pipelines: str, comfyui: str) -> dict:
    model = build_on_meta(cls_name, config)
    row = {"model": name, "class": cls_name, "pipelines": pipelines, "comfyui": comfyui,
           "params": sum(p.numel() for p in model.parameters())}
    slim_class = SLIM_CLASSES.get(type(model))  # what a slim model of it saves / loads as (None: stays stock)
    if slim_class is not None:
        row["slim_class"] = slim_class.__name__
    sites = sd.find_sites(model)
    if sites.refused:
        try:
            sd.core.sites.check_supported(sites, cls_name)
        except UnsupportedArchitectureError as exc:
            row |= {"supported": False, "refusal": str(exc).split(". Nothing")[0]}
        return row
    if not len(sites):  # what calibrate() raises before running: nothing is left to slim
        path, reason = sites.skipped[0] if sites.skipped else ("", "no attention or feed-forward modules found")
        row |= {"supported": False, "nothing_slimmable": True,
                "refusal": f"{cls_name} has nothing SlimDiff can slim: {path}: {reason}"}
        return row
    kinds: dict[str, int] = {}
    for a in sites.attention:
        key = {"plain": "cross-attention" if a.is_cross else "self-attention", "joint": "joint attention",
               "single": "single-stream attention"}[a.kind]
        kinds[key] = kinds.get(key, 0) + 1
    for f in sites.feed_forward:
        key = {"single": "single-stream MLP"}.get(f.kind, "FFN (text stream)" if f.stream == "context" else "FFN")
        kinds[key] = kinds.get(key, 0) + 1
    qk_whole = sum(1 for a in sites.attention if not a.qk_decomposable)
    reasons = sorted({r.split(" (")[0] for _, r in sites.skipped})
    kept_whole = [r for p, r in sites.skipped if ":" not in p]  # whole attention modules (not ":qk" halves)
    processors = sorted({r.split("model-specific ")[1].split(" ")[0] for r in kept_whole if "model-specific" in r})
    row |= {"supported": True, "groups": kinds, "attentions": len(sites.attention),
            "qk_slimmed": len(sites.attention) - qk_whole, "qk_whole": qk_whole, "skipped_reasons": reasons,
            "attention_kept_whole": len(kept_whole), "kept_whole_processors": processors,
            "compressible_params": bl.compressible_params(model, sites)}
    return row


def main() -> None:
    rows = []
    for name, (cls_name, config, pipelines, comfyui) in MODELS.items():
        row = describe(name, cls_name, config, pipelines, comfyui)
        rows.append(row)
        print(name, {k: v for k, v in row.items() if k in ("groups", "qk_whole", "compressible_params", "params", "refusal")})
    out = ROOT / "benchmarks" / "results" / "supported_models.json"
    write_json(out, {"benchmark": "supported_models", "command": "python benchmarks/supported_models.py",
                     "machine": machine_info(), "slimdiff_version": sd.__version__, "results": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
