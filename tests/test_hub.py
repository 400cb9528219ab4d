"""Sharing on the Hub: the SlimDiff model card, `slimdiff push`, and `push_to_hub` of slim pipelines and models.

The Hub cannot be reached from the test machines: uploads are intercepted at the HfApi boundary by
``hub_fakes.FakeHub`` (create_repo / create_branch / upload_folder replaced; everything above them, SlimDiff's
staging, card and single-file code and huggingface_hub's file selection, is real), and read back from the real
huggingface_hub cache layout as a Hub user reads them. ``test_real_hub_round_trip`` talks to the real Hub when
SLIMDIFF_HUB_TOKEN and SLIMDIFF_HUB_SCRATCH_REPO are set, and is skipped otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from hub_fakes import FakeHub
from huggingface_hub import ModelCard, hf_hub_download
from tiny_models import tiny_sd_pipeline

import slimdiff_diffusers as sd
from slimdiff_diffusers.cli import main
from slimdiff_diffusers.core.errors import OutputFolderError

PIPELINE_FILES = {  # what save_pretrained writes for the tiny StableDiffusionPipeline
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "unet/slimdiff_lora_maps.safetensors",  # the slim UNet's LoRA basis maps (LoRAs made for the original model)
}
SLIMDIFF_FILES = {"README.md", "images/before_after.png", "images/rank_allocation.png", "slim_unet.safetensors"}
PROMPTS = "a red circle\na blue square\na green triangle\na yellow star\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`slimdiff slim` on a tiny pipeline (seconds): an output folder to push."""
    folder = tmp_path_factory.mktemp("hub")
    original = _fake_cached_snapshot(folder / "hf", "someone/tiny-sd", "apache-2.0")
    shutil.copytree(original, folder / "original", ignore=shutil.ignore_patterns("README.md"))  # not slimmed
    (folder / "prompts.txt").write_text(PROMPTS)
    code = main(["slim", str(original), "--prompts", str(folder / "prompts.txt"), "--eval-prompts",
                 str(folder / "prompts.txt"), "--steps", "2", "--num-prompts", "4", "--num-eval-prompts", "2",
                 "--keep-ratio", "0.5", "--rank-multiple", "2", "--ffn-multiple", "8", "--out", str(folder / "run")])
    assert code == 0
    return folder


@pytest.fixture
def hub(monkeypatch):
    return FakeHub().install(monkeypatch)


def _image(pipe, prompt="a red circle"):
    return pipe(prompt, num_inference_steps=2, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _eps(unet):
    gen = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 24, generator=gen)
    with torch.no_grad():
        return unet(x, 321, encoder_hidden_states=ctx).sample


def test_push_uploads_exactly_the_repository_and_it_loads_back(tiny_run, tmp_path, hub, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run / "run", out)
    assert main(["push", str(out), "someone/tiny-slim", "--token", "hf_test"]) == 0
    assert "someone/tiny-slim" in capsys.readouterr().out
    files = hub.files("someone/tiny-slim")
    assert set(files) == PIPELINE_FILES | SLIMDIFF_FILES | {".gitattributes"}
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1]["token"] == "hf_test" and hub.calls[0][1]["private"] is None
    assert (out / "pipeline" / "slim_unet.safetensors").is_file(), "the single file is kept in the output folder"

    # Read it back the way a Hub user does: the real cache layout, real from_pretrained / hf_hub_download.
    cache = hub.materialize(tmp_path / "cache")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("someone/tiny-slim", cache_dir=cache, local_files_only=True)
    local = DiffusionPipeline.from_pretrained(out / "pipeline")
    assert type(pipe.unet).__name__ == "SlimUNet2DConditionModel"
    assert (_image(pipe) == _image(local)).all()
    card = ModelCard.load(hf_hub_download("someone/tiny-slim", "README.md", cache_dir=cache, local_files_only=True))
    assert card.data.library_name == "diffusers" and "slimdiff" in card.data.tags
    assert card.data.pipeline_tag == "text-to-image"
    assert 'from_pretrained("someone/tiny-slim"' in card.text, "the pushed card names its repository"
    assert "hf download someone/tiny-slim slim_unet.safetensors" in card.text
    for image in ("images/before_after.png", "images/rank_allocation.png"):
        assert f"]({image})" in card.text and files[image].startswith(b"\x89PNG")
    single = hf_hub_download("someone/tiny-slim", "slim_unet.safetensors", cache_dir=cache, local_files_only=True)
    assert torch.equal(_eps(sd.load_slim_unet_file(single)), _eps(local.unet))


def test_push_again_updates_the_repository(tiny_run, tmp_path, hub):
    out = tmp_path / "run"
    shutil.copytree(tiny_run / "run", out)
    assert main(["push", str(out), "someone/tiny-slim"]) == 0
    files = hub.files("someone/tiny-slim")
    files["unet/diffusion_pytorch_model.fp16.safetensors"] = b"stale weights of an earlier run"
    files["NOTES.md"] = b"added on the Hub by hand"
    first_card = files["README.md"]
    assert main(["push", str(out), "someone/tiny-slim"]) == 0
    files = hub.files("someone/tiny-slim")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in files, "stale files in uploaded folders go"
    assert files["NOTES.md"] == b"added on the Hub by hand", "files SlimDiff does not own stay"
    assert files["README.md"] == first_card and hub.commits == 2
    # another repository and a branch, private: the card is re-rendered for the new repo id
    assert main(["push", str(out), "someone/other", "--revision", "v2", "--private"]) == 0
    assert ("create_branch", {"repo_id": "someone/other", "branch": "v2"}) in hub.calls
    assert hub.calls[-3][1]["private"] is True
    assert b'from_pretrained("someone/other"' in hub.files("someone/other", "v2")["README.md"]
    assert set(hub.files("someone/other", "main")) == {".gitattributes"}


def test_push_keeps_an_edited_card_and_writes_a_missing_one(tiny_run, tmp_path, hub):
    edited = tmp_path / "edited"
    shutil.copytree(tiny_run / "run", edited)
    card_path = edited / "pipeline" / "README.md"
    card_path.write_text(card_path.read_text() + "\nMy own notes.\n")
    assert main(["push", str(edited), "someone/edited"]) == 0
    assert hub.files("someone/edited")["README.md"] == card_path.read_bytes(), "an edited card is uploaded as is"
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run / "run" / "pipeline", bare)  # a pipeline folder (no images, no card)
    for name in ("README.md", "images"):
        shutil.rmtree(bare / name) if (bare / name).is_dir() else (bare / name).unlink()
    assert main(["push", str(bare), "someone/bare"]) == 0
    assert set(hub.files("someone/bare")) == PIPELINE_FILES | {"README.md", "slim_unet.safetensors", ".gitattributes"}
    card = ModelCard.load(bare / "README.md")
    assert card.data.base_model is None and "slimdiff" in card.data.tags
    assert 'from_pretrained("someone/bare"' in card.text and "Not measured for this upload" in card.text


def test_push_validates_the_folder_before_uploading(tiny_run, tmp_path, hub, capsys):
    assert main(["push", str(tmp_path / "missing"), "someone/x"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "someone/x"]) == 2
    assert "not a slimdiff output folder" in capsys.readouterr().err
    assert main(["push", str(tiny_run / "original"), "someone/x"]) == 2
    assert "is not slimmed" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "run", broken)
    (broken / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert main(["push", str(broken), "someone/x"]) == 2
    assert "has no weights" in capsys.readouterr().err
    assert hub.calls == [], "nothing reaches the Hub when the folder is not valid"
    with pytest.raises(OutputFolderError):
        sd.push_output_folder(tmp_path, "someone/x")


def test_push_help_explains_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["push", "--help"])
    text = capsys.readouterr().out
    for expected in ("OUT_DIR", "REPO_ID", "--private", "--revision", "--token", "model card", "ComfyUI",
                     "pushing again updates"):
        assert expected in text


def _fake_cached_snapshot(root: Path, repo_id: str, license: str) -> Path:
    """A pipeline in the huggingface_hub cache layout, with the model card the Hub repo would have."""
    snapshot = root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("a" * 40)
    tiny_sd_pipeline(root / "parts").save_pretrained(snapshot)
    (snapshot / "README.md").write_text(f"---\nlicense: {license}\nlibrary_name: diffusers\n---\n# tiny\n")
    return snapshot


def test_pipe_push_to_hub_writes_the_slimdiff_card(tmp_path, hub):
    from diffusers import DiffusionPipeline

    snapshot = _fake_cached_snapshot(tmp_path / "hf", "someone/tiny-sd", "apache-2.0")
    pipe = sd.enable_slimdiff(DiffusionPipeline.from_pretrained(snapshot))
    pipe.set_progress_bar_config(disable=True)
    report = pipe.slim(PROMPTS.split("\n")[:4], keep_ratio=0.5, num_prompts=4, num_inference_steps=2,
                       rank_multiple=2, ffn_multiple=8, seed=7, progress=False)
    pipe.push_to_hub("someone/tiny-sd-slim")
    files = hub.files("someone/tiny-sd-slim")
    assert set(files) == PIPELINE_FILES | {"README.md", "images/rank_allocation.png", "slim_unet.safetensors",
                                           ".gitattributes"}
    cache = hub.materialize(tmp_path / "cache")
    card = ModelCard.load(hf_hub_download("someone/tiny-sd-slim", "README.md", cache_dir=cache, local_files_only=True))
    assert card.data.base_model == "someone/tiny-sd" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-to-image" and card.data.library_name == "diffusers"
    assert "slimdiff" in card.data.tags
    from slimdiff_diffusers.hub.card import slimset_sha256

    assert f"`{slimset_sha256(report.prompts)}`" in card.text and "| 4 | 2 | 7.5 | 7 |" in card.text
    assert f"{report.slim.params_before:,} | {report.slim.params_after:,}" in card.text
    assert "Not measured for this upload" in card.text, "pipe.slim measures no quality: the card says so"
    reloaded = DiffusionPipeline.from_pretrained("someone/tiny-sd-slim", cache_dir=cache, local_files_only=True)
    assert (_image(reloaded) == _image(pipe)).all()


def test_pushing_a_pipeline_loaded_from_a_slimdiff_folder_keeps_its_measurements(tiny_run, hub):
    from diffusers import DiffusionPipeline

    pipe = sd.enable_slimdiff(DiffusionPipeline.from_pretrained(tiny_run / "run" / "pipeline"))
    pipe.push_to_hub("someone/reloaded")
    files = hub.files("someone/reloaded")
    assert set(files) == PIPELINE_FILES | SLIMDIFF_FILES | {".gitattributes"}
    pushed = ModelCard(files["README.md"].decode())
    local = ModelCard.load(tiny_run / "run" / "pipeline" / "README.md")
    assert pushed.data.base_model == "someone/tiny-sd" and pushed.data.license == "apache-2.0"
    assert pushed.data.slimdiff["quality"] == local.data.slimdiff["quality"] is not None
    assert pushed.data.slimdiff["calibration"] == local.data.slimdiff["calibration"]


def test_a_card_written_before_the_refinement_was_recorded_keeps_its_wording(tiny_run, tmp_path):
    """Cards whose facts have no allocation refinement (written before it was recorded) render as they were written,
    so `slimdiff push` still recognises them as unedited and fills in the repo id; new cards state it."""
    from slimdiff_diffusers.hub.card import base_from_card, card_facts, render_model_card, rerender_for_repo

    card = ModelCard.load(tiny_run / "run" / "pipeline" / "README.md")
    assert "allocation `sis, refinement none (auto), influence measured`" in card.text
    facts = card_facts(card)
    for key in ("allocation_refinement", "allocation_refinement_used", "propagation_used"):
        del facts.budget[key]
    old = render_model_card(facts, base_from_card(card))
    assert "head layout `separate`, allocation `sis`)." in old.text and "refinement" not in old.text
    old.save(tmp_path / "README.md")
    assert rerender_for_repo(tmp_path / "README.md", "someone/old-card")
    assert "someone/old-card" in (tmp_path / "README.md").read_text()


def test_card_for_a_pipeline_with_no_known_base(tmp_path, sd15_calibration):
    pipe = tiny_sd_pipeline(tmp_path / "parts")  # built in memory: no Hub id, no card, no licence
    pipe.unet = sd.slim(pipe.unet, sd15_calibration, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8)
    path = sd.write_model_card(tmp_path / "card", pipe)
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    card = ModelCard.load(path)
    assert card.data.base_model is None and card.data.license is None
    assert "base_model" not in card.content.split("---")[1], "an unknown base is absent, not empty"
    assert card.data.pipeline_tag == "text-to-image" and "slimdiff" in card.data.tags
    assert "Base model: unknown on the Hub" in card.text and "licence is not known" in card.text
    assert "<repo_id>" in card.text, "no repo yet: the snippet has a placeholder"
    # sizes come from the in-memory report; calibration settings were not given (model-level slim)
    assert f"{pipe.unet.slimdiff_report.params_before:,}" in card.text
    with pytest.raises(ValueError, match="not slimmed"):
        sd.write_model_card(tmp_path / "card2", tiny_sd_pipeline(tmp_path / "parts2"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_card_of_a_reloaded_model_counts_sizes_from_its_spec(tmp_path, sd15_unet, sd15_calibration):
    slim = sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8)
    slim.save_pretrained(tmp_path / "unet")
    reloaded = sd.SlimUNet2DConditionModel.from_pretrained(tmp_path / "unet")
    card = ModelCard.load(sd.write_model_card(tmp_path / "card", reloaded))
    r = slim.slimdiff_report
    facts = card.data.slimdiff
    assert (facts["params_before"], facts["params_after"]) == (r.params_before, r.params_after)
    assert (facts["compressible_params_before"], facts["compressible_params_after"]) == \
        (r.compressible_params_before, r.compressible_params_after)
    assert "Budget: not recorded" in card.text and "SlimUNet2DConditionModel.from_pretrained" in card.text


@pytest.mark.skipif(not (os.environ.get("SLIMDIFF_HUB_TOKEN") and os.environ.get("SLIMDIFF_HUB_SCRATCH_REPO")),
                    reason="set SLIMDIFF_HUB_TOKEN and SLIMDIFF_HUB_SCRATCH_REPO (a repo id you may overwrite) to "
                           "test against the real Hub")
def test_real_hub_round_trip(tiny_run, tmp_path):
    """Opt-in: pushes to the real Hub (a private branch of the scratch repo) and downloads it back."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import HfApi

    token, repo_id = os.environ["SLIMDIFF_HUB_TOKEN"], os.environ["SLIMDIFF_HUB_SCRATCH_REPO"]
    branch = f"slimdiff-test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    shutil.copytree(tiny_run / "run", out)
    try:
        assert main(["push", str(out), repo_id, "--private", "--revision", branch, "--token", token]) == 0
        listed = set(HfApi(token=token).list_repo_files(repo_id, revision=branch))
        assert listed >= PIPELINE_FILES | SLIMDIFF_FILES
        pipe = DiffusionPipeline.from_pretrained(repo_id, revision=branch, token=token, cache_dir=tmp_path / "dl")
        assert (_image(pipe) == _image(DiffusionPipeline.from_pretrained(out / "pipeline"))).all()
        card = ModelCard.load(hf_hub_download(repo_id, "README.md", revision=branch, token=token,
                                              cache_dir=tmp_path / "dl"))
        assert "slimdiff" in card.data.tags and card.data.library_name == "diffusers"
    finally:
        HfApi(token=token).delete_branch(repo_id, branch=branch)


def test_slim_of_a_downloaded_snapshot_names_its_base_and_licence(tiny_run):
    """`slimdiff slim` on a snapshot in the Hugging Face cache: the card names the repo as base_model, takes its
    licence from the cached card, and carries the CLI's measurements (those of report.json)."""
    card = ModelCard.load(tiny_run / "run" / "pipeline" / "README.md")
    report = json.loads((tiny_run / "run" / "report.json").read_text())
    facts = card.data.slimdiff
    assert card.data.base_model == "someone/tiny-sd" and card.data.license == "apache-2.0"
    assert "[`someone/tiny-sd`](https://huggingface.co/someone/tiny-sd)" in card.text
    assert "slimdiff slim someone/tiny-sd --keep-ratio 0.5" in card.text
    assert facts["params_after"] == report["size"]["params_after"]
    assert facts["quality"]["psnr_db"] == pytest.approx(report["quality"]["psnr_db"], rel=1e-5)
    assert facts["calibration"]["prompts"] == report["calibration"]["prompts"] == 4
