"""Write slimdiff_diffusers/data/slimset_pool.txt: the default pool the SlimSet is selected from.

No prompt dataset can be downloaded at run time, so the package ships its own pool: diverse text-to-image
prompts composed from subjects, scenes, styles and lighting (deterministic, seeded). The SlimSet builder
(`slimdiff_diffusers.build_slimset`) embeds the pool with the pipeline's own text encoder and keeps the
prompt nearest each k-means centroid.

    python scripts/make_slimset_pool.py
"""
from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = [
    "a portrait of an old fisherman", "a young woman reading a book", "a red fox in the snow", "a golden retriever puppy",
    "a majestic lion", "a hummingbird drinking nectar", "a steam locomotive", "a vintage sports car", "a sailing ship",
    "a futuristic city skyline", "a medieval castle", "a cozy wooden cabin", "a lighthouse on a cliff",
    "a bowl of ramen", "a stack of pancakes with berries", "a cup of coffee with latte art", "a bouquet of sunflowers",
    "a cherry blossom tree", "an astronaut floating in space", "a knight in shining armor", "a samurai warrior",
    "a robot made of brass", "a dragon perched on a mountain", "a wizard casting a spell", "a cat wearing sunglasses",
    "an owl on a branch", "a herd of elephants", "a jellyfish glowing in the deep sea", "a coral reef with fish",
    "a mountain lake at dawn", "a desert with sand dunes", "a waterfall in a rainforest", "a snowy pine forest",
    "a busy street market", "a quiet library", "a modern kitchen interior", "a bedroom with large windows",
    "a chess board mid-game", "a violin on a velvet cloth", "a pair of running shoes", "a wristwatch close-up",
    "a child flying a kite", "two friends laughing at a cafe", "a chef cooking in a restaurant kitchen",
    "a ballerina on stage", "a surfer riding a wave", "a mountain climber on a ridge", "a farmer in a wheat field",
    "a bridge over a river", "a windmill in a tulip field", "an abandoned factory", "a neon-lit alley at night",
    "a spaceship landing on a red planet", "a treehouse in a giant oak", "a floating island with waterfalls",
    "a teddy bear on a bed", "a glass of red wine", "a plate of sushi", "a loaf of sourdough bread",
]
SETTINGS = [
    "", "at sunset", "at night", "in the rain", "in the fog", "under a starry sky", "in winter", "in spring",
    "on a sunny afternoon", "in a misty morning", "by the sea", "in the city", "in the countryside", "indoors",
]
STYLES = [
    "", "photorealistic", "oil painting", "watercolor", "pencil sketch", "digital art", "anime style",
    "3d render", "studio photograph", "cinematic still", "pixel art", "impressionist painting", "ukiyo-e print",
    "low poly", "concept art", "charcoal drawing", "vintage photograph", "isometric illustration",
]
DETAILS = [
    "", "highly detailed", "soft lighting", "dramatic lighting", "vibrant colors", "muted colors", "wide angle",
    "close-up", "bokeh", "8k", "minimalist", "golden hour light", "symmetrical composition", "black and white",
]


def build_pool(size: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool: set[str] = set()
    while len(pool) < size:
        parts = [rng.choice(SUBJECTS), rng.choice(SETTINGS)]
        text = " ".join(p for p in parts if p)
        extras = [p for p in (rng.choice(STYLES), rng.choice(DETAILS)) if p]
        pool.add(", ".join([text, *extras]))
    return sorted(pool)


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "slimdiff_diffusers" / "data" / "slimset_pool.txt"
    out.write_text("\n".join(build_pool()) + "\n")
    print(f"wrote {out}")
