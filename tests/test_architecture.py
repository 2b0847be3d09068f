"""The floors of docs/architecture.md: no module of minirnng imports one on a floor above its own
(imports inside functions included: deferring an import does not change who depends on whom)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "minirnng"

#: floor -> the top-level modules and packages of minirnng on it, as the picture draws them
FLOORS = {
    6: ("cli", "reproduce", "__main__"),
    5: ("train", "parser", "detect", "mirroring", "train_stage2", "objective", "optim", "parallel", "processes"),
    4: ("models", "labs", "propagation"),
    3: ("layers", "losses"),
    2: ("gradcheck", "cuda"),
    1: ("backend", "data", "metrics", "viz", "bootstrap", "atomic", "interruption", "subnormals"),
}
FLOOR_OF = {name: floor for floor, names in FLOORS.items() for name in names}


def dotted_name(path):
    """``minirnng/models/stage2.py`` -> ``["minirnng", "models", "stage2"]`` (a package's
    ``__init__.py`` is the package itself)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(path):
    """(line, dotted name as a list) of every minirnng module ``path`` imports, anywhere in it."""
    here = dotted_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            for alias in node.names if node.module is None else [None]:
                yield node.lineno, base + ([alias.name] if alias else [])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minirnng"):
            yield node.lineno, node.module.split(".")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("minirnng"):
                    yield node.lineno, alias.name.split(".")


def test_every_top_level_module_has_a_floor():
    names = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()
             if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()}
    assert names == set(FLOOR_OF), "place the new module in FLOORS and in docs/architecture.md's picture"


def test_no_module_imports_a_floor_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = dotted_name(path)
        if len(importer) < 2:
            continue  # the package's own __init__ gathers the public names of every floor
        for line, imported in imported_modules(path):
            # a name that is no module (``from .. import __version__``) is the package's metadata
            floor = FLOOR_OF.get(imported[1], 1) if len(imported) > 1 else 1
            if floor > FLOOR_OF[importer[1]]:
                upward.append(f"{'.'.join(importer)} (floor {FLOOR_OF[importer[1]]}) imports "
                              f"{'.'.join(imported)} (floor {floor}), line {line}")
    assert not upward, "\n".join(upward)
