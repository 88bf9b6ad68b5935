"""Full-state checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/step_<n>`` holding ``state.pt`` (every trainable module, optimizer,
lr schedule, EMA, update counters and the step; data order and randomness are functions of the step) and
``state.sha256`` (its size and checksum, computed while writing). It is written into a ``.tmp-*`` folder,
fsynced and renamed into place, then the ``latest`` pointer is replaced; a kill at any point leaves the
previous checkpoint intact and a partial folder that resume ignores. At resume a checkpoint whose file is
truncated, empty or altered fails its checksum and the newest intact one is used instead.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import torch

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE, CHECKSUM = "state.pt", "state.sha256"


class CorruptCheckpoint(ValueError):
    """A checkpoint whose state file does not match its recorded checksum, or does not load."""


class _Hashing:
    """A binary file that hashes what is written through it (torch.save writes sequentially)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


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
        with open(tmp / STATE, "wb") as f:
            hashing = _Hashing(f)
            torch.save(state, hashing)
            f.flush()
            os.fsync(f.fileno())
        (tmp / CHECKSUM).write_text(f"{hashing.sha.hexdigest()} {hashing.size}\n")
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
        if m and (p / STATE).is_file():
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


def verify(path: str | Path) -> None:
    """Raise ``CorruptCheckpoint`` unless ``path/state.pt`` has the size and checksum recorded beside it."""
    path = Path(path)
    try:
        digest, size = (path / CHECKSUM).read_text().split()
    except (OSError, ValueError):
        raise CorruptCheckpoint(f"{path / CHECKSUM} is missing or unreadable") from None
    actual = (path / STATE).stat().st_size
    if actual != int(size):
        raise CorruptCheckpoint(f"{path / STATE} has {actual} bytes, {size} were written")
    sha = hashlib.sha256()
    with open(path / STATE, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    if sha.hexdigest() != digest:
        raise CorruptCheckpoint(f"{path / STATE} does not match its checksum")


def load(path: str | Path) -> dict:
    """The verified state of checkpoint ``path``."""
    verify(path)
    try:
        return torch.load(Path(path) / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 (any unpickling failure means the file is unusable)
        raise CorruptCheckpoint(f"{Path(path) / STATE} does not load ({type(e).__name__})") from None


def load_latest(root: str | Path, say=print) -> tuple[dict | None, Path | None]:
    """The newest intact checkpoint under ``root`` as ``(state, folder)``, skipping corrupt ones (each named
    through ``say``); ``(None, None)`` when there is none."""
    for step, path in reversed(complete(root)):
        try:
            state = load(path)
        except CorruptCheckpoint as e:
            say(f"warning: checkpoint step {step} is corrupt ({e}); trying the one before it")
            continue
        return state, path
    return None, None
