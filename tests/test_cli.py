"""The training entry point as a user meets it: --help, bad input (exit 2, one line, nothing
overwritten), an end-to-end run whose export reloads without fewstep and matches fewstep's sampler,
and a SIGKILLed run that resumes to the uninterrupted result."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train" / "dmd2.py"), *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=ROOT)


def test_help_lists_every_field():
    r = run("--help")
    assert r.returncode == 0
    for key in ("--method.guidance_scale", "--train.max_steps", "--optim.student.lr", "--model.student_timesteps",
                "digits_dmd2_4step"):
        assert key in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--method.guidance_scal", "2"], "unknown option --method.guidance_scal; did you mean --method.guidance_scale"),
    (["--train.max_steps", "ten"], "--train.max_steps 'ten' is not a valid int"),
    (["--model.teacher", "/no/such/teacher"], "teacher '/no/such/teacher' is not a directory"),
    (["--model.student_timesteps", "1500"], "outside the schedule's range"),
    (["--model.student_timesteps", "249,999"], "strictly descending"),
])
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path, tiny_teacher_dir):
    r = run("--model.teacher", str(tiny_teacher_dir), *args, "--train.output_dir", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_deepspeed_config_is_refused_with_the_reason(tiny_teacher_dir, tmp_path):
    """accelerate launch with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED; the run stops before loading."""
    r = subprocess.run([sys.executable, str(ROOT / "train" / "dmd2.py"), "--model.teacher", str(tiny_teacher_dir),
                        "--train.output_dir", str(tmp_path / "out")], capture_output=True, text=True,
                       env={**ENV, "ACCELERATE_USE_DEEPSPEED": "true"}, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: DeepSpeed is not supported") and \
        "fsdp.yaml" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_output_dir_of_another_config_is_refused_and_untouched(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = {"method_name": "dmd2", "preset": "digits_dmd2", "method": {"guidance_scale": 9.0}}
    (out / "config.json").write_text(json.dumps(saved))
    r = run("--model.teacher", str(tiny_teacher_dir), "--train.output_dir", str(out), "--train.max_steps", "1")
    assert r.returncode == 2
    assert "holds a run with a different config" in r.stderr and "train.overwrite true" in r.stderr
    assert json.loads((out / "config.json").read_text()) == saved and os.listdir(out) == ["config.json"]


ISOLATED = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fewstep", "fewstep_pipelines"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(pipe).__name__ == "FewStepClassPipeline", type(pipe)
out = {}
for steps in (1, 4):
    g = torch.Generator().manual_seed(7)
    out[steps] = pipe([0, 3, 5, 9], num_inference_steps=steps, generator=g, output_type="pt").images
torch.save(out, sys.argv[2])
"""


def student_samples(out_dir, steps):
    from diffusers import UNet2DModel

    from fewstep.core.conditioning import Cond
    from fewstep.run import build
    from fewstep.run.config import ModelConfig

    cfg = json.loads((out_dir / "config.json").read_text())
    teacher = build.load_teacher(ModelConfig(teacher=cfg["model"]["teacher"]))
    model_cfg = ModelConfig(teacher=cfg["model"]["teacher"], student_timesteps=tuple(cfg["model"]["student_timesteps"]))
    student = build.make_student(teacher, model_cfg)
    student.denoiser.backbone.model.load_state_dict(UNet2DModel.from_pretrained(out_dir, subfolder="unet").state_dict())
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(4, 1, 8, 8, generator=g)
    x0 = student.sample(noise, Cond(labels=torch.tensor([0, 3, 5, 9])), generator=g, steps=steps)
    return (x0.clamp(-1, 1) + 1) / 2


def test_four_step_run_exports_a_pipeline_that_matches_without_fewstep(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    r = run("--preset", "digits_dmd2_4step", "--model.teacher", str(tiny_teacher_dir), "--train.output_dir", str(out),
            "--train.max_steps", "4", "--train.evaluate", "false", "--data.batch_size", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("model_index.json", "unet/config.json", "scheduler/scheduling_fewstep.py", "pipeline_fewstep.py",
              "README.md", "config.json", "samples/step_0000004.png"):
        assert (out / f).exists(), f
    res = tmp_path / "iso.pt"
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    p = subprocess.run([sys.executable, "-c", ISOLATED, str(out), str(res)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    iso = torch.load(res)
    for steps in (1, 4):
        torch.testing.assert_close(iso[steps], student_samples(out, steps), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tiny_teacher_dir, tmp_path):
    """slow: the default suite's test_reliability.py::test_faults_in_turn_end_with_the_uninterrupted_weights kills
    a run with SIGKILL too, among its other faults, and compares its final weights bit for bit."""
    common = ["--model.teacher", str(tiny_teacher_dir), "--train.max_steps", "12", "--train.checkpoint_every", "2",
              "--train.evaluate", "false", "--data.batch_size", "4", "--train.sample_every", "1000"]
    ref = tmp_path / "straight"
    assert run(*common, "--train.output_dir", str(ref)).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train" / "dmd2.py"), *common, "--train.output_dir", str(out)],
                            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step_00000006").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "unet").exists(), "the run finished before it could be killed"
    assert run(*common, "--train.output_dir", str(out)).returncode == 0
    from safetensors.torch import load_file

    a = load_file(ref / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
