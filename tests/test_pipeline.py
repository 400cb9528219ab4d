"""pipe.slim(): SlimSet selection, calibration with the pipeline's own sampler, report, reuse."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_sd_pipeline

import slimdiff_diffusers as sd
from slimdiff_diffusers.diffusers_adapter.slimset import build_slimset, default_prompt_pool, kmeans

SMALL = dict(num_inference_steps=3, batch_size=4, height=16, width=16, rank_multiple=2, ffn_multiple=8)


@pytest.fixture()
def pipe(tmp_path):
    return sd.enable_slimdiff(tiny_sd_pipeline(tmp_path))


def _image(p):
    return p("a red circle", num_inference_steps=3, height=16, width=16, output_type="np",
             generator=torch.Generator().manual_seed(0)).images


def test_pipe_slim_narrows_the_unet_in_place_and_reports(pipe, tmp_path):
    original = pipe.unet
    before = _image(pipe)
    report = pipe.slim(prompts=[f"prompt number {i}" for i in range(12)], num_prompts=8, keep_ratio=0.6,
                       save_calibration=tmp_path / "cal.safetensors", **SMALL)
    # in place: no second copy of the denoiser is ever held (issue 9); model_index names the slim class
    assert type(pipe.unet).__name__ == "SlimUNet2DConditionModel" and pipe.unet is original
    assert pipe.config["unet"] == ("slimdiff_diffusers", "SlimUNet2DConditionModel")
    assert report.num_prompts == 8 and len(set(report.prompts)) == 8
    assert report.calibration_forward_calls == 2 * 3  # 2 batches x 3 steps, CFG rows in one call
    assert report.slim.compressible_params_after <= 0.6 * report.slim.compressible_params_before
    assert "parameters" in str(report)
    after = _image(pipe)
    assert after.shape == before.shape and (after != before).any()
    # the calibration file reproduces the same slim model without running the pipeline again
    fresh = sd.enable_slimdiff(tiny_sd_pipeline(tmp_path / "b"))
    fresh.slim(calibration=tmp_path / "cal.safetensors", keep_ratio=0.6, rank_multiple=2, ffn_multiple=8)
    assert (_image(fresh) == after).all()


def test_cfg_rows_are_both_calibrated(pipe):
    """guidance > 1 runs uncond and cond rows: the text-state statistics see 2x the prompts' rows."""
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, k: calls.append(a[0].shape[0]), with_kwargs=True)
    pipe.slim(prompts=["a", "b", "c", "d"], num_prompts=4, keep_ratio=0.8, **SMALL)
    handle.remove()
    assert calls[0] == 8


def test_empty_prompts_are_refused(pipe):
    with pytest.raises(ValueError, match="empty"):
        pipe.slim(prompts=["", "  "], keep_ratio=0.5, **SMALL)
    with pytest.raises(ValueError, match="budget"):
        pipe.slim(prompts=["a"], **SMALL)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"


def test_mixin_on_a_pipeline_class(tmp_path):
    from diffusers import StableDiffusionPipeline

    class SlimmableSD(sd.SlimDiffPipelineMixin, StableDiffusionPipeline):
        pass
    base = tiny_sd_pipeline(tmp_path)
    pipe = SlimmableSD(**base.components, requires_safety_checker=False)
    report = pipe.slim(prompts=["x y", "z w"], num_prompts=2, keep_ratio=0.7, **SMALL)
    assert report.slim.params_after < report.slim.params_before


def test_slimset_kmeans_selects_diverse_prompts(pipe):
    pool = ["a red circle"] * 5 + ["a blue square"] * 5 + ["a green triangle"] * 5
    pool = [p + " " + "x" * i for i, p in enumerate(pool)]
    chosen = build_slimset(pipe, num_prompts=3, pool=pool)
    assert len(chosen) == 3 and chosen.seeds == [0, 1, 2]
    assert {p.split()[1] for p in chosen.prompts} == {"red", "blue", "green"}
    rand = build_slimset(pipe, num_prompts=3, pool=pool, method="random", seed=1)
    assert len(set(rand.prompts)) == 3
    with pytest.raises(ValueError, match="empty"):
        build_slimset(pipe, pool=["", " "])


def test_default_pool_and_kmeans():
    pool = default_prompt_pool()
    assert len(pool) >= 1000 and len(set(pool)) == len(pool)
    x = torch.cat([torch.randn(20, 2) + 10, torch.randn(20, 2) - 10])
    c = kmeans(x, 2)
    assert sorted(c[:, 0].round().tolist()) == pytest.approx([-10, 10], abs=1.5)


def test_attention_output_vo_collects_its_statistics(pipe, tmp_path):
    """The attention-output moments are off by default (decisions.md row 22); ``pipe.slim`` collects them when
    its config whitens VO by the attention output, so that choice still works in one call, and a calibration
    saved without them is refused with the way out before any decomposition."""
    pipe.slim(prompts=["a", "b"], num_prompts=2, keep_ratio=0.8, vo_statistics="attention_output",
              save_calibration=tmp_path / "with.safetensors", **SMALL)
    with_heads = sd.Calibration.load(tmp_path / "with.safetensors")
    xx, _ = with_heads.attention_output_moment(with_heads.sites.attention[0])
    assert xx.shape[-1] == with_heads.sites.attention[0].head_dim
    plain = sd.enable_slimdiff(tiny_sd_pipeline(tmp_path / "b"))
    plain.slim(prompts=["a", "b"], num_prompts=2, keep_ratio=0.8, save_calibration=tmp_path / "without.safetensors",
               **SMALL)
    without = sd.Calibration.load(tmp_path / "without.safetensors")
    with pytest.raises(sd.core.CalibrationError, match="attention_output_statistics=True"):
        without.attention_output_moment(without.sites.attention[0])
    again = sd.enable_slimdiff(tiny_sd_pipeline(tmp_path / "c"))
    with pytest.raises(sd.core.CalibrationError, match="attention_output_statistics=True"):
        again.slim(calibration=tmp_path / "without.safetensors", keep_ratio=0.8, vo_statistics="attention_output",
                   rank_multiple=2, ffn_multiple=8)
    assert type(again.unet).__name__ == "UNet2DConditionModel"
