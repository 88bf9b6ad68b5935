"""Digits evaluation shared by the training scripts' ``metrics.json`` and ``eval/benchmark.py``.

Scores any class-conditional pipeline directory (teacher or student) with the bundled digits net: class
accuracy of generated samples and FD-digits (Frechet distance in the digits net's feature space; not FID),
mean and spread over seeds, plus throughput measured after a warm-up as the median of repeated runs.
Every image has its own generator seed, so figures do not depend on the batch size.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from fewstep.digits import metrics


def load_pipeline(path):
    """A FewStepClassPipeline from a teacher or student directory, without trust_remote_code."""
    import json
    from pathlib import Path

    import diffusers
    from diffusers import DDIMScheduler, UNet2DModel
    from fewstep_pipelines import FewStepClassPipeline, FewStepScheduler

    path = Path(path)
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    # students exported with a stock scheduler (LCMScheduler for consistency students) keep its class
    name = sched_cfg.get("_class_name")
    sched_cls = FewStepScheduler if name == "FewStepScheduler" else getattr(diffusers, name, DDIMScheduler)
    unet_cls = UNet2DModel
    if json.loads((path / "unet" / "config.json").read_text()).get("_class_name") == "FewStepRouter":
        from fewstep_pipelines.router_fewstep import FewStepRouter as unet_cls  # MSD: the students behind a router
    unet = unet_cls.from_pretrained(path, subfolder="unet").eval()
    index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
    experts = {k: UNet2DModel.from_pretrained(path, subfolder=k).eval() for k in ("unet_1", "unet_2", "unet_3")
               if (path / k / "config.json").is_file()}   # phased students: one unet per phase
    pipe = FewStepClassPipeline(unet=unet, scheduler=sched_cls.from_pretrained(path, subfolder="scheduler"),
                                expert_boundaries=index.get("expert_boundaries"), **experts)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda") if torch.cuda.is_available() else pipe


def generate(pipe, n: int, seed: int, steps: int | None = None, guidance_scale: float = 1.0,
             batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (10 classes, equal counts) in [-1, 1] and their labels; image i uses seed ``seed*10^6+i``."""
    labels = torch.arange(n) % 10
    out = []
    for lo in range(0, n, batch_size):
        idx = range(lo, min(n, lo + batch_size))
        gens = [torch.Generator().manual_seed(seed * 1_000_000 + i) for i in idx]
        x = pipe(labels[lo:lo + len(idx)].tolist(), num_inference_steps=steps, guidance_scale=guidance_scale,
                 generator=gens, output_type="pt").images
        out.append(x.cpu() * 2 - 1)
    return torch.cat(out), labels


def score(pipe, n: int = 2000, seeds=(0, 1, 2), steps: int | None = None, guidance_scale: float = 1.0,
          quality: bool = False) -> dict:
    """Class accuracy and FD-digits, mean and standard deviation over ``seeds``.

    ``quality``: also `quality.quality_report`'s measures that see diversity, each the mean (and ``_std``) over the
    seeds: FD-digits and accuracy in the second feature net (``_net2``), precision and recall (k = 3) in both nets,
    per-class FD (net 1); and ``nearest_train``, the first seed's distances to the nearest training digit
    (`quality.nearest_train_summary`), which `quality.compare_memorisation` compares with the teacher's.

    The real digits' features come from `quality.real_features` (extracted once per process and feature net), and
    with ``quality`` the net-1 accuracy and FD-digits are the report's own (the same computation, done once).
    """
    from fewstep.digits import quality as Q

    net = metrics.load_digits_net()
    ref = metrics.feature_stats(Q.real_features(net)[0])       # = metrics.real_stats(net), without re-extracting
    net2 = metrics.load_digits_net2() if quality else None
    accs, fds, reports, first = [], [], [], None
    for s in seeds:
        x, y = generate(pipe, n, s, steps, guidance_scale)
        first = x if first is None else first
        if quality:
            reports.append(Q.quality_report(x, y, net_1=net, net_2=net2))
            accs.append(reports[-1]["accuracy"])
            fds.append(reports[-1]["fd_digits"])
        else:
            accs.append(metrics.class_accuracy(x, y, net))
            fds.append(metrics.fd_digits(x, net, reference=ref))
    out = {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
           "fd_digits": float(np.mean(fds)), "fd_digits_std": float(np.std(fds)), "fd_digits_per_seed": fds,
           "num_samples": n, "seeds": list(seeds)}
    if quality:
        for key in ("accuracy_net2", "fd_digits_net2", "precision", "recall", "precision_net2", "recall_net2"):
            vals = [r[key] for r in reports]
            out[key], out[f"{key}_std"] = float(np.mean(vals)), float(np.std(vals))
        out["per_class_fd"] = {c: float(np.mean([r["per_class_fd"][c] for r in reports]))
                               for c in reports[0]["per_class_fd"]}
        out["nearest_train"] = Q.nearest_train_summary(first)
        out["k"] = reports[0]["k"]
    return out


def throughput(pipe, steps: int | None = None, guidance_scale: float = 1.0, batch: int = 100,
               repeats: int = 3) -> dict:
    """Images per second at ``batch`` images per call, after one warm-up call; median and spread."""
    labels = (torch.arange(batch) % 10).tolist()
    run = lambda: pipe(labels, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=torch.Generator().manual_seed(0), output_type="pt")
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    rates = [batch / t for t in times]
    return {"images_per_s": statistics.median(rates), "images_per_s_min": min(rates),
            "images_per_s_max": max(rates), "batch": batch, "repeats": repeats}


def speedup(student, teacher, teacher_steps: int = 50, guidance_scale: float = 2.0, batch: int = 100,
            repeats: int = 3) -> dict:
    """The student's images/s over the teacher's, measured interleaved in this process (student, teacher, student,
    ...) so that load on the machine hits both alike: the median ratio of each pair and its spread."""
    labels = (torch.arange(batch) % 10).tolist()

    def timed(pipe, **kw) -> float:
        t0 = time.perf_counter()
        pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
        return time.perf_counter() - t0

    # warm-up, both: one call each loads kernels and sizes the allocator; the teacher's at two steps, since its
    # later steps repeat the same network call at the same shapes
    timed(student)
    timed(teacher, num_inference_steps=min(2, teacher_steps), guidance_scale=guidance_scale)
    pairs = [(timed(student), timed(teacher, num_inference_steps=teacher_steps, guidance_scale=guidance_scale))
             for _ in range(repeats)]
    ratios = [t / s for s, t in pairs]
    return {"speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "student_images_per_s": statistics.median(batch / s for s, _ in pairs),
            "teacher_images_per_s": statistics.median(batch / t for _, t in pairs), "batch": batch,
            "repeats": repeats, "teacher_steps": teacher_steps, "teacher_guidance_scale": guidance_scale,
            "note": "interleaved in one process; ratio of each student/teacher pair, median and range"}


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MB (CPU), or the CUDA peak when on GPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_class_pipeline_dir(path) -> bool:
    """True for a class-conditional pixel pipeline directory (a UNet2DModel with class embeddings, no text
    encoder): the bundled teacher and its students. Text-to-image directories return False."""
    import json
    from pathlib import Path

    path = Path(path)
    unet_cfg = path / "unet" / "config.json"
    if not unet_cfg.is_file() or (path / "text_encoder").is_dir():
        return False
    cfg = json.loads(unet_cfg.read_text())
    if cfg.get("_class_name") == "FewStepRouter":      # MSD: class students behind a router
        cfg = {**(cfg.get("student_config") or {}), "_class_name": cfg.get("student_class")}
    return cfg.get("_class_name") == "UNet2DModel" and cfg.get("num_class_embeds") is not None


def load_any_pipeline(path):
    """``(pipe, kind)``: a FewStepClassPipeline (kind "class") for class-conditional directories, otherwise
    the directory's own pipeline through ``DiffusionPipeline.from_pretrained(trust_remote_code=True)``
    (kind "text")."""
    if is_class_pipeline_dir(path):
        return load_pipeline(path), "class"
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, "text"


def trained_steps(path) -> int | None:
    """The student's trained step count: the length of ``train_timesteps`` in its scheduler config (or, for a
    consistency student exported with LCMScheduler, ``original_inference_steps``); None for a teacher."""
    import json
    from pathlib import Path

    cfg_file = Path(path) / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        return None
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("train_timesteps"):
        return len(cfg["train_timesteps"])
    return cfg.get("original_inference_steps") if cfg.get("_class_name") == "LCMScheduler" else None


def latency(pipe, steps: int | None = None, guidance_scale: float = 1.0, repeats: int = 10) -> dict:
    """Seconds per image at batch size 1: median (and spread) of ``repeats`` calls after one warm-up call."""
    run = lambda i: pipe([i % 10], num_inference_steps=steps, guidance_scale=guidance_scale,
                         generator=torch.Generator().manual_seed(i), output_type="pt")
    run(0)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - t0)
    return {"latency_s": statistics.median(times), "latency_s_min": min(times), "latency_s_max": max(times),
            "latency_repeats": repeats}


def weights_digest(folder) -> str:
    """sha256 over a pipeline folder's weights and model / scheduler configs (what its samples depend on), so
    figures cached beside a teacher are recomputed when its weights change."""
    import hashlib
    from pathlib import Path

    folder, sha = Path(folder), hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and len(rel.parts) > 1 and (path.suffix in (".safetensors", ".bin") or path.name.endswith(
                "config.json")):
            sha.update(str(rel).encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
    return sha.hexdigest()
