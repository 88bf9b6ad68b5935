"""Fault tolerance: non-finite losses, failing checkpoint writes, random SIGKILLs; and fuzzed input."""
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dmd2_loop import accel, make

from fewstep.run import config
from fewstep.run.presets import PRESETS
from fewstep.training import checkpoint, loop

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class NaNAfter:
    """Wraps a method so every loss from step ``start`` on is NaN (an injected divergence)."""

    def __init__(self, method, start):
        self.method, self.start = method, start

    def __getattr__(self, name):
        return getattr(self.method, name)

    def __call__(self, turn, batch, step):
        loss, logs = self.method(turn, batch, step)
        return (loss * float("nan") if step >= self.start else loss), logs


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(tiny_teacher_dir, tmp_path):
    cfg, method, source = make(tiny_teacher_dir, tmp_path, steps=20)
    cfg.train.max_nonfinite = 3
    before = {k: v.clone() for k, v in method.student.state_dict().items()}
    acc = accel(tmp_path)
    acc.prepare = lambda m: NaNAfter(m, start=4)      # the loop calls what prepare returns
    with pytest.raises(loop.NonFiniteError, match="3 consecutive non-finite updates"):
        loop.train(cfg, method, source, acc)
    last = checkpoint.latest(tmp_path / "checkpoints")
    assert last.name == "step_00000004"                 # written before the divergence, and it loads
    state = checkpoint.load(last)
    assert all(torch.isfinite(v).all() for v in state["modules"]["student"].values())
    assert any(not torch.equal(before[k], v) for k, v in method.student.state_dict().items())


def run(args, **kw):
    return subprocess.run([sys.executable, "train/dmd2.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600, **kw)


def test_failing_checkpoint_write_stops_cleanly_and_keeps_the_previous_one(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--model.teacher", str(tiny_teacher_dir), "--train.output_dir", str(out), "--train.evaluate", "false",
              "--data.batch_size", "2", "--train.checkpoint_every", "2"]
    assert run(common + ["--train.max_steps", "2"]).returncode == 0
    size = (out / "checkpoints" / "step_00000002" / "state.pt").stat().st_size

    def limit():   # any file larger than half a checkpoint fails to write (EFBIG), like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    r = run(common + ["--train.max_steps", "4"], preexec_fn=limit)
    assert r.returncode == 1
    assert "could not write the step-4 checkpoint" in r.stderr and "step_00000002" in r.stderr
    assert [s for s, _ in checkpoint.complete(out / "checkpoints")] == [2]
    checkpoint.load(out / "checkpoints" / "step_00000002")


@pytest.mark.slow
def test_random_sigkills_resume_to_the_uninterrupted_result(tiny_teacher_dir, tmp_path):
    """At least 20 SIGKILLs at random moments (some inside checkpoint writes); the final weights equal an
    uninterrupted run's."""
    common = ["--model.teacher", str(tiny_teacher_dir), "--train.evaluate", "false", "--data.batch_size", "2",
              "--train.max_steps", "60", "--train.checkpoint_every", "1", "--train.sample_every", "1000"]
    assert run(common + ["--train.output_dir", str(tmp_path / "ref")]).returncode == 0
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    while not (out / "unet").exists():
        proc = subprocess.Popen([sys.executable, "train/dmd2.py", *common, "--train.output_dir", str(out)],
                                cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = checkpoint.latest(out / "checkpoints")
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and checkpoint.latest(out / "checkpoints") == start:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))         # somewhere in the next step or checkpoint write
        if proc.poll() is None and kills < 25:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 20
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ref" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    print(f"kills survived: {kills}/{kills}")


KEYS = list(config.flatten(PRESETS["dmd2"]["digits_dmd2"]()))
VALUES = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(str),
                   st.sampled_from(["true", "false", "999,749", "[999, 499]", "", "nan", "-1", "1e-4"]))
ARG = st.one_of(st.tuples(st.sampled_from(KEYS + ["preset", "method.nope", "train"]), VALUES),
                st.tuples(st.text(min_size=1, max_size=10), VALUES))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ARG, max_size=6), st.booleans())
def test_config_parser_fuzz(pairs, equals):
    argv = []
    for k, v in pairs:
        argv += [f"--{k}={v}"] if equals else [f"--{k}", v]
    try:
        config.parse(argv, PRESETS["dmd2"], "digits_dmd2")
    except config.ConfigError as e:
        assert "\n" not in str(e) and str(e)


@pytest.fixture(scope="module")
def tiny_pipe():
    from conftest import tiny_class_unet
    from fewstep_pipelines import FewStepClassPipeline, FewStepScheduler

    sched = FewStepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                             train_timesteps=[999, 749, 499, 249])
    pipe = FewStepClassPipeline(unet=tiny_class_unet(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


LABEL = st.one_of(st.integers(-3, 13), st.floats(allow_nan=True), st.text(max_size=3), st.none())
CALL = st.fixed_dictionaries({
    "class_labels": st.one_of(LABEL, st.lists(LABEL, max_size=4)),
    "num_inference_steps": st.one_of(st.none(), st.integers(-2, 7), st.floats(allow_nan=True), st.text(max_size=2)),
    "guidance_scale": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 5)),
    "generator": st.one_of(st.none(), st.integers(0, 5).map(lambda n: [torch.Generator().manual_seed(i)
                                                                         for i in range(n)])),
    "output_type": st.sampled_from(["pt", "np", "pil", "latent", "jpg", ""]),
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(CALL)
def test_pipeline_call_fuzz(tiny_pipe, kwargs):
    """Every call either returns images or raises ValueError naming the bad value, never another error."""
    try:
        out = tiny_pipe(**kwargs).images
    except ValueError as e:
        assert str(e)
    else:
        assert len(out) >= 1
