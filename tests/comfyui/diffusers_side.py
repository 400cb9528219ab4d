"""The diffusers side of the ComfyUI transformer-family tests (run with the repository's python, which has
diffusers; ComfyUI's python need not). Called by the tier-1 tests as a subprocess:

    python tests/comfyui/diffusers_side.py make-flux FOLDER
        the embedded flux-tiny transformer slimmed at keep 0.6 and 1.0, each saved as a single file
        (``save_slim_model_file``), fixed transformer inputs, and the outputs of the dense, 0.6 and 1.0
        transformers on them (ComfyUI's unpacked latent layout).
    python tests/comfyui/diffusers_side.py eval FILE INPUTS OUT
        load a slim file (e.g. one ComfyUI saved) with ``load_slim_model_file`` and write its output on INPUTS.
    python tests/comfyui/diffusers_side.py eval-lora FILE MAPS LORA INPUTS OUT
        the same with a LoRA made for the original model (PEFT keys ``<Linear>.lora_A/B.weight``, its alpha in
        the file's metadata) loaded through the diffusers side's mapping, the slim model's basis maps from MAPS.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def flux_forward(transformer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The transformer's output on ComfyUI-layout inputs (x: B×C×H×W latent, t in [0, 1], context, pooled),
    packed and unpacked as diffusers' FluxPipeline does, with its image and text position ids."""
    x, t, context, pooled = inputs["x"], inputs["t"], inputs["context"], inputs["pooled"]
    b, c, h, w = x.shape
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = torch.arange(h // 2)[:, None]
    img_ids[..., 2] = torch.arange(w // 2)[None, :]
    with torch.no_grad():
        out = transformer(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                          img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(context.shape[1], 3)).sample
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).contiguous()


def sd3_forward(transformer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """SD3's output on ComfyUI-layout inputs (t in [0, 1]; the transformer takes t·1000, as ComfyUI passes it)."""
    with torch.no_grad():
        return transformer(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"],
                           pooled_projections=inputs["pooled"], timestep=inputs["t"] * 1000).sample.contiguous()


def pixart_forward(transformer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """PixArt's output (t in [0, 1]; the transformer takes t·1000); no micro-conditions (PixArt-Σ style)."""
    with torch.no_grad():
        return transformer(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"],
                           timestep=inputs["t"] * 1000,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample.contiguous()


def forward(transformer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    name = type(transformer).__name__
    if "Flux" in name:
        return flux_forward(transformer, inputs)
    return pixart_forward(transformer, inputs) if "PixArt" in name else sd3_forward(transformer, inputs)


# A tiny SD3 (MMDiT) in the widths ComfyUI's MMDiT derives from its depth (64 channels and one head per unit)
TINY_SD3 = {"sample_size": 32, "patch_size": 2, "in_channels": 16, "num_layers": 2, "attention_head_dim": 64,
            "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 128,
            "pooled_projection_dim": 32, "out_channels": 16, "pos_embed_max_size": 16}


def pooled_text_batch(config: dict, channels: int):
    """Seeded random inputs for a transformer with text and pooled conditioning (SD3, Flux): a 16×16 latent of
    ``channels``, 12 text tokens, at the timesteps ``t``."""
    def batch(seed: int, t: list[float]) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(len(t), channels, 16, 16, generator=generator), "t": torch.tensor(t),
                "context": torch.randn(len(t), 12, config["joint_attention_dim"], generator=generator),
                "pooled": torch.randn(len(t), config["pooled_projection_dim"], generator=generator)}
    return batch


def make_family(folder: Path, family: str, dense, batch) -> None:
    """Calibrate ``dense`` on four calls of random inputs, slim it at keep 0.6 and 1.0 and save both files, the
    fixed inputs and the three models' outputs."""
    from slimdiff_diffusers import save_slim_model_file, slim
    from slimdiff_diffusers.core import CalibrationConfig, calibrate

    def run() -> None:
        for step in range(4):
            forward(dense, batch(10 + step, [1.0 - 0.2 * step, 0.9 - 0.2 * step]))

    calibration = calibrate(dense, run, CalibrationConfig(num_train_timesteps=1))
    inputs = batch(1, [0.9, 0.35])
    outputs = {"dense": forward(dense, inputs)}
    for keep, suffix in ((0.6, "slim06"), (1.0, "full")):
        model = slim(dense, calibration, keep_ratio=keep, lora_maps=False)
        save_slim_model_file(model, folder / f"{family}_{suffix}.safetensors")
        outputs[f"{family}_{suffix}"] = forward(model.eval(), inputs)
    save_file(inputs, str(folder / f"{family}_inputs.safetensors"))
    save_file(outputs, str(folder / f"{family}_outputs.safetensors"))


def make_sd3(folder: Path, qk_norm: str | None) -> None:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    dense = SD3Transformer2DModel(**TINY_SD3, qk_norm=qk_norm).eval()
    config = dict(dense.config)

    batch = pooled_text_batch(config, channels=16)

    family = "sd35" if qk_norm else "sd3"
    # the dense model as a slim file of nothing narrowed would not be dense: keep its weights for ComfyUI
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(folder / f"{family}_dense.safetensors"),
              metadata={"config": json.dumps(config, default=list)})
    make_family(folder, family, dense, batch)


# A tiny PixArt-Σ-style model sampled at its own size (64 latent pixels: ComfyUI derives the position embedding
# from the sampling size, diffusers from sample_size; they agree there).
TINY_PIXART = {"num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 4, "out_channels": 8,
               "num_layers": 2, "cross_attention_dim": 64, "sample_size": 64, "patch_size": 2, "caption_channels": 48,
               "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
               "num_embeds_ada_norm": 1000, "activation_fn": "gelu-approximate", "attention_bias": True,
               "use_additional_conditions": False}


def make_pixart(folder: Path) -> None:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    dense = PixArtTransformer2DModel(**TINY_PIXART).eval()

    def batch(seed: int, t: list[float]) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(len(t), 4, 64, 64, generator=generator), "t": torch.tensor(t),
                "context": torch.randn(len(t), 10, TINY_PIXART["caption_channels"], generator=generator)}

    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(folder / "pixart_dense.safetensors"),
              metadata={"config": json.dumps(dict(dense.config), default=list)})
    make_family(folder, "pixart", dense, batch)


def make_sd3_clip768(folder: Path) -> None:
    """A dense tiny SD3 whose text widths match the tiny SD1.5 checkpoint's CLIP-L (768), for server graphs that
    encode prompts with CLIPTextEncode; diffusers' format, loaded by ComfyUI's stock UNETLoader."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    dense = SD3Transformer2DModel(**{**TINY_SD3, "joint_attention_dim": 768, "pooled_projection_dim": 768})
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(folder / "tiny_sd3_clip768.safetensors"))


def make_flux(folder: Path) -> None:
    """flux-tiny's transformer calibrated on transformer calls with random inputs of its widths (the
    model-level route: ``calibrate`` + ``slimdiff_diffusers.slim``; the pipeline route, ``pipe.slim()``, ends in
    the same ``slim``), slimmed at keep 0.6 and 1.0 and saved with ``save_slim_model_file``."""
    from diffusers import FluxTransformer2DModel

    from slimdiff_diffusers.default_model import FLUX_TINY_MODEL_DIR

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    dense = FluxTransformer2DModel.from_pretrained(FLUX_TINY_MODEL_DIR / "transformer").eval()
    config = dict(dense.config)

    batch = pooled_text_batch(config, channels=4)

    make_family(folder, "flux", dense, batch)


def evaluate(file: Path, inputs_path: Path, out: Path) -> None:
    from slimdiff_diffusers import load_slim_model_file

    model = load_slim_model_file(file).eval()
    save_file({"out": forward(model, load_file(str(inputs_path)))}, str(out))


def evaluate_lora(file: Path, maps: Path, lora: Path, inputs_path: Path, out: Path) -> None:
    from safetensors import safe_open

    from slimdiff_diffusers import load_slim_model_file
    from slimdiff_diffusers.core.basis_maps import BasisMaps

    from peft import LoraConfig

    model = load_slim_model_file(file).eval()
    model.slimdiff_basis_maps = BasisMaps.load(maps, model.slimdiff_spec)
    state = load_file(str(lora))
    with safe_open(str(lora), framework="pt") as f:
        alpha = float(f.metadata()["lora_alpha"])
    targets = sorted({key.rpartition(".lora_")[0] for key in state})
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    model.load_lora_adapter(state, prefix=None, metadata=config.to_dict())
    save_file({"out": forward(model, load_file(str(inputs_path)))}, str(out))


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "make-flux":
        make_flux(Path(sys.argv[2]))
    elif command == "make-sd3":
        make_sd3(Path(sys.argv[2]), None)
    elif command == "make-sd35":
        make_sd3(Path(sys.argv[2]), "rms_norm")
    elif command == "make-pixart":
        make_pixart(Path(sys.argv[2]))
    elif command == "make-sd3-clip768":
        make_sd3_clip768(Path(sys.argv[2]))
    elif command == "eval":
        evaluate(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    elif command == "eval-lora":
        evaluate_lora(*(Path(arg) for arg in sys.argv[2:7]))
    else:
        raise SystemExit(f"unknown command {command!r}")
