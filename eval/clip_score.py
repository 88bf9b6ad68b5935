"""CLIP score of a generated folder against its prompts, with torchmetrics' CLIPScore and a local CLIP.

    python eval/generate.py STUDENT --prompts coco10k.txt --out gen/student
    python eval/clip_score.py gen/student --clip /models/clip-vit-large-patch14

The folder's ``prompts.jsonl`` (written by eval/generate.py) pairs each image file with its prompt.
CLIPScore = max(100 * mean_i cos(E_image_i, E_text_i), 0) (torchmetrics' definition: the clip at 0
applies to the mean). The CLIP directory is a local ``save_pretrained`` folder of a CLIPModel and its
CLIPProcessor (``--clip DIR`` or env ``FEWSTEP_CLIP``); nothing is downloaded.

transformers 5 changed CLIPModel.get_image_features/get_text_features to return a model output instead
of a tensor, which breaks torchmetrics 1.9's CLIPScore (Lightning-AI/torchmetrics#3407). Rather than pin
transformers back, the model is loaded as ``CLIPFeatures``, a CLIPModel whose two methods return the
projected embeddings as tensors again, and handed to CLIPScore through its callable hook.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def clip_dir(path: str | None) -> Path:
    given = path or os.environ.get("FEWSTEP_CLIP")
    if not given or not (Path(given) / "config.json").is_file():
        where = f" at {given}" if given else ""
        raise FileNotFoundError(
            f"error: no local CLIP model{where}: pass --clip DIR or set FEWSTEP_CLIP to a folder written by "
            "CLIPModel.save_pretrained + CLIPProcessor.save_pretrained (e.g. openai/clip-vit-large-patch14 "
            "fetched on a machine with internet); nothing is downloaded")
    return Path(given)


def clip_loader(path: Path):
    """A zero-argument callable returning (model, processor), the form CLIPScore accepts."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    def as_tensor(out):
        return out if torch.is_tensor(out) else out.pooler_output   # pooler_output is the projected embedding

    class CLIPFeatures(CLIPModel):
        def get_image_features(self, *args, **kwargs):
            return as_tensor(super().get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return as_tensor(super().get_text_features(*args, **kwargs))

    return lambda: (CLIPFeatures.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path))


def read_pairs(folder: Path, prompts: Path | None = None) -> list[tuple[Path, str]]:
    """(image path, prompt) pairs from the manifest; only images that exist."""
    manifest = prompts or folder / "prompts.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"error: {manifest} not found; generate with eval/generate.py --prompts ... "
                                "or pass --prompts FILE.jsonl with lines {\"file\": ..., \"prompt\": ...}")
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    pairs = [(folder / r["file"], r["prompt"]) for r in rows]
    return [(p, t) for p, t in pairs if p.is_file()]


def load_image(path: Path):
    """uint8 C x H x W tensor (RGB)."""
    import numpy as np
    import torch
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


def clip_score(folder, clip_path, prompts=None, batch_size: int = 64, device=None, progress=True) -> dict:
    """Mean CLIP score of the folder's images against their prompts."""
    import torch
    from torchmetrics.multimodal.clip_score import CLIPScore
    from tqdm.auto import tqdm

    pairs = read_pairs(Path(folder), Path(prompts) if prompts else None)
    if not pairs:
        raise FileNotFoundError(f"error: no images listed in the manifest exist in {folder}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    metric = CLIPScore(model_name_or_path=clip_loader(Path(clip_path))).to(device)
    for lo in tqdm(range(0, len(pairs), batch_size), desc="CLIP score", disable=not progress):
        batch = pairs[lo:lo + batch_size]
        with torch.no_grad():
            metric.update([load_image(p).to(device) for p, _ in batch], [t for _, t in batch])
    return {"clip_score": float(metric.compute()), "num_images": len(pairs), "clip": str(clip_path)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="generated images with prompts.jsonl (eval/generate.py)")
    p.add_argument("--clip", default=None, help="local CLIP directory (default: $FEWSTEP_CLIP)")
    p.add_argument("--prompts", type=Path, default=None, help="manifest (default: FOLDER/prompts.jsonl)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        path = clip_dir(args.clip)
        read_pairs(args.folder, args.prompts)
    except FileNotFoundError as e:
        print(str(e), file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = clip_score(args.folder, path, args.prompts, args.batch_size, args.device, progress=not args.quiet)
    print(f"CLIP score: {result['clip_score']:.4f}  ({result['num_images']} images, {path})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
