"""SlimSet: a small, diverse calibration prompt set (method.md §1).

The prompts of a pool are embedded with the pipeline's own text encoder, clustered with k-means into N
clusters, and the prompt nearest each centroid is kept, each paired with a fixed seed. ``method="random"`` is
the ablation (N prompts drawn at random).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import torch

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


@torch.no_grad()
def embed_prompts(pipe, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden state of the pipeline's text encoder, L2-normalised (fp32, CPU)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    device = encoder.device
    out = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i:i + batch_size], padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length, return_tensors="pt")
        hidden = encoder(tokens.input_ids.to(device))[0].float()
        mask = tokens.attention_mask.to(device)[..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def build_slimset(pipe, num_prompts: int = 500, pool: list[str] | None = None, method: str = "kmeans",
                  seed: int = 0) -> SlimSet:
    """Select ``num_prompts`` calibration prompts from ``pool`` (default: the shipped pool).

    Args:
        pipe: a text-to-image pipeline with ``tokenizer`` and ``text_encoder`` (used by ``method="kmeans"``).
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
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
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
