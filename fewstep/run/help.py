"""``--help`` that teaches: every field of the chosen preset, grouped by section, with its type, default,
allowed values and the description written beside it (config dataclass comments, and the "Config fields ->
paper symbols" map of the method module's docstring)."""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import typing

from fewstep.run.config import RunConfig, flatten
from fewstep.run.validate import CHOICES

FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^=#]+=[^#]*#\s*(.+)$")


def comments(cls) -> dict[str, str]:
    """``name -> comment`` of the fields of dataclass ``cls`` and its bases (``x: int = 1  # what x is``)."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__[:-1]):
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = FIELD_COMMENT.match(line)
            if m:
                out[m[1]] = m[2].strip()
    return out


def paper_symbols(cls) -> dict[str, str]:
    """``name -> text`` from the "Config fields -> paper symbols:" paragraph of the docstrings of the
    modules that define ``cls`` and its bases (entries ``field`` = meaning, separated by ``;``)."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__[:-1]):
        doc = sys.modules[base.__module__].__doc__ or ""
        m = re.search(r"Config fields -> paper symbols:(.*?)(?:\n\s*\n|\Z)", doc, re.S)
        if not m:
            continue
        depth, part, parts = 0, "", []
        for ch in " ".join(m[1].split()):
            depth += ch in "([" and 1 or (-1 if ch in ")]" else 0)
            if ch == ";" and depth == 0:
                parts.append(part)
                part = ""
            else:
                part += ch
        for entry in parts + [part]:
            names, eq, text = entry.partition(" = ")
            for name in re.findall(r"``(\w+)``", names if eq else ""):
                out[name] = text.strip().rstrip(".")
    return out


def _type_name(typ) -> str:
    if typing.get_origin(typ) is tuple:
        return f"{typing.get_args(typ)[0].__name__.upper()},..."
    return getattr(typ, "__name__", str(typ)).upper().replace("STR", "TEXT").replace("BOOL", "true|false")


def field_rows(cfg: RunConfig) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every field of ``cfg``."""
    docs: dict[str, str] = {}
    types: dict[str, str] = {}
    for section in ("model", "data", "train", "method"):
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        notes = {**comments(type(obj)), **paper_symbols(type(obj))}
        for f in dataclasses.fields(obj):
            docs[f"{section}.{f.name}"] = notes.get(f.name, "")
            types[f"{section}.{f.name}"] = _type_name(hints[f.name])
    opt_notes = comments(type(next(iter(cfg.optim.values()))))
    rows = []
    for key, value in flatten(cfg).items():
        leaf = key.rsplit(".", 1)[-1]
        doc = docs.get(key, opt_notes.get(leaf, ""))
        typ = types.get(key, _type_name(type(value)))
        if key in CHOICES:
            typ = "|".join(CHOICES[key])
        default = json.dumps(list(value) if isinstance(value, tuple) else value)
        rows.append((key, typ, default, doc))
    return rows


def help_text(prog: str, doc: str, presets: dict, preset: str) -> str:
    """The whole ``--help`` page for ``prog`` with the defaults of ``preset``."""
    cfg = presets[preset]()
    lines = [doc.strip(), "", f"usage: accelerate launch {prog} [--preset NAME] [--dry-run] [--section.field VALUE ...]",
             "", "presets:"]
    lines += [f"  {name}{' (default)' if name == preset else ''}: {' '.join((fn.__doc__ or '').split())[:150]}"
              for name, fn in sorted(presets.items())]
    lines += ["", "  --dry-run: check the config and print it resolved, without loading anything or touching files",
              "", f"fields (defaults of preset {preset}):"]
    section = None
    for key, typ, default, text in field_rows(cfg):
        head = key.split(".")[0]
        if head != section:
            section = head
            lines += ["", f"{section}:"]
        lines.append(f"  --{key} {typ} (default {default})" + (f"\n      {text}" if text else ""))
    return "\n".join(lines)
