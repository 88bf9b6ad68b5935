"""The teacher-at-its-best reference: the grid is scored, the best setting wins, the cache follows the weights."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from fewstep.digits import scoring, teacher_grid

GRID = {"guidance_scale": (1.0, 3.0), "steps": (2, 4), "sampler": ("ddim", "ddpm")}


@pytest.fixture
def teacher(tiny_teacher_dir, tmp_path):
    from diffusers import DDIMScheduler, UNet2DModel
    from fewstep_pipelines import FewStepClassPipeline

    from fewstep.run.folders import save_pipeline_dir

    folder = tmp_path / "teacher"
    save_pipeline_dir(FewStepClassPipeline(unet=UNet2DModel.from_pretrained(tiny_teacher_dir / "unet"),
                                           scheduler=DDIMScheduler.from_pretrained(tiny_teacher_dir / "scheduler")),
                      folder)
    yield folder
    shutil.rmtree(folder)


def test_every_setting_is_screened_and_the_lowest_fd_is_the_reference(teacher):
    out = teacher_grid.teacher_best(teacher, 20, seeds=(0, 1), grid=GRID, screen_samples=20, top=2)
    assert [(r["sampler"], r["steps"], r["guidance_scale"]) for r in out["screen"]] == [
        (s, k, w) for s in GRID["sampler"] for k in GRID["steps"] for w in GRID["guidance_scale"]]
    screened = sorted(out["screen"], key=lambda r: r["fd_digits"])[:2]
    assert [(r["sampler"], r["steps"], r["guidance_scale"]) for r in out["final"]] == [
        (r["sampler"], r["steps"], r["guidance_scale"]) for r in screened]
    assert out["best"]["fd_digits"] == min(r["fd_digits"] for r in out["final"])
    assert out["best"]["seeds"] == [0, 1] and out["best"]["num_samples"] == 20
    for key in ("precision", "recall", "fd_digits_net2", "nearest_train", "per_class_fd"):
        assert key in out["best"]
    # a screened row is the plain score of that setting with that sampler
    pipe = scoring.load_pipeline(teacher)
    base = dict(pipe.scheduler.config)
    row = out["screen"][-1]
    teacher_grid.with_sampler(pipe, row["sampler"], base)
    again = scoring.score(pipe, 20, (0,), steps=row["steps"], guidance_scale=row["guidance_scale"])
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert again["fd_digits"] == pytest.approx(row["fd_digits"], rel=1e-9)


def test_the_ddpm_sampler_is_stochastic_and_ddim_is_not(teacher):
    pipe = scoring.load_pipeline(teacher)
    base = dict(pipe.scheduler.config)
    x_ddim, _ = scoring.generate(teacher_grid.with_sampler(pipe, "ddim", base), 4, 0, 4)
    x_ddpm, _ = scoring.generate(teacher_grid.with_sampler(pipe, "ddpm", base), 4, 0, 4)
    x_ddpm2, _ = scoring.generate(pipe, 4, 0, 4)
    assert torch.equal(x_ddpm, x_ddpm2)                                  # per-image seeds: reproducible
    assert (x_ddim - x_ddpm).abs().max() > 1e-2                          # but not DDIM's deterministic path


def test_the_grid_cache_is_read_back_and_invalidated_when_the_weights_change(teacher):
    from safetensors.torch import load_file, save_file

    calls = []
    first = teacher_grid.teacher_best(teacher, 20, seeds=(0,), grid=GRID, screen_samples=20, log=calls.append)
    assert calls and (teacher / teacher_grid.CACHE_NAME).is_file()
    calls.clear()
    assert teacher_grid.teacher_best(teacher, 20, seeds=(0,), grid=GRID, screen_samples=20, log=calls.append) == first
    assert calls == []                                                   # nothing scored again
    # another final protocol re-scores only the final stage
    teacher_grid.teacher_best(teacher, 30, seeds=(0,), grid=GRID, screen_samples=20, log=calls.append)
    assert len(calls) == 1 and "re-scoring" in calls[0]
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.05 for k, v in load_file(weights).items()}, weights)
    calls.clear()
    second = teacher_grid.teacher_best(teacher, 20, seeds=(0,), grid=GRID, screen_samples=20, log=calls.append)
    assert len(calls) > 1 and second["weights_sha256"] != first["weights_sha256"]
    assert second["screen"][0]["fd_digits"] != first["screen"][0]["fd_digits"]
    assert json.loads((teacher / teacher_grid.CACHE_NAME).read_text())["weights_sha256"] == second["weights_sha256"]


def test_an_unwritable_teacher_folder_caches_in_the_user_cache(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (teacher / teacher_grid.CACHE_NAME).mkdir()          # the cache file cannot be written there (tests run as root)
    first = teacher_grid.teacher_best(teacher, 10, seeds=(0,), grid=GRID, screen_samples=10)
    cached = list((tmp_path / "cache" / "fewstep" / "teacher_grid").glob("*.json"))
    assert [p.stem for p in cached] == [first["weights_sha256"]]
    calls = []
    assert teacher_grid.teacher_best(teacher, 10, seeds=(0,), grid=GRID, screen_samples=10, log=calls.append) == first
    assert calls == []
