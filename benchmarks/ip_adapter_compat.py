"""IP-Adapter on slim models (issue 12): its effect on a slim UNet against its effect on the original.

The embedded default model gets a locally made IP-Adapter: `to_k_ip`/`to_v_ip` start from each cross-attention's
`to_k`/`to_v` (how IP-Adapter training initialises them) plus noise, and a random image projection (seeded).
For each budget the UNet is slimmed twice:

- cross-attention slimmed (the default, the *mapped* mode): the adapter's `to_k_ip`/`to_v_ip` are mapped into the
  slim cross-attention's key and value bases on load (`diffusers_adapter/ip_adapter.py`);
- cross-attention left whole (`adapter_compatible=True`, the *compatible* mode): the adapter loads as on a stock UNet.

The adapter's effect is eps(with image) - eps(without) on held-out prompts, random latents and several
timesteps; the reported figure is ||effect_slim - effect_original|| / ||effect_original|| (the acceptance bound
is 25% in the compatible mode; the mapped mode is measured), next to the slim model's own noise-prediction error ||eps_slim - eps_original|| / ||eps_original||.

    python benchmarks/ip_adapter_compat.py --keep 1.0 0.8 0.6 0.4 --calibration /tmp/ip_cal.safetensors
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import slimdiff_diffusers as sd  # noqa: E402
from benchmarks.common import machine_info, write_json  # noqa: E402
from slimdiff_diffusers.default_model import CALIBRATION_PROMPTS, HELDOUT_PROMPTS, load_default_pipeline  # noqa: E402
from slimdiff_diffusers.diffusers_adapter.pipeline import calibrate_pipeline  # noqa: E402
from slimdiff_diffusers.diffusers_adapter.slimset import SlimSet  # noqa: E402

IMAGE_EMBED_DIM = 32


def make_ip_adapter(unet, seed: int = 0, noise: float = 0.5) -> dict:
    """An IP-Adapter state dict in diffusers' `_load_ip_adapter_weights` layout, made here (no Hub)."""
    gen = torch.Generator().manual_seed(seed)
    cross_dim = unet.config.cross_attention_dim
    ip, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        for short, layer in (("k", attn.to_k), ("v", attn.to_v)):
            w = layer.weight.detach().float()
            ip[f"{key_id}.to_{short}_ip.weight"] = w + noise * w.std() * torch.randn(w.shape, generator=gen)
        key_id += 2
    proj = {"proj.weight": torch.randn(4 * cross_dim, IMAGE_EMBED_DIM, generator=gen) * IMAGE_EMBED_DIM ** -0.5,
            "proj.bias": torch.zeros(4 * cross_dim), "norm.weight": torch.ones(cross_dim),
            "norm.bias": torch.zeros(cross_dim)}
    return {"image_proj": proj, "ip_adapter": ip}


@torch.no_grad()
def noise_predictions(unet, cases, image_embeds=None) -> torch.Tensor:
    outs = []
    for latents, t, context in cases:
        kwargs = {"added_cond_kwargs": {"image_embeds": [image_embeds]}} if image_embeds is not None else {}
        outs.append(unet(latents, t, encoder_hidden_states=context, **kwargs).sample)
    return torch.cat(outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    parser.add_argument("--calibration-prompts", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--calibration", default=None,
                        help="a calibration file: read if it exists, else written after calibrating (reruns skip it)")
    parser.add_argument("--out", default="benchmarks/results/ip_adapter_default.json")
    args = parser.parse_args()
    torch.manual_seed(0)

    pipe = load_default_pipeline()
    original = pipe.unet
    started = time.perf_counter()
    n = args.calibration_prompts
    if args.calibration and Path(args.calibration).exists():
        calibration = sd.Calibration.load(args.calibration)
        calibration.check_compatible(original)
    else:
        calibration = calibrate_pipeline(pipe, SlimSet(list(CALIBRATION_PROMPTS[:n]), list(range(n))),
                                         num_inference_steps=args.steps, guidance_scale=7.5, progress=False)
        if args.calibration:
            calibration.save(args.calibration)
    calibration_seconds = time.perf_counter() - started

    prompts = list(HELDOUT_PROMPTS[: args.eval_prompts])
    context, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    gen = torch.Generator().manual_seed(1)
    size = original.config.sample_size
    cases = [(torch.randn(len(prompts), 4, size, size, generator=gen), t, context) for t in (900, 600, 300, 100)]
    image_embeds = torch.randn(len(prompts), 1, IMAGE_EMBED_DIM, generator=gen)
    adapter = make_ip_adapter(original)

    def with_adapter(unet):
        unet = copy.deepcopy(unet)
        unet._load_ip_adapter_weights(copy.deepcopy(adapter))
        return unet

    eps_orig = noise_predictions(original, cases)
    effect_orig = noise_predictions(with_adapter(original), cases, image_embeds) - eps_orig
    rows = []
    cache: dict = {}
    for keep in args.keep:
        row: dict = {"keep_ratio": keep}
        for mode, options in (("mapped", {}), ("compatible", {"adapter_compatible": True})):
            slim = sd.slim(original, calibration, keep_ratio=keep, decomposition_cache=cache, **options)
            eps_slim = noise_predictions(slim, cases)
            effect_slim = noise_predictions(with_adapter(slim), cases, image_embeds) - eps_slim
            report = slim.slimdiff_report
            row[mode] = {
                "params_kept_vs_original": report.params_after / report.params_before,
                "cross_attention_slimmed": sum(p.endswith("attn2") for p in slim.slimdiff_spec.attention),
                "slim_eps_rel_error": ((eps_slim - eps_orig).norm() / eps_orig.norm()).item(),
                "adapter_effect_rel_difference": ((effect_slim - effect_orig).norm() / effect_orig.norm()).item(),
            }
            del slim
        row["adapter_effect_rel_norm"] = (effect_orig.norm() / eps_orig.norm()).item()
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, {
        "benchmark": "ip_adapter_compat", "command": "python " + " ".join(sys.argv), "model": "embedded default model", "machine": machine_info(),
        "settings": {"calibration_prompts": n, "steps": args.steps, "eval_prompts": len(prompts),
                     "timesteps": [900, 600, 300, 100], "compatible_mode": "adapter_compatible=True",
                     "mapped_mode": "cross-attention slimmed, to_k_ip/to_v_ip through the slim to_k/to_v basis maps",
                     "adapter": "to_k_ip/to_v_ip = to_k/to_v + 0.5 std noise, random image projection, seed 0"},
        "calibration_seconds": round(calibration_seconds, 1), "results": rows})


if __name__ == "__main__":
    main()
