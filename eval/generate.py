"""Generate evaluation images from a pipeline directory (teacher or student), one seed per image.

Image i is drawn with its own generator seeded ``--seed + i``, so the images do not depend on the batch
size or on how many processes share the work. Class-conditional directories (the bundled digits teacher
and its students) are loaded as FewStepClassPipeline; any other directory with
``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` and called with prompts.

Writes ``<out>/<index:06d>.png`` plus a manifest, ``prompts.jsonl`` (text) or ``labels.jsonl`` (class),
one JSON line per image: ``{"index", "file", "seed", "prompt" | "label"}``. Images that already exist
are skipped, so an interrupted run continues where it stopped. Several processes split the images:

    python eval/generate.py runs/dmd2_digits --classes 0-9 --num 2000 --out gen/dmd2
    python eval/generate.py /models/sd15-student --prompts coco30k.txt --out gen/sd15 --batch-size 16
    accelerate launch --num_processes 8 eval/generate.py /models/sd15-student --prompts coco30k.txt --out gen/sd15
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path


def parse_classes(spec: str) -> list[int]:
    """``"0-9"`` or ``"1,3,7"`` (or a mix: ``"0-4,9"``) -> list of ints."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    if not out:
        raise ValueError(f"--classes {spec!r} names no class; example: --classes 0-9")
    return out


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt (one per line), .jsonl (``prompt``/``caption``/``text`` key), a .json list, or a
    COCO captions file (``{"annotations": [{"caption": ...}]}``)."""
    text = path.read_text(encoding="utf-8")
    keys = ("prompt", "caption", "text")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [next(r[k] for k in keys if k in r) if isinstance(r, dict) else str(r) for r in rows]
    if path.suffix == ".json":
        data = json.loads(text)
        rows = data["annotations"] if isinstance(data, dict) else data
        return [next(r[k] for k in keys if k in r) if isinstance(r, dict) else str(r) for r in rows]
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_items(prompts: list[str] | None, classes: list[int] | None, num: int | None, seed: int) -> list[dict]:
    """One entry per image: index, file name, seed and prompt or label (cycled when ``num`` exceeds them)."""
    values = prompts if prompts is not None else classes
    key = "prompt" if prompts is not None else "label"
    n = num if num is not None else len(values)
    return [{"index": i, "file": f"{i:06d}.png", "seed": seed + i, key: values[i % len(values)]} for i in range(n)]


def write_manifest(out: Path, items: list[dict]) -> Path:
    name = "prompts.jsonl" if "prompt" in items[0] else "labels.jsonl"
    tmp = out / f".{name}.tmp"
    tmp.write_text("".join(json.dumps(it) + "\n" for it in items))
    os.replace(tmp, out / name)
    return out / name


def render(pipe, kind: str, batch: list[dict], steps, guidance_scale, height, width):
    """PIL images for one batch; every image gets a CPU generator seeded with its own seed."""
    import torch

    gens = [torch.Generator().manual_seed(it["seed"]) for it in batch]
    kwargs = {"generator": gens, "output_type": "pil"}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if kind == "class":   # FewStepClassPipeline, and stock class-conditional pipelines such as DiTPipeline
        return pipe(class_labels=[it["label"] for it in batch], **kwargs).images
    if height is not None:
        kwargs.update(height=height, width=width or height)
    return pipe(prompt=[it["prompt"] for it in batch], **kwargs).images


def save_png(image, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")   # rename into place: a killed run leaves no half image
    image.save(tmp)
    os.replace(tmp, path)


def generate_images(pipe, kind: str, items: list[dict], out: Path, batch_size: int = 16, steps=None,
                    guidance_scale=None, height=None, width=None, progress: bool = True) -> int:
    """Render the ``items`` whose PNG is missing in ``out``; returns how many were written."""
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    todo = [it for it in items if not (out / it["file"]).is_file()]
    with tqdm(total=len(todo), desc=f"generate {out.name}", disable=not progress, unit="img") as bar:
        for lo in range(0, len(todo), batch_size):
            batch = todo[lo:lo + batch_size]
            for it, img in zip(batch, render(pipe, kind, batch, steps, guidance_scale, height, width)):
                save_png(img, out / it["file"])
            bar.update(len(batch))
    return len(todo)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", type=Path, help="pipeline directory (teacher or exported student)")
    p.add_argument("--out", type=Path, required=True, help="output folder for PNGs and the manifest")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="prompt file: .txt, .jsonl, .json list or COCO captions .json")
    src.add_argument("--classes", help="class list for class-conditional models, e.g. 0-9 or 1,3,7")
    p.add_argument("--num", type=int, default=None, help="number of images (default: one per prompt/class); "
                   "prompts/classes are cycled")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED + i (default 0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=None,
                   help="inference steps (default: the pipeline's own default; students: their trained count)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale, uncond + w (cond - uncond)")
    p.add_argument("--height", type=int, default=None, help="text-to-image only")
    p.add_argument("--width", type=int, default=None, help="text-to-image only")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not args.pipeline.is_dir():
        print(f"error: pipeline directory {args.pipeline} does not exist", file=sys.stderr)
        return 2
    if args.prompts is not None and not args.prompts.is_file():
        print(f"error: prompt file {args.prompts} does not exist", file=sys.stderr)
        return 2
    import torch
    from accelerate import PartialState

    from fewstep.digits.scoring import load_any_pipeline

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU; without cpu=True a multi-process launch on a
    # CPU host would start independent single-process copies instead of splitting the work
    state = PartialState(cpu=not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower()
                         in ("1", "true", "yes"))
    pipe, kind = load_any_pipeline(args.pipeline)
    if "class_labels" in inspect.signature(pipe.__call__).parameters:
        kind = "class"
    if (kind == "class") != (args.classes is not None):
        need = "--classes" if kind == "class" else "--prompts"
        print(f"error: {args.pipeline} is a {kind}-conditional pipeline; pass {need}", file=sys.stderr)
        return 2
    pipe.to(state.device)
    if args.dtype != "float32":
        pipe.to(getattr(torch, args.dtype))
    prompts = read_prompts(args.prompts) if args.prompts is not None else None
    items = build_items(prompts, parse_classes(args.classes) if args.classes else None, args.num, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        write_manifest(args.out, items)
    mine = items[state.process_index::state.num_processes]   # disjoint slices, balanced after a resume
    n = generate_images(pipe, kind, mine, args.out, args.batch_size, args.steps, args.guidance_scale,
                        args.height, args.width, progress=state.is_main_process and not args.no_progress)
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"{args.out}: {len(items)} images ({n} new on rank 0 of {state.num_processes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
