"""Text-to-image students end to end on the tiny stock pipelines of every family (tests/tiny_models.py).

Each family's tiny pipeline is saved to a folder and distilled for two steps through the training entry
point (``fewstep.run.cli.main`` in-process, exactly what ``train/<method>.py`` runs) on a prompt file. The
export is reloaded with the family's STOCK diffusers pipeline class and sampled at the trained step count.
For SD1.5 (VP, stock ``LCMScheduler``) and SD3 (flow, ``FewStepScheduler`` as a custom component) the stock
pipeline's 1- and 4-step images equal fewstep's own sampler, decode included. Every other method in
``fewstep.methods.REGISTRY`` trains two steps on every family (f-distill and consistency, which need real
data, stop with one line on the video family); a LoRA student loads onto the teacher
pipeline with ``load_lora_weights``; prompt and image data fail with one-line errors.
"""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image

from fewstep.backbones import adapter_for
from fewstep.backbones.encoders import LatentCodec, PromptEncoder
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.schedules import from_diffusers, prediction_type_of
from fewstep.core.timesteps import from_timesteps
from fewstep.errors import ConfigError
from fewstep.run import build, cli
from fewstep.run.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "two dogs on grass", "a blue house", "an old car"]
SIZE, FRAMES = 32, 5
STOCK = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
         "flux": "FluxPipeline", "pixart": "PixArtAlphaPipeline", "sana": "SanaPipeline", "wan": "WanPipeline"}
# t-lists chosen so every export route runs: stock LCM (VP), stock FlowMatchLCM (flow), FewStepScheduler (both)
TLIST = {"sd15": (999, 749, 499, 249), "sdxl": (399,), "sd3": (1000, 750, 500, 250), "flux": (1000, 750, 500, 250),
         "pixart": (999, 499), "sana": (1000,), "wan": (1000, 500)}
SCHED = {"sd15": "LCMScheduler", "sdxl": "FewStepScheduler", "sd3": "FewStepScheduler", "flux": "FlowMatchLCMScheduler",
         "pixart": "LCMScheduler", "sana": "FlowMatchLCMScheduler", "wan": "FewStepScheduler"}
NO_GAN = ["--model.gan_head", "false", "--method.gan_weight_student", "0"]


OTHER_METHODS = ["sid", "fdistill", "phased_dmd", "consistency"]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("t2i")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    images = d / "images"
    images.mkdir()
    g = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(g.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    (images / "img0.txt").write_text("a red cat")
    (images / "img1.txt").write_text("a blue house")
    (images / "img2.txt").write_text("an old car")
    return d


def train(method: str, teacher: Path, out: Path, *args: str) -> Path:
    """Two training steps of ``method`` on a prompt source, then the export (as the entry script does)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)    # runs in one process may differ in precision
    argv = ["--model.teacher", str(teacher), "--data.source", "prompts", "--data.resolution", str(SIZE),
            "--data.batch_size", "2", "--train.max_steps", "2", "--train.output_dir", str(out),
            "--train.evaluate", "false", *args]
    return cli.main(method, argv=argv)


@pytest.fixture(scope="module")
def runs(work, teachers):
    """family -> output folder of a two-step DMD2 run on it (trained once)."""
    cache = {}

    def get(family: str) -> Path:
        if family not in cache:
            frames = ["--data.num_frames", str(FRAMES)] if family == "wan" else []
            cache[family] = train("dmd2", teachers(family), work / "runs" / family, "--data.prompts",
                                  str(work / "prompts.txt"), "--model.student_timesteps",
                                  ",".join(map(str, TLIST[family])), *NO_GAN, *frames)
        return cache[family]
    return get


def call_kwargs(family: str) -> dict:
    """What a plain call of the exported pipeline needs here: no CFG (Flux keeps its trained guidance
    embedding, the pipeline default), the tiny size, Wan's frame count."""
    kw = {"height": SIZE, "width": SIZE, "output_type": "pt"}
    if family != "flux":
        kw["guidance_scale"] = 1.0
    if family in ("pixart", "sana"):
        kw["use_resolution_binning"] = False
    if family == "wan":
        kw["num_frames"] = FRAMES
    return kw


def error_lines(capsys) -> list[str]:
    """stderr lines of a failed entry point, without progress bars (loading the tiny teacher writes some)."""
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]


def load_stock(family: str, folder: Path):
    index = json.loads((folder / "model_index.json").read_text())
    custom = any(isinstance(v, list) and v[0] in ("scheduling_fewstep", "experts_fewstep") for v in index.values())
    pipe = getattr(diffusers, STOCK[family]).from_pretrained(folder, trust_remote_code=custom)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, family: str, prompts, steps: int, seed: int = 7, global_seed: int = 11) -> torch.Tensor:
    torch.manual_seed(global_seed)      # SD3/Flux/Wan re-noise from the global RNG (no generator to step())
    out = pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               **call_kwargs(family))
    return out.frames if family == "wan" else out.images


# ----------------------------------------------------------------------------------- every family exports
@pytest.mark.parametrize("family", list(STOCK))
def test_export_reloads_in_stock_pipeline(family, runs, teachers):
    out = runs(family)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == STOCK[family] and index["scheduler"][1] == SCHED[family]
    card = (out / "README.md").read_text()
    assert STOCK[family] in card and f"num_inference_steps={len(TLIST[family])}" in card
    pipe = load_stock(family, out)
    assert type(pipe).__name__ == STOCK[family]
    x = generate(pipe, family, PROMPTS[:2], len(TLIST[family]))
    shape = (2, FRAMES, 3, SIZE, SIZE) if family == "wan" else (2, 3, SIZE, SIZE)
    assert tuple(x.shape) == shape and torch.isfinite(x).all()
    np.testing.assert_allclose(pipe.scheduler.timesteps.float().numpy(), TLIST[family], atol=1e-3)
    folder = "unet" if family in ("sd15", "sdxl") else "transformer"      # the student, not the teacher
    a, b = getattr(pipe, folder), getattr(load_stock(family, teachers(family)), folder)
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def fewstep_sampler(teacher: Path, model, family: str, tlist, prompts, steps: int, seed=7, global_seed=11):
    """fewstep's own sampler + VAE decode with the exported backbone ``model``: the reference."""
    pipe = getattr(diffusers, STOCK[family]).from_pretrained(teacher)
    sched = pipe.scheduler.config
    schedule = from_diffusers(sched)
    student = FewStepGenerator(Denoiser(adapter_for(model, prediction_type_of(sched)), schedule),
                               from_timesteps(tlist, schedule))
    codec = LatentCodec(pipe)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *codec.latent_shape(SIZE, SIZE)), generator=g)
    torch.manual_seed(global_seed)
    with torch.no_grad():
        cond = PromptEncoder(pipe, SIZE, SIZE).encode(prompts)
        # SD and Sana pass the generator to the scheduler's step; SD3 and Flux re-noise from the global RNG
        x0 = student.sample(noise, cond, generator=g if family in ("sd15", "sana") else None, steps=steps)
        return (codec.decode(x0) / 2 + 0.5).clamp(0, 1)


# SD1.5: stock LCMScheduler; SD3: FewStepScheduler; Flux and Sana: stock FlowMatchLCMScheduler. Flux draws its
# re-noising in packed token order, so only its one-step output can equal an unpacked sampler's.
EXACT = [("sd15", 1), ("sd15", 4), ("sd3", 1), ("sd3", 4), ("flux", 1), ("sana", 1)]


@pytest.mark.parametrize("family,steps", EXACT)
def test_stock_pipeline_equals_fewstep_sampler(family, steps, runs, teachers):
    pipe = load_stock(family, runs(family))
    model = pipe.unet if family == "sd15" else pipe.transformer
    ours = fewstep_sampler(teachers(family), model, family, TLIST[family], PROMPTS[:2], steps)
    theirs = generate(pipe, family, PROMPTS[:2], steps)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4, msg=f"{family} {steps} step(s)")


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_stock_scheduler_steps_equal_fewstep_scheduler(family, teachers):
    """The stock scheduler chosen for the export and FewStepScheduler take the same 4 steps (same model
    outputs, same generator): LCM for VP, FlowMatchLCM with FluxPipeline's linear sigmas for flow."""
    from fewstep.run.schedulers import fewstep_scheduler_for, student_scheduler_for

    config = json.loads((teachers(family) / "scheduler" / "scheduler_config.json").read_text())
    tlist = TLIST[family]
    stock = student_scheduler_for(config, tlist, pipeline_class=STOCK[family])
    ours = fewstep_scheduler_for(config, tlist)
    assert type(stock).__name__ == SCHED[family]
    kw = {"sigmas": np.linspace(1.0, 1 / 4, 4)} if family == "flux" else {}
    stock.set_timesteps(4, **kw)
    ours.set_timesteps(4)
    torch.testing.assert_close(stock.timesteps.float(), ours.timesteps.float())
    x = y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, t in enumerate(ours.timesteps):
        out = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10 + i))
        x = stock.step(out, stock.timesteps[i], x, generator=g1, return_dict=False)[0]
        y = ours.step(out, t, y, generator=g2, return_dict=False)[0]
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- LoRA mode
def test_lora_student_loads_on_teacher_pipeline(work, teachers):
    teacher = teachers("sd15")
    out = train("dmd2", teacher, work / "runs" / "sd15_lora", "--data.prompts", str(work / "prompts.txt"),
                "--model.mode", "lora", "--model.lora_rank", "4", "--model.student_timesteps", "999,749,499,249",
                "--optim.student.lr", "1e-2", "--train.ema_decay", "0", *NO_GAN)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "Load the full student" in card
    pipe = load_stock("sd15", teacher)
    pipe.scheduler = diffusers.LCMScheduler.from_pretrained(out, subfolder="scheduler")
    plain = generate(pipe, "sd15", PROMPTS[:2], 4)
    pipe.load_lora_weights(out)
    loaded = generate(pipe, "sd15", PROMPTS[:2], 4)
    fused = load_stock("sd15", out)
    for steps in (1, 4):
        ours = fewstep_sampler(teacher, fused.unet, "sd15", TLIST["sd15"], PROMPTS[:2], steps)
        torch.testing.assert_close(generate(pipe, "sd15", PROMPTS[:2], steps), ours, rtol=0, atol=1e-4)
        torch.testing.assert_close(generate(fused, "sd15", PROMPTS[:2], steps), ours, rtol=0, atol=1e-4)
    assert (loaded - plain).abs().max() > 1e-3, "the LoRA did not change the teacher's output"


def test_lora_export_over_a_bf16_base_equals_teacher_plus_lora(work, teachers):
    """Trained over a bf16-stored base, the fused full export is the adapter merged into the teacher's own
    weights, so it gives the images "teacher + LoRA file" gives (a merge into the bf16 copy differed by ~1e-3)."""
    teacher = teachers("sd15")
    out = train("dmd2", teacher, work / "runs" / "sd15_lora_bf16", "--data.prompts", str(work / "prompts.txt"),
                "--model.mode", "lora", "--model.lora_rank", "4", "--model.teacher_dtype", "bfloat16",
                "--optim.student.lr", "1e-2", "--train.ema_decay", "0", *NO_GAN)
    pipe = load_stock("sd15", teacher)
    pipe.scheduler = diffusers.LCMScheduler.from_pretrained(out, subfolder="scheduler")
    plain = generate(pipe, "sd15", PROMPTS[:2], 1)
    pipe.load_lora_weights(out)
    fused = load_stock("sd15", out)
    a, b = generate(pipe, "sd15", PROMPTS[:2], 1), generate(fused, "sd15", PROMPTS[:2], 1)
    assert (a - plain).abs().max() > 1e-3, "the LoRA did not change the teacher's output"
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ other methods
FLOW = ("sd3", "flux", "sana", "wan")
# real-data methods on the video family: fewstep has no real-video loader (a one-line error says so)
NEEDS_REAL_IMAGES = ("fdistill", "consistency")


def method_args(method: str, family: str, work: Path, teacher: Path) -> list[str]:
    """Arguments that make each method's digits preset train on a tiny text-to-image teacher."""
    flow = family in FLOW
    prompts = ["--data.prompts", str(work / "prompts.txt")]
    images = ["--data.images", str(work / "images")]
    if method == "sid":
        from fewstep.methods.sid import sid_timesteps

        sched = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
        return [*prompts, "--model.student_timesteps", ",".join(map(str, sid_timesteps(from_diffusers(sched), 2.5)))]
    if method == "fdistill":        # its discriminator needs real images
        return [*prompts, *images, "--model.student_timesteps", "1000" if flow else "999"]
    if method == "phased_dmd":      # one expert: a stock SD/SD3 pipeline holds one backbone
        return [*prompts, "--method.phases", "1", "--model.student_timesteps", "1000,500" if flow else "999,499"]
    if method == "consistency":     # LCM distills from real images: captioned images as the prompts
        return ["--data.source", "images", *images, "--model.student_timesteps",
                "1000,750,500,250" if flow else "999,749,499,249"]
    raise AssertionError(method)


@pytest.mark.parametrize("family", list(STOCK))
@pytest.mark.parametrize("method", OTHER_METHODS)
def test_other_methods_train_and_export(method, family, work, teachers, capsys):
    """Every method x every family: two training steps, export, reload in the stock pipeline, images (frames)
    of the right shape at the trained step count; methods that need real data stop with one line on video."""
    teacher = teachers(family)
    args = method_args(method, family, work, teacher)
    if family == "wan":
        args += ["--data.num_frames", str(FRAMES)]
    if family == "wan" and method in NEEDS_REAL_IMAGES:
        with pytest.raises(SystemExit) as e:
            train(method, teacher, work / "runs" / f"{method}_{family}", *args)
        assert e.value.code == 2 and error_lines(capsys) == [
            "error: data.images: real videos are not supported; leave it empty for video teachers"]
        return
    out = train(method, teacher, work / "runs" / f"{method}_{family}", *args)
    ts = json.loads((out / "config.json").read_text())["model"]["student_timesteps"]
    pipe = load_stock(family, out)
    assert type(pipe).__name__ == STOCK[family]
    x = generate(pipe, family, PROMPTS[:2], len(ts))
    shape = (2, FRAMES, 3, SIZE, SIZE) if family == "wan" else (2, 3, SIZE, SIZE)
    assert tuple(x.shape) == shape and torch.isfinite(x).all()


@pytest.mark.parametrize("family", list(STOCK))
def test_phased_students_export_for_every_family(family, work, teachers):
    """Two experts on every family: Wan 2.2's own layout (transformer, transformer_2), elsewhere the expert switch
    (FewStepExperts) in the backbone's slot. The stock pipeline loads and samples it; each expert runs its phase;
    the run folder reloads as a two-expert student."""
    flow = family in FLOW
    teacher = teachers(family)
    extra = ["--data.num_frames", str(FRAMES)] if family == "wan" else []
    out = train("phased_dmd", teacher, work / "runs" / f"phased2_{family}", "--data.prompts", str(work / "prompts.txt"),
                "--method.phases", "2", "--model.student_timesteps", "1000,500" if flow else "999,499",
                "--method.student_every", "1", "--optim.student.lr", "1e-2", *extra)
    index = json.loads((out / "model_index.json").read_text())
    folder = "unet" if family in ("sd15", "sdxl") else "transformer"
    pipe = load_stock(family, out)
    if family == "wan":
        assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index["boundary_ratio"] == 0.75
        first, second = pipe.transformer, pipe.transformer_2
    else:
        assert index[folder] == ["experts_fewstep", "FewStepExperts"]
        switch = getattr(pipe, folder)
        first, second = switch.experts
        ts = [1000, 500] if flow else [999, 499]
        assert [switch.expert_for(switch.config.get("timestep_scale", 1) * t / (1000 if family == "flux" else 1))
                for t in ts] == [0, 1]
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    x = generate(pipe, family, PROMPTS[:2], 2)
    shape = (2, FRAMES, 3, SIZE, SIZE) if family == "wan" else (2, 3, SIZE, SIZE)
    assert tuple(x.shape) == shape and torch.isfinite(x).all()
    student = FewStepGenerator.from_pretrained(out)
    assert student.P == 2 and student.phase_of_step == [0, 1]
    for mine, theirs in zip(student.experts, (first, second)):
        assert all(torch.equal(a, b) for a, b in zip(mine.backbone.model.state_dict().values(),
                                                      theirs.state_dict().values()))


# --------------------------------------------------------------------------------------------------- data
def source(teacher: Path, **fields):
    from fewstep.training.data import prompt_source

    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher)
    return prompt_source(DataConfig(source="prompts", resolution=SIZE, batch_size=fields.pop("batch_size", 2),
                                    **fields), pipe, seed=3)


def test_prompt_source_is_split_invariant_and_caches(work, teachers, tmp_path):
    teacher = teachers("sd15")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt" if i % 2 else "text": p}) + "\n" for i, p in enumerate(PROMPTS)))
    whole = source(teacher, prompts=str(jsonl), images=str(work / "images"), batch_size=4)
    assert whole.prompts == PROMPTS and whole.sample_shape == (4, SIZE // 2, SIZE // 2)
    b = whole.batch(5, 1)
    assert b.noise.shape == (4, 4, 16, 16) and b.cond.text.shape[0] == 4 and b.uncond.text.shape[0] == 4
    assert b.x0_real.shape == (4, 4, 16, 16) and b.cond_real.text.shape[0] == 4
    halves = source(teacher, prompts=str(jsonl), images=str(work / "images"), batch_size=1)
    parts = [halves.batch(5, 1, micro=m, rank=r, world=2) for m in range(2) for r in range(2)]
    torch.testing.assert_close(torch.cat([p.noise for p in parts]), b.noise, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p.cond.text for p in parts]), b.cond.text, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p.x0_real for p in parts]), b.x0_real, rtol=0, atol=0)
    cache = tmp_path / "emb.pt"
    first = source(teacher, prompts=str(jsonl), images=str(work / "images"), cache_embeddings=str(cache))
    x = first.batch(0, 0)
    assert cache.is_file()
    again = source(teacher, prompts=str(jsonl), images=str(work / "images"), cache_embeddings=str(cache))
    again.encoder.encode = again.codec = None   # every embedding and latent must come from the file
    y = again.batch(0, 0)
    torch.testing.assert_close(y.cond.text, x.cond.text, rtol=0, atol=0)
    torch.testing.assert_close(y.x0_real, x.x0_real, rtol=0, atol=0)


def test_bad_data_is_a_one_line_config_error(work, teachers, tmp_path):
    teacher = teachers("sd15")
    empty, bad_json, gray, broken = (tmp_path / n for n in ("empty.txt", "bad.jsonl", "gray", "broken"))
    empty.write_text("\n  \n")
    bad_json.write_text('{"prompt": "ok"}\n{"prompt": \n')
    gray.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(gray / "g.png")
    broken.mkdir()
    (broken / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    prompts = str(work / "prompts.txt")
    cases = [(dict(prompts=str(tmp_path / "missing.txt")), "does not exist"),
             (dict(prompts=str(empty)), "holds no prompts"),
             (dict(prompts=str(bad_json)), "line 2 is not valid JSON"),
             (dict(prompts=prompts, images=str(gray)), "has 1 channel(s)"),
             (dict(prompts=prompts, images=str(broken)), "is not a readable image"),
             (dict(prompts=prompts, images=str(tmp_path / "nope")), "is not a folder"),
             (dict(prompts=""), "needs data.prompts")]
    try:
        import datasets  # noqa: F401
    except ImportError:
        cases.append((dict(prompts=str(tmp_path)), "needs the datasets package"))
    for fields, needle in cases:
        with pytest.raises(ConfigError) as e:
            source(teacher, **fields)
        assert needle in str(e.value) and "\n" not in str(e.value), (fields, str(e.value))


def test_cli_prompt_errors_exit_2_before_training(work, teachers, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train("dmd2", teachers("sd15"), out, "--data.prompts", str(tmp_path / "none.txt"), *NO_GAN)
    err = error_lines(capsys)
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: data.prompts") and not out.exists()


# ------------------------------------------------------------------------------------------------ presets
NEW_PRESETS = {"sdxl_dmd2_4step": "stabilityai/stable-diffusion-xl-base-1.0",
               "sdxl_dmd2_lora": "stabilityai/stable-diffusion-xl-base-1.0",
               "sd3_dmd2": "stabilityai/stable-diffusion-3-medium-diffusers",
               "flux_dmd2": "black-forest-labs/FLUX.1-dev"}


def test_text_to_image_presets(monkeypatch, tmp_path):
    from fewstep.run.presets import PRESETS

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))    # an empty cache
    sd15 = PRESETS["dmd2"]["sd15_dmd2"]()
    assert (sd15.method.guidance_scale, sd15.method.student_every, sd15.optim["student"].lr) == (1.75, 10, 1e-5)
    for name, hub_id in NEW_PRESETS.items():
        cfg = PRESETS["dmd2"][name]()
        assert cfg.model.teacher == hub_id and cfg.data.source == "prompts"
        with pytest.raises(ConfigError) as e:
            build.load_teacher(cfg.model)
        msg = str(e.value)
        assert hub_id in msg and "download it first" in msg and "\n" not in msg
    x4 = PRESETS["dmd2"]["sdxl_dmd2_4step"]()
    assert x4.model.student_timesteps == (999, 749, 499, 249) and x4.method.backward_simulation
    assert (x4.method.student_every, x4.optim["student"].lr, x4.method.guidance_scale) == (5, 5e-7, 8.0)
    assert (x4.method.gan_weight_student, x4.method.gan_weight_critic) == (5e-3, 1e-2)
    lora = PRESETS["dmd2"]["sdxl_dmd2_lora"]()
    assert (lora.model.mode, lora.model.lora_rank, lora.optim["student"].lr) == ("lora", 64, 5e-5)
    for name in ("sd3_dmd2", "flux_dmd2"):
        ts = PRESETS["dmd2"][name]().model.student_timesteps
        assert ts[0] == 1000 and all(a > b for a, b in zip(ts, ts[1:]))


# every real-model preset of every method -> (method, tiny family, what else its data needs)
PRESET_TEACHER = {"sd15_dmd2": ("dmd2", "sd15", ()), "sdxl_dmd2_4step": ("dmd2", "sdxl", ()),
                  "sdxl_dmd2_lora": ("dmd2", "sdxl", ()), "sd3_dmd2": ("dmd2", "sd3", ()),
                  "flux_dmd2": ("dmd2", "flux", ()), "sd15_sid_lsg": ("sid", "sd15", ()),
                  "sd15_fdistill": ("fdistill", "sd15", ()),
                  "sd15_sfd": ("sfd", "sd15", ()),
                  "wan_phased_dmd": ("phased_dmd", "wan", ("--data.num_frames", str(FRAMES), "--data.images", "")),
                  "sd15_lcm": ("consistency", "sd15", ("--data.source", "images")),
                  "sdxl_lcm_lora": ("consistency", "sdxl", ("--data.source", "images")),
                  "sdxl_decoupled_dmd_4step": ("decoupled_dmd", "sdxl", ()),
                  "sd21_swiftbrush": ("swiftbrush", "sd15", ()), "sd15_pgsb": ("swiftbrush", "sd15", ()),
                  "pixart_pgsb": ("swiftbrush", "pixart", ()),
                  "sd15_kd": ("kd", "sd15", ("--method.pairs", "2", "--method.teacher_steps", "2")),
                  "sd15_guidance_lora": ("guidance_lora", "sd15", ("--data.source", "images",
                                                                   "--method.sample_steps", "2")),
                  "sd35_twinflow": ("twinflow", "sd3", ("--data.batch_size", "4")),
                  "sd35_twinflow_lora": ("twinflow", "sd3", ("--data.batch_size", "4")),
                  # one recorded node, then one backtracking step at the teacher
                  "sdxl_disback": ("disback", "sdxl", ("--method.record_steps", "1", "--method.snapshot_every", "1",
                                                       "--train.max_steps", "2")),
                  "sd15_msd": ("msd", "sd15", ())}


def test_every_real_model_preset_is_listed_here():
    from fewstep.run.presets import PRESETS

    real = {name for presets in PRESETS.values() for name in presets if not name.startswith("digits")}
    assert real == set(PRESET_TEACHER)


@pytest.mark.parametrize("preset", list(PRESET_TEACHER))
def test_preset_runs_on_tiny_teacher(preset, work, teachers):
    """The real-model presets as published (bf16, GAN, LoRA, backward simulation, accumulation), one step on the
    tiny teacher of their family: only the teacher, data paths, size and batch are overridden."""
    method, family, extra = PRESET_TEACHER[preset]
    out = train(method, teachers(family), work / "runs" / preset, "--preset", preset,
                "--data.prompts", str(work / "prompts.txt"), "--data.images", str(work / "images"),
                "--data.batch_size", "1", "--train.max_steps", "1", *extra)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == STOCK[family]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_lora_loads_on_teacher_pipeline(family, work, teachers):
    """Transformer LoRAs are saved with peft's keys: every adapted layer loads (a half-converted dict loads
    only partly, silently)."""
    teacher = teachers(family)
    out = train("dmd2", teacher, work / "runs" / f"{family}_lora", "--data.prompts", str(work / "prompts.txt"),
                "--model.mode", "lora", "--model.lora_rank", "4", "--model.student_timesteps", "1000",
                "--optim.student.lr", "1e-2", "--train.ema_decay", "0", *NO_GAN)
    pipe = load_stock(family, teacher)
    pipe.scheduler = diffusers.FlowMatchLCMScheduler.from_pretrained(out, subfolder="scheduler")
    plain = generate(pipe, family, PROMPTS[:2], 1)
    pipe.load_lora_weights(out)
    loaded = generate(pipe, family, PROMPTS[:2], 1)
    fused = generate(load_stock(family, out), family, PROMPTS[:2], 1)
    torch.testing.assert_close(loaded, fused, rtol=0, atol=1e-4)
    assert (loaded - plain).abs().max() > 1e-3, "the LoRA did not change the teacher's output"
