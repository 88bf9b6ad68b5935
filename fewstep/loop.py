"""The one training loop: turns, per-turn gradient accumulation, clipping, EMA, logging, samples,
checkpoints and resume. It knows turns, not methods (DESIGN.md section 3).

Gradient accumulation is done by hand per turn: accelerate's ``accumulate()`` shares one counter across
optimizers and silently skips updates when turns run at different rates (ecosystem notes, accelerate).
All randomness of a step comes from per-sample seeds (``Batch.seeds``), so a resumed run equals an
uninterrupted one and the result does not depend on how the global batch is split.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from . import checkpoint, distributed, optim
from .config import RunConfig
from .ema import EMA


class NonFiniteError(RuntimeError):
    """Raised after ``train.max_nonfinite`` consecutive updates with a non-finite loss or gradient."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def _save(ckpt_dir, step, state, t) -> None:
    try:
        checkpoint.save(ckpt_dir, step, state, t.keep_last, t.keep_every)
    except OSError as e:
        raise CheckpointError(f"could not write the step-{step} checkpoint under {ckpt_dir}: {e}; free disk space or "
                              f"fix permissions, then re-run the same command to resume from "
                              f"{checkpoint.latest(ckpt_dir) or 'the start'} (left intact)") from None


def _set_turn(params: dict, turn: str) -> None:
    """Only the parameters of ``turn`` require gradients while it runs."""
    for name, ps in params.items():
        if name != turn:
            for p in ps:
                p.requires_grad_(False)
    for p in params[turn]:
        p.requires_grad_(True)


def _state(method, opts, ema, step, nonfinite, root=None) -> dict:
    """Everything a resume needs. ``root``: the FSDP-prepared module when parameters are sharded; modules and
    optimizers are then gathered whole, keyed by parameter name (a collective: every rank calls this, rank 0
    receives it). EMA state is whole either way."""
    if root is not None:
        modules = {k: distributed.gather_module(m) for k, m in method.checkpoint_modules().items()}
        optimizers = {k: distributed.gather_optimizer(root, o) for k, (o, _) in opts.items()}
    else:
        modules = {k: m.state_dict() for k, m in method.checkpoint_modules().items()}
        optimizers = {k: o.state_dict() for k, (o, _) in opts.items()}
    return {"step": step, "nonfinite": nonfinite, "sharded": root is not None, "modules": modules,
            "optimizers": optimizers, "schedulers": {k: s.state_dict() for k, (_, s) in opts.items()},
            "ema": ema.state_dict() if ema is not None else None}


def _restore(state, method, opts, ema, root=None) -> tuple[int, int]:
    """Load ``state`` into the run. A checkpoint written under FSDP (parameter-name keyed, whole tensors)
    loads into an FSDP run with any number of processes, or into an unsharded one."""
    if state.get("sharded"):
        root = root if root is not None else method
        load_module = distributed.scatter_module
        load_optimizer = lambda o, sd: distributed.scatter_optimizer(root, o, sd)  # noqa: E731
    elif root is not None:
        raise CheckpointError("this checkpoint was written without FSDP and this run shards its parameters with "
                              "FSDP; resume it without FSDP (the default or the DDP accelerate config)")
    else:
        load_module = load_optimizer = lambda x, sd: x.load_state_dict(sd)  # noqa: E731
    for k, m in method.checkpoint_modules().items():
        load_module(m, state["modules"][k])
    for k, (o, s) in opts.items():
        load_optimizer(o, state["optimizers"][k])
        s.load_state_dict(state["schedulers"][k])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    return state["step"], state["nonfinite"]


def _rank_mean(logs: dict, accelerator) -> dict:
    """Average logged scalars over processes, so a log line describes the global batch."""
    if accelerator.num_processes == 1 or not logs:
        return logs
    keys = sorted(logs)
    v = accelerator.reduce(torch.tensor([float(logs[k]) for k in keys], device=accelerator.device), "mean")
    return dict(zip(keys, v.tolist()))


def train(cfg: RunConfig, method, data, accelerator, on_sample=None, on_checkpoint=None) -> dict:
    """Run ``cfg.train.max_steps`` steps of ``method`` on batches from ``data`` (see ``fewstep.data``).

    ``on_sample(step, ema)`` is called every ``sample_every`` steps on the main process; returns the EMA
    (or None) so callers can sample or export with averaged weights.
    """
    t = cfg.train
    params = method.trainable()
    opts = {turn.name: optim.build(params[turn.name], cfg.optim[turn.name]) for turn in method.turns}
    if accelerator.distributed_type == DistributedType.FSDP:
        # FSDP2 replaces every parameter by a sharded DTensor; accelerate re-points optimizers it is given
        model = accelerator.prepare(method, *(o for o, _ in opts.values()))[0]
    else:
        model = accelerator.prepare(method)
    root = model if distributed.is_sharded(model) else None
    params = method.trainable()      # after prepare: the parameters the prepared model really uses
    if root is not None:
        distributed.init_sharded(root, params)
    ema = EMA(params["student"], t.ema_decay) if t.ema_decay > 0 and "student" in params else None
    ckpt_dir = Path(t.output_dir) / "checkpoints"
    step, nonfinite = 0, 0
    last = checkpoint.latest(ckpt_dir)
    if last is not None:
        step, nonfinite = _restore(checkpoint.load(last), method, opts, ema, root)
        accelerator.print(f"resumed from {last} (step {step})")
    if root is not None and on_sample is not None:
        accelerator.print("FSDP: parameters are sharded, so no sample grids are written during training")
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(total=t.max_steps, initial=step, disable=not accelerator.is_main_process, desc=cfg.method_name,
               dynamic_ncols=True)
    updates = {turn.name: 0 for turn in method.turns}
    trace = os.environ.get("FEWSTEP_TRACE")   # per-rank JSON lines of every turn: for multi-process debugging
    trace_file = open(f"{trace}.rank{rank}.jsonl", "a") if trace else None
    while step < t.max_steps:
        logs = {}
        for ti, turn in enumerate(method.turns):
            if step % turn.every:
                continue
            _set_turn(params, turn.name)
            opt, sched = opts[turn.name]
            opt.zero_grad(set_to_none=True)
            for micro in range(t.grad_accum):
                batch = data.batch(step, ti, micro, rank, world).to(accelerator.device)
                sync = accelerator.no_sync(model) if micro < t.grad_accum - 1 else nullcontext()
                with sync, accelerator.autocast():
                    loss, turn_logs = model(turn.name, batch, step)
                    accelerator.backward(loss / t.grad_accum)
            grad_norm = accelerator.clip_grad_norm_(params[turn.name], t.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):     # FSDP2 returns the global norm as a DTensor
                grad_norm = grad_norm.full_tensor()
            finite = torch.tensor(float(torch.isfinite(loss.detach()).item() and math.isfinite(float(grad_norm))),
                                  device=accelerator.device)
            if accelerator.reduce(finite, "min").item() > 0:   # every rank agrees to step or to skip
                opt.step()
                sched.step()
                updates[turn.name] += 1
                nonfinite = 0
                if turn.name == "student" and ema is not None:
                    ema.update()
            else:
                nonfinite += 1
                logs["nonfinite/count"] = nonfinite
                if nonfinite >= t.max_nonfinite:
                    raise NonFiniteError(f"{nonfinite} consecutive non-finite updates (last in turn {turn.name!r} at "
                                         f"step {step}); lower the learning rate or check the data. The last "
                                         f"checkpoint ({checkpoint.latest(ckpt_dir)}) is intact.")
            opt.zero_grad(set_to_none=True)
            logs.update({k: float(v) for k, v in turn_logs.items()})
            if trace_file:
                trace_file.write(json.dumps({"step": step, "turn": turn.name, "loss": float(loss.detach()),
                                             "logs": {k: float(v) for k, v in turn_logs.items()}}) + "\n")
                trace_file.flush()
            logs[f"loss/{turn.name}"] = float(loss.detach())
            logs[f"grad_norm/{turn.name}"] = float(grad_norm)
            logs[f"lr/{turn.name}"] = sched.get_last_lr()[0]
        method.after_step(step)
        step += 1
        bar.update(1)
        if step % t.log_every == 0 or step == t.max_steps:
            logs = _rank_mean(logs, accelerator)
            logs.update({f"updates/{k}": v for k, v in updates.items()})
            accelerator.log(logs, step=step)
            bar.set_postfix({k.split("/", 1)[1]: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss/")
                             and k.count("/") == 1})
        # sampling runs on rank 0 alone, which sharded parameters cannot do: no sample grids under FSDP
        if accelerator.is_main_process and on_sample is not None and root is None and \
                (step % t.sample_every == 0 or step == t.max_steps):
            on_sample(step, ema)
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            accelerator.wait_for_everyone()
            # sharded state is gathered by every rank (collectives); only rank 0 writes
            state = _state(method, opts, ema, step, nonfinite, root) if root is not None or \
                accelerator.is_main_process else None
            if accelerator.is_main_process:
                _save(ckpt_dir, step, state, t)
            del state
            accelerator.wait_for_everyone()
    bar.close()
    if trace_file:
        trace_file.close()
    return {"step": step, "updates": updates, "ema": ema, "root": root}
