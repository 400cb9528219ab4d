#!/usr/bin/env python
"""Train SlimDiff's embedded Flux-architecture model (``flux-tiny``): a tiny diffusers ``FluxPipeline``.

It draws the same procedural scenes as the default UNet model (``scripts/train_default_model.py``), whose
helpers (data rendering, CLIP tokenizer, CLIP text encoder, VAE encoding, EMA, learning-rate schedule,
saving tweaks) this script imports rather than copies. Nothing is downloaded:

1. **Data.** ``--num-images`` procedural scenes (``slimdiff_diffusers.evaluation.scenes``) rendered at 32x32,
   excluding the 32 held-out evaluation prompts of ``slimdiff_diffusers.default_model.prompts``.
2. **Tokenizers.** The default model's byte-level BPE ``CLIPTokenizer`` (every grammar word one token, 32
   positions) and a ``T5TokenizerFast`` built offline: a SentencePiece-style Unigram model (``▁`` word
   boundaries) whose vocabulary holds every grammar word as one piece plus single characters, so any other
   text still tokenizes; ``model_max_length`` 16 is the T5 sequence length the model was trained with.
3. **VAE.** The default model's trained ``AutoencoderKL`` is reused unchanged (32x32x3 <-> 16x16x4). Flux
   packs 2x2 latent patches into one token, so the transformer reads 8x8 = 64 tokens of 4 x 4 = 16 channels.
   Flux's pipeline decodes ``latents / scaling_factor + shift_factor``: both are set from the training
   latents (mean and 1 / std), so the transformer sees zero-mean, unit-variance latents.
4. **Denoiser.** A ``FluxTransformer2DModel`` (double-stream and single-stream blocks, RoPE over the latent
   grid, RMS QK-norm) trained jointly with the ``CLIPTextModel`` (pooled vector) and a ``T5EncoderModel``
   (token sequence) from scratch with the rectified-flow objective of Flux/SD3: ``x_s = (1 - s) x_0 + s e``,
   target ``e - x_0``; ``s`` is logit-normal, shifted as the pipeline's ``FlowMatchEulerDiscreteScheduler``
   shifts it for 64 tokens (dynamic shifting, ``mu`` = 0.47). 10% caption dropout (empty caption) trains the
   unconditional prediction for classifier-free guidance (``true_cfg_scale`` with ``negative_prompt=""``);
   there is no distilled guidance embedding (``guidance_embeds=False``, as in FLUX.1-schnell). AdamW +
   cosine schedule, gradient clipping, EMA (the EMA is shipped).
5. **Pipeline.** A ``FluxPipeline`` saved to a temporary folder next to ``--output-dir`` (transformer stored
   in fp16, encoders and VAE in fp32), reloaded with stock ``FluxPipeline.from_pretrained``, smoke-tested and
   evaluated on the held-out prompts there, then renamed into place.

``--time-budget-min`` bounds the training stage by wall-clock time (the machine is shared): the cosine
schedule then runs on the larger of the step fraction and the time fraction, and training stops when either
reaches 1, so a slow machine gets a complete (shorter) schedule rather than a truncated one. The steps
actually run are recorded in ``training_info.json``. ``--benchmark N`` times N training steps and exits.
See docs/flux_tiny_model.md for the measured run.

Usage::

    nice -n 10 python scripts/train_flux_tiny.py --threads 2 --time-budget-min 38     # the embedded model
    python scripts/train_flux_tiny.py --quick --output-dir /tmp/flux_tiny                # ~3-minute smoke run
    python scripts/train_flux_tiny.py --benchmark 5 --threads 2                          # step rate only
"""
from __future__ import annotations

import argparse
import importlib.util
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

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from transformers import T5Config, T5EncoderModel, T5TokenizerFast  # noqa: E402

from slimdiff_diffusers.default_model import DEFAULT_MODEL_DIR, FLUX_TINY_MODEL_DIR  # noqa: E402
from slimdiff_diffusers.default_model.evaluate import measure_adherence  # noqa: E402
from slimdiff_diffusers.default_model.prompts import HELDOUT_PROMPTS  # noqa: E402
from slimdiff_diffusers.evaluation.scenes import all_captions, render_dataset  # noqa: E402


def _import_default_trainer():
    """``scripts/train_default_model.py`` as a module (scripts/ is not a package): its helpers are shared."""
    spec = importlib.util.spec_from_file_location("train_default_model", Path(__file__).with_name("train_default_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sd = _import_default_trainer()
log = sd.log

IMAGE_SIZE = sd.IMAGE_SIZE  # 32
CLIP_MAX_LENGTH = sd.TEXT_MAX_LENGTH  # 32 (CLIP only gives the pooled vector to Flux)
T5_MAX_LENGTH = 16  # the longest grammar caption is 10 words + </s>
T5_WIDTH = 64
LATENT_GRID = IMAGE_SIZE // 2 // 2  # VAE factor 2, then Flux's 2x2 packing: 8x8 tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=FLUX_TINY_MODEL_DIR, help="pipeline folder to (re)write")
    parser.add_argument("--vae-from", type=Path, default=DEFAULT_MODEL_DIR, help="pipeline folder whose VAE is reused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=8000, help="rendered training scenes")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (upper bound with --time-budget-min)")
    parser.add_argument("--time-budget-min", type=float, default=0.0, help="wall-clock bound of the training stage")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--text-encoder-lr-scale", type=float, default=0.3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--device", default="cpu", help="torch device of the training and evaluation (cpu, cuda)")
    parser.add_argument("--eval-images-per-prompt", type=int, default=2, help="0 skips the held-out evaluation")
    parser.add_argument("--eval-guidance", type=float, default=4.0, help="true_cfg_scale of the held-out evaluation")
    parser.add_argument("--quick", action="store_true", help="a ~3-minute smoke run (fewer images and steps)")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N", help="time N training steps and exit")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images = min(args.num_images, 2000)
        args.steps = min(args.steps, 30)
        args.warmup_steps = min(args.warmup_steps, 5)
        args.batch_size = min(args.batch_size, 32)
        args.eval_images_per_prompt = min(args.eval_images_per_prompt, 1)
    return args


# ---------------------------------------------------------------------------------------------------------
# T5 tokenizer
# ---------------------------------------------------------------------------------------------------------
def build_t5_tokenizer(words: list[str], folder: Path) -> T5TokenizerFast:
    """A ``T5TokenizerFast`` (Unigram, ``▁`` word boundaries, ``</s>`` appended) with every word one piece.

    Pieces: T5's ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), ``▁``; each grammar word as ``▁word``; then
    every printable ASCII character alone and with ``▁``, at a much lower score, so that other words still
    tokenize character by character instead of to ``<unk>``. Saved with ``save_pretrained`` (tokenizer.json),
    reloaded from there and checked.
    """
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -1.0) for word in words]
    characters = [chr(code) for code in range(33, 127)]
    vocab += [(f"▁{char}", -8.0) for char in characters] + [(char, -10.0) for char in characters]
    seen: set[str] = set()
    vocab = [(piece, score) for piece, score in vocab if not (piece in seen or seen.add(piece))]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    tokenizer = T5TokenizerFast.from_pretrained(folder)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"T5 tokenizer: word {word!r} tokenizes to {ids}")
    if tokenizer("a red circle").input_ids[-1] != tokenizer.eos_token_id or tokenizer.pad_token_id != 0:
        raise RuntimeError("T5 tokenizer: expected </s> appended and <pad> = 0")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
def make_t5_encoder(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    """A T5 v1.1-style encoder (gated GELU, RMS layer norm, relative position buckets), 64 wide, 3 layers.

    T5 initialises token embeddings with std 1 (unlike CLIP's 0.02), which keeps words distinguishable while
    it is trained from scratch (see the default model card on why that matters).
    """
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_kv=16,
        d_ff=4 * T5_WIDTH,
        num_layers=3,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def make_transformer() -> FluxTransformer2DModel:
    """Flux's MMDiT at tiny width: 2 double-stream + 4 single-stream blocks, 3 heads of 32 (width 96).

    ``in_channels`` = 4 latent channels x 2x2 packing = 16; RoPE axes (8, 12, 12) split the head dimension
    over (text index, latent row, latent column) as Flux's (16, 56, 56) does for 128; QK-norm is Flux's
    RMSNorm. Text tokens come from T5 (``joint_attention_dim`` 64), the modulation vector from CLIP's pooled
    output (``pooled_projection_dim`` 64). No guidance embedding (schnell-style).
    """
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * sd.LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=3,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=sd.TEXT_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's scheduler configuration (dynamic shifting by image sequence length)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def training_shift(scheduler: FlowMatchEulerDiscreteScheduler) -> float:
    """``exp(mu)`` for 64 image tokens: the sigma shift the pipeline samples with, reused for training."""
    config = scheduler.config
    mu = calculate_shift(
        LATENT_GRID * LATENT_GRID, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
        config.max_shift,
    )
    return math.exp(mu)


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
class TextEncoders(torch.nn.Module):
    """CLIP pooled vector + T5 token sequence, exactly as ``FluxPipeline.encode_prompt`` computes them."""

    def __init__(self, clip: torch.nn.Module, t5: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.t5 = t5

    def forward(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.clip(clip_ids).pooler_output
        sequence = self.t5(t5_ids)[0]  # no attention mask: the pipeline passes none
        return pooled, sequence


def train_flow(
    transformer: FluxTransformer2DModel,
    encoders: TextEncoders,
    latent_means: torch.Tensor,
    latent_stds: torch.Tensor,
    clip_ids: torch.Tensor,
    t5_ids: torch.Tensor,
    empty_clip_ids: torch.Tensor,
    empty_t5_ids: torch.Tensor,
    shift: float,
    args: argparse.Namespace,
    max_steps: int,
) -> dict:
    """Rectified-flow training on cached (normalised) latents; leaves EMA weights in the models."""
    generator = torch.Generator().manual_seed(args.seed + 2)  # batches are drawn on the CPU on every device
    device = torch.device(args.device)
    transformer.to(device)
    encoders.to(device)
    parameters = list(transformer.parameters()) + list(encoders.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": list(transformer.parameters()), "lr_scale": 1.0},
            {"params": list(encoders.parameters()), "lr_scale": args.text_encoder_lr_scale},
        ],
        lr=args.lr,
        weight_decay=0.01,
    )
    ema = sd.EMA(parameters, args.ema_decay)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, LATENT_GRID, LATENT_GRID, device, torch.float32)
    txt_ids = torch.zeros(T5_MAX_LENGTH, 3, device=device)
    budget_s = args.time_budget_min * 60.0
    transformer.train()
    encoders.train()
    start = time.time()
    cpu_start = time.process_time()  # CPU seconds of all threads: the rate on dedicated cores, load aside
    running = None
    step = 0
    progress = 0.0
    history = []
    while step < max_steps and progress < 1.0:
        # Schedule position: the larger of the step fraction and the wall-clock fraction.
        elapsed = time.time() - start
        progress = step / max_steps if budget_s <= 0 else max(step / max_steps, elapsed / budget_s)
        if progress >= 1.0:
            break
        lr_scale = sd.cosine_lr(int(progress * max_steps), max_steps, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = group["lr_scale"] * args.lr * lr_scale
        index = torch.randint(len(latent_means), (args.batch_size,), generator=generator)
        x0 = latent_means[index] + latent_stds[index] * torch.randn(latent_means[index].shape, generator=generator)
        batch_clip, batch_t5 = clip_ids[index].clone(), t5_ids[index].clone()
        dropped = torch.rand(args.batch_size, generator=generator) < args.caption_dropout
        batch_clip[dropped] = empty_clip_ids
        batch_t5[dropped] = empty_t5_ids
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.sigmoid(torch.randn(args.batch_size, generator=generator))  # logit-normal(0, 1)
        sigmas = shift * u / (1.0 + (shift - 1.0) * u)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise
        target = noise - x0
        noisy, target, sigmas = noisy.to(device), target.to(device), sigmas.to(device)
        pooled, sequence = encoders(batch_clip.to(device), batch_t5.to(device))
        channels = x0.shape[1]
        packed = FluxPipeline._pack_latents(noisy, args.batch_size, channels, x0.shape[2], x0.shape[3])
        prediction = transformer(
            hidden_states=packed,
            timestep=sigmas,
            pooled_projections=pooled,
            encoder_hidden_states=sequence,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        packed_target = FluxPipeline._pack_latents(target, args.batch_size, channels, x0.shape[2], x0.shape[3])
        loss = F.mse_loss(prediction, packed_target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema.update()
        value = loss.detach()
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 50 == 0:
            elapsed = time.time() - start
            rate = (step + 1) * args.batch_size / max(elapsed, 1e-9)
            cpu_s = time.process_time() - cpu_start
            history.append({"step": step, "loss": round(float(running), 4), "elapsed_s": round(elapsed, 1),
                            "cpu_s": round(cpu_s, 1)})
            log(
                f"flow step {step:5d}/{max_steps}  v-mse {running:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"progress {progress:.2f}  ({elapsed:.0f}s, {rate:.1f} samples/s; {cpu_s:.0f} CPU s)"
            )
        step += 1
    elapsed = time.time() - start
    cpu_s = time.process_time() - cpu_start
    # On dedicated cores the wall time would be about the CPU time / threads (the estimate the card quotes).
    dedicated_rate = step * args.batch_size / max(cpu_s / args.threads, 1e-9)
    log(
        f"flow training stopped after {step} steps in {elapsed:.0f}s ({step * args.batch_size / elapsed:.1f} "
        f"samples/s wall; {cpu_s:.0f} CPU s over {args.threads} threads, i.e. ~{dedicated_rate:.1f} samples/s "
        "on dedicated cores)"
    )
    ema.copy_to_parameters()
    transformer.to("cpu").eval()
    encoders.to("cpu").eval()
    return {
        "v_mse": float(running) if running is not None else None,
        "steps_run": step,
        "samples_per_s": step * args.batch_size / elapsed if step else 0.0,
        "seconds": elapsed,
        "cpu_seconds": cpu_s,
        "samples_per_s_dedicated_cores_estimate": dedicated_rate,
        "loss_history": history,
    }


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------
def name_t5_tokenizer_fast(folder: Path) -> None:
    """Record ``tokenizer_2`` as ``T5TokenizerFast`` in ``model_index.json``, as FLUX.1's own folders do.

    transformers 5 makes ``T5TokenizerFast`` an alias of ``T5Tokenizer``, so ``save_pretrained`` writes the
    latter; under transformers 4 that name is the SentencePiece tokenizer, which needs a ``spiece.model`` this
    folder does not have, while ``T5TokenizerFast`` loads ``tokenizer.json`` under both.
    """
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_pipeline_atomically(pipe: FluxPipeline, clip_tokenizer_files: Path, args: argparse.Namespace, extra: dict) -> None:
    """Save to a temporary sibling folder, reload with stock ``FluxPipeline.from_pretrained``, smoke-test and
    evaluate the reloaded pipeline there, then swap it into ``args.output_dir``.

    The transformer is stored in fp16 (diffusers casts it back to fp32 on a plain ``from_pretrained``); the
    text encoders and the VAE stay fp32, since transformers loads a text encoder in its stored dtype.
    """
    output_dir = args.output_dir.resolve()
    temp_dir = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    old_dir = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
    if temp_dir.exists():
        shutil.rmtree(temp_dir)
    pipe.save_pretrained(temp_dir, safe_serialization=True)
    sd.rewrite_safetensors(
        temp_dir / "transformer" / "diffusion_pytorch_model.safetensors",
        lambda state: {key: value.to(torch.float16) for key, value in state.items()},
    )
    sd.rewrite_safetensors(  # CLIP keys in the text_model.-prefixed layout, as for the default model
        temp_dir / "text_encoder" / "model.safetensors",
        lambda state: {
            key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()
        },
    )
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(clip_tokenizer_files / name, temp_dir / "tokenizer" / name)
    name_t5_tokenizer_fast(temp_dir)

    reloaded = FluxPipeline.from_pretrained(temp_dir, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        dtype = next(getattr(reloaded, name).parameters()).dtype
        if dtype != torch.float32:
            raise RuntimeError(f"stock loading gives the {name} in {dtype}, expected float32")
    image = reloaded(
        "a red circle on the left", height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=2,
        max_sequence_length=T5_MAX_LENGTH, output_type="np",
    ).images[0]
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or not np.isfinite(image).all():
        raise RuntimeError(f"the saved pipeline does not generate a valid image (shape {image.shape})")

    summary = None
    if args.eval_images_per_prompt > 0:
        stage = time.time()
        summary, _, _ = measure_adherence(
            reloaded.to(args.device), HELDOUT_PROMPTS, images_per_prompt=args.eval_images_per_prompt, seed=1000,
            guidance_scale=args.eval_guidance, model="flux-tiny",  # its registry entry: size, T5 length, true CFG
        )
        extra["timings_s"]["eval_s"] = round(time.time() - stage, 1)
        log(
            f"held-out adherence of the saved pipeline (25 Euler steps, true CFG {args.eval_guidance}, "
            f"{args.eval_images_per_prompt} images per prompt): "
            f"{json.dumps({k: round(v, 3) for k, v in summary.items()})}"
        )
    extra["heldout_adherence"] = summary
    (temp_dir / "training_info.json").write_text(json.dumps(extra, indent=2) + "\n", encoding="utf-8")
    sd.publish_model_folder(temp_dir, output_dir, old_dir)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    timings: dict[str, float] = {}
    run_start = time.time()

    # 1. Data (held-out prompts never appear in training).
    stage = time.time()
    num_images = min(args.num_images, 256) if args.benchmark else args.num_images
    images_uint8, captions = render_dataset(num_images, seed=args.seed, exclude_captions=HELDOUT_PROMPTS)
    images = sd.images_to_tensor(images_uint8)
    timings["data_s"] = time.time() - stage
    log(f"rendered {len(captions)} scenes ({len(set(captions))} distinct captions) in {timings['data_s']:.0f}s")

    # 2. Tokenizers.
    work_dir = args.output_dir.resolve().parent / f".{args.output_dir.name}.work-{os.getpid()}"
    words = sorted({word for caption in all_captions() for word in caption.split()})
    clip_tokenizer = sd.build_tokenizer(words, work_dir / "clip_tokenizer_files")
    t5_tokenizer = build_t5_tokenizer(words, work_dir / "t5_tokenizer")
    log(f"tokenizers: CLIP {len(clip_tokenizer)} tokens (length {CLIP_MAX_LENGTH}), T5 {len(t5_tokenizer)} pieces (length {T5_MAX_LENGTH})")

    # 3. VAE (reused) and normalised latents.
    stage = time.time()
    vae = AutoencoderKL.from_pretrained(args.vae_from / "vae", dtype=torch.float32, local_files_only=True).eval()
    latent_means, latent_stds = sd.encode_images(vae, images)
    shift_factor = float(latent_means.mean())
    scaling_factor = float(1.0 / (latent_means - shift_factor).std())
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    latent_means = (latent_means - shift_factor) * scaling_factor
    latent_stds = latent_stds * scaling_factor
    timings["vae_encode_s"] = time.time() - stage
    log(f"encoded {len(images)} images in {timings['vae_encode_s']:.0f}s: shift_factor {shift_factor:.4f}, scaling_factor {scaling_factor:.4f}")

    # 4. Text encoders + transformer.
    clip_ids = clip_tokenizer(captions, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    t5_ids = t5_tokenizer(captions, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    empty_clip = clip_tokenizer([""], padding="max_length", max_length=CLIP_MAX_LENGTH, return_tensors="pt").input_ids[0]
    empty_t5 = t5_tokenizer([""], padding="max_length", max_length=T5_MAX_LENGTH, return_tensors="pt").input_ids[0]
    clip_encoder = sd.make_text_encoder(clip_tokenizer)
    t5_encoder = make_t5_encoder(t5_tokenizer)
    transformer = make_transformer()
    scheduler = make_scheduler()
    shift = training_shift(scheduler)
    log(
        f"transformer {sd.count_parameters(transformer):,} parameters; CLIP {sd.count_parameters(clip_encoder):,}; "
        f"T5 {sd.count_parameters(t5_encoder):,}; VAE {sd.count_parameters(vae):,}; training sigma shift {shift:.3f}"
    )
    encoders = TextEncoders(clip_encoder, t5_encoder)
    if args.benchmark:
        args.time_budget_min = 0.0
        stats = train_flow(transformer, encoders, latent_means, latent_stds, clip_ids, t5_ids, empty_clip, empty_t5,
                           shift, args, max_steps=args.benchmark + 1)
        log(f"benchmark: {stats['samples_per_s']:.1f} samples/s over {stats['steps_run']} steps of batch {args.batch_size} "
            f"with {args.threads} torch threads")
        shutil.rmtree(work_dir, ignore_errors=True)
        return
    stage = time.time()
    flow_stats = train_flow(transformer, encoders, latent_means, latent_stds, clip_ids, t5_ids, empty_clip, empty_t5,
                            shift, args, max_steps=args.steps)
    timings["flow_s"] = time.time() - stage
    timings["train_total_s"] = time.time() - run_start

    # 5. Pipeline.
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=t5_encoder, tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    extra = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": {
            "transformer": sd.count_parameters(transformer),
            "text_encoder (CLIP)": sd.count_parameters(clip_encoder),
            "text_encoder_2 (T5)": sd.count_parameters(t5_encoder),
            "vae": sd.count_parameters(vae),
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "torch_threads": args.threads,
        "vae": {"reused_from": "default model (sd-tiny)", "shift_factor": shift_factor, "scaling_factor": scaling_factor},
        "training_sigma_shift": shift,
        "flow": flow_stats,
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "transformers": __import__("transformers").__version__},
    }
    save_pipeline_atomically(pipe, work_dir / "clip_tokenizer_files", args, extra)
    shutil.rmtree(work_dir, ignore_errors=True)
    log(
        f"saved {args.output_dir} ({sd.folder_size_bytes(args.output_dir.resolve()) / 1e6:.1f} MB); "
        f"training wall time {timings['train_total_s'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
