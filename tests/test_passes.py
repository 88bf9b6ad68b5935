"""Network passes per turn: every method makes the passes it needs and no more; the discriminator's real-image
pass stops at the tapped block."""
from __future__ import annotations

import pytest
import torch

from fewstep.run import build
from fewstep.run.presets import PRESETS
from fewstep.training import loop

# preset -> turn -> the passes (network, batch) the method needs on step 0 with a batch of B = 2:
#   S = the student generator (backward simulation: its no-grad steps and the trained step), T = the teacher
#   (cond and uncond in one batched call: 2B), C = the critic whole, C| = the critic stopped at its tapped block
#   (the GAN's real pass), E = the consistency target network. Each turn draws its own batch (the loop's
#   per-turn seeds), so the student turn generates its own sample.
# digits_fdistill uses real-score guidance 1 (no CFG): its teacher runs its conditional half only; digits_dmd2
# guides at 1.05, so its teacher runs both halves.
NEEDED = {
    "digits_dmd2": {"critic": [("S", 2), ("C", 2), ("C|", 2)], "student": [("S", 2), ("T", 4), ("C", 2)]},
    "digits_dmd2_4step": {"critic": [("S", 2)] * 4 + [("C", 2), ("C|", 2)],
                          "student": [("S", 2)] * 4 + [("T", 4), ("C", 2)]},
    "digits_sid": {"critic": [("S", 2), ("C", 2)], "student": [("S", 2), ("T", 2), ("C", 2)]},
    "digits_fdistill": {"critic": [("S", 2), ("C", 2), ("C|", 2)], "student": [("S", 2), ("T", 2), ("C", 2)]},
    "digits_phased_dmd": {"critic": [("S", 2), ("C", 2)], "student": [("S", 2), ("T", 4), ("C", 2)]},
    "digits_consistency": {"student": [("T", 4), ("E", 2), ("S", 2)]},
}
METHOD_OF = {preset: m for m, ps in PRESETS.items() for preset in ps}


def setup(preset, teacher_dir, out, method=None, **train):
    cfg = PRESETS[METHOD_OF[preset]][preset]()
    for k, v in (method or {}).items():
        setattr(cfg.method, k, v)
    cfg.model.teacher = str(teacher_dir)
    cfg.data.batch_size = 2
    cfg.train.output_dir = str(out)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    torch.manual_seed(0)
    teacher = build.load_teacher(cfg.model)
    return cfg, build.make_method(cfg, teacher), build.make_source(cfg, teacher)


def record_passes(method) -> list:
    """Hooks that log (network letter, batch size) for each backbone call, and '|' when its output layer never ran."""
    nets = {"T": method.teacher, "C": getattr(method, "critic", None), "S": method.student.denoiser,
            "E": getattr(method, "target", None)}
    log, handles = [], []
    for letter, d in nets.items():
        if d is None:
            continue
        model = d.backbone.model
        handles.append(model.register_forward_pre_hook(lambda _m, a, k=letter: log.append([k, a[0].shape[0]])))
        handles.append(model.conv_out.register_forward_hook(lambda *_: log[-1].append("ran")))
    return log, handles


@pytest.mark.parametrize("preset", sorted(NEEDED))
def test_each_turn_makes_only_the_passes_it_needs(preset, tiny_teacher_dir, tmp_path):
    _, method, source = setup(preset, tiny_teacher_dir, tmp_path)
    log, handles = record_passes(method)
    params = method.trainable()
    seen = {}
    for turn in method.turns:
        loop._set_turn(params, turn.name)
        log.clear()
        loss, _ = method(turn.name, source.batch(0, 0), 0)
        loss.backward()
        method.zero_grad(set_to_none=True)
        seen[turn.name] = [(k if ran else f"{k}|", b) for k, b, *ran in log]
    for h in handles:
        h.remove()
    assert seen == NEEDED[preset]


def test_a_discriminator_on_teacher_features_sends_no_gradient_into_the_critic(tiny_teacher_dir, tmp_path):
    """``gan_features teacher``: the critic turn's discriminator passes are the frozen teacher's, forward-only and
    stopped at the tap; the critic's gradient is its denoising loss's alone; the student turn reads the features
    off its teacher pass (which then differentiates to its input) and runs the critic without gradient."""
    _, method, source = setup("digits_dmd2", tiny_teacher_dir, tmp_path, {"gan_features": "teacher"})
    log, handles = record_passes(method)
    params = method.trainable()
    batch = source.batch(0, 0)
    grads = {}
    for weight in (method.cfg.gan_weight_critic, 0.0):
        method.cfg.gan_weight_critic = weight
        loop._set_turn(params, "critic")
        log.clear()
        loss, logs = method("critic", batch, 1)
        loss.backward()
        grads[weight] = [None if p.grad is None else p.grad.clone() for p in params["critic"]]
        method.zero_grad(set_to_none=True)
    assert [(k if ran else f"{k}|", b) for k, b, *ran in log] == [("S", 2), ("C", 2), ("T|", 2), ("T|", 2)]
    with_gan, without = grads.values()
    n_head = len(list(method.head.parameters()))
    critic_part = slice(0, len(params["critic"]) - n_head)
    assert all(torch.equal(a, b) for a, b in zip(with_gan[critic_part], without[critic_part]))
    head_grads = with_gan[critic_part.stop:]
    assert all(g is not None for g in head_grads) and sum(g.abs().sum() for g in head_grads) > 0
    assert logs["loss/critic/gan"] > 0
    loop._set_turn(params, "student")
    log.clear()
    loss, logs = method("student", batch, 1)
    loss.backward()
    assert [(k if ran else f"{k}|", b) for k, b, *ran in log] == [("S", 2), ("T", 4), ("C", 2)]   # w > 1: cond + uncond
    assert "loss/student/gan" in logs and all(p.grad is None for p in params["critic"])
    for h in handles:
        h.remove()
