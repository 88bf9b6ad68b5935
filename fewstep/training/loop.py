"""The one training loop: turns, per-turn gradient accumulation, clipping, EMA, logging, samples,
checkpoints, resume and graceful stops. It knows turns, not methods.

Gradient accumulation is done by hand per turn: accelerate's ``accumulate()`` shares one counter across
optimizers and silently skips updates when turns run at different rates.
All randomness of a step comes from per-sample seeds (``Batch.seeds``), so a resumed run equals an
uninterrupted one and the result does not depend on how the global batch is split.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from fewstep.core.ema import EMA
from fewstep.errors import CheckpointError, NonFiniteError
from fewstep.training import checkpoint, distributed, optim

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of the last finished step was written. ``code``: 130 / 143."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@contextmanager
def _stop_requests():
    """Turn SIGINT / SIGTERM into a request read at the next step boundary (``box[0]``: the signal)."""
    box: list = [None]
    if threading.current_thread() is not threading.main_thread():
        yield box
        return

    def handler(signum, _frame):
        if box[0] is not None:          # a second Ctrl-C: stop at once (the last checkpoint is intact)
            raise KeyboardInterrupt
        box[0] = signum

    saved = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield box
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _save(ckpt_dir, step, state, t) -> None:
    try:
        checkpoint.save(ckpt_dir, step, state, t.keep_last, t.keep_every)
    except Exception as e:  # noqa: BLE001 (a full disk shows up as OSError or as torch's RuntimeError)
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"could not write the step-{step} checkpoint under {ckpt_dir} ({type(e).__name__}: "
                              f"{reason}); free disk space or fix permissions, then re-run the same command to "
                              f"resume from {checkpoint.latest(ckpt_dir) or 'the start'} (left intact)") from None


def _set_turn(params: dict, turn: str) -> None:
    """Only the parameters of ``turn`` require gradients while it runs."""
    for name, ps in params.items():
        if name != turn:
            for p in ps:
                p.requires_grad_(False)
    for p in params[turn]:
        p.requires_grad_(True)


def _state(method, opts, ema, step, nonfinite, root=None, updates=None) -> dict:
    """Everything a resume needs. ``root``: the FSDP-prepared module when parameters are sharded; modules and
    optimizers are then gathered whole, keyed by parameter name (a collective: every rank calls this, rank 0
    receives it). EMA state is whole either way."""
    if root is not None:
        modules = {k: distributed.gather_module(m) for k, m in method.checkpoint_modules().items()}
        optimizers = {k: distributed.gather_optimizer(root, o) for k, (o, _) in opts.items()}
    else:
        modules = {k: m.state_dict() for k, m in method.checkpoint_modules().items()}
        optimizers = {k: o.state_dict() for k, (o, _) in opts.items()}
    return {"step": step, "nonfinite": nonfinite, "updates": dict(updates or {}), "sharded": root is not None,
            "modules": modules,
            "optimizers": optimizers, "schedulers": {k: s.state_dict() for k, (_, s) in opts.items()},
            "ema": ema.state_dict() if ema is not None else None}


def _restore(state, method, opts, ema, root=None) -> tuple[int, int, dict]:
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
    return state["step"], state["nonfinite"], dict(state.get("updates", {}))


def _rank_mean(logs: dict, accelerator) -> dict:
    """Average logged scalars over processes, so a log line describes the global batch."""
    if accelerator.num_processes == 1 or not logs:
        return logs
    keys = sorted(logs)
    v = accelerator.reduce(torch.tensor([float(logs[k]) for k in keys], device=accelerator.device), "mean")
    return dict(zip(keys, v.tolist()))


class _Turns:
    """One optimizer (and lr schedule) per turn, and the step that runs a turn: micro-batches with
    gradient accumulation, clipping, a step every rank agrees on, the student EMA."""

    def __init__(self, cfg, method, model, params, opts, ema, accelerator):
        self.cfg, self.method, self.model, self.params = cfg, method, model, params
        self.opts, self.ema, self.acc = opts, ema, accelerator

    def run(self, turn, ti: int, step: int, data, nonfinite: int, ckpt_dir) -> tuple[dict, bool]:
        """``(logs, stepped)`` of ``turn`` at ``step``; raises ``NonFiniteError`` after too many skips."""
        t, acc = self.cfg.train, self.acc
        _set_turn(self.params, turn.name)
        opt, sched = self.opts[turn.name]
        opt.zero_grad(set_to_none=True)
        for micro in range(t.grad_accum):
            batch = data.batch(step, ti, micro, acc.process_index, acc.num_processes).to(acc.device)
            sync = acc.no_sync(self.model) if micro < t.grad_accum - 1 else nullcontext()
            with sync, acc.autocast():
                loss, turn_logs = self.model(turn.name, batch, step)
                acc.backward(loss / t.grad_accum)
        grad_norm = acc.clip_grad_norm_(self.params[turn.name], t.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):     # FSDP2 returns the global norm as a DTensor
            grad_norm = grad_norm.full_tensor()
        finite = torch.tensor(float(torch.isfinite(loss.detach()).item() and math.isfinite(float(grad_norm))),
                              device=acc.device)
        stepped = acc.reduce(finite, "min").item() > 0      # every rank agrees to step or to skip
        if stepped:
            opt.step()
            sched.step()
            if turn.name == "student" and self.ema is not None:
                self.ema.update()
        elif nonfinite + 1 >= t.max_nonfinite:
            raise NonFiniteError(f"{nonfinite + 1} consecutive non-finite updates (last in turn {turn.name!r} at "
                                 f"step {step}); lower the learning rate or check the data. The last "
                                 f"checkpoint ({checkpoint.latest(ckpt_dir)}) is intact.")
        opt.zero_grad(set_to_none=True)
        logs = {k: float(v) for k, v in turn_logs.items()}
        logs.update({f"loss/{turn.name}": float(loss.detach()), f"grad_norm/{turn.name}": float(grad_norm),
                     f"lr/{turn.name}": sched.get_last_lr()[0]})
        return logs, stepped


class _Log:
    """What each log step reports: every turn's latest values (a turn that ran on an earlier step is still
    shown: the student turn of DMD2 runs every 5th step) and the running mean of each turn's loss since the
    previous log step."""

    def __init__(self):
        self.last: dict[str, float] = {}
        self.sums: dict[str, list[float]] = {}

    def add(self, logs: dict) -> None:
        self.last.update(logs)
        for k, v in logs.items():
            if k.startswith("loss/") and k.count("/") == 1:
                self.sums.setdefault(k, []).append(v)

    def flush(self) -> dict:
        out = dict(self.last)
        out.update({f"{k}_mean": sum(v) / len(v) for k, v in self.sums.items() if v})
        self.sums = {}
        return out


def train(cfg, method, data, accelerator, on_sample=None) -> dict:
    """Run ``cfg.train.max_steps`` steps of ``method`` on batches from ``data`` (see ``fewstep.training.data``).

    ``on_sample(step, ema)`` is called every ``sample_every`` steps on the main process, with the EMA (or
    None) so callers can sample with averaged weights. SIGINT / SIGTERM stop at the next step boundary with a
    checkpoint of that step (``Interrupted``).
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
    step, nonfinite, updates = 0, 0, {turn.name: 0 for turn in method.turns}
    state, last = checkpoint.load_latest(ckpt_dir, say=accelerator.print)
    if state is not None:
        step, nonfinite, saved = _restore(state, method, opts, ema, root)
        updates.update({k: v for k, v in saved.items() if k in updates})
        accelerator.print(f"resumed from {last} (step {step})")
    del state
    if root is not None and on_sample is not None:
        accelerator.print("FSDP: parameters are sharded, so no sample grids are written during training")
    turns, log = _Turns(cfg, method, model, params, opts, ema, accelerator), _Log()
    bar = tqdm(total=t.max_steps, initial=step, disable=not accelerator.is_main_process, desc=cfg.method_name,
               dynamic_ncols=True)
    trace = os.environ.get("FEWSTEP_TRACE")   # per-rank JSON lines of every turn: for multi-process debugging
    trace_file = open(f"{trace}.rank{accelerator.process_index}.jsonl", "a") if trace else None
    with _stop_requests() as stop, _closing(bar, trace_file):
        while step < t.max_steps:
            for ti, turn in enumerate(method.turns):
                if not turn.runs(step):
                    continue
                logs, stepped = turns.run(turn, ti, step, data, nonfinite, ckpt_dir)
                updates[turn.name] += stepped
                nonfinite = 0 if stepped else nonfinite + 1
                log.add({**logs, **({} if stepped else {"nonfinite/count": nonfinite})})
                if trace_file:
                    trace_file.write(json.dumps({"step": step, "turn": turn.name, "loss": logs[f"loss/{turn.name}"],
                                                 "logs": logs}) + "\n")
                    trace_file.flush()
            method.after_step(step)
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                logs = _rank_mean(log.flush(), accelerator)
                logs.update({f"updates/{k}": v for k, v in updates.items()})
                accelerator.log(logs, step=step)
                bar.set_postfix({k.split("/", 1)[1]: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss/")
                                 and k.count("/") == 1})
            # sampling runs on rank 0 alone, which sharded parameters cannot do: no sample grids under FSDP
            if accelerator.is_main_process and on_sample is not None and root is None and \
                    (step % t.sample_every == 0 or step == t.max_steps):
                on_sample(step, ema)
            signum = _agreed(stop[0], accelerator)
            if step % t.checkpoint_every == 0 or step == t.max_steps or signum:
                _checkpoint(method, opts, ema, step, nonfinite, updates, root, accelerator, ckpt_dir, t)
            if signum:
                name = signal.Signals(signum).name
                raise Interrupted(f"{name}: stopped after step {step}; checkpoint {ckpt_dir / f'step_{step:08d}'} "
                                  "is written. Re-run the same command to resume from it.", EXIT_CODES[signum])
    return {"step": step, "updates": updates, "ema": ema, "root": root}


@contextmanager
def _closing(bar, trace_file):
    """Close the progress bar (its line ends, so an error printed after it stands on a line of its own) and the
    trace file, however the loop ends."""
    try:
        yield
    finally:
        bar.close()
        if trace_file:
            trace_file.close()


def _agreed(signum, accelerator) -> int:
    """The stop request, the same on every rank (a stop must be taken by all of them, or a collective hangs)."""
    if accelerator.num_processes == 1:
        return signum or 0
    v = accelerator.reduce(torch.tensor(float(signum or 0), device=accelerator.device), "max")
    return int(v.item())


def _checkpoint(method, opts, ema, step, nonfinite, updates, root, accelerator, ckpt_dir, t) -> None:
    accelerator.wait_for_everyone()
    # sharded state is gathered by every rank (collectives); only rank 0 writes
    state = _state(method, opts, ema, step, nonfinite, root, updates) if root is not None or \
        accelerator.is_main_process else None
    if accelerator.is_main_process:
        _save(ckpt_dir, step, state, t)
    del state
    accelerator.wait_for_everyone()
