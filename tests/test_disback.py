"""DisBack (arXiv 2408.15991): without a path it is DMD2 bit for bit; in stage 2 the student turn is DMD2's with the
current node as the real score; the stages and the walk of the target (in order, ending at the teacher); F starting
from the last node; each turn touching only its own parameters on a bit-identical frozen base; resume in either stage
equal to an uninterrupted run; convergence on the exact toy teacher; the export in plain diffusers; and short runs
with export on the tiny SD1.5 and SD3 families."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import tiny_models
import torch
from test_t2i import PROMPTS, generate, load_stock, train, work  # noqa: F401 (work is a fixture)

from fewstep.backbones import adapter_for, lora
from fewstep.core import timesteps
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.errors import ConfigError
from fewstep.methods.disback import DisBack, DisBackConfig
from fewstep.methods.dmd2 import DMD2, DMD2Config
from fewstep.run import build, cli
from fewstep.run import config as C
from fewstep.run.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from fewstep.run.presets import PRESETS
from fewstep.run.validate import validate
from fewstep.testing.toy import ToyGMMModel, toy_denoiser, toy_source
from fewstep.training import loop
from fewstep.training.data import ClassLabelSource

OPTIM = {k: OptimConfig(lr=1e-3) for k in ("student", "critic", "record")}


def run_config(teacher_dir, out, *, name="disback", mode="full", steps=8, record=4, every=2, interval=1,
               student_every=2, gan=True) -> RunConfig:
    kw = dict(student_every=student_every, gan_weight_student=1e-2 if gan else 0.0)
    method = (DMD2Config(**kw) if name == "dmd2" else
              DisBackConfig(**kw, record_steps=record, snapshot_every=every, interval=interval))
    return RunConfig(method_name=name, method=method,
                     model=ModelConfig(teacher=str(teacher_dir), mode=mode, lora_rank=4, gan_head=gan),
                     data=DataConfig(batch_size=4),
                     train=TrainConfig(output_dir=str(out), max_steps=steps, checkpoint_every=1000, sample_every=1000,
                                       ema_decay=0.9, log_every=1),
                     optim=dict(OPTIM))


def make(cfg: RunConfig):
    """The method as the entry script builds it (same seed for the new modules), and a small class source."""
    torch.manual_seed(0)
    teacher = build.load_teacher(cfg.model)
    method = build.make_method(cfg, teacher)
    g = torch.Generator().manual_seed(0)
    source = ClassLabelSource(torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, torch.arange(20) % 10, 10, 10, 4, seed=0)
    return teacher, method, source


def train_to(cfg: RunConfig, method, source, steps: int):
    """The loop up to ``steps`` (a run killed after that step's checkpoint when ``steps`` < max_steps)."""
    run = copy.deepcopy(cfg)
    run.train.max_steps = steps
    return loop.train(run, method, source, build.accelerator("no", cfg.train.output_dir))


def state(method) -> dict:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def grads(method, turn: str, batch, step: int):
    loop._set_turn(method.trainable(), turn)
    method.zero_grad(set_to_none=True)
    loss, logs = method(turn, batch, step)
    loss.backward()
    return loss.detach(), [None if p.grad is None else p.grad.clone() for p in method.trainable()[turn]], logs


# ------------------------------------------------------------------------------------------ reductions
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_without_a_path_it_is_dmd2_bit_for_bit(mode, tiny_teacher_dir, tmp_path):
    """record_steps 0: the path is the teacher alone (one node, s'_0): the same turns, batches and updates as DMD2."""
    results = {}
    for name in ("dmd2", "disback"):
        cfg = run_config(tiny_teacher_dir, tmp_path / name, name=name, mode=mode, steps=3, record=0)
        _, method, source = make(cfg)
        results[name] = (train_to(cfg, method, source, 3)["updates"], state(method), method.turns)
    (u_a, s_a, t_a), (u_b, s_b, t_b) = results["dmd2"], results["disback"]
    assert u_a == u_b == {"critic": 3, "student": 2} and t_a == t_b
    assert s_a.keys() == s_b.keys() and all(torch.equal(s_a[k], s_b[k]) for k in s_a)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_stage_two_is_dmd2_with_the_current_node_as_real_score(mode, tiny_teacher_dir, tmp_path):
    """After stage 1, F is s'_N (a full critic: the teacher's weights with s'_N's delta merged in where the adapter
    acts, the rest the teacher's; a LoRA critic: s'_N's adapter weights), and the student turn at node i equals
    DMD2's with a plain copy of the teacher carrying node i's merged weights as its teacher (node 0: the teacher
    itself, bit for bit)."""
    cfg = run_config(tiny_teacher_dir, tmp_path, mode=mode, steps=12, record=4, every=2, interval=1)
    teacher, method, source = make(cfg)
    base = teacher.denoiser.backbone.model
    train_to(cfg, method, source, 4)
    path, N = method.path, method.N
    assert N == 2 and not torch.equal(path.nodes[0], path.nodes[1]) and path.nodes[0].abs().sum() > 0
    torch.testing.assert_close(path.nodes[-1], torch.cat([p.detach().reshape(-1) for p in path.live]), rtol=0, atol=0)
    if mode == "full":
        merged = method.aux.backbone.merged_weights("path")
        critic = dict(method.critic.backbone.model.named_parameters())
        assert merged and all(torch.equal(critic[f"{k}.weight"], w) for k, w in merged.items())
        plain = {k.replace(".base_layer", ""): v for k, v in base.named_parameters() if "lora_" not in k}
        rest = [k for k in critic if not (k.endswith(".weight") and k[:-7] in merged)]
        assert len(rest) > len(merged) and all(torch.equal(critic[k], plain[k].float()) for k in rest)
    else:
        critic = method.critic.trainable_parameters()
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in critic]), path.nodes[-1])

    def reference(i: int) -> Denoiser:
        if i == 0:
            return teacher.denoiser
        path.load(i)
        plain = lora.merged_copy(base, "path")
        return Denoiser(adapter_for(plain, method.teacher.prediction_type), method.teacher.schedule)

    for step in (4, 6):           # student updates 0 and 1: nodes 1 and 0
        i = method.node(step)
        batch = source.batch(step, 1)
        loss, g, logs = grads(method, "student", batch, step)
        assert float(logs["path/target_node"]) == i == (6 - step) // 2
        dmd2 = DMD2(method.cfg, reference(i), method.student, method.critic, method.head)
        method.path.loaded = 0     # the reference wrote into the live adapter: DisBack reloads its node
        loss_ref, g_ref, _ = grads(dmd2, "student", batch, step)
        if i == 0:
            assert torch.equal(loss, loss_ref) and all(torch.equal(a, b) for a, b in zip(g, g_ref))
            continue
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        teacher_loss = grads(DMD2(method.cfg, teacher.denoiser, method.student, method.critic, method.head),
                             "student", batch, step)[0]
        assert not torch.allclose(loss, teacher_loss, rtol=1e-3)     # the node is not the teacher


# ------------------------------------------------------------------------------------------ stages and resume
def test_stages_walk_and_resume_in_either_stage(tiny_teacher_dir, tmp_path, monkeypatch):
    """4 recording steps (a node each, N = 4), then the target N - 1, ..., 1, 0 one student update each: stage 1 runs
    the recording turn alone, stage 2 DMD2's turns. A run killed mid stage 1, again at the switch and again mid
    stage 2 (node 2 loaded, node 1 next), each time resumed by a fresh process, ends with the uninterrupted run's
    every parameter, node and buffer. Full mode: the switch merges s'_N into a full critic (LoRA mode's copy between
    adapters is checked in test_stage_two_...)."""
    kw = dict(mode="full", steps=12, record=4, every=1, interval=1, student_every=2)
    trace = tmp_path / "trace"
    monkeypatch.setenv("FEWSTEP_TRACE", str(trace))
    cfg = run_config(tiny_teacher_dir, tmp_path / "straight", **kw)
    _, method, source = make(cfg)
    assert [method.node(s) for s in range(4, 12, 2)] == [3, 2, 1, 0] and method.node(40) == 0
    result = train_to(cfg, method, source, 12)
    monkeypatch.delenv("FEWSTEP_TRACE")
    assert result["updates"] == {"record": 4, "critic": 8, "student": 4}
    rows = [json.loads(line) for line in Path(f"{trace}.rank0.jsonl").read_text().splitlines()]
    assert [(r["step"], r["turn"]) for r in rows[:5]] == [(0, "record"), (1, "record"), (2, "record"), (3, "record"),
                                                           (4, "critic")]
    walk = [(r["step"], r["logs"]["path/target_node"]) for r in rows if r["turn"] == "student"]
    assert walk == [(4, 3.0), (6, 2.0), (8, 1.0), (10, 0.0)]
    straight = state(method)
    ckpt = torch.load(max((tmp_path / "straight" / "checkpoints").glob("step_*")) / "state.pt", weights_only=False)
    assert ckpt["modules"]["path"]["nodes"].shape[0] == 4
    assert ckpt["optimizers"].keys() == {"critic", "student", "record"}
    cfg = run_config(tiny_teacher_dir, tmp_path / "killed", **kw)
    for kill in (2, 4, 7, 12):
        _, method, source = make(cfg)            # a fresh process: everything comes from the checkpoint
        assert train_to(cfg, method, source, kill)["step"] == kill
    after = state(method)
    assert after.keys() == straight.keys() and all(torch.equal(after[k], straight[k]) for k in straight)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_each_turn_touches_only_its_parameters_and_the_base_stays(mode, tiny_teacher_dir, tmp_path):
    cfg = run_config(tiny_teacher_dir, tmp_path, mode=mode, steps=6, record=2, every=1, interval=1, student_every=1)
    teacher, method, source = make(cfg)
    model = teacher.denoiser.backbone.model
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    params = method.trainable()
    owner = {id(p): name for name, ps in params.items() for p in ps}
    assert len(owner) == sum(len(ps) for ps in params.values())      # no parameter belongs to two turns
    assert {id(p) for p in params["record"]} == {id(p) for p in method.aux.trainable_parameters()}
    ran = []
    for step in range(4):
        for ti, turn in enumerate(method.turns):
            if not turn.runs(step):
                continue
            ran.append((step, turn.name))
            loss, g, _ = grads(method, turn.name, source.batch(step, ti), step)
            assert torch.isfinite(loss)
            for p in method.parameters():
                if owner.get(id(p)) != turn.name:
                    assert p.grad is None, f"turn {turn.name} left a gradient on a {owner.get(id(p), 'teacher')} one"
            assert any(x is not None and x.abs().sum() > 0 for x in g), (step, turn.name)
            with torch.no_grad():
                for p in params[turn.name]:
                    p.add_(1e-2 * torch.randn_like(p))                   # an update, as the optimiser would
        method.after_step(step)
    assert ran == [(0, "record"), (1, "record"), (2, "critic"), (2, "student"), (3, "critic"), (3, "student")]
    after = model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)           # the frozen base never moves


# ------------------------------------------------------------------------------------------ exact toy teacher
def test_one_step_student_reaches_the_exact_mixture_along_a_recorded_path(tmp_path):
    """On the exact 1-D mixture 0.3 N(-1, 0.3^2) + 0.7 N(1, 0.3^2) (DMD2's toy test, test_sid_fdistill) with the
    path adapter on the toy's residual convolutions: stage 1 records nodes that move from the teacher toward the
    score of G_0 (collapsed at the mean), and stage 2 brings the student to the mixture's mode weights and mean."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = ToyGMMModel(means=((-1.0,), (1.0,)), weights=(0.3, 0.7), std=0.3)
    denoiser = toy_denoiser(model).requires_grad_(False)
    denoiser.backbone.lora_targets = ("inp", "mid.1", "out")
    loaded = build.Teacher(denoiser, tmp_path, "unet", {})
    cfg = DisBackConfig(guidance_scale=1.0, student_every=1, gan_weight_student=0.0, record_steps=40,
                        snapshot_every=20, interval=20)
    steps = 290
    method = DisBack.build(cfg, build.Parts(loaded, ModelConfig(lora_rank=8, gan_head=False), steps))
    run = RunConfig(method_name="disback", method=cfg, train=TrainConfig(
        output_dir=str(tmp_path / "toy"), max_steps=steps, ema_decay=0.99, log_every=10**6, sample_every=10**6,
        checkpoint_every=10**6), optim={"student": OptimConfig(lr=1e-3, beta1=0.0, weight_decay=0.0),
                                        "critic": OptimConfig(lr=1e-2, beta1=0.0, weight_decay=0.0),
                                        "record": OptimConfig(lr=3e-3, weight_decay=0.0)})
    src = toy_source(model, 128)

    def draw():
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return method.student.sample(torch.randn(4000, 1, 1, 1, generator=g),
                                         Cond(labels=torch.zeros(4000, dtype=torch.long)), generator=g)

    def close(x) -> bool:
        return bool((model.mode_weights(x) - model.true_weights()).abs().max() < 0.1
                    and (model.mean(x) - model.true_mean()).abs().max() < 0.1)

    start = draw()
    run.train.max_steps = cfg.record_steps
    loop.train(run, method, src, Accelerator(cpu=True))
    batch = src.batch(10**6, 0)
    with torch.no_grad():                 # how far each node's x0 lies from G_0's own samples, noised and denoised
        x = method.generate(batch, 0)[0]
        noised = [timesteps.noised(denoiser.schedule, x, batch, 7 + j, 0.0, 1.0) for j in range(8)]

        def gap(net):
            return sum(float((net(x_t, t, batch.cond) - x).abs().mean()) for x_t, t in noised) / len(noised)

        gaps = [gap(denoiser)]
        for i in range(1, method.N + 1):
            method.path.load(i)
            gaps.append(gap(method.aux))
    method.path.loaded = 0
    # the path leads from the teacher toward G_0, each node nearer (measured: 0.297, 0.242, 0.207)
    assert len(gaps) == 3 and gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.8 * gaps[0], gaps
    run.train.max_steps = steps
    result = loop.train(run, method, src, Accelerator(cpu=True))
    with result["ema"].swapped():
        end = draw()
    assert result["updates"] == {"record": 40, "critic": 250, "student": 250}
    assert not close(start)
    assert close(end), (model.mode_weights(end).tolist(), model.mean(end).tolist())


# ------------------------------------------------------------------------------------------ config checks
BAD = [(["--method.record_steps", "30"], "method.record_steps 30 must be a multiple of method.snapshot_every 50"),
       (["--method.snapshot_every", "0"], "method.snapshot_every 0 and method.interval 20 must be at least 1"),
       (["--method.gan_features", "teacher"], "a head on the teacher's features would read a different network"),
       (["--method.student_every", "0"], "method.student_every 0 must be at least 1")]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_impossible_configs_are_one_line_errors(args, needle):
    cfg, _ = C.parse(args, PRESETS["disback"], "digits_disback")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_run_too_short_to_reach_the_teacher_is_refused_at_build(tiny_teacher_dir, tmp_path):
    cfg = run_config(tiny_teacher_dir, tmp_path, steps=10, record=4, every=1, interval=1, student_every=2)
    validate(cfg)
    with pytest.raises(ConfigError, match=r"train.max_steps 10: the target reaches the teacher only at step 10 "):
        make(cfg)


def test_presets():
    d = PRESETS["disback"]["digits_disback"]()
    validate(d)
    m = d.method
    assert d.model.student_timesteps == (999,) and m.record_steps % m.snapshot_every == 0
    assert m.record_steps + (m.record_steps // m.snapshot_every - 1) * m.interval * m.student_every < d.train.max_steps
    s = PRESETS["disback"]["sdxl_disback"]()
    validate(s)
    assert s.model.student_timesteps == (399,) and s.model.mode == "full" and s.model.gan_head
    assert (s.method.guidance_scale, s.method.gan_weight_student, s.method.student_every, s.method.t_max) == \
        (8.0, 5e-3, 5, 0.98)
    assert s.optim["student"].lr == s.optim["critic"].lr == 5e-7 and s.method.record_steps == 25_000
    assert s.method.interval * s.method.student_every == 1000       # a node per 1000 iterations


# ------------------------------------------------------------------------------------------ exports
def test_export_reloads_in_plain_diffusers_and_equals_the_sampler(tiny_teacher_dir, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = cli.main("disback", argv=["--model.teacher", str(tiny_teacher_dir), "--train.output_dir", str(tmp_path),
                                    "--train.max_steps", "4", "--train.evaluate", "false", "--data.batch_size", "4",
                                    "--method.record_steps", "2", "--method.snapshot_every", "1",
                                    "--method.interval", "1", "--method.student_every", "1"])
    assert json.loads((out / "config.json").read_text())["method_name"] == "disback"
    tiny_models.assert_class_export_equals_sampler(out)


@pytest.mark.parametrize("family,mode,extra", [
    ("sd15", "full", ["--data.images", "images"]),           # GAN on real images; the merge into a full critic
    ("sd3", "lora", ["--model.gan_head", "false", "--method.gan_weight_student", "0",
                     "--model.student_timesteps", "1000"]),
])
def test_short_runs_export_to_stock_pipelines(family, mode, extra, work, teachers):  # noqa: F811
    """Two recording steps (two nodes), a student update at node 1 and one at the teacher, then the export."""
    extra = [str(work / "images") if a == "images" else a for a in extra]
    out = train("disback", teachers(family), work / "runs" / f"disback_{family}", "--data.prompts",
                str(work / "prompts.txt"), "--train.max_steps", "4", "--model.mode", mode,
                "--method.record_steps", "2", "--method.snapshot_every", "1", "--method.interval", "1",
                "--method.student_every", "1", *extra)
    pipe = load_stock(family, out)
    x = generate(pipe, family, PROMPTS[:2], 1)
    assert tuple(x.shape) == (2, 3, 32, 32) and torch.isfinite(x).all()
    if mode == "lora":
        assert (out / "pytorch_lora_weights.safetensors").is_file()
