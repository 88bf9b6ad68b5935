"""Tests for fewstep_pipelines: FewStepScheduler maths against stock diffusers schedulers, the
class-conditional pipeline, and export/reload in a Python where fewstep cannot be imported."""

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import fewstep_pipelines
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from fewstep_pipelines import FewStepClassPipeline, FewStepScheduler

from fewstep.run.folders import save_pipeline_dir
from fewstep.run.schedulers import fewstep_scheduler_for

torch.set_num_threads(1)

BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
TLIST = [999, 749, 499, 249]
NUM_CLASSES = 10


def tiny_unet(num_class_embeds=NUM_CLASSES + 1):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    ).eval()


def teacher_config():
    # v-prediction keeps x0 = alpha x_t - sigma v bounded for a random unet, so images do not saturate
    return DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing").config


@pytest.fixture(scope="module")
def pipe():
    p = FewStepClassPipeline(unet=tiny_unet(), scheduler=fewstep_scheduler_for(teacher_config(), TLIST))
    p.set_progress_bar_config(disable=True)
    return p


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ------------------------------------------------------------------ (a) VP maths vs DDIM / DDPM


@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_vp_x0_matches_ddim(beta_schedule, prediction_type):
    kw = dict(beta_schedule=beta_schedule, prediction_type=prediction_type)
    ddim = DDIMScheduler(clip_sample=False, **kw)
    ddim.set_timesteps(10)
    ours = FewStepScheduler(**kw)
    g = torch.Generator().manual_seed(0)
    for t in [999, 500, 37, 0]:
        x, out = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
        ours.set_timesteps(timesteps=[t])
        x0 = ours.step(out, t, x).pred_original_sample
        ref = ddim.step(out, t, x).pred_original_sample
        torch.testing.assert_close(x0, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta_schedule", BETAS)
def test_vp_add_noise_matches_ddpm(beta_schedule):
    ddpm, ours = DDPMScheduler(beta_schedule=beta_schedule), FewStepScheduler(beta_schedule=beta_schedule)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 249, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t), rtol=1e-6, atol=1e-6)


def test_step_renoises_to_next_timestep_and_returns_x0_at_last():
    s = FewStepScheduler(prediction_type="sample", train_timesteps=TLIST)
    s.set_timesteps()
    x0 = torch.randn(2, 1, 4, 4)
    nxt = s.step(x0, 999, torch.zeros_like(x0), generator=torch.Generator().manual_seed(3)).prev_sample
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(nxt, s.add_noise(x0, eps, torch.tensor(749)))
    assert torch.equal(s.step(x0, 249, nxt).prev_sample, x0)


# ------------------------------------------------------------------ (b) flow maths vs FlowMatchEuler


@pytest.mark.parametrize("sigma", [1.0, 0.75, 0.3, 0.01])
def test_flow_x0_matches_flow_match_euler(sigma):
    fm = FlowMatchEulerDiscreteScheduler()
    fm.set_timesteps(sigmas=[sigma])  # a single Euler step from sigma to 0 lands on x_t - sigma u
    ours = fewstep_scheduler_for(fm.config, [float(fm.timesteps[0])])
    assert ours.config.process == "flow" and ours.config.prediction_type == "flow_prediction"
    ours.set_timesteps()
    g = torch.Generator().manual_seed(2)
    x, u = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = ours.timesteps[0]
    torch.testing.assert_close(ours.step(u, t, x).pred_original_sample, fm.step(u, fm.timesteps[0], x).prev_sample)
    torch.testing.assert_close(ours.add_noise(x, u, t), fm.scale_noise(x, fm.timesteps[:1], u))


# ------------------------------------------------------------------ (c) timestep lists


@pytest.mark.parametrize("n, expected", [(None, TLIST), (4, TLIST), (2, [999, 499]), (3, [999, 749, 249]), (1, [999])])
def test_set_timesteps_subsets_trained_list(n, expected):
    s = FewStepScheduler(train_timesteps=TLIST)
    s.set_timesteps(n)
    assert s.timesteps.tolist() == expected


def test_set_timesteps_without_trained_list_uses_trailing_spacing():
    s = FewStepScheduler()
    s.set_timesteps(4)
    assert s.timesteps.tolist() == TLIST
    f = FewStepScheduler(process="flow", prediction_type="flow_prediction")
    f.set_timesteps(4)
    assert f.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]


@pytest.mark.parametrize("n", [5, 0, -1])
def test_set_timesteps_rejects_bad_counts(n):
    s = FewStepScheduler(train_timesteps=TLIST)
    with pytest.raises(ValueError, match=rf"num_inference_steps={n}") as err:
        s.set_timesteps(n)
    assert "[999, 749, 499, 249]" in str(err.value)
    if n == 5:
        assert "timesteps=" in str(err.value)


@pytest.mark.parametrize(
    "bad, named",
    [([249, 499], "249 -> 499"), ([1000, 10], "1000"), ([500.5], "500.5"), ([], "empty")],
)
def test_explicit_timesteps_are_validated(bad, named):
    s = FewStepScheduler(train_timesteps=TLIST)
    with pytest.raises(ValueError, match=named):
        s.set_timesteps(timesteps=bad)


def test_explicit_timesteps_and_flow_range():
    s = FewStepScheduler(train_timesteps=TLIST)
    s.set_timesteps(timesteps=[899, 399])
    assert s.timesteps.tolist() == [899, 399]
    with pytest.raises(ValueError, match="0"):
        FewStepScheduler(process="flow", prediction_type="flow_prediction", train_timesteps=[500.0, 0.0])
    with pytest.raises(ValueError, match="flow_prediction"):
        FewStepScheduler(process="vp", prediction_type="flow_prediction")


# ------------------------------------------------------------------ (d) pipeline determinism


def test_batch_size_does_not_change_images(pipe):
    labels = [0, 1, 2, 3, 4, 5, 6, 9]
    for w in (1.0, 2.0):
        batch = pipe(labels, guidance_scale=w, generator=gens(range(8)), output_type="pt").images
        singles = [
            pipe(c, guidance_scale=w, generator=gens([i]), output_type="pt").images for i, c in enumerate(labels)
        ]
        torch.testing.assert_close(batch, torch.cat(singles), rtol=0, atol=1e-6)
        assert ((batch > 0) & (batch < 1)).float().mean() > 0.5  # images are not saturated


def test_output_types_and_teacher_scheduler(pipe):
    np_img = pipe([1, 2], num_inference_steps=2, output_type="np").images
    assert np_img.shape == (2, 8, 8, 1)
    pil = pipe(3, output_type="pil").images
    assert len(pil) == 1 and pil[0].mode == "L" and pil[0].size == (8, 8)
    teacher = FewStepClassPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(teacher_config()))
    teacher.set_progress_bar_config(disable=True)
    out = teacher([1], num_inference_steps=3, guidance_scale=1.5, generator=gens([0]), output_type="pt").images
    assert out.shape == (1, 1, 8, 8) and torch.isfinite(out).all()


# ------------------------------------------------------------------ (e) export and reload without fewstep

CALLS = {"student": [(1, 1.0), (4, 1.0), (4, 2.0)], "teacher": [(5, 1.5)]}


def sample(pipe, steps, w):
    """Two images as a [2, C, H, W] tensor: classes 3 and 7 from a class pipeline, else an unconditional
    stock pipeline's batch of two (DDPMPipeline has no guidance; w is ignored there)."""
    gen = torch.Generator().manual_seed(0)
    if hasattr(pipe, "num_classes"):
        return pipe([3, 7], num_inference_steps=steps, guidance_scale=w, generator=gen, output_type="pt").images
    images = pipe(batch_size=2, num_inference_steps=steps, generator=gen, output_type="np").images
    return torch.from_numpy(images).permute(0, 3, 1, 2)


RELOAD_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    class BlockFewstep:
        # imports of fewstep or fewstep_pipelines must fail, as in a user's Python without fewstep
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("fewstep", "fewstep_pipelines"):
                raise ImportError("blocked " + name)
            return None

    sys.meta_path.insert(0, BlockFewstep())
    import torch
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline

    try:
        import fewstep_pipelines  # noqa: F401
        raise SystemExit("fewstep_pipelines must not be importable here")
    except ImportError:
        pass
    """
) + inspect.getsource(sample) + textwrap.dedent(
    """
    spec = json.loads(sys.argv[1])
    out = {}
    for name, (folder, calls) in spec["folders"].items():
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        out[name, "pipeline"] = type(pipe).__module__ + "." + type(pipe).__name__
        out[name, "scheduler"] = type(pipe.scheduler).__module__ + "." + type(pipe.scheduler).__name__
        for steps, w in calls:
            out[name, steps, w] = sample(pipe, steps, w)
    out["fewstep_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("fewstep", "fewstep_pipelines"))
    torch.save(out, spec["result"])
    """
)


def reload_without_fewstep(tmp_path, folders):
    """Load each folder of ``{name: (folder, [(steps, w), ...])}`` in a fresh Python that cannot import fewstep
    (nor fewstep_pipelines), sample each call there, and return what it recorded."""
    work = tmp_path / "elsewhere"
    work.mkdir(exist_ok=True)
    (work / "reload.py").write_text(RELOAD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    result_file = tmp_path / "reloaded.pt"
    spec = {"result": str(result_file), "folders": {k: (str(f), c) for k, (f, c) in folders.items()}}
    proc = subprocess.run([sys.executable, "reload.py", json.dumps(spec)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(result_file)
    assert got["fewstep_modules"] == []
    return got


def test_export_reloads_without_fewstep(pipe, tmp_path):
    teacher = FewStepClassPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(teacher_config()))
    teacher.set_progress_bar_config(disable=True)
    teacher_dir = save_pipeline_dir(teacher, tmp_path / "teacher")
    teacher_index = json.loads((teacher_dir / "model_index.json").read_text())
    assert teacher_index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not (teacher_dir / "scheduler" / "scheduling_fewstep.py").exists()
    out_dir = save_pipeline_dir(pipe, tmp_path / "student", model_card="# tiny student\n")
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "model_index.json",
        "pipeline_fewstep.py",
        "scheduler/scheduler_config.json",
        "scheduler/scheduling_fewstep.py",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    index = json.loads((out_dir / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_fewstep", "FewStepClassPipeline"]
    assert index["scheduler"] == ["scheduling_fewstep", "FewStepScheduler"]

    got = reload_without_fewstep(tmp_path, {"student": (out_dir, CALLS["student"]),
                                            "teacher": (teacher_dir, CALLS["teacher"])})
    assert got["student", "pipeline"] == "diffusers_modules.local.pipeline_fewstep.FewStepClassPipeline"
    assert got["student", "scheduler"] == "diffusers_modules.local.scheduling_fewstep.FewStepScheduler"
    assert got["teacher", "scheduler"].endswith("DDIMScheduler")
    for name, model in (("student", pipe), ("teacher", teacher)):
        for steps, w in CALLS[name]:
            torch.testing.assert_close(got[name, steps, w], sample(model, steps, w), rtol=0, atol=1e-6)


def test_save_pretrained_writes_folders_that_reload_without_fewstep(pipe, tmp_path):
    """save_pretrained of an exported student reloaded with trust_remote_code, of the in-memory student and
    teacher, and of a stock pipeline (DDPMPipeline) holding a FewStepScheduler, before and after a reload: each
    folder carries the custom code and loads in a Python without fewstep, with the same images."""
    from diffusers import DDPMPipeline, DiffusionPipeline

    pipelines_dir = Path(fewstep_pipelines.__file__).parent
    teacher = FewStepClassPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(teacher_config()))
    stock = DDPMPipeline(unet=tiny_unet(num_class_embeds=None),
                         scheduler=fewstep_scheduler_for(teacher_config(), TLIST))
    stock.set_progress_bar_config(disable=True)
    exported = save_pipeline_dir(pipe, tmp_path / "exported")
    pipe.save_pretrained(tmp_path / "saved")
    teacher.save_pretrained(tmp_path / "teacher")
    stock.save_pretrained(tmp_path / "stock")
    for src, dst in ((exported, "resaved"), (tmp_path / "stock", "stock_resaved")):
        reloaded = DiffusionPipeline.from_pretrained(src, trust_remote_code=True)
        assert type(reloaded.scheduler).__module__.startswith("diffusers_modules.")   # the folder's own copy
        reloaded.save_pretrained(tmp_path / dst)

    student_calls, stock_calls = CALLS["student"][:2], [(4, 1.0), (2, 1.0)]
    folders = {"resaved": (tmp_path / "resaved", student_calls), "saved": (tmp_path / "saved", student_calls),
               "teacher": (tmp_path / "teacher", CALLS["teacher"]), "stock": (tmp_path / "stock", stock_calls),
               "stock_resaved": (tmp_path / "stock_resaved", stock_calls)}
    for name, (folder, _) in folders.items():
        index = json.loads((folder / "model_index.json").read_text())
        if name.startswith("stock"):
            assert index["_class_name"] == "DDPMPipeline"
        else:
            assert "_name_or_path" not in index, name      # the folder it was loaded from means nothing elsewhere
            assert index["_class_name"] == ["pipeline_fewstep", "FewStepClassPipeline"], name
            assert (folder / "pipeline_fewstep.py").read_bytes() == (pipelines_dir / "pipeline_fewstep.py").read_bytes()
        if name == "teacher":
            assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
            assert not (folder / "scheduler" / "scheduling_fewstep.py").exists()
        else:
            assert index["scheduler"] == ["scheduling_fewstep", "FewStepScheduler"], name
            copied = (folder / "scheduler" / "scheduling_fewstep.py").read_bytes()
            assert copied == (pipelines_dir / "scheduling_fewstep.py").read_bytes(), name

    got = reload_without_fewstep(tmp_path, folders)
    assert got["resaved", "pipeline"] == "diffusers_modules.local.pipeline_fewstep.FewStepClassPipeline"
    assert got["stock", "pipeline"].endswith("DDPMPipeline")
    assert got["stock_resaved", "scheduler"] == "diffusers_modules.local.scheduling_fewstep.FewStepScheduler"
    refs = {"resaved": pipe, "saved": pipe, "teacher": teacher, "stock": stock, "stock_resaved": stock}
    for name, (_, calls) in folders.items():
        for steps, w in calls:
            torch.testing.assert_close(got[name, steps, w], sample(refs[name], steps, w), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ (f) export refuses non-empty folders


def test_export_refuses_non_empty_folder(pipe, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"taken.*overwrite=True"):
        save_pipeline_dir(pipe, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    save_pipeline_dir(pipe, target, overwrite=True)
    assert (target / "model_index.json").is_file() and not (target / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# ------------------------------------------------------------------ (g) bad call arguments


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(class_labels=10), "class label 10"),
        (dict(class_labels=[1, -1]), "class label -1"),
        (dict(class_labels=torch.tensor([0.5])), "float32"),
        (dict(class_labels=[1, 2], generator=gens([0, 1, 2])), "3 generators for a batch of 2"),
        (dict(class_labels=1, guidance_scale=-1.0), "guidance_scale=-1.0"),
        (dict(class_labels=1, guidance_scale=float("nan")), "guidance_scale=nan"),
        (dict(class_labels=1, output_type="jpg"), "output_type='jpg'"),
        (dict(class_labels=1, num_inference_steps=0), "num_inference_steps=0"),
        (dict(class_labels=1, num_inference_steps=5), "num_inference_steps=5"),
        (dict(class_labels=1, latents=torch.zeros(1, 1, 4, 4)), r"\(1, 1, 4, 4\)"),
    ],
)
def test_bad_arguments_raise_clear_errors(pipe, kwargs, named):
    with pytest.raises(ValueError, match=named):
        pipe(**kwargs)


# ------------------------------------------------------------------ (h) label types and explicit timesteps


def test_class_labels_accept_numpy_arrays_and_ranges(pipe):
    ref = sample(pipe, 4, 1.0)                                        # the labels [3, 7] as a list
    for labels in (np.array([3, 7]), np.array([[3], [7]], dtype=np.int32), range(3, 8, 4), (3, 7),
                   torch.tensor([3, 7])):
        out = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert torch.equal(out, ref), labels
    one = pipe(np.int64(3), generator=gens([0]), output_type="pt").images
    torch.testing.assert_close(one, pipe([3], generator=gens([0]), output_type="pt").images, rtol=0, atol=0)
    for bad, named in ((np.array([0.5]), "float64"), (np.array([True]), "bool"), (np.array([3, 10]), "class label 10"),
                       (range(0), "empty"), (range(8, 12), "class label 10")):
        with pytest.raises(ValueError, match=named):
            pipe(bad)


def test_explicit_timesteps_suggested_by_the_scheduler_are_accepted(pipe):
    """The scheduler's error for too many steps suggests `timesteps=[...]`: FewStepClassPipeline takes it,
    and every pipeline the hints name takes the keyword they name for it."""
    import diffusers

    with pytest.raises(ValueError, match=r"num_inference_steps=5 exceeds") as err:
        pipe(3, num_inference_steps=5)
    assert "timesteps=[...]" in str(err.value)
    out = pipe([3, 7], timesteps=[999, 800, 600, 400, 200], generator=gens([0, 1]), output_type="pt").images
    assert pipe.scheduler.timesteps.tolist() == [999, 800, 600, 400, 200] and out.shape == (2, 1, 8, 8)
    same = pipe([3, 7], num_inference_steps=5, timesteps=[999, 800, 600, 400, 200], generator=gens([0, 1]),
                output_type="pt").images
    torch.testing.assert_close(same, out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="disagrees"):
        pipe(3, num_inference_steps=2, timesteps=[999, 499, 249])
    teacher = FewStepClassPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(teacher_config()))
    with pytest.raises(ValueError, match=r"timesteps=\[999, 499\] is not supported by DDIMScheduler.*num_inference"):
        teacher(3, timesteps=[999, 499])

    vp, flow = FewStepScheduler(train_timesteps=TLIST), fewstep_scheduler_for(FlowMatchEulerDiscreteScheduler().config,
                                                                               [1000.0, 500.0])
    messages = []
    calls = ((vp, {"num_inference_steps": 5}), (vp, {"sigmas": [1.0]}), (flow, {"num_inference_steps": 3}),
             (FewStepScheduler(), {}))
    for sched, call in calls:
        with pytest.raises(ValueError) as e:
            sched.set_timesteps(**call)
        messages.append(str(e.value))
    for message in messages:
        named = hinted_keywords(message)
        assert "FewStepClassPipeline" in named or "FluxPipeline" in named, message
        for name, keyword in named.items():
            cls = FewStepClassPipeline if name == "FewStepClassPipeline" else getattr(diffusers, name)
            assert keyword in inspect.signature(cls.__call__).parameters, \
                f"{name}.__call__ has no {keyword}=; the hint says it does: {message}"


def hinted_keywords(message):
    """{pipeline class: keyword} for each "(APipeline, BPipeline ...)" in a hint: the last `keyword=[` before it."""
    out = {}
    for group in re.finditer(r"\(([^)]*)\)", message):
        names = re.findall(r"\b\w+Pipeline\b", group.group(1))
        if names:
            keyword = re.findall(r"(\w+)=\[", message[:group.start()])[-1]
            out.update(dict.fromkeys(names, keyword))
    return out
