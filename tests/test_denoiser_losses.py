"""Denoiser against stock schedulers; CFG; the DMD gradient against its closed form."""
import pytest
import torch
from conftest import tiny_class_unet
from diffusers import DDIMScheduler, UNet2DConditionModel

from fewstep.backbones import adapter_for
from fewstep.core import losses
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.guidance import cfg
from fewstep.core.schedules import from_diffusers


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_denoiser_x0_matches_ddim_pred_original_sample(prediction_type, beta_schedule):
    unet = tiny_class_unet(prediction_type=prediction_type)
    sched = DDIMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=False,
                          beta_start=0.00085, beta_end=0.012)
    d = Denoiser(adapter_for(unet, prediction_type), from_diffusers(sched))
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 1, 8, 8, generator=g)
    labels = torch.tensor([3, 7])
    sched.set_timesteps(4)
    for k in (999, 749, 499, 249, 20):
        with torch.no_grad():
            out = unet(x_t, k, class_labels=labels).sample
            ref = sched.step(out, k, x_t).pred_original_sample
            x0 = d(x_t, torch.tensor(k / 999), Cond(labels=labels))
        torch.testing.assert_close(x0, ref, rtol=1e-5, atol=1e-5)


def test_unet2d_condition_adapter_passes_sdxl_kwargs():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4).eval()
    sched = DDIMScheduler(prediction_type="epsilon", clip_sample=False)
    d = Denoiser(adapter_for(unet, "epsilon"), from_diffusers(sched))
    x_t, text, pooled, ids = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 6)
    cond = Cond(text=text, pooled=pooled, added={"time_ids": ids})
    with torch.no_grad():
        out = unet(x_t, 500, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        torch.testing.assert_close(d(x_t, torch.tensor(500 / 999), cond, out="epsilon"), out)


def test_cfg_is_uncond_plus_w_times_difference():
    unet = tiny_class_unet()
    d = Denoiser(adapter_for(unet, "v_prediction"), from_diffusers(DDIMScheduler(prediction_type="v_prediction")))
    x_t, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.6)
    c, u = Cond(labels=torch.tensor([1, 2, 3])), Cond(labels=torch.tensor([10, 10, 10]))
    with torch.no_grad():
        for out in ("sample", "epsilon"):
            d_c, d_u = d(x_t, t, c, out), d(x_t, t, u, out)
            torch.testing.assert_close(cfg(d, x_t, t, c, u, 2.5, out), d_u + 2.5 * (d_c - d_u), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cfg(d, x_t, t, c, u, 1.0, out), d_c)


def test_denoiser_keeps_gradients_through_frozen_network():
    """SiD needs d x0 / d x_t through a frozen network: the Denoiser must not wrap no_grad."""
    unet = tiny_class_unet().requires_grad_(False)
    d = Denoiser(adapter_for(unet, "v_prediction"), from_diffusers(DDIMScheduler(prediction_type="v_prediction")))
    x_t = torch.randn(2, 1, 8, 8, requires_grad=True)
    d(x_t, torch.full((2,), 0.5), Cond(labels=torch.tensor([0, 1]))).sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0


def test_dmd_gradient_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 5, 5, generator=g, requires_grad=True)
    real, fake = torch.randn(4, 1, 5, 5, generator=g), torch.randn(4, 1, 5, 5, generator=g)
    loss, logs = losses.dmd(x, real, fake)
    loss.backward()
    w = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - real) / w / x.numel()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-8)
    assert torch.isclose(logs["dmd/normalizer"], w.mean())


def test_gan_losses_gradients():
    logit = torch.tensor([0.3, -1.2], requires_grad=True)
    losses.gan_g(logit).backward()
    torch.testing.assert_close(logit.grad, -torch.sigmoid(-logit.detach()) / 2)
    lr, lf = torch.tensor([0.5], requires_grad=True), torch.tensor([-0.4], requires_grad=True)
    losses.gan_d(lr, lf).backward()
    torch.testing.assert_close(lr.grad, -torch.sigmoid(-lr.detach()))
    torch.testing.assert_close(lf.grad, torch.sigmoid(lf.detach()))


def test_dmd_gradient_equals_a_float64_reference_of_the_official_formula():
    """DMD2's gradient (x0_fake - x0_real) / mean|x - x0_real| with the eps -> x0 conversion and the CFG in
    float64, as the official DMD2 computes them, on latent-scale inputs at low noise and a student close to the
    real score's x0 (a small normaliser: where float32 loses digits, by ~1e-4 here). fewstep's Denoiser + cfg +
    losses.dmd must equal it within 1e-5 on identical backbone outputs."""
    from diffusers import DDPMScheduler

    from fewstep.core.guidance import cfg

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    teacher_net = tiny_class_unet(prediction_type="epsilon").requires_grad_(False)
    critic_net = tiny_class_unet(prediction_type="epsilon").requires_grad_(False)
    with torch.no_grad():
        for p in critic_net.parameters():
            p.mul_(1.001)                      # a critic close to the teacher, as after training
    schedule = from_diffusers(sched)
    teacher, critic = (Denoiser(adapter_for(m, "epsilon"), schedule) for m in (teacher_net, critic_net))
    g = torch.Generator().manual_seed(0)
    k = torch.tensor([20, 40, 80, 160])                                           # low noise
    t = k.float() / 999
    x_t = sched.add_noise(torch.randn(4, 1, 8, 8, generator=g) * 4.0, torch.randn(4, 1, 8, 8, generator=g), k)
    labels, null = torch.tensor([1, 2, 3, 4]), torch.full((4,), 10)
    w = 1.75
    abar = sched.alphas_cumprod.double()[k].reshape(-1, 1, 1, 1)
    to_x0 = lambda eps, a: (x_t.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()  # noqa: E731
    with torch.no_grad():      # the same backbone calls as fewstep's (cond and uncond in one batch)
        eps_c, eps_u = teacher_net(torch.cat([x_t, x_t]), torch.cat([k, k]),
                                   class_labels=torch.cat([labels, null])).sample.chunk(2)
        x0_c, x0_u = to_x0(eps_c, abar), to_x0(eps_u, abar)
        real = x0_u + w * (x0_c - x0_u)
        fake = to_x0(critic_net(x_t, k, class_labels=labels).sample, abar)
    # the student's output: near the real score's x0, so the per-sample normaliser is small
    x = (real.float() + 1e-3 * torch.randn(4, 1, 8, 8, generator=g)).requires_grad_(True)
    grad = (fake - real) / (x.detach().double() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    # the official loss 0.5 * mse(x.float(), (x - grad).float()): its gradient carries the float32 target
    official = x.detach() - (x.detach().double() - grad).float()

    loss, _ = losses.dmd(x, cfg(teacher, x_t, t, Cond(labels=labels), Cond(labels=null), w, dtype=torch.float64),
                         critic(x_t, t, Cond(labels=labels), dtype=torch.float64))
    loss.backward()
    torch.testing.assert_close(x.grad * x.numel(), official, rtol=0, atol=1e-5)
