"""Benchmark few-step students against their teacher at its best on the bundled digits (or any class-conditional
teacher).

    python eval/benchmark.py runs/dmd2_digits runs/dmd2_digits_4step --out reports/digits
    python eval/benchmark.py runs/* --teacher path/to/teacher --samples 500 --seeds 0
    python eval/benchmark.py runs/* --teacher tiny/ --grid-guidance 1,2 --grid-steps 2,4 --grid-screen-samples 50
    python eval/benchmark.py --methods-table runs/* --out reports/methods

Writes ``report.md``, ``report.json`` and three plots (``quality_vs_nfe.png``, ``throughput.png``,
``samples.png``) into ``--out``. Per model: steps and NFE (a teacher step with CFG costs 2 NFE, at CFG 1 one),
class accuracy, FD-digits mean and std over seeds, images/s (median [min-max] of repeats at batch ``--batch``,
after a warm-up), latency per image at batch 1 (median of repeats after a warm-up), peak memory, and two ratios:

- **FD ratio to the teacher at its best** (the reference): FD-digits over the lowest FD-digits the teacher reaches
  on a declared grid of sampler settings (`fewstep.digits.teacher_grid.teacher_best`). Default grid: guidance
  {1, 1.25, 1.5, 2} x steps {25, 50, 100} x sampler {DDIM, the stochastic DDPM / ancestral sampler}, every
  setting screened at 200 samples, seed 0, the best screened setting re-scored at ``--samples`` samples x
  ``--grid-seeds`` (default seed 0). The report names the winning setting and the protocol, and the teacher at
  its best is a row of the table (with its NFE) and a starred point with a dashed line on the quality-vs-NFE
  plot. The grid is scored once per teacher and cached in ``teacher_grid.json`` beside it, keyed by the
  teacher weights' hash, the grid and the protocol: a cache hit scores and loads nothing for it. The bundled
  teacher's grid at 2000 samples, seed 0 ships in that cache, so ``python eval/benchmark.py runs/dmd2_digits``
  reads it back. ``--grid-guidance``, ``--grid-steps``, ``--grid-samplers``, ``--grid-screen-samples`` and
  ``--grid-seeds`` declare another grid or protocol (a small one benchmarks a tiny test teacher in seconds).
- beside it, labelled as such, the **ratio to the teacher at 50 steps, CFG w (a fixed setting)**: FD-digits over
  the teacher's 50-step DDIM FD-digits at ``--teacher-guidance`` w (default 2), the end of its quality-vs-NFE
  curve at that guidance (``--teacher-steps``). One fixed setting, not the teacher's best.

Speed and memory are measured for each model (the students, the teacher at 50 steps and at its best) in a fresh
process so that peaks belong to that model. FD-digits is a Frechet distance in the bundled digits net's feature
space; it is NOT FID.

``--methods-table`` instead reads each run's ``metrics.json`` and ``config.json`` and writes
``methods.md``/``methods.json``: one row per method x step count x teacher (runs that differ only in their
seed are pooled): accuracy, FD ratio to the teacher mean +- spread, training wall time and generator updates.
Folders left out (no metrics.json or config.json, unreadable figures, a copy of another run's figures) are
named on stderr with the reason.

Progress goes to stderr, one line per phase, and the last line names the files written.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NOTE = "FD-digits is a Frechet distance in the bundled digits net's feature space; it is not FID."
GRID_SEED = 7
BUNDLED_TEACHER = "digits (bundled)"      # model.teacher "" in a run's config.json
_PIPES: dict = {}
_START = time.perf_counter()


def status(message: str) -> None:
    """One progress line on stderr (stdout holds the report), with the seconds since the start."""
    print(f"[{time.perf_counter() - _START:5.0f} s] {message}", file=sys.stderr, flush=True)


def pipeline(path, sampler: str | None = None) -> object:
    """A FewStepClassPipeline per directory and sampler, loaded once per benchmark. `sampler` ("ddim", "ddpm")
    swaps in that scheduler on the folder's own noise schedule (`teacher_grid.with_sampler`); None keeps its own."""
    from fewstep.digits import scoring as digits_eval
    from fewstep.digits.teacher_grid import with_sampler

    key = (str(Path(path).resolve()), sampler)
    if key not in _PIPES:
        pipe = digits_eval.load_pipeline(path)
        _PIPES[key] = with_sampler(pipe, sampler, dict(pipe.scheduler.config)) if sampler else pipe
    return _PIPES[key]


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_floats(text: str) -> list[float]:
    return sorted({float(v) for v in text.split(",") if v.strip()})


def parse_samplers(text: str) -> list[str]:
    from fewstep.digits.teacher_grid import SAMPLERS

    names = sorted({v.strip().lower() for v in text.split(",") if v.strip()})
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"samplers {unknown or text!r}: choose from {','.join(sorted(SAMPLERS))}")
    return names


def grid_request(args) -> dict:
    """`teacher_grid.teacher_best`'s protocol arguments for this benchmark: the final stage at ``--samples`` x
    ``--grid-seeds``, the declared grid and screen size. Values are sorted, so the cache key (and a cache hit) does
    not depend on the order they were typed in; the defaults are the cached ones."""
    grid = {"guidance_scale": tuple(args.grid_guidance), "steps": tuple(sorted(set(args.grid_steps))),
            "sampler": tuple(args.grid_samplers)}
    return {"n": args.samples, "seeds": tuple(args.grid_seeds), "grid": grid,
            "screen_samples": args.grid_screen_samples}


def nfe(steps: int, guidance_scale: float) -> int:
    return steps * (1 if guidance_scale == 1.0 else 2)


def model_name(path: Path) -> str:
    cfg = path / "config.json"
    method = json.loads(cfg.read_text()).get("method_name") if cfg.is_file() else None
    return f"{path.name} ({method})" if method else path.name


# ---------------------------------------------------------------- speed and memory, one process per model


def measure_speed(path: Path, steps: int, guidance_scale: float, batch: int, repeats: int,
                  latency_repeats: int, sampler: str | None = None) -> dict:
    """Throughput, batch-1 latency and peak memory of one pipeline (with `sampler`'s scheduler, see `pipeline`),
    measured in a fresh Python process."""
    spec = json.dumps({"path": str(path), "steps": steps, "guidance_scale": guidance_scale, "batch": batch,
                       "repeats": repeats, "latency_repeats": latency_repeats, "sampler": sampler})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--speed-child", spec],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                                              os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise RuntimeError(f"speed measurement of {path} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _proc_status_mb(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(text.split(f"{key}:")[1].split()[0]) / 1024


def reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux), so that it measures from now on."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def speed_child(spec: str) -> None:
    import torch

    from fewstep.digits import scoring as digits_eval

    s = json.loads(spec)
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import diffusers  # noqa: F401  (diffusers imports lazily; load its model classes before the baseline)
    from diffusers import DDIMScheduler, UNet2DModel  # noqa: F401

    # the imports alone reach ~1 GB of RSS (torch, diffusers); measure the model's rise above that
    linux = not cuda and reset_rss_peak()
    baseline = _proc_status_mb("VmRSS") if linux else 0.0 if cuda else digits_eval.peak_memory_mb()
    pipe = digits_eval.load_pipeline(s["path"])
    if s.get("sampler"):
        from fewstep.digits.teacher_grid import with_sampler

        with_sampler(pipe, s["sampler"], dict(pipe.scheduler.config))
    if cuda:
        pipe.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    out = digits_eval.throughput(pipe, s["steps"], s["guidance_scale"], s["batch"], s["repeats"])
    out.update(digits_eval.latency(pipe, s["steps"], s["guidance_scale"], s["latency_repeats"]))
    peak = _proc_status_mb("VmHWM") if linux else digits_eval.peak_memory_mb()
    out.update(peak_memory_mb=peak, peak_memory_model_mb=peak - baseline,
               memory_kind="CUDA max allocated" if cuda else "process peak RSS")
    print(json.dumps(out))


# ---------------------------------------------------------------- quality


def teacher_rows(teacher: Path, steps_list: list[int], w: float, n: int, seeds: list[int]) -> list[dict]:
    """Teacher quality at each step count; the 50-step figures come from report.teacher_reference (cached
    beside the teacher) when the guidance matches the one it uses."""
    from fewstep.digits import scoring as digits_eval
    from fewstep.run.report import fixed_teacher_reference as teacher_reference

    pipe, rows = pipeline(teacher), []
    for steps in steps_list:
        status(f"teacher {teacher} at {steps} step(s), CFG {w:g}: accuracy and FD-digits ({n} samples x "
               f"{len(seeds)} seed(s))")
        if steps == 50 and w == 2.0:
            ref = teacher_reference(teacher, n, tuple(seeds))
            q = {k: ref[k] for k in ("accuracy", "accuracy_std", "fd_digits", "fd_digits_std",
                                     "fd_digits_per_seed", "num_samples", "seeds")}
        else:
            q = digits_eval.score(pipe, n, seeds, steps=steps, guidance_scale=w)
        rows.append({"name": f"teacher {steps} step{'s' if steps > 1 else ''}", "role": "teacher",
                     "path": str(teacher), "steps": steps, "guidance_scale": w, "nfe": nfe(steps, w), **q})
    return rows


def student_row(path: Path, n: int, seeds: list[int]) -> dict:
    from fewstep.digits import scoring as digits_eval

    pipe = pipeline(path)
    steps = digits_eval.trained_steps(path) or pipe.default_num_inference_steps()
    status(f"student {path} at {steps} step(s): accuracy and FD-digits ({n} samples x {len(seeds)} seed(s))")
    q = digits_eval.score(pipe, n, seeds, steps=steps)
    return {"name": model_name(path), "role": "student", "path": str(path), "steps": steps, "guidance_scale": 1.0,
            "nfe": steps, **q}


def teacher_best_row(teacher: Path, request: dict) -> tuple[dict, dict]:
    """(row, grid result): the teacher at its best over the declared grid (`teacher_grid.teacher_best`, read from
    its cache when this teacher, grid and protocol were scored before) as a table row with its sampler and NFE."""
    from fewstep.digits.teacher_grid import label, settings, teacher_best

    status(f"teacher {teacher} at its best over its grid ({len(settings(request['grid']))} settings; cached by its "
           f"weights' hash in teacher_grid.json)")
    result = teacher_best(teacher, log=status, **request)
    best = result["best"]
    row = {**best, "name": f"teacher at its best ({label(best)})", "role": "teacher_best", "path": str(teacher),
           "setting": label(best), "nfe": nfe(best["steps"], best["guidance_scale"])}
    status(f"teacher at its best: {label(best)}, FD-digits {best['fd_digits']:.4g} ({result['protocol']})")
    return row, result


def sample_images(row: dict) -> np.ndarray:
    """One image per class (0..9), the same seeds for every model: uint8 [10, H, W]."""
    from fewstep.digits import scoring as digits_eval

    x, _ = digits_eval.generate(pipeline(row["path"], row.get("sampler")), 10, GRID_SEED, row["steps"],
                                row["guidance_scale"])
    return ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


# ---------------------------------------------------------------- plots and report


def plot_quality(rows: list[dict], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    teacher = sorted((r for r in rows if r["role"] == "teacher"), key=lambda r: r["nfe"])
    best = next((r for r in rows if r["role"] == "teacher_best"), None)
    for ax, key, label in ((ax_fd, "fd_digits", "FD-digits (lower is better; not FID)"),
                           (ax_acc, "accuracy", "class accuracy")):
        if teacher:
            ax.errorbar([r["nfe"] for r in teacher], [r[key] for r in teacher],
                        [r[f"{key}_std"] for r in teacher], marker="o", color="0.3", capsize=3,
                        label=f"teacher, DDIM at CFG {teacher[0]['guidance_scale']:g} (a fixed setting)")
        if best:
            ax.axhline(best[key], color="tab:red", linestyle="--", linewidth=1)
            ax.errorbar([best["nfe"]], [best[key]], [best[f"{key}_std"]], marker="*", ms=13, color="tab:red",
                        capsize=3, linestyle="none", label=f"teacher at its best: {best['setting']} (reference)")
        for i, r in enumerate(r for r in rows if r["role"] == "student"):
            ax.errorbar([r["nfe"]], [r[key]], [r[f"{key}_std"]], marker="s^Dvp*h"[i % 7], ms=8, capsize=3,
                        linestyle="none", label=r["name"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE per image (network evaluations)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_fd.set_yscale("log")
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle("Quality vs NFE (mean and std over seeds)")
    fig.tight_layout()
    fig.savefig(out / "quality_vs_nfe.png", dpi=120)
    plt.close(fig)
    return out / "quality_vs_nfe.png"


def plot_speed(rows: list[dict], out: Path) -> Path:
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "images_per_s" in r]
    names = [r["name"] for r in timed]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 0.6 * len(timed) + 2))
    ips = np.array([r["images_per_s"] for r in timed])
    err = np.array([[r["images_per_s"] - r["images_per_s_min"] for r in timed],
                    [r["images_per_s_max"] - r["images_per_s"] for r in timed]])
    colors = ["tab:blue" if r["role"] == "student" else "0.5" for r in timed]
    ax_t.barh(names, ips, xerr=err, color=colors, capsize=3)
    ax_t.set_xlabel(f"images/s at batch {timed[0]['batch']} (median, min-max)")
    lat = np.array([1000 * r["latency_s"] for r in timed])
    ax_l.barh(names, lat, color=colors)
    ax_l.set_xlabel("latency per image at batch 1, ms (median)")
    ax_l.tick_params(labelleft=False)
    from matplotlib.ticker import NullFormatter

    tips = np.array([r["images_per_s_max"] for r in timed])       # labels go past the error bars
    for ax, values, ends, unit in ((ax_t, ips, tips, "/s"), (ax_l, lat, lat, " ms")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(min(values) / 3, max(ends) * 4)
        ax.invert_yaxis()          # first model on top, as in the report table
        ax.grid(axis="x", alpha=0.3)
        for y, (v, end) in enumerate(zip(values, ends)):
            ax.annotate(f"{v:.3g}{unit}", (end, y), xytext=(5, 0), textcoords="offset points", va="center",
                        fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)
    return out / "throughput.png"


def plot_samples(rows: list[dict], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 10, figsize=(10 * 0.9 + 2.2, len(rows) * 0.95 + 0.4), squeeze=False)
    for r, row_axes in zip(rows, axes):
        for k, (ax, img) in enumerate(zip(row_axes, sample_images(r))):
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r is rows[0]:
                ax.set_title(str(k), fontsize=9)
        row_axes[0].set_ylabel(f"{r['name']}\nNFE {r['nfe']}", rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Samples: class 0-9, the same seeds for every model (image i: seed {GRID_SEED}*10^6+i)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=120)
    plt.close(fig)
    return out / "samples.png"


def fmt_row(r: dict) -> str:
    cells = [r["name"], f"{r['steps']} / {r['nfe']}", f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f}",
             f"{r['fd_digits']:.3g} ± {r['fd_digits_std']:.2g}",
             f"{r['fd_ratio_to_teacher']:.3g} ± {r['fd_ratio_std']:.2g}", f"{r['fd_ratio_to_teacher_fixed']:.3g}"]
    if "images_per_s" in r:
        cells += [f"{r['images_per_s']:.4g} [{r['images_per_s_min']:.4g}–{r['images_per_s_max']:.4g}]",
                  f"{1000 * r['latency_s']:.3g}",
                  f"{r['peak_memory_mb']:.0f} (+{r['peak_memory_model_mb']:.0f})"]
    else:
        cells += ["–", "–", "–"]
    return "| " + " | ".join(cells) + " |"


def outside_grid_note(rows: list[dict]) -> list[str]:
    """A line naming the teacher rows that beat the reference: settings outside the declared grid (or within the
    spread of the seeds), so the grid should be widened before the ratios are read as "to the teacher at its best"."""
    better = [r["name"] for r in rows if r["role"] == "teacher" and r["fd_ratio_to_teacher"] < 1]
    if not better:
        return []
    return [f"Note: {', '.join(better)} score below the teacher's best over the declared grid: a setting outside "
            "the grid (or within the seeds' spread); widen it with --grid-guidance, --grid-steps, --grid-samplers.",
            ""]


def write_report(report: dict, out: Path) -> Path:
    rows, s, ref, fixed = report["rows"], report["settings"], report["reference"], report["fixed_reference"]
    lines = [
        "# fewstep benchmark: students vs the teacher at its best (digits)", "",
        f"Teacher: `{s['teacher']}`; {s['samples']} samples per seed, seeds {s['seeds']}; throughput at batch "
        f"{s['batch']} ({s['repeats']} repeats after a warm-up), latency at batch 1 ({s['latency_repeats']} repeats "
        f"after a warm-up); {s['device']}, {s['threads']} torch thread(s).", "",
        f"**Reference: the teacher at its best, {ref['setting']}** (NFE {ref['nfe']}): FD-digits "
        f"{ref['fd_digits']:.4g}, accuracy {ref['accuracy']:.3f}. Protocol: {ref['protocol']}. "
        "FD ratio = FD-digits / this FD-digits (below 1 beats the teacher at its best).", "",
        f"Beside it, labelled as such: the {fixed['column']}, dividing by the teacher's FD-digits at 50 DDIM steps, "
        f"CFG {fixed['guidance_scale']:g} ({fixed['fd_digits']:.4g}), the end of the teacher curve in the table: "
        "one fixed setting, not the teacher's best.", "", f"**{NOTE}**", "",
        "| model | steps / NFE | class accuracy | FD-digits (mean ± std) | FD ratio to the teacher at its best | "
        f"{fixed['column']} | images/s median [min–max] | latency/image at batch 1 (ms) | peak memory MB (+model) |",
        "|---|---|---|---|---|---|---|---|---|",
        *[fmt_row(r) for r in rows], "", *outside_grid_note(rows),
        f"Peak memory: {rows[-1].get('memory_kind', 'n/a')}, measured in a fresh process per model; "
        "(+model) is the rise above the process after its imports.", "",
        "![quality vs NFE](quality_vs_nfe.png)", "", "![throughput](throughput.png)", "",
        "![samples](samples.png)", "", "## The teacher's grid", "",
        f"Screened settings, lowest FD-digits first ({ref['screen_protocol']}); the winner is re-scored as above.", "",
        "| setting | NFE | FD-digits (screen) | class accuracy (screen) |", "|---|---|---|---|",
        *[f"| {g['setting']}{' (best)' if g['setting'] == ref['setting'] else ''} | {g['nfe']} | "
          f"{g['fd_digits']:.4g} | {g['accuracy']:.3f} |" for g in sorted(ref["screen"], key=lambda g: g["fd_digits"])],
        ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def benchmark(args) -> dict:
    from fewstep.digits import DIGITS_TEACHER
    from fewstep.digits import scoring as digits_eval

    teacher = Path(args.teacher) if args.teacher else DIGITS_TEACHER
    for p in [teacher, *args.models]:
        if not digits_eval.is_class_pipeline_dir(p):
            raise SystemExit(f"error: {p} is not a class-conditional pipeline directory (unet/ with class "
                             "embeddings); for text-to-image models use eval/generate.py, fid.py and clip_score.py")
    from fewstep.digits.teacher_grid import label

    t0 = time.perf_counter()
    steps_list = sorted(set(args.teacher_steps) | {50})
    status(f"benchmarking {len(args.models)} student(s) against {teacher} at its best; report into {args.out}")
    best, grid = teacher_best_row(teacher, grid_request(args))
    rows = teacher_rows(teacher, steps_list, args.teacher_guidance, args.samples, args.seeds)
    rows += [best] + [student_row(Path(p), args.samples, args.seeds) for p in args.models]
    fixed = next(r for r in rows if r["role"] == "teacher" and r["steps"] == 50)
    best_fd, fixed_fd = best["fd_digits"], fixed["fd_digits"]
    for r in rows:
        r["fd_ratio_to_teacher"], r["fd_ratio_std"] = r["fd_digits"] / best_fd, r["fd_digits_std"] / best_fd
        r["fd_ratio_to_teacher_fixed"] = r["fd_digits"] / fixed_fd
        if r["role"] != "teacher" or r["steps"] == 50:
            status(f"{r['name']}: images/s, batch-1 latency and peak memory (in a fresh process)")
            r.update(measure_speed(Path(r["path"]), r["steps"], r["guidance_scale"], args.batch, args.repeats,
                                   args.latency_repeats, r.get("sampler")))
    w = args.teacher_guidance
    reference = {"description": f"the teacher at its best: {best['setting']} ({grid['protocol']})",
                 "setting": best["setting"], "sampler": best["sampler"], "steps": best["steps"],
                 "guidance_scale": best["guidance_scale"], "nfe": best["nfe"], "fd_digits": best_fd,
                 "fd_digits_std": best["fd_digits_std"], "accuracy": best["accuracy"],
                 "num_samples": best["num_samples"], "seeds": best["seeds"], "protocol": grid["protocol"],
                 "screen_protocol": f"{len(grid['screen'])} settings at {grid['screen'][0]['num_samples']} samples, "
                                    f"seed(s) {grid['screen'][0]['seeds']}",
                 "grid": grid["grid"], "weights_sha256": grid["weights_sha256"],
                 "screen": [{"setting": label(g), "sampler": g["sampler"], "steps": g["steps"],
                             "guidance_scale": g["guidance_scale"], "nfe": nfe(g["steps"], g["guidance_scale"]),
                             "fd_digits": g["fd_digits"], "accuracy": g["accuracy"]} for g in grid["screen"]]}
    fixed_reference = {"description": f"the teacher at 50 DDIM steps, CFG {w:g} (a fixed setting, not its best)",
                       "column": f"ratio to the teacher at 50 steps, CFG {w:g} (a fixed setting)",
                       "steps": 50, "guidance_scale": w, "nfe": fixed["nfe"], "fd_digits": fixed_fd}
    import torch

    settings = {"teacher": str(teacher), "teacher_guidance": args.teacher_guidance, "samples": args.samples,
                "seeds": args.seeds, "batch": args.batch, "repeats": args.repeats,
                "latency_repeats": args.latency_repeats, "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
                f"CPU ({platform.processor() or platform.machine()})"}
    return {"settings": settings, "reference": reference, "fixed_reference": fixed_reference,
            "teacher_best_fd_digits": best_fd, "teacher_fixed_fd_digits": fixed_fd, "rows": rows, "note": NOTE,
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- methods table


class SkipRun(Exception):
    """A folder left out of the methods table; the message says why."""


def find_runs(paths: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Run folders (holding metrics.json) at or under ``paths``, and (path, reason) for each path without one."""
    runs, skipped = [], []
    for p in map(Path, paths):
        found = [p] if (p / "metrics.json").is_file() else sorted(m.parent for m in p.rglob("metrics.json"))
        runs += found
        if not p.exists():
            skipped.append((p, "does not exist"))
        elif not found:
            skipped.append((p, "no metrics.json (training unfinished, train.evaluate false, or not a run folder)"))
    return runs, skipped


def teacher_of(cfg: dict) -> str:
    """The teacher a run distilled, as its config names it (model.teacher; "" is the bundled digits teacher)."""
    teacher = (cfg.get("model") or {}).get("teacher") or ""
    return os.path.normpath(teacher) if teacher else BUNDLED_TEACHER


def read_run(run: Path) -> tuple[dict, dict]:
    """(metrics, config) of a run folder; raises SkipRun when either is missing or not JSON."""
    if not (run / "config.json").is_file():
        raise SkipRun("no config.json beside metrics.json: its method and teacher are unknown")
    try:
        return json.loads((run / "metrics.json").read_text()), json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as e:     # JSONDecodeError is a ValueError
        raise SkipRun(f"unreadable metrics.json or config.json ({type(e).__name__}: {e})") from None


FIXED_REFERENCE = "the teacher at 50 DDIM steps, CFG 2 (a fixed setting, not its best)"


def best_reference(cfg: dict, st: dict) -> tuple[float, str]:
    """FD-digits and description of the teacher at its best (`teacher_grid.teacher_best`, read from its cache) at
    the protocol a run was evaluated with: the reference for a run evaluated before metrics.json carried it."""
    from fewstep.digits import DIGITS_TEACHER
    from fewstep.digits.teacher_grid import label, teacher_best

    teacher = (cfg.get("model") or {}).get("teacher") or DIGITS_TEACHER
    try:
        grid = teacher_best(teacher, st["num_samples"], compute=False)
    except LookupError as e:
        raise SkipRun(str(e)) from None
    return grid["best"]["fd_digits"], f"the teacher at its best: {label(grid['best'])} ({grid['protocol']})"


def run_facts(run: Path, m: dict, cfg: dict, rebase: bool = False) -> dict:
    """Method, steps, teacher, accuracy, FD ratio, wall time and updates of one training run. The ratio divides by
    the reference its metrics.json names; `rebase` divides a run scored against the fixed CFG-2 teacher by the
    teacher at its best instead (the student's figures are the run's own)."""
    st, updates = m["student"], m.get("updates", {})
    ref_fd, reference = m["teacher"]["fd_digits"], m.get("reference", FIXED_REFERENCE)
    rebased = rebase and "reference" not in m
    if rebased:
        ref_fd, reference = best_reference(cfg, st)
    wall = m.get("train_seconds", m.get("wall_seconds"))
    approx = wall is None and (run / "unet").is_dir()
    if approx:   # config.json is written when training starts, the exported unet when it ends
        wall = (run / "unet").stat().st_mtime - (run / "config.json").stat().st_mtime
    gen = updates.get("student", updates.get("generator", sum(v for k, v in updates.items() if k != "critic")))
    method = cfg.get("method_name", m.get("method", "?"))
    if (cfg.get("method") or {}).get("segment_schedule"):     # segmented consistency (Hyper-SD TSCD)
        method += " (TSCD)"
    return {"run": str(run), "method": method, "steps": st.get("steps"), "teacher": teacher_of(cfg),
            "accuracy": st["accuracy"], "fd_ratio": st["fd_digits"] / ref_fd if rebased else m["fd_ratio_to_teacher"],
            "fd_ratio_seed_std": st.get("fd_digits_std", 0.0) / ref_fd, "reference": reference,
            "precision": st.get("precision"), "recall": st.get("recall"),
            "wall_seconds": wall, "wall_approx": approx, "generator_updates": gen, "updates": updates}


def collect_runs(paths: list[str], rebase: bool = False) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Facts of each usable run under ``paths``, and (folder, reason) for each one left out. A folder whose
    metrics.json equals an earlier one's is a copy of that run: counted once, or its row's spread shrinks."""
    runs, skipped = find_runs(paths)
    facts, seen = [], {}
    for run in runs:
        try:
            m, cfg = read_run(run)
            fact = run_facts(run, m, cfg, rebase)
        except SkipRun as e:
            skipped.append((run, str(e)))
            continue
        except (KeyError, TypeError, ZeroDivisionError) as e:
            skipped.append((run, f"metrics.json lacks the digits figures ({type(e).__name__}: {e})"))
            continue
        key = json.dumps(m, sort_keys=True)
        if key in seen:
            skipped.append((run, f"same metrics.json as {seen[key]} (a copy of that run)"))
            continue
        seen[key] = run
        facts.append(fact)
    return facts, skipped


def pool(fs: list[dict]) -> dict:
    """One table row from the runs of one method x steps x teacher."""
    ratios = [f["fd_ratio"] for f in fs]
    # spread: std over runs (seeds) when there are several, else the std over evaluation seeds
    spread = float(np.std(ratios)) if len(fs) > 1 else fs[0]["fd_ratio_seed_std"]
    walls = [f["wall_seconds"] for f in fs if f["wall_seconds"] is not None]
    pr = [(f["precision"], f["recall"]) for f in fs if f.get("recall") is not None]
    return {"method": fs[0]["method"], "steps": fs[0]["steps"], "teacher": fs[0]["teacher"], "runs": len(fs),
            "reference": fs[0]["reference"],
            "precision": float(np.mean([p for p, _ in pr])) if pr else None,
            "recall": float(np.mean([r for _, r in pr])) if pr else None,
            "accuracy": float(np.mean([f["accuracy"] for f in fs])),
            "fd_ratio": float(np.mean(ratios)), "fd_ratio_spread": spread,
            "wall_seconds": float(np.mean(walls)) if walls else None,
            "wall_approx": any(f["wall_approx"] for f in fs),
            "generator_updates": float(np.mean([f["generator_updates"] for f in fs])),
            "run_dirs": [f["run"] for f in fs]}


def methods_table(paths: list[str], out: Path, rebase: bool = False) -> Path:
    facts, skipped = collect_runs(paths, rebase)
    for folder, why in skipped:
        print(f"skipped {folder}: {why}", file=sys.stderr)
    if not facts:
        raise SystemExit("error: no run folder with metrics.json and config.json found under " + " ".join(paths))
    groups: dict[tuple, list[dict]] = {}
    for f in facts:     # runs of other teachers (or text-to-image runs) are other experiments: never pooled
        groups.setdefault((f["method"], f["steps"], f["teacher"], f["reference"]), []).append(f)
    rows = [pool(fs) for _, fs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2]))]
    status(f"{len(facts)} run(s) in {len(rows)} row(s); {len(skipped)} folder(s) skipped")
    refs = sorted({r["reference"] for r in rows})
    lines = ["# Methods x steps x teacher (digits)", "",
             NOTE + " FD ratio = student FD-digits / the reference's FD-digits; references: "
             + "; ".join(f"[{i + 1}] {ref}" for i, ref in enumerate(refs)) + ".", "",
             "| method | steps | teacher | runs | class accuracy | FD ratio (mean ± spread) | reference | precision | "
             "recall | wall time (s) | generator updates |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    dash = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        wall = "–" if r["wall_seconds"] is None else f"{'~' if r['wall_approx'] else ''}{r['wall_seconds']:.0f}"
        lines.append(f"| {r['method']} | {r['steps']} | {r['teacher']} | {r['runs']} | {r['accuracy']:.3f} | "
                     f"{r['fd_ratio']:.3g} ± {r['fd_ratio_spread']:.2g} | [{refs.index(r['reference']) + 1}] | "
                     f"{dash(r['precision'])} | {dash(r['recall'])} | {wall} | {r['generator_updates']:.0f} |")
    lines += ["", "Spread: std over runs when a row pools several runs, else the std over evaluation seeds. "
              "~: wall time estimated from file times (metrics.json has no train_seconds).", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.md").write_text("\n".join(lines))
    (out / "methods.json").write_text(json.dumps({"rows": rows, "runs": facts, "note": NOTE,
                                                  "skipped": {str(k): v for k, v in skipped}}, indent=2))
    return out / "methods.md"


def parser() -> argparse.ArgumentParser:
    from fewstep.digits.teacher_grid import FINAL_SEEDS, GRID, SCREEN_SAMPLES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="student directories (exported pipelines), or run folders with "
                   "--methods-table")
    p.add_argument("--teacher", default=None, help="teacher directory (default: the bundled digits teacher)")
    p.add_argument("--out", type=Path, default=Path("reports/benchmark"), help="report folder")
    p.add_argument("--methods-table", action="store_true", help="build the methods x steps table from each run's "
                   "metrics.json instead of benchmarking")
    p.add_argument("--rebase", action="store_true", help="with --methods-table: divide runs evaluated against the "
                   "fixed CFG-2 teacher by the teacher at its best (its cached grid) instead")
    p.add_argument("--samples", type=int, default=2000, help="images per seed for accuracy and FD-digits")
    p.add_argument("--seeds", type=parse_ints, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--teacher-steps", type=parse_ints, default=[1, 2, 4, 8, 50],
                   help="teacher step counts for its quality-vs-NFE curve at --teacher-guidance (50 is always "
                   "included: the fixed setting of the second ratio column)")
    p.add_argument("--teacher-guidance", type=float, default=2.0, help="CFG w of the teacher's curve, uncond + w "
                   "(cond - uncond); its 50-step row is the 'ratio to the teacher at 50 steps, CFG w (a fixed "
                   "setting)' column, not the reference")
    grid = p.add_argument_group("the reference: the teacher at its best over a declared grid (cached per teacher "
                                "weights; the defaults are fewstep.digits.teacher_grid's and read its cache)")
    grid.add_argument("--grid-guidance", type=parse_floats, default=sorted(GRID["guidance_scale"]),
                      help="comma-separated CFG scales (default %(default)s)")
    grid.add_argument("--grid-steps", type=parse_ints, default=sorted(GRID["steps"]),
                      help="comma-separated step counts (default %(default)s)")
    grid.add_argument("--grid-samplers", type=parse_samplers, default=sorted(GRID["sampler"]),
                      help="comma-separated samplers: ddim (deterministic), ddpm (stochastic, ancestral) "
                      "(default %(default)s)")
    grid.add_argument("--grid-screen-samples", type=int, default=SCREEN_SAMPLES,
                      help="samples per setting in the screen, seed 0 (default %(default)s)")
    grid.add_argument("--grid-seeds", type=parse_ints, default=list(FINAL_SEEDS),
                      help="seeds of the best screened setting, re-scored at --samples (default %(default)s)")
    p.add_argument("--batch", type=int, default=100, help="batch size of the throughput measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed throughput repeats after a warm-up")
    p.add_argument("--latency-repeats", type=int, default=10, help="timed batch-1 calls after a warm-up")
    p.add_argument("--speed-child", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.speed_child:
        speed_child(args.speed_child)
        return 0
    import matplotlib

    matplotlib.use("Agg")
    if args.methods_table:
        md = methods_table(args.models, args.out, args.rebase)
        print(f"wrote {md} and {md.with_name('methods.json')}")
        return 0
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    report = benchmark(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    status(f"plots and sample grid into {args.out}")
    plots = [plot_quality(report["rows"], args.out), plot_speed(report["rows"], args.out),
             plot_samples(report["rows"], args.out)]
    md = write_report(report, args.out)
    print(md.read_text())
    status(f"wrote {md}, {args.out / 'report.json'} and {', '.join(p.name for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
