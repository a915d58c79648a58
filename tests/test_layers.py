"""The package's layering, read from the source: every import of our own modules points at
the importer's layer or below, there are no import cycles, and no function-local imports of
our modules hide one (the CLI's deferred command imports and the package's lazy public names
excepted: both defer loading jax)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "distill_jax"

# Lowest first; a module imports only modules of its own layer or a lower one.
LAYERS = (
    ("errors", "schema"),
    ("losses", "optim"),
    ("models",),
    ("objective",),
    ("config",),
    ("data",),
    ("checkpoint", "evaluation"),
    ("training",),
    ("commands",),
    ("cli", "__init__"),
)
LAYER = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# Function-local imports of our modules allowed here (each defers jax for a cheap start).
DEFERRED = {"distill_jax/cli.py", "distill_jax/__init__.py"}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE.parent)
    name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
    yield name, rel.as_posix(), ast.parse(path.read_text("utf-8"))


def _top(name: str) -> str:
  parts = name.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def _imports(tree: ast.AST, module: str):
  """``(imported module, node, at module level)`` for every import of distill_jax modules."""
  top_level = set(map(id, tree.body))
  package = module if module.endswith("__init__") else module.rsplit(".", 1)[0]
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
      names = [f"{base}.{a.name}" for a in node.names]  # a submodule, or a name of module `base`
    for name in names:
      if name == "distill_jax" or name.startswith("distill_jax."):
        yield name, node, id(node) in top_level


def test_every_module_is_in_a_layer():
  for name, rel, _ in _modules():
    assert _top(name) in LAYER, f"{rel}: add its package to LAYERS in {__file__}"


def test_imports_point_at_the_same_layer_or_below():
  bad = []
  for name, rel, tree in _modules():
    own = LAYER[_top(name)]
    for imported, node, _ in _imports(tree, name):
      if LAYER.get(_top(imported), -1) > own:
        bad.append(f"{rel}:{node.lineno} imports {imported} (layer {_top(imported)} is above {_top(name)})")
  assert not bad, "\n".join(bad)


def test_no_function_local_imports_of_our_modules():
  bad = [f"{rel}:{node.lineno} imports {imported} inside a function"
         for name, rel, tree in _modules() if rel not in DEFERRED
         for imported, node, top in _imports(tree, name) if not top]
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  modules = {name: tree for name, _, tree in _modules()}
  graph = {}
  for name, tree in modules.items():
    edges = set()
    for imported, _, top in _imports(tree, name):
      if not top:
        continue
      while imported not in modules and "." in imported:  # `from pkg import name` of a non-module
        imported = imported.rsplit(".", 1)[0]
      if imported in modules and imported != name:
        edges.add(imported)
    graph[name] = edges
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
