"""The interface of every SlimDiff node, as plain data (no ComfyUI import).

`nodes.py` turns each :class:`NodeSpec` into a ComfyUI V3 ``io.Schema``; the tier-0 tests read the same
specs to check the example workflows (widget order, names, types) without a ComfyUI checkout. Keeping the
interface here, once, is what makes "the UI workflows match the nodes" testable in CI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimdiff_diffusers.core.config import SlimConfig

# Custom socket type carrying a core ``Calibration`` object between nodes.
SLIM_CALIBRATION = "SLIM_CALIBRATION"

CATEGORY = "SlimDiff"

# Combo inputs whose options only ComfyUI knows at run time. ``nodes.py`` resolves these names.
DYNAMIC_OPTIONS = ("samplers", "schedulers", "slim_models", "loras")

# Socket (link) types vs. widget types, as ComfyUI names them.
SOCKET_TYPES = ("MODEL", "CLIP", "CONDITIONING", "LATENT", SLIM_CALIBRATION)
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

SEED_MAX = 0xFFFFFFFFFFFFFFFF  # KSampler's seed range


@dataclass(frozen=True)
class InputSpec:
    """One node input: a socket (link only) or a widget (value, optionally linkable).

    Attributes:
        name: input id (the key in API-format ``inputs`` and the kwarg of ``execute``).
        type: one of :data:`SOCKET_TYPES` or :data:`WIDGET_TYPES`.
        tooltip: shown on hover in the front end.
        default/min/max/step/round: widget value settings (``round`` only for FLOAT).
        options: COMBO choices (a tuple), or the name of a run-time list from :data:`DYNAMIC_OPTIONS`.
        multiline: STRING shown as a text area.
        control_after_generate: INT gets the front end's "fixed/increment/randomize" control; the front end
            then stores one extra value right after this widget in UI-format ``widgets_values``.
        optional: may be left unconnected/unset.
    """

    name: str
    type: str
    tooltip: str = ""
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None
    options: tuple[str, ...] | str | None = None
    multiline: bool = False
    control_after_generate: bool = False
    optional: bool = False

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES


@dataclass(frozen=True)
class OutputSpec:
    name: str
    type: str
    tooltip: str = ""


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...] = ()
    is_output_node: bool = False
    category: str = CATEGORY
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def widgets(self) -> tuple[InputSpec, ...]:
        return tuple(i for i in self.inputs if i.is_widget)

    def ui_widget_names(self) -> list[str]:
        """Widget slots of UI-format ``widgets_values`` in order (``control_after_generate`` adds one)."""
        names: list[str] = []
        for widget in self.widgets:
            names.append(widget.name)
            if widget.control_after_generate:
                names.append(f"{widget.name}:control_after_generate")
        return names


# ---------------------------------------------------------------------------------------------------
# Shared input groups (the KSampler vocabulary, so users recognise the widgets)
# ---------------------------------------------------------------------------------------------------

_SAMPLING_WIDGETS = (
    InputSpec("seed", "INT", "Noise seed of the calibration runs (prompt i of a list uses seed + i).",
              default=0, min=0, max=SEED_MAX, control_after_generate=True),
    InputSpec("steps", "INT", "Sampling steps of each calibration run. Statistics are collected at every step.",
              default=20, min=1, max=10000),
    InputSpec("cfg", "FLOAT", "Classifier-free guidance scale; use the value you generate with.",
              default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
    InputSpec("sampler_name", "COMBO", "Sampler of the calibration runs; use the one you generate with.",
              options="samplers", default="euler"),
    InputSpec("scheduler", "COMBO", "Noise schedule of the calibration runs; use the one you generate with.",
              options="schedulers", default="simple"),
)

# Targets offered by SlimDiff Slim, and what each means. Values are mapped to core SlimConfig settings in
# nodes.py (`TARGETS`), kept here so the workflow tests know the legal values.
TARGET_CHOICES = (
    "attention+ffn",
    "attention+ffn, keep cross-attention",
    "attention",
    "ffn",
)

SAVE_DESTINATIONS = ("slim_models", "output")

# SlimConfig options that SlimDiff Slim offers as combo widgets, in this order after its own widgets. Each takes one
# of a fixed set of strings; its choices, default and tooltip are SlimConfig's (option_choices, option_default,
# option_help), and node_inputs.slim_config_for passes the value through. To offer another such option, add its
# name here (one the node does not set itself: not head_layout). Always append: UI-format workflows store widget
# values by position, so a workflow saved before an option was added keeps its values and gets the option's default.
SLIM_CONFIG_COMBOS: tuple[str, ...] = ("allocation_refinement", "vo_output_refit", "vo_statistics", "ffn_selection")


def _config_combo(name: str) -> InputSpec:
    """A combo widget for the SlimConfig option ``name``. Optional, so an API-format prompt written before the
    option was offered still validates (and gets SlimConfig's default)."""
    text = SlimConfig.option_help(name)
    return InputSpec(name, "COMBO", text[:1].upper() + text[1:], options=SlimConfig.option_choices(name),
                     default=SlimConfig.option_default(name), optional=True)


SLIM_CALIBRATE = NodeSpec(
    node_id="SlimCalibrate",
    display_name="SlimDiff Calibrate",
    description=("Runs real sampling with the given prompt conditioning and records the activation statistics "
                 "SlimDiff needs (at every step, with CFG). Connect the result to SlimDiff Slim. "
                 "The input model is not changed."),
    inputs=(
        InputSpec("model", "MODEL", "The model to calibrate (apply LoRAs before this node)."),
        *_SAMPLING_WIDGETS,
        InputSpec("positive", "CONDITIONING", "Prompt conditioning representative of what you will generate."),
        InputSpec("negative", "CONDITIONING", "Negative conditioning (used by CFG exactly as in KSampler)."),
        InputSpec("latent_image", "LATENT", "Latent size/batch of the calibration runs (e.g. Empty Latent Image)."),
    ),
    outputs=(OutputSpec("calibration", SLIM_CALIBRATION, "Activation statistics of this model."),),
)

SLIM_CALIBRATE_PROMPTS = NodeSpec(
    node_id="SlimCalibratePrompts",
    display_name="SlimDiff Calibrate (Prompt List)",
    description=("Like SlimDiff Calibrate, but encodes a list of prompts (one per line) and calibrates over all "
                 "of them: more diverse prompts give statistics that generalise better."),
    inputs=(
        InputSpec("model", "MODEL", "The model to calibrate (apply LoRAs before this node)."),
        InputSpec("clip", "CLIP", "Text encoder used to encode the prompts."),
        InputSpec("prompts", "STRING", "Calibration prompts, one per line. Empty lines are ignored.",
                  default="a photograph of a cat sitting on a sofa\n"
                          "a watercolor painting of a mountain lake at sunrise\n"
                          "portrait of an old man, studio lighting\n"
                          "a futuristic city street at night, neon signs",
                  multiline=True),
        InputSpec("negative_prompt", "STRING", "Negative prompt used with every calibration prompt.",
                  default="", multiline=True),
        *_SAMPLING_WIDGETS,
        InputSpec("latent_image", "LATENT", "Latent size/batch of each calibration run (e.g. Empty Latent Image)."),
    ),
    outputs=(OutputSpec("calibration", SLIM_CALIBRATION, "Activation statistics of this model."),),
)

SLIM_MODEL = NodeSpec(
    node_id="SlimModel",
    display_name="SlimDiff Slim",
    description=("Returns a new, physically smaller model: attention and feed-forward layers are replaced by "
                 "narrower ones computed in closed form from the calibration. The input model is not changed. "
                 "Apply LoRAs before this node (LoRA keys of slimmed layers no longer exist afterwards)."),
    inputs=(
        InputSpec("model", "MODEL", "The same model that was calibrated (LoRAs applied before calibration)."),
        InputSpec("calibration", SLIM_CALIBRATION, "Output of SlimDiff Calibrate for this model."),
        InputSpec("keep_ratio", "FLOAT",
                  "Fraction of the compressible (attention + feed-forward) parameters to keep, in (0, 1]. "
                  "Ignored when params_to_remove_millions > 0.",
                  default=0.7, min=0.01, max=1.0, step=0.01, round=0.001),
        InputSpec("params_to_remove_millions", "FLOAT",
                  "Budget as an absolute number of parameters to remove, in millions. 0 = use keep_ratio.",
                  default=0.0, min=0.0, max=100000.0, step=0.1, round=0.001),
        InputSpec("targets", "COMBO",
                  "Which groups to slim. 'keep cross-attention' leaves attn2 untouched (needed by IP-Adapter "
                  "and other patches that bring their own keys/values).",
                  options=TARGET_CHOICES, default=TARGET_CHOICES[0]),
        *(_config_combo(name) for name in SLIM_CONFIG_COMBOS),
    ),
    outputs=(OutputSpec("model", "MODEL", "The slimmed model."),),
)

SLIM_SAVE_MODEL = NodeSpec(
    node_id="SlimSaveModel",
    display_name="SlimDiff Save Slim Model",
    description=("Saves a slimmed model (diffusion model weights + its slim spec) as one .safetensors file that "
                 "SlimDiff Load Slim Model (and the diffusers side of SlimDiff) can load."),
    inputs=(
        InputSpec("model", "MODEL", "A model from SlimDiff Slim or SlimDiff Load Slim Model."),
        InputSpec("filename_prefix", "STRING", "File name prefix; may contain a sub-folder ('slimdiff/my_model').",
                  default="slimdiff/slim"),
        InputSpec("destination", "COMBO",
                  "models/slim_models (listed by Load Slim Model) or the output folder.",
                  options=SAVE_DESTINATIONS, default=SAVE_DESTINATIONS[0]),
    ),
    is_output_node=True,
)

SLIM_LOAD_MODEL = NodeSpec(
    node_id="SlimLoadModel",
    display_name="SlimDiff Load Slim Model",
    description=("Loads a SlimDiff .safetensors file from models/slim_models (saved by SlimDiff Save Slim Model "
                 "or by the diffusers side of SlimDiff). Load CLIP and VAE from the original checkpoint."),
    inputs=(
        InputSpec("slim_name", "COMBO", "A file in models/slim_models.", options="slim_models"),
    ),
    outputs=(OutputSpec("model", "MODEL", "The slimmed diffusion model."),),
)

SLIM_LOAD_LORA = NodeSpec(
    node_id="SlimLoadLora",
    display_name="SlimDiff Load LoRA",
    description=("Applies a LoRA made for the original model to a MODEL from SlimDiff Slim: each update of a layer "
                 "SlimDiff narrowed is mapped into the slim layer through the slimming's bases, the rest applies "
                 "as usual (on a dense MODEL it is the stock LoRA loader). ComfyUI's own Load LoRA cannot apply "
                 "to narrowed layers; SlimDiff refuses to sample with it rather than silently skip them. A MODEL "
                 "loaded from a slim file has no maps: apply LoRAs before SlimDiff Slim there."),
    inputs=(
        InputSpec("model", "MODEL", "The slim MODEL (SlimDiff Slim output), or any MODEL."),
        InputSpec("lora_name", "COMBO", "A LoRA in models/loras, made for the original model.", options="loras"),
        InputSpec("strength_model", "FLOAT", "How strongly to modify the diffusion model (as in Load LoRA).",
                  default=1.0, min=-100.0, max=100.0, step=0.01),
    ),
    outputs=(OutputSpec("model", "MODEL", "The MODEL with the LoRA applied."),),
)

NODE_SPECS: tuple[NodeSpec, ...] = (SLIM_CALIBRATE, SLIM_CALIBRATE_PROMPTS, SLIM_MODEL, SLIM_SAVE_MODEL, SLIM_LOAD_MODEL,
                                    SLIM_LOAD_LORA)
SPECS_BY_ID: dict[str, NodeSpec] = {spec.node_id: spec for spec in NODE_SPECS}
