"""NASA (Negative-Away Steer Attention): negative prompts for one- and few-step text-to-image pipelines.

SNOOPI, Nguyen et al., arXiv 2412.02687 (ICCV 2025 as "Supercharged One-step Text-to-Image Diffusion Models
with Negative Prompts"), section "Negative-Away Steer Attention" and its Figure 4: classifier-free guidance on
a one-step generator blends the positive and the negative image, so NASA steers inside the network instead.
In every cross-attention layer l the image queries Q attend to the positive prompt's keys/values and, with the
same queries, to the negative prompt's, and the layer continues with

    Z_NASA = Z+ - alpha * Z-,   Z+ = Attn(Q, K+, V+),   Z- = Attn(Q, K-, V-)

(``nasa_alpha`` = alpha; training-free, one network pass per step). Z is the attention output before the
layer's output projection, as the figure draws it (our reading: the figure names attention outputs; after the
projection the two readings differ only by alpha times the projection's bias). The paper tunes alpha per model
(its appendix HPSv2 table, v1 Table 8): 0.04 (SD1.5 DMD2, PG-SB), 0.19 (InstaFlow), 0.30 (SD2.1 SBv2, PG-SB),
0.20 / 0.45 / 0.80 (PixArt-alpha YOSO / DMD / PG-SB), and sweeps 0-1 on SDXL-DMD2 (Figure 5). There is no
universal default, so ``enable_nasa`` asks for it.

Families: every backbone whose text enters through cross-attention layers, i.e. diffusers ``Attention`` /
``WanAttention`` modules with ``is_cross_attention``: ``UNet2DConditionModel`` (SD1.5, SD2.1, SDXL, the
pixel-space IFPipeline UNets with CrossAttn blocks), PixArt-alpha/sigma, Sana and Wan text-to-video. SD3,
Flux and other MMDiTs attend jointly over text and image tokens (no cross-attention layer): ``enable_nasa``
refuses them with a ValueError, as it does IP-Adapter, added-KV (``AttnAddedKVProcessor``) and Wan
image-to-video layers.

How: the negative prompt is encoded once with the pipeline's own ``encode_prompt``. A forward pre-hook on each
backbone appends its tokens to ``encoder_hidden_states`` (and ``encoder_attention_mask``), so the backbone's
own per-token caption projection (PixArt, Sana, Wan) reaches them, and each cross-attention processor splits
the last ``negative_tokens`` off again. The query is projected once; Z+ is computed exactly as the stock
processor computes the layer (so alpha = 0 reproduces the stock pipeline bit for bit).

Usage with an exported fewstep folder (this file sits beside ``model_index.json``; plain diffusers, no fewstep)::

    import sys; sys.path.insert(0, folder)
    from nasa_fewstep import nasa
    pipe = DiffusionPipeline.from_pretrained(folder)
    with nasa(pipe, negative_prompt="a handwritten three", nasa_alpha=0.5):
        images = pipe("a handwritten digit", num_inference_steps=1, guidance_scale=1.0).images

or ``enable_nasa(pipe, ...)`` / ``disable_nasa(pipe)``; disabling restores the original processors.
This file imports only torch and diffusers so that it can be copied alone into an exported folder.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from diffusers.models.modeling_utils import ModelMixin

# stock processors NASA mirrors -> whether q/k norms act on the full inner dim (before the head split)
SUPPORTED = {"AttnProcessor2_0": False, "SanaAttnProcessor2_0": True, "WanAttnProcessor": True,
             "WanAttnProcessor2_0": True}
HANDLE = "_fewstep_nasa"      # the pipeline attribute that holds the hooks and the original processors


class NASAState:
    """What every processor of one pipeline shares: alpha and the encoded negative prompt."""

    def __init__(self, alpha: float, embeds: torch.Tensor, mask: torch.Tensor | None = None):
        if embeds.ndim != 3:
            raise ValueError(f"negative_prompt_embeds must be [batch, tokens, dim], got {tuple(embeds.shape)}")
        self.alpha, self.embeds, self.mask = float(alpha), embeds, mask
        self.negative_tokens = embeds.shape[1]

    def batched(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        if x.shape[0] not in (1, batch):
            raise ValueError(f"{x.shape[0]} negative prompts for a batch of {batch}; pass one negative prompt "
                             "or one per image")
        return x.expand(batch, *x.shape[1:])


class NASAAttnProcessor:
    """One cross-attention layer with NASA: its encoder states are [e+ ; e-] along tokens (the last
    ``state.negative_tokens`` are the negative prompt's); returns to_out(Attn(Q,K+,V+) - alpha Attn(Q,K-,V-))."""

    def __init__(self, original, state: NASAState, norm_before_heads: bool):
        # the stock processor it stands in for (disable_nasa puts it back)
        self.original, self.state, self.norm_before_heads = original, state, norm_before_heads

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        # WanAttention passes its rotary_emb (None in cross-attention) where Attention passes temb
        n = self.state.negative_tokens
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= n:
            raise ValueError("a NASA layer got no negative prompt tokens; call the backbone through its "
                             "pipeline component (enable_nasa hooks it), not its blocks directly")
        masks = (None, None) if attention_mask is None else (attention_mask[..., :-n], attention_mask[..., -n:])
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)      # Q: projected once, shared by both prompts
        if self.norm_before_heads and attn.norm_q is not None:
            query = attn.norm_q(query)
        batch, head_dim = query.shape[0], query.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if not self.norm_before_heads and attn.norm_q is not None:
            query = attn.norm_q(query)
        z_pos = self.attend(attn, query, encoder_hidden_states[:, :-n], masks[0])
        z_neg = self.attend(attn, query, encoder_hidden_states[:, -n:], masks[1])
        out = attn.to_out[1](attn.to_out[0](z_pos - self.state.alpha * z_neg))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if getattr(attn, "residual_connection", False):
            out = out + residual
        return out / attn.rescale_output_factor if hasattr(attn, "rescale_output_factor") else out

    def attend(self, attn, query, context, mask):
        """Attn(Q, K, V) for one prompt's tokens, heads merged: [B, N, heads * head_dim] (the stock order of ops)."""
        batch, heads, _, head_dim = query.shape
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, context.shape[1], batch)
            mask = mask.view(batch, heads, -1, mask.shape[-1])
        if getattr(attn, "norm_cross", None):
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        if self.norm_before_heads and attn.norm_k is not None:
            key = attn.norm_k(key)
        key, value = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (key, value))
        if not self.norm_before_heads and attn.norm_k is not None:
            key = attn.norm_k(key)
        z = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return z.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


def cross_attention_layers(model) -> dict:
    """``{name: module}`` of the diffusers attention layers in ``model`` whose keys/values come from the text."""
    return {name: m for name, m in model.named_modules()
            if getattr(m, "is_cross_attention", False) and hasattr(m, "processor")}


def stock_backbones(model) -> list:
    """The stock diffusers models in ``model`` that hold cross-attention layers: ``model`` itself, or inside a
    custom container (fewstep's expert switch or student router, which route on the prompt embedding and so must
    see it without the negative tokens) the stock models it holds."""
    if isinstance(model, ModelMixin) and type(model).__module__.startswith("diffusers."):
        return [model] if cross_attention_layers(model) else []
    return [m for child in model.children() for m in stock_backbones(child)]


def backbones(pipe) -> dict:
    """``{component: [stock backbones]}`` of the pipeline's models with cross-attention layers (``unet``,
    ``transformer``, ...); a ValueError naming the reason for a pipeline without (joint-attention MMDiTs: SD3,
    Flux) or with layers NASA does not mirror."""
    models = {k: v for k, v in pipe.components.items() if isinstance(v, ModelMixin)}
    found = {k: stock_backbones(v) for k, v in models.items() if stock_backbones(v)}
    if not found:
        joint = [type(v).__name__ for v in models.values()
                 if any(getattr(m, "add_k_proj", None) is not None for m in v.modules())]
        why = (f"{', '.join(joint)} uses joint attention (text and image tokens in one attention, MMDiT) and has "
               "no cross-attention layer" if joint else "it has no cross-attention layer")
        raise ValueError(f"NASA steers cross-attention (UNet2DConditionModel SD1.5/SDXL, PixArt, Sana, Wan); "
                         f"{type(pipe).__name__} is not supported: {why}")
    for key, models in found.items():
        if any(getattr(m.config, "addition_embed_type", None) in ("text", "text_image") for m in models):
            raise ValueError(f"NASA does not support {key}: its addition embedding pools the text tokens, which "
                             "would then include the negative prompt's")
        for name, layer in (item for m in models for item in cross_attention_layers(m).items()):
            proc = type(layer.processor).__name__
            if proc not in SUPPORTED or getattr(layer, "add_k_proj", None) is not None:
                raise ValueError(f"NASA does not support {key}: {name} is a {type(layer).__name__} with {proc}; "
                                 f"it mirrors {', '.join(SUPPORTED)} without added image keys/values")
            if getattr(layer, "fused_projections", False):
                raise ValueError(f"{key}: {name} has fused QKV projections; call pipe.{key}."
                                 "unfuse_qkv_projections() before enable_nasa")
    return found


def encode_negative(pipe, negative_prompt) -> tuple:
    """(embeds, attention mask or None) of the negative prompt, from the pipeline's own ``encode_prompt`` as
    its positive prompt, without classifier-free guidance."""
    params = inspect.signature(pipe.encode_prompt).parameters
    kwargs = {"prompt": negative_prompt, "do_classifier_free_guidance": False, "device": pipe._execution_device}
    optional = {"num_images_per_prompt": 1, "num_videos_per_prompt": 1, "clean_caption": False,
                "complex_human_instruction": None}      # Sana: encode the negative plainly, as its CFG does
    kwargs.update({k: v for k, v in optional.items() if k in params})
    out = pipe.encode_prompt(**{k: v for k, v in kwargs.items() if k in params})
    mask = out[1] if len(out) > 1 and torch.is_tensor(out[1]) and out[1].ndim == 2 else None
    return out[0], mask


def _append_negative(state: NASAState):
    def hook(module, args, kwargs):
        e = kwargs.get("encoder_hidden_states")
        if not torch.is_tensor(e):
            raise ValueError(f"NASA needs {type(module).__name__} called with encoder_hidden_states= (a tensor) "
                             "by keyword, as the stock pipelines call it")
        kwargs["encoder_hidden_states"] = torch.cat([e, state.batched(state.embeds, e.shape[0]).to(e)], dim=1)
        m = kwargs.get("encoder_attention_mask")
        if m is not None:            # keep the positive mask's meaning; the negative keeps its own padding mask
            neg = state.mask if state.mask is not None else torch.ones(1, state.negative_tokens)
            kwargs["encoder_attention_mask"] = torch.cat([m, state.batched(neg, m.shape[0]).to(m)], dim=-1)
        return args, kwargs
    return hook


def enable_nasa(pipe, negative_prompt=None, nasa_alpha: float | None = None, *, negative_prompt_embeds=None,
                negative_prompt_attention_mask=None):
    """Switch NASA on for ``pipe``: each later call steers away from ``negative_prompt`` (a string, or a list
    with one prompt per image) with strength ``nasa_alpha`` (>= 0; 0 is the stock pipeline). Instead of a
    prompt, ``negative_prompt_embeds`` (as ``encode_prompt`` returns them) may be given. Calling it again
    replaces the previous negative prompt. Returns ``pipe``."""
    if nasa_alpha is None or not float(nasa_alpha) >= 0:
        raise ValueError(f"nasa_alpha={nasa_alpha!r}: pass a number >= 0 (the paper uses 0.04-0.8 by model)")
    if (negative_prompt is None) == (negative_prompt_embeds is None):
        raise ValueError("pass exactly one of negative_prompt and negative_prompt_embeds")
    found = backbones(pipe)
    disable_nasa(pipe)
    if negative_prompt_embeds is None:
        negative_prompt_embeds, negative_prompt_attention_mask = encode_negative(pipe, negative_prompt)
    state = NASAState(nasa_alpha, negative_prompt_embeds.detach(), negative_prompt_attention_mask)
    hooks, originals = [], []
    for model in (m for models in found.values() for m in models):
        for layer in cross_attention_layers(model).values():
            originals.append((layer, layer.processor))
            layer.set_processor(NASAAttnProcessor(layer.processor, state, SUPPORTED[type(layer.processor).__name__]))
        hooks.append(model.register_forward_pre_hook(_append_negative(state), with_kwargs=True))
    setattr(pipe, HANDLE, (hooks, originals))
    return pipe


def disable_nasa(pipe):
    """Switch NASA off: remove the hooks and put the original processors back. Returns ``pipe``."""
    hooks, originals = getattr(pipe, HANDLE, None) or ((), ())
    for hook in hooks:
        hook.remove()
    for layer, proc in originals:
        layer.set_processor(proc)
    setattr(pipe, HANDLE, None)
    return pipe


@contextlib.contextmanager
def nasa(pipe, negative_prompt=None, nasa_alpha: float | None = None, **kwargs):
    """``with nasa(pipe, negative_prompt=..., nasa_alpha=...): pipe(...)``: NASA on inside the block only."""
    enable_nasa(pipe, negative_prompt, nasa_alpha, **kwargs)
    try:
        yield pipe
    finally:
        disable_nasa(pipe)
