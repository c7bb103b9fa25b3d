"""The package's layers, checked from the source: every module sits in a layer's subpackage, a
module imports only its own layer and the layers below it (function-level and type-only imports
count too), and no two modules import each other, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "steeldefect"
# Bottom to top. A layer may import any layer with a lower rank; serve and study share a rank and
# so never import each other.
RANK = {"core": 0, "runtime": 1, "data": 2, "models": 3, "deploy": 4, "study": 5, "serve": 5}
TOP_LEVEL = {"__init__", "__main__", "cli"}  # above every layer
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The steeldefect modules a file imports anywhere in it (``from steeldefect.x import y`` counts
    as ``steeldefect.x.y`` when that is a module, else ``steeldefect.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("steeldefect"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("steeldefect"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return {name for name in found if name in known}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # A package's __init__ re-exporting from its modules is not an edge of the layers' flow.
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def test_every_module_is_in_a_layer():
    stray = [
        name
        for name, path in modules().items()
        if layer_of(name) is None and path.stem not in TOP_LEVEL and name != "steeldefect"
    ]
    assert not stray, f"modules outside a layer's subpackage: {stray}"


def test_no_module_imports_a_higher_layer():
    wrong = []
    for module, targets in graph().items():
        layer = layer_of(module)
        if layer is None:
            continue  # the package's __init__, __main__ and cli sit above every layer
        for target in targets:
            other = layer_of(target)
            if other is None:
                if target != "steeldefect":  # `from steeldefect import __version__` is allowed
                    wrong.append(f"{module} -> {target}")
            elif other != layer and RANK[other] >= RANK[layer]:
                wrong.append(f"{module} ({layer}) -> {target} ({other})")
    assert not wrong, "imports against the layers' order:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    edges = {m: {t for t in ts if t != "steeldefect"} for m, ts in graph().items() if m != "steeldefect"}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                circles.append(path[path.index(target) :] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_size(name):
    path = modules()[name]
    text = path.read_text()
    lines = len(text.splitlines())
    docstring = ast.get_docstring(ast.parse(text)) or ""
    # A module may be longer when it holds one concern that would not split well; it says why.
    justified = "one concern" in docstring
    assert lines <= MAX_LINES or justified, f"{path.name}: {lines} lines and its docstring gives no reason"


def test_the_detector_finds_a_circle(tmp_path, monkeypatch):
    """The circle check itself: two modules importing each other are found."""
    package = tmp_path / "steeldefect"
    (package / "core").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text("def f():\n    from steeldefect.core import b\n")
    (package / "core" / "b.py").write_text("from steeldefect.core.a import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    with pytest.raises(AssertionError, match="steeldefect.core.a -> steeldefect.core.b"):
        test_no_import_circles()


def test_public_api_names_resolve_without_tensorflow_for_a_model_file():
    """The short names of the public API resolve; using a model file never imports TensorFlow."""
    import subprocess
    import sys

    script = (
        "import sys, steeldefect\n"
        "missing = [n for n in steeldefect.__all__ if n != '__version__' and n not in ('train', 'export', "
        "'evaluate', 'reproduce', 'learning_curve') and getattr(steeldefect, n) is None]\n"
        "assert not missing, missing\n"
        "assert steeldefect.Classifier.__module__ == 'steeldefect.runtime.modelfile'\n"
        "assert steeldefect.predict_paths.__module__ == 'steeldefect.deploy.predict'\n"
        "assert 'tensorflow' not in sys.modules, 'the model-file API imported TensorFlow'\n"
        "assert callable(steeldefect.train) and steeldefect.train.__module__ == 'steeldefect.study.pipeline'\n"
        "try:\n    steeldefect.no_such_name\nexcept AttributeError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "has no attribute 'no_such_name'" in done.stdout


def test_all_lists_exactly_the_lazy_api():
    import steeldefect

    assert sorted(steeldefect.__all__) == sorted(["__version__", *steeldefect._API])
