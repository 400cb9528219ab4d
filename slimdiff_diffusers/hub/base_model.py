"""Which model a slim model was made from: its Hub id and licence, when they can be known.

The source is what the user loaded: a Hub repo id, a local folder (possibly a snapshot in the Hugging Face cache,
whose path names the repo), the embedded default model, or a folder written by SlimDiff itself (whose card names
*its* base). Nothing here guesses: an unknown base is reported as unknown, and the card says so.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("slimdiff")

# A Hub repo id: "owner/name" (the Hub allows letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A snapshot in the huggingface_hub cache: .../models--owner--name/snapshots/<commit>[/subfolder]
_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\][^/\\]+(?:[/\\].*)?$")

# The embedded default model is trained by scripts/train_default_model.py and ships inside this package, under
# the package's licence (pyproject.toml: MIT).
EMBEDDED_MODEL_LICENSE = "mit"
EMBEDDED_MODEL_DESCRIPTION = ("the SlimDiff embedded default model (a 32x32 text-to-image demo model trained for and "
                              "shipped with `slimdiff-diffusers`)")


@dataclass
class BaseModelInfo:
    """What is known about the model a slim model was made from."""

    hub_id: str | None = None  # the card's `base_model`; None when not a Hub model (or not known)
    description: str = "an unknown model"  # for people: "`owner/name`", "a local folder (`x`)", ...
    license: str | None = None
    license_name: str | None = None  # with license "other": the licence's name and link, as the Hub expects
    license_link: str | None = None

    @property
    def known(self) -> bool:
        return self.hub_id is not None


def resolve_base_model(source: str | os.PathLike | None, *, download_card: bool | None = None) -> BaseModelInfo:
    """Describe the model ``source`` names: a Hub id, a local folder (or a component subfolder of one), or None.

    The licence is read from the source's own model card: ``README.md`` in a local folder, the Hugging Face cache
    for a Hub id, or (``download_card``; default: unless ``HF_HUB_OFFLINE`` is set) a download of that one file.
    A card that cannot be read leaves the licence unknown (logged); it never fails the caller.
    """
    if source is None or str(source).strip() == "":
        return BaseModelInfo()
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return _from_folder(path, download_card)
    if _HUB_ID.match(text):
        return _with_card_license(BaseModelInfo(hub_id=text, description=f"`{text}`"), _hub_card_path(text, download_card))
    return BaseModelInfo(description=f"`{text}`")


def _from_folder(path: Path, download_card: bool | None) -> BaseModelInfo:
    path = path.resolve()
    from ..default_model import DEFAULT_MODEL_DIR

    if path == DEFAULT_MODEL_DIR or path.parent == DEFAULT_MODEL_DIR:
        return BaseModelInfo(description=EMBEDDED_MODEL_DESCRIPTION, license=EMBEDDED_MODEL_LICENSE)
    # A component folder (".../unet") of a pipeline: the pipeline folder holds the card.
    root = path.parent if not (path / "model_index.json").is_file() and (path.parent / "model_index.json").is_file() \
        else path
    card = _read_card(root / "README.md")
    if card is not None and "slimdiff" in (card.data.tags or []):
        # A model SlimDiff wrote: its base is the base of what we make from it.
        data = card.data
        extra = getattr(data, "slimdiff", None) or {}
        return BaseModelInfo(hub_id=data.base_model if isinstance(data.base_model, str) else None,
                             description=extra.get("base_description") or (f"`{data.base_model}`" if data.base_model
                                                                           else "an unknown model"),
                             license=data.license, license_name=getattr(data, "license_name", None),
                             license_link=getattr(data, "license_link", None))
    cached = _CACHE_SNAPSHOT.search(str(root))
    if cached:
        hub_id = f"{cached['owner']}/{cached['name']}"
        card_path = root / "README.md" if (root / "README.md").is_file() else _hub_card_path(hub_id, download_card)
        return _with_card_license(BaseModelInfo(hub_id=hub_id, description=f"`{hub_id}`"), card_path)
    return _with_card_license(BaseModelInfo(description=f"a local folder (`{root.name}`)"), root / "README.md")


def _hub_card_path(hub_id: str, download_card: bool | None) -> Path | None:
    """The source repo's README.md from the local cache, else downloaded (when allowed), else None."""
    import huggingface_hub
    from huggingface_hub import constants

    cached = huggingface_hub.try_to_load_from_cache(hub_id, "README.md")
    if isinstance(cached, str):
        return Path(cached)
    if download_card is None:
        download_card = not constants.HF_HUB_OFFLINE
    if not download_card:
        return None
    try:
        return Path(huggingface_hub.hf_hub_download(hub_id, "README.md"))
    except Exception as exc:  # offline, gated, private, no card: the licence stays unknown, which the card says
        logger.info("could not read the model card of %s (%s: %s); its licence is left unknown",
                    hub_id, type(exc).__name__, exc)
        return None


def _read_card(path: Path | None):
    if path is None or not path.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path, ignore_metadata_errors=True)
    except Exception as exc:  # a malformed README of someone else's model must not stop slimming or pushing
        logger.info("could not parse %s (%s: %s); licence unknown", path, type(exc).__name__, exc)
        return None


def _with_card_license(info: BaseModelInfo, card_path: Path | None) -> BaseModelInfo:
    card = _read_card(card_path)
    if card is not None:
        info.license = card.data.license
        info.license_name = getattr(card.data, "license_name", None)
        info.license_link = getattr(card.data, "license_link", None)
    return info


__all__ = ["BaseModelInfo", "EMBEDDED_MODEL_LICENSE", "resolve_base_model"]
