"""TwinFlow (Cheng et al., arXiv 2512.05150): the loss against an explicit computation of the paper's (and its code's)
formulas on fixed tensors, the groups and times, turn isolation in full and LoRA mode (the frozen base bit-identical),
convergence to the exact flow map of a Gaussian toy teacher, the exports reloaded in plain diffusers against fewstep's
sampler, and two training steps with export on the tiny SD1.5, SD3 and Flux pipelines.

The loss runs on test_meanflow's smooth float64 two-time net on a rectified-flow process, whose velocity is its raw
output at timestep 1000 t: the reference below calls that net directly (with the two-time offset and the fake-time
embedding set by hand) and spells out groups, enhanced target, RCGM, weighting, Barron loss and rectification.
"""
from __future__ import annotations

import copy
import itertools
import math
from contextlib import nullcontext

import pytest
import torch
from diffusers.models.embeddings import TimestepEmbedding
from test_meanflow import SmoothFlowNet, assert_flow_map_export_equals_sampler
from tiny_models import captioned_images

from fewstep.backbones import register_adapter
from fewstep.core.adapter import adapter_for
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.schedules import RectifiedFlow
from fewstep.core.timesteps import from_timesteps
from fewstep.core.two_time import PREFIX, embedding_of, offset
from fewstep.errors import ConfigError
from fewstep.methods.twinflow import TwinFlow, TwinFlowConfig, draw_times, ema_ramp, group_sizes
from fewstep.run import build, cli
from fewstep.run import config as C
from fewstep.run.presets import PRESETS
from fewstep.run.validate import validate
from fewstep.testing.toy import NUM_FREQS, ToyGMMModel, toy_denoiser, toy_source
from fewstep.testing.toy_adapter import ToyAdapter
from fewstep.training import loop

PROMPTS = ["a red cat", "two dogs on grass", "a blue house", "an old car"]


# ------------------------------------------------------------------------------------------ the loss
def smooth_method(ema_decay: float, gamma: float) -> TwinFlow:
    torch.manual_seed(0)
    model = SmoothFlowNet().double().eval().requires_grad_(False)
    teacher = Denoiser(adapter_for(model, "flow_prediction"), RectifiedFlow())
    student = Denoiser(adapter_for(copy.deepcopy(model).requires_grad_(True), "flow_prediction"), RectifiedFlow())
    method = TwinFlow(TwinFlowConfig(guidance_gamma=gamma, ema_decay=ema_decay), teacher, FewStepGenerator(student, [1.0]))
    with torch.no_grad():       # some way into training: r and the sign matter, student, EMA and teacher differ
        embedding_of(student.backbone.model).linear_2.weight.normal_(0, 0.05)
        method.fake.linear_2.weight.normal_(0, 0.05)
        student.backbone.model.out.weight.add_(0.1)
        if method.ema is not None:
            method.ema.backbone.model.out.weight.add_(-0.05)
    return method


def net(method: TwinFlow, d: Denoiser, z, t, labels, r=None, fake=None):
    """The network's velocity F(z, t, r) (rectified flow: its raw output at 1000 t); ``fake``: on the negative half."""
    method.fake.delta = None if fake is None else torch.where(fake, -t, t).float()
    with offset(d.backbone, t, r, len(z)) if r is not None else nullcontext():
        out = d.backbone.model(z, 1000 * t, class_labels=labels)[0]
    method.fake.delta = None
    return out


def barron(pred, target, c=1e-3):
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    return mse * (mse.detach() / c ** 2 + 1) ** -0.5 / c       # alpha = 1


@pytest.mark.parametrize("ema_decay,gamma", [(0.99, 0.5), (1.0, 2.0)])
def test_loss_equals_the_papers_formulas_on_fixed_tensors(ema_decay, gamma):
    """Groups e2e / mul / any / adv of two samples each; enhanced target v + gamma (v_c - v_u) of the EMA (ema_decay 1:
    the frozen teacher's v_u + gamma (v_c - v_u)) on non-adv samples with 0 < t < 1; RCGM's order-2 target by the EMA
    (ema_decay 1: the online student), residual ((t - r) F - D) / 0.01 - v (F - v where t - r < 0.01) clipped to 1;
    weights tan((1 - (t - r)) pi / 2.5) + 1 (1 on adv); Barron alpha 1, c 1e-3; 0.5 x the rectification."""
    method = smooth_method(ema_decay, gamma)
    student, delta = method.student.denoiser, 0.01
    g = torch.Generator().manual_seed(1)
    x, e, e_fake, e_rect = (torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([1.0, 1.0, 0.75, 0.5, 0.8125, 0.375, 0.625, 0.25], dtype=torch.float64)
    r = torch.tensor([0.0, 0.0, 0.74609375, 0.484375, 0.25, 0.0, 0.0, 0.0], dtype=torch.float64)
    t_rect = torch.tensor([0.5, 0.3125, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    labels, null = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.full((8,), 3)
    loss, logs = method.loss_terms(x.float(), e.float(), t.float(), r.float(), [2, 2, 2, 2], e_fake.float(),
                                   t_rect.float(), e_rect.float(), Cond(labels=labels), Cond(labels=null))

    x, e, e_fake, e_rect = (v.float().double() for v in (x, e, e_fake, e_rect))      # what the method was given
    adv = torch.arange(8) >= 6
    r = torch.where(adv, t, r)
    with torch.no_grad():
        x[adv] = e_fake[adv] - net(method, student, e_fake[adv], torch.ones(2), labels[adv], torch.zeros(2))
    z, v = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * e, e - x
    F = net(method, student, z, t, labels, r, adv)
    with torch.no_grad():
        target = v.clone()
        guide = method.teacher if ema_decay == 1 else method.ema
        v_c, v_u = net(method, guide, z, t, labels), net(method, guide, z, t, null)
        for i in range(2, 6):       # non-adv with 0 < t < 1: not the e2e group at t = 1
            target[i] = (v_u[i] if ema_decay == 1 else v[i]) + gamma * (v_c[i] - v_u[i])
        rcgm = student if ema_decay == 1 else method.ema
        for i in range(6):
            ti, ri, y = t[i:i + 1], r[i:i + 1], labels[i:i + 1]
            t_m = max(float(ti) - delta, float(ri))
            start = z[i:i + 1] - delta * target[i:i + 1]
            times = [t_m + (float(ri) - t_m) * k / 2 for k in range(3)]
            x_n = start
            for a, b in itertools.pairwise(times):
                x_n = x_n - (a - b) * net(method, rcgm, x_n, torch.tensor([a]).double(), y, torch.tensor([b]).double())
            if float(ti - ri) >= delta:
                R = ((ti - ri) * F[i] - (start - x_n)[0]) / delta - target[i]
            else:
                R = F[i] - target[i]
            target[i] = F[i] - R.clamp(-1, 1)
    w = torch.where(adv, 1.0, torch.tan((1 - (t - r)) * math.pi / 2.5) + 1)
    base = (w * barron(F, target)).mean()
    with torch.no_grad():
        x_f = z[:2] - t[:2, None, None, None] * F[:2]
        s = t_rect[:2]
        z_f = (1 - s)[:, None, None, None] * x_f + s[:, None, None, None] * e_rect[:2]
        dv = (net(method, student, z_f, s, labels[:2], fake=torch.ones(2, dtype=torch.bool))
              - net(method, student, z_f, s, labels[:2], fake=torch.zeros(2, dtype=torch.bool))).clamp(-1, 1)
    expected = base + 0.5 * barron(F[:2], F[:2].detach() - dv).mean()
    loss_, expected = float(loss.detach()), float(expected.detach())
    assert abs(loss_ - expected) < 1e-6 * expected, (loss_, expected)
    assert float(logs["twinflow/delta_v"]) > 0
    loss.backward()             # gradients reach the two-time and the fake-time embeddings
    assert embedding_of(student.backbone.model).linear_2.weight.grad.abs().max() > 0
    assert method.fake.linear_2.weight.grad.abs().max() > 0


def test_groups_times_and_the_ema_ramp():
    cfg = TwinFlowConfig()
    assert group_sizes(32, cfg) == [8, 8, 8, 8] and group_sizes(6, cfg) == [2, 2, 2, 0]   # the code's rounding
    u_t, u_r = torch.rand(2, 4000, generator=torch.Generator().manual_seed(0))
    t, r = draw_times(u_t, u_r, [1000] * 4, cfg)
    e2e, mul, any_, adv = (slice(1000 * i, 1000 * (i + 1)) for i in range(4))
    assert (t[e2e] == 1).all() and (r[e2e] == 0).all()
    assert (r[mul] <= t[mul]).all() and (r[mul] >= 0.95 * t[mul]).all() and (t[mul] - r[mul]).max() > 0.04
    assert (r[any_] <= t[any_]).all() and abs(float((r[any_] / t[any_]).mean()) - 0.5) < 0.03
    assert torch.equal(t[adv], u_t[adv]) and abs(float(t[adv].mean()) - 0.5) < 0.03        # t ~ U(0, 1)
    ramp = []
    assert ema_ramp(0, 0.99, ramp) == 0 and ema_ramp(1, 0.99, ramp) == pytest.approx(0.495)
    assert ema_ramp(2, 0.99, ramp) == pytest.approx(0.495 + 0.505 * 0.495 / 2) and 0.98 < ema_ramp(2000, 0.99, ramp) < 0.99


# ------------------------------------------------------------------------------------------ the method on a teacher
def twinflow_run(tmp_path, teacher, timesteps=(999,), mode="full", **method):
    cfg = PRESETS["twinflow"]["digits_twinflow"]()
    cfg.model.teacher, cfg.model.student_timesteps, cfg.model.mode = str(teacher), tuple(timesteps), mode
    cfg.data.batch_size, cfg.train.output_dir = 4, str(tmp_path)
    for k, v in method.items():
        setattr(cfg.method, k, v)
    validate(cfg)
    loaded = build.load_teacher(cfg.model)
    source = build.make_source(cfg, loaded)
    return cfg, loaded, source, build.make_method(cfg, loaded, source)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_student_turn_touches_only_its_parameters(mode, tiny_teacher_dir, tmp_path):
    """Gradients reach the student (lora: its adapter), the two-time and the fake-time embeddings and nothing else;
    the EMA target moves by the code's ramp after a step; the frozen base is bit-identical afterwards."""
    ema_decay = 0.99 if mode == "full" else 1.0
    _, loaded, source, method = twinflow_run(tmp_path, tiny_teacher_dir, (999, 499), mode, ema_decay=ema_decay,
                                             guidance_gamma=0.5)
    frozen = lambda k: mode == "full" or not (".lora_" in k or k.startswith(PREFIX))
    base = {k: v.clone() for k, v in loaded.denoiser.backbone.model.state_dict().items() if frozen(k)}
    params = method.trainable()
    mine = {id(p) for p in params["student"]}
    model = method.student.denoiser.backbone.model
    assert [t.name for t in method.turns] == ["student"] and list(params) == ["student"]
    assert {id(p) for p in [*embedding_of(model).parameters(), *method.fake.parameters()]} <= mine
    assert (method.ema is not None) == (mode == "full")
    for step in (0, 1):
        loop._set_turn(params, "student")
        for p in method.parameters():
            p.grad = None
        loss, logs = method("student", source.batch(step, 0), step)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in logs.values())
        assert all(p.grad is None for p in method.parameters() if id(p) not in mine)
        assert embedding_of(model).linear_2.weight.grad.abs().max() > 0 and method.fake.linear_2.weight.grad.abs().max() > 0
        with torch.no_grad():
            for p in params["student"]:
                p.add_(1e-2 * torch.randn_like(p))
        if method.ema is not None:
            before = [p.clone() for p in method.ema.parameters()]
            method.after_step(step)
            c = ema_ramp(step + 1, 0.99, [])
            for b, p_ema, p in zip(before, method.ema.parameters(), method.student.denoiser.parameters()):
                torch.testing.assert_close(p_ema, c * b + (1 - c) * p.detach(), atol=1e-6, rtol=0)
    after = loaded.denoiser.backbone.model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)


# ------------------------------------------------------------------------------------------ exact toy teacher
class TwoTimeToy(ToyGMMModel):
    """The exact toy teacher with a diffusers ``TimestepEmbedding`` in its residual (the two-time hooks' target) and
    the residual added in v-prediction: an x0-space residual reaches the flow velocity with gain ~1/t at small t,
    which a few-hundred-step test at lr 3e-3 cannot train stably."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.time_embedding = TimestepEmbedding(1 + 2 * NUM_FREQS, self.config.hidden)

    def residual(self, x_t, timestep):
        s = torch.as_tensor(timestep, dtype=x_t.dtype, device=x_t.device).expand(len(x_t)) / self.schedule.N
        k = torch.arange(1, NUM_FREQS + 1, device=x_t.device, dtype=x_t.dtype)
        feats = torch.cat([s[:, None], torch.sin(math.pi * s[:, None] * k), torch.cos(math.pi * s[:, None] * k)], 1)
        h = self.inp(torch.cat([x_t, feats[:, :, None, None].expand(-1, -1, *x_t.shape[2:])], 1))
        return self.out(self.mid(h + self.time_embedding(feats)[:, :, None, None]))

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        alpha, sigma = self.alpha_sigma(timestep, sample)
        v = (alpha * sample - self.posterior_mean(sample, alpha, sigma)) / sigma + self.residual(sample, timestep)
        return (v,)


class TwoTimeToyAdapter(ToyAdapter):
    time_embedding = "time_embedding"


register_adapter("TwoTimeToy", TwoTimeToyAdapter)


def test_learns_the_exact_flow_map_of_a_gaussian_teacher():
    """Data N(0.5, 0.5^2) on the path z_t = (1 - t) x + t e: the exact flow map is z_r = (1 - r) mu + (s_r / s_t)
    (z_t - (1 - t) mu), s_t^2 = (1 - t)^2 0.5^2 + t^2. The student starts as the exact teacher (its one-step output
    the constant mu, its jumps Euler steps); 150 steps of the whole method (four groups, EMA, RCGM order 2,
    rectification at weight 0.1: at the paper's 0.5 the coherent push on a collapsed output held it collapsed for
    hundreds of steps) bring the one-step map and two long jumps within a fifth of their starting error (measured
    0.24 -> 0.011, 0.13 -> 0.005, 0.14 -> 0.011)."""
    torch.manual_seed(0)
    model = TwoTimeToy(means=((0.5,),), weights=(1.0,), std=0.5, hidden=32)
    student = Denoiser(adapter_for(copy.deepcopy(model).requires_grad_(True), "v_prediction"), model.schedule)
    method = TwinFlow(TwinFlowConfig(guidance_gamma=0.0, rect_weight=0.1), toy_denoiser(model).requires_grad_(False),
                      FewStepGenerator(student, from_timesteps([999], model.schedule)))
    mu, sd, hi = 0.5, 0.5, method.ft.hi
    z = torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cond = Cond(labels=torch.zeros(2000, dtype=torch.long))

    def exact(z_t, t, r):
        s_t, s_r = (((1 - u) ** 2 * sd ** 2 + u ** 2) ** 0.5 for u in (t, r))
        return (1 - r) * mu + s_r / s_t * (z_t - (1 - t) * mu)

    def errors():
        with torch.no_grad():
            z_hi = z / float(method.ft.scale(torch.tensor(hi)))       # the sampler's state at t = hi
            out = [float(((method.student.sample(z.float(), cond).double() - exact(z_hi, hi, 0)) ** 2).mean())]
            for t, r in ((0.9, 0.1), (0.6, 0.0)):
                z_t = exact(z, 1.0, t)
                u = method.velocity(student, z_t, torch.full((2000,), t), cond, torch.full((2000,), r))
                out.append(float(((z_t - (t - r) * u - exact(z_t, t, r)) ** 2).mean()))
        return out

    start = errors()
    source, params = toy_source(model, 64), method.trainable()["student"]
    opt = torch.optim.Adam(params, lr=3e-3)
    for step in range(150):
        loss, _ = method("student", source.batch(step, 0), step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        method.after_step(step)
    end = errors()
    assert min(start) > 0.1 and all(b < 0.2 * a for a, b in zip(start, end)), (start, end)


# ------------------------------------------------------------------------------------------ export
def test_the_entry_point_trains_and_exports(tiny_teacher_dir, tmp_path):
    """train/twinflow.py's body, 2-step student, two steps: the flow-map export (the default) reloaded in plain
    diffusers samples as fewstep's sampler at 1, 2 and 3 steps, for a full and a LoRA student (EMA 1: the frozen
    base; exported merged). The folded export's equality is test_meanflow's (same student class), its LoRA merge
    below."""
    from accelerate.state import AcceleratorState

    argv = ["--preset", "digits_twinflow_2step", "--model.teacher", str(tiny_teacher_dir), "--train.evaluate",
            "false", "--data.batch_size", "4", "--train.max_steps", "2", "--train.sample_every", "2"]
    runs = {"full": [], "lora": ["--model.mode", "lora", "--model.lora_rank", "4", "--method.ema_decay", "1"]}
    for name, extra in runs.items():
        AcceleratorState._reset_state(reset_partial_state=True)
        out = cli.main("twinflow", argv=[*argv, *extra, "--train.output_dir", str(tmp_path / name)])
        assert list(out.glob("**/*.png"))       # the training-time sample grid
        assert_flow_map_export_equals_sampler(out)


def test_a_lora_students_merged_export_samples_as_the_lora_student(tiny_teacher_dir, tmp_path):
    """The merged copy a LoRA student exports from runs as base + adapter + two-time embedding: its folded plain
    experts sample what the LoRA student samples (float32, 1e-5)."""
    _, _, source, method = twinflow_run(tmp_path, tiny_teacher_dir, (999, 499), "lora", ema_decay=1.0,
                                        export="folded")
    d = method.student.denoiser
    with torch.no_grad():
        for p in [*d.trainable_parameters(), *embedding_of(d.backbone.model).parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    batch = source.batch(0, 0)
    mine = method.student.sample(batch.noise, batch.cond)
    plain = method.student.plain()
    state, base = plain.experts[0].backbone.model.state_dict(), d.backbone.model.state_dict()
    assert not any("lora" in k or k.startswith(PREFIX) for k in state)
    q = next(k for k in state if k.endswith("to_q.weight"))
    assert not torch.equal(state[q], base[q.replace("to_q.weight", "to_q.base_layer.weight")])     # merged
    torch.testing.assert_close(plain.sample(batch.noise, batch.cond), mine, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ tiny text-to-image
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return captioned_images(tmp_path_factory.mktemp("twinflow_t2i"), PROMPTS[:3])


@pytest.mark.parametrize("family,timesteps", [("sd15", (999, 499)), ("sd3", (1000, 500)), ("flux", (1000,))])
def test_two_steps_and_export_on_tiny_pipelines(family, timesteps, work, teachers):
    """Two training steps on captioned images with training-time CFG (gamma 0.5, the text's null prompt), the flow-map
    export in the family's stock pipeline at 1 to 3 steps."""
    from test_t2i import SIZE, generate, load_stock, train

    out = train("twinflow", teachers(family), work / "runs" / family, "--data.source", "images", "--data.images",
                str(work / "images"), "--model.student_timesteps", ",".join(map(str, timesteps)), "--data.batch_size",
                "4", "--method.guidance_gamma", "0.5")
    pipe = load_stock(family, out)
    for steps in (1, 2, 3):
        x = generate(pipe, family, PROMPTS[:2], steps)
        assert tuple(x.shape) == (2, 3, SIZE, SIZE) and torch.isfinite(x).all()
    assert FewStepGenerator.from_pretrained(out).sampling().timesteps == timesteps


# ------------------------------------------------------------------------------------------ config checks
BAD = [(["--method.guidance_gamma", "-1"], "method.guidance_gamma -1.0 must be >= 0"),
       (["--method.guidance_t_min", "0.8", "--method.guidance_t_max", "0.5"], "need 0 <= guidance_t_min < guidance"),
       (["--method.ema_decay", "1.5"], "method.ema_decay 1.5 must be in [0, 1]"),
       (["--method.estimate_order", "0"], "method.estimate_order 0 must be at least 1"),
       (["--method.frac_adv", "-1"], "the group fractions must be >= 0"),
       (["--data.batch_size", "2"], "raise data.batch_size (4 for four groups)"),
       (["--method.mul_gap", "0"], "method.mul_gap 0.0 must be in (0, 1]"),
       (["--method.rcgm_delta", "1"], "method.rcgm_delta 1.0 must be in (0, 1)"),
       (["--method.clip", "0"], "method.clip 0.0 must be > 0"),
       (["--method.rect_weight", "-1"], "method.rect_weight -1.0 must be >= 0"),
       (["--method.barron_c", "0"], "method.barron_c 0.0 must be > 0"),
       (["--model.mode", "lora"], "set method.ema_decay 1 (the frozen base"),
       (["--model.gan_head", "true"], "TwinFlow has no discriminator"),
       (["--method.export", "fused"], "method.export 'fused' is not known; use flow_map or folded"),
       (["--method.export", "folded", "--model.student_timesteps", "999,799,599,399,199"], "use 1 to 4 steps")]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_impossible_configs_are_one_line_errors(args, needle):
    cfg, _ = C.parse(args, PRESETS["twinflow"], "digits_twinflow")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_list_that_does_not_start_at_the_noise_is_refused(tiny_teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match="start the list at 999"):
        twinflow_run(tmp_path, tiny_teacher_dir, (749,))


def test_presets():
    p = PRESETS["twinflow"]
    assert cli.default_preset("twinflow") == "digits_twinflow"
    one, two, sd35, lora = (p[k]() for k in ("digits_twinflow", "digits_twinflow_2step", "sd35_twinflow",
                                             "sd35_twinflow_lora"))
    assert one.model.student_timesteps == (999,) and two.model.student_timesteps == (999, 499)
    m = sd35.method
    assert (m.guidance_gamma, m.ema_decay, m.estimate_order, m.rect_weight, m.barron_alpha, m.barron_c) == (
        0.8, 0.99, 2, 0.5, 1.0, 1e-3)
    assert (sd35.optim["student"].lr, sd35.optim["student"].beta2, sd35.data.batch_size, sd35.train.max_grad_norm) == (
        1e-5, 0.99, 16, 1.0)
    assert (lora.model.mode, lora.model.lora_rank, lora.method.ema_decay, lora.method.guidance_gamma,
            lora.method.estimate_order, lora.optim["student"].lr) == ("lora", 64, 1.0, 4.0, 1, 1e-4)
    for cfg in (one, two, sd35, lora):
        validate(cfg)
        assert list(cfg.optim) == ["student"] and not cfg.model.gan_head
