"""DMD2 turns, the loop's resume and accumulation guarantees, on a tiny real UNet2DModel."""
import copy
from pathlib import Path

import pytest
import torch

from fewstep.methods.dmd2 import DMD2, DMD2Config
from fewstep.run import build
from fewstep.run.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from fewstep.training import loop
from fewstep.training.data import ClassLabelSource


def make(teacher_dir, out, *, steps=4, batch=4, accum=1, t_list=(999,), gan=True, ema=0.9, adam_eps=1e-8):
    cfg = RunConfig(method_name="dmd2",
                    method=DMD2Config(student_every=2, gan_weight_student=1e-2 if gan else 0.0),
                    model=ModelConfig(teacher=str(teacher_dir), student_timesteps=t_list, gan_head=gan),
                    data=DataConfig(batch_size=batch),
                    train=TrainConfig(output_dir=str(out), max_steps=steps, grad_accum=accum, checkpoint_every=2,
                                      sample_every=1000, ema_decay=ema, log_every=1),
                    optim={"student": OptimConfig(lr=1e-3, eps=adam_eps), "critic": OptimConfig(lr=1e-3, eps=adam_eps)})
    torch.manual_seed(0)    # the head's initialization
    teacher = build.load_teacher(cfg.model)
    critic = build.make_critic(teacher, cfg.model)
    method = DMD2(cfg.method, teacher.denoiser, build.make_student(teacher, cfg.model), critic,
                  build.make_head(critic, cfg.model))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, torch.arange(20) % 10
    source = ClassLabelSource(images, labels, 10, 10, batch, seed=0)
    return cfg, method, source


def accel(out):
    return build.accelerator("no", str(out))


def params_of(method):
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


@pytest.mark.parametrize("gan", [False, True])
def test_each_turn_touches_only_its_parameters(tiny_teacher_dir, tmp_path, gan):
    cfg, method, source = make(tiny_teacher_dir, tmp_path, gan=gan, t_list=(999, 499))
    params = method.trainable()
    all_params = {id(p): name for name, ps in params.items() for p in ps}
    for turn in ("critic", "student"):
        loop._set_turn(params, turn)
        loss, logs = method(turn, source.batch(0, 0), step=1)
        assert torch.isfinite(loss)
        loss.backward()
        for p in method.parameters():
            owner = all_params.get(id(p))
            if owner == turn:
                continue
            assert p.grad is None, f"turn {turn} left a gradient on a {owner or 'teacher'} parameter"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params[turn])
        method.zero_grad(set_to_none=True)
    if gan:
        assert "loss/student/gan" in method("student", source.batch(0, 1), 0)[1]


def test_training_leaves_teacher_bit_identical_and_moves_student(tiny_teacher_dir, tmp_path):
    cfg, method, source = make(tiny_teacher_dir, tmp_path, steps=4)
    teacher0 = copy.deepcopy(method.teacher.state_dict())
    student0 = copy.deepcopy(method.student.state_dict())
    result = loop.train(cfg, method, source, accel(tmp_path))
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, teacher0[k]), k
    assert any(not torch.equal(v, student0[k]) for k, v in method.student.state_dict().items())
    assert result["updates"] == {"critic": 4, "student": 2}


def test_backward_simulation_step_is_a_function_of_the_step(tiny_teacher_dir, tmp_path):
    _, method, _ = make(tiny_teacher_dir, tmp_path, t_list=(999, 749, 499, 249))
    ks = [method.sim_step(s) for s in range(40)]
    assert ks == [method.sim_step(s) for s in range(40)]
    assert set(ks) == {0, 1, 2, 3}


def test_resume_equals_uninterrupted(tiny_teacher_dir, tmp_path):
    cfg, method, source = make(tiny_teacher_dir, tmp_path / "a", steps=6)
    loop.train(cfg, method, source, accel(tmp_path / "a"))
    straight = params_of(method)
    cfg, method, source = make(tiny_teacher_dir, tmp_path / "b", steps=4)
    loop.train(cfg, method, source, accel(tmp_path / "b"))          # "killed" after the step-4 checkpoint
    cfg, method, source = make(tiny_teacher_dir, tmp_path / "b", steps=6)   # fresh process state
    result = loop.train(cfg, method, source, accel(tmp_path / "b"))
    assert result["step"] == 6
    for k, v in params_of(method).items():
        assert torch.equal(v, straight[k]), k


def test_accumulation_4x1_equals_2x2(tiny_teacher_dir, tmp_path):
    # Adam's first steps are lr * g / (|g| + eps): for gradients near 0 (e.g. attention key biases, whose true
    # gradient is 0) round-off of either summation order decides the sign. A large eps makes the update
    # proportional to the gradient, so equal gradients give equal parameters.
    kw = dict(steps=3, gan=True, adam_eps=1e-2)
    cfg, m1, s1 = make(tiny_teacher_dir, tmp_path / "a", batch=4, accum=1, **kw)
    loop.train(cfg, m1, s1, accel(tmp_path / "a"))
    cfg, m2, s2 = make(tiny_teacher_dir, tmp_path / "b", batch=2, accum=2, **kw)
    loop.train(cfg, m2, s2, accel(tmp_path / "b"))
    for (k, a), b in zip(params_of(m1).items(), params_of(m2).values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)


def test_checkpoints_are_pruned_and_partial_ones_ignored(tiny_teacher_dir, tmp_path):
    from fewstep.training import checkpoint

    cfg, method, source = make(tiny_teacher_dir, tmp_path, steps=6)
    loop.train(cfg, method, source, accel(tmp_path))
    root = Path(tmp_path) / "checkpoints"
    assert [s for s, _ in checkpoint.complete(root)] == [4, 6]
    (root / ".tmp-step_00000008-999").mkdir()          # a kill during a write leaves this behind
    (root / "step_00000010").mkdir()                    # renamed but empty: not complete
    assert checkpoint.latest(root).name == "step_00000006"
