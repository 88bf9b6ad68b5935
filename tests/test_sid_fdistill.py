"""SiD and f-distill: the SiD gradient against its closed form (through both frozen networks), f-distill
reverse-KL against DMD2 bit for bit, f-weights, the ratio EMA in checkpoints, turn hygiene, convergence
on the exact Gaussian-mixture teacher, and the entry scripts."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_class_unet

from fewstep.backbones import adapter_for
from fewstep.core import losses
from fewstep.core.conditioning import Batch, Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.heads import ConvHead
from fewstep.core.schedules import VPDiscrete, bcast
from fewstep.core.timesteps import from_timesteps
from fewstep.methods.dmd2 import DMD2, DMD2Config
from fewstep.methods.fdistill import FDistill, FDistillConfig
from fewstep.methods.sid import SiD, SiDConfig, sid_timesteps
from fewstep.run.config import OptimConfig, RunConfig, TrainConfig
from fewstep.testing.toy import ToyGMMModel, toy_denoiser, toy_source
from fewstep.training import loop
from fewstep.training.data import ClassLabelSource

ROOT = Path(__file__).resolve().parents[1]
SCHED = VPDiscrete.from_betas(1000, beta_schedule="squaredcos_cap_v2")


def unet_denoiser(seed: int) -> Denoiser:
    torch.manual_seed(seed)
    model = tiny_class_unet()
    for p in model.parameters():   # a random (not zero-output) network so every Jacobian term is non-trivial
        p.data.normal_(0, 0.2)
    return Denoiser(adapter_for(model, "v_prediction"), SCHED)


def toy_pair():
    real = toy_denoiser(ToyGMMModel(means=((-1.0, 0.5), (1.0, -0.5)), std=0.3))
    fake = copy.deepcopy(real)
    torch.manual_seed(1)
    torch.nn.init.normal_(fake.backbone.model.out.weight, std=0.3)   # critic != teacher
    return real, fake


@pytest.mark.parametrize("nets", ["unet", "toy"])
@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_gradient_matches_closed_form(nets, alpha):
    if nets == "unet":
        real, fake, shape, cond = unet_denoiser(0), unet_denoiser(1), (3, 1, 8, 8), Cond(labels=torch.tensor([0, 3, 7]))
    else:
        (real, fake), shape, cond = toy_pair(), (3, 2, 1, 1), Cond(labels=torch.zeros(3, dtype=torch.long))
    real.requires_grad_(False)
    fake.requires_grad_(False)
    torch.manual_seed(2)
    x_g = torch.randn(shape, requires_grad=True)
    eps, t = torch.randn(shape), torch.tensor([0.3, 0.55, 0.8])
    a, s = bcast(SCHED.alpha(t), x_g), bcast(SCHED.sigma(t), x_g)
    loss, _ = losses.sid(x_g, real(a * x_g + s * eps, t, cond), fake(a * x_g + s * eps, t, cond), alpha)
    (auto,) = torch.autograd.grad(loss, x_g)

    # closed form with explicit vector-Jacobian products of both networks at x_t
    x = x_g.detach()
    x_t = (a * x + s * eps).requires_grad_(True)
    y_r, y_f = real(x_t, t, cond), fake(x_t, t, cond)
    d, w = (y_r - y_f).detach(), (x - y_r.detach()).abs().mean(dim=(1, 2, 3), keepdim=True)
    e = (y_r.detach() - x) - alpha * d
    (jr,) = torch.autograd.grad(y_r, x_t, e + (1 - alpha) * d, retain_graph=True)
    (jf,) = torch.autograd.grad(y_f, x_t, e - alpha * d)
    closed = (-d + a * jr - a * jf) / (w * len(x))
    assert (jr.abs().sum() > 0) and (jf.abs().sum() > 0)
    torch.testing.assert_close(auto, closed, rtol=1e-4, atol=1e-6)


def test_sid_second_critic_term_uses_its_own_jacobian():
    real, fake = toy_pair()
    fake2 = copy.deepcopy(fake)
    torch.nn.init.normal_(fake2.backbone.model.out.weight, std=0.3)
    x_g = torch.randn(4, 2, 1, 1, requires_grad=True)
    t, cond = torch.full((4,), 0.5), Cond(labels=torch.zeros(4, dtype=torch.long))
    x_t = SCHED.add_noise(x_g, torch.randn_like(x_g), t)
    loss, _ = losses.sid(x_g, real(x_t, t, cond), fake(x_t, t, cond), 1.2, fake2(x_t, t, cond))
    (auto,) = torch.autograd.grad(loss, x_g)
    xt = x_t.detach().requires_grad_(True)
    y_r, y_f, y_f2 = real(xt, t, cond), fake(xt, t, cond), fake2(xt, t, cond)
    d = (y_r - y_f).detach()
    e = (y_r.detach() - x_g.detach()) - 1.2 * (y_r - y_f2).detach()
    w = (x_g.detach() - y_r.detach()).abs().mean(dim=(1, 2, 3), keepdim=True)
    a = bcast(SCHED.alpha(t), xt)
    vjp = lambda y, v: torch.autograd.grad(y, xt, v, retain_graph=True)[0]  # noqa: E731
    closed = (-d + a * vjp(y_r, e + d - 1.2 * d) - a * vjp(y_f, e) + 1.2 * a * vjp(y_f2, d)) / (w * 4)
    torch.testing.assert_close(auto, closed, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("div", ["reverse_kl", "forward_kl", "js", "squared_hellinger", "jeffreys", "neyman"])
def test_fdiv_weights_normalize_to_mean_one(div):
    r = torch.exp(torch.linspace(-2.3, 3.0, 37))
    h = losses.fdiv_weight(r, div)
    assert torch.allclose(h.mean(), torch.tensor(1.0), atol=1e-6)
    raw = {"reverse_kl": torch.ones_like(r), "forward_kl": r, "js": r / (1 + r), "squared_hellinger": r.sqrt(),
           "jeffreys": 1 + r, "neyman": 1 / r}[div]
    torch.testing.assert_close(h, raw / raw.mean())
    if div == "reverse_kl":
        assert torch.equal(h, torch.ones_like(r))
    with pytest.raises(ValueError, match="unknown f-divergence"):
        losses.fdiv_weight(r, "renyi")


def unet_parts(K: int = 1, gan: bool = True):
    teacher = unet_denoiser(0).requires_grad_(False)
    def copy_of():
        return Denoiser(adapter_for(copy.deepcopy(teacher.backbone.model).requires_grad_(True), "v_prediction"), SCHED)

    student = FewStepGenerator(copy_of(), from_timesteps([999, 499][:K], SCHED))
    critic = copy_of()
    torch.manual_seed(3)
    return teacher, student, critic, (ConvHead(critic.backbone.feature_channels()) if gan else None)


def unet_source(batch_size: int = 4) -> ClassLabelSource:
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    return ClassLabelSource(images, torch.arange(16) % 10, 10, 10, batch_size, seed=0)


def grads(method, turn: str, batch: Batch, step: int):
    loop._set_turn(method.trainable(), turn)
    for p in method.parameters():
        p.grad = None
    loss, _ = method(turn, batch, step)
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else None for p in method.trainable()[turn]]


@pytest.mark.parametrize("gan_weight", [0.0, 3e-3])
@pytest.mark.parametrize("K", [1, 2])
def test_fdistill_reverse_kl_is_dmd2_bit_for_bit(gan_weight, K):
    parts = unet_parts(K)
    kw = dict(gan_weight_student=gan_weight, guidance_scale=2.0)
    dmd = DMD2(DMD2Config(**kw), *copy.deepcopy(parts))
    fd = FDistill(FDistillConfig(divergence="reverse_kl", **kw), *copy.deepcopy(parts))
    src = unet_source()
    for step in (0, 3):
        for ti, turn in enumerate(("critic", "student")):
            batch = src.batch(step, ti)
            loss_a, g_a = grads(dmd, turn, batch, step)
            loss_b, g_b = grads(fd, turn, batch, step)
            assert torch.equal(loss_a, loss_b), turn
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g_a, g_b)), turn


def test_ratio_ema_round_trips_through_checkpoint_state():
    fd = FDistill(FDistillConfig(divergence="js", ratio_ema=0.5), *unet_parts())
    src = unet_source(8)
    for step in range(3):
        grads(fd, "student", src.batch(step, 1), step)
    state = {k: m.state_dict() for k, m in fd.checkpoint_modules().items()}
    assert "ratio" in state and not torch.equal(state["ratio"]["mean"], torch.ones_like(state["ratio"]["mean"]))
    fresh = FDistill(FDistillConfig(divergence="js", ratio_ema=0.5), *unet_parts())
    for k, m in fresh.checkpoint_modules().items():
        m.load_state_dict(state[k])
    assert torch.equal(fresh.ratio.mean, fd.ratio.mean) and torch.equal(fresh.ratio.seen, fd.ratio.seen)
    loss_a, _ = grads(fd, "student", src.batch(5, 1), 5)
    loss_b, _ = grads(fresh, "student", src.batch(5, 1), 5)
    assert torch.equal(loss_a, loss_b)


def sid_method(K: int = 1, gan: bool = False, **kw):
    teacher, _, critic, head = unet_parts(gan=gan)
    ts = from_timesteps(sid_timesteps(SCHED, 2.5, K), SCHED)
    model = copy.deepcopy(teacher.backbone.model).requires_grad_(True)
    student = FewStepGenerator(Denoiser(adapter_for(model, "v_prediction"), SCHED), ts, float(SCHED.sigma(ts[0])))
    return SiD(SiDConfig(**kw), teacher, student, critic, head)


@pytest.mark.parametrize("make", [
    lambda: sid_method(1, kappa_4=2.0), lambda: sid_method(4, lsg="zero_cfg"), lambda: sid_method(2, lsg="anti_cfg"),
    lambda: sid_method(1, kappa_1=1.5, kappa_2=1.5, kappa_3=2.0, kappa_4=1.5),
    lambda: sid_method(1, gan=True, kappa_4=2.0, gan_weight_student=1e-3),
    lambda: FDistill(FDistillConfig(divergence="jeffreys", gan_weight_student=3e-3), *unet_parts(2)),
    lambda: FDistill(FDistillConfig(divergence="neyman"), *unet_parts(1)),
], ids=["sid", "sid4_zero_cfg", "sid2_anti_cfg", "sid_lsg", "sida", "fdistill_gan", "fdistill"])
def test_turns_touch_only_their_parameters(make):
    method = make()
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    names = {turn: {id(p) for p in ps} for turn, ps in method.trainable().items()}
    assert [t.name for t in method.turns][0] == "critic"
    src = unet_source()
    for step in (0, 1):
        for ti, turn in enumerate(method.turns):
            loss, _ = grads(method, turn.name, src.batch(step, ti), step)
            assert torch.isfinite(loss), turn.name
            for p in method.parameters():
                if id(p) not in names[turn.name]:
                    assert p.grad is None, turn.name
                if p.grad is not None:
                    assert torch.isfinite(p.grad).all()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.trainable()[turn.name])
    after = method.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)


# ---------------------------------------------------------------- the exact toy teacher
def toy_run(kind: str, tmp_path, steps: int):
    """One-step student on the exact mixture 0.3 N(-1, 0.3^2) + 0.7 N(1, 0.3^2); returns (model, start, end)."""
    torch.manual_seed(0)
    model = ToyGMMModel(means=((-1.0,), (1.0,)), weights=(0.3, 0.7), std=0.3)
    teacher = toy_denoiser(model).requires_grad_(False)
    def copy_of():
        return Denoiser(adapter_for(copy.deepcopy(model).requires_grad_(True), "v_prediction"), SCHED)

    lr_critic = 1e-2
    if kind == "sid":
        ts = from_timesteps(sid_timesteps(SCHED, 2.5), SCHED)
        student = FewStepGenerator(copy_of(), ts, float(SCHED.sigma(ts[0])))
        method, lr_critic = SiD(SiDConfig(alpha=1.2), teacher, student, copy_of()), 1e-3
    else:
        student, critic = FewStepGenerator(copy_of(), from_timesteps([999], SCHED)), copy_of()
        cfg = dict(guidance_scale=1.0, student_every=1)
        method = (DMD2(DMD2Config(**cfg), teacher, student, critic) if kind == "dmd2" else
                  FDistill(FDistillConfig(divergence="js", **cfg), teacher, student, critic, ConvHead(64)))
    run = RunConfig(method_name=kind, method=method.cfg, train=TrainConfig(
        output_dir=str(tmp_path / kind), max_steps=steps, ema_decay=0.99, log_every=10**6, sample_every=10**6,
        checkpoint_every=10**6), optim={"student": OptimConfig(lr=1e-3, beta1=0.0, weight_decay=0.0),
                                        "critic": OptimConfig(lr=lr_critic, beta1=0.0, weight_decay=0.0)})
    from accelerate import Accelerator

    def draw():
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return method.student.sample(torch.randn(4000, 1, 1, 1, generator=g),
                                         Cond(labels=torch.zeros(4000, dtype=torch.long)), generator=g)

    start = draw()
    result = loop.train(run, method, toy_source(model, 128), Accelerator(cpu=True))
    with result["ema"].swapped():
        end = draw()
    return model, start, end


def close_to_truth(model, x) -> bool:
    return bool((model.mode_weights(x) - model.true_weights()).abs().max() < 0.1
                and (model.mean(x) - model.true_mean()).abs().max() < 0.1)


@pytest.mark.parametrize("kind,steps", [("sid", 400), ("fdistill", 350), ("dmd2", 350)])
def test_one_step_student_matches_exact_mixture(kind, steps, tmp_path):
    model, start, end = toy_run(kind, tmp_path, steps)
    assert not close_to_truth(model, start)       # the untrained generator is measurably off
    assert close_to_truth(model, end), (model.mode_weights(end).tolist(), model.mean(end).tolist())


# ---------------------------------------------------------------- entry scripts
def test_help_of_both_scripts():
    for script, preset in (("sid", "digits_sid"), ("fdistill", "digits_fdistill")):
        out = subprocess.run([sys.executable, str(ROOT / "train" / f"{script}.py"), "--help"], capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert preset in out.stdout and "--method." in out.stdout


@pytest.mark.parametrize("script", ["sid", "fdistill"])
def test_three_step_smoke_run_exports_a_pipeline(script, tiny_teacher_dir, tmp_path):
    out = tmp_path / script
    argv = ["--model.teacher", str(tiny_teacher_dir), "--train.output_dir", str(out), "--train.max_steps", "3",
            "--train.evaluate", "false", "--data.batch_size", "4"]
    from fewstep.run.cli import main

    main(script, argv=argv)
    index = json.loads((out / "model_index.json").read_text())
    assert "unet" in index and "scheduler" in index
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    if script == "sid":
        assert sched["train_timesteps"] == [755] and 0.9 < sched["init_noise_scale"] < 0.95
    from fewstep.digits import scoring as digits_eval

    pipe = digits_eval.load_pipeline(out)
    images = pipe([1, 2], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_ratio_bins_default_to_the_whole_range_starting_at_one(rate):
    """The default bins (FastGen's reading of the paper): 10 bins over t in [0, 1], each EMA starting at 1,
    ``mean <- rate * mean + (1 - rate) * batch mean`` where a bin is hit; the ratio is divided by its bin's mean."""
    from fewstep.methods.fdistill import RatioBins

    cfg = FDistillConfig(ratio_ema=rate, t_min=0.02, t_max=0.98)
    lo, hi = (0.0, 1.0) if cfg.bins_range == "schedule" else (cfg.t_min, cfg.t_max)
    bins = RatioBins(cfg.bins, lo, hi, cfg.ratio_ema, first_batch=cfg.ratio_init == "first_batch")
    g = torch.Generator().manual_seed(0)
    mean = [1.0] * 10
    for _ in range(3):
        r, t = torch.rand(16, generator=g) * 3, torch.rand(16, generator=g)
        out = bins.update_and_normalize(r, t)
        idx = [min(int(v * 10), 9) for v in t.tolist()]
        for b in set(idx):
            hit = [x for x, i in zip(r.tolist(), idx) if i == b]
            mean[b] = rate * mean[b] + (1 - rate) * sum(hit) / len(hit)
        want = torch.tensor([x / (mean[i] + 1e-6) for x, i in zip(r.tolist(), idx)])
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
