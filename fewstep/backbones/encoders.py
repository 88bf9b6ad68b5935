"""Prompt encoder and latent codec taken from a stock diffusers pipeline.

``PromptEncoder(pipe)`` calls the pipeline's own ``encode_prompt`` with the arguments its ``__call__``
passes by default (sequence lengths, CLIP skip, caption cleaning, Sana's complex human instruction) and
packs the result into a ``Cond`` holding exactly what the pipeline hands its backbone:

    SD1.5/2.1    text
    SDXL         text, pooled (``text_embeds``), added["time_ids"] for (height, width)
    SD3          text (CLIP-L/G + T5 tokens), pooled
    Flux         text (T5), pooled (CLIP), added["txt_ids"] [B, L, 3], guidance (guidance-distilled models)
    PixArt       text, text_mask, added resolution/aspect_ratio (models with micro-conditions)
    Sana         text, text_mask, guidance (guidance-embedded models)
    Wan          text (zero-filled past each prompt; WanPipeline passes no mask)
    IF           text (``IFPipeline``: pixel space, no VAE; its ``encode_prompt`` pads every prompt to 77 tokens)

``null()`` is the unconditional Cond of classifier-free guidance: the pipeline's negative branch for an
empty prompt (SDXL: zeros when ``force_zeros_for_empty_prompt``), or the empty prompt itself where the
pipeline has no negative branch (Flux). ``LatentCodec(pipe)`` maps images or videos in [-1, 1] to the
normalized latents the backbone works on, with the VAE's ``scaling_factor``/``shift_factor`` or
``latents_mean``/``latents_std`` exactly as the pipeline decodes them; for a pixel-space pipeline (no
``vae``, e.g. ``IFPipeline``) it is the identity on the backbone's channels.

Family dispatch lives here and in ``fewstep.backbones`` only; methods never see it.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from fewstep.core.conditioning import Cond


def _call_default(pipe, name: str, fallback=None):
    """The default of ``pipe.__call__``'s argument ``name`` (what a plain ``pipe(prompt)`` uses)."""
    p = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


def _batch(v: Tensor, n: int) -> Tensor:
    return v.expand(n, *v.shape[1:]) if len(v) == 1 else v


# One function per family: (encoder, prompts) -> (cond, uncond or None when the pipeline has no negative branch).
def _sd(enc: "PromptEncoder", prompts):
    pe, npe = enc.pipe.encode_prompt(prompts, enc.device, 1, True, clip_skip=None)
    return Cond(text=pe), Cond(text=npe)


def _sdxl(enc: "PromptEncoder", prompts):
    pipe = enc.pipe
    pe, npe, pooled, npooled = pipe.encode_prompt(prompt=prompts, device=enc.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True, clip_skip=None)
    proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    size = (enc.height, enc.width)
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=proj)
    ids = ids.to(enc.device).repeat(len(prompts), 1)
    return (Cond(text=pe, pooled=pooled, added={"time_ids": ids}),
            Cond(text=npe, pooled=npooled, added={"time_ids": ids.clone()}))


def _sd3(enc: "PromptEncoder", prompts):
    pe, npe, pooled, npooled = enc.pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=enc.device, do_classifier_free_guidance=True,
        max_sequence_length=_call_default(enc.pipe, "max_sequence_length", 256))
    return Cond(text=pe, pooled=pooled), Cond(text=npe, pooled=npooled)


def _flux(enc: "PromptEncoder", prompts):
    pipe = enc.pipe
    pe, pooled, txt_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=enc.device,
                                             max_sequence_length=_call_default(pipe, "max_sequence_length", 512))
    n = len(prompts)
    return Cond(text=pe, pooled=pooled, added={"txt_ids": txt_ids.expand(n, -1, -1).clone()},
                guidance=enc.guidance(n, pipe.transformer.config.guidance_embeds)), None


def _pixart(enc: "PromptEncoder", prompts):
    pipe = enc.pipe
    pe, mask, npe, nmask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=True, negative_prompt="", device=enc.device,
        clean_caption=_call_default(pipe, "clean_caption", False),
        max_sequence_length=_call_default(pipe, "max_sequence_length", 120))
    added = {}
    if pipe.transformer.use_additional_conditions:
        row = lambda *v: torch.tensor([v], dtype=pe.dtype, device=enc.device).repeat(len(prompts), 1)  # noqa: E731
        added = {"resolution": row(enc.height, enc.width), "aspect_ratio": row(enc.height / enc.width)}
    return (Cond(text=pe, text_mask=mask, added=added),
            Cond(text=npe, text_mask=nmask, added={k: v.clone() for k, v in added.items()}))


def _sana(enc: "PromptEncoder", prompts):
    pipe = enc.pipe
    pe, mask, npe, nmask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=True, negative_prompt="", device=enc.device,
        clean_caption=_call_default(pipe, "clean_caption", False),
        max_sequence_length=_call_default(pipe, "max_sequence_length", 300),
        complex_human_instruction=_call_default(pipe, "complex_human_instruction"))
    guidance = enc.guidance(len(prompts), pipe.transformer.config.guidance_embeds)
    return (Cond(text=pe, text_mask=mask, guidance=guidance),
            Cond(text=npe, text_mask=nmask, guidance=None if guidance is None else guidance.clone()))


def _wan(enc: "PromptEncoder", prompts):
    pe, npe = enc.pipe.encode_prompt(prompt=prompts, negative_prompt=None, do_classifier_free_guidance=True,
                                     max_sequence_length=_call_default(enc.pipe, "max_sequence_length", 512),
                                     device=enc.device)
    return Cond(text=pe), Cond(text=npe)


def _if(enc: "PromptEncoder", prompts):
    # clean_caption=False: IFPipeline's default (True) needs bs4 and ftfy and falls back to lower().strip()
    # without them, so the embeddings would depend on which packages are installed
    pe, npe = enc.pipe.encode_prompt(prompts, do_classifier_free_guidance=True, device=enc.device,
                                     clean_caption=False)
    return Cond(text=pe), Cond(text=npe)


FAMILIES = {
    "StableDiffusionPipeline": _sd,
    "StableDiffusionXLPipeline": _sdxl,
    "StableDiffusion3Pipeline": _sd3,
    "FluxPipeline": _flux,
    "PixArtAlphaPipeline": _pixart,
    "PixArtSigmaPipeline": _pixart,
    "SanaPipeline": _sana,
    "WanPipeline": _wan,
    "IFPipeline": _if,
}


def _family(pipe):
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise ValueError(f"no fewstep prompt encoder for {type(pipe).__name__}; supported pipelines: "
                     f"{', '.join(sorted(FAMILIES))}")


def _backbone(pipe):
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def scale_factor(pipe) -> int:
    """Pixels per latent cell: the VAE's (spatial) factor, 1 for pixel-space pipelines (no VAE)."""
    if getattr(pipe, "vae", None) is None:
        return 1
    return getattr(pipe, "vae_scale_factor", None) or pipe.vae_scale_factor_spatial


class PromptEncoder:
    """Text conditioning of a stock diffusers pipeline as fewstep ``Cond``s.

    ``height``/``width`` (pixels) only matter where the conditioning depends on the image size (SDXL
    time ids, PixArt micro-conditions); they default to the pipeline's default size.
    ``guidance_scale`` fills ``Cond.guidance`` for guidance-embedded models (default: the pipeline's).
    """

    def __init__(self, pipe, height: int | None = None, width: int | None = None,
                 guidance_scale: float | None = None):
        self.pipe = pipe
        self._encode = _family(pipe)
        default = getattr(_backbone(pipe).config, "sample_size", None)
        default = default * scale_factor(pipe) if isinstance(default, int) else None
        self.height, self.width = height or default, width or default
        self.guidance_scale = guidance_scale if guidance_scale is not None else _call_default(pipe, "guidance_scale")
        self._null: Cond | None = None

    @property
    def device(self):
        return self.pipe._execution_device

    def guidance(self, n: int, embedded: bool) -> Tensor | None:
        """The guidance-embedding input ``[n]`` (float32, as the pipelines pass it), or None."""
        if not embedded:
            return None
        return torch.full((n,), float(self.guidance_scale), dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        """The Cond for a batch of prompts."""
        if isinstance(prompts, str):
            raise TypeError("PromptEncoder.encode takes a list of prompts, not a string")
        return self._encode(self, list(prompts))[0]

    @torch.no_grad()
    def null(self, n: int = 1) -> Cond:
        """The unconditional Cond (classifier-free guidance), repeated ``n`` times; computed once."""
        if self._null is None:
            cond, uncond = self._encode(self, [""])
            self._null = uncond if uncond is not None else cond
        return self._null.apply(lambda v: _batch(v, n).clone())


def _latent_stats(vae, like: Tensor):
    """``(mean, std)`` shaped to broadcast over ``like`` ``[B, C, ...]``, or ``(None, None)``."""
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        return None, None
    shape = (1, len(mean)) + (1,) * (like.ndim - 2)
    as_t = lambda v: torch.tensor(v, dtype=like.dtype, device=like.device).view(shape)  # noqa: E731
    return as_t(mean), as_t(std)


class LatentCodec:
    """The pipeline's VAE as ``encode(x) -> z`` and ``decode(z) -> x`` between pixels in [-1, 1] and the
    normalized latents the backbone sees.

    Normalization, as the stock pipelines decode: ``x = vae.decode(z / scaling_factor + shift_factor)``
    (SD, SDXL, PixArt, SD3, Flux, Sana), or with per-channel statistics ``vae.decode(z * std /
    scaling_factor + mean)`` (SDXL-style ``latents_mean``/``latents_std``; Wan, with scaling factor 1).

    A pixel-space pipeline (no ``vae``: ``IFPipeline``) gets the identity: the backbone works on pixels in
    [-1, 1] with its own channel count (``encode`` takes images with that many channels).
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.vae = getattr(pipe, "vae", None)
        config = self.vae.config if self.vae is not None else {}
        self.scaling_factor = config.get("scaling_factor") or 1.0
        self.shift_factor = config.get("shift_factor") or 0.0

    @property
    def latent_channels(self) -> int:
        if self.vae is None:
            return _backbone(self.pipe).config.in_channels
        return self.vae.config.get("latent_channels") or self.vae.config.get("z_dim")

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        """Latent shape (without batch) of an image, or of a video with ``num_frames`` frames."""
        if num_frames is None:
            f = scale_factor(self.pipe)
            return (self.latent_channels, height // f, width // f)
        f, ft = self.pipe.vae_scale_factor_spatial, self.pipe.vae_scale_factor_temporal
        return (self.latent_channels, (num_frames - 1) // ft + 1, height // f, width // f)

    def normalize(self, z: Tensor) -> Tensor:
        """Raw VAE latents -> backbone latents."""
        if self.vae is None:
            return z
        mean, std = _latent_stats(self.vae, z)
        if mean is not None:
            return (z - mean) * self.scaling_factor / std
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, z: Tensor) -> Tensor:
        """Backbone latents -> raw VAE latents (what the pipeline feeds ``vae.decode``)."""
        if self.vae is None:
            return z
        mean, std = _latent_stats(self.vae, z)
        if mean is not None:
            return z * std / self.scaling_factor + mean
        return z / self.scaling_factor + self.shift_factor

    def encode(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Pixels in [-1, 1] (``[B, 3, H, W]`` or video ``[B, 3, F, H, W]``) -> normalized latents.

        ``sample=False`` takes the posterior mode (deterministic); deterministic autoencoders (DC-AE)
        ignore it.
        """
        if self.vae is None:
            return x.float()
        out = self.vae.encode(x.to(self.vae.device, self.vae.dtype))
        if hasattr(out, "latent_dist"):
            z = out.latent_dist.sample(generator) if sample else out.latent_dist.mode()
        else:
            z = out.latent
        return self.normalize(z.float())

    def decode(self, z: Tensor) -> Tensor:
        """Normalized latents -> pixels in about [-1, 1]."""
        if self.vae is None:
            return z.float()
        z = self.denormalize(z.float()).to(self.vae.device, self.vae.dtype)
        return self.vae.decode(z, return_dict=False)[0]
