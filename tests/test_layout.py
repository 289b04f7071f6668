"""The package's layers, and the tests' own: what may import what.

The layers, lowest first (``LAYERS``; docs/design.md, "The layers of the package"): a module may
import its own part of the package and any part of a lower layer, never a part of its own layer
(peers stay independent) or of a higher one. The imports are read from the source with ``ast``,
function-level ones included, so an import deferred into a function still counts.

``meteor/__init__.py`` is outside the table: it imports the configuration and re-exports the rest
lazily; ``from meteor import X`` is read as an import of the module ``X`` comes from
(``meteor._LAZY``), so the lazy names cannot hide an upward import. On top of the layers: no import
circles, ``import meteor.model.modeling`` loads neither the trainer, the evaluation nor the demo,
``import meteor`` stays cheap, the package imports no module by an old (moved) name, and the tests
of the library (every test file outside ``tests/demo/``) import nothing of the demo.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import meteor

PACKAGE = Path(meteor.__file__).parent
TESTS = Path(__file__).parent

LAYERS: list[tuple[str, ...]] = [
    # foundations: they import nothing of the package
    ("meteor.model.configuration", "meteor.options"),
    # images → views, conversations → token ids: the processor
    ("meteor.processing",),
    # the model: vision tower, projectors (Top-Down Compression), ops, the transformers classes
    ("meteor.model",),
    # one folder ↔ a model and its processor; the Auto-class registration
    ("meteor.pretrained",),
    # the trainer, talking to a model (generation, chat, server, explain), and tiny real-class
    # builders for tests
    ("meteor.train", "meteor.serve", "meteor.testing"),
    # evaluation and the adapters to other tools: both generate through meteor.serve.streaming,
    # and the Qwen-VL adapter draws its selections with meteor.serve.visualize
    ("meteor.eval", "meteor.adapters"),
    # measurements (the Qwen-VL benchmark runs the Qwen-VL adapter)
    ("meteor.bench",),
    # the synthetic-world demo: trains, evaluates and draws with everything below
    ("meteor.demo",),
    # the command line: a table from subcommand to function, importing each lazily
    ("meteor.cli",),
    # `python -m meteor`
    ("meteor.__main__",),
]
"""Each layer's parts, by module name; a part holds its submodules (``meteor.model`` holds
``meteor.model.vision``), except where a part of another layer is longer (``meteor.model.configuration``
sits in the lowest layer though it lies in ``meteor.model``)."""

ROOT = "meteor"
"""``meteor/__init__.py``: not in the table (see the module docstring)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(tree: ast.AST, package: str) -> list[str]:
    """Every module name an import statement of ``tree`` names (``from a import b`` gives ``a`` and
    ``a.b``), relative imports resolved against ``package``."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names += [stem] + [f"{stem}.{alias.name}" for alias in node.names]
    return names


def _imports() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its source (resolved, existing ones)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for candidate in _imported_names(ast.parse(path.read_text(encoding="utf-8")), package):
            if candidate.startswith(ROOT + ".") and candidate.count(".") == 1 \
                    and candidate.partition(".")[2] in meteor._LAZY:
                candidate = meteor._LAZY[candidate.partition(".")[2]]   # a lazy name: where it lives
            # `from .x import y` names a module when y is one, else x; keep the longest that exists
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
        graph[name] = targets
    return graph


def _part(module: str) -> tuple[int, str] | None:
    """(layer index, part) of a module: the longest part of the table that holds it."""
    found = [(len(part), index, part) for index, layer in enumerate(LAYERS) for part in layer
             if module == part or module.startswith(part + ".")]
    return max(found)[1:] if found else None


def test_every_module_has_a_layer_and_every_part_exists():
    graph = _imports()
    assert sorted(name for name in graph if name != ROOT and _part(name) is None) == []
    parts = [part for layer in LAYERS for part in layer]
    assert len(parts) == len(set(parts))
    assert [part for part in parts if not any(name == part or name.startswith(part + ".") for name in graph)] == []


def test_no_module_imports_a_higher_layer_or_a_peer():
    graph = _imports()
    wrong = []
    for name, targets in sorted(graph.items()):
        if name == ROOT:
            continue
        layer, part = _part(name)
        for target in sorted(targets):
            if target == ROOT:
                continue          # the package itself: its lazy names were resolved above
            target_layer, target_part = _part(target)
            if target_part != part and target_layer >= layer:
                wrong.append(f"{name} (layer {layer}) imports {target} (layer {target_layer})")
    assert wrong == []


def test_the_lazy_names_of_the_package_come_from_existing_modules():
    graph = _imports()
    assert meteor._LAZY and sorted(set(meteor._LAZY.values()) - set(graph)) == []


def test_the_package_imports_no_module_by_an_old_name():
    old = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in _imported_names(ast.parse(path.read_text(encoding="utf-8")), package):
            if meteor._moved_name(imported) is not None:
                old.append(f"{name} imports {imported} (now {meteor._moved_name(imported)})")
    assert old == []


def test_the_library_imports_nothing_from_the_demo_layer():
    graph = _imports()
    demo = LAYERS.index(("meteor.demo",))
    library = [name for name in graph if name != ROOT and _part(name)[0] < demo]
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


# --- what the code cites ------------------------------------------------------------------------------
DESIGN = TESTS.parent / "docs" / "design.md"
_CITATION = re.compile(r'docs/design\.md((?:,\s*"[^"\n]+")*)')


def _design_sections() -> set[str]:
    return {line.lstrip("#").strip() for line in DESIGN.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def test_the_code_cites_sections_of_the_design_document_that_exist():
    sections = _design_sections()
    cited = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for match in _CITATION.finditer(path.read_text(encoding="utf-8")):
            for section in re.findall(r'"([^"\n]+)"', match.group(1)):
                cited.setdefault(section, []).append(_module_name(path))
    assert {"Tensors", "The folder", "Slicing", "Visual expert"} <= set(cited)
    assert {section: where for section, where in cited.items() if section not in sections} == {}


def test_the_code_cites_no_document_outside_the_repository():
    """The design document is docs/design.md; the working notes the project started from are not in
    the repository, so a comment must not send a reader to them."""
    outside = [f"{_module_name(path)}: {found}" for path in sorted(PACKAGE.rglob("*.py"))
               for found in re.findall(r"\bSPEC\b[^\n]{0,12}|SPEC\.md|\.\./shared/", path.read_text(encoding="utf-8"))]
    assert outside == []


# --- the tests' own layering ---------------------------------------------------------------------------
_DEMO_MODULE = re.compile(r"meteor\.demo(\.[\w.]*)?")


def _demo_imports(path: Path) -> list[str]:
    """Where a test file reaches the demo: imports of ``meteor.demo`` (or of ``demo`` from
    ``meteor``), anywhere in the file, and module paths given as strings (``import_module``,
    ``monkeypatch.setattr("meteor.demo....")``, code run with ``python -c``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [name for name in _imported_names(ast.Module(body=[node], type_ignores=[]), "")
                     if name == "meteor.demo" or name.startswith("meteor.demo.")]
            if names:
                found.append(f"{path.name}:{node.lineno}: {names[0]}")
    found += [f"{path.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
              if isinstance(node, ast.Constant) and isinstance(node.value, str)
              and (_DEMO_MODULE.fullmatch(node.value) or re.search(r"\bimport meteor\.demo\b|from meteor\.demo\b",
                                                                    node.value))]
    return found


def test_no_test_of_the_library_imports_the_demo():
    demo_tests = TESTS / "demo"
    library_tests = [path for path in sorted(TESTS.rglob("*.py"))
                     if demo_tests not in path.parents and path != Path(__file__)]   # this file names the demo
    assert len(library_tests) > 30 and any(demo_tests.glob("test_*.py"))
    assert [found for path in library_tests for found in _demo_imports(path)] == []


def test_the_demo_import_check_finds_each_way_in(tmp_path):
    """The check above reads what it should: each form of reaching the demo is found, a mention
    in prose is not."""
    sample = tmp_path / "test_sample.py"
    sample.write_text('"""Runs like meteor.demo.world does."""\n'
                      "import meteor.demo.world\n"
                      "from meteor.demo import run_demo\n"
                      "from meteor import demo\n"
                      "def f():\n"
                      "    from meteor.demo.world import generate_world\n"
                      "    importlib.import_module('meteor.demo.report')\n"
                      "    run(['python', '-c', 'from meteor.demo import x'])\n")
    assert [line.split(":")[1] for line in _demo_imports(sample)] == ["2", "3", "4", "6", "7", "8"]
