"""Backbone adapters, prompt encoders and latent codecs against the stock diffusers pipelines.

Every family's tiny stock pipeline is run for a few CFG steps with a forward hook on its backbone that
records each call (inputs, keyword arguments, output). The tests then check, at exactly those inputs:

- the Cond from ``PromptEncoder`` is what the pipeline passed (text, pooled, masks, ids, guidance);
- the pipeline's timestep is ``schedule.timestep(t)`` for the scheduler's ``t`` (Flux: divided by 1000);
- ``Denoiser(adapter_for(model, prediction_type_of(sched)), from_diffusers(sched))(x_t, t, cond)``
  equals the stock scheduler's x0 (DDIM/Euler ``pred_original_sample``, DPM-Solver
  ``convert_model_output``, flow ``x_t - sigma * u``) computed from the pipeline's own backbone output;
- the feature tap gives ``[B, feature_channels(), *grid]``;
- ``LatentCodec.decode`` reproduces the pipeline's decoded output from its latents.
"""
from __future__ import annotations

import pytest
import tiny_models
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from fewstep.backbones import adapter_for
from fewstep.backbones.encoders import LatentCodec, PromptEncoder
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.parameterization import to_x0
from fewstep.core.schedules import RectifiedFlow, from_diffusers, prediction_type_of

PROMPTS = ["a red cat", "two dogs on grass"]
STEPS = 3
GUIDANCE = 2.0      # the pipelines' guidance_scale (Flux: the guidance embedding's input)
SIZE = dict(height=32, width=32)
# Extra pipeline arguments: the tiny transformers' sample sizes are not in PixArt/Sana's resolution bins;
# Flux runs "true CFG" (a separate unconditional call) so its null cond is checked too.
CALL = {"pixart": dict(use_resolution_binning=False), "sana": dict(use_resolution_binning=False),
        "flux": dict(negative_prompt=[""] * len(PROMPTS), true_cfg_scale=2.0), "wan": dict(num_frames=5)}
# Cond field -> the backbone keyword argument the pipeline passes it as.
PASSED = {
    "sd15": {"text": "encoder_hidden_states"},
    "sdxl": {"text": "encoder_hidden_states", "pooled": "added_cond_kwargs.text_embeds",
             "added.time_ids": "added_cond_kwargs.time_ids"},
    "sd3": {"text": "encoder_hidden_states", "pooled": "pooled_projections"},
    "flux": {"text": "encoder_hidden_states", "pooled": "pooled_projections", "guidance": "guidance",
             "added.txt_ids": "txt_ids"},
    "pixart": {"text": "encoder_hidden_states", "text_mask": "encoder_attention_mask"},
    "sana": {"text": "encoder_hidden_states", "text_mask": "encoder_attention_mask"},
    "wan": {"text": "encoder_hidden_states"},
}
FAMILIES = list(tiny_models.FAMILIES)
_PIPES: dict = {}


def pipe_of(family: str, flow_euler: bool = False):
    """The tiny stock pipeline of a family (built once). ``flow_euler`` swaps Sana's/Wan's flow-sigma
    multistep scheduler for FlowMatchEulerDiscrete, whose timesteps are exactly ``sigma * 1000``."""
    key = (family, flow_euler)
    if key not in _PIPES:
        pipe = tiny_models.FAMILIES[family]()
        pipe.set_progress_bar_config(disable=True)
        if flow_euler:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        _PIPES[key] = pipe
    return _PIPES[key]


def backbone(pipe):
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def run(family: str, pipe, output_type: str = "latent"):
    """Run the pipeline with CFG; return (output, recorded backbone calls as (args, kwargs, output))."""
    calls = []
    hook = backbone(pipe).register_forward_hook(
        lambda _m, args, kwargs, out: calls.append((args, kwargs, out[0].detach().clone())), with_kwargs=True)
    try:
        out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type=output_type,
                   generator=torch.Generator().manual_seed(0), **SIZE, **CALL.get(family, {}))
    finally:
        hook.remove()
    return out, calls


def _get(obj, dotted: str):
    for name in dotted.split("."):
        obj = obj[name] if isinstance(obj, dict) else getattr(obj, name)
    return obj


def call_conds(family: str, enc: PromptEncoder) -> list[Cond]:
    """The Cond of each backbone call within one step: one [uncond, cond] batch, or two separate calls."""
    cond, null = enc.encode(PROMPTS), enc.null(len(PROMPTS))
    return [cond, null] if family in ("flux", "wan") else [Cond.cat(null, cond)]


def model_io(family: str, pipe, call):
    """(x_t [B, C, ...], timestep as passed, raw output [B, C, ...]) of one recorded call, Flux unpacked."""
    args, kwargs, out = call
    x = args[0] if args else kwargs["hidden_states"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    if family == "flux":
        unpack = lambda v: pipe._unpack_latents(v, SIZE["height"], SIZE["width"], pipe.vae_scale_factor)  # noqa: E731
        x, out = unpack(x), unpack(out)
    return x, timestep, out


def continuous_t(sched, i: int) -> float:
    """The scheduler's i-th time as fewstep's continuous t (VP: timestep / 999, flow: sigma)."""
    if from_diffusers(sched).kind == "flow":
        return float(sched.sigmas[i])
    return float(sched.timesteps[i]) / (sched.config.num_train_timesteps - 1)


def reference_x0(sched, out, timestep, x, t: float):
    """x0 as the stock scheduler computes it from the backbone output ``out`` at input ``x``."""
    ref = type(sched).from_config(sched.config)
    ts = timestep.flatten()[0]
    if isinstance(sched, FlowMatchEulerDiscreteScheduler):
        return x - t * out
    ref.set_timesteps(STEPS)
    if isinstance(sched, DDIMScheduler):
        return ref.step(out, ts, x).pred_original_sample
    if isinstance(sched, EulerDiscreteScheduler):       # its UNet input is x / sqrt(sigma^2 + 1)
        sigma = ref.sigmas[ref.index_for_timestep(ts)]
        return ref.step(out, ts, x * (sigma ** 2 + 1).sqrt()).pred_original_sample
    ref._init_step_index(ts)
    return ref.convert_model_output(out, sample=x)


@pytest.mark.parametrize("family", FAMILIES)
def test_cond_is_what_the_pipeline_passes(family):
    pipe = pipe_of(family)
    _, calls = run(family, pipe)
    conds = call_conds(family, PromptEncoder(pipe, guidance_scale=GUIDANCE))
    assert len(calls) == STEPS * len(conds)
    for call, cond in zip(calls, conds * STEPS):
        for field, kwarg in PASSED[family].items():
            ours, theirs = _get(cond, field), _get(call[1], kwarg)
            if field == "added.txt_ids":            # kept per sample in the Cond, passed once
                ours = ours[0]
            # bit-equal up to batch-size-dependent rounding (the null is encoded once, at batch 1)
            torch.testing.assert_close(ours.to(theirs.dtype), theirs, rtol=1e-6, atol=1e-6, msg=f"{family} {field}")


@pytest.mark.parametrize("family", FAMILIES)
def test_denoiser_x0_matches_stock_scheduler(family):
    pipe = pipe_of(family, flow_euler=family in ("sana", "wan"))
    _, calls = run(family, pipe)
    sched = pipe.scheduler
    denoiser = Denoiser(adapter_for(backbone(pipe), prediction_type_of(sched)), from_diffusers(sched))
    conds = call_conds(family, PromptEncoder(pipe, guidance_scale=GUIDANCE))
    for i in range(STEPS):
        t = continuous_t(sched, i)
        for call, cond in zip(calls[i * len(conds):], conds):
            x, timestep, out = model_io(family, pipe, call)
            # the timestep pin: the pipeline passes schedule.timestep(t) (Flux: / 1000, the model's scale)
            expected = denoiser.schedule.timestep(torch.tensor(t)) / (1000 if family == "flux" else 1)
            torch.testing.assert_close(timestep.float().expand(len(x)), expected.expand(len(x)), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(timestep.flatten()[0].float(), sched.timesteps[i].float()
                                       / (1000 if family == "flux" else 1))
            with torch.no_grad():
                x0 = denoiser(x, torch.tensor(t), cond)
            c = x.shape[1]                      # learned-sigma models: the pipeline keeps the first C channels
            ref = reference_x0(sched, out[:, :c], timestep, x, t)
            # 1e-5 relative to the x0 scale: at t = 1, VP x0 = (x_t - sigma eps) / alpha with alpha ~ 0.006
            # (PixArt's linear betas) magnifies float32 rounding of x_t and eps 150-fold
            err = (x0 - ref.float()).abs().max() / ref.abs().max().clamp_min(1.0)
            assert err < 1e-5, f"{family} step {i}: x0 differs from the stock scheduler's by {err:.2e} (relative)"


@pytest.mark.parametrize("family", ["sana", "wan"])
def test_flow_sigma_schedulers_timesteps(family):
    """Sana's DPM-Solver and Wan's UniPC with ``use_flow_sigmas`` pass ``int(sigma * 1000)`` (truncated)."""
    sched = type(pipe_of(family).scheduler).from_config(pipe_of(family).scheduler.config)
    sched.set_timesteps(STEPS)
    expected = RectifiedFlow().timestep(sched.sigmas[:-1]).floor()
    assert (sched.timesteps.float() == expected).all()


@pytest.mark.parametrize("family", ["sana", "wan"])
def test_flow_sigma_schedulers_x0(family):
    """With ``use_flow_sigmas`` the multistep solvers' x0 is ``x_t - sigma * u``, rectified flow's."""
    sched = type(pipe_of(family).scheduler).from_config(pipe_of(family).scheduler.config)
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i in range(STEPS):
        sched._step_index = i
        ref = sched.convert_model_output(u, sample=x)
        x0 = to_x0(u, x, sched.sigmas[i].expand(2), prediction_type_of(sched), RectifiedFlow())
        torch.testing.assert_close(x0, ref)


@pytest.mark.parametrize("family", ["sana", "wan"])
def test_from_diffusers_flow_sigma_schedulers(family):
    assert from_diffusers(pipe_of(family).scheduler).kind == "flow"


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_tap(family):
    pipe = pipe_of(family)
    adapter = adapter_for(backbone(pipe), prediction_type_of(pipe.scheduler))
    enc, codec = PromptEncoder(pipe), LatentCodec(pipe)
    shape = codec.latent_shape(**SIZE, num_frames=5 if family == "wan" else None)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), adapter.tap() as feats:
        out = adapter(x, torch.tensor([500.0, 250.0]), enc.encode(PROMPTS))
    assert out.shape == x.shape
    assert len(feats) == 1 and feats[0].shape[:2] == (2, adapter.feature_channels())
    if adapter.feature_modules != ("mid_block",):       # transformers: the token grid of the latents
        patch = {"flux": 2, "wan": 2}.get(family, getattr(backbone(pipe).config, "patch_size", 1))
        assert feats[0].shape[-2:] == (shape[-2] // patch, shape[-1] // patch)


@pytest.mark.parametrize("family", FAMILIES)
def test_features_stop_at_the_tap_and_equal_the_whole_pass(family):
    """``Denoiser.features`` ends the pass at the tapped block (the discriminator's real-image pass): the
    features and every parameter's gradient equal those of the whole pass; the modules after the tap never run."""
    pipe = pipe_of(family)
    model = backbone(pipe)
    denoiser = Denoiser(adapter_for(model, prediction_type_of(pipe.scheduler)), from_diffusers(pipe.scheduler))
    cond = PromptEncoder(pipe).encode(PROMPTS)
    shape = LatentCodec(pipe).latent_shape(**SIZE, num_frames=5 if family == "wan" else None)
    x, t = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5, 0.25])

    def grads(run):
        model.zero_grad(set_to_none=True)
        f = run()
        f.square().mean().backward()
        return f.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with denoiser.backbone.tap() as whole:
        ref, ref_g = grads(lambda: (denoiser(x, t, cond), whole[-1])[1])
    last = getattr(model, "conv_out", None) or model.proj_out     # the output projection, after every tapped block
    calls = []
    hook = last.register_forward_hook(lambda *_: calls.append(1))
    try:
        out, out_g = grads(lambda: denoiser.features(x, t, cond)[-1])
    finally:
        hook.remove()
    model.zero_grad(set_to_none=True)
    assert calls == [] and denoiser.backbone.can_stop_early()
    assert torch.equal(out, ref) and out_g.keys() == ref_g.keys()
    assert all(torch.equal(out_g[n], ref_g[n]) for n in ref_g)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_backbone_with_fp32_conds(family):
    """A bf16 teacher with fp32 text encoders: the adapter casts the cond like the pipelines do."""
    pipe = tiny_models.FAMILIES[family]()
    cond = PromptEncoder(pipe).encode(PROMPTS)
    model = backbone(pipe).to(torch.bfloat16)
    denoiser = Denoiser(adapter_for(model, prediction_type_of(pipe.scheduler)), from_diffusers(pipe.scheduler))
    x = torch.randn(2, *LatentCodec(pipe).latent_shape(**SIZE, num_frames=5 if family == "wan" else None))
    with torch.no_grad():
        x0 = denoiser(x, torch.tensor([0.3, 0.8]), cond)
    assert x0.dtype == torch.float32 and torch.isfinite(x0).all()


def test_pixart_micro_conditions_and_learned_sigma():
    """The 1024 px PixArt layout: resolution/aspect-ratio conditions reach the model; 2C outputs are split."""
    pipe = tiny_models.pixart(learned_sigma=True, additional_conditions=True)
    enc = PromptEncoder(pipe, height=48, width=32)
    cond = enc.encode(PROMPTS)
    assert cond.added["resolution"].tolist() == [[48.0, 32.0]] * 2
    assert cond.added["aspect_ratio"].tolist() == [[1.5]] * 2
    adapter = adapter_for(pipe.transformer, "epsilon")
    x, ts = torch.randn(2, 4, 12, 8), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        out = adapter(x, ts, cond)
        full = pipe.transformer(x, encoder_hidden_states=cond.text, encoder_attention_mask=cond.text_mask,
                                timestep=ts, added_cond_kwargs=cond.added, return_dict=False)[0]
        other = adapter(x, ts, Cond(text=cond.text, text_mask=cond.text_mask,
                                    added={"resolution": cond.added["resolution"] * 2,
                                           "aspect_ratio": cond.added["aspect_ratio"]}))
    assert full.shape[1] == 8 and out.shape == x.shape
    torch.testing.assert_close(out, full[:, :4])
    assert not torch.allclose(out, other)
    with pytest.raises(ValueError, match="micro-conditions"):
        adapter(x, ts, Cond(text=cond.text, text_mask=cond.text_mask))


def test_flux_packing_round_trip_and_guidance():
    from fewstep.backbones.flux import image_ids, pack, unpack

    pipe = pipe_of("flux")
    x = torch.randn(2, 4, 6, 10)
    packed = pack(x)
    torch.testing.assert_close(packed, pipe._pack_latents(x, 2, 4, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack(packed, 6, 10), x, rtol=0, atol=0)
    torch.testing.assert_close(image_ids(3, 5, "cpu", torch.float32),
                               pipe._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    adapter = adapter_for(pipe.transformer, "flow_prediction")
    cond = PromptEncoder(pipe, guidance_scale=5.0).encode(PROMPTS)
    assert cond.guidance.tolist() == [5.0, 5.0]
    with pytest.raises(ValueError, match="guidance-distilled"):
        adapter(x, torch.tensor([500.0, 500.0]), Cond(text=cond.text, pooled=cond.pooled))


@pytest.mark.parametrize("family", FAMILIES)
def test_codec_decode_matches_pipeline(family):
    """``LatentCodec.decode`` of the pipeline's final latents equals the pipeline's decoded output."""
    pipe = pipe_of(family)
    (latents, _), (decoded, _) = run(family, pipe, "latent"), run(family, pipe, "pt")
    latents, decoded = _output(latents), _output(decoded)
    if family == "flux":
        latents = pipe._unpack_latents(latents, SIZE["height"], SIZE["width"], pipe.vae_scale_factor)
    codec = LatentCodec(pipe)
    with torch.no_grad():
        x = (codec.decode(latents) / 2 + 0.5).clamp(0, 1)
    if family == "wan":                             # WanPipeline returns frames [B, F, C, H, W]
        x = x.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(x, decoded.float(), rtol=1e-5, atol=1e-5)


def _output(out):
    return out.frames if hasattr(out, "frames") else out.images


@pytest.mark.parametrize("family", FAMILIES)
def test_codec_round_trip_shapes(family):
    pipe = pipe_of(family)
    codec = LatentCodec(pipe)
    video = family == "wan"
    x = torch.rand(2, 3, *((5,) if video else ()), 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = codec.encode(x, sample=False)
        assert z.shape == (2, *codec.latent_shape(32, 32, 5 if video else None))
        assert codec.decode(z).shape == x.shape
    torch.testing.assert_close(codec.normalize(codec.denormalize(z)), z)
    z1 = codec.encode(x, generator=torch.Generator().manual_seed(1))
    z2 = codec.encode(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_encoder_batches_and_null(family):
    enc = PromptEncoder(pipe_of(family))
    cond, null = enc.encode(PROMPTS), enc.null(3)
    assert cond.text.shape[0] == 2 and null.text.shape[0] == 3
    both = Cond.cat(cond, null[:2])                 # batchable with its own null (CFG in one pass)
    assert both.text.shape[0] == 4
    single = enc.encode(PROMPTS[:1])
    torch.testing.assert_close(single.text, cond.text[:1], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):
        enc.encode("a red cat")
