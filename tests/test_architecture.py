"""The package's layout, as ``optaxclip/__init__.py`` describes it.

Read from the source: no import cycle between modules, no module using
another's underscore names, every public factory short, and every public
name exported from ``optaxclip`` alone.
"""

import ast
import pathlib

import pytest

import optaxclip as oc

PACKAGE = pathlib.Path(oc.__file__).parent
MODULES = {p.stem: ast.parse(p.read_text()) for p in PACKAGE.glob("*.py")}
MAX_FACTORY_LINES = 60


def _imports(tree: ast.Module) -> set[str]:
  """The optaxclip modules a module imports, at its top or in a function."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "optaxclip":
        out.update(a.name for a in node.names)
      elif node.module.startswith("optaxclip."):
        out.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      out.update(a.name.split(".")[1] for a in node.names
                 if a.name.startswith("optaxclip."))
  return out


def test_the_layout_lists_every_module():
  doc = ast.get_docstring(MODULES["__init__"])
  listed = {line.split()[0] for line in doc.splitlines()
            if line.startswith("  _")}
  assert listed == set(MODULES) - {"__init__"}


def test_no_import_cycle():
  graph = {m: _imports(t) - {"__init__"} for m, t in MODULES.items()
           if m != "__init__"}
  done: set[str] = set()

  def visit(m, path):
    assert m not in path, f"import cycle: {' -> '.join(path + [m])}"
    if m in done:
      return
    for n in sorted(graph[m]):
      visit(n, path + [m])
    done.add(m)

  for m in sorted(graph):
    visit(m, [])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_underscore_name_of_another_module(name):
  siblings = set(MODULES)
  for node in ast.walk(MODULES[name]):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in siblings and node.value.id != name):
      assert not node.attr.startswith("_"), (
          f"{name} uses {node.value.id}.{node.attr}")
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
        "optaxclip._"):
      for a in node.names:
        assert not a.name.startswith("_"), f"{name} imports {a.name}"


def _factories():
  for name, tree in sorted(MODULES.items()):
    for node in tree.body:
      if (isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
          and node.name in oc.__all__):
        yield name, node


@pytest.mark.parametrize("module, node", list(_factories()),
                         ids=lambda v: getattr(v, "name", v))
def test_every_public_function_is_short(module, node):
  first = node.body[0]
  has_doc = isinstance(first, ast.Expr) and isinstance(
      getattr(first, "value", None), ast.Constant)
  start = (first.end_lineno if has_doc else first.lineno - 1)
  lines = node.end_lineno - start
  assert lines <= MAX_FACTORY_LINES, (
      f"{module}.{node.name}: {lines} lines after its docstring")


def test_public_names_come_from_the_package_only():
  for name in oc.__all__:
    assert hasattr(oc, name)
  for module, tree in MODULES.items():
    if module != "__init__":
      assert not any(isinstance(n, ast.Assign) and any(
          getattr(t, "id", None) == "__all__" for t in n.targets)
                     for n in tree.body), f"{module} defines __all__"
