"""The flow-map export of a two-time student (MeanFlow, arXiv 2505.13447): one plain diffusers backbone, the offset
embedding e(t - r) as its own component (``pipelines/flowmap_fewstep.py``, in ``scheduler/time_offset/``) and a
``FewStepScheduler`` that records each step count's t-list and flow-time (t, r) pairs. Reloaded in a Python that cannot
import fewstep (the class pipeline) and in the stock ``StableDiffusionPipeline`` (tiny SD1.5), it samples what
fewstep's MeanFlow sampler ``z_r = z_t - (t - r) u(z_t, r, t)`` does at every step count 1 .. max, within 1e-5; the
digits evaluation's loader (``scoring.load_pipeline``) gets the same images. The student's offset embedding is given
random weights, so r changes every image (checked: the backbone at r = t is far from the student).
"""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from fewstep_pipelines import FewStepScheduler
from test_meanflow import PROMPTS, meanflow_run
from test_pipelines_export import reload_without_fewstep
from tiny_models import captioned_images

from fewstep.backbones.encoders import PromptEncoder
from fewstep.core.conditioning import Cond
from fewstep.core.generator import FewStepGenerator
from fewstep.core.two_time import PREFIX, embedding_of
from fewstep.digits.scoring import load_pipeline
from fewstep.run import export

TLIST, STEPS = (999, 499), 8        # a 2-step student exported for 1 .. 8 steps (MeanFlowConfig.export_steps)


def trained(tmp_path, teacher, **data):
    """A MeanFlow run's (cfg, teacher, source, method) whose offset embedding has random weights: r matters."""
    cfg, loaded, source, method = meanflow_run(tmp_path, teacher, TLIST, **data)
    torch.manual_seed(1)
    with torch.no_grad():
        embedding_of(method.student.denoiser.backbone.model).linear_2.weight.normal_(0, 0.05)
    return cfg, loaded, source, method


def test_class_export_reloads_without_fewstep_and_samples_every_step_count(tiny_teacher_dir, tmp_path):
    cfg, loaded, _, method = trained(tmp_path / "run", tiny_teacher_dir)
    out = export.export_student(cfg, loaded, method.student, None)
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"unet/diffusion_pytorch_model.safetensors", "scheduler/scheduling_fewstep.py",
            "scheduler/time_offset/flowmap_fewstep.py", "scheduler/time_offset/config.json",
            "scheduler/time_offset/diffusion_pytorch_model.safetensors"} <= files
    assert not any(k.startswith(PREFIX) for k in load_pipeline(out).unet.state_dict())      # a plain UNet2DModel
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["renoise"] == "ddim" and sched["train_timesteps"] == list(TLIST)
    assert [len(ts) for ts in sched["flow_map_timesteps"]] == list(range(1, STEPS + 1))
    assert sched["flow_map_timesteps"][1] == list(TLIST) and sched["flow_map_timesteps"][3] == [999, 749, 499, 249]
    t, r = method.student.pairs(3)
    assert sched["flow_map_pairs"][2] == [[float(a), float(b)] for a, b in zip(t, r)]
    for pairs in sched["flow_map_pairs"]:       # each step jumps to the next listed time, the last to 0
        assert [p[1] for p in pairs] == [p[0] for p in pairs[1:]] + [0.0]

    calls = [(n, 1.0) for n in range(1, STEPS + 1)]
    got = reload_without_fewstep(tmp_path, {"student": (out, calls)})
    assert got["student", "scheduler"].endswith("scheduling_fewstep.FewStepScheduler")
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))     # the reload's draws
    cond = Cond(labels=torch.tensor([3, 7]))
    refs = {n: (method.student.sample(noise, cond, steps=n).clamp(-1, 1) + 1) / 2 for n in range(1, STEPS + 1)}
    for n in range(1, STEPS + 1):
        torch.testing.assert_close(got["student", n, 1.0], refs[n].float(), atol=1e-5, rtol=0, msg=f"{n} steps")
    # the digits evaluation loads the same folder with fewstep's own classes: the same images
    pipe = load_pipeline(out)
    img = pipe([3, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(img, refs[3].float(), atol=1e-5, rtol=0)
    # the run folder's generator_config.json names the flow map: its backbone alone (r = t) is another sampler
    assert json.loads((out / "generator_config.json").read_text())["_class_name"] == "MeanFlowStudent"
    at_diagonal = (FewStepGenerator.from_pretrained(out).sample(noise, cond, steps=2).clamp(-1, 1) + 1) / 2
    assert float((at_diagonal - refs[2]).abs().max()) > 1e-2


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return captioned_images(tmp_path_factory.mktemp("flowmap_t2i"), PROMPTS[:3])


def test_stock_sd15_pipeline_samples_every_step_count(work, teachers, tmp_path):
    """The export in the stock StableDiffusionPipeline (the scheduler and the offset from the folder's own files):
    its latents equal fewstep's sampler at 1 .. 8 steps within 1e-5 of their largest value."""
    from test_t2i import SIZE

    cfg, loaded, _, method = trained(tmp_path, teachers("sd15"), source="images", images=str(work / "images"),
                                     resolution=SIZE)
    out = export.export_student(cfg, loaded, method.student, None)
    pipe = StableDiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__module__.startswith("diffusers_modules")       # the folder's copy, not fewstep's
    assert type(pipe.scheduler.time_offset).__module__ == "flowmap_fewstep"
    cond = PromptEncoder(loaded.pipe, SIZE, SIZE).encode(PROMPTS[:2])
    noise = torch.randn((2, 4, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(3))
    for n in range(1, STEPS + 1):
        theirs = pipe(PROMPTS[:2], num_inference_steps=n, guidance_scale=1.0, latents=noise, height=SIZE, width=SIZE,
                      output_type="latent").images
        mine = method.student.sample(noise, cond, steps=n)
        assert float((theirs - mine).abs().max()) <= 1e-5 * float(mine.abs().max()), n
    assert pipe.scheduler._pair_in_flight() is None         # the hook adds nothing once sampling is over


def test_scheduler_refuses_what_it_cannot_sample(tiny_teacher_dir, tmp_path):
    cfg, loaded, _, method = trained(tmp_path / "run", tiny_teacher_dir)
    out = export.export_student(cfg, loaded, method.student, None)
    sched = FewStepScheduler.from_pretrained(out, subfolder="scheduler")
    with pytest.raises(ValueError, match="this flow map samples 1 to 8 steps"):
        sched.set_timesteps(9)
    with pytest.raises(ValueError, match="pass num_inference_steps, not timesteps or sigmas"):
        sched.set_timesteps(timesteps=[999, 499])
    with pytest.raises(ValueError, match="call scheduler.attach"):
        sched.set_timesteps(2)
    with pytest.raises(ValueError, match="not from_config"):
        FewStepScheduler.from_config(sched.config).set_timesteps(2)
    # a hand-written loop: attach the backbone once, then the scheduler's steps give it each (t, r)
    pipe = load_pipeline(out)
    sched.attach(pipe.unet)
    sched.set_timesteps(2)
    x = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.step(pipe.unet(x, t.reshape(1), class_labels=torch.tensor([3])).sample, t, x).prev_sample
    ref = method.student.sample(torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(0)),
                                Cond(labels=torch.tensor([3])), steps=2)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
