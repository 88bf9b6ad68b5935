"""Knowledge distillation (Luhman & Luhman, arXiv 2101.02388): the loss against its formula, the cached pairs
against a stock diffusers DDIMScheduler loop, the cache across a kill and a resume, turn isolation, convergence on
the exact toy teacher, and two training steps + export on the tiny SD1.5 and SD3 pipelines."""
from __future__ import annotations

import copy
import json

import diffusers
import pytest
import torch

from fewstep.backbones import adapter_for
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.timesteps import from_timesteps
from fewstep.digits import DIGITS_TEACHER
from fewstep.errors import ConfigError
from fewstep.methods.kd import CACHE, KD, PAIR_TURN, KDConfig, kd_loss, trajectory
from fewstep.run import build, cli
from fewstep.run import config as C
from fewstep.run.config import OptimConfig, RunConfig, TrainConfig
from fewstep.run.presets import PRESETS
from fewstep.run.validate import validate
from fewstep.testing.toy import ToyGMMModel, toy_denoiser, toy_source
from fewstep.training import loop

PROMPTS = ["a red cat", "two dogs on grass", "a blue house", "an old car"]


def kd_run(tmp_path, teacher="", timesteps=(999,), batch_size=2, mode="full", **method):
    """(teacher, source, method) of the digits_kd preset on ``teacher`` with the run folder ``tmp_path``."""
    cfg = PRESETS["kd"]["digits_kd"]()
    cfg.model.teacher, cfg.model.student_timesteps, cfg.model.mode = str(teacher), tuple(timesteps), mode
    cfg.model.lora_rank, cfg.data.batch_size, cfg.train.output_dir = 4, batch_size, str(tmp_path)
    for k, v in method.items():
        setattr(cfg.method, k, v)
    validate(cfg)
    loaded = build.load_teacher(cfg.model)
    source = build.make_source(cfg, loaded)
    return loaded, source, build.make_method(cfg, loaded, source)


def calls_of(loaded, limit=None):
    """A list that grows by one per teacher backbone call (a batched cond + uncond pass is one); past ``limit``
    calls the hook raises ``Killed``, as a kill would stop the run."""
    calls = []

    def hook(*_):
        calls.append(1)
        if limit is not None and len(calls) > limit:
            raise Killed

    handle = loaded.denoiser.backbone.model.register_forward_hook(hook)
    return calls, handle


class Killed(Exception):
    pass


# ------------------------------------------------------------------------------------------ the loss
def test_loss_on_fixed_tensors_equals_its_formula():
    x0 = torch.linspace(-1, 1, 24).reshape(2, 3, 2, 2)
    target = torch.cos(torch.arange(24.0)).reshape(2, 3, 2, 2)
    e = (x0 - target).double()
    torch.testing.assert_close(kd_loss(x0, target, "l2").double(), (e ** 2).sum() / 24, rtol=1e-6, atol=0)
    c = 0.1
    torch.testing.assert_close(kd_loss(x0, target, "pseudo_huber", c).double(),
                               ((e ** 2 + c ** 2).sqrt() - c).sum() / 24, rtol=1e-6, atol=0)
    x = x0.clone().requires_grad_(True)
    kd_loss(x, target, "l2").backward()
    torch.testing.assert_close(x.grad, 2 * (x0 - target) / 24)     # the target is a constant


def test_student_turn_loss_is_the_regression_onto_the_drawn_pairs(tiny_teacher_dir, tmp_path):
    """The turn's loss is d(x0_theta(x_{t_k}, t_k), x0_teacher) with pair j and step k drawn per sample from the
    batch seeds (salts 0 and 1), read back from the shard files here."""
    _, source, method = kd_run(tmp_path, tiny_teacher_dir, (999, 499), batch_size=4, pairs=7, teacher_steps=4,
                               guidance_scale=1.5)
    batch = source.batch(3, 0)
    loss, logs = method("student", batch, 3)
    shards = [torch.load(tmp_path / CACHE / f"shard_{c:06d}.pt", weights_only=True) for c in (0, 1)]
    j = (batch.rand(0) * 7).long().tolist()
    k = (batch.rand(1) * 2).long().tolist()
    x_t = torch.stack([shards[i // 4]["x_t"][i % 4, kk] for i, kk in zip(j, k)])
    x0_teacher = torch.stack([shards[i // 4]["x0"][i % 4] for i in j])
    labels = torch.stack([shards[i // 4]["cond"]["labels"][i % 4] for i in j])
    with torch.no_grad():
        x0 = method.student.denoiser(x_t, torch.tensor([999, 499])[k] / 999, Cond(labels=labels))
    torch.testing.assert_close(loss.detach(), ((x0 - x0_teacher) ** 2).mean(), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(logs["kd/rmse"]) and float(logs["kd/step"]) == sum(k) / len(k)


# ------------------------------------------------------------------------------------------ the pairs
def test_cached_pairs_equal_the_stock_ddim_loop(tmp_path):
    """The bundled digits teacher's pairs (CFG 1.5, 10 steps, the state at 499 kept for a 2-step student) equal
    diffusers' DDIMScheduler loop (trailing spacing, eta 0, CFG in v space) from the same noise, within 1e-5."""
    loaded, source, method = kd_run(tmp_path, "", (999, 499), batch_size=2, pairs=3, teacher_steps=10,
                                    guidance_scale=1.5)
    method.prepare("cpu")
    unet = loaded.denoiser.backbone.model
    sched = diffusers.DDIMScheduler.from_pretrained(DIGITS_TEACHER / "scheduler")
    sched.set_timesteps(10)
    assert sched.config.timestep_spacing == "trailing" and not sched.config.set_alpha_to_one
    for c, rows in ((0, 2), (1, 1)):
        x_t, x0, cond = method.shards[c]
        batch = source.batch(0, PAIR_TURN, c)
        z, labels = batch.noise[:rows], batch.cond.labels[:rows]
        assert x_t.shape[:2] == (rows, 2) and torch.equal(x_t[:, 0], z) and torch.equal(cond.labels, labels)
        x, states = z.clone(), {}
        with torch.no_grad():
            for t in sched.timesteps:
                states[int(t)] = x
                v_c, v_u = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, torch.full_like(labels, 10)])
                                ).sample.chunk(2)
                x = sched.step(v_u + 1.5 * (v_c - v_u), t, x, eta=0.0).prev_sample
        torch.testing.assert_close(x_t[:, 1], states[499], atol=1e-5, rtol=0)
        torch.testing.assert_close(x0, x, atol=1e-5, rtol=0)


def test_pair_cache_survives_a_kill_and_is_reused(tiny_teacher_dir, tmp_path):
    """A run killed while making shard 2 of 3 keeps shards 0 and 1 (whole, never rewritten); the next run makes only
    shard 2 (S teacher calls), a third makes nothing, and the pairs equal those of an uninterrupted run."""
    S = 4
    loaded, _, method = kd_run(tmp_path / "a", tiny_teacher_dir, pairs=5, teacher_steps=S)
    calls, hook = calls_of(loaded, limit=2 * S + 1)
    with pytest.raises(Killed):
        method.prepare("cpu")
    hook.remove()
    folder = tmp_path / "a" / CACHE
    assert sorted(p.name for p in folder.iterdir()) == ["shard_000000.pt", "shard_000001.pt"]
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    (folder / "shard_000002.pt.tmp12345").write_bytes(b"half a shard")   # a kill inside torch.save leaves one
    loaded, _, method = kd_run(tmp_path / "a", tiny_teacher_dir, pairs=5, teacher_steps=S)
    calls, hook = calls_of(loaded)
    method.prepare("cpu")
    assert len(calls) == S and not list(folder.glob("*.tmp*"))
    assert {n: (folder / n).stat().st_mtime_ns for n in stamps} == stamps
    loaded, _, method = kd_run(tmp_path / "a", tiny_teacher_dir, pairs=5, teacher_steps=S)
    calls, hook = calls_of(loaded)
    method.prepare("cpu")
    assert calls == [] and [len(s[0]) for s in method.shards] == [2, 2, 1]
    _, _, whole = kd_run(tmp_path / "b", tiny_teacher_dir, pairs=5, teacher_steps=S)
    whole.prepare("cpu")
    for (a_t, a_0, a_c), (b_t, b_0, b_c) in zip(method.shards, whole.shards):
        assert torch.equal(a_t, b_t) and torch.equal(a_0, b_0) and torch.equal(a_c.labels, b_c.labels)


def test_a_foreign_or_broken_shard_is_made_again(tiny_teacher_dir, tmp_path):
    _, _, method = kd_run(tmp_path, tiny_teacher_dir, pairs=4, teacher_steps=2, guidance_scale=2.0)
    method.prepare("cpu")
    broken = tmp_path / CACHE / "shard_000001.pt"
    broken.write_bytes(broken.read_bytes()[:100])                 # truncated, as a disk-full copy would leave it
    loaded, _, method = kd_run(tmp_path, tiny_teacher_dir, pairs=4, teacher_steps=2, guidance_scale=2.0)
    calls, _ = calls_of(loaded)
    method.prepare("cpu")
    assert len(calls) == 2                                        # shard 1 only
    loaded, _, method = kd_run(tmp_path, tiny_teacher_dir, pairs=4, teacher_steps=2, guidance_scale=1.5)
    calls, _ = calls_of(loaded)
    method.prepare("cpu")
    assert len(calls) == 4                                        # another guidance: both shards again


def test_a_shard_that_cannot_be_written_is_a_one_line_checkpoint_error(tiny_teacher_dir, tmp_path):
    from fewstep.errors import CheckpointError

    _, _, method = kd_run(tmp_path, tiny_teacher_dir, pairs=2, teacher_steps=2)
    (tmp_path / CACHE).write_text("not a folder")                  # as a full disk or a read-only folder would fail
    with pytest.raises(CheckpointError, match="could not write the KD pair shard .*the shards already written are kept"
                       ) as e:
        method.prepare("cpu")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ turn hygiene
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_student_turn_touches_only_the_students_parameters(mode, tiny_teacher_dir, tmp_path):
    loaded, source, method = kd_run(tmp_path, tiny_teacher_dir, (999, 499), mode=mode, pairs=4, teacher_steps=2)
    base = {k: v.clone() for k, v in loaded.denoiser.backbone.model.state_dict().items() if "lora_" not in k}
    params = method.trainable()
    assert [t.name for t in method.turns] == ["student"] and list(params) == ["student"]
    mine = {id(p) for p in params["student"]}
    for step in (0, 1):
        loop._set_turn(params, "student")
        for p in method.parameters():
            p.grad = None
        loss, _ = method("student", source.batch(step, 0), step)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is None for p in method.parameters() if id(p) not in mine)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params["student"])
        with torch.no_grad():
            for p in params["student"]:
                p.add_(1e-2 * torch.randn_like(p))                 # an update, as the optimiser would
    after = loaded.denoiser.backbone.model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)       # the teacher (or frozen base) never moves


# ------------------------------------------------------------------------------------------ exact toy teacher
def test_one_step_student_learns_the_exact_teachers_ode_map(tmp_path):
    """On the exact mixture 0.3 N(-1, 0.3^2) + 0.7 N(1, 0.3^2) the one-step student starts collapsed near the mean
    (its x0 at pure noise); regressed onto 2048 cached pairs it follows the teacher's 25-step DDIM map on held-out
    noise, and its samples take the mixture's mode weights."""
    model = ToyGMMModel(means=((-1.0,), (1.0,)), weights=(0.3, 0.7), std=0.3)
    teacher = toy_denoiser(model).requires_grad_(False)
    torch.manual_seed(0)
    copy_ = Denoiser(adapter_for(copy.deepcopy(model).requires_grad_(True), "v_prediction"), model.schedule)
    student = FewStepGenerator(copy_, from_timesteps([999], model.schedule))
    cfg = KDConfig(pairs=2048, teacher_steps=25, guidance_scale=1.0)
    method = KD(cfg, teacher, student, toy_source(model, 128), tmp_path / CACHE)
    run = RunConfig(method_name="kd", method=cfg, train=TrainConfig(
        output_dir=str(tmp_path / "toy"), max_steps=300, ema_decay=0.0, max_grad_norm=1.0, log_every=10**6,
        sample_every=10**6, checkpoint_every=10**6), optim={"student": OptimConfig(lr=3e-3, weight_decay=0.0)})
    z = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(5))     # not among the pairs
    cond = Cond(labels=torch.zeros(4000, dtype=torch.long))
    _, target = trajectory(teacher, z, cond, Cond(labels=torch.ones(4000, dtype=torch.long)), method.grid, [0], 1.0)

    def err():
        with torch.no_grad():
            x = method.student.sample(z, cond)
        return float(((x - target) ** 2).mean()), x

    from accelerate import Accelerator

    start, _ = err()
    loop.train(run, method, toy_source(model, 128), Accelerator(cpu=True))
    end, x = err()
    assert (model.mode_weights(target) - model.true_weights()).abs().max() < 0.03     # the teacher itself is exact
    assert start > 0.5 and end < 0.1 * start, (start, end)          # measured: 0.84 -> 0.026
    assert (model.mode_weights(x) - model.true_weights()).abs().max() < 0.05, model.mode_weights(x).tolist()


# ------------------------------------------------------------------------------------------ config checks
BAD = [(["--method.pairs", "0"], "method.pairs 0 must be at least 1"),
       (["--method.teacher_steps", "0"], "method.teacher_steps 0 must be at least 1"),
       (["--method.guidance_scale", "-1"], "method.guidance_scale -1.0 must be >= 0"),
       (["--method.loss", "lpips"], "method.loss 'lpips' is not known; use l2 or pseudo_huber"),
       (["--method.loss", "pseudo_huber", "--method.huber_c", "0"], "method.huber_c 0.0 must be > 0"),
       (["--model.gan_head", "true"], "KD regresses onto teacher samples and has no discriminator")]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_impossible_configs_are_one_line_errors(args, needle):
    cfg, _ = C.parse(args, PRESETS["kd"], "digits_kd")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("timesteps,steps,needle", [
    ((999, 749), 10, "not all on the teacher's 10-step DDIM grid (999, 899, 799, ...); set method.teacher_steps 12"),
    ((749,), 20, "the KD student maps the teacher's noise at t = 1; start the list at 999"),
    ((999,), 2000, "method.teacher_steps 2000 exceeds the teacher's 1000 training timesteps")])
def test_student_times_off_the_teachers_grid_are_refused_at_build(timesteps, steps, needle, tiny_teacher_dir,
                                                                 tmp_path):
    with pytest.raises(ConfigError) as e:
        kd_run(tmp_path, tiny_teacher_dir, timesteps, teacher_steps=steps)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_presets():
    p = PRESETS["kd"]
    assert cli.default_preset("kd") == "digits_kd"
    one, four, sd = p["digits_kd"](), p["digits_kd_4step"](), p["sd15_kd"]()
    assert one.model.student_timesteps == (999,) and four.model.student_timesteps == (999, 749, 499, 249)
    assert (one.method.pairs, one.method.teacher_steps, one.method.loss) == (1024, 20, "l2")
    assert sd.model.teacher == "stable-diffusion-v1-5/stable-diffusion-v1-5" and sd.data.source == "prompts"
    assert not any(c.model.gan_head for c in (one, four, sd)) and list(one.optim) == ["student"]


# ------------------------------------------------------------------------------------------ tiny pipelines
def test_the_entry_point_exports_a_class_pipeline_that_samples_as_the_student(tiny_teacher_dir, tmp_path):
    """train/kd.py's body on the tiny class teacher, 4-step student: the exported folder loads in plain diffusers and
    its 1- and 4-step images are those of the run folder reloaded as a FewStepGenerator."""
    from accelerate.state import AcceleratorState

    out = tmp_path / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    cli.main("kd", argv=["--preset", "digits_kd_4step", "--model.teacher", str(tiny_teacher_dir), "--train.output_dir",
                         str(out), "--train.evaluate", "false", "--data.batch_size", "2", "--train.max_steps", "2",
                         "--method.pairs", "3", "--method.teacher_steps", "4"])
    assert sorted(p.name for p in (out / CACHE).iterdir()) == ["shard_000000.pt", "shard_000001.pt"]
    student = FewStepGenerator.from_pretrained(out)
    assert student.sampling().timesteps == (999, 749, 499, 249)
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 3, 7]
    for steps in (1, 4):
        g = torch.Generator().manual_seed(5)
        img = pipe(labels, num_inference_steps=steps, generator=g, output_type="pt").images
        g = torch.Generator().manual_seed(5)
        x = student.sample(torch.randn((3, 1, 8, 8), generator=g), Cond(labels=torch.tensor(labels)), g, steps)
        torch.testing.assert_close(img, ((x.clamp(-1, 1) + 1) / 2).float(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("kd_t2i")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return d


@pytest.mark.parametrize("family,timesteps", [("sd15", (999, 499)), ("sd3", (1000, 500)), ("flux", (1000, 500))])
def test_two_steps_export_and_reload_in_plain_diffusers(family, timesteps, work, teachers):
    """Two KD steps of a 2-step student on a prompt source (4 pairs from 4 teacher steps), the export reloaded in
    the stock pipeline at 1 and 2 steps, and the run folder as a student; a resumed run reuses the pairs."""
    from accelerate.state import AcceleratorState
    from test_t2i import SIZE, generate, load_stock

    out = work / "runs" / family
    argv = ["--model.teacher", str(teachers(family)), "--data.source", "prompts", "--data.prompts",
            str(work / "prompts.txt"), "--data.resolution", str(SIZE), "--data.batch_size", "2",
            "--train.output_dir", str(out), "--train.evaluate", "false", "--method.pairs", "4",
            "--method.teacher_steps", "4", "--model.student_timesteps", ",".join(map(str, timesteps))]
    AcceleratorState._reset_state(reset_partial_state=True)
    cli.main("kd", argv=[*argv, "--train.max_steps", "2"])
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / CACHE).iterdir()}
    assert sorted(stamps) == ["shard_000000.pt", "shard_000001.pt"]
    pipe = load_stock(family, out)
    assert type(pipe).__name__ == {"sd15": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline",
                                   "flux": "FluxPipeline"}[family]
    for steps in (1, 2):
        x = generate(pipe, family, PROMPTS[:2], steps)
        assert tuple(x.shape) == (2, 3, SIZE, SIZE) and torch.isfinite(x).all()
    assert FewStepGenerator.from_pretrained(out).sampling().timesteps == timesteps
    assert json.loads((out / "config.json").read_text())["method_name"] == "kd"
    AcceleratorState._reset_state(reset_partial_state=True)
    cli.main("kd", argv=[*argv, "--train.max_steps", "3"])          # resumes from step 2, pairs untouched
    assert {p.name: p.stat().st_mtime_ns for p in (out / CACHE).iterdir()} == stamps
