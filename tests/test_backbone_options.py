"""``--model.gradient_checkpointing`` and ``--model.attention``: checkpointing changes memory, not results
(gradients equal with and without, for every family's backbone and the digits UNet), and xformers without
its package or a GPU is a one-line ConfigError (exit 2), not a traceback."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from conftest import tiny_class_unet
from test_backbones import PROMPTS, SIZE, backbone

from fewstep.backbones import adapter_for
from fewstep.backbones import options as backbone_options
from fewstep.backbones.encoders import LatentCodec, PromptEncoder
from fewstep.core.conditioning import Cond
from fewstep.core.denoiser import Denoiser
from fewstep.core.schedules import VPDiscrete, from_diffusers, prediction_type_of
from fewstep.errors import ConfigError
from fewstep.run.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def grads(denoiser, x, t, cond):
    """d(sum of squares of x0)/d(x_t) and every parameter's gradient."""
    x = x.clone().requires_grad_(True)
    denoiser.backbone.model.zero_grad(set_to_none=True)
    denoiser(x, t, cond).square().sum().backward()
    return [x.grad] + [p.grad for p in denoiser.backbone.model.parameters() if p.grad is not None]


def checkpointing_matches(model, prediction_type, schedule, x, t, cond):
    model = model.float().train()
    plain = Denoiser(adapter_for(model, prediction_type), schedule)
    ckpt_model = copy.deepcopy(model)
    backbone_options.apply(ckpt_model, ModelConfig(gradient_checkpointing=True))
    assert ckpt_model.is_gradient_checkpointing
    ckpt = Denoiser(adapter_for(ckpt_model, prediction_type), schedule)
    a, b = grads(plain, x, t, cond), grads(ckpt, x, t, cond)
    assert len(a) == len(b) and len(a) > 10
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(tiny_models.FAMILIES))
def test_gradient_checkpointing_keeps_gradients(family):
    torch.manual_seed(0)
    pipe = tiny_models.FAMILIES[family]()
    cond = PromptEncoder(pipe).encode(PROMPTS)
    x = torch.randn(2, *LatentCodec(pipe).latent_shape(**SIZE, num_frames=5 if family == "wan" else None))
    checkpointing_matches(backbone(pipe), prediction_type_of(pipe.scheduler), from_diffusers(pipe.scheduler), x,
                          torch.tensor([0.3, 0.8]), cond)


def test_gradient_checkpointing_class_unet():
    torch.manual_seed(0)
    unet = tiny_class_unet()
    x = torch.randn(2, 1, 8, 8)
    checkpointing_matches(unet, "v_prediction", VPDiscrete.from_betas(1000, beta_schedule="squaredcos_cap_v2"), x,
                          torch.tensor([0.3, 0.8]), Cond(labels=torch.tensor([1, 2])))


def test_unsupported_checkpointing_is_a_config_error():
    class NoCheckpointing(torch.nn.Module):
        _supports_gradient_checkpointing = False

    with pytest.raises(ConfigError, match="NoCheckpointing does not support gradient checkpointing"):
        backbone_options.apply(NoCheckpointing(), ModelConfig(gradient_checkpointing=True))


@pytest.mark.skipif(backbone_options.xformers_problem() is None, reason="xformers usable here")
def test_xformers_without_package_or_gpu_fails_cleanly(tmp_path):
    r = subprocess.run([sys.executable, "train/dmd2.py", "--model.attention", "xformers", "--train.output_dir",
                        str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: model.attention xformers:") and "model.attention sdpa" in line, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_attention_value_is_checked():
    r = subprocess.run([sys.executable, "train/dmd2.py", "--model.attention", "flash", "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "model.attention 'flash' is not valid; use sdpa or xformers" in r.stderr


def dmd2_lora_grads(checkpointing: bool):
    """Both DMD2 turns in LoRA mode (student, critic and teacher on one UNet) -> every adapter's gradient."""
    from fewstep.core.conditioning import Batch
    from fewstep.methods.dmd2 import DMD2, DMD2Config
    from fewstep.run import build as B
    from fewstep.training import loop

    torch.manual_seed(0)
    pipe = tiny_models.sd15()
    unet = pipe.unet.requires_grad_(False)
    cfg = ModelConfig(mode="lora", lora_rank=4, student_timesteps=(999, 499), gan_head=False,
                      gradient_checkpointing=checkpointing)
    backbone_options.apply(unet, cfg)
    teacher = B.Teacher(Denoiser(adapter_for(unet, "epsilon"), from_diffusers(pipe.scheduler)), Path("."), "unet",
                        dict(pipe.scheduler.config))
    torch.manual_seed(1)
    method = DMD2(DMD2Config(guidance_scale=2.0, student_every=1), teacher.denoiser, B.make_student(teacher, cfg),
                  B.make_critic(teacher, cfg))
    enc = PromptEncoder(pipe)
    batch = Batch(noise=torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
                  cond=enc.encode(PROMPTS), uncond=enc.null(2), seeds=torch.arange(2))
    params, out = method.trainable(), []
    for turn in ("critic", "student"):
        loop._set_turn(params, turn)
        loss, _ = method(turn, batch, 2)       # step 2: backward simulation through the first student step
        loss.backward()
        out += [p.grad.clone() for p in params[turn]]
    return out


def test_gradient_checkpointing_in_lora_mode_recomputes_under_the_right_role():
    """One base, three roles: a block recomputed in backward must run the adapter it ran in forward."""
    a, b = dmd2_lora_grads(False), dmd2_lora_grads(True)
    assert len(a) == len(b) > 0 and any(g.abs().sum() > 0 for g in a)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-4)
