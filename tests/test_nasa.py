"""NASA, Negative-Away Steer Attention (SNOOPI, arXiv 2412.02687): ``fewstep_pipelines.nasa_fewstep``.

Each cross-attention layer returns to_out(Attn(Q, K+, V+) - alpha Attn(Q, K-, V-)): checked against that formula
written out here on fixed tensors; alpha = 0 is the stock pipeline bit for bit and switching off restores it, on
tiny SD1.5 (UNet) and PixArt (a DiT with text masks); a negative prompt equal to the positive one with alpha = 1
removes the text from every cross-attention layer exactly as zeroed values do; joint-attention families (SD3,
Flux) get a one-line error; text-to-image exports carry the file, which works loaded from the folder.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import tiny_models
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from fewstep_pipelines import nasa_fewstep as N

from fewstep.run.folders import NASA_FILE, save_student_pipeline

PROMPTS = ["a red cat", "a blue dog"]
CALL = {"sd15": {"num_inference_steps": 1},      # PixArt's pipeline reads x0 off its scheduler at 1 step
        "pixart": {"num_inference_steps": 2, "use_resolution_binning": False}}


def explicit(attn, x, e_pos, e_neg, alpha, bias_pos=None, bias_neg=None, across_heads=False):
    """to_out(Z+ - alpha Z-), each Z = softmax(Q K^T / sqrt(d) + mask) V per head, written out."""
    H = attn.heads

    def heads(t):
        return t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2)

    q = attn.to_q(x)
    q = heads(attn.norm_q(q)) if across_heads else attn.norm_q(heads(q))

    def Z(e, bias):
        k, v = attn.to_k(e), heads(attn.to_v(e))
        k = heads(attn.norm_k(k)) if across_heads else attn.norm_k(heads(k))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias[:, None]
        z = logits.softmax(-1) @ v
        return z.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)

    return attn.to_out[0](Z(e_pos, bias_pos) - alpha * Z(e_neg, bias_neg))


@pytest.mark.parametrize("stock,qk_norm,across", [(AttnProcessor2_0, "rms_norm", False),   # q/k norm per head
                                                  (SanaAttnProcessor2_0, "rms_norm_across_heads", True)])
def test_layer_is_the_papers_formula(stock, qk_norm, across):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, kv_heads=2, dim_head=8, qk_norm=qk_norm,
                     processor=stock()).eval()
    with torch.no_grad():       # a visible output bias: alpha applied after the projection would differ
        attn.to_out[0].bias.normal_()
        for norm in (attn.norm_q, attn.norm_k):
            norm.weight.uniform_(0.5, 1.5)
    x, e_pos, e_neg = torch.randn(2, 6, 16), torch.randn(2, 5, 12), torch.randn(2, 3, 12)
    bias = torch.zeros(2, 1, 8)
    bias[0, 0, 3:5] = bias[1, 0, 6:] = -10000.0      # text padding masked in each part (PixArt, Sana)
    state = N.NASAState(0.7, e_neg)
    nasa = N.NASAAttnProcessor(attn.processor, state, N.SUPPORTED[stock.__name__])
    with torch.no_grad():
        got = nasa(attn, x, torch.cat([e_pos, e_neg], 1), bias)
        want = explicit(attn, x, e_pos, e_neg, 0.7, bias[..., :5], bias[..., 5:], across)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        state.alpha = 0.0       # alpha = 0: the stock layer on the positive prompt, bit for bit
        assert torch.equal(nasa(attn, x, torch.cat([e_pos, e_neg], 1), bias), attn(x, e_pos, bias[..., :5]))


def test_wan_layer_is_the_papers_formula():
    torch.manual_seed(0)
    attn = WanAttention(dim=24, heads=2, dim_head=12, cross_attention_dim_head=12, processor=WanAttnProcessor()).eval()
    x, e_pos, e_neg = torch.randn(2, 7, 24), torch.randn(2, 4, 24), torch.randn(2, 4, 24)
    nasa = N.NASAAttnProcessor(attn.processor, N.NASAState(0.0, e_neg), N.SUPPORTED["WanAttnProcessor"])
    with torch.no_grad():
        assert torch.equal(nasa(attn, x, torch.cat([e_pos, e_neg], 1)), attn(x, e_pos))
        nasa.state.alpha = 0.4
        # to_out is affine: to_out(Z+ - a Z-) = out(+) - a (out(-) - bias), with out(.) the stock layer
        want = attn(x, e_pos) - 0.4 * (attn(x, e_neg) - attn.to_out[0].bias)
        torch.testing.assert_close(nasa(attn, x, torch.cat([e_pos, e_neg], 1)), want, rtol=1e-5, atol=1e-5)


def sample(pipe, family, prompts=PROMPTS):
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, guidance_scale=1.0, height=32, width=32, generator=gens,
                output_type="pt", **CALL[family]).images


@pytest.fixture(scope="module")
def pipes():
    out = {f: tiny_models.FAMILIES[f]() for f in CALL}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


@pytest.mark.parametrize("family", list(CALL))
def test_alpha_zero_is_stock_and_switching_off_restores(pipes, family):
    pipe = pipes[family]
    backbone = pipe.unet if family == "sd15" else pipe.transformer
    before = {k: type(v) for k, v in backbone.attn_processors.items()}
    stock = sample(pipe, family)
    with N.nasa(pipe, negative_prompt="a blue dog", nasa_alpha=0.0):
        assert sum(isinstance(p, N.NASAAttnProcessor) for p in backbone.attn_processors.values()) == \
            len(N.cross_attention_layers(backbone)) > 0
        assert torch.equal(sample(pipe, family), stock)
    N.enable_nasa(pipe, "a blue dog", 0.8)
    steered = sample(pipe, family)
    N.disable_nasa(pipe)
    assert (steered - stock).abs().max() > 1e-5      # random tiny models: a small but real change
    assert {k: type(v) for k, v in backbone.attn_processors.items()} == before
    assert torch.equal(sample(pipe, family), stock)


@pytest.mark.parametrize("family", list(CALL))
def test_negative_equal_to_positive_removes_the_text(pipes, family):
    """Z+ - 1 * Z- = 0 when both prompts are the same: every cross-attention layer then returns its output bias,
    as the stock pipeline does with each layer's values zeroed. Fails if the negative is encoded, projected
    (PixArt's caption projection) or masked unlike the positive."""
    pipe = pipes[family]
    backbone = pipe.unet if family == "sd15" else pipe.transformer
    with N.nasa(pipe, negative_prompt=PROMPTS[0], nasa_alpha=1.0):
        got = sample(pipe, family, PROMPTS[:1])
    saved = {k: v.clone() for k, v in backbone.state_dict().items()}
    with torch.no_grad():
        for layer in N.cross_attention_layers(backbone).values():
            for p in layer.to_v.parameters():
                p.zero_()
    try:
        want = sample(pipe, family, PROMPTS[:1])
    finally:
        backbone.load_state_dict(saved)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - sample(pipe, family, PROMPTS[:1])).abs().max() > 1e-5     # the text mattered


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_families_are_refused(family):
    pipe = tiny_models.FAMILIES[family]()
    before = {k: v for k, v in pipe.transformer.attn_processors.items()}
    with pytest.raises(ValueError) as e:
        N.enable_nasa(pipe, "a cat", 0.5)
    assert "joint attention" in str(e.value) and "\n" not in str(e.value)
    assert pipe.transformer.attn_processors == before and not N.cross_attention_layers(pipe.transformer)
    with pytest.raises(ValueError, match="nasa_alpha"):
        N.enable_nasa(tiny_models.sd15(), "a cat", None)


def test_export_carries_nasa_and_it_runs_from_the_folder(pipes, teachers, tmp_path):
    pipe = pipes["sd15"]
    out = save_student_pipeline(teachers("sd15"), tmp_path / "student", {"unet": pipe.unet}, pipe.scheduler)
    assert (out / NASA_FILE).read_bytes() == Path(N.__file__).read_bytes()
    spec = importlib.util.spec_from_file_location("nasa_from_folder", out / NASA_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    loaded = StableDiffusionPipeline.from_pretrained(out).to(torch.float32)
    loaded.set_progress_bar_config(disable=True)
    with N.nasa(pipe, negative_prompt="a blue dog", nasa_alpha=0.5):
        want = sample(pipe, "sd15")
    with mod.nasa(loaded, negative_prompt="a blue dog", nasa_alpha=0.5):
        got = sample(loaded, "sd15")
    assert torch.equal(got, want)
