"""Evaluation suite: eval/generate.py, fid.py, clip_score.py and benchmark.py on tiny models built from
configs (no downloads). Frechet distances, KID and CLIP scores are checked against direct numpy/scipy/torch
computations; generation against batch-size independence."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import tiny_class_unet
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def load_script(name: str):
    """Import eval/<name>.py (eval/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"fewstep_eval_{name}", ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script(name: str, *args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "eval" / f"{name}.py"), *map(str, args)], capture_output=True,
                          text=True, env=env or ENV, timeout=timeout, cwd=ROOT)


def conv_unet(seed: int = 0):
    """A 16x16 class-conditional UNet2DModel without attention: the benchmark runs it 50 steps with CFG."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11).eval()


@pytest.fixture(scope="module")
def class_dirs(tmp_path_factory):
    """A 16x16 tiny teacher (DDIM) and a 2-step student (with attention) exported as a self-contained pipeline."""
    from diffusers import DDIMScheduler
    from fewstep_pipelines import FewStepClassPipeline

    from fewstep.run.folders import save_pipeline_dir
    from fewstep.run.schedulers import fewstep_scheduler_for

    root = tmp_path_factory.mktemp("models")
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
                          set_alpha_to_one=False, timestep_spacing="trailing")
    conv_unet().save_pretrained(root / "teacher" / "unet")
    sched.save_pretrained(root / "teacher" / "scheduler")
    student = FewStepClassPipeline(unet=tiny_class_unet(sample_size=16),
                                   scheduler=fewstep_scheduler_for(sched.config, [999, 499]))
    save_pipeline_dir(student, root / "student")
    return root / "teacher", root / "student"


def tiny_sd_pipeline_dir(path: Path) -> Path:
    """A complete tiny StableDiffusionPipeline (char-level CLIP tokenizer built in memory), saved to ``path``."""
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = char_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, sample_size=16)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=tok.model_max_length,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    sched = LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=te.eval(), tokenizer=tok,
                                   scheduler=sched, safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def char_tokenizer(max_length: int = 16):
    """A CLIPTokenizer over single bytes (no merges), built in memory: 2 specials + 256 chars + 256 'char</w>'."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def write_images(folder: Path, arrays) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(folder / f"{i:06d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


def png_tensor(paths) -> torch.Tensor:
    """[N, 3, H, W] float in [0, 255], as clean-fid hands images to a feature network."""
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float()
                        for p in paths])


# ---------------------------------------------------------------- fid.py

FEATURE_MODULE = '''
import torch

class Net(torch.nn.Module):
    """Fixed random projection of 4x4-pooled pixels: [B, 3, H, W] in [0, 255] -> [B, 6]."""
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(48, 6, generator=g), requires_grad=False)
    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        return torch.tanh(x @ self.w)

def make():
    return Net()
'''


def direct_fd(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def direct_kid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y/d + 1)^3 over all samples (equal set sizes)."""
    d, m = f1.shape[1], len(f1)
    kxx, kyy, kxy = ((f1 @ f1.T / d + 1) ** 3, (f2 @ f2.T / d + 1) ** 3, (f1 @ f2.T / d + 1) ** 3)
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2 * kxy.sum() / m**2)


def test_fid_custom_features_match_direct_frechet_and_kid(tmp_path):
    rng = np.random.default_rng(0)
    a = write_images(tmp_path / "a", rng.integers(0, 256, (40, 12, 12, 3), dtype=np.uint8))
    b = write_images(tmp_path / "b", (rng.integers(0, 200, (40, 12, 12, 3)) + rng.integers(0, 56, (40, 1, 1, 1)))
                     .astype(np.uint8))
    (tmp_path / "featmod.py").write_text(FEATURE_MODULE)
    res = script("fid", tmp_path / "a", tmp_path / "b", "--features", "featmod:make", "--kid", "--quiet",
                 "--json", tmp_path / "r.json", env={**ENV, "PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["metric"].startswith("FD") and "FID" not in out["metric"]

    sys.path.insert(0, str(tmp_path))
    try:
        import featmod
    finally:
        sys.path.remove(str(tmp_path))
    net = featmod.make()
    with torch.no_grad():
        f1, f2 = (net(png_tensor(p)).double().numpy() for p in (a, b))
    assert out["value"] > 1e-3
    assert out["value"] == pytest.approx(direct_fd(f1, f2), rel=1e-4)
    # 40 vs 40 images: every KID subset is the whole set, so clean-fid's estimate is deterministic
    assert out["kid"] == pytest.approx(direct_kid(f1, f2), rel=1e-4, abs=1e-9)


def test_fid_without_inception_weights_fails_fast_with_one_line(tmp_path):
    fid = load_script("fid")
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        write_images(tmp_path / name, rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    env = {k: v for k, v in ENV.items() if k != "FEWSTEP_INCEPTION"}
    runs = [[]] if not fid.cleanfid_cache().exists() else []
    runs.append(["--inception", tmp_path / "missing" / fid.INCEPTION_FILE])
    for extra in runs:
        t0 = time.perf_counter()
        res = script("fid", tmp_path / "a", tmp_path / "b", *extra, env=env, timeout=30)
        elapsed = time.perf_counter() - t0
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, res.stderr
        assert len(lines) == 1, res.stderr
        assert fid.INCEPTION_FILE in lines[0] and "--inception" in lines[0] and "FEWSTEP_INCEPTION" in lines[0]
        assert elapsed < 10


def test_fid_empty_or_unreadable_images_fail_with_one_line(tmp_path):
    """An empty folder, a non-image and a truncated PNG among images, a bad .zip member, an empty reference:
    exit status 2 and one `error:` line naming the folder or file, never a traceback."""
    import zipfile

    rng = np.random.default_rng(2)
    good = write_images(tmp_path / "good", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    bad = tmp_path / "bad"
    write_images(bad, rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    (bad / "000001.png").write_bytes(b"not a png")                               # sorted first among the bad
    (bad / "000002.png").write_bytes(good[0].read_bytes()[:40])                 # truncated
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        z.write(good[0], "a.png")
        z.writestr("b.png", b"broken")
    cases = [((tmp_path / "empty",), "generated folder " + str(tmp_path / "empty") + " holds no images"),
             ((bad,), f"{bad / '000001.png'} cannot be read"),
             ((tmp_path / "imgs.zip",), f"b.png in {tmp_path / 'imgs.zip'} cannot be read"),
             ((tmp_path / "good", tmp_path / "empty"), "reference folder " + str(tmp_path / "empty") + " holds no"),
             ((tmp_path / "good", bad), "reference image")]
    for args, named in cases:
        res = script("fid", *args, "--features", "digits", "--quiet", timeout=60)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert lines[0].startswith("error: ") and named in lines[0], lines[0]
    res = script("fid", bad, "--features", "digits", "--quiet", timeout=60)
    assert "(and 1 more unreadable)" in res.stderr and "delete or replace it" in res.stderr
    res = script("fid", tmp_path / "good", "--features", "digits", "--quiet", "--num", "2", timeout=120)
    assert res.returncode == 0 and "FD-digits" in res.stdout and "(2 images)" in res.stdout, res.stderr


def test_fid_digits_reproduces_digits_eval_score(class_dirs, tmp_path):
    from fewstep.digits import metrics
    from fewstep.digits import scoring as digits_eval

    _, student = class_dirs
    n = 100
    gen = load_script("generate")
    assert gen.main([str(student), "--classes", "0-9", "--num", str(n), "--seed", "0", "--batch-size", "32",
                     "--out", str(tmp_path / "gen"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gen" / "labels.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [i % 10 for i in range(n)] and rows[5]["seed"] == 5

    fid = load_script("fid")
    out = fid.compute(tmp_path / "gen", features="digits")
    assert out["metric"] == "FD-digits" and out["num_images"] == n
    ref = digits_eval.score(digits_eval.load_pipeline(student), n, seeds=(0,))
    assert out["value"] == pytest.approx(ref["fd_digits"], rel=1e-3)      # PNGs are quantized to 8 bits
    files = sorted((tmp_path / "gen").glob("*.png"))
    x = png_tensor(files)[:, :1] / 127.5 - 1
    assert out["value"] == pytest.approx(metrics.fd_digits(x), rel=1e-6)


# ---------------------------------------------------------------- generate.py


def test_generation_is_seed_stable_and_resumable(class_dirs, tmp_path):
    from fewstep.digits import scoring as digits_eval

    gen = load_script("generate")
    _, student = class_dirs
    pipe = digits_eval.load_pipeline(student)
    items = gen.build_items(None, gen.parse_classes("0-4,7"), 8, seed=100)
    for bs in (1, 8):
        assert gen.generate_images(pipe, "class", items, tmp_path / f"b{bs}", batch_size=bs, progress=False) == 8
    one = np.stack([np.array(Image.open(tmp_path / "b1" / it["file"])) for it in items]).astype(int)
    eight = np.stack([np.array(Image.open(tmp_path / "b8" / it["file"])) for it in items]).astype(int)
    assert np.abs(one - eight).max() <= 1      # float round-off of batched convs, at most one 8-bit level
    assert one.std() > 0 and np.abs(one[0] - one[1]).max() > 0

    labels = [it["label"] for it in items]
    seeds = [torch.Generator().manual_seed(it["seed"]) for it in items]
    batched = pipe(labels, generator=seeds, output_type="pt").images
    singles = torch.cat([pipe([lab], generator=[torch.Generator().manual_seed(it["seed"])], output_type="pt").images
                         for lab, it in zip(labels, items)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)

    (tmp_path / "b8" / items[3]["file"]).unlink()
    assert gen.generate_images(pipe, "class", items, tmp_path / "b8", batch_size=8, progress=False) == 1
    assert (np.array(Image.open(tmp_path / "b8" / items[3]["file"])).astype(int) - one[3]).max() <= 1


def test_generate_text_to_image_prompts_manifest(tmp_path):
    from fewstep.digits import scoring as digits_eval

    gen = load_script("generate")
    sd = tiny_sd_pipeline_dir(tmp_path / "sd")
    pipe, kind = digits_eval.load_any_pipeline(sd)
    assert kind == "text"
    (tmp_path / "p.txt").write_text("a red cat\na blue dog\n\nthree trees\n")
    items = gen.build_items(gen.read_prompts(tmp_path / "p.txt"), None, 4, seed=3)
    (tmp_path / "out").mkdir()
    gen.write_manifest(tmp_path / "out", items)
    for bs, folder in ((1, "out"), (4, "out4")):
        gen.generate_images(pipe, kind, items, tmp_path / folder, batch_size=bs, steps=1, guidance_scale=1.0,
                            progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red cat", "a blue dog", "three trees", "a red cat"]
    a = np.stack([np.array(Image.open(tmp_path / "out" / r["file"])) for r in rows]).astype(int)
    b = np.stack([np.array(Image.open(tmp_path / "out4" / r["file"])) for r in rows]).astype(int)
    assert a.shape == (4, 16, 16, 3) and np.abs(a - b).max() <= 1


# ---------------------------------------------------------------- clip_score.py


def test_clip_score_matches_direct_computation(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = char_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    prompts = ["a red cat", "a blue dog", "three", "seven", "a tree on a hill", "0"]
    rng = np.random.default_rng(0)
    files = write_images(tmp_path / "gen", rng.integers(0, 256, (len(prompts), 24, 24, 3), dtype=np.uint8))
    images = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]

    def direct(m):
        with torch.no_grad():
            out = m(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
        return max(100 * (out.image_embeds * out.text_embeds).sum(-1).mean().item(), 0.0)

    if direct(model) == 0.0:    # an untrained CLIP often has negative cosines: flip one projection
        model.visual_projection.weight.data.neg_()
    expected = direct(model)
    assert expected > 1.0
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    (tmp_path / "gen" / "prompts.jsonl").write_text(
        "".join(json.dumps({"file": f.name, "prompt": p}) + "\n" for f, p in zip(files, prompts)))

    cs = load_script("clip_score")
    out = cs.clip_score(tmp_path / "gen", tmp_path / "clip", batch_size=4, progress=False)
    assert out["num_images"] == len(prompts)
    assert out["clip_score"] == pytest.approx(expected, rel=1e-5)
    res = subprocess.run([sys.executable, str(ROOT / "eval" / "clip_score.py"), str(tmp_path / "gen")],
                         capture_output=True, text=True, env={k: v for k, v in ENV.items() if k != "FEWSTEP_CLIP"},
                         timeout=30)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "--clip" in res.stderr


# ---------------------------------------------------------------- benchmark.py


BENCH_GRID = ["--grid-guidance", "1,2", "--grid-steps", "2,4", "--grid-samplers", "ddim,ddpm",
              "--grid-screen-samples", "50"]


def test_benchmark_writes_report_and_plots(class_dirs, tmp_path, capsys):
    """The reference is the teacher at its best over the declared grid (here 2 x 2 x 2 settings, none of them the
    fixed 50-step CFG-2 setting): every ratio divides by its FD-digits, read back from the grid's cache; the ratio
    to the fixed setting is a second, labelled column."""
    from fewstep.digits.teacher_grid import label, teacher_best

    bench = load_script("benchmark")
    teacher, student = class_dirs
    out = tmp_path / "report"
    assert bench.main([str(student), "--teacher", str(teacher), "--out", str(out), "--samples", "20", "--seeds", "0",
                       "--teacher-steps", "1", "--batch", "4", "--repeats", "1", "--latency-repeats", "1",
                       *BENCH_GRID]) == 0
    # one progress line per phase on stderr (never minutes of silence), the last naming what was written
    progress = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("[") and " s] " in line for line in progress), progress
    phases = " | ".join(progress)
    for phase in (f"teacher {teacher} at its best over its grid (8 settings", "[8/8] DDPM, 4 steps, CFG 2",
                  f"teacher {teacher} at 1 step(s)", f"teacher {teacher} at 50 step(s)", f"student {student} at 2",
                  "student: images/s", "teacher 50 steps: images/s", "teacher at its best (", "teacher at its best: ",
                  f"plots and sample grid into {out}"):
        assert phase in phases, (phase, progress)
    assert str(out / "report.md") in progress[-1] and str(out / "report.json") in progress[-1]
    assert "samples.png" in progress[-1]
    for name in ("report.md", "report.json", "quality_vs_nfe.png", "throughput.png", "samples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    ref, fixed = report["reference"], report["fixed_reference"]
    best_name = f"teacher at its best ({ref['setting']})"
    assert set(rows) == {"teacher 1 step", "teacher 50 steps", best_name, "student"}

    # the reference is the grid's best, as cached beside the teacher for this grid and protocol
    grid = teacher_best(teacher, 20, seeds=(0,), grid={"guidance_scale": (1.0, 2.0), "steps": (2, 4),
                                                       "sampler": ("ddim", "ddpm")}, screen_samples=50, compute=False)
    best = grid["best"]
    assert ref["setting"] == label(best) == label(min(grid["screen"], key=lambda r: r["fd_digits"]))
    assert ref["fd_digits"] == best["fd_digits"] == rows[best_name]["fd_digits"] == report["teacher_best_fd_digits"]
    assert ref["protocol"] == grid["protocol"] and "8 settings" in ref["protocol"] and len(ref["screen"]) == 8
    assert rows[best_name]["nfe"] == best["steps"] * (1 if best["guidance_scale"] == 1.0 else 2)
    fixed_fd = rows["teacher 50 steps"]["fd_digits"]
    assert fixed["fd_digits"] == fixed_fd == report["teacher_fixed_fd_digits"]
    assert abs(best["fd_digits"] - fixed_fd) > 1e-3 * fixed_fd       # so the two ratios below differ
    # every ratio divides by the teacher at its best; the fixed-setting ratio sits beside it
    for r in rows.values():
        assert r["fd_ratio_to_teacher"] == pytest.approx(r["fd_digits"] / best["fd_digits"], rel=1e-12)
        assert r["fd_ratio_std"] == pytest.approx(r["fd_digits_std"] / best["fd_digits"], rel=1e-12)
        assert r["fd_ratio_to_teacher_fixed"] == pytest.approx(r["fd_digits"] / fixed_fd, rel=1e-12)
    assert rows[best_name]["fd_ratio_to_teacher"] == 1.0 and rows["teacher 50 steps"]["fd_ratio_to_teacher_fixed"] == 1
    assert rows["student"]["fd_ratio_to_teacher"] != pytest.approx(rows["student"]["fd_ratio_to_teacher_fixed"])

    assert rows["student"]["nfe"] == 2 and rows["teacher 50 steps"]["nfe"] == 100
    for r in (rows["student"], rows["teacher 50 steps"], rows[best_name]):
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert r["latency_s"] > 0 and r["peak_memory_mb"] > 0
    md = (out / "report.md").read_text()
    assert "| student | 2 / 2 |" in md and "FD-digits" in md
    assert f"**Reference: the teacher at its best, {ref['setting']}** (NFE {rows[best_name]['nfe']})" in md
    assert ref["protocol"] in md and f"| {best_name} | {best['steps']} / {rows[best_name]['nfe']} |" in md
    assert "| FD ratio to the teacher at its best | ratio to the teacher at 50 steps, CFG 2 (a fixed setting) |" in md
    assert f"| {ref['setting']} (best) |" in md
    assert ("Note: teacher 50 steps score below" in md) == (rows["teacher 50 steps"]["fd_ratio_to_teacher"] < 1)
    assert md.replace("not FID", "").count("FID") == 0
    assert image_size(out / "samples.png")[0] > 500


def test_benchmark_defaults_read_the_bundled_teachers_cached_grid():
    """`python eval/benchmark.py runs/dmd2_digits` asks teacher_best for the protocol the bundled teacher's cache
    holds (2000 samples, seed 0, the default grid): it scores no grid setting; --help says so."""
    from fewstep.digits import DIGITS_TEACHER, teacher_grid

    bench = load_script("benchmark")
    request = bench.grid_request(bench.parser().parse_args(["runs/dmd2_digits"]))
    assert request["grid"] == {k: tuple(sorted(v)) for k, v in teacher_grid.GRID.items()}
    cached = teacher_grid.teacher_best(DIGITS_TEACHER, compute=False, **request)     # LookupError on a cache miss
    assert cached["best"]["num_samples"] == 2000 and len(cached["screen"]) == 24
    typed = bench.grid_request(bench.parser().parse_args(["x", "--grid-guidance", "2,1.5,1.25,1",
                                                          "--grid-samplers", "DDPM,ddim"]))
    assert typed == request                                   # the order typed does not miss the cache
    text = bench.parser().format_help()
    for phrase in ("teacher at its best", "--grid-guidance", "--grid-screen-samples", "weights' hash",
                   "(a fixed setting)", "stochastic DDPM"):
        assert phrase in text, phrase


def test_methods_table_from_run_metrics(tmp_path, capsys):
    """Rows are method x steps x teacher: a text-to-image run and a run of another teacher are never pooled with
    the digits runs, a copy of a run counts once, and every folder left out is named on stderr with the reason."""
    import shutil

    bench = load_script("benchmark")
    runs = tmp_path / "runs"

    def run(name, method, steps, fd, updates, seconds=None, teacher=""):
        d = runs / name
        d.mkdir(parents=True)
        m = {"student": {"accuracy": 0.9, "fd_digits": fd, "fd_digits_std": 0.1, "steps": steps},
             "teacher": {"fd_digits": 2.0}, "fd_ratio_to_teacher": fd / 2.0,
             "updates": {"critic": 5 * updates, "student": updates}}
        if seconds is not None:
            m["train_seconds"] = seconds
        (d / "metrics.json").write_text(json.dumps(m))
        source = "prompts" if teacher == "digits_t2i" else "digits"
        (d / "config.json").write_text(json.dumps({"method_name": method, "model": {"teacher": teacher},
                                                   "data": {"source": source}}))
        return d

    run("a", "dmd2", 1, 3.0, 100, 60.0)
    run("b", "dmd2", 1, 5.0, 100, 80.0)
    run("c", "dmd2", 4, 2.5, 200, 90.0)
    run("d", "sid", 1, 4.0, 300)
    run("t2i", "dmd2", 1, 9.0, 100, 50.0, teacher="digits_t2i")            # a text-to-image digits run
    run("other", "dmd2", 1, 7.0, 100, 40.0, teacher="/models/my_teacher")   # another teacher
    shutil.copytree(runs / "a", runs / "a_copy")                            # the same run twice
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "config.json").write_text(json.dumps({"method_name": "dmd2"}))
    (runs / "no_config").mkdir()
    (runs / "no_config" / "metrics.json").write_text((runs / "a" / "metrics.json").read_text())
    run("broken", "dmd2", 1, 1.0, 100)
    (runs / "broken" / "metrics.json").write_text('{"student": ')
    folders = [str(d) for d in sorted(runs.iterdir())]                   # as the shell expands runs/*
    assert bench.main(["--methods-table", *folders, "--out", str(tmp_path / "tab")]) == 0
    out, err = capsys.readouterr()
    rows = json.loads((tmp_path / "tab" / "methods.json").read_text())["rows"]
    by = {(r["method"], r["steps"], r["teacher"]): r for r in rows}
    digits = bench.BUNDLED_TEACHER
    assert set(by) == {("dmd2", 1, digits), ("dmd2", 4, digits), ("sid", 1, digits), ("dmd2", 1, "digits_t2i"),
                       ("dmd2", 1, "/models/my_teacher")}
    pooled = by[("dmd2", 1, digits)]
    assert pooled["runs"] == 2 and sorted(Path(d).name for d in pooled["run_dirs"]) == ["a", "b"]
    assert pooled["fd_ratio"] == pytest.approx(2.0) and pooled["fd_ratio_spread"] == pytest.approx(0.5)
    assert pooled["wall_seconds"] == pytest.approx(70.0)
    assert by[("dmd2", 1, "digits_t2i")]["runs"] == 1 and by[("dmd2", 1, "digits_t2i")]["fd_ratio"] == 4.5
    assert by[("dmd2", 4, digits)]["generator_updates"] == 200 and by[("sid", 1, digits)]["wall_seconds"] is None
    md = (tmp_path / "tab" / "methods.md").read_text()
    assert f"| dmd2 | 1 | {digits} | 2 |" in md and "| dmd2 | 1 | digits_t2i | 1 |" in md
    skipped = {line.split(":")[0].removeprefix("skipped "): line for line in err.splitlines()
               if line.startswith("skipped ")}
    assert set(skipped) == {str(runs / n) for n in ("a_copy", "unfinished", "no_config", "broken")}, err
    assert "no metrics.json" in skipped[str(runs / "unfinished")]
    assert "no config.json" in skipped[str(runs / "no_config")]
    assert "unreadable metrics.json" in skipped[str(runs / "broken")]
    assert f"same metrics.json as {runs / 'a'}" in skipped[str(runs / "a_copy")]
    assert str(tmp_path / "tab" / "methods.md") in out


def test_methods_table_rebases_old_runs_on_the_teacher_at_its_best(tmp_path, capsys):
    """--rebase divides a run scored against the fixed CFG-2 teacher by the teacher's best FD-digits from its
    cached grid at the run's own protocol; a teacher without a cached grid is skipped with the command to make one,
    and a run that already names its reference keeps its ratio."""
    from fewstep.digits import DIGITS_TEACHER
    from fewstep.digits.teacher_grid import teacher_best

    bench = load_script("benchmark")
    best = teacher_best(DIGITS_TEACHER, 2000, compute=False)["best"]

    def run(name, fd, teacher="", **extra):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        m = {"student": {"accuracy": 0.9, "fd_digits": fd, "fd_digits_std": 0.5, "steps": 1, "num_samples": 2000,
                         "seeds": [0, 1, 2]},
             "teacher": {"fd_digits": 89.0}, "fd_ratio_to_teacher": fd / 89.0, "updates": {"student": 10}, **extra}
        (d / "metrics.json").write_text(json.dumps(m))
        (d / "config.json").write_text(json.dumps({"method_name": name, "model": {"teacher": teacher}}))
        return str(d)

    folders = [run("old", 30.0), run("new", 20.0, reference="the teacher at its best: X", fd_ratio_to_teacher=1.7),
               run("mine", 30.0, teacher=str(tmp_path / "no_such_teacher"))]
    assert bench.main(["--methods-table", "--rebase", *folders, "--out", str(tmp_path / "tab")]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "tab" / "methods.json").read_text())["rows"]}
    assert rows["old"]["fd_ratio"] == pytest.approx(30.0 / best["fd_digits"])
    assert rows["old"]["fd_ratio_spread"] == pytest.approx(0.5 / best["fd_digits"])
    assert rows["old"]["reference"].startswith("the teacher at its best: ")
    assert rows["new"]["fd_ratio"] == 1.7 and rows["new"]["reference"] == "the teacher at its best: X"
    assert "mine" not in rows and "python benchmarks/teacher_grid.py" in capsys.readouterr().err
    # without --rebase the old run keeps its CFG-2 ratio, labelled as such
    assert bench.main(["--methods-table", folders[0], "--out", str(tmp_path / "tab2")]) == 0
    row = json.loads((tmp_path / "tab2" / "methods.json").read_text())["rows"][0]
    assert row["fd_ratio"] == pytest.approx(30.0 / 89.0) and "CFG 2" in row["reference"]
