"""SFD (Score Forgetting Distillation): SiD bit for bit without forgetting, the forget term against its closed form
(teacher at the override condition, critic at the forget condition) with the configured weights, the per-sample
forget draw, turn hygiene, the forget warm-up, one-line config errors, prompt pairs encoded by the batch source,
two training steps + export on the tiny SD1.5 and SD3 families, and convergence of the forgotten class onto the
override component of an exact class-conditional Gaussian teacher."""
from __future__ import annotations

import copy
import json

import diffusers
import pytest
import tiny_models
import torch
from diffusers.configuration_utils import register_to_config
from test_sid_fdistill import SCHED, unet_parts, unet_source
from torch import nn

from fewstep.backbones import adapter_for, register_adapter
from fewstep.core import timesteps
from fewstep.core.conditioning import Batch, Cond, sample_seed
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.parameterization import from_x0
from fewstep.core.schedules import from_diffusers
from fewstep.core.timesteps import from_timesteps
from fewstep.digits.data import NUM_CLASSES
from fewstep.errors import ConfigError
from fewstep.methods.sfd import DIGIT_CLASSES, SFD, WARMUP_T, SFDConfig
from fewstep.methods.sid import SiD, SiDConfig, sid_timesteps
from fewstep.run import build, cli
from fewstep.run import config as C
from fewstep.run.config import OptimConfig, RunConfig, TrainConfig
from fewstep.run.presets import PRESETS
from fewstep.run.validate import validate
from fewstep.testing.toy import ToyGMMModel
from fewstep.testing.toy_adapter import ToyAdapter
from fewstep.training import loop
from fewstep.training.data import ClassLabelSource

NULL = 10


def make(cls, cfg, K: int = 1, gan: bool = False):
    """``cls`` (SiD or SFD) on the tiny random class UNets of test_sid_fdistill (teacher, student, critic)."""
    teacher, _, critic, head = unet_parts(gan=gan)
    ts = from_timesteps(sid_timesteps(SCHED, 2.5, K), SCHED)
    model = copy.deepcopy(teacher.backbone.model).requires_grad_(True)
    student = FewStepGenerator(Denoiser(adapter_for(model, "v_prediction"), SCHED), ts, float(SCHED.sigma(ts[0])))
    return cls(cfg, teacher, student, critic, head)


def grads(method, turn: str, batch: Batch, step: int):
    loop._set_turn(method.trainable(), turn)
    for p in method.parameters():
        p.grad = None
    loss, logs = method(turn, batch, step)
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else None for p in method.trainable()[turn]], logs


def labelled(labels: list[int], step: int = 0, turn: int = 0) -> Batch:
    """A batch of 8x8 noise with the given labels (per-sample seeds as a source would give them)."""
    seeds = torch.tensor([sample_seed(0, step, turn, i) for i in range(len(labels))])
    g = torch.Generator().manual_seed(step)
    lab = torch.tensor(labels)
    return Batch(noise=torch.randn(len(labels), 1, 8, 8, generator=g), cond=Cond(labels=lab),
                 uncond=Cond(labels=torch.full_like(lab, NULL)), seeds=seeds)


# --------------------------------------------------------------------------------------------- reduction to SiD
def six_classes(batch_size: int = 4) -> ClassLabelSource:
    """Labels 0..5 only: a forget class 6 never appears."""
    return ClassLabelSource(torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 6, 6, NULL, batch_size, seed=0)


@pytest.mark.parametrize("K,kw,pairs,src", [
    (1, {"kappa_4": 2.0}, {}, unet_source),
    (2, {"kappa_1": 1.5, "kappa_2": 1.5, "kappa_3": 2.0, "kappa_4": 1.5}, {}, unet_source),
    (1, {"kappa_4": 2.0, "gan_weight_student": 1e-3}, {}, unet_source),
    (1, {"kappa_4": 2.0}, {"forget_classes": (6,), "override_classes": (0,), "forget_fraction": 0.0}, six_classes),
], ids=["sid", "few_step_lsg", "sida", "pair_never_drawn"])
def test_sfd_without_forget_samples_is_sid_bit_for_bit(K, kw, pairs, src):
    """No pairs (or a pair whose class never appears and no redraws): the same losses and gradients as SiD."""
    gan = "gan_weight_student" in kw
    sid = make(SiD, SiDConfig(**kw), K, gan)
    sfd = make(SFD, SFDConfig(**kw, **pairs), K, gan)
    source = src()
    for step in (0, 3):
        for ti, turn in enumerate(("critic", "student")):
            batch = source.batch(step, ti)
            loss_a, g_a, _ = grads(sid, turn, batch, step)
            loss_b, g_b, _ = grads(sfd, turn, batch, step)
            assert torch.equal(loss_a, loss_b), turn
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g_a, g_b)), turn
    assert (type(sfd.teacher) is Denoiser) == (not pairs)      # the override view wraps the teacher only with pairs


def test_an_empty_part_runs_weighted_zero_when_several_processes_step(monkeypatch):
    """With several processes every rank must make the same backbone calls (FSDP gathers parameters per call): an
    empty part then runs on one sample weighted 0, and losses and gradients stay SiD's bit for bit. The process
    count is the one thing set here (a 2-process group is not started in-process)."""
    import fewstep.methods.sfd as sfd_module

    monkeypatch.setattr(sfd_module, "_ranks_in_step", lambda: True)
    sid = make(SiD, SiDConfig(kappa_4=2.0))
    sfd = make(SFD, SFDConfig(kappa_4=2.0, forget_classes=(6,), override_classes=(0,), forget_fraction=0.0))
    calls = []
    sfd.teacher.register_forward_pre_hook(lambda mod, args: calls.append(len(args[0])))
    source = six_classes()
    for ti, turn in enumerate(("critic", "student")):
        batch = source.batch(1, ti)
        loss_a, g_a, _ = grads(sid, turn, batch, 1)
        loss_b, g_b, logs = grads(sfd, turn, batch, 1)
        assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(g_a, g_b)), turn
        assert "loss/student/forget" not in logs
    assert calls == [2 * 4, 2 * 1]          # the student turn's teacher: the remain part, then one padded sample


# --------------------------------------------------------------------------------------------- closed forms
WEIGHTS = {"student_remain_weight": 0.7, "student_forget_weight": 0.3, "critic_remain_weight": 0.9,
           "critic_forget_weight": 0.2}


def sfd_pair(**kw) -> SFD:
    return make(SFD, SFDConfig(alpha=1.2, kappa_4=2.0, forget_classes=(6,), override_classes=(0,),
                               forget_fraction=0.0, **WEIGHTS, **kw))


def student_reference(m: SFD, batch: Batch, teacher_labels, weights):
    """The SiD generator loss written out: teacher (CFG 2) at ``teacher_labels``, critic at the batch's labels."""
    x_g = m.student(batch.noise, batch.cond, 0)[0]
    x_t, t = timesteps.noised(SCHED, x_g, batch, 1, m.cfg.t_min, m.cfg.t_max)     # SiD's draw of t and eps
    teacher = m.teacher.inner
    y_u = teacher(x_t, t, batch.uncond)
    y_real = y_u + 2.0 * (teacher(x_t, t, Cond(labels=torch.tensor(teacher_labels))) - y_u)
    y_fake = m.critic(x_t, t, batch.cond)
    x, d = x_g.float(), y_real - y_fake
    w = (x - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).detach()
    per_sample = (d * ((y_real - x) - 1.2 * d) / w).flatten(1).sum(1)
    return (torch.tensor(weights) * per_sample).mean()


def close_grads(got, want):
    """Equal up to float order (sub-batches sum in another order): tolerance on the whole gradient's scale."""
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_forget_samples_match_the_teacher_at_the_override_class():
    m = sfd_pair()
    labels = [6, 2, 6, 5]
    batch = labelled(labels, step=2, turn=1)
    loss, g, logs = grads(m, "student", batch, 2)
    params = m.trainable()["student"]
    ref = student_reference(m, batch, [0, 2, 0, 5], [0.3, 0.7, 0.3, 0.7])
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-7)
    close_grads(g, torch.autograd.grad(ref, params))
    assert float(logs["sfd/forget_share"]) == 0.5
    # the closed form separates: the teacher at the forget class, or equal weights, give other losses
    assert not torch.allclose(ref, student_reference(m, batch, labels, [0.3, 0.7, 0.3, 0.7]), rtol=1e-3)
    assert not torch.allclose(ref, student_reference(m, batch, [0, 2, 0, 5], [1.0] * 4), rtol=1e-3)


def test_remain_samples_are_sid_untouched():
    """Remain samples of a mixed batch contribute exactly what SiD gives them (here: their weighted SiD loss)."""
    m = sfd_pair()
    sid = make(SiD, SiDConfig(alpha=1.2, kappa_4=2.0))
    batch = labelled([6, 2, 6, 5], step=2, turn=1)
    keep = torch.tensor([1, 3])
    remain = Batch(noise=batch.noise[keep], cond=batch.cond[keep], uncond=batch.uncond[keep],
                   seeds=batch.seeds[keep])
    _, _, logs = grads(m, "student", batch, 2)
    loss_sid, _, _ = grads(sid, "student", remain, 2)
    torch.testing.assert_close(logs["loss/student/remain"], loss_sid, rtol=1e-6, atol=0)


def test_critic_trains_on_forget_samples_at_the_forget_class():
    m = sfd_pair()
    labels = [6, 2, 6, 5]
    batch = labelled(labels, step=1, turn=0)
    loss, g, _ = grads(m, "critic", batch, 1)

    def reference(critic_labels):
        with torch.no_grad():
            x_g = m.student(batch.noise, batch.cond, 0)[0]
        x_t, t = timesteps.noised(SCHED, x_g, batch, 3, m.cfg.critic_t_min, m.cfg.critic_t_max)
        pred = m.critic(x_t, t, Cond(labels=torch.tensor(critic_labels)), "v_prediction")
        err = ((pred - from_x0(x_g, x_t, t, "v_prediction", SCHED)) ** 2).flatten(1).mean(1)
        return (torch.tensor([0.2, 0.9, 0.2, 0.9]) * err).mean()

    ref = reference(labels)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-8)
    close_grads(g, torch.autograd.grad(ref, m.trainable()["critic"]))
    assert not torch.allclose(ref, reference([0, 2, 0, 5]), rtol=1e-3)      # not at the override class


# --------------------------------------------------------------------------------------------- who forgets
def test_forget_draw_is_per_sample_and_keeps_the_forget_class_out_of_remain():
    m = make(SFD, SFDConfig(forget_classes=(6, 3), override_classes=(0, 8), forget_fraction=0.4))
    whole = ClassLabelSource(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 10, NULL, 2000).batch(5, 1)
    batch, idx = m.forget_batch(whole)
    drawn = whole.cond.labels
    assert (idx[drawn == 6] == 0).all() and (idx[drawn == 3] == 1).all()     # the data's own forget classes
    lab = batch.cond.labels
    assert set(lab[idx == 0].tolist()) == {6} and set(lab[idx == 1].tolist()) == {3}
    assert not ((idx < 0) & ((lab == 6) | (lab == 3))).any()                 # remain never carries a forget class
    share = float((idx >= 0).float().mean())
    assert abs(share - (0.4 + 0.6 * 0.2)) < 0.04, share                       # redrawn + drawn by the data
    assert abs(float((idx == 0).float().mean()) - float((idx == 1).float().mean())) < 0.05
    # the draw follows the per-sample seeds: micro-batches and processes split it the same way
    small = ClassLabelSource(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 10, NULL, 2)
    eight = ClassLabelSource(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), 10, NULL, 8)
    parts = [m.forget_batch(small.batch(5, 1, micro=mi, rank=r, world=2))[1] for mi in range(2) for r in range(2)]
    assert torch.equal(torch.cat(parts), m.forget_batch(eight.batch(5, 1))[1])


@pytest.mark.parametrize("K,warmup", [(1, 0), (2, 3)])
def test_turns_touch_only_their_parameters(K, warmup):
    m = make(SFD, SFDConfig(kappa_4=2.0, forget_classes=(6,), override_classes=(0,), forget_warmup=warmup), K)
    before = copy.deepcopy(m.teacher.state_dict())
    ids = {turn: {id(p) for p in ps} for turn, ps in m.trainable().items()}
    src = unet_source(6)
    for step in (0, 1):
        for ti, turn in enumerate(m.turns):
            loss, _, logs = grads(m, turn.name, src.batch(step, ti), step)
            assert torch.isfinite(loss) and f"loss/{turn.name}/forget" in logs, turn.name
            for p in m.parameters():
                assert p.grad is None or (id(p) in ids[turn.name] and torch.isfinite(p.grad).all()), turn.name
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable()[turn.name])
    after = m.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_forget_warmup_widens_only_the_forget_times():
    m = make(SFD, SFDConfig(t_min=0.5, t_max=0.55, critic_t_min=0.5, critic_t_max=0.55, forget_classes=(6,),
                            override_classes=(0,), forget_fraction=0.5, forget_warmup=3))
    seen = []
    m.teacher.register_forward_pre_hook(lambda mod, args: seen.append((args[1].clone(), args[2].labels.clone())))
    src = unet_source(64)
    for step, warm in ((0, True), (3, False)):
        seen.clear()
        m("student", src.batch(step, 1), step)
        t = torch.cat([s[0] for s in seen])
        forget = torch.cat([s[1] for s in seen]) == 6
        assert forget.any() and (~forget).any()
        inside = (t >= 0.5 - 1e-3) & (t <= 0.55 + 1e-3)          # t snaps to the teacher's grid k / 999
        assert inside[~forget].all() and bool((~inside[forget]).any()) == warm
        assert (t >= WARMUP_T[0] - 1e-3).all() and (t <= WARMUP_T[1] + 1e-3).all()
    assert m.cfg.t_min == 0.5       # the warm-up leaves the config as it was


# --------------------------------------------------------------------------------------------- config errors
def error_of(*argv) -> str:
    cfg, _ = C.parse(list(argv), PRESETS["sfd"], "digits_sfd")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("argv,needle", [
    (["--method.forget_classes", "10"], "out of range; data.source digits has classes 0..9"),
    (["--method.forget_classes", "-1"], "out of range"),
    (["--method.override_classes", "6"], "maps a condition onto itself"),
    (["--method.forget_prompts", "a cat", "--method.override_prompts", "a dog"], "class-conditional teacher"),
    (["--data.source", "prompts", "--data.prompts", "p.txt"], "conditions on prompts; pair prompts instead"),
    (["--method.forget_classes", "6,3"], "pair one to one"),
    (["--method.forget_classes", "6,6", "--method.override_classes", "0,1"], "names a condition twice"),
    (["--method.critic_forget_weight", "-0.5"], "method.critic_forget_weight -0.5 must be >= 0"),
    (["--method.forget_fraction", "1.5"], "must be in [0, 1]"),
    (["--method.forget_warmup", "-2"], "method.forget_warmup -2 must be >= 0"),
    (["--model.gan_head", "true"], "model.gan_head true with forget pairs"),
    (["--method.forget_classes", "", "--method.override_classes", "", "--data.source", "prompts", "--data.prompts",
      "p.txt", "--method.forget_prompts", "a|", "--method.override_prompts", "b|c"], "holds an empty prompt"),
    (["--method.forget_classes", "", "--method.override_classes", "", "--data.source", "prompts", "--data.prompts",
      "p.txt", "--method.forget_prompts", "a", "--method.override_prompts", "b", "--method.forget_fraction", "0"],
     "no sample would be generated under a forget prompt"),
])
def test_bad_pairs_are_one_line_config_errors(argv, needle):
    assert needle in error_of(*argv)


def test_presets_validate_and_the_cli_refuses_with_one_line(tmp_path, capsys):
    assert DIGIT_CLASSES == NUM_CLASSES
    for name in ("digits_sfd", "sd15_sfd"):
        cfg, _ = C.parse(["--preset", name], PRESETS["sfd"], name)
        validate(cfg)
    sd = PRESETS["sfd"]["sd15_sfd"]()
    assert (sd.optim["critic"].lr, sd.optim["student"].lr, sd.data.batch_size) == (3e-6, 1e-6, 8)
    m = sd.method
    weights = (m.critic_remain_weight, m.critic_forget_weight, m.student_remain_weight, m.student_forget_weight)
    assert weights == (1.0,) * 4 and m.forget_prompts and m.override_prompts
    with pytest.raises(SystemExit) as e:
        cli.main("sfd", argv=["--method.override_classes", "6", "--train.output_dir", str(tmp_path / "x")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert e.value.code == 2 and len(err) == 1 and "maps a condition onto itself" in err[0]
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------- text-to-image
PROMPTS = ["a red cat", "two dogs on grass", "a blue house", "an old car"]
SIZE = 32


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """family -> a saved tiny stock pipeline, and a prompt file."""
    d = tmp_path_factory.mktemp("sfd_t2i")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    for family in ("sd15", "sd3"):
        tiny_models.FAMILIES[family]().save_pretrained(d / family)
    return d


def t2i_config(t2i, family: str, *extra: str) -> RunConfig:
    sched = json.loads((t2i / family / "scheduler" / "scheduler_config.json").read_text())
    argv = ["--model.teacher", str(t2i / family), "--data.source", "prompts",
            "--data.prompts", str(t2i / "prompts.txt"),
            "--data.resolution", str(SIZE), "--data.batch_size", "2", "--model.gan_head", "false",
            "--model.student_timesteps", ",".join(map(str, sid_timesteps(from_diffusers(sched), 2.5))),
            "--method.forget_classes", "", "--method.override_classes", "",
            "--method.forget_prompts", "a blue house|a photo of a tree", "--method.override_prompts", "a red cat|",
            *extra]
    cfg, _ = C.parse(argv, PRESETS["sfd"], "digits_sfd")
    validate(cfg)
    return cfg


def test_prompt_pairs_come_from_the_batch_source(t2i):
    """The forget / override embeddings are the source's own (a forget prompt in data.prompts is recognised), the
    forget samples are conditioned on them and the teacher sees the override embedding in their place."""
    cfg = t2i_config(t2i, "sd15", "--data.batch_size", "16")
    teacher = build.load_teacher(cfg.model)
    source = build.make_source(cfg, teacher)
    m = build.make_method(cfg, teacher, source)
    for (f, o), fp, op in zip(m.pairs, ["a blue house", "a photo of a tree"], ["a red cat", ""]):
        assert torch.equal(f.text, source.cond(fp).text) and torch.equal(o.text, source.cond(op).text)
    batch = source.batch(0, 1)
    drew_house = (batch.cond.text == source.cond("a blue house").text).flatten(1).all(1)
    forgot, idx = m.forget_batch(batch)
    assert drew_house.any() and (idx[drew_house] == 0).all() and (idx >= 0).sum() > drew_house.sum()
    for j, (f, _) in enumerate(m.pairs):
        assert (forgot.cond.text[idx == j] == f.text).all()
    assert (forgot.cond.text[idx < 0] == batch.cond.text[idx < 0]).all()
    seen = []
    m.teacher.inner.register_forward_pre_hook(lambda mod, args: seen.append(args[2].text))
    m("student", batch, 0)
    texts = torch.cat(seen)
    assert (texts == m.pairs[0][1].text).flatten(1).all(1).any()
    assert not (texts == m.pairs[0][0].text).flatten(1).all(1).any()     # never the forget prompt itself
    with pytest.raises(ConfigError, match="needs a text-to-image teacher and its prompt source"):
        build.make_method(cfg, teacher)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_two_steps_and_export_reload_in_stock_pipeline(family, t2i, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = t2i_config(t2i, family)
    argv = [f"--{k}={v if not isinstance(v, (list, tuple)) else ','.join(map(str, v))}"
            for k, v in C.flatten(cfg).items() if k.startswith(("model.", "data.", "method.forget", "method.override"))]
    out = cli.main("sfd", argv=[*argv, "--train.max_steps", "2", "--train.output_dir", str(tmp_path / family),
                                "--train.evaluate", "false"])
    index = json.loads((out / "model_index.json").read_text())
    stock = {"sd15": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}[family]
    assert index["_class_name"] == stock
    custom = any(isinstance(v, list) and v[0] == "scheduling_fewstep" for v in index.values())
    pipe = getattr(diffusers, stock).from_pretrained(out, trust_remote_code=custom)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    images = pipe(PROMPTS[:2], num_inference_steps=1, height=SIZE, width=SIZE, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, SIZE, SIZE) and torch.isfinite(images).all()
    folder = "unet" if family == "sd15" else "transformer"
    teacher = getattr(getattr(diffusers, stock).from_pretrained(t2i / family), folder)
    assert any(not torch.equal(a, b) for a, b in zip(getattr(pipe, folder).state_dict().values(),
                                                      teacher.state_dict().values()))


# --------------------------------------------------------------------------------------------- exact toy teacher
class ClassToy(ToyGMMModel):
    """Class k is the k-th mixture component alone (null label K: the whole mixture), exact, plus a learnable
    residual per class, zero at the start (separate per class so that moving one class cannot drag another: the
    test is of the method, not of parameter sharing; the parent's shared residual is unused)."""

    @register_to_config
    def __init__(self, means: list = ((-1.0,), (0.0,), (1.0,)), weights: list = (1.0, 1.0, 1.0), std: float = 0.2,
                 hidden: int = 32):
        super().__init__(means=means, weights=weights, std=std, hidden=hidden)
        D = len(means[0])
        self.nets = nn.ModuleList(nn.Sequential(nn.Conv2d(D + 9, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1),
                                                nn.SiLU(), nn.Conv2d(hidden, D, 1)) for _ in range(len(means) + 1))
        for net in self.nets:
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        alpha, sigma = self.alpha_sigma(timestep, sample)
        s2, K = self.config.std ** 2, len(self.mu)
        mu = self.mu[class_labels.clamp_max(K - 1)][:, :, None, None]
        one = mu + alpha * s2 / (alpha ** 2 * s2 + sigma ** 2) * (sample - alpha * mu)     # N(mu_k, s^2)'s posterior
        x0 = torch.where((class_labels < K)[:, None, None, None], one, self.posterior_mean(sample, alpha, sigma))
        t = torch.as_tensor(timestep, dtype=sample.dtype).expand(len(sample)) / self.schedule.N
        k = torch.arange(1, 5, dtype=sample.dtype)
        f = torch.cat([t[:, None], torch.sin(torch.pi * t[:, None] * k), torch.cos(torch.pi * t[:, None] * k)], 1)
        h = torch.cat([sample, f[:, :, None, None].expand(-1, -1, *sample.shape[2:])], 1)
        residual = torch.stack([net(h) for net in self.nets])[class_labels, torch.arange(len(sample))]
        x0 = x0 + residual
        eps = (sample - alpha * x0) / sigma
        return (alpha * eps - sigma * x0,)


register_adapter("ClassToy", ToyAdapter)


def test_forgotten_class_moves_onto_the_override_component(tmp_path):
    """Classes 0, 1, 2 at -1, 0, +1 (std 0.2); forget 2 -> 0: the one-step student's class-2 samples land on the
    teacher's class-0 component while classes 0 and 1 stay where the teacher has them."""
    torch.manual_seed(0)
    model = ClassToy().eval()
    teacher = Denoiser(adapter_for(model, "v_prediction"), model.schedule).requires_grad_(False)

    def copy_of():
        return Denoiser(adapter_for(copy.deepcopy(model).requires_grad_(True), "v_prediction"), model.schedule)

    ts = from_timesteps(sid_timesteps(model.schedule, 2.5), model.schedule)
    student = FewStepGenerator(copy_of(), ts, float(model.schedule.sigma(ts[0])))
    cfg = SFDConfig(alpha=1.2, forget_classes=(2,), override_classes=(0,), forget_fraction=0.5)
    method = SFD(cfg, teacher, student, copy_of())
    run = RunConfig(method_name="sfd", method=cfg, train=TrainConfig(
        output_dir=str(tmp_path / "toy"), max_steps=120, ema_decay=0.9, log_every=10**6, sample_every=10**6,
        checkpoint_every=10**6), optim={"student": OptimConfig(lr=2e-3, beta1=0.0, weight_decay=0.0),
                                        "critic": OptimConfig(lr=2e-3, beta1=0.0, weight_decay=0.0)})
    source = ClassLabelSource(torch.zeros(3, 1, 1, 1), torch.arange(3), 3, 3, 32, seed=0)

    def draw(label: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return method.student.sample(torch.randn(1000, 1, 1, 1, generator=g),
                                         Cond(labels=torch.full((1000,), label)), generator=g)

    def near(x, k: int) -> float:
        return float(model.mode_weights(x)[k])

    start = draw(2)
    assert near(start, 2) > 0.9          # the untrained student draws class 2 where the teacher has it
    from accelerate import Accelerator

    result = loop.train(run, method, source, Accelerator(cpu=True))
    with result["ema"].swapped():
        out = {k: draw(k) for k in range(3)}
    for label, component in ((2, 0), (0, 0), (1, 1)):
        x = out[label]
        assert near(x, component) > 0.9, (label, model.mode_weights(x).tolist())
        assert abs(float(x.mean()) - float(model.mu[component, 0])) < 0.15, (label, float(x.mean()))
