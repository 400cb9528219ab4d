#!/usr/bin/env python
"""Train a small style LoRA (PEFT) for the embedded default model: a warm colour filter.

The LoRA is what issue 11's measurement needs: made for the *original* model by ordinary PEFT fine-tuning, small,
quick on a CPU (300 steps of batch 32 at ~0.55 s a step on one idle core: about 3 minutes; the shipped
adapter took 22 minutes on the shared, loaded 2-core machine), and with an effect that is visible and measured
automatically.

- **Data.** ``--num-images`` procedural scenes (``slimdiff_diffusers.evaluation.scenes``, the default model's
  own training distribution, the held-out prompts excluded), through a warm photo filter (:func:`warm_filter`:
  red x1.25, blue x0.7): the near-grey backgrounds turn amber, the shapes keep their colours and places.
- **Adapter.** ``LoraConfig(r=--rank, lora_alpha=--rank)`` on every Linear a kohya/A1111 LoRA targets in a
  transformer block (:data:`TARGETS`): the attentions, the GEGLU feed-forward, proj_in/proj_out. The UNet itself
  stays frozen, so the whole style goes through the layers SlimDiff narrows (a hard case for slimming).
- **Objective.** The UNet's own epsilon loss on the recoloured latents, 10% caption dropout (so the
  unconditional branch of classifier-free guidance learns the style too), AdamW, cosine schedule.
- **Output.** ``pytorch_lora_weights.safetensors`` written by diffusers' ``save_lora_weights`` (the diffusers/PEFT
  format any ``pipe.load_lora_weights`` reads), fp16 factors (a LoRA file is distributed in half precision;
  ~0.2 MB at rank 4), and ``training_info.json`` with the settings and the measured effect.

The effect is measured by :func:`warmth` (mean red minus mean blue, in [-1, 1]): the original's images of
near-grey scenes are close to 0, the warm LoRA's clearly positive. ``benchmarks/lora_transfer.py`` uses the
same statistic on slim models.

Deterministic given the seed and the thread count (``--threads``, default 1). The shipped adapter
``benchmarks/assets/warm_lora/`` was made with the defaults::

    python scripts/train_lora.py --out benchmarks/assets/warm_lora
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimdiff_diffusers.core.io_utils import current_umask  # noqa: E402
from slimdiff_diffusers.default_model import HELDOUT_PROMPTS, load_default_pipeline  # noqa: E402
from slimdiff_diffusers.evaluation.scenes import render_dataset  # noqa: E402

#: the Linears a kohya/A1111 LoRA targets in an SD transformer block
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
LORA_FILE = "pytorch_lora_weights.safetensors"
#: per-channel gains of the warm filter (R, G, B)
WARM_GAINS = np.array([1.25, 1.0, 0.7], dtype=np.float32)


def warm_filter(images: np.ndarray) -> np.ndarray:
    """N x H x W x 3 images in [0, 1] (float) or uint8 -> the warm-filtered images, same dtype."""
    as_float = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
    toned = np.clip(as_float * WARM_GAINS, 0.0, 1.0)
    return (toned * 255.0).round().astype(np.uint8) if images.dtype == np.uint8 else toned.astype(images.dtype)


def warmth(images: np.ndarray) -> np.ndarray:
    """Per image: mean red minus mean blue over the pixels (N x H x W x 3 in [0, 1]) -> (N,), in [-1, 1]."""
    return images[..., 0].reshape(len(images), -1).mean(1) - images[..., 2].reshape(len(images), -1).mean(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (pytorch_lora_weights.safetensors + info)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-images", type=int, default=2000, help="rendered training scenes")
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    parser.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts for the effect check")
    return parser.parse_args(argv)


def train_warm_lora(pipe, args: argparse.Namespace, log=print) -> tuple[dict[str, torch.Tensor], dict]:
    """Fine-tune a LoRA on warm-filtered scenes; returns (PEFT state dict of the UNet, LoRA config dict)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    images, captions = render_dataset(args.num_images, seed=args.seed, exclude_captions=HELDOUT_PROMPTS)
    pixels = torch.from_numpy(warm_filter(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    with torch.no_grad():
        posterior = torch.cat([pipe.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(250)])
        latents = posterior * pipe.vae.config.scaling_factor
        distinct = sorted(set(captions)) + [""]
        context = torch.cat([pipe.encode_prompt(distinct[i:i + 256], "cpu", 1, False)[0]
                             for i in range(0, len(distinct), 256)])
    caption_index = torch.tensor([distinct.index(c) for c in captions])
    empty = len(distinct) - 1

    unet = copy.deepcopy(pipe.unet)
    unet.requires_grad_(False)
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS)
    unet.add_adapter(config)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(step / args.steps, 1.0))))
    scheduler = pipe.scheduler
    generator = torch.Generator().manual_seed(args.seed + 1)
    unet.train()
    running = None
    started = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(len(latents), (args.batch_size,), generator=generator)
        ids = caption_index[index].clone()
        ids[torch.rand(args.batch_size, generator=generator) < args.caption_dropout] = empty
        noise = torch.randn(latents[index].shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents[index], noise, t)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context[ids]).sample, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            log(f"lora step {step:4d}/{args.steps}  eps-mse {running:.4f}  ({time.perf_counter() - started:.0f}s)")
    unet.eval()
    state = {k: v.detach().to(torch.float16) for k, v in get_peft_model_state_dict(unet).items()}
    return state, config.to_dict()


@torch.no_grad()
def sample(pipe, prompts: list[str], steps: int = 25, seed: int = 123) -> np.ndarray:
    """25-step samples (N x H x W x 3 in [0, 1]) with a fixed generator, the benchmark's sampling."""
    return pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    started = time.perf_counter()
    pipe = load_default_pipeline()
    state, config = train_warm_lora(pipe, args)
    seconds = time.perf_counter() - started

    from diffusers import StableDiffusionPipeline

    def _json_safe(value):
        return sorted(value) if isinstance(value, set) else value

    out.mkdir(parents=True, exist_ok=True)
    # written in a scratch folder beside the output, checked, then each file is moved into place atomically
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
        tmp = Path(scratch)
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, weight_name=LORA_FILE,
                                                  unet_lora_adapter_metadata=config)
        prompts = list(HELDOUT_PROMPTS[: args.eval_prompts])
        before = sample(pipe, prompts)
        styled = copy.deepcopy(pipe)
        styled.load_lora_weights(tmp / LORA_FILE)
        after = sample(styled, prompts)
        info = {
            "what": "warm colour filter LoRA for the SlimDiff default model (scripts/train_lora.py)",
            "command": "python scripts/train_lora.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "targets": TARGETS,
            "lora_config": {k: _json_safe(config[k]) for k in ("r", "lora_alpha", "target_modules")},
            "train_seconds": round(seconds, 1),
            "effect": {"prompts": len(prompts), "sampling": "25 DDIM steps, guidance 7.5, seed 123",
                       "warmth_original": [round(float(w), 4) for w in warmth(before)],
                       "warmth_with_lora": [round(float(w), 4) for w in warmth(after)]},
        }
        (tmp / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
        for name in (LORA_FILE, "training_info.json"):
            os.chmod(tmp / name, 0o666 & ~current_umask())
            os.replace(tmp / name, out / name)
    shift = warmth(after) - warmth(before)
    print(f"wrote {out / LORA_FILE} ({(out / LORA_FILE).stat().st_size / 1024:.0f} KiB) in {seconds:.0f}s; warmth "
          f"(mean R - mean B) {warmth(before).mean():+.3f} -> {warmth(after).mean():+.3f}, shift > 0 on "
          f"{int((shift > 0).sum())}/{len(shift)} held-out images")


if __name__ == "__main__":
    main()
