#!/usr/bin/env python
"""Train SlimDiff's embedded default model: a tiny Stable-Diffusion-architecture text-to-image pipeline.

Everything is generated here, nothing is downloaded:

1. **Data.** ``--num-images`` procedural scenes (``slimdiff_diffusers.evaluation.scenes``) rendered at 32x32,
   excluding the 32 held-out evaluation prompts of ``slimdiff_diffusers.default_model.prompts``.
2. **Tokenizer.** A byte-level BPE ``CLIPTokenizer`` whose merges make every word of the scene grammar a
   single token (other text still tokenizes, byte by byte).
3. **VAE.** An ``AutoencoderKL`` (downsampling factor 2, 4 latent channels) trained with MSE + L1 + a small
   KL term; its ``scaling_factor`` is set to 1 / std of the latents.
4. **Denoiser.** The ``CLIPTextModel`` and the ``UNet2DConditionModel`` trained jointly on the cached latents
   with the epsilon objective (each noise-level bin weighted by the inverse of its running loss, so that
   the high-noise steps that decide the layout count), 10% caption dropout (empty caption, for
   classifier-free guidance), AdamW + cosine schedule, and an EMA of the weights (the EMA is shipped).
5. **Pipeline.** A ``StableDiffusionPipeline`` with a ``DDIMScheduler`` (no safety checker) saved to a
   temporary folder next to ``--output-dir`` (UNet weights stored in fp16, VAE and text encoder in fp32),
   reloaded with stock ``from_pretrained``, smoke-tested and evaluated on the held-out prompts there, then
   renamed into place (the previous model is only removed once the new one is in place).

Run time: with the default settings the shipped model took 30.0 minutes on the 2-core CPU of the development
machine with 1 torch thread (VAE training + encoding 4.7 min, text encoder + UNet 25.3 min at ~108
samples/s; the machine was shared with other jobs), plus ~20 s for saving and the held-out evaluation. See
docs/default_model.md. ``--quick`` runs a ~7-minute smoke version whose samples are blobs.

Usage::

    python scripts/train_default_model.py                       # full run, writes the embedded model
    python scripts/train_default_model.py --quick --output-dir /tmp/tiny_sd
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from slimdiff_diffusers.default_model import DEFAULT_MODEL_DIR  # noqa: E402
from slimdiff_diffusers.default_model.evaluate import measure_adherence  # noqa: E402
from slimdiff_diffusers.default_model.prompts import HELDOUT_PROMPTS  # noqa: E402
from slimdiff_diffusers.evaluation.scenes import all_captions, render_dataset  # noqa: E402

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
TEXT_MAX_LENGTH = 32
TEXT_WIDTH = 64


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_MODEL_DIR, help="pipeline folder to (re)write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=20000, help="rendered training scenes")
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-kl-weight", type=float, default=1e-4)
    parser.add_argument("--unet-steps", type=int, default=2600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--text-encoder-lr-scale", type=float, default=0.3, help="text-encoder learning rate / UNet learning rate"
    )
    parser.add_argument("--token-embedding-std", type=float, default=1.0, help="init std of token embeddings")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="probability of the empty caption")
    parser.add_argument(
        "--loss-weighting", choices=("adaptive", "min-snr"), default="adaptive",
        help="adaptive: weight each noise-level bin by 1 / running mean of its loss (see AdaptiveLossWeights); "
        "min-snr: min(SNR, gamma) / SNR",
    )
    parser.add_argument("--min-snr-gamma", type=float, default=5.0)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--eval-images-per-prompt", type=int, default=4, help="0 skips the held-out evaluation")
    parser.add_argument("--quick", action="store_true", help="a ~7-minute smoke run (fewer images and steps)")
    parser.add_argument(
        "--vae-from", type=Path, default=None,
        help="reuse the VAE of an earlier run's pipeline folder instead of training one (for experiments)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images = min(args.num_images, 8000)
        args.vae_steps = min(args.vae_steps, 250)
        args.unet_steps = min(args.unet_steps, 400)
        args.warmup_steps = min(args.warmup_steps, 50)
        args.eval_images_per_prompt = min(args.eval_images_per_prompt, 1)
    return args


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge adjacent symbols by merge rank, lowest first, as CLIP's BPE does."""
    symbols = list(symbols)
    while len(symbols) > 1:
        ranked = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        if not ranked:
            break
        _, index = min(ranked)
        first, second = symbols[index], symbols[index + 1]
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_tokenizer(words: list[str], folder: Path) -> CLIPTokenizer:
    """Write ``vocab.json``/``merges.txt`` in which every word of ``words`` is one token; load a CLIPTokenizer.

    Each word is merged left to right; a merge is appended (lowest priority) only when the merges so far do
    not already reduce the word to one symbol. Appending never changes how earlier words tokenize: at every
    step of an earlier word one of the older, higher-priority merges applies.
    """
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [char + "</w>" for char in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            symbols = apply_bpe(symbols, ranks)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=TEXT_MAX_LENGTH)
    for word in words:  # the whole point of the custom merges
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"word {word!r} tokenizes to {ids}")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
def make_vae() -> AutoencoderKL:
    """Two resolution levels (32x32 -> 16x16 latents: factor 2), 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def make_text_encoder(tokenizer: CLIPTokenizer, token_embedding_std: float = 1.0) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(config)
    # CLIP's init (std 0.02) makes token embeddings tiny next to what the layers add to the residual
    # stream; trained from scratch jointly with the UNet, the words the UNet cannot use yet ("left" vs
    # "right") then collapse onto each other and never get learned. Unit-scale embeddings keep every token
    # distinguishable from the start (a pretrained CLIP would provide this).
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=token_embedding_std)
    return text_encoder


def make_unet() -> UNet2DConditionModel:
    """16x16 latents; levels 16/8/4 with 32/64/128 channels; cross-attention at 8x8, 4x4 and the mid block.

    ``attention_head_dim`` is diffusers' legacy name for the number of heads here: 4 heads, so head dims are
    16 (64 channels) and 32 (128 channels). Transformer blocks are stock ``BasicTransformerBlock``s
    (self-attention, cross-attention, GEGLU feed-forward).
    """
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=16,
    )


def make_schedulers() -> tuple[DDPMScheduler, DDIMScheduler]:
    """Stable Diffusion's noise schedule; DDIM with trailing timesteps (starts at t=999) for sampling."""
    common = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
    }
    train_scheduler = DDPMScheduler(**common)
    sample_scheduler = DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    return train_scheduler, sample_scheduler


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class AdaptiveLossWeights:
    """Per-noise-level loss weights that give every timestep bin the same say in the gradient.

    The epsilon loss is tiny at high noise (there ``x_t`` is almost ``eps``) and large at low noise, so with
    uniform (or min-SNR) weights almost all of the gradient comes from low-noise timesteps, while the layout
    of the image (where the objects go: the "left"/"above" words) is decided at high noise. Weighting each
    of ``num_bins`` timestep bins by the inverse of a running mean of its own loss (as EDM2's learned
    per-noise-level uncertainty does) optimises every bin's relative error equally. The objective is still
    epsilon prediction; only the mix of noise levels in the gradient changes.
    """

    def __init__(self, num_train_timesteps: int, num_bins: int = 20, decay: float = 0.99) -> None:
        self.bin_width = math.ceil(num_train_timesteps / num_bins)
        self.running_loss = torch.full((num_bins,), float("nan"))
        self.decay = decay

    def __call__(self, timesteps: torch.Tensor, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """Weights for this batch (mean 1 over the bins), after updating the running means with it."""
        bins = timesteps // self.bin_width
        detached = per_sample_loss.detach()
        for b in bins.unique().tolist():
            batch_mean = detached[bins == b].mean()
            old = self.running_loss[b]
            self.running_loss[b] = batch_mean if torch.isnan(old) else self.decay * old + (1 - self.decay) * batch_mean
        known = self.running_loss.nan_to_num(nan=float(self.running_loss.nanmean()))
        inverse = 1.0 / known
        return (inverse / inverse.mean())[bins]


class EMA:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up of the decay."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float) -> None:
        self.parameters = parameters
        self.shadow = [p.detach().clone() for p in parameters]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.parameters], 1.0 - decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        for shadow, param in zip(self.shadow, self.parameters):
            param.copy_(shadow)


# ---------------------------------------------------------------------------------------------------------
# Training stages
# ---------------------------------------------------------------------------------------------------------
def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae: AutoencoderKL, images: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    generator = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    start = time.time()
    running = None
    for step in range(args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = args.vae_lr * cosine_lr(step, args.vae_steps, warmup=min(50, args.vae_steps // 10))
        batch = images[torch.randint(len(images), (args.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        mse = F.mse_loss(reconstruction, batch)
        l1 = F.l1_loss(reconstruction, batch)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = mse + l1 + args.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        values = torch.stack([mse.detach(), l1.detach(), kl.detach()])
        running = values if running is None else 0.95 * running + 0.05 * values
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(
                f"vae step {step:5d}/{args.vae_steps}  mse {running[0]:.5f}  l1 {running[1]:.4f}  "
                f"kl {running[2]:.3f}  ({time.time() - start:.0f}s)"
            )
    vae.eval()
    return {"mse": float(running[0]), "l1": float(running[1]), "kl": float(running[2])}


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of all images (unscaled latents)."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latent_means: torch.Tensor,
    latent_stds: torch.Tensor,
    caption_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    train_scheduler: DDPMScheduler,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Joint text-encoder + UNet training on cached (already scaled) latents; leaves EMA weights in the models."""
    generator = torch.Generator().manual_seed(args.seed + 2)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    # A gentler text-encoder learning rate keeps its token representations from collapsing early on.
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr_scale": 1.0},
            {"params": list(text_encoder.parameters()), "lr_scale": args.text_encoder_lr_scale},
        ],
        lr=args.lr,
        weight_decay=0.01,
    )
    ema = EMA(parameters, args.ema_decay)
    alphas_cumprod = train_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    # min-SNR-gamma weighting for the epsilon objective: weight = min(SNR, gamma) / SNR.
    min_snr_weights = torch.clamp(snr, max=args.min_snr_gamma) / snr
    adaptive_weights = AdaptiveLossWeights(train_scheduler.config.num_train_timesteps)
    unet.train()
    text_encoder.train()
    start = time.time()
    running = None
    for step in range(args.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = group["lr_scale"] * args.lr * cosine_lr(step, args.unet_steps, args.warmup_steps)
        index = torch.randint(len(latent_means), (args.batch_size,), generator=generator)
        latents = latent_means[index] + latent_stds[index] * torch.randn(
            latent_means[index].shape, generator=generator
        )
        ids = caption_ids[index].clone()
        dropped = torch.rand(args.batch_size, generator=generator) < args.caption_dropout
        ids[dropped] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        num_timesteps = train_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (args.batch_size,), generator=generator)
        noisy_latents = train_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(ids)[0]
        prediction = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        if args.loss_weighting == "adaptive":
            weights = adaptive_weights(timesteps, per_sample)
        else:
            weights = min_snr_weights[timesteps]
        loss = (per_sample * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema.update()
        value = per_sample.mean().detach()
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 100 == 0 or step == args.unet_steps - 1:
            elapsed = time.time() - start
            log(
                f"unet step {step:5d}/{args.unet_steps}  eps-mse {running:.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}"
                f"  ({elapsed:.0f}s, {(step + 1) * args.batch_size / max(elapsed, 1e-9):.0f} samples/s)"
            )
    ema.copy_to_parameters()
    unet.eval()
    text_encoder.eval()
    return {"eps_mse": float(running)}


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------
def rewrite_safetensors(path: Path, transform) -> None:
    """Replace a safetensors file by ``transform(state_dict)`` (keeping the ``format`` metadata)."""
    state_dict = load_file(path)
    save_file(transform(state_dict), path, metadata={"format": "pt"})


def save_pipeline_atomically(
    pipe: StableDiffusionPipeline,
    tokenizer_files: Path,
    output_dir: Path,
    extra: dict,
    eval_images_per_prompt: int,
) -> dict | None:
    """Save ``pipe`` to a temporary sibling folder, reload it from there, smoke-test and evaluate the reloaded
    pipeline, then rename the folder to ``output_dir``. Returns the held-out adherence summary (or None).

    Storage: the UNet is stored in fp16 (half the size; stock loading casts it back to fp32 unless asked for
    another dtype). The VAE and the text encoder stay fp32: they are small, and transformers loads a text
    encoder in its stored dtype, so an fp16 text encoder would clash with the fp32 UNet under a plain
    ``StableDiffusionPipeline.from_pretrained(folder)``.
    """
    output_dir = output_dir.resolve()
    temp_dir = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    old_dir = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
    if temp_dir.exists():
        shutil.rmtree(temp_dir)
    pipe.save_pretrained(temp_dir, safe_serialization=True)
    rewrite_safetensors(
        temp_dir / "unet" / "diffusion_pytorch_model.safetensors",
        lambda state: {key: value.to(torch.float16) for key, value in state.items()},
    )
    # transformers 5 writes CLIPTextModel keys without the "text_model." prefix; the prefixed layout is what
    # transformers 4, original SD checkpoints and ComfyUI expect, and transformers 5 loads it too.
    rewrite_safetensors(
        temp_dir / "text_encoder" / "model.safetensors",
        lambda state: {
            key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()
        },
    )
    # transformers 5 saves tokenizer.json only; vocab.json/merges.txt keep older CLIPTokenizer loaders working.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_files / name, temp_dir / "tokenizer" / name)

    reloaded = StableDiffusionPipeline.from_pretrained(temp_dir, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        dtype = next(getattr(reloaded, name).parameters()).dtype
        if dtype != torch.float32:
            raise RuntimeError(f"stock loading gives the {name} in {dtype}, expected float32")
    image = reloaded("a red circle on the left", num_inference_steps=2, output_type="np").images[0]
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or not np.isfinite(image).all():
        raise RuntimeError(f"the saved pipeline does not generate a valid image (shape {image.shape})")

    summary = None
    if eval_images_per_prompt > 0:
        stage = time.time()
        summary, _, _ = measure_adherence(
            reloaded, HELDOUT_PROMPTS, images_per_prompt=eval_images_per_prompt, seed=1000, guidance_scale=7.5,
            model="sd-tiny",  # the sampler of its registry entry (the folder is a temporary one here)
        )
        extra["timings_s"]["eval_s"] = round(time.time() - stage, 1)
        log(
            "held-out adherence of the saved pipeline (25 DDIM steps, guidance 7.5, "
            f"{eval_images_per_prompt} images per prompt): {json.dumps({k: round(v, 3) for k, v in summary.items()})}"
        )
    extra["heldout_adherence"] = summary
    (temp_dir / "training_info.json").write_text(json.dumps(extra, indent=2) + "\n", encoding="utf-8")
    publish_model_folder(temp_dir, output_dir, old_dir)
    return summary


def publish_model_folder(temp_dir: Path, output_dir: Path, old_dir: Path) -> None:
    """Move a finished model folder into place: normal permissions, and never a half-written model."""
    for path in temp_dir.rglob("*"):  # some writers create 0600 files; the model ships inside the package
        path.chmod(0o755 if path.is_dir() else 0o644)
    # Directories cannot be swapped in one os.replace: move the old model aside, move the new one in, and
    # only then delete the old one, so an interruption never leaves a half-written model in place.
    if output_dir.exists():
        os.replace(output_dir, old_dir)
    os.replace(temp_dir, output_dir)
    if old_dir.exists():
        shutil.rmtree(old_dir)


def folder_size_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    timings: dict[str, float] = {}
    run_start = time.time()

    # 1. Data (held-out prompts never appear in training).
    stage = time.time()
    images_uint8, captions = render_dataset(args.num_images, seed=args.seed, exclude_captions=HELDOUT_PROMPTS)
    images = images_to_tensor(images_uint8)
    timings["data_s"] = time.time() - stage
    log(f"rendered {len(captions)} scenes ({len(set(captions))} distinct captions) in {timings['data_s']:.0f}s")

    # 2. Tokenizer.
    work_dir = args.output_dir.resolve().parent / f".{args.output_dir.name}.work-{os.getpid()}"
    words = sorted({word for caption in all_captions() for word in caption.split()})
    tokenizer = build_tokenizer(words, work_dir / "tokenizer_files")
    log(f"tokenizer: {len(tokenizer)} tokens, {len(words)} grammar words, max length {tokenizer.model_max_length}")

    # 3. VAE.
    stage = time.time()
    if args.vae_from is None:
        vae = make_vae()
        log(f"vae: {count_parameters(vae):,} parameters")
        vae_stats = train_vae(vae, images, args)
    else:
        vae = AutoencoderKL.from_pretrained(args.vae_from / "vae", dtype=torch.float32).eval()
        vae_stats = {"reused_from": str(args.vae_from)}
    latent_means, latent_stds = encode_images(vae, images)
    scaling_factor = float(1.0 / latent_means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    with torch.no_grad():
        check = images[:500]
        reconstruction = vae.decode(encode_images(vae, check)[0]).sample.clamp(-1, 1)
        psnr = float(10 * torch.log10(4.0 / F.mse_loss(reconstruction, check)))
    timings["vae_s"] = time.time() - stage
    log(
        f"vae done in {timings['vae_s']:.0f}s: reconstruction PSNR {psnr:.1f} dB, latent mean "
        f"{latent_means.mean():.3f} std {latent_means.std():.3f} -> scaling_factor {scaling_factor:.4f}, "
        f"posterior std {latent_stds.mean():.4f}"
    )

    # 4. Text encoder + UNet.
    stage = time.time()
    latent_means = latent_means * scaling_factor
    latent_stds = latent_stds * scaling_factor

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids

    caption_ids = tokenize(captions)
    empty_ids = tokenize([""])[0]
    text_encoder = make_text_encoder(tokenizer, args.token_embedding_std)
    unet = make_unet()
    train_scheduler, sample_scheduler = make_schedulers()
    log(f"text encoder: {count_parameters(text_encoder):,} parameters; unet: {count_parameters(unet):,} parameters")
    denoiser_stats = train_denoiser(
        unet, text_encoder, latent_means, latent_stds, caption_ids, empty_ids, train_scheduler, args
    )
    timings["denoiser_s"] = time.time() - stage
    log(f"denoiser done in {timings['denoiser_s']:.0f}s")

    # 5. Pipeline.
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sample_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    timings["train_total_s"] = time.time() - run_start

    extra = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": {
            "unet": count_parameters(unet),
            "text_encoder": count_parameters(text_encoder),
            "vae": count_parameters(vae),
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": args.threads,
        "vae": {**vae_stats, "psnr_db": psnr, "scaling_factor": scaling_factor},
        "denoiser": denoiser_stats,
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "transformers": __import__("transformers").__version__},
    }
    save_pipeline_atomically(pipe, work_dir / "tokenizer_files", args.output_dir, extra, args.eval_images_per_prompt)
    shutil.rmtree(work_dir, ignore_errors=True)
    log(
        f"saved {args.output_dir} ({folder_size_bytes(args.output_dir.resolve()) / 1e6:.1f} MB); "
        f"training wall time {timings['train_total_s'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
