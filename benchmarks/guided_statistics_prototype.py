"""Prototype measurement, not a feature: calibration statistics of the *guided* prediction under true CFG.

The sampler of a CFG model reads only ``ε_u + w (ε_c − ε_u)``, so a layer's weight error matters through the guided
combination of its inputs, ``g = x_u + w (x_c − x_u)`` (exact for a linear layer's own output; its bias passes
through once). flux-tiny runs true CFG as two denoiser calls per step (the conditional one first), so this script
pairs them: it patches the moment accumulators (``MomentAccumulator``, ``HeadBlockAccumulator``; with
``--mode guided_all`` also ``EnergyAccumulator``) to hold each conditional call's rows until the unconditional
call of the same step, then add

* ``guided`` / ``guided_all``: ``g`` instead of both calls' rows;
* ``blend``: both calls' rows and ``g``.

Everything else is benchmarks/quality.py, run with the arguments given after ``--mode`` (for instance the
validation protocol of decisions.md rows 22-32). The patches assume flux-tiny's call order; they are not for other
models. decisions.md row 32 says why this was not built into the calibrator.

``--mode guided_probe`` patches nothing either: the propagation probe's question (method.md §4.1) asked of each
stream of each block apart and of the guided prediction, with two perturbations of relative size 1e-2: isotropic
noise drawn for each call (the probe's own), and a weight-like one, ``dy = η·y·G/√d`` with the same Gaussian ``G``
in both calls of a CFG step (a slimmed layer's error is a linear map of its input). It writes each factor per
call and guided, for the next allocation experiment (decisions.md row 34).

``--mode guided_error`` patches nothing: it measures, on the original model's trajectories of 8 validation prompts
(calibration prompts 32-39, seeds 0-7), how the default slim model's errors of the two calls of each step combine
in the guided prediction (per-call and guided relative error, the correlation of the two calls' errors), at keep
0.8 and 0.6 and for both ``ffn_selection`` values, and writes ``--out``.

    PYTHONPATH=. python benchmarks/guided_statistics_prototype.py --mode blend --model flux_tiny \\
        --eval-set validation --eval-seeds 2 --methods slimdiff --threads 1 \\
        --out benchmarks/results/logs/guided_statistics_blend_validation_flux_tiny.json
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import slimdiff_diffusers.core.calibrator as calibrator_module  # noqa: E402
from slimdiff_diffusers.core import moments  # noqa: E402

GUIDANCE = 4.0  # flux-tiny's true CFG scale (its registry entry)


def install(mode: str) -> dict:
    """Patch the accumulators for ``mode``; returns the pairing state (calls seen, rows still waiting)."""
    state: dict = {"conditional": True, "waiting": {}, "calls": 0}
    on_root_call = calibrator_module.Calibrator._on_root_call

    def root(self, module, args, kwargs):
        on_root_call(self, module, args, kwargs)
        state["conditional"] = self.num_forward_calls % 2 == 1  # calls 1, 3, 5, ...: the conditional ones
        state["calls"] += 1
    calibrator_module.Calibrator._on_root_call = root

    def paired(add):
        def wrapped(self, x, *args, **kwargs):
            if state["conditional"]:
                state["waiting"][id(self)] = x.detach().clone()
                return add(self, x, *args, **kwargs) if mode == "blend" else None
            conditional = state["waiting"].pop(id(self))
            if conditional.shape != x.shape:
                raise RuntimeError("the two calls of a CFG step did not pair up")
            if mode == "blend":
                add(self, x, *args, **kwargs)
            return add(self, x + GUIDANCE * (conditional - x), *args, **kwargs)
        return wrapped

    classes = [moments.MomentAccumulator, moments.HeadBlockAccumulator]
    if mode == "guided_all":
        classes.append(moments.EnergyAccumulator)
    for cls in classes:
        cls.add = paired(cls.add)
    return state


@torch.no_grad()
def guided_error(out: Path) -> None:
    import slimdiff_diffusers as sd
    from benchmarks import quality
    from benchmarks.common import machine_info, write_json
    from slimdiff_diffusers.default_model import get_embedded_model
    from slimdiff_diffusers.default_model.prompts import CALIBRATION_PROMPTS

    torch.set_num_threads(1)
    args = argparse.Namespace(model="flux_tiny", eval_set="validation", cal_samples=32, eval_samples=1, eval_seeds=1,
                              steps=None, pipeline_dir=None, threads=1)
    workload = quality.WORKLOADS["flux_tiny"](args)
    calibration = workload.calibrate(32, False)
    embedded = get_embedded_model("flux-tiny")
    pipe = embedded.load()
    calls: list = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append((a, dict(kw))), with_kwargs=True)
    pipe(prompt=list(CALIBRATION_PROMPTS[32:40]), generator=[torch.Generator().manual_seed(s) for s in range(8)],
         output_type="latent", **embedded.generation_kwargs())
    hook.remove()

    def run(model, a, kw):
        return model(*a, **{**kw, "return_dict": False})[0]

    rows = []
    for keep in (0.8, 0.6):
        for selection in ("leverage", "greedy"):
            slim = sd.slim(workload.model, calibration, sd.SlimConfig(keep_ratio=keep, ffn_selection=selection))
            sums = dict.fromkeys(("e_c", "e_u", "e_cu", "e_g", "o_c", "o_g"), 0.0)
            for (a_c, kw_c), (a_u, kw_u) in zip(calls[0::2], calls[1::2]):  # conditional call first
                o_c, o_u = run(workload.model, a_c, kw_c), run(workload.model, a_u, kw_u)
                e_c, e_u = run(slim, a_c, kw_c) - o_c, run(slim, a_u, kw_u) - o_u
                guided, e_g = o_u + GUIDANCE * (o_c - o_u), e_u + GUIDANCE * (e_c - e_u)
                for key, value in (("e_c", e_c * e_c), ("e_u", e_u * e_u), ("e_cu", e_c * e_u), ("e_g", e_g * e_g),
                                   ("o_c", o_c * o_c), ("o_g", guided * guided)):
                    sums[key] += float(value.double().sum())
            rows.append({"keep_ratio": keep, "ffn_selection": selection,
                         "rel_error_conditional": (sums["e_c"] / sums["o_c"]) ** 0.5,
                         "rel_error_guided": (sums["e_g"] / sums["o_g"]) ** 0.5,
                         "error_correlation": sums["e_cu"] / (sums["e_c"] * sums["e_u"]) ** 0.5})
            print(rows[-1], flush=True)
    write_json(out, {"benchmark": "guided_error", "command": "python benchmarks/guided_statistics_prototype.py "
                     "--mode guided_error", "machine": machine_info(), "guidance": GUIDANCE,
                     "prompts": "calibration prompts 32-39 (validation), seeds 0-7, the registry's sampler",
                     "rows": rows})
    print(f"wrote {out}")


@torch.no_grad()
def guided_probe(out: Path, noise: float = 1e-2) -> None:
    from benchmarks.common import machine_info, write_json
    from slimdiff_diffusers.core.propagation import first_tensor
    from slimdiff_diffusers.default_model import get_embedded_model
    from slimdiff_diffusers.default_model.prompts import CALIBRATION_PROMPTS

    torch.set_num_threads(1)
    embedded = get_embedded_model("flux-tiny")
    pipe = embedded.load()
    model = pipe.transformer
    calls: list = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    pipe(prompt=list(CALIBRATION_PROMPTS[:8]), generator=[torch.Generator().manual_seed(s) for s in range(8)],
         output_type="latent", **embedded.generation_kwargs())  # calibration prompts 0-7, as calibration sees them
    hook.remove()
    pairs = list(zip(calls[0::2], calls[1::2]))[::3]  # (conditional, unconditional) of every third step

    def run(kwargs: dict) -> torch.Tensor:
        return first_tensor(model(**kwargs)).float()
    clean = [(run(c), run(u)) for c, u in pairs]
    width = model.config.num_attention_heads * model.config.attention_head_dim
    rows = []
    blocks = [name for name, _ in model.named_modules() if re.fullmatch(r"(single_)?transformer_blocks\.\d+", name)]
    for block in blocks:
        module = model.get_submodule(block)
        joint = not block.startswith("single_")
        for stream in (("image", "text") if joint else ("both",)):
            for kind in ("isotropic", "weight_like"):
                state: dict = {}

                def perturb(y: torch.Tensor) -> torch.Tensor:
                    if kind == "weight_like":
                        return y + noise * (y @ state["G"]) / width ** 0.5
                    n = torch.randn(y.shape, generator=state["gen"])
                    return y + noise * n * y.norm() / n.norm()

                def hook(_m, _args, output, stream=stream):
                    text, image = output  # diffusers' Flux blocks return (encoder_hidden_states, hidden_states)
                    return (perturb(text) if stream in ("text", "both") else text,
                            perturb(image) if stream in ("image", "both") else image)
                handle = module.register_forward_hook(hook)
                per_call, guided = [], []
                for i, ((c, u), (o_c, o_u)) in enumerate(zip(pairs, clean)):
                    state["G"] = torch.randn(width, width, generator=torch.Generator().manual_seed(i))
                    state["gen"] = torch.Generator().manual_seed(1000 + i)
                    p_c, p_u = run(c), run(u)
                    per_call.append(float((p_c - o_c).norm() / o_c.norm()))
                    g, p_g = o_u + GUIDANCE * (o_c - o_u), p_u + GUIDANCE * (p_c - p_u)
                    guided.append(float((p_g - g).norm() / g.norm()))
                handle.remove()
                rows.append({"block": block, "stream": stream, "perturbation": kind,
                             "pi_per_call": sum(per_call) / len(per_call) / noise,
                             "pi_guided": sum(guided) / len(guided) / noise})
                print(rows[-1], flush=True)
    write_json(out, {"benchmark": "guided_probe", "command": "python benchmarks/guided_statistics_prototype.py "
                     "--mode guided_probe", "machine": machine_info(), "guidance": GUIDANCE, "noise": noise,
                     "calls": f"{len(pairs)} (conditional, unconditional) pairs: calibration prompts 0-7, seeds "
                              "0-7, every third step", "rows": rows})
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["guided", "guided_all", "blend", "guided_error", "guided_probe"],
                        required=True)
    args, rest = parser.parse_known_args()
    if args.mode in ("guided_error", "guided_probe"):
        out = Path(rest[rest.index("--out") + 1]) if "--out" in rest else \
            ROOT / "benchmarks" / "results" / "logs" / f"{args.mode}_flux_tiny.json"
        (guided_error if args.mode == "guided_error" else guided_probe)(out)
        return
    if "--model" not in rest or rest[rest.index("--model") + 1] != "flux_tiny":
        raise SystemExit("the pairing assumes flux-tiny's true CFG call order: pass --model flux_tiny")
    state = install(args.mode)
    from benchmarks import quality

    quality.main(rest)
    if state["waiting"]:
        raise RuntimeError(f"{len(state['waiting'])} conditional calls were never paired")
    print(f"{args.mode}: {state['calls']} calibration calls paired")


if __name__ == "__main__":
    main()
