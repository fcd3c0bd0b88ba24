"""The package's structure, read from the source with ``ast`` (nothing here imports the modules it
checks, except the tables at the end).

* ``kernels/`` (``sloth_plugins.kernels``) imports nothing from the core, transformers, peft or
  lightning, and reaches its siblings by relative imports.
* Each ``kernels/_x_triton.py`` is a leaf: it never imports its public ``kernels/x.py``, which
  decides between it and the reference. Only ``_*_triton`` modules import Triton at module level.
* Each fact has one definition: the gated-activation and kernel names live in ``kernels/names.py``
  and every other table is derived from it.
* No import cycle among the package's modules (expected to fail until the manager cycle is gone).

The import graph counts every import statement a module can execute, function-level ones
included (``if TYPE_CHECKING:`` blocks excepted), with relative imports resolved.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Set

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "sloth_plugins.kernels"
FORBIDDEN_IN_KERNELS = ("transformers", "peft", "lightning", "pytorch_lightning", "lightning_fabric")


def package_dirs() -> Dict[str, Path]:
    """Package name -> source folder, as pyproject.toml installs them."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in setuptools["package-dir"].items()
            if name in setuptools["packages"]}


def module_files() -> Dict[str, Path]:
    """Dotted module name -> source file, for every module of every installed package."""
    out = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


MODULES = module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].stem == "__init__"


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(tree: ast.AST, top_level_only: bool = False) -> Iterable[ast.AST]:
    """Import statements, at any depth (functions, classes, try blocks), TYPE_CHECKING skipped.
    ``top_level_only``: those that run when the module is imported (not inside a def)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def resolve(module: str, node: ast.AST) -> List[str]:
    """Absolute names a statement imports: the module, and ``module.name`` for each name that is a
    submodule we know (``from . import fused_lora``: that submodule alone)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module if _is_package(module) else module.rpartition(".")[0]
        parts = package.split(".")
        if node.level - 1 >= len(parts):
            raise ValueError(f"{module}: relative import beyond the top-level package")
        base = ".".join(parts[:len(parts) - (node.level - 1)])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module
    submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
    # ``from package import submodule`` runs the package's __init__ too, but depends on the submodule:
    # an edge to the package would close a cycle with every package that imports its own modules
    return submodules if len(submodules) == len(node.names) else [target] + submodules


def imports_of(module: str, top_level_only: bool = False) -> Set[str]:
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    return {name for node in _import_nodes(tree, top_level_only) for name in resolve(module, node)}


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the package modules it imports directly."""
    graph = {}
    for module in MODULES:
        graph[module] = {name for name in imports_of(module) if name in MODULES and name != module}
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def _kernel_modules() -> List[str]:
    return [m for m in MODULES if m == KERNELS or m.startswith(KERNELS + ".")]


def _triton_modules() -> List[str]:
    return [m for m in _kernel_modules() if m.rpartition(".")[2].startswith("_")
            and m.endswith("_triton")]


# ----------------------------------------------------------------------------- the import graph itself

def test_graph_covers_the_packages():
    for name in ("sloth_plugins", "sloth_plugins.manager", "sloth_plugins.plugins.kernel_patching",
                 KERNELS, f"{KERNELS}.names", f"{KERNELS}._rope_triton"):
        assert name in MODULES
    graph = import_graph()
    # relative (from ..kernels import ...), from-import of a submodule, and function-level imports
    assert f"{KERNELS}" in graph["sloth_plugins.plugins.kernel_patching"]
    assert "sloth_plugins.plugins.fused_lora" in graph["sloth_plugins.plugins.fused_lora_patching"]
    assert f"{KERNELS}._rope_triton" in graph[f"{KERNELS}.rope"]       # inside apply_rope


def test_find_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


# ----------------------------------------------------------------------------- kernels/ stays a leaf

@pytest.mark.parametrize("module", _kernel_modules())
def test_kernels_import_no_core_and_no_framework(module):
    bad = sorted(name for name in imports_of(module)
                 if name.split(".")[0] in FORBIDDEN_IN_KERNELS
                 or (name.startswith("sloth_plugins") and not (name == KERNELS or name.startswith(KERNELS + "."))))
    assert not bad, f"{module} imports {bad}: kernels/ takes tensors and plain numbers only"


@pytest.mark.parametrize("module", _kernel_modules())
def test_kernels_import_each_other_relatively(module):
    tree = ast.parse(MODULES[module].read_text())
    absolute = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            absolute += [a.name for a in node.names if a.name.split(".")[0] == "sloth_plugins"]
        elif not node.level and (node.module or "").split(".")[0] == "sloth_plugins":
            absolute.append(node.module)
    assert not absolute, f"{module}: use relative imports inside kernels/, not {sorted(absolute)}"


@pytest.mark.parametrize("module", _triton_modules())
def test_triton_modules_do_not_import_their_public_module(module):
    public = module.rpartition(".")[0] + "." + module.rpartition(".")[2][1:-len("_triton")]
    assert public in MODULES, f"{module} has no public module {public}"
    assert public not in imports_of(module), (
        f"{module} imports {public}: the public module decides Triton or reference, the Triton module is a leaf")


@pytest.mark.parametrize("module", [m for m in _kernel_modules() if m not in _triton_modules()])
def test_only_triton_modules_import_triton_at_import_time(module):
    """Without Triton (CPU machines, macOS) everything but the _x_triton modules still imports."""
    eager = sorted(name for name in imports_of(module, top_level_only=True)
                   if name.split(".")[0] == "triton" or name in _triton_modules())
    assert not eager, f"{module} imports {eager} at import time; import them where the Triton path is taken"


# ----------------------------------------------------------------------------- each fact in one place

def _string_collections(tree: ast.AST) -> Iterable[Set[str]]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            yield {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        elif isinstance(node, ast.Dict):
            yield {e.value for e in [*node.keys, *node.values] if isinstance(e, ast.Constant)
                   and isinstance(e.value, str)}


@pytest.mark.parametrize("names, home", [
    ({"swiglu", "geglu", "geglu_tanh"}, f"{KERNELS}.names"),
    ({"gelu_pytorch_tanh", "gelu_new", "gelu_fast"}, f"{KERNELS}.names"),
    ({"rms_norm", "rope", "mlp", "lora_mlp", "lora_qkv", "lora_o", "moe_experts"}, f"{KERNELS}.names"),
], ids=["gated_activations", "hidden_acts", "kernel_names"])
def test_name_tables_are_written_once(names, home):
    """A literal listing all of these names (a table of them) appears in one module only; the
    others derive theirs. (Literals naming a few of them, e.g. which kernels a setting affects, are
    uses, not definitions.)"""
    homes = sorted(module for module, path in MODULES.items()
                   if any(names <= found for found in _string_collections(ast.parse(path.read_text()))))
    assert homes == [home], f"{sorted(names)} are spelled out in {homes}"


def test_derived_tables_equal_the_base():
    from sloth_plugins import architectures, config
    from sloth_plugins.kernels import _activations_triton, _dispatch, _lora_triton, lora, names

    assert names.GATED_ACTIVATION_NAMES == tuple(names.GATED_ACTIVATIONS)
    assert lora.ACTIVATIONS == names.GATED_ACTIVATION_NAMES
    assert _lora_triton.KIND_IDS == {n: s.kind_id for n, s in names.GATED_ACTIVATIONS.items()}
    assert _activations_triton._KINDS == {s.act: s.kind_id for s in names.GATED_ACTIVATIONS.values()}
    assert architectures.ACTIVATIONS == {h: n for n, s in names.GATED_ACTIVATIONS.items() for h in s.hidden_acts}
    assert set(architectures.ACTIVATIONS.values()) == set(names.GATED_ACTIVATIONS)
    assert config.KERNEL_NAMES is names.KERNEL_NAMES
    assert set(names.SWITCHED_KERNELS) <= set(names.KERNEL_NAMES)
    assert set(names.DEPRECATED_ENV_VARS) <= set(names.SWITCHED_KERNELS)
    assert _dispatch.COMPILED_REFERENCE_WINS <= set(names.SWITCHED_KERNELS)
    assert [names.kernel_env_var(n) for n in names.SWITCHED_KERNELS] == [
        "SLOTH_KERNEL_RMS_NORM", "SLOTH_KERNEL_ROPE", "SLOTH_KERNEL_MLP"]
    # distinct Triton KIND ids, one per gate activation
    assert len(set(_activations_triton._KINDS.values())) == len(names.GATED_ACTIVATIONS)


def test_gated_activation_dispatch_covers_every_name():
    import torch

    from sloth_plugins.kernels.activations import gated_activation, gated_activation_reference
    from sloth_plugins.kernels.names import GATED_ACTIVATION_NAMES

    gate, up = torch.randn(2, 8), torch.randn(2, 8)
    for kind in GATED_ACTIVATION_NAMES:
        torch.testing.assert_close(gated_activation(kind, gate, up), gated_activation_reference(kind, gate, up))
    with pytest.raises(ValueError, match="swiglu"):
        gated_activation("relu", gate, up)


# ------------------------------------------------------------- no cycles, plugins without the manager

def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_graph_sees_function_level_imports():
    # get_plugin_manager imports the built-in plugins when first asked, inside the function
    assert "sloth_plugins.plugins" in import_graph()["sloth_plugins.manager"]


def test_plugins_never_import_the_manager():
    offenders = sorted(m for m, deps in import_graph().items()
                       if m.startswith(("sloth_plugins.plugins", "sloth_plugins.checkpointing"))
                       and "sloth_plugins.manager" in deps)
    assert not offenders, f"plugins get what they need through the hook call (PatchContext): {offenders}"


_PRIVATE_STATE = re.compile(r"""__dict__\s*(\[|\.get\(|\.pop\(|\.setdefault\()\s*["']_sloth""")


def test_no_module_reads_another_modules_private_state():
    """Per-model state lives in one Stash (``sloth_plugins/state.py``); everyone else reads it through
    public functions (``get_state``, ``get_checkpoint_controller``, a plugin's StashKey)."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("sloth_plugins", "kernels", "integrations", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel == "sloth_plugins/state.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if _PRIVATE_STATE.search(line) or "STATE_ATTR" in line:
                    offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "per-model state read around the state module:\n" + "\n".join(offenders)
