"""Full-state checkpoints, written atomically (DESIGN.md section 5).

A checkpoint is a folder ``checkpoints/step_<n>`` holding ``state.pt`` (every trainable module, optimizer,
lr schedule, EMA and the step; data order and randomness are functions of the step). It is written into
a ``.tmp-*`` folder, fsynced and renamed into place, then the ``latest`` pointer is replaced; a kill at
any point leaves the previous checkpoint intact and a partial folder that resume ignores.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: str | Path, step: int, state: dict, keep_last: int = 2, keep_every: int = 0) -> Path:
    """Write ``state`` as checkpoint ``step`` under ``root``; prune old ones; return its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        pointer = root / f".latest-{os.getpid()}"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last, keep_every)
    return final


def complete(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place and holding state.pt), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint, or None. Partial ``.tmp-*`` folders are ignored."""
    done = complete(root)
    return done[-1][1] if done else None


def prune(root: Path, keep_last: int, keep_every: int) -> None:
    """Keep the last ``keep_last`` checkpoints plus every ``keep_every``-th step; drop leftovers of kills."""
    done = complete(root)
    keep = {s for s, _ in done[-keep_last:]} | {s for s, _ in done if keep_every and s % keep_every == 0}
    for s, p in done:
        if s not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step_*"):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def load(path: str | Path) -> dict:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
