"""The run folder: refuse one that holds something else, replace a previous run only when asked (after every
check has passed), and hold a lock so two runs never write into one folder.

Nothing outside a fewstep run folder is ever removed: ``train.overwrite`` deletes only a folder whose
``config.json`` is a fewstep run config, and never under ``--dry-run``.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from fewstep.errors import ConfigError
from fewstep.run import config as C

LOCK = ".fewstep.lock"


def saved_config(out: Path) -> dict | None:
    """The run config saved in ``out``, or None when ``out`` holds no fewstep run."""
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and isinstance(saved.get("method_name"), str) else None


def describe(out: Path) -> str:
    """What deleting the run in ``out`` would remove, in a few words."""
    steps = sorted(int(p.name.split("_")[-1]) for p in (out / "checkpoints").glob("step_*")
                   if p.name.split("_")[-1].isdigit())
    files = sum(1 for p in out.rglob("*") if p.is_file())
    ckpt = f"checkpoints up to step {steps[-1]}" if steps else "no checkpoints"
    return f"the {saved_config(out).get('method_name')} run there ({ckpt}, {files} files in all)"


def check(cfg: C.RunConfig) -> bool:
    """Whether the run may use ``train.output_dir``; returns True when a previous run there is to be replaced
    (``train.overwrite``). Deletes nothing: ``replace`` does that once every other check has passed."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir {str(out)!r} is a file; give a folder path")
    if not out.exists() or not any(p.name != LOCK for p in out.iterdir()):
        return False
    old = saved_config(out)
    if old is None:
        n = sum(1 for _ in out.iterdir())
        raise ConfigError(f"train.output_dir {str(out)!r} holds {n} entries but no fewstep run; fewstep never "
                          "deletes other files (not even with train.overwrite): choose another train.output_dir")
    if cfg.train.overwrite:
        return True
    changed = C.diff(C.flat_dict(old), C.flat_dict(cfg.to_dict()))
    if old.get("method_name") != cfg.method_name:
        changed.insert(0, "method")
    if changed:
        k = changed[0]
        detail = (f"method: {old.get('method_name')!r} -> {cfg.method_name!r}" if k == "method" else
                  f"{k}: {C.flat_dict(old).get(k)!r} -> {C.flat_dict(cfg.to_dict()).get(k)!r}")
        more = f", +{len(changed) - 1} more" if len(changed) > 1 else ""
        raise ConfigError(f"train.output_dir {str(out)!r} holds a run with a different config ({detail}{more}); "
                          f"choose another train.output_dir, or set train.overwrite true to delete {describe(out)}")
    return False


def replace(out: Path) -> None:
    """Delete the previous fewstep run in ``out`` (checked again: only a run folder is ever removed)."""
    if saved_config(out) is None:
        raise ConfigError(f"train.output_dir {str(out)!r} holds no fewstep run; refusing to delete it")
    for entry in out.iterdir():
        if entry.name == LOCK:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


class RunLock:
    """An exclusive lock on the run folder (``flock`` on ``.fewstep.lock``, holding the pid). The kernel
    releases it when the process dies, so a stale lock of a killed run is simply taken over."""

    def __init__(self, out: Path):
        self.path, self.fd = Path(out) / LOCK, None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"train.output_dir {str(self.path.parent)!r} is in use by another fewstep run "
                              f"(pid {holder}); wait for it to finish or choose another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
