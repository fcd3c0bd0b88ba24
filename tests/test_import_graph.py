"""The package's structure: no import cycle, plugins never import the manager, no private state read
across modules.

The graph has every ``sloth_plugins`` module (``kernels/`` and ``integrations/`` as the
``sloth_plugins.kernels`` / ``sloth_plugins.integrations`` they install as), with an edge for each
import statement anywhere in a module: module level and inside functions (a function-level import
is still a dependency; it only hides a cycle from the interpreter). Relative imports are resolved;
``from package import name`` points at the submodule when ``name`` is one. The implicit import of
a parent package is not an edge (every module would then close a cycle through its package).
"""
from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = {"sloth_plugins": "sloth_plugins", "sloth_plugins.kernels": "kernels",
               "sloth_plugins.integrations": "integrations"}
STATE_MODULE = "sloth_plugins/state.py"
# Issue #16 item 5, done on another branch: each kernels/_x_triton.py becomes a leaf (no import back
# of its reference module). Until that lands, those imports back are the only cycles allowed, and
# test_pending_kernel_cycles_are_still_there fails as soon as one is gone: then delete it here.
_PENDING_KERNEL_EDGES = {(f"sloth_plugins.kernels._{name}_triton", f"sloth_plugins.kernels.{name}")
                         for name in ("activations", "cross_entropy", "nf4", "rms_norm", "rope")}


def _modules() -> Dict[str, str]:
    """Module name -> file path, for every module of the installed package."""
    found = {}
    for package, folder in SOURCE_DIRS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            rel = os.path.relpath(dirpath, base)
            parts = [] if rel == "." else rel.split(os.sep)
            for name in filenames:
                if not name.endswith(".py"):
                    continue
                stem = name[:-3]
                module = ".".join([package, *parts] + ([] if stem == "__init__" else [stem]))
                found[module] = os.path.join(dirpath, name)
    return found


def _is_package(path: str) -> bool:
    return os.path.basename(path) == "__init__.py"


def _resolve(module: str, path: str, node: ast.ImportFrom) -> Optional[str]:
    if not node.level:
        return node.module
    package = module if _is_package(path) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _known(name: str, modules: Dict[str, str]) -> Optional[str]:
    """The longest prefix of a dotted name that is one of our modules."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                if base:
                    targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                               for alias in node.names]
            for target in targets:
                known = _known(target, modules)
                if known is not None and known != module:
                    graph[module].add(known)
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {m: WHITE for m in graph}
    stack: List[str] = []

    def visit(m: str) -> Optional[List[str]]:
        color[m] = GREY
        stack.append(m)
        for n in sorted(graph[m]):
            if color[n] == GREY:
                return stack[stack.index(n):] + [n]
            if color[n] == WHITE:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        color[m] = BLACK
        return None

    for m in sorted(graph):
        if color[m] == WHITE:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "sloth_plugins.checkpointing.controller" in graph
    # module level, relative, "from package import submodule"
    assert "sloth_plugins.checkpointing.layer_node" in graph["sloth_plugins.checkpointing.controller"]
    # function level (get_plugin_manager imports the built-in plugins when first asked)
    assert "sloth_plugins.plugins" in graph["sloth_plugins.manager"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    for module, target in _PENDING_KERNEL_EDGES:
        graph[module].discard(target)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_pending_kernel_cycles_are_still_there():
    graph = import_graph()
    gone = sorted(f"{m} -> {t}" for m, t in _PENDING_KERNEL_EDGES if t not in graph.get(m, ()))
    assert not gone, f"no longer imported, remove from _PENDING_KERNEL_EDGES: {gone}"


def test_plugins_never_import_the_manager():
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items()
                       if m.startswith(("sloth_plugins.plugins", "sloth_plugins.checkpointing"))
                       and "sloth_plugins.manager" in deps)
    assert not offenders, f"plugins get what they need through the hook call (PatchContext): {offenders}"


_PRIVATE_STATE = re.compile(r"""__dict__\s*(\[|\.get\(|\.pop\(|\.setdefault\()\s*["']_sloth""")


def test_no_module_reads_another_modules_private_state():
    """Per-model state lives in one Stash (``sloth_plugins/state.py``); everyone else reads it through
    public functions (``get_state``, ``get_checkpoint_controller``, a plugin's StashKey)."""
    offenders = []
    for folder in ("sloth_plugins", "kernels", "integrations", "benchmarks"):
        for dirpath, _, filenames in os.walk(os.path.join(ROOT, folder)):
            for name in filenames:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
                if not name.endswith(".py") or rel == STATE_MODULE:
                    continue
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if _PRIVATE_STATE.search(line) or "STATE_ATTR" in line:
                            offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "per-model state read around the state module:\n" + "\n".join(offenders)
