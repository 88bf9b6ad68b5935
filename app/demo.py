"""Gradio demo: a many-step teacher and its few-step student side by side, each with its latency.

    python app/demo.py                                   # bundled teacher + newest student under runs/
    python app/demo.py --student runs/dmd2_digits_4step --port 7861
    python app/demo.py --teacher /models/sd15 --student /models/sd15-dmd2     # text-to-image directories

Class-conditional directories (the digits teacher and its students) take a class; text-to-image
directories take a prompt. The student's step slider stops at its trained step count (``train_timesteps``
in its scheduler config; a one-step student's slider is locked at 1). Bad input (no model, empty prompt,
out-of-range values) is answered with a message in the page, never a stack trace. Serves on 127.0.0.1
unless ``--host`` says otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    torch.set_num_threads(1)   # 2-core machines: a second busy torch thread slows everything down up to 80x

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"
DISPLAY_PX = 256          # tiny digits images are enlarged (nearest neighbour) to at least this size
MAX_SEED = 2**31 - 1
MAX_TEACHER_STEPS = 200
MAX_CFG = 20.0
_CACHE: dict = {}


class BadInput(ValueError):
    """A user mistake, shown as a message in the page."""


def is_pipeline_dir(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()


def default_teacher() -> Path:
    from fewstep.digits import DIGITS_TEACHER

    return DIGITS_TEACHER


def student_dirs(runs_dir: Path = RUNS) -> list[Path]:
    """Pipeline folders (holding model_index.json) under ``runs_dir``, newest first."""
    if not runs_dir.is_dir():
        return []
    found = [m.parent for m in runs_dir.rglob("model_index.json")   # skip half-written hidden export folders
             if not any(part.startswith(".") for part in m.parent.relative_to(runs_dir).parts)]
    return sorted(found, key=lambda d: (d / "model_index.json").stat().st_mtime, reverse=True)


def newest_student(runs_dir: Path = RUNS) -> Path | None:
    dirs = student_dirs(runs_dir)
    return dirs[0] if dirs else None


def check_dir(path, role: str) -> Path:
    if path is None or not str(path).strip():
        hint = " (train one with `accelerate launch train/dmd2.py`, or pass --student DIR)" if role == "student" else ""
        raise BadInput(f"No {role} model found: choose a pipeline directory{hint}.")
    p = Path(str(path).strip()).expanduser()
    if not p.is_dir() or not is_pipeline_dir(p):
        raise BadInput(f"No {role} model found at `{p}`: expected a diffusers pipeline directory "
                       "(model_index.json, or unet/ and scheduler/).")
    return p


def load(path: Path):
    """(pipe, kind), cached per directory and modification time; warmed up with one 1-step call."""
    from fewstep.digits.scoring import load_any_pipeline

    stamp = max((path / f).stat().st_mtime for f in ("model_index.json", "unet", "transformer", "scheduler")
                if (path / f).exists())
    key = (str(path.resolve()), stamp)
    if key not in _CACHE:
        pipe, kind = load_any_pipeline(path)
        pipe.to("cuda" if torch.cuda.is_available() else "cpu")
        run(pipe, kind, 0, "warm-up", 1, 0, 1.0)
        _CACHE[key] = (pipe, kind)
    return _CACHE[key]


def trained_steps(path: Path) -> int | None:
    from fewstep.digits.scoring import trained_steps as steps_of

    return steps_of(path)


def run(pipe, kind: str, label: int, prompt: str, steps: int, seed: int, guidance_scale: float):
    """One image and its wall time in seconds."""
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    if kind == "class":
        image = pipe([label], num_inference_steps=steps, guidance_scale=guidance_scale, generator=[gen]).images[0]
    else:
        image = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen).images[0]
    return image, time.perf_counter() - t0


def enlarge(image):
    from PIL import Image

    factor = max(1, DISPLAY_PX // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def as_int(value, name: str, lo: int, hi: int) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise BadInput(f"{name} must be a whole number between {lo} and {hi}; got {value!r}.") from None
    if not math.isfinite(f) or f != int(f) or not lo <= f <= hi:
        raise BadInput(f"{name} must be a whole number between {lo} and {hi}; got {value!r}.")
    return int(f)


def as_float(value, name: str, lo: float, hi: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = math.nan
    if not math.isfinite(f) or not lo <= f <= hi:
        raise BadInput(f"{name} must be a number between {lo:g} and {hi:g}; got {value!r}.")
    return f


def generate_pair(teacher_dir, student_dir, class_label, prompt, steps, seed, teacher_cfg, teacher_steps) -> dict:
    """Validate the inputs, then sample teacher and student with the same seed. Raises BadInput."""
    t_path, s_path = check_dir(teacher_dir, "teacher"), check_dir(student_dir, "student")
    max_steps = trained_steps(s_path) or 50
    steps = as_int(steps, "Student steps", 1, max_steps)
    seed = as_int(seed, "Seed", 0, MAX_SEED)
    t_steps = as_int(teacher_steps, "Teacher steps", 1, MAX_TEACHER_STEPS)
    cfg = as_float(teacher_cfg, "Teacher CFG", 0.0, MAX_CFG)
    (teacher, t_kind), (student, s_kind) = load(t_path), load(s_path)
    if t_kind != s_kind:
        raise BadInput(f"The teacher is {t_kind}-conditional but the student is {s_kind}-conditional; "
                       "pick a matching pair.")
    label, text = 0, (prompt or "").strip()
    if t_kind == "class":
        label = as_int(class_label, "Class", 0, teacher.num_classes - 1)
    elif not text:
        raise BadInput("Enter a prompt: these are text-to-image models.")
    t_img, t_sec = run(teacher, t_kind, label, text, t_steps, seed, cfg)
    s_img, s_sec = run(student, s_kind, label, text, steps, seed, 1.0)
    what = f"class {label}" if t_kind == "class" else f"“{text}”"
    message = (f"{what}, seed {seed} — teacher: {t_steps} steps, CFG {cfg:g}, {1000 * t_sec:.0f} ms | "
               f"student: {steps} step(s), {1000 * s_sec:.0f} ms | speed-up ×{t_sec / max(s_sec, 1e-9):.1f}")
    return {"teacher": enlarge(t_img), "student": enlarge(s_img), "teacher_ms": 1000 * t_sec,
            "student_ms": 1000 * s_sec, "teacher_steps": t_steps, "steps": steps, "message": message}


def generate(teacher_dir, student_dir, class_label=0, prompt="", steps=1, seed=0, teacher_cfg=2.0, teacher_steps=50):
    """(teacher image, student image, markdown message); on bad input (None, None, the message)."""
    try:
        r = generate_pair(teacher_dir, student_dir, class_label, prompt, steps, seed, teacher_cfg, teacher_steps)
        return r["teacher"], r["student"], r["message"]
    except BadInput as e:
        return None, None, f"**Error:** {e}"
    except Exception as e:   # a broken model directory or a library error: still a message, not a trace
        return None, None, f"**Error:** {type(e).__name__}: {e}"


def steps_slider(n: int | None, unknown_value: int = 1) -> dict:
    """Student-steps slider settings for a student trained for ``n`` steps (None: unknown, up to 50).

    Gradio refuses a slider whose minimum equals its maximum, so a one-step student gets the range 1..2
    with the value fixed at 1 and the slider locked: the only valid choice is shown and nothing else can be
    picked. Every setting is given each time, so choosing another student unlocks the slider again."""
    if n is None:
        return {"minimum": 1, "maximum": 50, "value": unknown_value, "step": 1, "interactive": True}
    return {"minimum": 1, "maximum": max(n, 2), "value": n, "step": 1, "interactive": n > 1}


def student_info(student_dir):
    """Slider update (limited to the trained step count) and a message for a newly chosen student."""
    import gradio as gr

    try:
        path = check_dir(student_dir, "student")
    except BadInput as e:
        return gr.Slider(), f"**Error:** {e}"
    n = trained_steps(path)
    message = f"Student `{path}`: trained for {n} step(s)." if n else f"Student `{path}` (no trained step count)."
    return gr.Slider(**steps_slider(n, unknown_value=4)), message


def build_demo(teacher: str | Path | None = None, student: str | Path | None = None, runs_dir: Path = RUNS):
    """The Gradio Blocks app; defaults: the bundled teacher and the newest student under ``runs_dir``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    teacher = str(teacher or default_teacher())
    found = newest_student(runs_dir)
    student = str(student) if student else (str(found) if found else "")
    choices = list(dict.fromkeys([student, *map(str, student_dirs(runs_dir))]))
    n = trained_steps(Path(student)) if student and Path(student).is_dir() else None
    start = f"Student `{student}`: trained for {n} step(s)." if n else (
        "**Error:** No student model found under `runs/`: train one with `accelerate launch train/dmd2.py` or "
        "pass --student DIR." if not student else f"Student `{student}`.")

    def on_generate(t_dir, s_dir, label, prompt, steps, seed, cfg, t_steps):
        try:
            r = generate_pair(t_dir, s_dir, label, prompt, steps, seed, cfg, t_steps)
        except Exception as e:   # BadInput, or a broken directory / library error: a message, never a trace
            message = f"**Error:** {e}" if isinstance(e, BadInput) else f"**Error:** {type(e).__name__}: {e}"
            return gr.Image(value=None, label="Teacher"), gr.Image(value=None, label="Student"), message
        return (gr.Image(value=r["teacher"], label=f"Teacher · {r['teacher_steps']} steps · {r['teacher_ms']:.0f} ms"),
                gr.Image(value=r["student"], label=f"Student · {r['steps']} step(s) · {r['student_ms']:.0f} ms"),
                r["message"])

    with gr.Blocks(title="fewstep: teacher vs student") as demo:
        gr.Markdown("## fewstep — teacher vs few-step student\nThe same seed through both models.")
        with gr.Row():
            t_dir = gr.Dropdown([teacher], value=teacher, label="Teacher directory", allow_custom_value=True)
            s_dir = gr.Dropdown(choices, value=student or None, label="Student directory", allow_custom_value=True,
                                elem_id="student-dir")
        with gr.Row():
            label = gr.Number(value=3, precision=0, label="Class (class-conditional models)", elem_id="class")
            prompt = gr.Textbox(value="", label="Prompt (text-to-image models)", elem_id="prompt")
        with gr.Row():
            steps = gr.Slider(**steps_slider(n), label="Student steps", elem_id="steps")
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
            cfg = gr.Slider(0, MAX_CFG, value=2.0, step=0.1, label="Teacher CFG (uncond + w (cond - uncond))")
            t_steps = gr.Slider(1, MAX_TEACHER_STEPS, value=50, step=1, label="Teacher steps")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            t_img = gr.Image(label="Teacher", type="pil", format="png", elem_id="teacher-image", height=300)
            s_img = gr.Image(label="Student", type="pil", format="png", elem_id="student-image", height=300)
        info = gr.Markdown(start, elem_id="message")
        s_dir.change(student_info, inputs=s_dir, outputs=[steps, info])
        button.click(on_generate, inputs=[t_dir, s_dir, label, prompt, steps, seed, cfg, t_steps],
                     outputs=[t_img, s_img, info], api_name="generate")
    return demo


def main(argv=None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: the first free port from 7860")
    p.add_argument("--student", default=None, help="student directory (default: newest under runs/)")
    p.add_argument("--teacher", default=None, help="teacher directory (default: the bundled digits teacher)")
    args = p.parse_args(argv)
    demo = build_demo(args.teacher, args.student)
    _, url, _ = demo.launch(server_name=args.host, server_port=args.port, theme=gr.themes.Soft(), ssr_mode=False,
                            prevent_thread_lock=True, quiet=True)
    print(f"fewstep demo running at {url}", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
