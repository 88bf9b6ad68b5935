"""Decoupled DMD (arXiv 2511.22677): the reduction to DMD2 / Phased DMD bit for bit, the gradient against its
closed form, where t_CA is drawn, turn hygiene, refusals, and two training steps + export on tiny SD1.5 / SD3.

The exact toy teacher (``fewstep.testing.toy``) is unconditional, so its CA term is identically zero and the
method is DMD2 bit for bit there (``test_..._is_dmd2_bit_for_bit`` at guidance 1): a convergence run on it
would repeat DMD2's own."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from test_sid_fdistill import SCHED, grads, unet_denoiser, unet_parts, unet_source
from test_sid_fdistill import test_turns_touch_only_their_parameters as turns_touch_only_their_parameters
from test_t2i import generate, load_stock, train, work  # noqa: F401 (work is a fixture)

from fewstep.core import timesteps
from fewstep.core.conditioning import Batch, Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.losses import per_sample_mean
from fewstep.core.timesteps import from_timesteps
from fewstep.errors import ConfigError
from fewstep.methods import REGISTRY
from fewstep.methods.decoupled_dmd import (
    DecoupledDMD,
    DecoupledDMDConfig,
    PhasedDecoupledDMD,
    PhasedDecoupledDMDConfig,
    mean_variance_kl,
)
from fewstep.methods.dmd2 import DMD2, DMD2Config
from fewstep.methods.phased_dmd import PhasedDMD, PhasedDMDConfig, phased_generator
from fewstep.run import build
from fewstep.run import config as C
from fewstep.run.presets import PRESETS
from fewstep.run.validate import validate

T4 = (999, 749, 499, 249)


def perturbed(denoiser: Denoiser, seed: int = 9) -> Denoiser:
    """The denoiser with its weights moved (the shared test networks start with critic == teacher, where the DM
    term is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return denoiser


def live_parts(K: int = 1, gan: bool = True):
    """``unet_parts`` with a critic that differs from the teacher."""
    teacher, student, critic, head = unet_parts(K, gan)
    return teacher, student, perturbed(critic), head


def same_grads(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


def phased_parts(t_list=(999, 499), phases: int = 2):
    teacher, student, critic, _ = live_parts(gan=False)
    student = FewStepGenerator(student.denoiser, from_timesteps(t_list, SCHED))
    experts = [student] + [copy.deepcopy(student) for _ in range(phases - 1)]
    return teacher, phased_generator(experts, phases), critic, 8


def unet_method(t_list=T4, gan: bool = False, **kw) -> DecoupledDMD:
    teacher, student, critic, head = live_parts(gan=gan)
    student = FewStepGenerator(student.denoiser, from_timesteps(t_list, SCHED))
    return DecoupledDMD(DecoupledDMDConfig(gan_weight_student=3e-3 if gan else 0.0, **kw), teacher, student, critic,
                        head)


# ------------------------------------------------------------------------------------------ reductions
@pytest.mark.parametrize("w,ca_range,gan_weight,K", [(2.0, "same", g, K) for g in (0.0, 3e-3) for K in (1, 2)]
                         + [(1.0, "below", 3e-3, 2), (1.0, "full", 0.0, 2)])
def test_one_sample_and_unit_weights_is_dmd2_bit_for_bit(w, ca_range, gan_weight, K):
    """CA at DM's sample with weights 1 is DMD2: student loss and every gradient equal, bit for bit. Without
    guidance CA is zero wherever it is drawn, so every ca_range is DMD2 then."""
    parts = live_parts(K)
    kw = {"gan_weight_student": gan_weight, "guidance_scale": w}
    dmd = DMD2(DMD2Config(**kw), *copy.deepcopy(parts))
    dec = DecoupledDMD(DecoupledDMDConfig(ca_range=ca_range, **kw), *copy.deepcopy(parts))
    src = unet_source()
    for step in (0, 3):
        for ti, turn in enumerate(("critic", "student")):
            batch = src.batch(step, ti)
            loss_a, g_a = grads(dmd, turn, batch, step)
            loss_b, g_b = grads(dec, turn, batch, step)
            assert torch.equal(loss_a, loss_b) and same_grads(g_a, g_b), (turn, step)


def test_decoupling_changes_the_student_gradient_and_only_it():
    """The same networks with CA drawn below the input time (or over the full range, independently): the student
    gradient differs from DMD2's, the critic's does not."""
    parts = live_parts(2)
    dmd = DMD2(DMD2Config(guidance_scale=2.0), *copy.deepcopy(parts))
    src = unet_source()
    for ca_range in ("below", "full"):
        dec = DecoupledDMD(DecoupledDMDConfig(guidance_scale=2.0, ca_range=ca_range), *copy.deepcopy(parts))
        for step in (0, 1):
            batch = src.batch(step, 1)
            assert same_grads(grads(dmd, "critic", batch, step)[1], grads(dec, "critic", batch, step)[1])
            a, b = grads(dmd, "student", batch, step)[1], grads(dec, "student", batch, step)[1]
            assert not same_grads(a, b), (ca_range, step)


def test_phased_variant_at_one_sample_is_phased_dmd_bit_for_bit():
    parts = phased_parts()
    ref = PhasedDMD(PhasedDMDConfig(guidance_scale=2.0), *copy.deepcopy(parts))
    dec = PhasedDecoupledDMD(PhasedDecoupledDMDConfig(guidance_scale=2.0, ca_range="same"), *copy.deepcopy(parts))
    src = unet_source()
    for step in (0, 5):        # one step of each phase
        for ti, turn in enumerate(("critic", "student")):
            loss_a, g_a = grads(ref, turn, src.batch(step, ti), step)
            loss_b, g_b = grads(dec, turn, src.batch(step, ti), step)
            assert torch.equal(loss_a, loss_b) and same_grads(g_a, g_b), (turn, step)


@pytest.mark.parametrize("ca_range,w,passes", [("below", 2.0, [4, 8]), ("full", 2.0, [4, 8]), ("same", 2.0, [8]),
                                                ("below", 1.0, [4])])
def test_teacher_passes_per_student_step(ca_range, w, passes):
    """Batch sizes of the teacher's forward calls in one student turn (batch 4): cond at x_DM plus one batched
    cond + uncond call at x_CA, one batch-sized pass more than DMD2's single batched call; none more at one
    sample; the CA pass skipped without guidance. The critic runs once either way."""
    method = unet_method(t_list=(999, 499), ca_range=ca_range, guidance_scale=w)
    seen = {"teacher": [], "critic": []}
    for name, sizes in seen.items():
        getattr(method, name).backbone.model.register_forward_hook(
            lambda m, args, out, sizes=sizes: sizes.append(len(args[0])))
    with torch.no_grad():
        method("student", unet_source().batch(0, 1), 0)
    assert seen == {"teacher": passes, "critic": [4]}


# ------------------------------------------------------------------------------------------ the gradient
def fixed_tensors():
    torch.manual_seed(4)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    x_dm, x_ca = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t_dm, t_ca = torch.tensor([0.3, 0.6, 0.9]), torch.tensor([0.1, 0.25, 0.5])
    batch = Batch(noise=torch.zeros_like(x), cond=Cond(labels=torch.tensor([0, 3, 7])),
                  uncond=Cond(labels=torch.full((3,), 10)))
    return x, x_dm, t_dm, x_ca, t_ca, batch


def student_of(teacher: Denoiser) -> FewStepGenerator:
    return FewStepGenerator(copy.deepcopy(teacher), from_timesteps([999], SCHED))


def test_gradient_matches_closed_form():
    """dL/dx = [dm_w (F^c - T^c)(x_dm) + ca_w (w - 1)(T^u - T^c)(x_ca)] / (mean|x - x0_hat| numel)
    + kl_w [(m - m*) / v* + (1 / v* - 1 / v)(x - m)] / numel, each network evaluated on its own."""
    teacher, critic = unet_denoiser(0).requires_grad_(False), perturbed(unet_denoiser(0)).requires_grad_(False)
    w, dm_w, ca_w, kl_w, m_star, v_star = 2.5, 0.7, 1.3, 0.2, 0.1, 0.8
    cfg = DecoupledDMDConfig(guidance_scale=w, dm_weight=dm_w, ca_weight=ca_w, kl_weight=kl_w, kl_mean=m_star,
                             kl_var=v_star)
    method = DecoupledDMD(cfg, teacher, student_of(teacher), critic)
    x, x_dm, t_dm, x_ca, t_ca, batch = fixed_tensors()
    loss, logs = method.distribution_matching(x, x_dm, t_dm, batch, x_ca, t_ca)
    (auto,) = torch.autograd.grad(loss, x)

    f64 = torch.float64
    t_c, f = teacher(x_dm, t_dm, batch.cond, dtype=f64), critic(x_dm, t_dm, batch.cond, dtype=f64)
    c_ca, u_ca = teacher(x_ca, t_ca, batch.cond, dtype=f64), teacher(x_ca, t_ca, batch.uncond, dtype=f64)
    x0_hat = t_c + ca_w * (w - 1) * (c_ca - u_ca)
    xd, n = x.detach().double(), x.numel()
    dmd = (dm_w * (f - t_c) + ca_w * (w - 1) * (u_ca - c_ca)) / per_sample_mean((xd - x0_hat).abs()) / n
    m, v = per_sample_mean(xd), per_sample_mean((xd - per_sample_mean(xd)) ** 2)
    kl = ((m - m_star) / v_star + (1 / v_star - 1 / v) * (xd - m)) / n
    closed = dmd + kl_w * kl
    # float32 backbone passes (batched there, one by one here) and a float32 KL: agreement to float32 precision
    torch.testing.assert_close(auto.double(), closed, rtol=1e-4, atol=1e-5 * closed.abs().max().item())
    assert min(dmd.abs().max(), (kl_w * kl).abs().max()) > 0.1 * closed.abs().max()     # neither term negligible
    assert (f - t_c).abs().mean() > 1e-3 and (u_ca - c_ca).abs().mean() > 1e-3        # both terms are live
    closed_kl = (0.5 * ((v + (m - m_star) ** 2) / v_star - 1 - torch.log(v / v_star))).mean()
    torch.testing.assert_close(logs["loss/student/kl"].double(), closed_kl, rtol=1e-5, atol=0)


def test_kl_is_zero_exactly_at_the_target_statistics():
    x = torch.randn(4, 3, 5, 5)
    x = (x - per_sample_mean(x)) / per_sample_mean((x - per_sample_mean(x)) ** 2).sqrt()   # mean 0, var 1
    assert mean_variance_kl(x * 0.9 + 0.075, 0.075, 0.81).abs() < 1e-6
    assert mean_variance_kl(x * 2.0, 0.075, 0.81) > 0.1


def test_ca_weight_at_one_sample_is_dmd2_at_rescaled_guidance():
    """At one sample, ca_weight lambda with dm_weight 1 is DMD2 at guidance 1 + lambda (w - 1) (normaliser too)."""
    teacher, critic = unet_denoiser(0).requires_grad_(False), perturbed(unet_denoiser(0)).requires_grad_(False)
    x, x_dm, t_dm, _, _, batch = fixed_tensors()
    dec = DecoupledDMD(DecoupledDMDConfig(guidance_scale=3.0, ca_weight=0.4), teacher, student_of(teacher), critic)
    ref = DMD2(DMD2Config(guidance_scale=1 + 0.4 * 2.0), teacher, student_of(teacher), critic)
    (a,) = torch.autograd.grad(dec.distribution_matching(x, x_dm, t_dm, batch)[0], x)
    (b,) = torch.autograd.grad(ref.distribution_matching(x, x_dm, t_dm, batch)[0], x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(a, torch.autograd.grad(DMD2(DMD2Config(guidance_scale=3.0), teacher,
                                                          student_of(teacher), critic).distribution_matching(
        x, x_dm, t_dm, batch)[0], x)[0], rtol=1e-3)


# ------------------------------------------------------------------------------------------ where t_CA is
def draws(method, steps=range(16)):
    """(k, t_gen, t_dm, t_ca) over many steps and the 4 samples of each batch."""
    src, rows = unet_source(), []
    with torch.no_grad():
        for step in steps:
            _, (_, t_dm), (_, t_ca), _ = method.draws(src.batch(step, 1), step)
            k = method.sim_step(step)
            rows += [(k, float(method.student.t_list[k]), float(a), float(b)) for a, b in zip(t_dm, t_ca)]
    return rows


@pytest.mark.parametrize("ca_margin", [0.001, 0.0006])
def test_ca_time_is_below_the_students_input_and_above_t_min(ca_margin):
    method = unet_method(ca_margin=ca_margin)
    rows = draws(method)
    assert {r[0] for r in rows} == {0, 1, 2, 3}
    for k, t_gen, t_dm, t_ca in rows:
        assert 0.02 <= t_ca < t_gen and t_ca <= 0.98, (k, t_gen, t_ca)
        assert SCHED.quantize(torch.tensor(t_ca)).item() == pytest.approx(t_ca, abs=1e-7)   # on the grid
    for k in range(4):          # the window's top edge, snapped to the time grid, is still below the input
        top = timesteps.sample("uniform", torch.ones(1), SCHED, *method.ca_window(k))
        t_gen = float(method.student.t_list[k])
        assert min(t_gen - 2 / 999, 0.98 - 1 / 999) <= top < t_gen, (k, top)
    for k in (1, 2, 3):         # DM keeps the full range; CA fills its own window
        assert max(r[2] for r in rows if r[0] == k) > T4[k] / 999
        assert max(r[3] for r in rows if r[0] == k) > 0.02 + 0.5 * (T4[k] / 999 - 0.02)
    full = draws(unet_method(ca_range="full"), range(8))
    assert any(t_ca > t_gen for _, t_gen, _, t_ca in full)
    assert all(t_dm == t_ca for *_, t_dm, t_ca in draws(unet_method(ca_range="same"), range(4)))


def test_phased_ca_time_is_below_the_input_inside_the_phase():
    """2 experts over 4 steps: phase 0 covers (499/999, 1], phase 1 (0, 499/999]."""
    method = PhasedDecoupledDMD(PhasedDecoupledDMDConfig(guidance_scale=2.0, phase_order="alternate",
                                                         student_every=1),
                                *phased_parts(T4, phases=2))
    rows = draws(method)
    assert {r[0] for r in rows} == {0, 1, 2, 3}
    for k, t_gen, t_dm, t_ca in rows:
        s = 499 / 999 if k < 2 else 0.0
        assert max(0.02, s + 0.02) - 1e-6 <= t_ca < t_gen, (k, t_gen, t_ca)
        assert s < t_dm <= (1.0 if k < 2 else 499 / 999) + 1e-6


# ------------------------------------------------------------------------------------------ turns, build, refusals
@pytest.mark.parametrize("make", [
    lambda: unet_method(gan=True, kl_weight=0.1, guidance_scale=2.0),
    lambda: unet_method(t_list=(999,), ca_range="full", dm_weight=0.0, guidance_scale=3.0),
    lambda: PhasedDecoupledDMD(PhasedDecoupledDMDConfig(guidance_scale=2.0), *phased_parts()),
], ids=["4step_gan_kl", "1step_ca_only", "phased"])
def test_each_turn_touches_only_its_own_parameters(make):
    turns_touch_only_their_parameters(make)


def test_the_method_builds_each_variant_from_its_config(tiny_teacher_dir):
    assert REGISTRY["decoupled_dmd"] is DecoupledDMD
    for name, cls, experts in (("digits_decoupled_dmd_4step", DecoupledDMD, 1),
                               ("digits_decoupled_dmd_phased", PhasedDecoupledDMD, 2)):
        cfg = PRESETS["decoupled_dmd"][name]()
        cfg.model.teacher = str(tiny_teacher_dir)
        validate(cfg)
        method = build.make_method(cfg, build.load_teacher(cfg.model))
        assert type(method) is cls and method.name == "decoupled_dmd" and method.student.P == experts


BAD = [([], "method.ca_range 'half' is not valid", ["--method.ca_range", "half"]),
       ([], "method.ca_margin 0.0 must be in (0, 1)", ["--method.ca_margin", "0"]),
       ([], "method.dm_weight -1.0 / method.ca_weight 1.0 must be >= 0", ["--method.dm_weight", "-1"]),
       ([], "method.kl_var 0.0 > 0", ["--method.kl_var", "0"]),
       (["--preset", "digits_decoupled_dmd_phased"], "set model.mode full", ["--model.mode", "lora"]),
       (["--preset", "digits_decoupled_dmd_phased"], "method.phases 9: need 1..4", ["--method.phases", "9"])]


@pytest.mark.parametrize("preset,needle,args", BAD, ids=[b[1][:24] for b in BAD])
def test_impossible_settings_are_refused_in_one_line(preset, needle, args):
    cfg, _ = C.parse([*preset, *args], PRESETS["decoupled_dmd"], "digits_decoupled_dmd")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_step_with_no_ca_time_left_is_refused():
    with pytest.raises(ConfigError, match=r"student step 3 takes its input at t = 0.2492.*set method.ca_range full"):
        unet_method(t_min=0.3)
    unet_method(t_min=0.3, ca_range="full")


# ------------------------------------------------------------------------------------------ text-to-image
@pytest.mark.parametrize("family,preset,extra", [
    ("sd15", "digits_decoupled_dmd_4step", "images"),       # GAN on real images; stock LCMScheduler
    ("sd3", "digits_decoupled_dmd_phased", "1000,750,500,250"),   # 2 experts behind the FewStepExperts switch
])
def test_two_steps_and_export_reload_in_stock_diffusers(family, preset, extra, work, teachers):  # noqa: F811
    """Through the entry point (both turns on both steps), the export loads in the family's stock pipeline and
    samples 4 steps; the run folder reloads as a student."""
    args = ["--data.images", str(work / "images")] if extra == "images" else ["--model.student_timesteps", extra]
    out = train("decoupled_dmd", teachers(family), work / "runs" / f"decoupled_{family}", "--preset", preset,
                "--data.prompts", str(work / "prompts.txt"), "--method.student_every", "1", *args)
    saved = json.loads((out / "config.json").read_text())
    assert saved["method_name"] == "decoupled_dmd" and saved["method"]["ca_range"] == "below"
    pipe = load_stock(family, out)
    x = generate(pipe, family, ["a red cat", "an old car"], 4)
    assert tuple(x.shape) == (2, 3, 32, 32) and torch.isfinite(x).all()
    student = FewStepGenerator.from_pretrained(out)
    assert student.K == 4 and student.P == (2 if "phased" in preset else 1)


def test_every_decoupled_preset_guides_its_real_score():
    """CA = (alpha - 1)(s_T^c - s_T^u) vanishes at alpha = 1, and the method is DMD2 there: a preset derived from a
    DMD2 preset that dropped its guidance to 1 (digits_dmd2 did) must keep a guidance of its own."""
    from fewstep.run.presets import PRESETS

    for name, make in PRESETS["decoupled_dmd"].items():
        assert make().method.guidance_scale > 1, name
