"""``metrics.json``: the exported student scored against its teacher (digits teachers)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fewstep.digits import quality as Q
from fewstep.digits import scoring as digits_eval
from fewstep.digits import t2i as D
from fewstep.digits import teacher_grid
from fewstep.run import cards
from fewstep.run.build import teacher_path
from fewstep.run.config import RunConfig


def fixed_teacher_reference(teacher_dir: Path, n: int, seeds=(0, 1, 2)) -> dict:
    """The teacher at one fixed setting, 50 DDIM steps at CFG 2 (and 1 step), cached beside the teacher per sample
    count and keyed by the teacher's weights (``weights_digest``): new weights are scored anew. Not its best
    setting (`teacher_grid.teacher_best` is): reports label ratios to it as "CFG 2"."""
    cache = teacher_dir / "reference_metrics.json"     # {"<num_samples>": figures}, one entry per sample count
    table = json.loads(cache.read_text()) if cache.is_file() else {}
    ref, digest = table.get(str(n)), digits_eval.weights_digest(teacher_dir)
    if ref is not None and ref.get("seeds") == list(seeds) and ref.get("weights_sha256") == digest:
        return ref
    pipe = digits_eval.load_pipeline(teacher_dir)
    ref = digits_eval.score(pipe, n, seeds, steps=50, guidance_scale=2.0)
    one = digits_eval.score(pipe, n, seeds, steps=1, guidance_scale=2.0)
    ref.update({"steps": 50, "guidance_scale": 2.0, "one_step_fd_digits": one["fd_digits"],
                "one_step_accuracy": one["accuracy"], "weights_sha256": digest})
    try:
        cache.write_text(json.dumps({**table, str(n): ref}, indent=2))
    except OSError:
        pass   # read-only install: recomputed next time
    return ref


def write_metrics(cfg: RunConfig, result: dict) -> dict:
    """Score the exported student against the teacher and write ``metrics.json`` into the run folder."""
    if cfg.data.source == "prompts" and cfg.model.teacher == "digits_t2i":
        return write_digits_t2i_metrics(cfg, result)
    if cfg.data.source != "digits":
        print("metrics.json is written for the digits teacher only; score text-to-image students with "
              "eval/fid.py and eval/clip_score.py")
        return {}
    out = Path(cfg.train.output_dir)
    t0 = time.perf_counter()
    student = digits_eval.load_pipeline(out)
    teacher_dir = teacher_path(cfg.model.teacher)
    n, seeds = cfg.train.eval_samples, (0, 1, 2)
    grid = teacher_grid.teacher_best(teacher_dir, n)
    best, fixed = grid["best"], fixed_teacher_reference(teacher_dir, n, seeds)
    print(f"scoring {n} student samples x 3 seeds ...", file=sys.stderr)
    s = digits_eval.score(student, n, seeds, quality=True)
    print(f"measuring the speed-up over the teacher at its best ({teacher_grid.label(best)}; interleaved) ...",
          file=sys.stderr)
    teacher = digits_eval.load_pipeline(teacher_dir)
    teacher_grid.with_sampler(teacher, best["sampler"], dict(teacher.scheduler.config))
    speed = digits_eval.speedup(student, teacher, teacher_steps=best["steps"], guidance_scale=best["guidance_scale"])
    K = len(cfg.model.student_timesteps)
    teacher_nfe = best["steps"] * (1 if best["guidance_scale"] == 1.0 else 2)
    m = {"reference": f"the teacher at its best: {teacher_grid.label(best)} ({grid['protocol']})",
         "student": {**s, "images_per_s": speed["student_images_per_s"], "steps": K, "nfe": K},
         "teacher": {**best, "setting": teacher_grid.label(best), "images_per_s": speed["teacher_images_per_s"],
                     "nfe": teacher_nfe, "weights_sha256": grid["weights_sha256"]},
         "fd_ratio_to_teacher": s["fd_digits"] / best["fd_digits"],
         "fd_ratio_to_teacher_net2": s["fd_digits_net2"] / best["fd_digits_net2"],
         "recall_ratio_to_teacher": s["recall"] / best["recall"] if best["recall"] > 0 else None,
         "memorisation": Q.compare_memorisation(s["nearest_train"], best["nearest_train"]),
         "teacher_cfg2": {**fixed, "setting": "DDIM, 50 steps, CFG 2 (a fixed setting, not the teacher's best)",
                          "nfe": 100},
         "fd_ratio_to_teacher_cfg2": s["fd_digits"] / fixed["fd_digits"],
         "fd_ratio_to_teacher_one_step": s["fd_digits"] / fixed["one_step_fd_digits"],
         "speedup_images_per_s": speed["speedup"], "speed": speed,
         "updates": result["updates"], "steps": result["step"], "train_seconds": result.get("train_seconds"),
         "eval_seconds": time.perf_counter() - t0,
         "note": "FD-digits is a Frechet distance in the bundled digits net's feature space, not FID; _net2 figures "
                 "are the same in the second, independently trained digits net. Ratios below 1 beat the teacher."}
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    card = out / "README.md"
    if card.is_file():      # replaces the section of an earlier evaluation of this folder
        text = card.read_text().split(cards.EVALUATION_HEADING)[0].rstrip("\n")
        card.write_text(text + "\n" + cards.evaluation_section(m))
    print(json.dumps({k: m[k] for k in ("reference", "fd_ratio_to_teacher", "fd_ratio_to_teacher_net2",
                                        "recall_ratio_to_teacher", "fd_ratio_to_teacher_cfg2",
                                        "speedup_images_per_s")}
                     | {"student_accuracy": s["accuracy"], "student_fd_digits": s["fd_digits"],
                        "memorises": m["memorisation"]["copies"]}, indent=2))
    return m


def write_digits_t2i_metrics(cfg: RunConfig, result: dict) -> dict:
    """``metrics.json`` of a student of the bundled text-to-image digits teacher: prompt-following accuracy
    (the digits net's argmax equals the digit the prompt names) and FD-digits of the exported folder loaded
    with the stock ``IFPipeline``, on the training templates and on held-out ones, beside the teacher's own
    figures (50 DDIM steps at CFG 2, cached in the asset's ``reference_metrics.json``)."""
    out, n, seeds = Path(cfg.train.output_dir), cfg.train.eval_samples, (cfg.train.seed,)
    K = len(cfg.model.student_timesteps)
    t0 = time.perf_counter()
    ref = D.teacher_reference(n, seeds)
    student = D.load_pipeline(out)
    t1 = time.perf_counter()
    s = D.score(student, n, seeds, K)
    s["seconds"] = time.perf_counter() - t1
    s["heldout"] = D.score(student, max(10, n // 2), seeds, K, templates=D.HELDOUT_TEMPLATES)
    m = {"student": {**s, "nfe": K}, "teacher": {**ref, "nfe": 2 * ref["steps"]},
         "accuracy_gap_to_teacher": ref["accuracy"] - s["accuracy"],
         "fd_ratio_to_teacher": s["fd_digits"] / ref["fd_digits"], "templates": list(D.TEMPLATES),
         "heldout_templates": list(D.HELDOUT_TEMPLATES), "updates": result["updates"], "steps": result["step"],
         "train_seconds": result.get("train_seconds"), "eval_seconds": time.perf_counter() - t0,
         "note": "accuracy: the bundled digits net's argmax equals the digit named in the prompt. FD-digits is a "
                 "Frechet distance in that net's feature space, not FID."}
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    print(json.dumps({"student_accuracy": s["accuracy"], "teacher_accuracy": ref["accuracy"],
                      "student_fd_digits": s["fd_digits"], "teacher_fd_digits": ref["fd_digits"],
                      "student_heldout_accuracy": s["heldout"]["accuracy"],
                      "teacher_heldout_accuracy": ref["heldout"]["accuracy"]}, indent=2))
    return m
