"""The package's layers: every import points down (model ← method ← experiments), and nothing outside tests/
imports from tests/. Read from the source with `ast`, so a lazy import inside a function counts too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# rank of each part of the package: a module may import its own rank or a lower one
RANKS = {"video_io": 0, "sd": 0, "method": 1, "experiment": 2, "toyworld": 2, "__main__": 3, "app": 3, "__init__": 3}


def part_of(module: str) -> str:
    """'t2vz.sd.unet' → 'sd'; 't2vz' → '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path, module: str) -> list[str]:
    """The absolute names of the modules a file imports (relative imports resolved against `module`)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return names


def package_modules():
    for path in sorted((REPO / "t2vz").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def test_layers_are_the_package_tree():
    """Every subpackage and top-level module of t2vz has a rank (a new one must be placed in a layer)."""
    found = {p.name if p.is_dir() else p.stem for p in (REPO / "t2vz").iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert found == set(RANKS), f"unranked: {found - set(RANKS)}, stale: {set(RANKS) - found}"


@pytest.mark.parametrize("path,module", list(package_modules()), ids=lambda v: str(v).split("t2vz/")[-1])
def test_imports_point_down(path, module):
    own = RANKS[part_of(module)]
    upward = [m for m in imported_modules(path, module)
              if m.split(".")[0] == "t2vz" and m != "t2vz" and RANKS[part_of(m)] > own]
    assert not upward, f"{module} (layer {part_of(module)}) imports from a layer above it: {upward}"


def test_the_model_layer_imports_nothing_from_the_method():
    """t2vz.sd is the model alone: no sampling, no video I/O."""
    for path, module in package_modules():
        if part_of(module) == "sd":
            bad = [m for m in imported_modules(path, module) if m.startswith("t2vz.") and part_of(m) != "sd"]
            assert not bad, f"{module} imports {bad}"


def test_nothing_outside_tests_imports_from_tests():
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")}
    for folder in ("t2vz", "weights_convert", "experiments"):
        for path in (REPO / folder).rglob("*.py"):
            names = imported_modules(path, "x.y")
            bad = [m for m in names if m.split(".")[0] in test_modules | {"tests"}]
            assert not bad, f"{path.relative_to(REPO)} imports from tests/: {bad}"
