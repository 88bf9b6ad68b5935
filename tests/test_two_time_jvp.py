"""Two-time students and forward-mode JVPs on the tiny diffusers backbone of every family (no mocks).

- A student from ``two_time.attach`` equals its teacher exactly at initialisation for every target time ``r``;
  one Adam step on a loss that depends on ``r`` lowers that loss and makes ``r`` matter, while ``r = t`` and
  calls without ``r`` stay the teacher; the only new parameters are the embedding's, and they get gradients.
- ``jvp.jvp`` equals central finite differences of the same function along x, t and r, on the model cast to
  float64, and equals the reverse-mode directional derivative ``<w, J v> = <J^T w, v>``.
- A bf16 backbone's JVP is close to the fp32 one.

Tolerances. ``FD_RTOL = 5e-3``, relative L2 error: float64 alone would allow ~1e-7, but diffusers computes
parts of every model in float32 whatever the weights' dtype (the sinusoidal time projections, fewstep's
float32 times, Flux's and Wan's RoPE, Wan's FP32LayerNorm, Sana's linear attention), so steps are chosen
against float32 rounding: ``h = 1e-4`` along x; ``2^-14`` along t and r, on dyadic times so that ``t +- h`` is
exact in float32, small against the period of the fastest time sinusoid (2 pi / 1000 in t). Measured errors
are <= 1e-3. Sana's linear attention has a ReLU kernel: a step that crosses its kink changes the difference
quotient of a few outputs (hence L2, not max, and a seeded embedding init; over 40 seeds the L2 error stayed
below 2e-2 and was below 1e-3 for most). Forward and reverse mode differentiate the same float
computation, so they agree to ``AD_RTOL = 1e-5``. bf16 against fp32: relative L2 error ``BF16_RTOL = 0.06``
(measured <= 0.03). Flux casts its time and guidance inputs to the model dtype before its sinusoids
(``timestep.to(hidden_states.dtype) * 1000``), so the bf16 check uses times and a guidance scale whose
``1000 x`` values are bf16-exact; otherwise a bf16 Flux is linearised up to a timestep away.
Wrong implementations fail by O(1): a rounded timestep (no t tangent), a target time that never reaches the
time embedding (no r tangent), a non-zero embedding at initialisation.
"""
from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
import torch.nn.functional as F
from conftest import tiny_class_unet
from diffusers import DDIMScheduler

from fewstep.backbones import adapter_for
from fewstep.backbones.encoders import LatentCodec, PromptEncoder
from fewstep.core.adapter import BackboneAdapter
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.jvp import continuous, jvp, jvp_attention
from fewstep.core.schedules import from_diffusers, prediction_type_of
from fewstep.core.two_time import PREFIX, attach, embedding_of, offset, predict

FAMILIES = ["unet2d", *tiny_models.FAMILIES]
PROMPTS = ["a red cat", "two dogs on grass"]
FD_RTOL, AD_RTOL, BF16_RTOL = 5e-3, 1e-5, 0.06
T, R = torch.tensor([111 / 256, 0.8125]), torch.tensor([0.125, 0.375])   # dyadic, off the VP grid (k = t * 999)
_TEACHERS: dict = {}


def teacher(family: str):
    """(backbone, scheduler, cond, latent shape) of a family's tiny model, built once per module."""
    if family not in _TEACHERS:
        if family == "unet2d":
            sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
            _TEACHERS[family] = (tiny_class_unet(), sched, Cond(labels=torch.tensor([3, 7])), (1, 8, 8))
        else:
            pipe = tiny_models.FAMILIES[family]()
            size = 32 if family == "wan" else 16     # Wan's VAE is 8x: 32 px is a 4x4 latent
            # guidance 2: Flux's guidance input 2000 is exact in bf16 (see the module docstring)
            cond = PromptEncoder(pipe, height=size, width=size, guidance_scale=2.0).encode(PROMPTS)
            shape = LatentCodec(pipe).latent_shape(size, size, num_frames=5 if family == "wan" else None)
            model = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
            _TEACHERS[family] = (model, pipe.scheduler, cond, shape)
    return _TEACHERS[family]


def denoiser_of(model, sched) -> Denoiser:
    return Denoiser(adapter_for(model, prediction_type_of(sched)), from_diffusers(sched))


def student(family: str, std: float = 0.0) -> Denoiser:
    """A two-time copy of the teacher; ``std > 0`` gives its zero-initialised output layer random weights
    (a student some way into training, so that r matters)."""
    model, sched, _, _ = teacher(family)
    d = denoiser_of(copy.deepcopy(model), sched)
    torch.manual_seed(0)        # linear_1's default init draws from the global generator
    embedding = attach(d.backbone)
    if std:
        torch.nn.init.normal_(embedding.linear_2.weight, std=std, generator=torch.Generator().manual_seed(1))
    return d


def inputs(family: str, dtype=torch.float32):
    _, _, cond, shape = teacher(family)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return x, cond.apply(lambda v: v.to(dtype) if v.is_floating_point() else v)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def rel_l2(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_student_is_the_teacher_at_init(family):
    model, sched, _, _ = teacher(family)
    d_teacher, d_student = denoiser_of(model, sched), student(family)
    x, cond = inputs(family)
    out = d_teacher.prediction_type
    with torch.no_grad():
        ref = d_teacher(x, T, cond, out)
        for r in (None, T, R, torch.zeros(2)):
            assert torch.equal(predict(d_student, x, T, cond, r=r, out=out), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_update_on_an_r_loss_makes_r_matter(family):
    model, sched, _, _ = teacher(family)
    d_teacher, d_student = denoiser_of(model, sched), student(family)
    x, cond = inputs(family)
    out = d_teacher.prediction_type
    new = {n for n, _ in d_student.backbone.model.named_parameters()} - {n for n, _ in model.named_parameters()}
    assert new == {f"{PREFIX}.linear_1.weight", f"{PREFIX}.linear_1.bias", f"{PREFIX}.linear_2.weight"}
    assert len(d_student.trainable_parameters()) == len(list(model.parameters())) + 3
    embedding = embedding_of(d_student.backbone.model)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    def loss():
        return (predict(d_student, x, T, cond, r=R, out=out) - target).pow(2).mean()

    before = loss()
    before.backward()
    assert all(p.grad is not None for p in embedding.parameters())
    assert embedding.linear_2.weight.grad.abs().max() > 0     # linear_1's is zero while linear_2 is
    torch.optim.Adam(embedding.parameters(), lr=1e-2).step()
    embedding.zero_grad()
    after = loss()
    after.backward()
    assert after < before
    assert all(p.grad.abs().max() > 0 for p in embedding.parameters())
    with torch.no_grad():
        ref = d_teacher(x, T, cond, out)
        assert torch.equal(predict(d_student, x, T, cond, out=out), ref)        # no r: the hook adds nothing
        assert rel(predict(d_student, x, T, cond, r=T, out=out), ref) < 1e-5   # r = t: e(0) - e(0)
        moved = predict(d_student, x, T, cond, r=R, out=out) - predict(d_student, x, T, cond, r=R / 2, out=out)
        assert moved.abs().max() > 1e-3 * ref.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_jvp_equals_finite_differences_and_reverse_mode(family):
    d = student(family, std=0.05)
    d.backbone.model.double()
    x, cond = inputs(family, torch.float64)
    g = torch.Generator().manual_seed(3)
    h = {"x": 1e-4, "t": 2.0 ** -14, "r": 2.0 ** -14}
    v = {"x": (torch.randn(x.shape, generator=g, dtype=torch.float64), 0.0, 0.0),
         "t": (torch.zeros_like(x), torch.tensor([1.0, 0.5]), 0.0),
         "r": (torch.zeros_like(x), 0.0, torch.tensor([1.0, -0.5]))}
    f = lambda s, dx, dt, dr: predict(continuous(d), x + s * dx, T + s * dt, cond, r=R + s * dr,  # noqa: E731
                                      dtype=torch.float64)
    xs, ts, rs = x.clone().requires_grad_(), T.clone().requires_grad_(), R.clone().requires_grad_()
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with jvp_attention():
        y = predict(continuous(d), xs, ts, cond, r=rs, dtype=torch.float64)
        gx, gt, gr = torch.autograd.grad((y * w).sum(), (xs, ts, rs))
    for name, (dx, dt, dr) in v.items():
        with torch.no_grad():
            y_jvp, dy = jvp(d, x, T, cond, dx, dt, r=R, dr=dr, dtype=torch.float64)
            with jvp_attention():
                fd = (f(h[name], dx, dt, dr) - f(-h[name], dx, dt, dr)) / (2 * h[name])
        assert torch.allclose(y_jvp, y, rtol=0, atol=1e-10)
        assert fd.abs().max() > 1e-3, f"{name}: a direction the output does not depend on tests nothing"
        assert rel_l2(dy, fd) < FD_RTOL, f"{family} d/d{name}: |jvp - fd| / |fd| = {rel_l2(dy, fd):.2e}"
        reverse = (gx * dx).sum() + (gt.double() * dt).sum() + (gr.double() * dr).sum()
        assert abs(float((dy * w).sum() - reverse)) < AD_RTOL * float(reverse.abs()), f"{family} d/d{name}"


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_jvp_is_close_to_fp32(family):
    d32 = student(family, std=0.05)
    d16 = denoiser_of(copy.deepcopy(d32.backbone.model).to(torch.bfloat16), teacher(family)[1])
    x, cond = inputs(family)
    t = torch.tensor([0.448, 0.8])    # 1000 t is bf16-exact: Flux's bf16 time is the fp32 one
    zero = torch.zeros_like(x)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    for dx, dt, dr in [(noise, 0.0, 0.0), (zero, 1.0, 0.0), (zero, 0.0, 1.0)]:
        with torch.no_grad():
            y32, dy32 = jvp(d32, x, t, cond, dx, dt, r=R, dr=dr)
            y16, dy16 = jvp(d16, x, t, cond, dx, dt, r=R, dr=dr)
        assert y16.dtype == dy16.dtype == torch.float32 and torch.isfinite(dy16).all()
        assert rel_l2(y16, y32) < BF16_RTOL and rel_l2(dy16, dy32) < BF16_RTOL, (dt, dr)


def test_jvp_without_r_and_continuous_time():
    """A one-time JVP needs no embedding; VP timesteps are unrounded (a zero t tangent otherwise), flow ones kept."""
    model, sched, cond, shape = teacher("unet2d")
    d = denoiser_of(model, sched)
    assert float(d.schedule.timestep(torch.tensor(0.4))) == 400.0
    assert float(continuous(d).schedule.timestep(torch.tensor(0.4))) == pytest.approx(0.4 * 999)
    flow = teacher("sd3")[1]
    assert float(continuous(denoiser_of(teacher("sd3")[0], flow)).schedule.timestep(torch.tensor(0.4))) == 400.0
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, dy = jvp(d, x, T, cond, torch.zeros_like(x), 1.0, out="v_prediction")
        with jvp_attention():
            assert torch.equal(y, predict(continuous(d), x, T, cond, out="v_prediction")) and dy.abs().max() > 0
    with pytest.raises(ValueError, match="dr given without r"):
        jvp(d, x, T, cond, torch.zeros_like(x), 1.0, dr=1.0)


def test_jvp_primal_and_tangent_reach_the_parameters():
    """MeanFlow's loss is on the primal ``u`` (its target detaches the tangent): both keep their graphs."""
    d = student("unet2d", std=0.05)
    x, cond = inputs("unet2d")
    embedding = embedding_of(d.backbone.model)
    y, dy = jvp(d, x, T, cond, torch.zeros_like(x), 1.0, r=R, out="flow_prediction")
    assert y.requires_grad and dy.requires_grad
    (y - dy.detach()).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in embedding.parameters())


def test_copies_and_state_dicts_carry_the_embedding():
    d = student("unet2d", std=0.05)
    x, cond = inputs("unet2d")
    with torch.no_grad():
        ref = predict(d, x, T, cond, r=R)
        copied = denoiser_of(copy.deepcopy(d.backbone.model), teacher("unet2d")[1])
        assert torch.equal(predict(copied, x, T, cond, r=R), ref)
        embedding_of(copied.backbone.model).linear_2.weight.mul_(2)   # the copy's hook is bound to the copy
        assert not torch.equal(predict(copied, x, T, cond, r=R), ref)
        assert torch.equal(predict(d, x, T, cond, r=R), ref)
        fresh = denoiser_of(copy.deepcopy(teacher("unet2d")[0]), teacher("unet2d")[1])
        assert attach(fresh.backbone) is attach(fresh.backbone)       # idempotent: one embedding, one hook
        state = d.backbone.model.state_dict()
        assert sum(k.startswith(f"{PREFIX}.") for k in state) == 3
        fresh.backbone.model.load_state_dict(state)
        assert torch.equal(predict(fresh, x, T, cond, r=R), ref)


def test_guidance_embedded_sana_hooks_its_timestep_embedder():
    """Sana-Sprint-style models sum a timestep and a guidance embedding: r goes with the timestep's."""
    from diffusers import SanaTransformer2DModel

    model, sched, cond, shape = teacher("sana")
    torch.manual_seed(0)
    guided = SanaTransformer2DModel.from_config(model.config, guidance_embeds=True).eval()
    cond = Cond(text=cond.text, text_mask=cond.text_mask, guidance=torch.full((2,), 2.0))
    d_teacher, d = denoiser_of(guided, sched), denoiser_of(copy.deepcopy(guided), sched)
    embedding = attach(d.backbone)
    assert d.backbone.time_embedding == "time_embed.timestep_embedder"
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = d_teacher(x, T, cond)
        assert torch.equal(predict(d, x, T, cond, r=R), ref)
        torch.nn.init.normal_(embedding.linear_2.weight, std=0.05)
        assert not torch.allclose(predict(d, x, T, cond, r=R), ref) and torch.equal(predict(d, x, T, cond), ref)


def test_one_time_models_refuse_r():
    model, sched, cond, shape = teacher("unet2d")
    x = torch.randn(2, *shape)
    with pytest.raises(ValueError, match="one-time model"):
        predict(denoiser_of(model, sched), x, T, cond, r=R)
    with pytest.raises(ValueError, match="declares no time_embedding"):
        attach(BackboneAdapter(copy.deepcopy(model), "v_prediction"))
    d = student("unet2d")
    with pytest.raises(ValueError, match="batch 2"), offset(d.backbone, torch.zeros(3), torch.zeros(3), 3):
        d(x, T, cond)       # r for 3 samples, a backbone call on 2 (a CFG-doubled call needs r doubled)


@pytest.mark.parametrize("mask", [None, "bool"])
def test_math_sdpa_jvp_is_plain_attention(mask):
    """The attention every processor calls, under ``jvp_attention``, against softmax(Q K^T / sqrt(d)) V."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(6))
    m = None
    if mask:
        m = torch.ones(2, 1, 1, 5, dtype=torch.bool)
        m[0, ..., 3:] = False

    def plain(q, k, v):
        s = q @ k.transpose(-1, -2) / 8 ** 0.5
        return (s if m is None else s.masked_fill(~m, float("-inf"))).softmax(-1) @ v

    with jvp_attention():
        y, dy = torch.func.jvp(lambda *a: F.scaled_dot_product_attention(*a, attn_mask=m), (q, k, v), (dq, dk, dv))
    y_ref, dy_ref = torch.func.jvp(plain, (q, k, v), (dq, dk, dv))
    assert torch.allclose(y, y_ref, atol=1e-12) and torch.allclose(dy, dy_ref, atol=1e-12)
