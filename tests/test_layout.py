"""The package's two layers: the model library (`meteor`) and the demo harness (`meteor.demo`).

The library imports nothing from the demo layer, `import meteor.model.modeling` loads neither the training
stack nor the demo, and no module of the package imports another that (directly or through others)
imports it back. The imports are read from the source with `ast`, function-level ones included.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import meteor

PACKAGE = Path(meteor.__file__).parent
ENTRY_POINTS = {"meteor.cli", "meteor.__main__"}
"""The command line sits above both layers."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its source (resolved, existing ones)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                candidates = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
            else:
                continue
            for candidate in candidates:
                # `from .x import y` names a module when y is one, else x; keep the longest that exists
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def test_the_library_imports_nothing_from_the_demo_layer():
    graph = _imports()
    library = [name for name in graph if not name.startswith("meteor.demo") and name not in ENTRY_POINTS]
    assert len(library) > 40 and any(name.startswith("meteor.demo.") for name in graph)
    leaks = {name: sorted(t for t in graph[name] if t.startswith("meteor.demo")) for name in library}
    assert {name: found for name, found in leaks.items() if found} == {}


def test_no_import_circles_inside_the_package():
    graph = _imports()
    circles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # A package's __init__ handing on its submodules' names is not a circle when the submodules
    # never import the package itself; anything else found here is one.
    assert circles == []


def test_importing_the_model_loads_neither_the_trainer_nor_the_demo():
    code = ("import json, sys, meteor.model.modeling; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('meteor'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert "meteor.model.modeling" in loaded and "meteor.model.projectors.top_down" in loaded
    assert [m for m in loaded if m.startswith(("meteor.train", "meteor.demo", "meteor.eval"))] == []
    bare = json.loads(subprocess.run([sys.executable, "-c", code.replace("meteor.model.modeling", "meteor")],
                                     capture_output=True, text=True, check=True).stdout)
    assert bare == ["meteor", "meteor.model", "meteor.model.configuration"]   # `import meteor` stays cheap
