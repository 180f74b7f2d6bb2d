"""The package's shape: no import cycle, and the shared modules name no technique (they ask the registry)."""
import ast
from pathlib import Path

import networkx as nx
import pytest

import dynasparse
from dynasparse import plans
from dynasparse.registry import all_techniques

PACKAGE = Path(dynasparse.__file__).parent
SHARED = ["api.py", "backend.py", "export/onnx.py", "runtime/ort.py", "runtime/generate.py"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _static_imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports at module level (imports inside functions are deferred on
    purpose and cannot form a cycle at import time; ``if TYPE_CHECKING`` blocks never run)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules}


def test_the_package_has_no_import_cycle():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    for name, path in files.items():
        graph.add_node(name)
        for imported in _static_imports(path, set(files)):
            if imported != name and not name.startswith(imported + "."):  # a package's own __init__ is no edge
                graph.add_edge(name, imported)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


BELOW_THE_PASSES = ["config.py", "plans.py", "registry.py", "ir", "kernels", "runtime"]


@pytest.mark.parametrize("layer", BELOW_THE_PASSES)
def test_lower_layers_import_no_pass_and_no_technique_record(layer):
    """The passes and the technique records tie these layers together, so none of them imports either at module
    level: the runtime reads what the passes leave (``plans``), and every layer asks ``registry`` for a technique."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    paths = [PACKAGE / layer] if layer.endswith(".py") else sorted((PACKAGE / layer).rglob("*.py"))
    upward = sorted(f"{path.relative_to(PACKAGE)} -> {imported}" for path in paths
                    for imported in _static_imports(path, modules)
                    if ".".join(imported.split(".")[:2]) in ("dynasparse.passes", "dynasparse.techniques"))
    assert not upward, f"imports that run back up: {upward}"


def _code_words(path: Path) -> set[str]:
    """Identifiers, attribute names and string constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.add(node.asname or node.name.split(".")[-1])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    return words


TECHNIQUE_WORDS = sorted({t.config.__name__ for t in all_techniques()}
                         | {name for name in vars(plans) if name.isupper()}
                         | {value for name, value in vars(plans).items() if name.isupper()})


@pytest.mark.parametrize("module", SHARED)
def test_shared_modules_name_no_technique(module):
    named = _code_words(PACKAGE / module) & set(TECHNIQUE_WORDS)
    assert not named, f"{module} names {sorted(named)}: ask the technique registry instead"
