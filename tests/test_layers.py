"""The package's layers: each sub-package of ``fewstep`` imports only the layers below it, and
``pipelines/`` (copied into exported folders) imports no fewstep code at all. Every import counts,
function-local ones included: the graph is read from the source, not from what happens to be loaded."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fewstep"

# layer -> the layers it may import (errors is a leaf; run is the wiring on top)
ALLOWED = {
    "errors": set(),
    "core": {"errors"},
    "backbones": {"errors", "core"},
    "methods": {"errors", "core"},
    "digits": {"errors", "core"},
    "training": {"errors", "core", "backbones", "digits"},
    "testing": {"errors", "core", "backbones", "training"},
    "run": {"errors", "core", "backbones", "methods", "training", "digits"},
    "": {"core", "backbones"},     # fewstep/__init__.py: the public core types, and the adapters registered
}
# who may import the self-contained inference package (it is what exported folders carry)
MAY_IMPORT_PIPELINES = {"digits", "run"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, root: Path, package: str) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import statement in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from fewstep import core" imports the sub-package core
            names = [f"{target}.{a.name}" for a in node.names] if target == "fewstep" else [target]
            out += [(node.lineno, n) for n in names]
    return out


def violations(pkg_dir: Path = PKG, pipelines_dir: Path = ROOT / "pipelines") -> list[str]:
    bad = []
    for path in sorted(pkg_dir.rglob("*.py")):
        if "assets" in path.relative_to(pkg_dir).parts:     # data: the pipeline files bundled with a teacher
            continue
        module = module_name(path, pkg_dir, "fewstep")
        layer = layer_of(module)
        rel = f"fewstep/{path.relative_to(pkg_dir)}"
        if layer not in ALLOWED:
            bad.append(f"{rel}: module outside the declared layers ({layer!r})")
            continue
        for line, target in imports(path, module):
            if target.startswith("fewstep_pipelines") and layer not in MAY_IMPORT_PIPELINES:
                bad.append(f"{rel}:{line}: layer {layer!r} imports {target}")
            if not (target == "fewstep" or target.startswith("fewstep.")):
                continue
            dest = layer_of(target)
            if dest != layer and dest not in ALLOWED[layer]:
                bad.append(f"{rel}:{line}: layer {layer!r} imports {target}")
    for path in sorted(pipelines_dir.rglob("*.py")):
        for line, target in imports(path, module_name(path, pipelines_dir, "fewstep_pipelines")):
            if target == "fewstep" or target.startswith("fewstep."):
                bad.append(f"{path.relative_to(ROOT)}:{line}: pipelines/ imports {target}")
    return bad


def test_every_layer_imports_only_the_layers_below_it():
    assert violations() == []


def test_the_check_catches_a_method_that_imports_the_wiring_layer(tmp_path):
    """A copy of the package with one method importing ``fewstep.run`` must fail the check."""
    import shutil

    copy = tmp_path / "fewstep"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    dmd2 = copy / "methods" / "dmd2.py"
    dmd2.write_text(dmd2.read_text() + "\n\ndef _wired():\n    from ..run import build  # noqa: F401\n")
    bad = violations(copy, ROOT / "pipelines")
    assert any("methods/dmd2.py" in b and "fewstep.run" in b for b in bad), bad


@pytest.mark.parametrize("layer", sorted(k for k in ALLOWED if k))
def test_every_layer_is_a_package(layer):
    assert (PKG / layer / "__init__.py").is_file() or (PKG / f"{layer}.py").is_file()


def test_the_command_line_imports_no_peft_or_transformers():
    """Every ``train/<method>.py`` run, ``--help`` and every refused input included, imports the CLI first; peft
    and transformers take ~6 s to import here, so a method that needs them imports them where it uses them."""
    import subprocess
    import sys

    code = ("import sys, fewstep.run.cli; heavy = [m for m in ('peft', 'transformers') if m in sys.modules]; "
            "print(heavy); sys.exit(bool(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, f"imported at CLI start-up: {r.stdout.strip()} {r.stderr[-500:]}"
