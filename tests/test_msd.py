"""MSD (Multi-Student Distillation): one student is DMD2 bit for bit; each sample reaches only its owner's pair, whose
gradient is DMD2's on its own samples, and a turn moves only the owners' parameters (teacher bit-identical); K LoRA
pairs on one base; the partition rules and their one-line config errors; convergence of every class of both subsets
onto an exact class-conditional Gaussian teacher; the class export (full and LoRA mode) reloaded by plain diffusers from
its own files equal to fewstep's routed sampler; two training steps and export on the tiny SD1.5 and SD3 families, each
prompt run on its owner."""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import diffusers
import pytest
import torch
from diffusers.configuration_utils import register_to_config
from test_sfd import grads, labelled
from test_sid_fdistill import unet_parts, unet_source

from fewstep.backbones import adapter_for, register_adapter
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.timesteps import from_timesteps
from fewstep.digits.data import NUM_CLASSES
from fewstep.errors import ConfigError
from fewstep.methods.dmd2 import DMD2, DMD2Config
from fewstep.methods.msd import DIGIT_CLASSES, MSD, MSDConfig, Route, class_groups, kmeans, nearest
from fewstep.run import build, cli, export
from fewstep.run import config as C
from fewstep.run.config import OptimConfig, RunConfig, TrainConfig
from fewstep.run.presets import PRESETS
from fewstep.run.validate import validate
from fewstep.testing.toy import NUM_FREQS, ToyGMMModel
from fewstep.testing.toy_adapter import ToyAdapter
from fewstep.training import loop

HALVES = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]      # digits 0-4 -> student 0, 5-9 -> student 1


def pairs_of(K: int, cfg: DMD2Config, steps: int = 1, gan: bool = True) -> list[DMD2]:
    """K DMD2 pairs on one tiny random class teacher (test_sid_fdistill's networks; the pairs differ: their critics
    are not the teacher)."""
    teacher, student, critic, head = unet_parts(steps, gan)
    out = []
    for k in range(K):
        torch.manual_seed(10 + k)
        c = copy.deepcopy(critic)
        for p in c.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        out.append(DMD2(cfg, teacher, copy.deepcopy(student), c, copy.deepcopy(head) if gan else None))
    return out


# --------------------------------------------------------------------------------------------- reduction to DMD2
def test_one_student_is_dmd2_bit_for_bit():
    """A two-step student with backward simulation and the GAN term: every path of DMD2's turns."""
    kw = {"guidance_scale": 2.0, "gan_weight_student": 3e-3}
    (pair,) = pairs_of(1, DMD2Config(**kw), steps=2)
    dmd2 = copy.deepcopy(pair)
    msd = MSD(MSDConfig(**kw, students=1), [pair], Route(1))
    src = unet_source()
    for step in (0, 3):
        for ti, turn in enumerate(("critic", "student")):
            batch = src.batch(step, ti)
            loss_a, g_a, _ = grads(dmd2, turn, batch, step)
            loss_b, g_b, _ = grads(msd, turn, batch, step)
            assert torch.equal(loss_a, loss_b), turn
            assert len(g_a) == len(g_b) and all(torch.equal(a, b) for a, b in zip(g_a, g_b)), turn


# --------------------------------------------------------------------------------------------- routing
def batch_of(labels: list[int], step: int, turn: int):
    """``labelled``'s batch with a real image of each sample's class (the discriminators' real side)."""
    b = labelled(labels, step, turn)
    real = torch.rand(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(step)) * 2 - 1
    return replace(b, x0_real=real, cond_real=b.cond)


def two_halves(gan: bool = True) -> MSD:
    cfg = MSDConfig(guidance_scale=2.0, gan_weight_student=3e-3 if gan else 0.0, students=2)
    return MSD(cfg, pairs_of(2, cfg, gan=gan), Route(2, class_owner=HALVES))


def test_each_pair_sees_only_its_samples_and_gets_dmd2s_gradient_on_them():
    m = two_halves()
    labels = [7, 1, 4, 9, 5, 0]
    seen = {k: [] for k in range(2)}
    for k, pair in enumerate(m.pairs):
        for net in (pair.student.denoiser, pair.critic):
            net.register_forward_pre_hook(lambda mod, args, k=k: seen[k].append(args[2].labels.clone()))
    for ti, turn in enumerate(("critic", "student")):
        batch = batch_of(labels, step=5, turn=ti)
        _, _, logs = grads(m, turn, batch, 5)
        for k, pair in enumerate(m.pairs):
            members = torch.tensor([i for i, c in enumerate(labels) if HALVES[c] == k])
            _, want, _ = grads(pair, turn, batch.subset(members), 5)     # pair k alone on its samples: DMD2
            mine = {id(p) for p in pair.trainable()[turn]}
            got = [p.grad for p in m.trainable()[turn] if id(p) in mine]
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (turn, k)
            assert float(logs[f"msd/share_{k}"]) == 0.5
    for k in range(2):
        assert {HALVES[c] for c in torch.cat(seen[k]).tolist()} == {k}, seen[k]


def test_a_turn_moves_only_the_owners_parameters_and_never_the_teacher():
    m = two_halves()
    teacher = copy.deepcopy(m.teacher.state_dict())
    for turn in ("critic", "student"):
        params = m.trainable()[turn]
        opt = torch.optim.AdamW(params, lr=1e-2)
        before = [p.detach().clone() for p in params]
        for step in range(2):    # the second step has Adam's moments: a pair without gradient still stays put
            loop._set_turn(m.trainable(), turn)
            opt.zero_grad(set_to_none=True)
            loss, _ = m(turn, batch_of([0, 3, 4, 2], step, 1), step)      # student 0's classes only
            loss.backward()
            opt.step()
        owner = {id(p) for p in m.pairs[0].trainable()[turn]}
        assert any(not torch.equal(p, b) for p, b in zip(params, before) if id(p) in owner), turn
        assert all(torch.equal(p, b) for p, b in zip(params, before) if id(p) not in owner), turn
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in teacher.items())


def trained(tiny_teacher_dir, out, *argv):
    """digits_msd on the tiny class teacher, two steps (no EMA, a large student lr: the students differ), exported."""
    from accelerate import Accelerator

    cfg, _ = C.parse(["--model.teacher", str(tiny_teacher_dir), "--data.batch_size", "4", "--train.max_steps", "2",
                      "--train.ema_decay", "0", "--optim.student.lr", "1e-2", "--model.gan_head", "false",
                      "--method.gan_weight_student", "0", "--train.output_dir", str(out),
                      "--train.sample_every", "1000",
                      "--train.evaluate", "false", *argv], PRESETS["msd"], "digits_msd")
    validate(cfg)
    teacher = build.load_teacher(cfg.model)
    source = build.make_source(cfg, teacher)
    m = build.make_method(cfg, teacher, source)
    loop.train(cfg, m, source, Accelerator(cpu=True))
    return m, teacher, export.export_student(cfg, teacher, m.student, None)


def routed_images(m, labels=(1, 6, 3, 8), seed=7) -> torch.Tensor:
    """fewstep's routed sampler, as the pipeline's images."""
    g = torch.Generator().manual_seed(seed)
    x = m.student.sample(torch.randn(len(labels), 1, 8, 8, generator=g), Cond(labels=torch.tensor(labels)), g)
    return ((x.clamp(-1, 1) + 1) / 2).float()


def test_lora_mode_gives_k_adapter_pairs_on_one_base_and_exports_them_fused(tiny_teacher_dir, tmp_path):
    from fewstep.digits import scoring

    m, teacher, out = trained(tiny_teacher_dir, tmp_path / "run", "--model.mode", "lora", "--model.lora_rank", "4")
    base = teacher.denoiser.backbone.model
    assert set(base.peft_config) == {"student_0", "student_1", "critic_0", "critic_1"}
    assert all(d.backbone.model is base for p in m.pairs for d in (p.student.denoiser, p.critic))
    ids = [{id(q) for q in p.trainable()["student"] + p.trainable()["critic"]} for p in m.pairs]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert all("lora_" in n for n, q in base.named_parameters() if any(id(q) in i for i in ids))
    # the router holds each student fused (base + its adapter) and samples as the adapters do
    img = scoring.load_pipeline(out)([1, 6, 3, 8], generator=torch.Generator().manual_seed(7), output_type="pt").images
    torch.testing.assert_close(img, routed_images(m), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- partition rules
def test_class_groups_and_prompt_clusters():
    assert class_groups("", 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert class_groups("", 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert class_groups("0,2,4-6|1,3|7-9", 3) == [[0, 2, 4, 5, 6], [1, 3], [7, 8, 9]]
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    x = (centres[:, None] + 0.3 * torch.randn(3, 20, 3, generator=g)).reshape(60, 3)
    found = kmeans(x, 3, 20)
    owner = nearest(x, found)
    assert all(len(set(owner[20 * i:20 * i + 20].tolist())) == 1 for i in range(3)) and len(set(owner.tolist())) == 3
    assert torch.equal(found, kmeans(x, 3, 20))          # the same centroids on every rank and after a resume


def error_of(*argv) -> str:
    cfg, _ = C.parse(list(argv), PRESETS["msd"], "digits_msd")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("argv,needle", [
    (["--method.class_groups", "0-4|5-8"], "must name every class 0..9 exactly once"),
    (["--method.class_groups", "0-5|5-9"], "exactly once"),
    (["--method.class_groups", "0-9"], "gives 1 groups (each non-empty) for method.students 2"),
    (["--method.class_groups", "a|b"], "is not a class partition"),
    (["--method.students", "0"], "must be at least 1"),
    (["--method.students", "11", "--method.class_groups", ""], "at most 10 students"),
    (["--method.routing", "topics"], "method.routing 'topics' is not valid"),
    (["--method.routing", "prompts"], "does not fit data.source digits: use method.routing classes"),
    (["--data.source", "prompts", "--data.prompts", "p.txt", "--model.gan_head", "false"],
     "use method.routing prompts"),
    (["--data.source", "prompts", "--data.prompts", "p.txt", "--model.gan_head", "false", "--method.routing",
      "prompts"], "leave method.class_groups empty"),
    (["--method.kmeans_iters", "0"], "method.kmeans_iters 0 >= 1"),
])
def test_bad_partitions_are_one_line_config_errors(argv, needle):
    assert needle in error_of(*argv)


def test_presets_validate():
    assert DIGIT_CLASSES == NUM_CLASSES
    for name in PRESETS["msd"]:
        cfg, _ = C.parse(["--preset", name], PRESETS["msd"], name)
        validate(cfg)
    sd = PRESETS["msd"]["sd15_msd"]()
    assert (sd.method.students, sd.method.routing, sd.method.guidance_scale, sd.method.student_every) == \
        (4, "prompts", 1.75, 10)
    digits = PRESETS["msd"]["digits_msd"]()
    assert (digits.method.students, digits.method.class_groups) == (2, "0-4|5-9")


# --------------------------------------------------------------------------------------------- exact toy teacher
class ClassMixtureToy(ToyGMMModel):
    """Class c draws from the two components at -1 and +1 (std 0.3) with its own weights ``class_weights[c]`` (the
    null label: their mean), exactly (ToyGMMModel's posterior with per-class log pi), plus the learnable residual
    with the class one-hot among its inputs, zero at the start."""

    @register_to_config
    def __init__(self, class_weights: list = ((0.3, 0.7), (0.7, 0.3)), std: float = 0.3, hidden: int = 32):
        super().__init__(means=((-1.0,), (1.0,)), weights=(1.0, 1.0), std=std, hidden=hidden)
        pi = torch.tensor(class_weights, dtype=torch.float32)
        pi = torch.cat([pi, pi.mean(0, keepdim=True)])
        self.register_buffer("class_log_pi", (pi / pi.sum(1, keepdim=True)).log(), persistent=False)
        self.inp = torch.nn.Conv2d(1 + 1 + 2 * NUM_FREQS + len(pi), hidden, 1)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        alpha, sigma = self.alpha_sigma(timestep, sample)
        v = alpha ** 2 * self.config.std ** 2 + sigma ** 2
        diff = sample.unsqueeze(1) - alpha.unsqueeze(1) * self.mu[None, :, :, None, None]        # [B, 2, 1, H, W]
        logits = self.class_log_pi[class_labels][:, :, None, None] - (diff ** 2).sum(2) / (2 * v)
        gamma = torch.softmax(logits, dim=1).unsqueeze(2)
        x0 = (gamma * (self.mu[None, :, :, None, None] + (alpha * self.config.std ** 2 / v).unsqueeze(1) * diff)).sum(1)
        t = torch.as_tensor(timestep, dtype=sample.dtype).expand(len(sample)) / self.schedule.N
        k = torch.arange(1, NUM_FREQS + 1, dtype=sample.dtype)
        feats = torch.cat([t[:, None], torch.sin(torch.pi * t[:, None] * k), torch.cos(torch.pi * t[:, None] * k),
                           torch.nn.functional.one_hot(class_labels, len(self.class_log_pi)).to(sample)], 1)
        h = torch.cat([sample, feats[:, :, None, None].expand(-1, -1, *sample.shape[2:])], 1)
        x0 = x0 + self.out(self.mid(self.inp(h)))
        return ((alpha * (sample - alpha * x0) / sigma - sigma * x0),)


register_adapter("ClassMixtureToy", ToyAdapter)


def test_both_subsets_converge_to_the_exact_class_teacher(tmp_path):
    """Class 0 is N(-1, 0.3^2) and class 1 N(+1, 0.3^2), exactly, one student each. Both one-step students start
    shifted by +0.6 (their residual's bias), at -0.4 and 1.6; distribution matching pulls each onto its own class's
    component (a student trained on the other class would land at the other mean)."""
    from accelerate import Accelerator

    from fewstep.training.data import ClassLabelSource

    torch.manual_seed(0)
    model = ClassMixtureToy(class_weights=((1.0, 1e-6), (1e-6, 1.0))).eval()
    teacher = Denoiser(adapter_for(model, "v_prediction"), model.schedule).requires_grad_(False)

    def copy_of(shift: float = 0.0):
        net = copy.deepcopy(model).requires_grad_(True)
        net.out.bias.data.fill_(shift)
        return Denoiser(adapter_for(net, "v_prediction"), model.schedule)

    ts = from_timesteps([999], model.schedule)
    cfg = MSDConfig(guidance_scale=1.0, student_every=1, gan_weight_student=0.0, students=2)
    method = MSD(cfg, [DMD2(cfg, teacher, FewStepGenerator(copy_of(0.6), ts), copy_of()) for _ in range(2)],
                 Route(2, class_owner=[0, 1]))
    run = RunConfig(method_name="msd", method=cfg, train=TrainConfig(
        output_dir=str(tmp_path / "toy"), max_steps=100, ema_decay=0.9, log_every=10**6, sample_every=10**6,
        checkpoint_every=10**6), optim={"student": OptimConfig(lr=1e-3, beta1=0.0, weight_decay=0.0),
                                        "critic": OptimConfig(lr=1e-2, beta1=0.0, weight_decay=0.0)})
    source = ClassLabelSource(torch.zeros(2, 1, 1, 1), torch.arange(2), 2, 2, 32, seed=0)

    def draw(student, label: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        return student.sample(torch.randn(1000, 1, 1, 1, generator=g), Cond(labels=torch.full((1000,), label)), g)

    mu = model.mu[:, 0].tolist()
    assert all(abs(float(draw(method.student, k).mean()) - mu[k]) > 0.5 for k in range(2))
    result = loop.train(run, method, source, Accelerator(cpu=True))
    with result["ema"].swapped():
        for k in range(2):
            x = draw(method.student, k)
            assert abs(float(x.mean()) - mu[k]) < 0.1 and float(model.mode_weights(x)[k]) > 0.95, (k, float(x.mean()))
            assert torch.equal(x, draw(method.pairs[k].student, k))        # the class ran on its owner


# --------------------------------------------------------------------------------------------- class export
def test_class_export_reloads_in_plain_diffusers_and_equals_the_routed_sampler(tiny_teacher_dir, tmp_path):
    from fewstep.digits import scoring

    m, _, out = trained(tiny_teacher_dir, tmp_path / "run")
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["router_fewstep", "FewStepRouter"] and (out / "unet" / "router_fewstep.py").is_file()
    assert "trust_remote_code=True" in (out / "README.md").read_text() and not (out / "generator_config.json").exists()
    # plain diffusers, the pipeline and the router from the folder's own files (pipelines/ imports no fewstep:
    # test_layers; a Python without fewstep loads such a folder in test_cli)
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet).__name__ == "FewStepRouter" and type(pipe.unet).__module__.startswith("diffusers_modules")
    reloaded = pipe([1, 6, 3, 8], generator=torch.Generator().manual_seed(7), output_type="pt").images
    want = routed_images(m)         # classes of both subsets, interleaved
    torch.testing.assert_close(reloaded, want, atol=1e-5, rtol=0)
    # the students differ, so the routing shows: student 0 alone draws something else for the 6 and the 8
    alone = routed_images(m.pairs[0])
    assert (alone[[1, 3]] - want[[1, 3]]).abs().max() > 1e-3 and torch.allclose(alone[[0, 2]], want[[0, 2]], atol=1e-5)
    # metrics.json's loader reads the router too
    assert scoring.is_class_pipeline_dir(out)
    img = scoring.load_pipeline(out)([1, 6, 3, 8], generator=torch.Generator().manual_seed(7), output_type="pt").images
    torch.testing.assert_close(img, want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- text-to-image
PROMPTS = ["a red cat", "two dogs on grass", "a blue house", "an old car"]
SIZE = 32


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_two_steps_and_export_route_each_prompt_to_its_student(family, teachers, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    sched = json.loads((teachers(family) / "scheduler" / "scheduler_config.json").read_text())
    ts = "1000" if "FlowMatch" in sched["_class_name"] else "999"
    argv = ["--model.teacher", str(teachers(family)), "--data.source", "prompts", "--data.prompts",
            str(tmp_path / "prompts.txt"), "--data.resolution", str(SIZE), "--data.batch_size", "2",
            "--model.gan_head", "false", "--method.gan_weight_student", "0", "--model.student_timesteps", ts,
            "--method.routing", "prompts", "--method.class_groups", "", "--method.student_every", "1",
            "--optim.student.lr", "1e-2", "--train.ema_decay", "0"]
    out = cli.main("msd", argv=[*argv, "--train.max_steps", "2", "--train.output_dir", str(tmp_path / family),
                                "--train.evaluate", "false"])
    stock = {"sd15": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}[family]
    folder = "unet" if family == "sd15" else "transformer"
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == stock and index[folder] == ["router_fewstep", "FewStepRouter"]
    pipe = getattr(diffusers, stock).from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    router = getattr(pipe, folder)
    # the exported rule is the run's: the centroids a fresh build computes from the same prompts
    cfg, _ = C.parse(argv, PRESETS["msd"], "digits_msd")
    teacher = build.load_teacher(cfg.model)
    source = build.make_source(cfg, teacher)
    fresh = build.make_method(cfg, teacher, source)
    torch.testing.assert_close(router.centroids, fresh.route.centroids, rtol=0, atol=0)
    extra = {"device": "cpu", "num_images_per_prompt": 1} if family == "sd15" else {"prompt_2": None, "prompt_3": None}
    embeds = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, **extra)[0]
    owners = router.owners(encoder_hidden_states=embeds, batch=len(PROMPTS))
    assert set(owners.tolist()) == {0, 1}
    assert torch.equal(owners, fresh.route(Cond.cat(*[source.cond(p) for p in PROMPTS]), len(PROMPTS)))
    kw = {"num_inference_steps": 1, "height": SIZE, "width": SIZE, "guidance_scale": 1.0, "output_type": "pt"}
    images = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
    assert images.shape == (4, 3, SIZE, SIZE) and torch.isfinite(images).all()
    for k in (0, 1):       # each prompt's image is its owner's: the stock pipeline with that student alone
        alone = getattr(diffusers, stock)(**{**pipe.components, folder: router.students[k]})
        alone.set_progress_bar_config(disable=True)
        ref = alone(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
        torch.testing.assert_close(images[owners == k], ref[owners == k], atol=1e-5, rtol=0)
        assert (images[owners != k] - ref[owners != k]).abs().max() > 1e-4
