"""Nothing lost, every failure one line: overwrite that deletes only fewstep runs and only after every check,
a lock on the run folder, checkpoints verified and skipped when corrupt, Ctrl-C / SIGTERM that save and say how
to resume, a resume under another spelling of the path, and the generator's loss in every log line."""
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.run.outdir import RunLock
from fewstep.training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def common(teacher, out, steps, *extra):
    return ["--model.teacher", str(teacher), "--train.output_dir", str(out), "--train.evaluate", "false",
            "--data.batch_size", "2", "--train.max_steps", str(steps), "--train.sample_every", "1000", *extra]


def run(args, **kw):
    return subprocess.run([sys.executable, "train/dmd2.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600, **kw)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def main(args, capsys) -> Result:
    """The entry script's body in this process (no interpreter start-up per run)."""
    from accelerate.state import AcceleratorState

    from fewstep.run import cli

    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    try:
        cli.main("dmd2", argv=[str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def one_line_error(r, code=2):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def last_line_error(r, code):
    """A failure during training: the progress bar may stand above it, but it ends in one error line."""
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == code and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[-1]


def weights(out):
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


# ------------------------------------------------------------------------------------------ overwrite
def test_overwrite_never_deletes_a_folder_that_holds_no_fewstep_run(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    line = one_line_error(main(common(tiny_teacher_dir, out, 1, "--train.overwrite", "true"), capsys))
    assert "holds 1 entries but no fewstep run" in line
    one_line_error(main(common(tiny_teacher_dir, out, 1, "--train.overwrite", "true", "--dry-run"), capsys))
    assert (out / "thesis.tex").read_text() == "years of work" and len(list(out.iterdir())) == 1


def test_the_error_that_suggests_overwrite_says_what_it_would_delete(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(common(tiny_teacher_dir, out, 2, "--train.checkpoint_every", "1"), capsys).returncode == 0
    line = one_line_error(main(common(tiny_teacher_dir, out, 2, "--method.guidance_scale", "3"), capsys))
    assert "set train.overwrite true to delete the dmd2 run there (checkpoints up to step 2" in line
    r = main(common(tiny_teacher_dir, out, 2, "--method.guidance_scale", "3", "--train.overwrite", "true"), capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"guidance_scale": 3.0' in (out / "config.json").read_text()


# ------------------------------------------------------------------------------------------ lock
def test_a_second_run_into_the_same_folder_is_refused_with_the_holders_pid(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    lock = RunLock(out).acquire()
    try:
        line = one_line_error(run(common(tiny_teacher_dir, out, 1)))
        assert f"in use by another fewstep run (pid {os.getpid()})" in line
    finally:
        lock.release()
    # a lock file left by a dead process holds no lock: the next run takes it over
    assert (out / ".fewstep.lock").read_text().strip() == str(os.getpid())
    assert main(common(tiny_teacher_dir, out, 1), capsys).returncode == 0


# ------------------------------------------------------------------------------------------ resume
def test_a_run_resumes_under_another_spelling_of_its_path(tiny_teacher_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(common(tiny_teacher_dir, out, 2, "--train.checkpoint_every", "1"), capsys).returncode == 0
    moved = tmp_path / "moved"
    out.rename(moved)
    monkeypatch.chdir(tmp_path)
    r = main(common(tiny_teacher_dir, "./moved", 3, "--train.checkpoint_every", "1"), capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "(step 2)" in r.stdout


def test_a_corrupt_newest_checkpoint_is_named_and_the_one_before_used(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    assert run(common(tiny_teacher_dir, out, 4, "--train.checkpoint_every", "2")).returncode == 0
    for damage in ("truncate", "empty", "garbage"):
        state = out / "checkpoints" / "step_00000004" / "state.pt"
        data = state.read_bytes()
        state.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                           "garbage": bytes(reversed(data))}[damage])
        with pytest.raises(checkpoint.CorruptCheckpoint):
            checkpoint.load(state.parent)
        said = []
        loaded, path = checkpoint.load_latest(out / "checkpoints", say=said.append)
        assert path.name == "step_00000002" and loaded["step"] == 2
        assert len(said) == 1 and "step 4 is corrupt" in said[0]
        state.write_bytes(data)
        checkpoint.verify(state.parent)


# ------------------------------------------------------------------------------------------ faults in turn
def _start(args):
    return subprocess.Popen([sys.executable, "train/dmd2.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(out, after, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        latest = checkpoint.latest(out / "checkpoints")
        if latest is not None and int(latest.name.split("_")[1]) > after:
            return
        time.sleep(0.05)


def test_faults_in_turn_end_with_the_uninterrupted_weights(tiny_teacher_dir, tmp_path):
    """One run is interrupted by SIGINT, then SIGTERM, then a full disk during a checkpoint write, then a corrupt
    newest checkpoint, then SIGKILL; each time it ends with one line saying what to do, and the resumed run ends
    with the same final weights as an uninterrupted one."""
    steps = 40
    args = lambda out: common(tiny_teacher_dir, out, steps, "--train.checkpoint_every", "2")  # noqa: E731
    assert run(args(tmp_path / "ref")).returncode == 0
    out = tmp_path / "faulty"
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        before = checkpoint.latest(out / "checkpoints")
        proc = _start(args(out))
        _wait_for_checkpoint(out, int(before.name.split("_")[1]) if before else 0, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-2000:]
        last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
        assert f"{signal.Signals(sig).name}: stopped after step" in last and "Re-run the same command" in last
        assert "Traceback" not in err
    # a full disk: every file larger than half a checkpoint fails to write
    size = max(p.stat().st_size for p in (out / "checkpoints").rglob("state.pt"))

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    intact = checkpoint.latest(out / "checkpoints")
    line = last_line_error(run(args(out), preexec_fn=full_disk), code=1)
    assert "could not write the step-" in line and intact.name in line and "re-run the same command" in line
    assert checkpoint.latest(out / "checkpoints") == intact
    # a corrupt newest checkpoint: named, and the one before it is used
    state = intact / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    proc = _start(args(out))
    _wait_for_checkpoint(out, int(intact.name.split("_")[1]), proc)
    proc.send_signal(signal.SIGKILL)
    out_, err = proc.communicate(timeout=120)
    assert f"checkpoint step {int(intact.name.split('_')[1])} is corrupt" in out_ + err
    r = run(args(out))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = weights(tmp_path / "ref"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ logging
def test_every_log_step_carries_the_student_loss(tiny_teacher_dir, tmp_path):
    """The student turn runs every 5th step and logging every 10th: each log line still has the student's
    latest loss and the running mean since the previous log line."""
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker
    from test_dmd2_loop import make

    from fewstep.training import loop

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.rows = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.rows.append((step, dict(values)))

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg, method, source = make(tiny_teacher_dir, tmp_path, steps=20)
    cfg.method.student_every = 5
    method.turns = (method.turns[0], type(method.turns[1])("student", every=5))
    cfg.train.log_every = 10
    recorder = Recorder()
    acc = Accelerator(log_with=[recorder])
    acc.init_trackers("test")
    loop.train(cfg, method, source, acc)
    assert [s for s, _ in recorder.rows] == [10, 20]
    for _, row in recorder.rows:
        assert "loss/student" in row and "loss/student/dmd" in row and "loss/student_mean" in row
        assert "loss/critic" in row and "loss/critic_mean" in row and row["updates/student"] in (2, 4)
    AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------------------------------ one-line errors
def test_broken_teacher_files_and_text_are_one_line_errors(tiny_teacher_dir, tmp_path, capsys):
    import shutil

    from fewstep.digits import DIGITS_T2I_TEACHER

    cases = []
    bad_config = tmp_path / "bad_config"
    shutil.copytree(tiny_teacher_dir, bad_config)
    (bad_config / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel", ')
    cases.append((bad_config, [], f"teacher file {str(bad_config / 'unet' / 'config.json')!r} is not valid JSON"))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_teacher_dir, truncated)
    weights = next((truncated / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    cases.append((truncated, [], f"teacher {str(truncated / 'unet')!r}: its weights do not load"))
    cases.append((DIGITS_T2I_TEACHER, [], "name it instead: model.teacher digits_t2i"))
    for teacher, extra, needle in cases:
        line = one_line_error(main(common(teacher, tmp_path / "out", 1, *extra), capsys))
        assert needle in line, line
    assert not (tmp_path / "out").exists()


def test_prompts_that_are_not_utf8_are_a_one_line_error(tmp_path):
    from fewstep.errors import ConfigError
    from fewstep.training.data import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("a photo of a caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text") as e:
        read_prompts(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_speedup_is_measured_interleaved_with_its_spread():
    """The student/teacher speed ratio comes from alternating timed calls in one process: median and range."""
    from conftest import tiny_class_unet
    from diffusers import DDIMScheduler
    from fewstep_pipelines import FewStepClassPipeline, FewStepScheduler

    from fewstep.digits.scoring import speedup

    unet = tiny_class_unet()
    student = FewStepClassPipeline(unet=unet, scheduler=FewStepScheduler(beta_schedule="squaredcos_cap_v2",
                                   prediction_type="v_prediction", train_timesteps=[999]))
    teacher = FewStepClassPipeline(unet=unet, scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2",
                                   prediction_type="v_prediction", timestep_spacing="trailing"))
    for pipe in (student, teacher):
        pipe.set_progress_bar_config(disable=True)
    r = speedup(student, teacher, teacher_steps=8, guidance_scale=2.0, batch=4, repeats=3)
    assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"] and r["speedup"] > 4      # 16 NFE vs 1
