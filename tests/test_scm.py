"""sCM (Lu & Song, arXiv 2410.11081) and rCM (Zheng et al., arXiv 2510.08431): the exact VP / flow <-> TrigFlow map,
the sCD loss against Algorithm 1 with the JVP replaced by a central finite difference, turn isolation, rCM at
lambda = 0 equal to sCM, the export (plain diffusers, equal to fewstep's sampler) and two training steps on the tiny
SD1.5, SD3 and Flux pipelines (convergence on the exact toy teacher: tests/test_flowmap_toy.py).

The finite-difference check runs on test_meanflow's small smooth float64 flow model: diffusers' own models compute
their timestep sinusoids in float32, which limits a difference quotient to ~1e-3, far above the 1e-4 asked here.
"""
from __future__ import annotations

import copy
import math

import diffusers
import pytest
import torch
from test_meanflow import SmoothFlowNet
from tiny_models import assert_class_export_equals_sampler, captioned_images

from fewstep.core.adapter import adapter_for
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.schedules import RectifiedFlow, VPDiscrete
from fewstep.errors import ConfigError
from fewstep.methods.scm import SCM, SCMConfig, TrigTime, draw_times, warmup_ratio
from fewstep.run import build, cli, export
from fewstep.run import config as C
from fewstep.run.presets import PRESETS
from fewstep.run.validate import validate
from fewstep.training import loop

PROMPTS = ["a red cat", "two dogs on grass", "a blue house", "an old car"]


# ------------------------------------------------------------------------------------------ TrigFlow
@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("sigma_d", [1.0, 0.5])
def test_vp_and_flow_states_are_rescaled_trigflow_states(kind, sigma_d):
    """t = arctan(sigma_s / (sigma_d alpha_s)) of process time s inverts to s, and k(t) x_t = x_s for the same
    (x0, eps); at sigma_d = 1 t is arctan(sigma_s / alpha_s) (VP) and arctan(s / (1 - s)) (flow)."""
    sch = VPDiscrete.from_betas(1000, beta_schedule="squaredcos_cap_v2") if kind == "vp" else RectifiedFlow()
    tt = TrigTime(sch, "v_prediction" if kind == "vp" else "flow_prediction", sigma_d)
    s = torch.tensor([1 / 999, 0.25, 0.5004, 499 / 999, 0.9, 0.999], dtype=torch.float64)
    t = tt.of(s)
    torch.testing.assert_close(tt.process_time(t).double(), s, atol=1e-7, rtol=0)      # float32 result
    a, sg = sch.alpha(s, torch.float64), sch.sigma(s, torch.float64)
    if sigma_d == 1.0:
        torch.testing.assert_close(t, torch.atan(sg / a) if kind == "vp" else torch.atan(s / (1 - s)))
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    tb, ab, sb = (v[:, None, None, None] for v in (t, a, sg))
    x_t = tb.cos() * x0 + sigma_d * tb.sin() * eps
    torch.testing.assert_close(tt.scale(t)[:, None, None, None] * x_t, ab * x0 + sb * eps, atol=1e-12, rtol=0)
    assert tt.hi == pytest.approx(math.pi / 2, abs=1e-3) and tt.lo < 0.02


def test_times_follow_the_papers_proposal():
    """sigma_d tan t is log-normal(P_mean, P_std); the warm-up ramps 0 -> 1 over H steps."""
    cfg = SCMConfig(sigma_d=0.5, p_mean=-1.0, p_std=1.4)
    tau = torch.log(cfg.sigma_d * torch.tan(draw_times(torch.rand(40000, generator=torch.Generator().manual_seed(0)),
                                                       cfg).double()))
    assert abs(float(tau.mean()) + 1.0) < 0.03 and abs(float(tau.std()) - 1.4) < 0.03
    assert [warmup_ratio(k, 10) for k in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0] and warmup_ratio(0, 0) == 1.0


# ------------------------------------------------------------------------------------------ the loss
def smooth_method(**cfg) -> SCM:
    torch.manual_seed(0)
    model = SmoothFlowNet().double().eval().requires_grad_(False)
    teacher = Denoiser(adapter_for(model, "flow_prediction"), RectifiedFlow())
    student = Denoiser(adapter_for(copy.deepcopy(model).requires_grad_(True), "flow_prediction"), RectifiedFlow())
    method = SCM(SCMConfig(**cfg), teacher, FewStepGenerator(student, [1.0]))
    with torch.no_grad():       # a student some way into training (not the teacher), a weight w_phi that varies in t
        student.backbone.model.out.weight.add_(0.1)
        method.scm.weight.linear.weight.normal_(0, 0.3)
        method.scm.weight.linear.bias.fill_(0.2)
    return method


@pytest.mark.parametrize("w,r,sigma_d", [(1.25, 0.5, 0.5), (2.0, 1.0, 1.0), (1.0, 0.0, 0.5)])
def test_loss_equals_algorithm_1_with_a_finite_difference(w, r, sigma_d):
    """loss = mean_b e^{w_phi} / D ||F - F^- - g||^2 - w_phi with g = -cos^2 t (sigma_d F^- - dx/dt) - r cos t sin t
    (x_t + sigma_d dF^-/dt), g / (||g|| + c), dx/dt = sigma_d F_teacher,w, and dF/dt the central difference
    (F(x_t + h dx/dt, t + h) - F(x_t - h dx/dt, t - h)) / 2h; the gradients (student and w_phi) equal those of that
    formula with g a constant."""
    c = 0.1
    method = smooth_method(guidance_scale=w, sigma_d=sigma_d, tangent_c=c)
    g_ = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(4, 2, 3, 3, generator=g_, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.3, 0.7, 1.1, 1.45])
    cond, uncond = Cond(labels=torch.tensor([0, 1, 2, 0])), Cond(labels=torch.full((4,), 3))
    loss, _ = method.scm.loss_terms(x0, eps, t, cond, uncond, r)
    loss.backward()
    params = [*method.student.denoiser.parameters(), *method.scm.weight.parameters()]
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    def F_of(model, x_t, t_, labels):
        tb = t_.double()[:, None, None, None]
        k, s = 1 / (tb.cos() + sigma_d * tb.sin()), sigma_d * tb.sin() / (tb.cos() + sigma_d * tb.sin())
        x_s = k * x_t
        x0_hat = x_s - s * model(x_s, s.flatten() * 1000, class_labels=labels)[0]
        return (tb.cos() * x_t - x0_hat) / (sigma_d * tb.sin())

    tb = t.double()[:, None, None, None]
    x_t = tb.cos() * x0 + sigma_d * tb.sin() * eps
    teacher, student, h = method.teacher.backbone.model, method.student.denoiser.backbone.model, 2.0 ** -12
    with torch.no_grad():
        F_u, F_c = F_of(teacher, x_t, t, uncond.labels), F_of(teacher, x_t, t, cond.labels)
        v = sigma_d * (F_u + w * (F_c - F_u))
        F_minus = F_of(student, x_t, t, cond.labels)
        dF = (F_of(student, x_t + h * v, t.double() + h, cond.labels)
              - F_of(student, x_t - h * v, t.double() - h, cond.labels)) / (2 * h)
        g = -tb.cos() ** 2 * (sigma_d * F_minus - v) - r * tb.cos() * tb.sin() * (x_t + sigma_d * dF)
        g = g / (g.flatten(1).norm(dim=1)[:, None, None, None] + c)
    w_phi = method.scm.weight(t).double()
    sq = (F_of(student, x_t, t, cond.labels) - (F_minus + g)).pow(2).flatten(1).mean(1)
    expected = (w_phi.exp() * sq - w_phi).mean()
    assert abs(float(loss.detach()) - float(expected.detach())) < 1e-4 * abs(float(expected.detach()))
    expected.backward()
    for a, b in zip(got, (p.grad for p in params)):
        assert float((a.double() - b).abs().max()) <= 1e-4 * float(b.abs().max()) + 1e-12


# ------------------------------------------------------------------------------------------ methods on a teacher
def method_run(tmp_path, teacher, name="scm", preset="digits_scm", timesteps=(999,), batch_size=2, **data):
    cfg = PRESETS[name][preset]()
    cfg.model.teacher, cfg.model.student_timesteps = str(teacher), tuple(timesteps)
    cfg.data.batch_size, cfg.train.output_dir = batch_size, str(tmp_path)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    validate(cfg)
    loaded = build.load_teacher(cfg.model)
    source = build.make_source(cfg, loaded)
    return cfg, loaded, source, build.make_method(cfg, loaded, source)


@pytest.mark.parametrize("name,preset", [("scm", "digits_scm"), ("rcm", "digits_rcm")])
def test_each_turn_touches_only_its_own_parameters(name, preset, tiny_teacher_dir, tmp_path):
    _, loaded, source, method = method_run(tmp_path, tiny_teacher_dir, name, preset, (999, 499))
    base = {k: v.clone() for k, v in loaded.denoiser.backbone.model.state_dict().items()}
    params = method.trainable()
    assert sorted(params) == (["critic", "student"] if name == "rcm" else ["student"])
    assert {id(p) for p in method.scm.weight.parameters()} <= {id(p) for p in params["student"]}
    for step in (0, 1):
        for turn in params:
            mine = {id(p) for p in params[turn]}
            loop._set_turn(params, turn)
            for p in method.parameters():
                p.grad = None
            loss, logs = method(turn, source.batch(step, 0), step)
            loss.backward()
            assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in logs.values())
            assert all(p.grad is None for p in method.parameters() if id(p) not in mine)
            assert any(p.grad is not None and p.grad.abs().max() > 0 for p in params[turn])
            with torch.no_grad():
                for p in params[turn]:
                    p.add_(1e-2 * torch.randn_like(p))
    after = loaded.denoiser.backbone.model.state_dict()
    assert set(after) == set(base) and all(torch.equal(base[k], after[k]) for k in base)


def test_rcm_without_the_dmd_term_is_scm_bit_for_bit(tiny_teacher_dir, tmp_path):
    _, _, source, scm = method_run(tmp_path / "scm", tiny_teacher_dir)
    cfg, loaded, _, _ = method_run(tmp_path / "rcm", tiny_teacher_dir, "rcm", "digits_rcm")
    cfg.method.dmd_weight = 0.0
    rcm = build.make_method(cfg, loaded, source)
    for method in (scm, rcm):
        with torch.no_grad():       # the same (non-initial) w_phi in both
            method.scm.weight.linear.weight.copy_(torch.linspace(-0.3, 0.3, method.scm.weight.linear.weight.numel())
                                                  .reshape(method.scm.weight.linear.weight.shape))
    for step in (0, 7):
        losses, grads = [], []
        for method in (scm, rcm):
            for p in method.parameters():
                p.grad = None
            loss, _ = method("student", source.batch(step, 0), step)
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad for p in method.trainable()["student"]])
        assert torch.equal(*losses)
        assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("timesteps", [(999,), (999, 499)])
def test_export_is_plain_diffusers_and_equals_the_sampler(timesteps, tiny_teacher_dir, tmp_path):
    """The student (x0 then fresh noise) reloaded in plain diffusers gives the images of fewstep's sampler."""
    cfg, loaded, _, method = method_run(tmp_path, tiny_teacher_dir, timesteps=timesteps)
    with torch.no_grad():
        for p in method.student.denoiser.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    out = export.export_student(cfg, loaded, method.student, None)
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 3, 7]
    img = pipe(labels, generator=torch.Generator().manual_seed(5), output_type="pt").images
    g = torch.Generator().manual_seed(5)
    x = method.student.sample(torch.randn((3, 1, 8, 8), generator=g), Cond(labels=torch.tensor(labels)), g)
    torch.testing.assert_close(img, ((x.clamp(-1, 1) + 1) / 2).float(), atol=1e-5, rtol=0)
    assert FewStepGenerator.from_pretrained(out).sampling().timesteps == timesteps


def test_the_entry_point_trains_and_exports(tiny_teacher_dir, tmp_path):
    """train/scm.py's body, 2-step student, two steps: the export samples as the run folder's student."""
    from accelerate.state import AcceleratorState

    out = tmp_path / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    cli.main("scm", argv=["--preset", "digits_scm_2step", "--model.teacher", str(tiny_teacher_dir),
                          "--train.output_dir", str(out), "--train.evaluate", "false", "--data.batch_size", "2",
                          "--train.max_steps", "2", "--train.sample_every", "2"])
    assert_class_export_equals_sampler(out)


# ------------------------------------------------------------------------------------------ tiny text-to-image
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return captioned_images(tmp_path_factory.mktemp("scm_t2i"), PROMPTS[:3])


@pytest.mark.parametrize("method", ["scm", "rcm"])
@pytest.mark.parametrize("family,timesteps", [("sd15", (999, 499)), ("sd3", (1000, 500)), ("flux", (1000, 500))])
def test_two_steps_and_export_on_tiny_pipelines(method, family, timesteps, work, teachers):
    """Two training steps on captioned images (rCM: both turns), the export in the family's stock pipeline (the
    stock pipeline's equality to the sampler on this export route is tests/test_t2i.py's)."""
    from test_t2i import SIZE, generate, load_stock, train

    out = train(method, teachers(family), work / "runs" / method / family, "--data.source", "images",
                "--data.images", str(work / "images"), "--model.student_timesteps", ",".join(map(str, timesteps)))
    pipe = load_stock(family, out)
    x = generate(pipe, family, PROMPTS[:2], len(timesteps))
    assert tuple(x.shape) == (2, 3, SIZE, SIZE) and torch.isfinite(x).all()
    assert FewStepGenerator.from_pretrained(out).sampling().timesteps == timesteps


# ------------------------------------------------------------------------------------------ config checks
BAD = [(["--method.sigma_d", "0"], "method.sigma_d 0.0 must be > 0"),
       (["--method.p_std", "0"], "method.p_std 0.0 must be > 0"),
       (["--method.tangent_c", "-1"], "method.tangent_c -1.0 must be > 0"),
       (["--method.tangent_warmup", "-5"], "method.tangent_warmup -5 must be >= 0"),
       (["--method.guidance_scale", "-1"], "method.guidance_scale -1.0 must be >= 0"),
       (["--model.mode", "lora"], "set model.mode full"),
       (["--model.gan_head", "true"], "sCM has no discriminator")]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_impossible_configs_are_one_line_errors(args, needle):
    cfg, _ = C.parse(args, PRESETS["scm"], "digits_scm")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_rcm_refuses_a_negative_dmd_weight():
    cfg, _ = C.parse(["--method.dmd_weight", "-0.1"], PRESETS["rcm"], "digits_rcm")
    with pytest.raises(ConfigError, match="method.dmd_weight -0.1 must be >= 0"):
        validate(cfg)


def test_presets():
    assert cli.default_preset("scm") == "digits_scm" and cli.default_preset("rcm") == "digits_rcm"
    one, two, r = PRESETS["scm"]["digits_scm"](), PRESETS["scm"]["digits_scm_2step"](), PRESETS["rcm"]["digits_rcm"]()
    assert one.model.student_timesteps == (999,) and two.model.student_timesteps == (999, 499)
    m = one.method
    assert (m.sigma_d, m.p_mean, m.p_std, m.tangent_c) == (0.5, -1.0, 1.4, 0.1)
    assert list(one.optim) == ["student"] and sorted(r.optim) == ["critic", "student"]
    assert (r.method.dmd_weight, r.method.student_every, r.method.gan_weight_student) == (0.01, 5, 0.0)
