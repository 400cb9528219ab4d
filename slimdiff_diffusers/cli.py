"""The ``slimdiff`` command: slim a pipeline and report size, speed and quality.

    slimdiff slim [MODEL] --keep-ratio 0.6 --out runs/slim      # MODEL: embedded name, Hub id or local folder
                                                                # (SD/SDXL UNets; Flux, SD3/3.5, PixArt transformers)
    slimdiff slim flux-tiny --out runs/flux-slim                  # embedded models: sd-tiny (default), flux-tiny
    slimdiff calibrate [MODEL] --out calibration.safetensors     # reusable statistics
    slimdiff eval ORIGINAL SLIM --prompts prompts.txt             # compare two saved pipelines
    slimdiff push runs/slim me/model-slim                         # upload an output folder to the Hub
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .cli_runtime import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    AtomicFolder,
    CLIError,
    OutputLock,
    QuietConsole,
    Terminated,
    signals_as_exceptions,
)

logger = logging.getLogger("slimdiff")

DEFAULT_MODEL = "embedded default model"
EMBEDDED_NUM_PROMPTS = 128
DEFAULT_STEPS = 25


# --------------------------------------------------------------------------------------------------
# Loading models and prompts
# --------------------------------------------------------------------------------------------------


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[name]


def resolve_model(model: str | None):
    """``None`` (the default embedded model), an embedded model (by name: an ``EmbeddedModel``), a local pipeline
    folder, or a Hub repo id; checked before anything is loaded.

    Embedded names (``slimdiff slim --help`` lists them) come first; write ``./flux-tiny`` for a folder of that name.

    A path that does not exist is reported as a missing folder when it can only be a path (``./x``, ``/x``,
    ``~/x``, more than one ``/``, not a valid repo id, or its parent folder exists here, as in ``models/mine``).
    """
    if model is None:
        return None
    embedded = _embedded_model(model)
    if embedded is not None:
        return embedded
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{path} is a file; MODEL is a diffusers pipeline folder (with model_index.json) or a "
                           "Hub repo id")
        if not (path / "model_index.json").is_file():
            raise CLIError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return path
    if _can_only_be_a_path(model):
        raise CLIError(f"model folder not found: {path} (looked in {Path.cwd()}); check the path")
    return model


def _embedded_model(model: str | None):
    """The registry entry when ``model`` is an embedded model's name, else ``None``."""
    from .default_model import EMBEDDED_MODELS

    return EMBEDDED_MODELS.get(model) if model is not None else None


def _embedded_entry(model: str | None):
    """The registry entry of the model a command runs: the default embedded model for ``None``, an embedded
    model by name, else ``None`` (a Hub id or a folder)."""
    from .default_model import get_embedded_model

    return get_embedded_model(None) if model is None else _embedded_model(model)


def _embedded_help() -> str:
    from .default_model import DEFAULT_MODEL_NAME, EMBEDDED_MODELS

    return "; ".join(f"{m.name}{' (default)' if m.name == DEFAULT_MODEL_NAME else ''}: {m.description}"
                     for m in EMBEDDED_MODELS.values())


def _can_only_be_a_path(model: str) -> bool:
    if model.startswith((".", "/", "~")) or "\\" in model or model.count("/") != 1:
        return True
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(model)
    except Exception:  # HFValidationError: not a repo id, so a path
        return True
    return Path(model).parent.is_dir()  # "models/mine" where ./models exists: a missing subfolder


def load_pipeline(model: str | Path | None, dtype: str = "float32", device: str = "cpu"):
    """The embedded default pipeline, a local folder, or a Hub repo id (with a clear error when unreachable)."""
    from diffusers import DiffusionPipeline

    from .default_model import EmbeddedModel, load_default_pipeline

    if not isinstance(model, EmbeddedModel):
        model = resolve_model(str(model) if model is not None else None)
    if model is None:
        return load_default_pipeline(torch_dtype=_dtype(dtype), device=device)
    if isinstance(model, EmbeddedModel):
        return model.load(torch_dtype=_dtype(dtype), device=device)
    if isinstance(model, Path):
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=_dtype(dtype))
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=_dtype(dtype))
        except Exception as exc:  # huggingface_hub raises several types when offline or unreachable
            raise CLIError(f"no local folder {model!r} here ({Path.cwd()}), and {model!r} could not be loaded from "
                           f"the Hugging Face Hub ({type(exc).__name__}: {_one_line(str(exc), 200)}). If you meant a "
                           "local folder, check the path; if you are offline, pass a local folder with the pipeline "
                           "(e.g. one saved with save_pretrained or a downloaded snapshot) instead of a repo id."
                           ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def denoiser_of(pipe) -> tuple[str, Any]:
    """``(component name, model)`` of the pipeline's denoiser: its ``unet`` or its ``transformer``; a pipeline
    with neither, or with two (Wan 2.2's experts), is refused before any work
    (:func:`~.diffusers_adapter.pipeline.denoiser_component`)."""
    from .diffusers_adapter.pipeline import denoiser_component

    name = denoiser_component(pipe)
    return name, getattr(pipe, name)


def check_image_pipeline(pipe) -> None:
    """Refuse a video pipeline (one whose call takes ``num_frames``: Wan, LTX-Video) before any work: `slimdiff
    slim` and `slimdiff eval` compare pipelines on images (PSNR, SSIM, a picture grid) and have no frame options. Such
    pipelines are slimmed in Python: ``pipe.slim(..., call_kwargs={"num_frames": ...})``."""
    import inspect

    if "num_frames" in inspect.signature(type(pipe).__call__).parameters:
        raise CLIError(f"{type(pipe).__name__} generates video; `slimdiff slim` evaluates images and has no frame "
                       "options. Slim it in Python: sd.enable_slimdiff(pipe).slim(keep_ratio=..., height=..., "
                       "width=..., call_kwargs={'num_frames': ...}), then pipe.save_pretrained(...)")


def family_name(denoiser) -> str:
    """What reports call the denoiser: "UNet", "Flux transformer", ... (its class name when SlimDiff has no
    Slim* class for it)."""
    from .diffusers_adapter.models import family_of

    family = family_of(denoiser)
    if family is None:
        return type(denoiser).__name__
    return family.family if family.component == "unet" else f"{family.family} {family.component}"


def _call_kwargs(args: argparse.Namespace, pipe) -> dict[str, Any]:
    """Pipeline call arguments only some pipelines have (--max-sequence-length: the T5 pipelines;
    ``use_resolution_binning``: PixArt, see :func:`_resolution_binning`)."""
    import inspect

    kwargs = _resolution_binning(args, pipe)
    if getattr(args, "max_sequence_length", None) is None:
        return kwargs
    if "max_sequence_length" not in inspect.signature(type(pipe).__call__).parameters:
        raise CLIError(f"--max-sequence-length: {type(pipe).__name__} has no T5 text encoder length to set")
    return kwargs | {"max_sequence_length": args.max_sequence_length}


def _resolution_binning(args: argparse.Namespace, pipe) -> dict[str, Any]:
    """``use_resolution_binning=False`` for --no-resolution-binning (refused by name on a pipeline without
    binning); otherwise the adapter's rule (:func:`~.diffusers_adapter.pipeline.resolve_resolution_binning`: off,
    with one warning, for a PixArt whose transformer ``sample_size`` diffusers has no bins for; else nothing, the
    pipeline's own default). The result goes explicitly into calibration and evaluation, so the warning is said
    once per run."""
    import inspect

    from .diffusers_adapter.pipeline import resolve_resolution_binning

    if getattr(args, "no_resolution_binning", False):
        if "use_resolution_binning" not in inspect.signature(type(pipe).__call__).parameters:
            raise CLIError(f"--no-resolution-binning: {type(pipe).__name__} has no resolution binning to turn off "
                           "(PixArt pipelines have)")
        return {"use_resolution_binning": False}
    return resolve_resolution_binning(pipe, height=getattr(args, "height", None), width=getattr(args, "width", None))


def _size(args: argparse.Namespace) -> dict[str, int]:
    """--height / --width for calibration and evaluation (unset: the pipeline's own default size)."""
    return {k: v for k in ("height", "width") if (v := getattr(args, k, None)) is not None}


def _guidance(args: argparse.Namespace, pipe) -> float | None:
    """--guidance-scale, or the pipeline's own default (CFG scale; Flux: the guidance embedding; Qwen-Image:
    None)."""
    from .diffusers_adapter.pipeline import default_guidance_scale

    return args.guidance_scale if args.guidance_scale is not None else default_guidance_scale(pipe)


# Pipeline-call arguments that calibrate_pipeline / slim_pipeline take by name; the rest go to call_kwargs.
_SAMPLER_ARGS = ("num_inference_steps", "guidance_scale", "negative_prompt", "height", "width")


def _generation(args: argparse.Namespace, pipe, model: str | None) -> dict[str, Any]:
    """The pipeline-call settings of calibration and evaluation, as one flat dict.

    An embedded model (``model`` None is the default one) samples as it was trained, from its registry entry
    (``EmbeddedModel.generation_kwargs``: flux-tiny runs 25 steps with true CFG 4 against the empty negative
    prompt, at 32x32 with 16 T5 tokens); other models take --steps (25) and --guidance-scale or the pipeline's
    own default. --steps, --guidance-scale, --height/--width, --max-sequence-length and --no-resolution-binning
    override.
    """
    embedded = _embedded_entry(model)
    if embedded is None:
        settings = {"num_inference_steps": args.steps or DEFAULT_STEPS, "guidance_scale": _guidance(args, pipe)}
    else:
        settings = embedded.generation_kwargs(args.guidance_scale, args.steps)
    return settings | _size(args) | _call_kwargs(args, pipe)


def _split_sampler(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the arguments slim_pipeline / calibrate_pipeline take by name, the rest for their call_kwargs)."""
    return ({k: v for k, v in settings.items() if k in _SAMPLER_ARGS},
            {k: v for k, v in settings.items() if k not in _SAMPLER_ARGS})


def _read_prompts(path: str | None) -> list[str] | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"prompt file {p} is a folder; give a text file with one prompt per line")
    if not p.is_file():
        raise CLIError(f"prompt file not found: {p}")
    data = p.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CLIError(f"prompt file {p} is not UTF-8 text ({exc.reason} at byte {exc.start}); give a text file "
                       "with one prompt per line") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise CLIError(f"prompt file {p} has no prompts (one prompt per line)")
    return prompts


def _default_prompts(model: str | None) -> tuple[list[str] | None, list[str]]:
    """(calibration pool, evaluation prompts) when the user gives none."""
    if model is None or _embedded_model(model) is not None:  # the embedded models share the scene grammar
        from .default_model import CALIBRATION_PROMPTS, HELDOUT_PROMPTS

        return list(CALIBRATION_PROMPTS), list(HELDOUT_PROMPTS)
    from .diffusers_adapter.slimset import default_prompt_pool

    pool = default_prompt_pool()
    return pool[:-16], pool[-16:]


def _adherence_fn(model: str | None):
    if model is not None and _embedded_model(model) is None:
        return None
    from .evaluation.adherence import evaluate_adherence

    return lambda image, prompt: evaluate_adherence(image, prompt).overall


# --------------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------------


def _slim_config(args: argparse.Namespace):
    from .core.config import SlimConfig

    try:
        return SlimConfig(keep_ratio=args.keep_ratio if args.params_to_remove is None else None,
                          params_to_remove=args.params_to_remove, budget=args.budget,
                          targets=tuple(args.targets), rank_multiple=args.rank_multiple, ffn_multiple=args.ffn_multiple,
                          adapter_compatible=getattr(args, "adapter_compatible", False),
                          allocation_refinement=args.allocation_refinement, propagation=args.propagation,
                          vo_output_refit=args.vo_output_refit,
                          vo_statistics=args.vo_statistics, ffn_selection=args.ffn_selection)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def _memory(text: str) -> int:
    """'8GB', '512MiB', '2e9' -> bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
             "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
    number = text.strip().lower()
    digits = number.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = number[len(digits):].strip()
    try:
        value = float(digits) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 8GB, 512MiB or 2e9, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return int(value)


def _calibration_config(args: argparse.Namespace):
    from .core.calibrator import CalibrationConfig

    return CalibrationConfig(memory_limit=args.memory_limit)


def cmd_slim(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .diffusers_adapter.pipeline import slim_pipeline
    from .evaluation.compare import compare_pipelines
    from .reporting import image_grid, plot_rank_allocation, write_report_markdown

    # Every input is checked before the model is loaded: a typo must not cost a model load or a calibration.
    config = _slim_config(args)
    model = resolve_model(args.model)
    pool, eval_prompts = _default_prompts(args.model)
    pool = _read_prompts(args.prompts) or pool
    eval_prompts = (_read_prompts(args.eval_prompts) or eval_prompts)[: args.num_eval_prompts]
    _check_input_file(args.calibration, "--calibration")
    out = Path(args.out)
    with OutputLock(out), AtomicFolder(out, args.overwrite) as tmp:
        args.run_log.attach(tmp / "slimdiff.log")
        started = time.perf_counter()
        print(f"Loading {args.model or DEFAULT_MODEL} ...", flush=True)
        original = load_pipeline(model, args.dtype, args.device)
        # A second pipeline sharing every component but the denoiser, which slim_pipeline narrows in place.
        denoiser, original_denoiser = denoiser_of(original)
        check_image_pipeline(original)
        family = family_name(original_denoiser)
        slim = type(original).from_pipe(original, **{denoiser: copy.deepcopy(original_denoiser)})
        slim.set_progress_bar_config(disable=True)
        # An embedded model samples as it was trained (flux-tiny: true CFG, 32x32, 16 T5 tokens), calibration and
        # evaluation alike, unless the options say otherwise.
        generation = _generation(args, original, args.model)
        sampler, extra = _split_sampler(generation)
        num_prompts = args.num_prompts or (EMBEDDED_NUM_PROMPTS if _embedded_entry(args.model) else 500)
        report = slim_pipeline(slim, prompts=pool, config=config, num_prompts=num_prompts, batch_size=args.batch_size,
                               calibration=args.calibration, save_calibration=tmp / "calibration.safetensors"
                               if args.save_calibration else None, seed=args.seed,
                               calibration_config=_calibration_config(args), call_kwargs=extra, **sampler)
        print(report, flush=True)
        print(f"Evaluating on {len(eval_prompts)} held-out prompts ...", flush=True)
        comparison = compare_pipelines(original, slim, eval_prompts, batch_size=args.batch_size,
                                       adherence_fn=_adherence_fn(args.model), **generation)
        slim.save_pretrained(tmp / "pipeline")
        grid = image_grid({"original": comparison.images["original"], "slim": comparison.images["slim"]},
                          captions=eval_prompts, scale=max(1, 128 // comparison.images["original"][0].size[0]))
        grid.save(tmp / "before_after.png")
        plot_rank_allocation(report.slim, tmp / "rank_allocation.png")
        _write_card(tmp / "pipeline", slim, denoiser, args, report, comparison)
        summary = {
            "model": args.model or DEFAULT_MODEL,
            "pipeline": type(original).__name__,
            "denoiser": {"component": denoiser, "family": family, "class": type(original_denoiser).__name__},
            "command": " ".join(["slimdiff", *sys.argv[1:]]) if sys.argv else "slimdiff slim",
            "config": config.to_dict(),
            # what the allocation ran: config's allocation_refinement with "auto" resolved for this model
            "allocation_refinement": report.slim.allocation_refinement,
            # how the group influences were obtained: config's propagation resolved (decisions row 36)
            "propagation": report.slim.propagation,
            # how the VO readers were fit per attention kind: config's vo_output_refit resolved (decisions row 26)
            "vo_output_refit": report.slim.vo_output_refit,
            # what whitened the VO bases per attention kind: config's vo_statistics resolved (decisions row 31)
            "vo_statistics": report.slim.vo_statistics,
            "size": {"params_before": report.slim.params_before, "params_after": report.slim.params_after,
                     "compressible_before": report.slim.compressible_params_before,
                     "compressible_after": report.slim.compressible_params_after,
                     "macs_ratio": report.slim.flops_after / max(report.slim.flops_before, 1)},
            "speed": {"unet_latency_ms": comparison.unet_latency_ms, "speedup": comparison.speedup,
                      "seconds_per_image": comparison.image_seconds, "device": args.device,
                      "threads": torch.get_num_threads()},
            "quality": {"psnr_db": comparison.psnr_db, "ssim": comparison.ssim,
                        "eps_relative_error": comparison.eps_relative_error, "adherence": comparison.adherence},
            "calibration": {"prompts": report.num_prompts, "steps": report.num_inference_steps,
                            "guidance_scale": report.guidance_scale, "seconds": report.calibration_seconds,
                            "forward_calls": report.calibration_forward_calls,
                            "statistics_mib": round(report.calibration_memory_bytes / 2**20, 1)},
            "slimming_seconds": report.slim.stage_seconds,  # decomposition / allocation / rewrite
            "allocation": [g.__dict__ for g in report.slim.groups],
            "seconds_total": round(time.perf_counter() - started, 1),
        }
        (tmp / "report.json").write_text(json.dumps(summary, indent=1, default=str))
        write_report_markdown(tmp / "report.md", model=summary["model"], report=report.slim, comparison=comparison,
                              calibration=summary["calibration"],
                              files={"grid": "before_after.png", "ranks": "rank_allocation.png",
                                     "pipeline": "pipeline/", "json": "report.json", "log": "slimdiff.log"})
    _print_summary(summary, out)
    return summary


def _write_card(folder: Path, slim, denoiser: str, args: argparse.Namespace, report, comparison) -> None:
    """pipeline/README.md: the Hub model card, with the pictures copied next to it (the folder is the repo)."""
    import torch

    from .hub.card import write_model_card
    from .hub.layout import GRID_IMAGE, RANKS_IMAGE, single_file_name

    for rel in (GRID_IMAGE, RANKS_IMAGE):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder.parent / Path(rel).name, folder / rel)
    if args.model is None or _embedded_model(args.model) is not None:
        from .default_model import get_embedded_model

        source = get_embedded_model(args.model).folder
    else:
        source = args.model
    # `slimdiff push` adds the single file (named by the card) and fills in the repo id.
    write_model_card(folder, slim, source=source, report=report, comparison=comparison,
                     measured_on={"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads()},
                     images={"grid": GRID_IMAGE, "ranks": RANKS_IMAGE}, single_file=single_file_name(denoiser))


def cmd_push(args: argparse.Namespace) -> None:
    from .hub.push import push_output_folder

    try:
        commit = push_output_folder(args.out_dir, args.repo_id, private=True if args.private else None,
                                    revision=args.revision, token=args.token)
    except Exception as exc:
        # The Hub's own errors (HTTP status, no token, offline mode) are OSErrors; transport failures come from
        # huggingface_hub's HTTP library. Both are the user's to fix: no traceback. Anything else is a bug.
        if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests"):
            raise CLIError(f"could not push to {args.repo_id!r}: {type(exc).__name__}: {exc}. Check the repo id, "
                           "your network and your token (`hf auth login`, HF_TOKEN or --token).") from exc
        raise
    print(f"pushed {args.out_dir} to {getattr(commit, 'commit_url', None) or args.repo_id}")


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    s, sp, q = summary["size"], summary["speed"], summary["quality"]
    print(f"\nSlimDiff: {summary['model']} ({summary['pipeline']}, {summary['denoiser']['family']})")
    print(f"  parameters   {s['params_before']:,} -> {s['params_after']:,} "
          f"(compressible kept {s['compressible_after'] / s['compressible_before']:.1%}, MACs kept {s['macs_ratio']:.1%})")
    label = "UNet latency" if summary["denoiser"]["component"] == "unet" else "DiT latency "
    print(f"  {label} {sp['unet_latency_ms']['original']:.2f} ms -> {sp['unet_latency_ms']['slim']:.2f} ms "
          f"({sp['speedup']:.2f}x, {sp['device']}, {sp['threads']} threads)")
    line = f"  quality      PSNR {q['psnr_db']:.2f} dB, SSIM {q['ssim']:.4f}, noise-prediction error {q['eps_relative_error']:.4f}"
    if q["adherence"]:
        line += f", adherence {q['adherence']['original']['mean']:.3f} -> {q['adherence']['slim']['mean']:.3f}"
    print(line)
    print(f"  written to   {out}/ (pipeline/, report.md, report.json, before_after.png, rank_allocation.png, "
          f"slimdiff.log) in {summary['seconds_total']:.0f}s")


def _check_input_file(path: str | None, option: str) -> None:
    if path is not None and not Path(path).is_file():
        raise CLIError(f"{option} {path}: " + ("is a folder, not a file" if Path(path).is_dir() else "file not found"))


def _output_file(path: str, option: str = "--out") -> Path:
    """An output *file* path: refuse an existing folder before any work."""
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"{option} {out} is a folder; {option} names the output file: choose a file path")
    return out


def _prompt_range(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (e.g. 0:250), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return start, end


def cmd_calibrate(args: argparse.Namespace) -> None:
    from .core import distributed
    from .core.calibration import Calibration

    out = _output_file(args.out)
    if args.merge:
        if args.model is not None:
            raise CLIError("--merge combines saved calibrations: give the files, not a model")
        with OutputLock(out):
            merged = Calibration.merge([Calibration.load(path) for path in args.merge])
            try:
                merged.save(out)
            except OSError as exc:
                raise CLIError(f"cannot write {out}: {exc.strerror or exc}") from exc
        print(f"{len(args.merge)} calibrations ({merged.meta['num_forward_calls']} forward calls) merged into {out}")
        return

    from .diffusers_adapter.pipeline import calibrate_pipeline
    from .diffusers_adapter.slimset import SlimSet, build_slimset

    model = resolve_model(args.model)
    pool, _ = _default_prompts(args.model)
    pool = _read_prompts(args.prompts) or pool
    started_group = distributed.init_from_environment(args.device)
    try:
        # Under torchrun every process runs this; only rank 0 writes, so only rank 0 holds the lock on --out.
        with OutputLock(out) if distributed.rank() == 0 else contextlib.nullcontext():
            pipe = load_pipeline(model, args.dtype, args.device)
            slimset = build_slimset(pipe, num_prompts=args.num_prompts, pool=pool, seed=args.seed)
            if args.prompt_range:
                # One machine's share of a SlimSet; `--merge` later combines the shares exactly.
                start, end = args.prompt_range
                if end > len(slimset):
                    raise CLIError(f"--prompt-range {start}:{end} is beyond the {len(slimset)} selected prompts")
                slimset = SlimSet(slimset.prompts[start:end], slimset.seeds[start:end])
            generation = _generation(args, pipe, args.model)
            calibration = calibrate_pipeline(pipe, slimset, batch_size=args.batch_size,
                                             config=_calibration_config(args), **generation)
            if distributed.rank() == 0:
                try:
                    calibration.save(out)
                except OSError as exc:
                    raise CLIError(f"cannot write {out}: {exc.strerror or exc}") from exc
                ranks = f" on {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
                print(f"calibration of {len(slimset)} prompts x {generation['num_inference_steps']} steps{ranks} "
                      f"written to {out} "
                      f"({calibration.nbytes / 2**20:.1f} MiB)")
    finally:
        if started_group:
            distributed.shutdown()


def cmd_eval(args: argparse.Namespace) -> None:
    from .core.io_utils import atomic_path
    from .evaluation.compare import compare_pipelines

    original_model, slim_model = resolve_model(args.original), resolve_model(args.slim)
    prompts = _read_prompts(args.prompts) or _default_prompts(None if args.default_prompts else args.original)[1]
    out = _output_file(args.out) if args.out else None
    with OutputLock(out) if out else contextlib.nullcontext():
        original = load_pipeline(original_model, args.dtype, args.device)
        check_image_pipeline(original)
        slim = load_pipeline(slim_model, args.dtype, args.device)
        c = compare_pipelines(original, slim, prompts[: args.num_eval_prompts], batch_size=args.batch_size,
                              **_generation(args, original, args.original))
        result = c.to_dict()
        print(json.dumps({k: result[k] for k in ("psnr_db", "ssim", "eps_relative_error", "unet_latency_ms")},
                         indent=1))
        if out:
            try:
                with atomic_path(out) as tmp:
                    tmp.write_text(json.dumps(result, indent=1))
            except OSError as exc:
                raise CLIError(f"cannot write {out}: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------


def _global_options(p: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    # On the main parser and on each subcommand (SUPPRESS there, so `slimdiff -v slim` is not reset).
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="show details of calibration and allocation, and third-party notices (otherwise only in "
                        "the run's slimdiff.log)")
    p.add_argument("--debug", action="store_true", default=default, help="print the traceback of an error")


def _common(p: argparse.ArgumentParser, model_arg: bool = True) -> None:
    _global_options(p)
    if model_arg:
        p.add_argument("model", nargs="?", default=None,
                       help="an embedded model's name, a Hub repo id or a local pipeline folder (default: sd-tiny, "
                            f"the embedded default). Embedded models, trained 32x32: {_embedded_help()}")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help=f"sampling steps for calibration and evaluation (default {DEFAULT_STEPS}; an embedded model: "
                        "its trained setting, 25)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="guidance scale (default: the pipeline's own: 7.5 SD, 7.0 SD3, 4.5 PixArt; for Flux.1-dev "
                        "it is the guidance embedding, 3.5, and Flux runs no classifier-free guidance). An embedded "
                        "model samples as it was trained: sd-tiny CFG 7.5, flux-tiny true CFG 4 with an empty "
                        "negative prompt (this option sets its true-CFG scale)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call (default 8)")
    p.add_argument("--height", type=_positive_int, default=None,
                   help="image height for calibration and evaluation (default: the pipeline's own)")
    p.add_argument("--width", type=_positive_int, default=None,
                   help="image width for calibration and evaluation (default: the pipeline's own)")
    p.add_argument("--no-resolution-binning", action="store_true",
                   help="PixArt: calibrate and evaluate at exactly --height x --width instead of the nearest "
                        "aspect-ratio bin the pipeline snaps sizes to (use_resolution_binning=False). Automatic, with "
                        "a warning, for a PixArt whose transformer sample_size diffusers has no bins for (not "
                        "32/64/128, or 256 for PixArt-Σ)")
    p.add_argument("--max-sequence-length", type=_positive_int, default=None, metavar="N",
                   help="T5 prompt length of Flux / SD3 / PixArt pipelines (default: the pipeline's own: 512 Flux, "
                        "256 SD3, 300 PixArt-Σ, 120 PixArt-α)")
    p.add_argument("--dtype", default="float32", choices=["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"],
                   help="model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the SlimSet selection and sampling (default 0)")


def _memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-limit", type=_memory, default=None, metavar="SIZE",
                   help="most memory the calibration statistics may hold at once, e.g. 8GB; above it the model is "
                        "calibrated in several passes over the same prompts, spilling statistics to disk "
                        "(the estimated size is logged with -v)")


def _slim_config_choice_options(p: argparse.ArgumentParser) -> None:
    """``--allocation-refinement``, ``--propagation``, ``--vo-statistics``, ``--vo-output-refit`` and ``--ffn-selection``: choices, default and wording are
    SlimConfig's (core/config.py owns them; ``vo_statistics``'s per-kind dict form is for Python)."""
    from .core.config import SlimConfig

    for name in ("allocation_refinement", "propagation", "vo_statistics", "vo_output_refit", "ffn_selection"):
        p.add_argument(f"--{name.replace('_', '-')}", choices=SlimConfig.option_choices(name),
                       default=SlimConfig.option_default(name),
                       help=SlimConfig.option_help(name).replace("%", "%%")
                       + " (default: %(default)s; report.json, report.md and the model card say what ran)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimdiff", description="Training-free slimming of diffusion models.")
    _global_options(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("slim", help="calibrate, slim, evaluate and save a pipeline",
                       description="Calibrate MODEL on a SlimSet with its own sampler, slim its denoiser (the UNet of "
                                   "SD/SDXL pipelines, the transformer of Flux, SD3/3.5 and PixArt-α/Σ pipelines) "
                                   "under the budget, "
                                   "compare it with the original on held-out prompts, and write the slim pipeline, "
                                   "report.md/report.json, a before/after grid and a rank-allocation plot to --out.")
    _common(p)
    _memory_option(p)
    p.add_argument("--keep-ratio", type=_ratio, default=0.6,
                   help="fraction of the compressible cost (attention + feed-forward) to keep, in (0, 1] (default 0.6)")
    p.add_argument("--params-to-remove", type=int, default=None, help="remove this many parameters instead")
    p.add_argument("--budget", choices=["params", "flops"], default="params",
                   help="what --keep-ratio counts: parameters or multiply-accumulates (default params)")
    p.add_argument("--targets", nargs="+", choices=["qk", "vo", "ffn"], default=["qk", "vo", "ffn"],
                   help="groups to slim (default all)")
    p.add_argument("--adapter-compatible", action="store_true",
                   help="keep cross-attentions in their original basis, so IP-Adapters and Custom Diffusion weights made "
                        "for the original model load on the slim one (costs their share of the budget; the report "
                        "says how much)")
    _slim_config_choice_options(p)
    p.add_argument("--rank-multiple", type=int, default=8, help="per-head ranks are multiples of this (default 8)")
    p.add_argument("--ffn-multiple", type=int, default=64, help="feed-forward widths are multiples of this (default 64)")
    p.add_argument("--prompts", help="calibration prompt pool, one per line (default: the model's own / shipped pool)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="SlimSet size selected from the pool (default 500; 128 for the embedded model, whose small "
                        "scene grammar needs fewer and whose demo should run in minutes)")
    p.add_argument("--eval-prompts", help="held-out evaluation prompts, one per line")
    p.add_argument("--num-eval-prompts", type=int, default=16, help="how many evaluation prompts (default 16)")
    p.add_argument("--calibration", help="reuse a saved calibration (.safetensors) instead of running the model")
    p.add_argument("--save-calibration", action="store_true", help="also write calibration.safetensors to --out")
    p.add_argument("--out", default="slim-out", help="output folder (default ./slim-out)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_slim)

    p = sub.add_parser("calibrate", help="run the model on a SlimSet and save reusable statistics",
                       description="Run MODEL on a SlimSet with its own sampler and save the statistics. Under torchrun "
                                   "or accelerate launch every process calibrates its share of the prompts and rank 0 "
                                   "writes the summed statistics; on separate machines use --prompt-range and combine "
                                   "the files with --merge.")
    _common(p)
    _memory_option(p)
    p.add_argument("--prompts", help="calibration prompt pool, one per line")
    p.add_argument("--num-prompts", type=int, default=500, help="SlimSet size (default 500)")
    p.add_argument("--prompt-range", type=_prompt_range, default=None, metavar="START:END",
                   help="calibrate only SlimSet prompts START..END-1 (this machine's share)")
    p.add_argument("--merge", nargs="+", metavar="FILE",
                   help="instead of calibrating, combine these calibrations of the same model (exact sums) into --out")
    p.add_argument("--out", default="calibration.safetensors", help="output file (default calibration.safetensors)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="compare two saved pipelines on the same prompts and seeds")
    p.add_argument("original", help="the original pipeline (folder or repo id)")
    p.add_argument("slim", help="the slimmed pipeline (folder or repo id)")
    _common(p, model_arg=False)
    p.add_argument("--prompts", help="evaluation prompts, one per line")
    p.add_argument("--default-prompts", action="store_true", help="use the embedded model's held-out prompts")
    p.add_argument("--num-eval-prompts", type=int, default=16)
    p.add_argument("--out", help="write the comparison as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("push", help="upload a `slimdiff slim` output folder to the Hugging Face Hub",
                       description="Upload OUT_DIR (the --out folder of `slimdiff slim`) to the Hub repository "
                                   "REPO_ID: the slim pipeline (loads with DiffusionPipeline.from_pretrained once "
                                   "slimdiff-diffusers is installed), its model card (pipeline/README.md: base model, "
                                   "budget, sizes, measured quality and latency, calibration, how to load it) with "
                                   "the before/after grid and rank plot, and the slim denoiser as one "
                                   ".safetensors file for ComfyUI's Load Slim Model node (written into OUT_DIR "
                                   "first if missing). The repository is created if needed; pushing again "
                                   "updates it in one commit. Log in first (`hf auth login`) or pass --token.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder written by `slimdiff slim --out`")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, e.g. your-name/sd15-slim-0.6")
    p.add_argument("--private", action="store_true", help="create the repository as private (an existing "
                   "repository keeps its visibility)")
    p.add_argument("--revision", help="branch to push to (created if needed; default: main)")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the token saved by `hf auth login`)")
    p.set_defaults(func=cmd_push)
    return parser


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_line(exc: BaseException) -> str:
    """One actionable line for any exception reaching the top of the command."""
    from .core.errors import SlimDiffError

    if isinstance(exc, (CLIError, SlimDiffError)):
        return _one_line(str(exc))
    if isinstance(exc, FileNotFoundError):
        return _one_line(f"file not found: {exc.filename}" if exc.filename else str(exc))
    if isinstance(exc, PermissionError):
        return _one_line(f"permission denied: {exc.filename or exc}; check the folder's permissions or choose "
                         "another path")
    if isinstance(exc, OSError):
        return _one_line(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return _one_line(f"out of memory ({exc}); try a smaller --batch-size, --dtype fp16/bf16, or another --device")
    return _one_line(f"unexpected {type(exc).__name__}: {exc}", 400) + \
        " (rerun with --debug for the traceback and report it if it looks like a bug)"


def main(argv: list[str] | None = None) -> int:
    """Run the command; every outcome is an exit code (0 ok, 1 unexpected error, 2 usage/input error,
    130 SIGINT, 143 SIGTERM) and at most one error line on stderr (``--debug`` adds the traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug, verbose = getattr(args, "debug", False), getattr(args, "verbose", False)
    with QuietConsole(verbose) as console, signals_as_exceptions() as stop:
        args.run_log = console.log
        try:
            args.func(args)
        except (KeyboardInterrupt, Terminated, Exception) as exc:  # the one top-level handler
            if debug:
                traceback.print_exc()
            code = stop.exit_code  # also when a library re-raised the signal's exception as another type
            if code is None and isinstance(exc, KeyboardInterrupt):
                code = EXIT_SIGINT
            if code is not None or isinstance(exc, Terminated):
                name = "interrupted (SIGINT)" if code == EXIT_SIGINT else "terminated (SIGTERM)"
                print(f"slimdiff: {name}; no partial output was left behind", file=sys.stderr)
                return code or EXIT_SIGTERM
            from .core.errors import SlimDiffError

            print(f"slimdiff: error: {_error_line(exc)}", file=sys.stderr)
            return 2 if isinstance(exc, (CLIError, SlimDiffError, OSError)) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
