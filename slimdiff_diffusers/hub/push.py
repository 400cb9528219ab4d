"""Uploading slim models to the Hugging Face Hub with their model card, pictures and ComfyUI single file.

Three entry points, one upload path (:func:`upload_folder_to_hub`: ``HfApi.create_repo`` + ``upload_folder``):

- :func:`push_output_folder`: ``slimdiff push OUT_DIR REPO_ID`` (a folder written by ``slimdiff slim``);
- :func:`push_pipeline_to_hub`: ``pipe.push_to_hub`` of a slimmed pipeline;
- :func:`push_model_to_hub`: ``slim_model.push_to_hub`` (any Slim* denoiser: UNet, Flux, SD3, PixArt).

Pushing again to the same repository updates it in one commit: files are overwritten, and stale files inside
the folders SlimDiff uploads (``unet/``, ``images/``, ...) are deleted, so a re-slimmed model never mixes
weights of two runs. Files elsewhere in the repository (e.g. added by hand on the Hub) are kept.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.basis_maps import LORA_MAPS_FILE
from ..core.errors import OutputFolderError, UnsupportedModelError
from .base_model import BaseModelInfo
from .card import rerender_for_repo, write_model_card
from .layout import CARD_NAME, GRID_IMAGE, RANKS_IMAGE, single_file_name

logger = logging.getLogger("slimdiff")

_DENOISER_NAMES = ("unet", "transformer")


# --------------------------------------------------------------------------------------------------
# The upload itself
# --------------------------------------------------------------------------------------------------


def _stale_file_patterns(folder: Path) -> list[str]:
    """Remote files to delete before the upload's files land: everything inside the folders we upload."""
    return sorted(f"{p.name}/*" for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def upload_folder_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                         revision: str | None = None, token: str | None = None, commit_message: str | None = None,
                         create_pr: bool = False, prepare: Any = None):
    """Create ``repo_id`` if needed and upload every file of ``folder`` to it in one commit.

    ``prepare(folder, repo_id)`` runs after the repository exists (its final id is known, e.g. a bare name gets
    the user's namespace) and before the upload; it writes the card for that id. Returns the ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and revision != "main" and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    if prepare is not None:
        prepare(folder, repo_id)
    logger.info("uploading %s to %s%s", folder, repo_id, f"@{revision}" if revision else "")
    return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                             commit_message=commit_message or "Upload slim model (SlimDiff)", create_pr=create_pr,
                             delete_patterns=_stale_file_patterns(folder))


def _write_single_file(denoiser: Any, path: Path, base_model: str | None = None) -> Path | None:
    """The slim denoiser as one file (ComfyUI's for a UNet), or None for a denoiser the format cannot hold."""
    from ..diffusers_adapter.models import supported_for_pretrained
    from ..diffusers_adapter.single_file import save_slim_model_file

    if not supported_for_pretrained(denoiser):
        logger.info("no single-file export for %s: the single file is left out", type(denoiser).__name__)
        return None
    saved = save_slim_model_file(denoiser, path, metadata={"base_model": base_model} if base_model else None)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(saved, 0o666 & ~umask)  # atomic writes go through a private temp file: give it normal permissions
    return saved


def _rank_plot(report: Any, folder: Path) -> dict[str, str]:
    slim_report = getattr(report, "slim", report)
    if slim_report is None or not getattr(slim_report, "groups", None):
        return {}
    from ..reporting import plot_rank_allocation

    (folder / RANKS_IMAGE).parent.mkdir(parents=True, exist_ok=True)
    plot_rank_allocation(slim_report, folder / RANKS_IMAGE)
    return {"ranks": RANKS_IMAGE}


# --------------------------------------------------------------------------------------------------
# pipe.push_to_hub / model.push_to_hub
# --------------------------------------------------------------------------------------------------


def push_pipeline_to_hub(pipe: Any, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                         token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                         variant: str | None = None, revision: str | None = None):
    """Upload a slimmed pipeline with its SlimDiff model card, rank plot and ComfyUI single file.

    The same arguments as diffusers' ``push_to_hub`` (plus ``revision``: a branch, created if needed). What the
    card states comes from the report ``pipe.slim`` kept on the pipeline; a pipeline loaded from a SlimDiff folder
    reuses the measurements of that folder's card.
    """
    if not is_slimmed_pipeline(pipe):
        raise UnsupportedModelError(f"{type(pipe).__name__} has no slimmed unet/transformer: slim it first "
                                "(pipe.slim(...)), or use diffusers' push_to_hub for an unslimmed pipeline")
    denoiser_name = next(n for n in _DENOISER_NAMES if getattr(pipe, n, None) is not None)
    denoiser = getattr(pipe, denoiser_name)
    report = getattr(pipe, "_slimdiff_report", None)
    with tempfile.TemporaryDirectory(prefix="slimdiff-push-") as tmp:
        folder = Path(tmp)
        pipe.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
        images = _rank_plot(report, folder) if report is not None else _source_pictures(pipe, folder)
        single = _write_single_file(denoiser, folder / single_file_name(denoiser_name))

        def prepare(folder: Path, final_id: str) -> None:
            write_model_card(folder, pipe, report=report, images=images,
                             single_file=single.name if single else None, repo_id=final_id)
        return upload_folder_to_hub(folder, repo_id, private=private, revision=revision, token=token,
                                    commit_message=commit_message, create_pr=create_pr, prepare=prepare)


def _source_pictures(pipe: Any, folder: Path) -> dict[str, str]:
    """The pictures of the SlimDiff folder a pipeline was loaded from (its card's measurements are reused)."""
    import shutil

    source = pipe.config.get("_name_or_path")
    images = {}
    for key, rel in (("grid", GRID_IMAGE), ("ranks", RANKS_IMAGE)):
        if source and Path(source, rel).is_file():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(source, rel), folder / rel)
            images[key] = rel
    return images


def push_model_to_hub(model: Any, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                      token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                      variant: str | None = None, revision: str | None = None):
    """Upload a slim denoiser (``SlimUNet2DConditionModel``, ``SlimFluxTransformer2DModel``, ...) with its model card
    and its single file."""
    from ..diffusers_adapter.models import family_of

    family = family_of(model)
    with tempfile.TemporaryDirectory(prefix="slimdiff-push-") as tmp:
        folder = Path(tmp)
        model.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
        report = getattr(model, "slimdiff_report", None)
        images = _rank_plot(report, folder) if report is not None else {}
        single = _write_single_file(model, folder / single_file_name(family.component if family else "unet"))

        def prepare(folder: Path, final_id: str) -> None:
            write_model_card(folder, model, report=report, images=images,
                             single_file=single.name if single else None, repo_id=final_id)
        return upload_folder_to_hub(folder, repo_id, private=private, revision=revision, token=token,
                                    commit_message=commit_message, create_pr=create_pr, prepare=prepare)


def is_slimmed_pipeline(pipe: Any) -> bool:
    """Whether ``pipe``'s unet/transformer is a slim model (has a SlimDiff spec)."""
    denoiser = next((getattr(pipe, n) for n in _DENOISER_NAMES if getattr(pipe, n, None) is not None), None)
    return denoiser is not None and _spec_of(denoiser) is not None


def _spec_of(denoiser: Any) -> Any:
    return getattr(denoiser, "slimdiff_spec", None) or getattr(getattr(denoiser, "config", None), "get",
                                                               lambda k, d=None: d)("slimdiff_spec")


# --------------------------------------------------------------------------------------------------
# slimdiff push OUT_DIR REPO_ID
# --------------------------------------------------------------------------------------------------


@dataclass
class OutputFolder:
    """A validated ``slimdiff slim`` output folder: ``root`` holds ``pipeline/`` (or is the pipeline folder)."""

    root: Path
    pipeline: Path  # the folder that becomes the repository
    denoiser_name: str
    denoiser_class: str


def validate_output_folder(path: str | os.PathLike) -> OutputFolder:
    """Check that ``path`` is a SlimDiff output folder (or its ``pipeline/``) before anything is uploaded.

    Raises :class:`OutputFolderError` naming what is missing.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise OutputFolderError(f"{root} is not a folder; give the --out folder of `slimdiff slim`")
    pipeline = root if (root / "model_index.json").is_file() else root / "pipeline"
    index_path = pipeline / "model_index.json"
    if not index_path.is_file():
        raise OutputFolderError(f"{root} is not a slimdiff output folder: it has no pipeline/model_index.json "
                                "(give the --out folder of `slimdiff slim`, or a pipeline folder saved after pipe.slim)")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputFolderError(f"{index_path} is not readable JSON: {exc}") from exc
    for name in _DENOISER_NAMES:
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0]:
            break
    else:
        raise OutputFolderError(f"{pipeline} has no unet or transformer component in model_index.json")
    library, class_name = entry
    if library != "slimdiff_diffusers":
        raise OutputFolderError(f"{pipeline} is not slimmed: its {name} is {library}.{class_name}; slim it first "
                                "(`slimdiff slim`)")
    config_path = pipeline / name / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputFolderError(f"{config_path} is missing or unreadable: the output folder is incomplete") from exc
    if "slimdiff_spec" not in config:
        raise OutputFolderError(f"{config_path} has no slimdiff_spec: the output folder is incomplete or damaged")
    if not any(p.suffix in (".safetensors", ".bin") and p.name != LORA_MAPS_FILE for p in (pipeline / name).iterdir()):
        raise OutputFolderError(f"{pipeline / name} has no weights: the output folder is incomplete")
    return OutputFolder(root=root, pipeline=pipeline, denoiser_name=name, denoiser_class=class_name)


def _ensure_pictures(out: OutputFolder) -> dict[str, str]:
    """Copy the pictures ``slimdiff slim`` wrote next to ``pipeline/`` into it (older folders lack them there)."""
    import shutil

    images = {}
    for key, rel in (("grid", GRID_IMAGE), ("ranks", RANKS_IMAGE)):
        target, outside = out.pipeline / rel, out.root / Path(rel).name
        if not target.is_file() and outside.is_file() and out.pipeline != out.root:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(outside, target)
        if target.is_file():
            images[key] = rel
    return images


def prepare_output_folder(out: OutputFolder, repo_id: str | None = None) -> list[str]:
    """Make ``out.pipeline`` a complete repository: the single file and the card (for ``repo_id``).

    The ComfyUI single file is written when missing; a card is written when missing (from the pipeline's own
    config, measurements absent) and otherwise only re-rendered to name ``repo_id``. Returns the files written.
    """
    written: list[str] = []
    images = _ensure_pictures(out)
    single_name = single_file_name(out.denoiser_name)
    single = out.pipeline / single_name
    card = out.pipeline / CARD_NAME
    denoiser = None
    if not single.is_file():
        denoiser = _load_denoiser(out)
        from .base_model import resolve_base_model

        base = resolve_base_model(out.pipeline).hub_id
        if _write_single_file(denoiser, single, base_model=base) is not None:
            written.append(single_name)
    if not card.is_file():
        from diffusers import DiffusionPipeline

        logger.warning("%s has no model card: writing one from the pipeline (no measurements; `slimdiff slim` "
                       "writes a complete card)", out.pipeline)
        pipe = DiffusionPipeline.from_pretrained(out.pipeline)
        write_model_card(out.pipeline, pipe, base=BaseModelInfo(description="a model this folder does not record"),
                         images=images,
                         single_file=single_name if single.is_file() else None, repo_id=repo_id)
        written.append(CARD_NAME)
    elif repo_id is not None and rerender_for_repo(card, repo_id):
        written.append(CARD_NAME)
    return written


def _load_denoiser(out: OutputFolder):
    import slimdiff_diffusers

    cls = getattr(slimdiff_diffusers, out.denoiser_class, None)
    if cls is None:
        raise OutputFolderError(f"{out.pipeline} names {out.denoiser_class}, which this SlimDiff version does not have")
    return cls.from_pretrained(out.pipeline, subfolder=out.denoiser_name)


def push_output_folder(path: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                       revision: str | None = None, token: str | None = None, commit_message: str | None = None,
                       create_pr: bool = False):
    """Upload a ``slimdiff slim`` output folder to ``repo_id``: the pipeline, its card and pictures, and the
    single-file denoiser (ComfyUI's for a UNet; written into the folder first when missing). Returns the
    ``CommitInfo``."""
    out = validate_output_folder(path)
    prepare_output_folder(out)  # the expensive part (single file) before the repository is created
    return upload_folder_to_hub(out.pipeline, repo_id, private=private, revision=revision, token=token,
                                commit_message=commit_message, create_pr=create_pr,
                                prepare=lambda folder, final_id: prepare_output_folder(out, final_id))


__all__ = ["OutputFolder", "prepare_output_folder", "push_model_to_hub", "push_output_folder",
           "push_pipeline_to_hub", "upload_folder_to_hub", "validate_output_folder"]
