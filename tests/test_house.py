"""The one house: one way to build a method, validation before any work, ``--help`` that teaches, a student
that saves and reloads by itself, and the review defects (update counters, time range, thread count,
teacher regeneration, teacher reference cache)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep.core.conditioning import Cond
from fewstep.core.generator import FewStepGenerator
from fewstep.errors import ConfigError
from fewstep.methods import REGISTRY, available, method_class
from fewstep.run import build, cli
from fewstep.run import config as C
from fewstep.run.presets import PRESETS
from fewstep.run.validate import validate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SCRIPTS = sorted(p.stem for p in (ROOT / "train").glob("*.py") if p.stem in available())


def script(name, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train" / f"{name}.py"), *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=ROOT)


# ------------------------------------------------------------------------------------------ one way to build
def test_every_entry_script_is_the_same_few_lines():
    """Each ``train/<method>.py`` is its docstring plus the same call, the method's name the only difference."""
    assert SCRIPTS == sorted(PRESETS) == available()
    bodies = set()
    for name in SCRIPTS:
        text = (ROOT / "train" / f"{name}.py").read_text()
        body = text[text.index('"""', 3) + 3:]
        bodies.add(body.replace(f'"{name}"', '"<name>"'))
        assert method_class(name).name == name and REGISTRY[name] is method_class(name)
    assert len(bodies) == 1 and len(bodies.pop().strip().splitlines()) <= 5


def test_an_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="method 'nope' is not known; available: consistency, decoupled_dmd, disback"):
        method_class("nope")


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_every_shipped_preset_passes_validation(method):
    for name, preset in PRESETS[method].items():
        cfg, dry = C.parse(["--preset", name, "--dry-run"], PRESETS[method], name)
        assert dry and cfg.method_name == method
        validate(cfg)


def test_dry_run_of_a_real_model_preset_loads_nothing(tmp_path):
    r = script("fdistill", "--preset", "sd15_fdistill", "--dry-run", "--train.output_dir", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["preset"] == "sd15_fdistill" and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ validation
BAD = [  # (script, arguments, what the one line must say)
    ("dmd2", ["--model.gan_head", "false"], "method.gan_weight_student 0.03 needs a discriminator head"),
    ("dmd2", ["--method.student_every", "0"], "method.student_every 0 must be at least 1"),
    ("dmd2", ["--method.guidance_scale", "nan"], "method.guidance_scale nan is not a finite number"),
    ("dmd2", ["--method.guidance_scale", "inf"], "method.guidance_scale inf is not a finite number"),
    ("dmd2", ["--method.guidance_scale", "-1"], "method.guidance_scale -1.0 must be >= 0"),
    ("dmd2", ["--optim.student.beta1", "1.0"], "optim.student.beta1 1.0 must be in [0, 1)"),
    ("dmd2", ["--optim.critic.beta2", "-0.1"], "optim.critic.beta2 -0.1 must be in [0, 1)"),
    ("dmd2", ["--train.max_steps", "0"], "train.max_steps 0 must be at least 1"),
    ("dmd2", ["--train.ema_decay", "1"], "train.ema_decay 1.0 must be in [0, 1)"),
    ("dmd2", ["--data.source", "prompts"], "data.source prompts needs data.prompts"),
    ("fdistill", ["--preset", "sd15_fdistill", "--data.images", ""], "compares with real images and data.source"),
    ("fdistill", ["--method.divergence", "nope"], "method.divergence 'nope' is not known"),
    ("sid", ["--method.gan_weight_student", "0.1"], "needs a discriminator head (SiDA's discriminator)"),
    ("sid", ["--method.lsg", "half"], "method.lsg 'half' is not known"),
    ("phased_dmd", ["--model.mode", "lora"], "set model.mode full"),
    ("phased_dmd", ["--method.phases", "9"], "method.phases 9: need 1..4 phases"),
    ("consistency", ["--method.w_min", "3", "--method.w_max", "2"], "need 0 <= w_min <= w_max"),
    ("consistency", ["--preset", "sd15_lcm", "--data.source", "prompts", "--data.prompts", "p.txt", "--data.images",
                     ""], "consistency distillation noises real images"),
]


@pytest.mark.parametrize("name,args,needle", BAD, ids=[f"{b[0]}:{' '.join(b[1])}" for b in BAD])
def test_every_impossible_combination_is_refused_before_any_work(name, args, needle):
    cfg, _ = C.parse(args, PRESETS[name], cli.default_preset(name))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_refusal_is_one_line_exit_2_and_deletes_nothing(tmp_path, tiny_teacher_dir, capsys):
    """Through the entry point, with overwrite on and a previous run in the folder: the run is kept."""
    from test_reliability import main, one_line_error

    out = tmp_path / "run"
    common = ["--model.teacher", str(tiny_teacher_dir), "--train.output_dir", str(out), "--train.evaluate", "false",
              "--data.batch_size", "2", "--train.max_steps", "1"]
    assert main(common, capsys).returncode == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for bad in (["--model.gan_head", "false"], ["--model.teacher", str(tmp_path / "typo")]):
        one_line_error(main([*common, "--train.overwrite", "true", *bad], capsys))
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert main([*common, "--train.overwrite", "true", "--dry-run"], capsys).returncode == 0
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    r = script("dmd2", *common, "--train.overwrite", "true", "--model.gan_head", "false")   # the script itself
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ --help
def test_help_of_a_preset_shows_its_values_types_and_descriptions():
    r = script("sid", "--preset", "digits_sid_4step", "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "fields (defaults of preset digits_sid_4step)" in out
    assert "--model.student_timesteps INT,... (default [755, 566, 378, 189])" in out
    assert re.search(r"--method.alpha FLOAT \(default 1.2\)\n\s+alpha \(1.2; 1.0 for text-to-image\)", out)
    assert "--model.mode full|lora (default \"full\")" in out
    assert re.search(r"--train.max_steps INT \(default 500\)\n\s+optimizer steps of the fastest turn", out)
    for section in ("\nmodel:", "\ndata:", "\ntrain:", "\nmethod:", "\noptim:"):
        assert section in out
    assert script("sid", "--preset", "nope", "--help").returncode == 2


# ------------------------------------------------------------------------------------------ the student
def test_student_saves_and_reloads_without_a_preset(tiny_teacher_dir, tmp_path):
    cfg = PRESETS["dmd2"]["digits_dmd2_4step"]()
    cfg.model.teacher = str(tiny_teacher_dir)
    teacher = build.load_teacher(cfg.model)
    student = build.make_student(teacher, cfg.model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))          # differ from the teacher
    student.save_pretrained(tmp_path / "student")
    again = FewStepGenerator.from_pretrained(tmp_path / "student")
    assert again.sampling() == student.sampling() and again.sampling().timesteps == (999, 749, 499, 249)
    noise, cond = torch.randn(3, 1, 8, 8), Cond(labels=torch.tensor([1, 2, 3]))
    for steps in (1, 4):
        a = student.sample(noise, cond, torch.Generator().manual_seed(0), steps)
        b = again.sample(noise, cond, torch.Generator().manual_seed(0), steps)
        assert torch.equal(a, b)


def test_exported_run_folder_reloads_as_a_student(tiny_teacher_dir, tmp_path):
    """The run folder of a consistency student (boundary scalings, LCM's subset rule) reloads as a generator
    whose sampler equals the exported pipeline's."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    r = script("consistency", "--model.teacher", str(tiny_teacher_dir), "--train.output_dir", str(out),
               "--train.evaluate", "false", "--data.batch_size", "2", "--train.max_steps", "2")
    assert r.returncode == 0, r.stderr
    student = FewStepGenerator.from_pretrained(out)
    spec = student.sampling()
    assert spec.timestep_scaling == 10.0 and spec.subset == "floor" and spec.K == 4
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 3, 7]
    for steps in (1, 2, 4):
        g = torch.Generator().manual_seed(5)
        img = pipe(labels, num_inference_steps=steps, generator=g, output_type="pt").images
        g = torch.Generator().manual_seed(5)
        noise = torch.randn((3, 1, 8, 8), generator=g)
        x = student.sample(noise, Cond(labels=torch.tensor(labels)), g, steps)
        torch.testing.assert_close(img, ((x.clamp(-1, 1) + 1) / 2).float(), atol=1e-5, rtol=0)


def test_time_outside_0_1_is_refused(tiny_teacher_dir):
    teacher = build.load_teacher(C.ModelConfig(teacher=str(tiny_teacher_dir)))
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        teacher.denoiser(x, torch.tensor([999.0, 999.0]), Cond(labels=torch.tensor([1, 2])))
    teacher.denoiser(x, torch.tensor([1.0, 0.0]), Cond(labels=torch.tensor([1, 2])))


# ------------------------------------------------------------------------------------------ review defects
def test_update_counters_survive_a_resume(tiny_teacher_dir, tmp_path):
    from test_dmd2_loop import accel, make

    from fewstep.training import loop

    cfg, method, source = make(tiny_teacher_dir, tmp_path / "a", steps=6)
    whole = loop.train(cfg, method, source, accel(tmp_path / "a"))
    cfg, method, source = make(tiny_teacher_dir, tmp_path / "b", steps=4)
    loop.train(cfg, method, source, accel(tmp_path / "b"))
    cfg, method, source = make(tiny_teacher_dir, tmp_path / "b", steps=6)
    resumed = loop.train(cfg, method, source, accel(tmp_path / "b"))
    assert resumed["updates"] == whole["updates"] == {"critic": 6, "student": 3}


def test_threads_follow_omp_num_threads_else_the_physical_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert not cli.accelerate_defaulted_threads()          # this process was not started by accelerate launch
    assert cli.threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    usable = len(os.sched_getaffinity(0))
    assert 1 <= cli.threads() <= usable
    assert cli.threads() == min(cli.physical_cores() or usable, usable)


def test_the_one_thread_accelerate_launch_passes_by_default_is_not_taken_as_asked(tmp_path):
    """``accelerate launch`` gives its script OMP_NUM_THREADS=1 unless told otherwise: the script then uses the
    physical cores; with the user's own OMP_NUM_THREADS (or --num_cpu_threads_per_process) it keeps that."""
    probe = tmp_path / "probe.py"
    probe.write_text("from fewstep.run import cli\nprint(cli.threads(), cli.accelerate_defaulted_threads())\n")
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([*launch, str(probe)], env=env, capture_output=True, text=True, timeout=120).stdout.split()
    usable = len(os.sched_getaffinity(0))
    assert out == [str(min(cli.physical_cores() or usable, usable)), "True"]
    out = subprocess.run([*launch, str(probe)], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=120).stdout.split()
    assert out == ["1", "False"]


def test_teacher_script_regenerates_the_whole_committed_folder(tmp_path):
    """train/teacher.py writes every file of fewstep/assets/digits_teacher/ (bar the cached figures: reference_metrics.json, teacher_grid.json); the folder
    loads with plain diffusers. Two optimizer steps: the layout is what is checked, not the weights."""
    from diffusers import DiffusionPipeline

    from fewstep.digits import DIGITS_TEACHER

    out = tmp_path / "teacher"
    r = subprocess.run([sys.executable, "train/teacher.py", "--out", str(out), "--steps", "2", "--eval-samples", "20"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()  # noqa: E731
                             and p.name not in ("reference_metrics.json", "teacher_grid.json")
                             and "__pycache__" not in p.parts)
    assert files(out) == files(DIGITS_TEACHER)
    strip = lambda d: {k: v for k, v in json.loads((d / "model_index.json").read_text()).items()  # noqa: E731
                       if k != "_diffusers_version"}
    assert strip(out) == strip(DIGITS_TEACHER)
    assert (out / "pipeline_fewstep.py").read_text() == (DIGITS_TEACHER / "pipeline_fewstep.py").read_text()
    DiffusionPipeline.from_pretrained(out, trust_remote_code=True)


def test_teacher_reference_is_recomputed_when_the_weights_change(tiny_teacher_dir, tmp_path):
    from diffusers import DDIMScheduler, UNet2DModel
    from fewstep_pipelines import FewStepClassPipeline
    from safetensors.torch import load_file, save_file

    from fewstep.run.folders import save_pipeline_dir
    from fewstep.run.report import fixed_teacher_reference as teacher_reference

    teacher = tmp_path / "teacher"
    save_pipeline_dir(FewStepClassPipeline(unet=UNet2DModel.from_pretrained(tiny_teacher_dir / "unet"),
                                           scheduler=DDIMScheduler.from_pretrained(tiny_teacher_dir / "scheduler")),
                      teacher)
    first = teacher_reference(teacher, 20, seeds=(0,))
    assert teacher_reference(teacher, 20, seeds=(0,)) == first                    # cached
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v * 1.05 for k, v in state.items()}, weights)
    second = teacher_reference(teacher, 20, seeds=(0,))
    assert second["weights_sha256"] != first["weights_sha256"] and second["fd_digits"] != first["fd_digits"]
    shutil.rmtree(teacher)
