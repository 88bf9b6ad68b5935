"""Tiny random diffusers pipelines of every supported family, built in memory from configs.

Never a hub download: tokenizers are built from in-memory vocabularies (ecosystem notes section 1(e)),
models from small configs, and every model is put in ``eval()`` (models built from configs start in
``train()``; T5 dropout made outputs non-deterministic). Each builder returns the *stock* diffusers
pipeline object with the scheduler type the real checkpoints ship, so tests can compare fewstep against
what the pipeline itself does. Every component stays well under ~2M parameters.
"""
from __future__ import annotations

import string

import torch

PUNCT = string.ascii_lowercase + string.digits + string.punctuation
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ---------------------------------------------------------------------------------------------- tokenizers
def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table (the 256 visible characters byte-level BPE works on)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer(max_length: int = 16):
    """A character-level CLIP tokenizer (514 tokens, no merges); pad = eos like the SD checkpoints."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(chars)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer():
    """A character-level sentencepiece-unigram T5 tokenizer (pad 0, eos 1, unk 2)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in PUNCT] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def gemma_tokenizer():
    """A character-level Gemma tokenizer that prepends <bos> (an all-padding prompt would mask every key)."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in "\u2581" + PUNCT:
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


# ------------------------------------------------------------------------------------------- text encoders
def clip_text(tok, hidden: int = 32, projection_dim: int | None = None):
    """CLIPTextModel, or CLIPTextModelWithProjection when ``projection_dim`` is given (SDXL te2, SD3)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=tok.model_max_length,
                            projection_dim=projection_dim or hidden, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config)


def t5_text(tok, d_model: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))


def gemma_text(tok, hidden: int = 32):
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))


# -------------------------------------------------------------------------------------------------- VAEs
def vae_kl(latent_channels: int = 4, **config):
    """A 2x-downsampling AutoencoderKL (``scaling_factor``/``shift_factor`` passed through)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                         layers_per_block=1, norm_num_groups=4, sample_size=32, **config)


def _eval(*models):
    for m in models:
        m.eval()


# ------------------------------------------------------------------------------------------------ families
def sd15(prediction_type: str = "epsilon"):
    """SD1.5-style: UNet2DConditionModel + AutoencoderKL + CLIPTextModel, DDIM scheduler (32 px -> 16x16x4)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok = clip_tokenizer()
    te = clip_text(tok)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8)
    vae = vae_kl(scaling_factor=0.18215)
    _eval(unet, vae, te)
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)


def sdxl():
    """SDXL-style: two CLIP encoders (te2 with projection), text_time addition embedding, Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    te, te2 = clip_text(tok), clip_text(tok2, projection_dim=32)
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = vae_kl(scaling_factor=0.13025)
    _eval(unet, vae, te, te2)
    sched = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched, image_encoder=None, feature_extractor=None)


def sd3():
    """SD3: SD3Transformer2DModel + two CLIPTextModelWithProjection + T5EncoderModel, shifted flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    te, te2 = clip_text(tok, hidden=16, projection_dim=16), clip_text(tok2, hidden=16, projection_dim=16)
    te3 = t5_text(tok3, d_model=32)          # joint_attention_dim >= the two CLIP widths side by side
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                               pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    vae = vae_kl(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    _eval(tr, vae, te, te2, te3)
    return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                                    text_encoder_3=te3, tokenizer_3=tok3, image_encoder=None, feature_extractor=None)


def flux(guidance_embeds: bool = True):
    """Flux: FluxTransformer2DModel on 2x2-packed latents, CLIP (pooled) + T5, resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    te, te2 = clip_text(tok), t5_text(tok2)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    vae = vae_kl(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    _eval(tr, vae, te, te2)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                        tokenizer_2=tok2, transformer=tr, image_encoder=None, feature_extractor=None)


def pixart(learned_sigma: bool = True, additional_conditions: bool = False):
    """PixArt-alpha: PixArtTransformer2DModel (learned sigma: 2C output channels) + T5, DPM-Solver (epsilon).

    ``additional_conditions`` turns on the resolution/aspect-ratio micro-conditions of the 1024 px model.
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tok = t5_tokenizer()
    te = t5_text(tok)
    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=8 if learned_sigma else 4, num_layers=2, cross_attention_dim=24,
                                  caption_channels=32, sample_size=16, patch_size=2,
                                  use_additional_conditions=additional_conditions)
    vae = vae_kl(scaling_factor=0.18215)
    _eval(tr, vae, te)
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr,
                               scheduler=DPMSolverMultistepScheduler())


def sana():
    """Sana: SanaTransformer2DModel + Gemma2 + AutoencoderDC, DPM-Solver on flow sigmas (flow_prediction)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(0)
    tok = gemma_tokenizer()
    te = gemma_text(tok)
    tr = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                cross_attention_dim=16, caption_channels=32, sample_size=16, patch_size=1)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                        upsample_block_type="interpolate", downsample_block_type="Conv",
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    _eval(tr, vae, te)
    sched = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return SanaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched)


def wan():
    """Wan 2.1: WanTransformer3DModel on video latents [B, C, F, H, W] + UMT5 + AutoencoderKLWan, UniPC flow."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    tok = t5_tokenizer()
    te = t5_text(tok, umt5=True)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                               out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2,
                               rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 0.5, 2.0, 1.0])
    _eval(tr, vae, te)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched)


FAMILIES = {"sd15": sd15, "sdxl": sdxl, "sd3": sd3, "flux": flux, "pixart": pixart, "sana": sana, "wan": wan}


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def captioned_images(folder, captions, size=(40, 48)):
    """Random RGB images with one caption file each under ``folder/images`` (an image-text data source)."""
    import numpy as np
    from PIL import Image

    (folder / "images").mkdir()
    g = np.random.default_rng(0)
    for i, caption in enumerate(captions):
        Image.fromarray(g.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / "images" / f"img{i}.png")
        (folder / "images" / f"img{i}.txt").write_text(caption)
    return folder


def assert_class_export_equals_sampler(out, labels=(1, 2), shape=(1, 8, 8), seed=3):
    """The class-conditional run folder ``out``, reloaded with plain diffusers, samples what fewstep's own
    student sampler does from the same noise (1e-5)."""
    import diffusers

    from fewstep.core.conditioning import Cond
    from fewstep.core.generator import FewStepGenerator

    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(list(labels), generator=torch.Generator().manual_seed(seed), output_type="pt").images
    g = torch.Generator().manual_seed(seed)
    x = FewStepGenerator.from_pretrained(out).sample(torch.randn((len(labels), *shape), generator=g),
                                                     Cond(labels=torch.tensor(list(labels))), g)
    torch.testing.assert_close(img, ((x.clamp(-1, 1) + 1) / 2).float(), atol=1e-5, rtol=0)
