"""Peak memory and step time of the flow-map and trajectory methods (KD, MeanFlow, sCM, rCM, TwinFlow) against DMD2,
on benchmarks/step_cost.py's tiny SD1.5 pipeline, one CPU thread.

    python benchmarks/flowmap_cost.py                            # every method that exists, 40 timed steps each
    python benchmarks/flowmap_cost.py --methods dmd2 meanflow --steps 10

Each method is the one-step student (t = 999) of its preset on the tiny SD1.5 teacher, full fine-tuning in float32,
batch 4, teacher CFG 1.75, TTUR 5 where the method has a critic (DMD2, rCM), no GAN term, real images from a folder
(the flow-map methods build x_t from them). The methods without an SD1.5 preset start from their digits preset.
KD makes 16 cached pairs from 8 teacher steps (its one-time cost, in the warm-up). Timing is step_cost.py's: whole
TTUR cycles after warm-up, with each step's network passes and the overhead ratio (a JVP pass is timed there as a
plain forward pass, so the flow-map methods' overhead includes their tangent).

Memory, in MB:
- ``step_peak_mb``: the peak of CPU tensor memory allocated during one training step above what was live before it
  (activations, gradients, the tangent, the optimizer's temporaries), from torch's profiler (``profile_memory``:
  each op's own allocations and frees, summed in time order), over the second TTUR cycle (in the warm-up, so the
  timed steps run without the profiler);
- ``persistent_mb``: the tensors that live across steps: every network's parameters and buffers (teacher, student,
  critic, heads, EMA or target copies), optimizer states and the EMA shadow, each storage counted once;
- ``peak_mb``: their sum. Not tracemalloc: it sees Python's allocator only, not torch's tensor memory.

Prints a JSON report and a markdown table; the ratios divide by DMD2's row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost  # puts the repository and tests/ on the path

from fewstep.methods import REGISTRY
from fewstep.run.presets import PRESETS

# method -> (preset it starts from, method fields, model fields); DMD2 is step_cost.py's "dmd2" config
METHODS = {
    "kd": ("sd15_kd", {"pairs": 16, "teacher_steps": 8}, {}),
    "meanflow": ("digits_meanflow", {}, {}),
    "scm": ("digits_scm", {}, {}),
    "rcm": ("digits_rcm", {"gan_weight_student": 0.0}, {"gan_head": False}),
    "twinflow": ("digits_twinflow", {}, {}),
}


def register() -> list[str]:
    """Add each method that exists to step_cost.CONFIGS, from a preset copy whose data is prompts plus images (the
    digits presets read the bundled digits); the names, DMD2 first."""
    names = ["dmd2"]
    for method, (preset, method_fields, model_fields) in METHODS.items():
        if method not in REGISTRY or preset not in PRESETS.get(method, {}):
            continue
        base = PRESETS[method][preset]

        def bench(base=base):
            cfg = base()
            cfg.data.source = "prompts"
            return cfg

        PRESETS[method][f"bench_{preset}"] = bench
        step_cost.CONFIGS[method] = (method, f"bench_{preset}", method_fields, model_fields)
        names.append(method)
    return names


def live_peak(prof) -> int:
    """Peak bytes of CPU tensor memory above the start of a profiled window: each event's own allocations and frees
    in time order."""
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def persistent_bytes(turns) -> int:
    """Bytes of every tensor that lives across steps, each storage once: the method's parameters and buffers
    (teacher, student, critic, copies), the optimizers' states and the EMA shadow."""
    tensors = [*turns.method.parameters(), *turns.method.buffers()]
    for opt, _ in turns.opts.values():
        tensors += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    if turns.ema is not None:
        tensors += list(turns.ema.shadow)
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
    return sum(seen.values())


class MemoryTurns:
    """A ``loop._Turns`` subclass factory: the steps of the second TTUR cycle run under the profiler, and the turns
    object is kept to count its persistent tensors."""

    def __init__(self, base, every: int):
        self.record = {"step_peak": 0, "turns": None}
        record = self.record

        class Turns(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                record["turns"] = self

            def run(self, turn, ti, step, *args, **kwargs):
                if not every <= step < 2 * every:
                    return super().run(turn, ti, step, *args, **kwargs)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as p:
                    out = super().run(turn, ti, step, *args, **kwargs)
                record["step_peak"] = max(record["step_peak"], live_peak(p))
                return out

        self.cls = Turns


class SizedSource:
    """A batch source whose batches have ``b`` samples (cycling through the source's own): step_cost.time_pass times
    a pass on the batch's conditions, which it builds for the batch size or twice it (CFG) only, and TwinFlow's
    passes run on its groups."""

    def __init__(self, source, b: int):
        self.source, self.b = source, b

    def batch(self, *args, **kwargs):
        batch = self.source.batch(*args, **kwargs)
        rows = torch.arange(self.b) % len(batch)
        return replace(batch, noise=batch.noise[rows], cond=batch.cond[rows])


def measure(name, teacher, prompts, images, work, steps, warmup) -> dict:
    """step_cost.measure's row for ``name``, with the memory of the steps of its second TTUR cycle."""
    from fewstep.run import build
    from fewstep.training import loop

    every = max(step_cost.TTUR, 1)
    patch = MemoryTurns(loop._Turns, every)
    originals = loop._Turns, build.make_method, step_cost.time_pass
    loop._Turns = patch.cls
    # step_cost builds methods without their batch source, which KD makes its cached pairs from
    build.make_method = lambda cfg, t, source=None: originals[1](cfg, t, source or build.make_source(cfg, t))
    step_cost.time_pass = lambda method, source, kind, *a, **k: originals[2](method, SizedSource(source, kind[1]),
                                                                               kind, *a, **k)
    try:
        row = step_cost.measure(name, teacher, prompts, images, work, "cpu", steps, max(warmup, 2 * every))
    finally:
        loop._Turns, build.make_method, step_cost.time_pass = originals
    mb = 2 ** 20
    persistent = persistent_bytes(patch.record["turns"])
    row.update(step_peak_mb=round(patch.record["step_peak"] / mb, 1), persistent_mb=round(persistent / mb, 1),
               peak_mb=round((patch.record["step_peak"] + persistent) / mb, 1))
    return row


def main():
    names = register()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=names, choices=names)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the comparison uses 1)")
    p.add_argument("--steps", type=int, default=40, help="timed steps (rounded up to whole TTUR cycles)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps (at least two TTUR cycles: the second is "
                   "profiled for memory)")
    p.add_argument("--out", default="", help="also write the JSON report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = step_cost.tiny_sd15(work / "teacher")
        prompts, images = step_cost.data_files(work)
        for name in args.methods:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            rows.append(measure(name, teacher, prompts, images, work, args.steps, args.warmup))
    base = next((r for r in rows if r["config"] == "dmd2"), None)
    for r in rows:
        if base is not None:
            r["time_vs_dmd2"] = round(r["ms_per_step"] / base["ms_per_step"], 2)
            r["memory_vs_dmd2"] = round(r["peak_mb"] / base["peak_mb"], 2)
    report = {"machine": {"device": "cpu", "threads": args.threads, "load_1min": os.getloadavg()[0],
                          "torch": torch.__version__, "memory": "torch.profiler profile_memory (CPU tensors)"},
              "command": " ".join(sys.argv), "rows": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print("\n| method | ms/step | x DMD2 | peak MB (persistent + step) | x DMD2 | overhead |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['ms_per_step']} | {r.get('time_vs_dmd2', '')} | {r['peak_mb']} "
              f"({r['persistent_mb']} + {r['step_peak_mb']}) | {r.get('memory_vs_dmd2', '')} | {r['overhead']} |")


if __name__ == "__main__":
    main()
