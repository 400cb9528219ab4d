"""The embedded models: small, genuinely trained text-to-image pipelines shipped inside the package.

Both draw the procedural scenes of :mod:`slimdiff_diffusers.evaluation.scenes` ("a large red circle on the
left", "a blue square above a yellow triangle") at 32x32, so that SlimDiff can be tried, tested and
benchmarked offline on real trained weights whose prompt adherence is measured automatically. Each is a stock
diffusers pipeline folder saved with ``save_pretrained``; they are addressed by name:

* ``sd-tiny`` (the default): a ``StableDiffusionPipeline`` (cross-attention UNet, CLIP, VAE, DDIM) under
  :data:`DEFAULT_MODEL_DIR`; model card ``docs/default_model.md``, trained by ``scripts/train_default_model.py``.
* ``flux-tiny``: a ``FluxPipeline`` (MMDiT with double- and single-stream blocks, RoPE, QK-norm; CLIP + T5;
  the same VAE; flow-matching Euler) under :data:`FLUX_TINY_MODEL_DIR`; model card ``docs/flux_tiny_model.md``,
  trained by ``scripts/train_flux_tiny.py``.

:data:`EMBEDDED_MODELS` is the one registry of names, folders, pipeline classes, descriptions and generation
settings (steps, guidance and how it is passed, negative prompt, image size, text length). Everything that samples an
embedded model reads it: the CLI (``slimdiff slim flux-tiny``), :mod:`.evaluate` (adherence, the training scripts),
the benchmarks and the tests. :func:`embedded_model_of` finds the entry of a pipeline loaded from a registry folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..core.errors import SlimDiffError
from .prompts import CALIBRATION_PROMPTS, HELDOUT_PROMPTS

if TYPE_CHECKING:  # diffusers is imported lazily: importing this package stays cheap
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

__all__ = [
    "DEFAULT_MODEL_DIR",
    "FLUX_TINY_MODEL_DIR",
    "DEFAULT_MODEL_NAME",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "UnknownEmbeddedModelError",
    "get_embedded_model",
    "embedded_model_of",
    "load_embedded_pipeline",
    "load_default_pipeline",
    "HELDOUT_PROMPTS",
    "CALIBRATION_PROMPTS",
]

_HERE = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR: Path = _HERE / "pipeline"
FLUX_TINY_MODEL_DIR: Path = _HERE / "flux_tiny"


class UnknownEmbeddedModelError(SlimDiffError, KeyError):
    """A name that is not one of :data:`EMBEDDED_MODELS`."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded pipeline: where it lives, what loads it, and the settings it was trained for.

    Attributes:
        name: the name users type (``slimdiff slim NAME``).
        folder: the diffusers pipeline folder (``model_index.json`` inside).
        pipeline_class: the diffusers pipeline class name in ``model_index.json``.
        description: one line for ``slimdiff slim --help`` and listings.
        card: the model card, relative to the repository root.
        training_script: the script that trains it, relative to the repository root.
        call_kwargs: pipeline-call arguments the model needs besides the prompt (image size, text length).
        num_inference_steps: sampling steps of the trained setting (calibration and evaluation use it).
        guidance_scale: classifier-free guidance scale of the trained setting.
        guidance_argument: the pipeline-call argument that carries ``guidance_scale``: ``"guidance_scale"``
            (Stable Diffusion's CFG) or ``"true_cfg_scale"`` (FluxPipeline's true CFG, which also needs
            ``negative_prompt``; FluxPipeline's ``guidance_scale`` is the distilled guidance embedding, which a
            model without ``guidance_embeds`` ignores).
        negative_prompt: the negative prompt of the trained setting (``""``: the empty caption the model was
            trained to predict unconditionally), or None for the pipeline's default.
    """

    name: str
    folder: Path
    pipeline_class: str
    description: str
    card: str
    training_script: str
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    guidance_argument: str = "guidance_scale"
    negative_prompt: str | None = None

    def guidance_kwargs(self, guidance_scale: float | None = None, batch_size: int | None = None) -> dict[str, Any]:
        """The guidance of the trained setting as pipeline-call arguments (``guidance_scale`` ``None``: the trained
        scale): ``guidance_scale``, and for true CFG ``true_cfg_scale`` with ``negative_prompt``.

        A true-CFG scale of 1 or less runs the conditional prediction alone, as FluxPipeline itself does
        (``true_cfg_scale > 1`` and a negative prompt turn it on): neither argument is passed then.
        ``batch_size``: the negative prompt repeated once per prompt of a batch (FluxPipeline encodes a single
        string once and cannot pair it with a batch of prompts); ``None``: one string, for callers that repeat it
        themselves (``calibrate_pipeline``, ``compare_pipelines``).
        """
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        kwargs: dict[str, Any] = {"guidance_scale": scale}
        true_cfg = self.guidance_argument != "guidance_scale"
        if true_cfg and scale > 1.0:
            kwargs[self.guidance_argument] = scale
        if self.negative_prompt is not None and (not true_cfg or scale > 1.0):
            kwargs["negative_prompt"] = (self.negative_prompt if batch_size is None
                                         else [self.negative_prompt] * batch_size)
        return kwargs

    def sampler_kwargs(self, guidance_scale: float | None = None,
                       num_inference_steps: int | None = None) -> dict[str, Any]:
        """The trained sampler setting as pipeline-call arguments (``None``: the trained value):
        ``num_inference_steps`` and :meth:`guidance_kwargs` (the negative prompt as one string: callers that batch
        prompts repeat it per prompt, as ``calibrate_pipeline`` does)."""
        return {"num_inference_steps": num_inference_steps or self.num_inference_steps} | \
            self.guidance_kwargs(guidance_scale)

    def generation_kwargs(self, guidance_scale: float | None = None, num_inference_steps: int | None = None,
                          batch_size: int | None = None) -> dict[str, Any]:
        """Every pipeline-call argument of the trained setting besides the prompt and the generator:
        :meth:`sampler_kwargs` and :attr:`call_kwargs` (image size, text length). ``batch_size`` as in
        :meth:`guidance_kwargs`. Calibration and evaluation of an embedded model both use this."""
        return {"num_inference_steps": num_inference_steps or self.num_inference_steps} | \
            self.guidance_kwargs(guidance_scale, batch_size) | dict(self.call_kwargs)

    def owns(self, pipe: Any) -> bool:
        """Whether ``pipe`` was loaded from this model's folder (diffusers records the folder as
        ``pipe.name_or_path``; ``from_pipe`` keeps it)."""
        source = getattr(pipe, "name_or_path", None)
        if not isinstance(source, (str, Path)) or not str(source):
            return False
        try:
            return Path(source).expanduser().resolve() == self.folder.resolve()
        except OSError:
            return False

    def load(
        self, torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", progress_bar: bool = False
    ) -> "DiffusionPipeline":
        """Load the pipeline offline with its own diffusers class, every component cast to ``torch_dtype``."""
        import diffusers

        if not (self.folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded model {self.name!r} is missing at {self.folder}; train it with {self.training_script}"
            )
        pipeline_class = getattr(diffusers, self.pipeline_class)
        # diffusers 0.42 names the argument ``dtype`` (``torch_dtype`` is deprecated there).
        pipe = pipeline_class.from_pretrained(self.folder, dtype=torch_dtype, local_files_only=True)
        pipe.set_progress_bar_config(disable=not progress_bar)
        return pipe.to(device)


DEFAULT_MODEL_NAME = "sd-tiny"

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="sd-tiny",
            folder=DEFAULT_MODEL_DIR,
            pipeline_class="StableDiffusionPipeline",
            description="Stable Diffusion architecture: cross-attention UNet, CLIP, DDIM (5.0M parameters)",
            card="docs/default_model.md",
            training_script="scripts/train_default_model.py",
            # 25 DDIM steps, CFG 7.5 (docs/default_model.md)
            num_inference_steps=25,
            guidance_scale=7.5,
        ),
        EmbeddedModel(
            name="flux-tiny",
            folder=FLUX_TINY_MODEL_DIR,
            pipeline_class="FluxPipeline",
            description="Flux architecture: double/single-stream MMDiT with RoPE and QK-norm, CLIP + T5, flow "
            "matching (2.4M parameters)",
            card="docs/flux_tiny_model.md",
            training_script="scripts/train_flux_tiny.py",
            # FluxPipeline defaults to 256x256 and 512 T5 tokens; the model was trained at 32x32 with 16.
            call_kwargs={"height": 32, "width": 32, "max_sequence_length": 16},
            # 25 flow-matching Euler steps, true CFG 4 against the empty caption (it was trained with 10% empty
            # captions and has no guidance embedding; docs/flux_tiny_model.md)
            num_inference_steps=25,
            guidance_scale=4.0,
            guidance_argument="true_cfg_scale",
            negative_prompt="",
        ),
    )
}


def get_embedded_model(name: str | None = None) -> EmbeddedModel:
    """The registry entry for ``name`` (``None``: the default, ``sd-tiny``); a clear error for other names."""
    name = DEFAULT_MODEL_NAME if name is None else name
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise UnknownEmbeddedModelError(
            f"no embedded model named {name!r}; the embedded models are {', '.join(EMBEDDED_MODELS)}"
        ) from None


def embedded_model_of(pipe: Any) -> EmbeddedModel | None:
    """The registry entry of a pipeline loaded from an embedded model's folder (:meth:`EmbeddedModel.owns`), else
    ``None`` (a user's pipeline, or a copy of an embedded folder saved elsewhere)."""
    return next((model for model in EMBEDDED_MODELS.values() if model.owns(pipe)), None)


def load_embedded_pipeline(
    name: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress_bar: bool = False,
) -> "DiffusionPipeline":
    """Load an embedded pipeline by name (``None``: the default ``sd-tiny``), offline; see :class:`EmbeddedModel`."""
    return get_embedded_model(name).load(torch_dtype=torch_dtype, device=device, progress_bar=progress_bar)


def load_default_pipeline(
    torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", progress_bar: bool = False
) -> "StableDiffusionPipeline":
    """Load the embedded default pipeline (``sd-tiny``) offline, every component cast to ``torch_dtype``.

    Args:
        torch_dtype: dtype of every component after loading.
        device: where to put the pipeline.
        progress_bar: show diffusers' per-step progress bar when generating.

    Returns:
        A ``StableDiffusionPipeline`` with a ``DDIMScheduler``; ``pipe("a red circle on the left")``
        generates a 32x32 image.
    """
    return load_embedded_pipeline(DEFAULT_MODEL_NAME, torch_dtype=torch_dtype, device=device, progress_bar=progress_bar)
