"""Two CPU processes (gloo DDP) against one, for DMD2 and SiD: same first-step loss, same turn schedule and
backward-simulation steps (DMD2) / few-step mixture draws (SiD) on every rank, final parameters equal
within tolerance."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


# trainer, preset, extra options, the logged step-determined draw that every rank must share
METHODS = {"dmd2": ("digits_dmd2_4step", ["--method.student_every", "2"], "student/sim_step"),
           "sid": ("digits_sid_4step", [], "student/mixture_step")}


def launch(nproc, batch, out, teacher, trace, steps=6, method="dmd2"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_TRACE": str(trace)}
    preset, extra, _ = METHODS[method]
    # Adam eps 1e-3: Adam's first steps are ~lr * sign(g) for tiny gradients, so round-off differences of the
    # all-reduce would flip whole steps; a larger eps keeps the update proportional to the gradient.
    args = [f"train/{method}.py", "--preset", preset, "--model.teacher", str(teacher),
            "--train.output_dir", str(out), "--train.max_steps", str(steps), "--train.checkpoint_every", "2", "--train.evaluate", "false",
            "--data.batch_size", str(batch), *extra, "--optim.student.eps", "1e-3", "--optim.critic.eps", "1e-3"]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [[json.loads(line) for line in open(f"{trace}.rank{k}.jsonl")] for k in range(nproc)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_match_one(tiny_teacher_dir, tmp_path, method):
    one = launch(1, 4, tmp_path / "one", tiny_teacher_dir, tmp_path / "t1", method=method)[0]
    r0, r1 = launch(2, 2, tmp_path / "two", tiny_teacher_dir, tmp_path / "t2", method=method)
    # both ranks ran the same turns at the same steps, with the same step-determined draw
    key = METHODS[method][2]
    sched = lambda tr: [(e["step"], e["turn"], e["logs"].get(key)) for e in tr]  # noqa: E731
    assert sched(r0) == sched(r1) == sched(one)
    assert any(e["logs"].get(key, 0) > 0 for e in r0)
    # first step: the mean of the two ranks' losses (2 samples each) is the 1-process loss (4 samples)
    for turn in ("critic", "student"):
        a = next(e["loss"] for e in one if e["turn"] == turn)
        b = (next(e["loss"] for e in r0 if e["turn"] == turn) + next(e["loss"] for e in r1 if e["turn"] == turn)) / 2
        assert abs(a - b) < 1e-5, (turn, a, b)
    # only rank 0 wrote the export; final weights agree up to all-reduce round-off
    w1 = load_file(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(tmp_path / "two" / "unet" / "diffusion_pytorch_model.safetensors")
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-4, worst


def weights(run):
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_resume_across_process_counts(tiny_teacher_dir, tmp_path):
    """A checkpoint written by 2 processes resumes in 1, and the reverse, ending where a 1-process run ends."""
    launch(1, 4, tmp_path / "ref", tiny_teacher_dir, tmp_path / "tr")
    for first, then, name in ((2, 1, "two_then_one"), (1, 2, "one_then_two")):
        out = tmp_path / name
        launch(first, 4 // first, out, tiny_teacher_dir, tmp_path / f"{name}_a", steps=4)
        launch(then, 4 // then, out, tiny_teacher_dir, tmp_path / f"{name}_b", steps=6)
        ref, got = weights(tmp_path / "ref"), weights(out)
        assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-4, name
