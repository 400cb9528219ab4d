"""SlimSet: a small, diverse calibration prompt set (method.md §1).

The prompts of a pool are embedded with the pipeline's own text encoder(s) (:func:`embed_prompts`), clustered with k-means into N
clusters, and the prompt nearest each centroid is kept, each paired with a fixed seed. ``method="random"`` is
the ablation (N prompts drawn at random).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import torch

from ..core.errors import ConfigError

logger = logging.getLogger("slimdiff")


@dataclass
class SlimSet:
    """Calibration prompts with one seed each."""

    prompts: list[str]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.prompts)


def default_prompt_pool() -> list[str]:
    """The pool shipped with the package (2000 diverse text-to-image prompts; see scripts/make_slimset_pool.py)."""
    text = resources.files("slimdiff_diffusers").joinpath("data/slimset_pool.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def kmeans(x: torch.Tensor, k: int, iterations: int = 50, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding. Returns the (k, d) centroids."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    centroids = [x[torch.randint(n, (1,), generator=gen)].squeeze(0)]
    dist = (x - centroids[0]).pow(2).sum(1)
    for _ in range(1, k):
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1.0 / n)
        idx = torch.multinomial(probs, 1, generator=gen)
        centroids.append(x[idx].squeeze(0))
        dist = torch.minimum(dist, (x - centroids[-1]).pow(2).sum(1))
    c = torch.stack(centroids)
    for _ in range(iterations):
        assign = torch.cdist(x, c).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    return c


_TEXT_ENCODER_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))


def text_encoders(pipe) -> list[tuple[str, object, torch.nn.Module]]:
    """``(name, tokenizer, encoder)`` of every text encoder the pipeline has, in component order (SD: CLIP;
    SDXL/SD3: two CLIPs (+ T5); Flux: CLIP + T5; PixArt, LTX-Video: T5; Wan: UMT5; HunyuanDiT: BERT + mT5;
    Sana-style pipelines and CogView4: one decoder LM (Gemma, GLM); Qwen-Image: the Qwen2.5-VL language model)."""
    found = []
    for tok_name, enc_name in _TEXT_ENCODER_PAIRS:
        tokenizer, encoder = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
        if tokenizer is not None and encoder is not None:
            found.append((enc_name, tokenizer, encoder))
    return found


def _max_length(tokenizer) -> int:
    # T5/Gemma tokenizers saved without a limit report a huge model_max_length; no prompt of a pool needs more
    # than 128 tokens to be told apart (pipelines use 77 for CLIP, 120-512 for T5).
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit <= 128 else 128


def _hidden_state_model(encoder: torch.nn.Module) -> torch.nn.Module:
    """The part of ``encoder`` whose output is the last hidden state: a language model with a head (Qwen-Image's
    ``Qwen2_5_VLForConditionalGeneration``, a ``*ForCausalLM``) answers with logits over its vocabulary, so its
    base model (transformers' ``base_model``, e.g. ``Qwen2_5_VLModel``) is called instead, which also skips the
    vocabulary projection. Encoders without a head (CLIP, T5, UMT5, BERT, GLM, Gemma) are their own base model."""
    base = getattr(encoder, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else encoder


@torch.no_grad()
def _embed_with(tokenizer, encoder: torch.nn.Module, prompts: list[str], batch_size: int) -> torch.Tensor:
    """Mean of the encoder's last hidden state over the prompt's tokens (padding excluded), L2-normalised."""
    device = next(encoder.parameters()).device
    # CLIP is causal (a prompt's tokens never see the padding after them) and pipelines call it without a mask;
    # bidirectional encoders (T5) and decoder LMs get the mask, so padding does not leak into the tokens.
    use_mask = "CLIPText" not in type(encoder).__name__
    encoder = _hidden_state_model(encoder)
    # A tokenizer without a padding token cannot pad a batch: one prompt per call then (same result, slower).
    if getattr(tokenizer, "pad_token", None) is None:
        batch_size = 1
    out = []
    for i in range(0, len(prompts), batch_size):
        padding = "max_length" if batch_size > 1 else False
        tokens = tokenizer(prompts[i:i + batch_size], padding=padding, truncation=True,
                           max_length=_max_length(tokenizer), return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        output = encoder(tokens.input_ids.to(device), attention_mask=mask) if use_mask else \
            encoder(tokens.input_ids.to(device))
        hidden = getattr(output, "last_hidden_state", None)  # CLIPTextModelWithProjection: [0] is the projection
        hidden = (output[0] if hidden is None else hidden).float()
        weights = mask[..., None].float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def embed_prompts(pipe, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Prompt embeddings for the SlimSet selection (fp32, CPU), from the pipeline's own text encoder(s).

    Each encoder contributes the L2-normalised mean of its last hidden state over the prompt's tokens (CLIP,
    T5, BERT, a decoder LM alike; of a language model with a head, its base model's); with several encoders
    (SD3, Flux, HunyuanDiT) the parts are concatenated with equal weight and the result is normalised again, so
    the clustering sees every conditioning the denoiser gets. The prompt is embedded as it is: a pipeline's own
    prompt template (Qwen-Image's system prompt) or layer choice (CogView4's second-to-last) are not reproduced,
    since only the prompts' relative positions matter for the selection.
    """
    encoders = text_encoders(pipe)
    if not encoders:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer + text encoder pair; use method='random'")
    parts = []
    for name, tokenizer, encoder in encoders:
        try:
            parts.append(_embed_with(tokenizer, encoder, prompts, batch_size))
        except Exception as exc:  # an encoder this generic call does not fit: say which, and the way around it
            raise ConfigError(f"the k-means SlimSet selection could not embed the prompt pool with "
                              f"{type(pipe).__name__}.{name} ({type(encoder).__name__}, tokenizer {type(tokenizer).__name__}): "
                              f"{type(exc).__name__}: {exc}. Pass selection='random' (`slimdiff`: "
                              "--num-prompts equal to the pool size uses every prompt)") from exc
    if len(parts) == 1:
        return parts[0]
    return torch.nn.functional.normalize(torch.cat(parts, dim=1), dim=-1)


def build_slimset(pipe, num_prompts: int = 500, pool: list[str] | None = None, method: str = "kmeans",
                  seed: int = 0) -> SlimSet:
    """Select ``num_prompts`` calibration prompts from ``pool`` (default: the shipped pool).

    Args:
        pipe: a text-to-image pipeline; ``method="kmeans"`` embeds the pool with its text encoder(s)
            (:func:`embed_prompts`).
        num_prompts: size N of the SlimSet (500 in the paper). Capped at the pool size.
        pool: candidate prompts; empty strings are ignored.
        method: ``"kmeans"`` (nearest prompt to each centroid) or ``"random"``.
        seed: seeds the clustering/random choice; prompt i gets sampling seed ``seed + i``.
    """
    pool = [p for p in (pool if pool is not None else default_prompt_pool()) if p and p.strip()]
    if not pool:
        raise ValueError("the prompt pool is empty: give at least one non-empty prompt")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    n = min(num_prompts, len(pool))
    if n == len(pool):
        chosen = list(pool)
    elif method == "random":
        gen = torch.Generator().manual_seed(seed)
        chosen = [pool[i] for i in torch.randperm(len(pool), generator=gen)[:n].tolist()]
    elif method == "kmeans":
        if not text_encoders(pipe):
            raise ValueError("k-means SlimSet selection needs a pipeline with a text encoder; use method='random'")
        emb = embed_prompts(pipe, pool)
        centroids = kmeans(emb, n, seed=seed)
        nearest = torch.cdist(centroids, emb).argsort(1)
        taken: set[int] = set()
        for row in nearest.tolist():  # nearest not-yet-taken prompt per centroid, so the set has no duplicates
            taken.add(next(i for i in row if i not in taken))
        chosen = [pool[i] for i in sorted(taken)]
    else:
        raise ValueError(f"method must be 'kmeans' or 'random', got {method!r}")
    logger.info("SlimSet: %d prompts selected from a pool of %d (%s)", len(chosen), len(pool), method)
    return SlimSet(prompts=chosen, seeds=[seed + i for i in range(len(chosen))])
