"""Batch sources. A source builds the micro-batch of (step, turn, micro, rank) deterministically from
per-sample seeds, so the data position of a run is its step and resume needs no iterator state."""
from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch

from fewstep.backbones.encoders import LatentCodec, PromptEncoder, _backbone, _call_default, scale_factor
from fewstep.core.conditioning import Batch, Cond, sample_seed
from fewstep.digits.data import NULL_CLASS, NUM_CLASSES, load_digits
from fewstep.errors import ConfigError


def _text(path: Path) -> str:
    """A UTF-8 text file (prompts, captions), or a one-line error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


class ClassLabelSource:
    """Class-conditional pixel data: uniform labels, unit noise, and real samples for GAN terms.

    Sample ``j`` of a step's global batch uses the seed of (seed, step, turn, j), where
    ``j = (micro * world + rank) * batch_size + b``: 4 micro-batches of 1 equal 1 of 4, and 2 processes
    at batch B equal 1 process at batch 2B.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, null_class: int,
                 batch_size: int, seed: int = 0):
        self.images, self.labels = images, labels
        self.num_classes, self.null_class = num_classes, null_class
        self.batch_size, self.seed = batch_size, seed

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batch(self, step: int, turn: int, micro: int = 0, rank: int = 0, world: int = 1) -> Batch:
        B = self.batch_size
        first = (micro * world + rank) * B
        seeds = torch.tensor([sample_seed(self.seed, step, turn, first + b) for b in range(B)], dtype=torch.long)
        labels, noise, real_idx = [], [], []
        for s in seeds.tolist():
            g = torch.Generator().manual_seed(s)
            labels.append(int(torch.randint(self.num_classes, (1,), generator=g)))
            noise.append(torch.randn(self.sample_shape, generator=g))
            real_idx.append(int(torch.randint(len(self.images), (1,), generator=g)))
        labels_t = torch.tensor(labels)
        real = torch.tensor(real_idx)
        return Batch(noise=torch.stack(noise), cond=Cond(labels=labels_t),
                     uncond=Cond(labels=torch.full_like(labels_t, self.null_class)),
                     x0_real=self.images[real], cond_real=Cond(labels=self.labels[real]), seeds=seeds)


def digits_source(batch_size: int, seed: int = 0, size: int = 16) -> ClassLabelSource:
    """The bundled digits (scikit-learn, 1,797 images) as a class-label source."""
    images, labels = load_digits(size)
    return ClassLabelSource(images, labels, NUM_CLASSES, NULL_CLASS, batch_size, seed)


# ------------------------------------------------------------------------------------------ text-to-image
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPT_FIELDS = ("prompt", "text", "caption")


def _one_line(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one a line), a JSONL file (``{"prompt": ...}`` or ``{"text": ...}``) or a
    Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``prompt``/``text``/``caption`` column)."""
    if not path:
        raise ConfigError("data.source prompts needs data.prompts: a .txt file (one prompt a line), a .jsonl "
                          'file ({"prompt": ...} a line) or a datasets folder saved with save_to_disk')
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data.prompts {path!r} does not exist; give a .txt, .jsonl or datasets folder path")
    if p.is_dir():
        prompts = _dataset_prompts(p)
    elif p.suffix.lower() == ".jsonl":
        prompts = _jsonl_prompts(p)
    else:
        prompts = _text(p).splitlines()
    prompts = [q.strip() for q in prompts if q and q.strip()]
    if not prompts:
        raise ConfigError(f"data.prompts {path!r} holds no prompts (only blank lines); add one prompt a line")
    return prompts


def _jsonl_prompts(p: Path) -> list[str]:
    out = []
    for n, line in enumerate(_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"data.prompts {str(p)!r} line {n} is not valid JSON ({e.msg})") from None
        text = next((row[k] for k in PROMPT_FIELDS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        if text is None:
            raise ConfigError(f'data.prompts {str(p)!r} line {n} has no "prompt" or "text" string field')
        out.append(text)
    return out


def _dataset_prompts(p: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.prompts {str(p)!r} is a folder, read as a Hugging Face datasets folder; that "
                          "needs the datasets package (pip install datasets), or give a .txt/.jsonl file") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 (any reader failure is a bad folder)
        raise ConfigError(f"data.prompts {str(p)!r} is not a datasets folder saved with save_to_disk "
                          f"({_one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    column = next((c for c in PROMPT_FIELDS if c in ds.column_names), None)
    if column is None:
        raise ConfigError(f"data.prompts {str(p)!r} has no prompt, text or caption column "
                          f"(columns: {', '.join(ds.column_names)})")
    return [str(v) for v in ds[column]]


def list_images(folder: str) -> list[Path]:
    """Every image under ``folder``, sorted, each checked to be a readable 3-channel (RGB) image."""
    from PIL import Image

    d = Path(folder)
    if not d.is_dir():
        raise ConfigError(f"data.images {folder!r} is not a folder; give a folder of RGB images "
                          f"({', '.join(IMAGE_SUFFIXES)}), captions optionally in <name>.txt beside each")
    files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"data.images {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for f in files:
        try:
            with Image.open(f) as im:
                mode, bands = im.mode, len(im.getbands())
                im.verify()
        except Exception as e:  # noqa: BLE001 (PIL raises many types for broken files)
            raise ConfigError(f"data.images: {str(f)!r} is not a readable image ({_one_line(e)}); "
                              "remove or replace it") from None
        if bands != 3 and mode != "P":     # palette images hold RGB colours
            raise ConfigError(f"data.images: {str(f)!r} has {bands} channel(s) (mode {mode}); images must be RGB "
                              "(3 channels): convert it, e.g. Image.open(f).convert('RGB').save(f)")
    return files


def load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """An RGB image resized (shorter side first) and centre-cropped to ``height`` x ``width``, in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(height / im.height, width / im.width)
        im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))),
                       Image.Resampling.BICUBIC)
        left, top = (im.width - width) // 2, (im.height - height) // 2
        im = im.crop((left, top, left + width, top + height))
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1


def _cond_to_dict(c: Cond) -> dict:
    return {f.name: getattr(c, f.name) for f in fields(Cond)}


class PromptSource:
    """Text-to-image data: prompts encoded by the teacher's own pipeline, latent noise, optional real images.

    Sample ``j`` of a step's global batch draws, from the seed of (seed, step, turn, j) as
    ``ClassLabelSource`` does: a prompt index, the noise ``[C, (F,) h, w]`` and a real-image index. With
    ``paired`` (``data.source images``) the prompt is the caption of the drawn image. Embeddings and
    image latents are computed once per prompt / image and kept in memory; with ``cache_file`` every
    prompt and image is encoded at the first batch (on the device the source was moved to) and kept in
    that ``.pt`` file for later runs. Uncaptioned images are conditioned on the empty prompt.
    """

    def __init__(self, prompts: list[str], encoder, codec, sample_shape: tuple[int, ...], batch_size: int,
                 seed: int = 0, images: list[Path] | None = None, cache_file: str = "", paired: bool = False):
        self.prompts, self.encoder, self.codec = prompts, encoder, codec
        self.shape, self.batch_size, self.seed = tuple(sample_shape), batch_size, seed
        self.images, self.cache_file, self.paired = list(images or []), cache_file, paired
        self.captions = [_text(f.with_suffix(".txt")).strip()
                         if f.with_suffix(".txt").is_file() else "" for f in self.images]
        self._conds: dict[str, Cond] = {}
        self._latents: dict[int, torch.Tensor] = {}
        self._null: Cond | None = None
        self._ready = not cache_file
        if paired:
            self.prompts = list(self.captions)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape

    def to(self, device) -> "PromptSource":
        """Run the text encoders and the VAE on ``device`` (batches stay on the CPU until the loop moves them)."""
        self.encoder.pipe.to(device)
        return self

    def cache_key(self) -> dict:
        e = self.encoder
        return {"pipeline": type(e.pipe).__name__, "size": [e.height, e.width], "guidance": e.guidance_scale,
                "name_or_path": str(e.pipe.config.get("_name_or_path", "")), "latent_shape": list(self.shape),
                "images": [str(f) for f in self.images]}

    def cond(self, prompt: str) -> Cond:
        """The (CPU) Cond of one prompt, encoded once."""
        if prompt not in self._conds:
            self._conds[prompt] = self.encoder.encode([prompt]).to("cpu")
        return self._conds[prompt]

    def latent(self, i: int) -> torch.Tensor:
        """The normalized VAE latent (posterior mode) of real image ``i``, encoded once."""
        if i not in self._latents:
            e = self.encoder
            x = load_image(self.images[i], e.height, e.width)[None]
            with torch.no_grad():
                self._latents[i] = self.codec.encode(x, sample=False)[0].float().cpu()
        return self._latents[i]

    def null(self) -> Cond:
        if self._null is None:
            self._null = self.encoder.null(1).to("cpu")
        return self._null

    def _prepare(self) -> None:
        """Load ``cache_file`` or fill it with every prompt, caption and image latent."""
        self._ready = True
        path = Path(self.cache_file)
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == self.cache_key():
                self._conds = {p: Cond(**d) for p, d in saved["conds"].items()}
                self._latents = dict(saved["latents"])
                return
            print(f"fewstep: {path} was made for another teacher, size or image set; re-encoding")
        for p in dict.fromkeys(self.prompts + self.captions):
            self.cond(p)
        for i in range(len(self.images)):
            self.latent(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")     # every process writes the same content
        torch.save({"key": self.cache_key(), "conds": {p: _cond_to_dict(c) for p, c in self._conds.items()},
                    "latents": self._latents}, tmp)
        os.replace(tmp, path)

    def batch(self, step: int, turn: int, micro: int = 0, rank: int = 0, world: int = 1) -> Batch:
        if not self._ready:
            self._prepare()
        B = self.batch_size
        first = (micro * world + rank) * B
        seeds = torch.tensor([sample_seed(self.seed, step, turn, first + b) for b in range(B)], dtype=torch.long)
        prompts, noise, real = [], [], []
        for s in seeds.tolist():
            g = torch.Generator().manual_seed(s)
            k = int(torch.randint(len(self.prompts), (1,), generator=g))
            noise.append(torch.randn(self.shape, generator=g))
            i = int(torch.randint(len(self.images), (1,), generator=g)) if self.images else None
            real.append(i)
            prompts.append(self.captions[i] if self.paired else self.prompts[k])
        cond = Cond.cat(*[self.cond(p) for p in prompts])
        uncond = Cond.cat(*[self.null()] * B)
        if not self.images:
            return Batch(noise=torch.stack(noise), cond=cond, uncond=uncond, seeds=seeds)
        cond_real = cond if self.paired else Cond.cat(*[self.cond(self.captions[i]) for i in real])
        return Batch(noise=torch.stack(noise), cond=cond, uncond=uncond,
                     x0_real=torch.stack([self.latent(i) for i in real]), cond_real=cond_real, seeds=seeds)

    def preview(self, n: int = 4) -> tuple[list[str], Cond]:
        """``n`` prompts spread evenly over the prompt list (a list sorted by subject would otherwise show one
        subject n times) and their cond, for sample grids."""
        pool = [self.captions[i] for i in range(len(self.images))] if self.paired else self.prompts
        prompts = [pool[(i * len(pool)) // n % len(pool)] for i in range(n)]
        return prompts, Cond.cat(*[self.cond(p) for p in prompts])


def _default_size(pipe, factor: int) -> tuple[int, int]:
    """(height, width) a plain ``pipe(prompt)`` generates."""
    h, w = _call_default(pipe, "height"), _call_default(pipe, "width")
    if isinstance(h, int) and isinstance(w, int):
        return h, w
    size = getattr(pipe, "default_sample_size", None) or getattr(_backbone(pipe).config, "sample_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    if not isinstance(size, int):
        raise ConfigError(f"cannot tell {type(pipe).__name__}'s default image size; set data.resolution")
    return size * factor, size * factor


def prompt_source(cfg, pipe, seed: int = 0) -> PromptSource:
    """``data.source prompts`` (prompts file, optional ``data.images``) or ``data.source images``
    (captioned images) over a stock text-to-image pipeline; ``cfg`` is the run's ``DataConfig``."""
    video = hasattr(pipe, "vae_scale_factor_temporal")
    factor = pipe.vae_scale_factor_spatial if video else scale_factor(pipe)
    height, width = (cfg.resolution, cfg.resolution) if cfg.resolution > 0 else _default_size(pipe, factor)
    model = _backbone(pipe)
    patch = 2 if type(model).__name__.startswith("Flux") else getattr(model.config, "patch_size", 1)
    patch = patch[-1] if isinstance(patch, (tuple, list)) else (patch or 1)
    if height % (factor * patch) or width % (factor * patch):
        raise ConfigError(f"data.resolution {height}x{width} must be a multiple of {factor * patch} for "
                          f"{type(pipe).__name__} (VAE factor {factor} x patch {patch})")
    frames = None
    if video:
        frames = cfg.num_frames or _call_default(pipe, "num_frames", 81)
        if (frames - 1) % pipe.vae_scale_factor_temporal:
            raise ConfigError(f"data.num_frames {frames}: {type(pipe).__name__} needs 1 + a multiple of "
                              f"{pipe.vae_scale_factor_temporal} frames, e.g. 81")
    elif cfg.num_frames:
        raise ConfigError(f"data.num_frames is for video teachers (Wan); {type(pipe).__name__} makes images")
    paired = cfg.source == "images"
    if paired and not cfg.images:
        raise ConfigError("data.source images needs data.images DIR (RGB images, each caption in <name>.txt)")
    images = list_images(cfg.images) if cfg.images else None
    if images and getattr(pipe, "vae", None) is None and model.config.get("in_channels") != 3:
        raise ConfigError(f"data.images: {type(pipe).__name__} works on {model.config.get('in_channels')}-channel "
                          "pixels, real RGB images do not fit it; leave data.images empty")
    if images and video:
        raise ConfigError("data.images: real videos are not supported; leave it empty for video teachers")
    prompts = [] if paired else read_prompts(cfg.prompts)
    encoder = PromptEncoder(pipe, height=height, width=width)
    codec = LatentCodec(pipe)
    return PromptSource(prompts, encoder, codec, codec.latent_shape(height, width, frames), cfg.batch_size, seed,
                        images, cfg.cache_embeddings, paired)
