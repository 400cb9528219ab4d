"""LoRAs on slim models (issue 11): a LoRA made for the original, translated onto slim UNets, against the original.

The embedded default model gets a LoRA on every Linear a kohya/A1111 LoRA targets in a transformer block
(to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2, proj_in/proj_out), made here (no Hub):

- ``--lora trained`` (default): the warm-filter style LoRA of ``scripts/train_lora.py`` (PEFT fine-tuning of the
  original UNet on warm-filtered scenes, rank 4, ~3 minutes on an idle CPU core), shipped as
  ``benchmarks/assets/warm_lora/pytorch_lora_weights.safetensors`` (``--retrain`` makes it again first);
- ``--lora random``: random factors (seeded) scaled so the update is ~10% of each layer's norm.

For each budget the UNet is slimmed (with LoRA maps) from one calibration, and the LoRA is loaded with
``pipe.load_lora_weights`` (diffusers' real loading path). Reported, on held-out prompts:

- ``eps_rel_error``: noise-prediction relative error against the original + LoRA, for the slim model + translated
  LoRA, the slim model alone against the original (the comparison the acceptance bound uses: mapped <= 1.5x
  slim-only), and the exact route (LoRA fused into the original, then slimmed from the same calibration);
- ``lora_effect_rel_error``: ||(eps_slim+L - eps_slim) - (eps_orig+L - eps_orig)|| / ||eps_orig+L - eps_orig||;
- ``psnr_db``: PSNR of 25-step samples (same seeds) against the original + LoRA (slim-only against the original);
- ``warmth`` (mean red minus mean blue of each image, ``scripts/train_lora.py``): the style's measured effect.
  ``effect_present``: the slim + LoRA image's warmth is closer to the original + LoRA image's than to the original
  image's; ``style_kept``: mean warmth shift (slim + LoRA minus original) over the original's (original + LoRA minus
  original), 1.0 = all of the style.

    python benchmarks/lora_transfer.py --image docs/images/lora_transfer_warm.png   # trained warm-filter LoRA
    python benchmarks/lora_transfer.py --lora random --keep 0.8 0.6 0.4
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import slimdiff_diffusers as sd  # noqa: E402
from benchmarks.common import machine_info, write_json  # noqa: E402
from scripts.train_lora import LORA_FILE, TARGETS, warmth  # noqa: E402
from scripts.train_lora import main as train_lora_main  # noqa: E402
from slimdiff_diffusers.core.io_utils import atomic_path  # noqa: E402
from slimdiff_diffusers.default_model import CALIBRATION_PROMPTS, HELDOUT_PROMPTS, load_default_pipeline  # noqa: E402
from slimdiff_diffusers.diffusers_adapter.pipeline import calibrate_pipeline  # noqa: E402
from slimdiff_diffusers.diffusers_adapter.slimset import SlimSet  # noqa: E402
from slimdiff_diffusers.evaluation.image_metrics import psnr  # noqa: E402

SHIPPED_LORA = ROOT / "benchmarks" / "assets" / "warm_lora"
TIMESTEPS = (900, 600, 300, 100)


def _save_lora(unet_with_adapter, config, folder: Path) -> Path:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet_with_adapter),
                                              unet_lora_adapter_metadata=config.to_dict())
    return folder


def random_lora(unet, folder: Path, rank: int, seed: int = 0, scale: float = 0.1) -> Path:
    """Random seeded factors (B ~ N(0, 1), A ~ N(0, 1/d_in)), then scaled so ||ΔW|| ≈ ``scale``·||W|| per layer."""
    from peft import LoraConfig

    donor = copy.deepcopy(unet)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=TARGETS)
    donor.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in donor.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=gen) / a.flatten(1).shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=gen))
                w = module.get_base_layer().weight
                b.mul_(scale * w.norm() / (b.flatten(1) @ a.flatten(1)).norm())  # proj_in/out may be 1x1 convs
    return _save_lora(donor, config, folder)


@torch.no_grad()
def noise_predictions(unet, cases) -> torch.Tensor:
    return torch.cat([unet(latents, t, encoder_hidden_states=context).sample for latents, t, context in cases])


@torch.no_grad()
def sample(pipe, prompts: list[str], steps: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(123)
    return pipe(prompts, num_inference_steps=steps, generator=generator, output_type="np").images


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    parser.add_argument("--lora", choices=["trained", "random"], default="trained")
    parser.add_argument("--retrain", action="store_true",
                        help="--lora trained: run scripts/train_lora.py (defaults) into a scratch folder first")
    parser.add_argument("--rank", type=int, default=8, help="--lora random only (the trained LoRA's is 4)")
    parser.add_argument("--calibration-prompts", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/lora_transfer_<lora>.json")
    parser.add_argument("--image", default=None, help="write a before/after grid (PNG) of the first eval prompts")
    args = parser.parse_args()
    out = args.out or f"benchmarks/results/lora_transfer_{args.lora}.json"
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="slimdiff-lora-"))

    original = load_default_pipeline()
    started = time.perf_counter()
    if args.lora == "trained":
        folder = SHIPPED_LORA
        if args.retrain:
            folder = work / "warm_lora"
            train_lora_main(["--out", str(folder)])
        lora = folder / LORA_FILE
        info = json.loads((folder / "training_info.json").read_text())
        rank = info["lora_config"]["r"]
    else:
        lora, info, rank = random_lora(original.unet, work / "lora", args.rank), None, args.rank
    lora_seconds = time.perf_counter() - started

    n = args.calibration_prompts
    started = time.perf_counter()
    calibration = calibrate_pipeline(original, SlimSet(list(CALIBRATION_PROMPTS[:n]), list(range(n))),
                                     num_inference_steps=args.steps, guidance_scale=7.5, progress=False)
    calibration.save(work / "calibration.safetensors")
    calibration_seconds = time.perf_counter() - started

    prompts = list(HELDOUT_PROMPTS[: args.eval_prompts])
    context, _ = original.encode_prompt(prompts, "cpu", 1, False)
    gen = torch.Generator().manual_seed(1)
    size = original.unet.config.sample_size
    cases = [(torch.randn(len(prompts), 4, size, size, generator=gen), t, context) for t in TIMESTEPS]

    def with_lora(pipe):
        pipe = copy.deepcopy(pipe)
        pipe.load_lora_weights(lora)
        return pipe

    original_lora = with_lora(original)
    eps_orig, eps_orig_lora = noise_predictions(original.unet, cases), noise_predictions(original_lora.unet, cases)
    effect_orig = eps_orig_lora - eps_orig
    img_orig, img_orig_lora = sample(original, prompts, args.steps), sample(original_lora, prompts, args.steps)
    warm_orig, warm_orig_lora = warmth(img_orig), warmth(img_orig_lora)
    fused = copy.deepcopy(original_lora)
    fused.fuse_lora()
    fused.unload_lora_weights()
    rows = []
    grid = [img_orig, img_orig_lora]
    for keep in args.keep:
        started = time.perf_counter()
        slim = sd.enable_slimdiff(copy.deepcopy(original))
        slim.slim(calibration=calibration, keep_ratio=keep, progress=False)
        slim_seconds = time.perf_counter() - started
        started = time.perf_counter()
        slim_lora = with_lora(slim)
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        exact = sd.enable_slimdiff(copy.deepcopy(fused))
        exact.slim(calibration=calibration, keep_ratio=keep, progress=False, strict_weights=False)
        exact_seconds = time.perf_counter() - started
        eps_slim, eps_slim_lora = noise_predictions(slim.unet, cases), noise_predictions(slim_lora.unet, cases)
        eps_exact = noise_predictions(exact.unet, cases)
        img_slim, img_slim_lora = sample(slim, prompts, args.steps), sample(slim_lora, prompts, args.steps)
        img_exact = sample(exact, prompts, args.steps)
        warm_slim_lora, warm_exact = warmth(img_slim_lora), warmth(img_exact)
        present = np.abs(warm_slim_lora - warm_orig_lora) < np.abs(warm_slim_lora - warm_orig)
        shift = float((warm_orig_lora - warm_orig).mean())
        row = {
            "keep_ratio": keep,
            "params_kept_vs_original": slim.unet.slimdiff_report.params_after / slim.unet.slimdiff_report.params_before,
            "eps_rel_error": {"slim_only_vs_original": rel(eps_slim, eps_orig),
                              "slim_mapped_lora_vs_original_lora": rel(eps_slim_lora, eps_orig_lora),
                              "exact_route_vs_original_lora": rel(eps_exact, eps_orig_lora)},
            "lora_effect_rel_norm": (effect_orig.norm() / eps_orig.norm()).item(),
            "lora_effect_rel_error": rel(eps_slim_lora - eps_slim, effect_orig),
            "psnr_db": {"slim_only_vs_original": psnr(img_orig, img_slim),
                        "slim_mapped_lora_vs_original_lora": psnr(img_orig_lora, img_slim_lora),
                        "exact_route_vs_original_lora": psnr(img_orig_lora, img_exact),
                        "original_lora_vs_original": psnr(img_orig, img_orig_lora)},
            "warmth_mean": {"original": float(warm_orig.mean()), "original_lora": float(warm_orig_lora.mean()),
                            "slim_only": float(warmth(img_slim).mean()),
                            "slim_mapped_lora": float(warm_slim_lora.mean()), "exact_route": float(warm_exact.mean())},
            "style_kept": {"slim_mapped_lora": float((warm_slim_lora - warm_orig).mean()) / shift,
                           "exact_route": float((warm_exact - warm_orig).mean()) / shift},
            "effect_present": f"{int(present.sum())}/{len(present)} images",
            "effect_present_count": int(present.sum()),
            "lora_maps_mib": round(slim.unet.slimdiff_basis_maps.nbytes() / 2**20, 2),
            "seconds": {"slim": round(slim_seconds, 1), "load_mapped_lora": round(load_seconds, 2),
                        "exact_route_reslim": round(exact_seconds, 1)},
        }
        e = row["eps_rel_error"]
        row["mapped_over_slim_only"] = e["slim_mapped_lora_vs_original_lora"] / e["slim_only_vs_original"]
        row["acceptance_mapped_within_1_5x_slim_only"] = row["mapped_over_slim_only"] <= 1.5
        rows.append(row)
        grid.append(img_slim_lora)
        print(row, flush=True)
    image = None
    if args.image:
        _write_grid(args.image, grid, ["original", "original\n+ LoRA"] + [f"keep {k}\n+ mapped LoRA" for k in args.keep])
        image = str(Path(args.image).resolve().relative_to(ROOT)) if Path(args.image).resolve().is_relative_to(ROOT) \
            else args.image
    write_json(out, {
        "benchmark": "lora_transfer", "model": "embedded default model", "machine": machine_info(),
        "command": "python benchmarks/lora_transfer.py " + " ".join(sys.argv[1:]),
        "settings": {"lora": args.lora, "rank": rank, "targets": TARGETS, "calibration_prompts": n,
                     "steps": args.steps, "eval_prompts": len(prompts), "timesteps": list(TIMESTEPS),
                     "lora_file": str(lora.relative_to(ROOT)) if lora.is_relative_to(ROOT) else None,
                     "retrained": args.retrain, "lora_training": info},
        "image": image,
        "calibration_seconds": round(calibration_seconds, 1), "lora_seconds": round(lora_seconds, 1),
        "results": rows})


def _write_grid(path: str, rows: list[np.ndarray], labels: list[str], columns: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 1.2, len(rows) * 1.3))
    for r, (images, label) in enumerate(zip(rows, labels)):
        for c in range(columns):
            ax = axes[r, c]
            ax.imshow(images[c])
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
