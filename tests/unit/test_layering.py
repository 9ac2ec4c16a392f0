"""The floors of docs/architecture.md: every import of a spillover module points down or sideways
within its own package, and no package imports another that imports it back.

Imports under `if TYPE_CHECKING:` count too: a type that only a higher floor defines is a sign
that the contract lives on the wrong floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "spillover"

# Low to high. A module may import from its own unit or from any unit on a lower floor.
FLOORS: list[tuple[str, ...]] = [
    ("kernels", "config", "hw", "catalog"),
    ("quant",),
    ("plan",),
    ("offload",),
    ("layers",),
    ("models",),
    ("weights",),
    ("engine",),
    ("llm",),
    ("server", "bench", "deploy"),
    ("cli",),
    ("__main__", "__init__"),
]
FLOOR_OF = {unit: i for i, units in enumerate(FLOORS) for unit in units}


def unit_of(module: str) -> str:
    """'spillover.quant.int4' -> 'quant'; 'spillover.config' -> 'config';
    'spillover' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1] if len(parts) > 2 else parts
    return ".".join(parts)


def imported_modules(tree: ast.AST, package: str, root: Path = ROOT) -> set[str]:
    """Every spillover module a file imports (absolute or relative, any nesting depth)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "spillover")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "spillover":
                continue
            if mod != "spillover":
                out.add(mod)
                continue
            for a in node.names:  # `from spillover import kernels` names a unit, `LLM` the root
                sub = any(r.joinpath(a.name).exists() or r.joinpath(f"{a.name}.py").exists()
                          for r in (root,))
                out.add(f"spillover.{a.name}" if sub else "spillover")
    return out


def edges(root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(file, importing unit, imported unit) for every cross-unit import under `root`."""
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        src = unit_of(name) if path.name != "__init__.py" or name != "spillover" else "__init__"
        for mod in imported_modules(ast.parse(path.read_text()), package, root):
            dst = unit_of(mod)
            if dst != src:
                found.append((str(path.relative_to(root.parent)), src, dst))
    return found


def upward(found: list[tuple[str, str, str]]) -> list[str]:
    bad = []
    for file, src, dst in found:
        if src not in FLOOR_OF or dst not in FLOOR_OF:
            bad.append(f"{file}: unit {src if src not in FLOOR_OF else dst!r} has no floor")
        elif FLOOR_OF[dst] >= FLOOR_OF[src] and src not in ("__init__",):
            bad.append(f"{file}: {src} (floor {FLOOR_OF[src]}) imports {dst} (floor "
                       f"{FLOOR_OF[dst]})")
    return bad


def cycles(found: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    pairs = {(s, d) for _, s, d in found}
    return sorted((s, d) for s, d in pairs if (d, s) in pairs and s < d)


def test_every_import_points_down() -> None:
    assert upward(edges()) == []


def test_no_import_circles_between_units() -> None:
    assert cycles(edges()) == []


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    pkg = tmp_path / "spillover"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "engine").mkdir()
    (pkg / "kernels" / "ops.py").write_text("from spillover.engine.runner import ModelRunner\n")
    (pkg / "engine" / "runner.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from "
        "spillover.kernels import ops\n")
    found = edges(pkg)
    assert upward(found) == ["spillover/kernels/ops.py: kernels (floor 0) imports engine (floor 7)"]
    assert cycles(found) == [("engine", "kernels")]


@pytest.mark.parametrize("unit", sorted({p.stem if p.is_file() else p.name for p in ROOT.iterdir()
                                         if p.suffix == ".py" or (p / "__init__.py").exists()}))
def test_every_unit_has_a_floor(unit: str) -> None:
    assert unit in FLOOR_OF, f"spillover/{unit} needs a floor in FLOORS (docs/architecture.md)"
