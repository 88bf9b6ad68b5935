"""Noise processes and output conversions: round trips, stock-scheduler agreement, transitions."""
import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from fewstep.core.parameterization import PREDICTION_TYPES, convert, to_x0
from fewstep.core.schedules import RectifiedFlow, TrigFlow, VPDiscrete, from_diffusers, prediction_type_of
from fewstep.core.timesteps import from_timesteps

BETAS = [dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
         dict(beta_schedule="squaredcos_cap_v2")]


def schedules():
    return [VPDiscrete.from_betas(**{k: v for k, v in b.items()}) for b in BETAS] + [RectifiedFlow(), TrigFlow()]


@pytest.mark.parametrize("s", schedules(), ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("src,dst", list(itertools.permutations(PREDICTION_TYPES, 2)))
def test_conversions_round_trip(s, src, dst):
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    back = convert(convert(out, x_t, t, s, src, dst), x_t, t, s, dst, src)
    torch.testing.assert_close(back, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("s", schedules(), ids=lambda s: type(s).__name__)
def test_every_output_type_recovers_x0(s):
    """Outputs built from a known (x0, eps) by their definitions convert back to that x0."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    a, sg = s.alpha(t).view(-1, 1, 1, 1), s.sigma(t).view(-1, 1, 1, 1)
    da, ds = s.d_alpha(t).view(-1, 1, 1, 1), s.d_sigma(t).view(-1, 1, 1, 1)
    x_t = a * x0 + sg * eps
    outs = {"sample": x0, "epsilon": eps, "v_prediction": a * eps - sg * x0, "flow_prediction": da * x0 + ds * eps}
    for kind, out in outs.items():
        torch.testing.assert_close(to_x0(out, x_t, t, kind, s), x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("betas", BETAS, ids=lambda b: b["beta_schedule"])
def test_add_noise_matches_stock_ddpm(betas):
    stock = DDPMScheduler(**betas)
    s = from_diffusers(stock)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    k = torch.tensor([0, 10, 500, 900, 999])
    torch.testing.assert_close(s.add_noise(x0, eps, k / 999), stock.add_noise(x0, eps, k), rtol=1e-5, atol=1e-5)


def test_vp_derivatives_match_finite_differences():
    s = VPDiscrete.from_betas(beta_schedule="squaredcos_cap_v2")
    t = torch.tensor([0.2501, 0.5003, 0.7502])   # inside grid cells, where the interpolant is smooth
    h = 1e-5
    torch.testing.assert_close(s.d_alpha(t), (s.alpha(t + h) - s.alpha(t - h)) / (2 * h), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(s.d_sigma(t), (s.sigma(t + h) - s.sigma(t - h)) / (2 * h), rtol=2e-2, atol=1e-3)


def test_flow_from_diffusers_and_prediction_type():
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert isinstance(from_diffusers(stock), RectifiedFlow)
    assert prediction_type_of(stock) == "flow_prediction"
    assert prediction_type_of(DDIMScheduler(prediction_type="v_prediction")) == "v_prediction"


def test_transition_marginals():
    """q(x_s | x0) followed by transition to t has the mean and variance of q(x_t | x0)."""
    s = VPDiscrete.from_betas(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(3)
    n = 200_000
    x0 = torch.full((n,), 0.7)
    ts, tt = torch.full((n,), 0.3), torch.full((n,), 0.8)
    x_s = s.add_noise(x0, torch.randn(n, generator=g), ts)
    x_t = s.transition(x_s, ts, tt, torch.randn(n, generator=g))
    # standard error of the mean ~ 1/sqrt(n) = 2.2e-3; of the variance ~ sqrt(2/n) = 3.2e-3
    assert abs(x_t.mean() - s.alpha(tt[0]) * 0.7) < 1e-2
    assert abs(x_t.var() - s.sigma(tt[0]) ** 2) < 1.5e-2


def test_timestep_mapping_and_bad_lists():
    s = VPDiscrete.from_betas()
    t = from_timesteps([999, 749, 499, 249], s)
    assert s.timestep(t).tolist() == [999, 749, 499, 249]
    assert RectifiedFlow().timestep(torch.tensor([1.0, 0.25])).tolist() == [1000.0, 250.0]
    with pytest.raises(ValueError, match="outside"):
        from_timesteps([1500], s)
    with pytest.raises(ValueError, match="descending"):
        from_timesteps([249, 999], s)
    with pytest.raises(ValueError, match="outside"):
        s.check_t(torch.tensor([1.5]))
