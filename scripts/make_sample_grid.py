#!/usr/bin/env python
"""Draw a labelled grid of samples from the default model (docs/images/default_model_samples.png).

Each row is one prompt (written on the left) with ``--images-per-prompt`` samples, upscaled with nearest
neighbour. The frame of each sample shows the automatic adherence check of
``slimdiff_diffusers.evaluation.adherence``: green = every attribute right (score 1), red = not.
By default the prompts are 16 of the held-out prompts (never seen in training), 6 with one object and 10 with
two; seeds are fixed, so the grid is reproducible.

Usage::

    python scripts/make_sample_grid.py
    python scripts/make_sample_grid.py --model-dir /tmp/tiny_sd --output /tmp/grid.png --guidance-scale 5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from diffusers import StableDiffusionPipeline  # noqa: E402

from slimdiff_diffusers.default_model import DEFAULT_MODEL_DIR  # noqa: E402
from slimdiff_diffusers.default_model.evaluate import generate_images  # noqa: E402
from slimdiff_diffusers.default_model.prompts import HELDOUT_PROMPTS  # noqa: E402
from slimdiff_diffusers.evaluation.adherence import evaluate_adherence  # noqa: E402
from slimdiff_diffusers.evaluation.scenes import parse_caption  # noqa: E402

CELL_SCALE = 3  # 32 px samples -> 96 px cells
FRAME = 3
GAP = 4
LABEL_WIDTH = 330
PASS_COLOR = (40, 170, 60)
FAIL_COLOR = (200, 40, 40)


def default_prompts() -> list[str]:
    singles = [p for p in HELDOUT_PROMPTS if parse_caption(p).relation is None]
    pairs = [p for p in HELDOUT_PROMPTS if parse_caption(p).relation is not None]
    return singles[::2] + pairs[::2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "images" / "default_model_samples.png")
    parser.add_argument("--prompts", nargs="*", default=None, help="default: 16 held-out prompts")
    parser.add_argument("--images-per-prompt", type=int, default=6)
    parser.add_argument("--num-inference-steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def load_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def draw_grid(images: np.ndarray, prompts: list[str], passed: list[bool], per_prompt: int, title: str) -> Image.Image:
    """Lay out ``len(prompts)`` rows of ``per_prompt`` samples with the prompt on the left of each row."""
    cell = images.shape[1] * CELL_SCALE + 2 * FRAME
    title_height = 30
    width = LABEL_WIDTH + per_prompt * (cell + GAP)
    height = title_height + len(prompts) * (cell + GAP)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = load_font(16)
    draw.text((8, 6), title, fill=(0, 0, 0), font=load_font(15))
    for row, prompt in enumerate(prompts):
        top = title_height + row * (cell + GAP)
        draw.text((8, top + cell // 2 - 9), prompt, fill=(0, 0, 0), font=font)
        for column in range(per_prompt):
            index = row * per_prompt + column
            left = LABEL_WIDTH + column * (cell + GAP)
            draw.rectangle(
                [left, top, left + cell - 1, top + cell - 1], fill=PASS_COLOR if passed[index] else FAIL_COLOR
            )
            sample = Image.fromarray(images[index]).resize(
                (images.shape[2] * CELL_SCALE, images.shape[1] * CELL_SCALE), Image.NEAREST
            )
            canvas.paste(sample, (left + FRAME, top + FRAME))
    return canvas


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = args.prompts or default_prompts()
    pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    expanded = [prompt for prompt in prompts for _ in range(args.images_per_prompt)]
    seeds = [args.seed + i for i in range(len(expanded))]
    images = generate_images(pipe, expanded, seeds, args.num_inference_steps, args.guidance_scale)
    passed = [evaluate_adherence(image, prompt).overall == 1.0 for image, prompt in zip(images, expanded)]

    title = (
        f"SlimDiff default model, held-out prompts: {args.num_inference_steps} DDIM steps, guidance "
        f"{args.guidance_scale:g}, seeds {seeds[0]}-{seeds[-1]}. Frame: green = adherence check passed "
        f"({sum(passed)}/{len(passed)})"
    )
    grid = draw_grid(images, prompts, passed, args.images_per_prompt, title)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output, optimize=True)
    print(f"wrote {args.output} ({grid.size[0]}x{grid.size[1]}); adherence passed {sum(passed)}/{len(passed)}")


if __name__ == "__main__":
    main()
