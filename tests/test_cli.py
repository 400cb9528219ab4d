"""The `slimdiff` command: the main job on a reduced setting, its outputs, and errors a user can act on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_sd_pipeline

from slimdiff_diffusers.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    tiny_sd_pipeline(folder / "parts").save_pretrained(folder / "pipeline")
    prompts = folder / "prompts.txt"
    prompts.write_text("# calibration prompts\na red circle\na blue square\na green triangle\na yellow star\n")
    return folder


def test_slim_writes_a_loadable_pipeline_and_reports(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["slim", str(tiny_pipeline_dir / "pipeline"), "--prompts", str(tiny_pipeline_dir / "prompts.txt"),
                 "--eval-prompts", str(tiny_pipeline_dir / "prompts.txt"), "--steps", "3", "--num-prompts", "4",
                 "--keep-ratio", "0.5", "--rank-multiple", "2", "--ffn-multiple", "8", "--save-calibration",
                 "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"pipeline", "report.json", "report.md", "before_after.png",
                                               "rank_allocation.png", "calibration.safetensors"}
    report = json.loads((out / "report.json").read_text())
    assert report["size"]["compressible_after"] <= 0.5 * report["size"]["compressible_before"]
    assert report["quality"]["psnr_db"] > 10 and 0 < report["quality"]["ssim"] <= 1
    assert report["speed"]["unet_latency_ms"]["slim"] > 0
    assert "Rank allocation" in (out / "report.md").read_text()
    # the allocation refinement the run used ("auto" resolves to the descent alone on a UNet), in every report
    assert report["config"]["allocation_refinement"] == "auto" and report["allocation_refinement"] == "none"
    assert "Allocation: sis, refinement none (auto), influence measured." in (out / "report.md").read_text()
    # the group influences were measured in calibration ("auto" resolved: decisions row 36)
    assert report["config"]["propagation"] == "auto" and report["propagation"] == "measured"
    # and "auto" keeps the SVD factor of a UNet's VO readers: no refit, nothing said about it
    assert report["config"]["vo_output_refit"] == "auto" and report["vo_output_refit"] == {"plain": "none"}
    assert "VO readers" not in (out / "report.md").read_text()
    # "auto" whitens a UNet's VO bases with the value inputs (decisions row 31): recorded, not stated
    assert report["config"]["vo_statistics"] == "auto" and report["vo_statistics"] == {"plain": "input"}
    assert "VO bases" not in (out / "report.md").read_text()
    assert "--vo-statistics" not in (out / "pipeline" / "README.md").read_text()  # nothing to carry
    assert "allocation `sis, refinement none (auto), influence measured`" in (out / "pipeline" / "README.md").read_text()
    assert "--propagation measured" in (out / "pipeline" / "README.md").read_text()  # the make-it-again command
    from diffusers import DiffusionPipeline
    from PIL import Image

    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe.unet).__name__ == "SlimUNet2DConditionModel"
    assert Image.open(out / "before_after.png").size[0] > 100
    assert "parameters" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"


def test_allocation_refinement_option_reaches_the_config_and_the_card(tiny_pipeline_dir, tmp_path, capsys):
    """--allocation-refinement is SlimConfig.allocation_refinement: the run's config, the allocation it ran, the
    report and the model card (with the reproduce command) say so; a value SlimConfig does not know is refused by
    argparse before anything is loaded."""
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    code = main(["slim", str(tiny_pipeline_dir / "pipeline"), "--prompts", str(tiny_pipeline_dir / "prompts.txt"),
                 "--eval-prompts", str(tiny_pipeline_dir / "prompts.txt"), "--steps", "2", "--num-prompts", "4",
                 "--num-eval-prompts", "2", "--keep-ratio", "0.5", "--rank-multiple", "2", "--ffn-multiple", "8",
                 "--allocation-refinement", "refill", "--vo-statistics", "attention_output", "--ffn-selection", "greedy",
                 "--propagation", "probe",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["allocation_refinement"] == "refill" and report["allocation_refinement"] == "refill"
    # --vo-statistics attention_output on a UNet: the calibration collected the head outputs it needs
    assert report["config"]["vo_statistics"] == "attention_output"
    assert report["vo_statistics"] == {"plain": "attention_output"}
    assert "VO bases (`to_v`, `add_v_proj`): whitened with the attention outputs (plain attention)." in \
        (out / "report.md").read_text()
    assert "Allocation: sis, refinement refill, influence probe." in (out / "report.md").read_text()
    assert report["config"]["propagation"] == report["propagation"] == "probe"
    # --ffn-selection greedy: the run's config, report.md, the card's sentence and its make-it-again command
    assert report["config"]["ffn_selection"] == "greedy"
    assert "Feed-forward channels: chosen by output-aware greedy forward selection." in (out / "report.md").read_text()
    card = ModelCard.load(out / "pipeline" / "README.md")
    budget = card.data.slimdiff["budget"]
    assert (budget["allocation_refinement"], budget["allocation_refinement_used"]) == ("refill", "refill")
    assert "allocation `sis, refinement refill, influence probe`" in card.text
    assert "--allocation-refinement refill" in card.text  # the "make it again" command
    assert budget["propagation_used"] == "probe" and "--propagation probe" in card.text
    assert budget["vo_statistics_used"] == {"plain": "attention_output"}
    assert "--vo-statistics attention_output" in card.text
    assert budget["ffn_selection"] == "greedy" and "--ffn-selection greedy" in card.text
    assert "The feed-forward channels were chosen by output-aware greedy forward selection." in card.text
    with pytest.raises(SystemExit) as exit_info:
        main(["slim", str(tiny_pipeline_dir / "pipeline"), "--allocation-refinement", "greedy",
              "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--allocation-refinement: invalid choice: 'greedy'" in err and "'exchange', 'refill', 'none'" in err
    assert not (tmp_path / "never").exists()


def test_errors_are_actionable(tiny_pipeline_dir, tmp_path, capsys):
    assert main(["slim", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["slim", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("precious")
    assert main(["slim", str(tiny_pipeline_dir / "pipeline"), "--out", str(tmp_path / "busy")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "precious"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    assert main(["slim", str(tiny_pipeline_dir / "pipeline"), "--prompts", str(empty), "--out", str(tmp_path / "o2")]) == 2
    assert "has no prompts" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    with pytest.raises(SystemExit):
        main(["slim", "--keep-ratio", "1.5"])
    assert "must be in (0, 1]" in capsys.readouterr().err


def test_unwritable_output(tiny_pipeline_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["slim", str(tiny_pipeline_dir / "pipeline"), "--out", str(blocker / "run")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_hub_id_offline_suggests_a_local_folder(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "slimdiff_diffusers.cli", "slim", "someone/not-cached",
                             "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 2
    assert "pass a local folder" in result.stderr


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit):
        main(["slim", "--help"])
    text = capsys.readouterr().out
    assert "--keep-ratio" in text and "fraction of the compressible cost" in text
    # --allocation-refinement: SlimConfig's choices, default and docstring (core/config.py owns them)
    from slimdiff_diffusers.core.config import ALLOCATION_REFINEMENTS, VO_OUTPUT_REFITS, SlimConfig

    flat = "".join(text.split())  # argparse wraps lines (at spaces and hyphens) to the terminal's width
    assert f"--allocation-refinement{{{','.join(ALLOCATION_REFINEMENTS)}}}" in flat
    assert "".join(SlimConfig.option_help("allocation_refinement").split()) in flat
    assert "(default:auto;" in flat
    assert f"--vo-output-refit{{{','.join(VO_OUTPUT_REFITS)}}}" in flat
    assert "".join(SlimConfig.option_help("vo_output_refit").split()) in flat
    assert "--vo-statistics{auto,input,attention_output}" in flat
    assert "".join(SlimConfig.option_help("vo_statistics").split()) in flat


def test_main_job_on_the_embedded_model(tmp_path):
    """The README's main job, on a reduced setting: embedded model, few prompts and steps."""
    out = tmp_path / "slim-out"
    code = main(["slim", "--num-prompts", "8", "--steps", "6", "--num-eval-prompts", "4", "--keep-ratio", "0.6",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "embedded default model"
    assert report["calibration"]["prompts"] == 8 and report["calibration"]["steps"] == 6
    assert report["size"]["compressible_after"] <= 0.6 * report["size"]["compressible_before"]
    assert report["quality"]["adherence"]["slim"]["mean"] >= 0.0
    assert report["quality"]["psnr_db"] > 20, "a 0.6 keep ratio should stay close to the original"
    assert (out / "pipeline" / "model_index.json").is_file()
    # The Hub model card, read back by huggingface_hub (metadata) with its pictures next to it.
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "pipeline" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "slimdiff" in card.data.tags
    assert card.data.base_model is None, "the embedded model has no Hub id"
    assert card.data.license == "mit", "the embedded model ships under the package's licence"
    facts = card.data.slimdiff
    assert facts["budget"]["keep_ratio"] == 0.6 and facts["calibration"]["prompts"] == 8
    assert facts["calibration"]["steps"] == 6 and facts["calibration"]["seed"] == 0
    assert len(facts["calibration"]["slimset_sha256"]) == 64
    assert facts["params_before"] == report["size"]["params_before"]
    assert facts["quality"]["psnr_db"] == pytest.approx(report["quality"]["psnr_db"], rel=1e-5)
    for image in ("images/before_after.png", "images/rank_allocation.png"):
        assert f"]({image})" in card.text and (out / "pipeline" / image).is_file()
    assert "pip install slimdiff-diffusers" in card.text and "DiffusionPipeline.from_pretrained" in card.text
    assert "SlimDiff Load Slim Model" in card.text and "Base model: unknown on the Hub" in card.text
