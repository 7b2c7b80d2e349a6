"""Sphinx configuration for the optaxclip documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.

The API reference is generated from ``optaxclip.__all__`` when the docs are
built: ``api.rst`` holds a marker that :func:`_api_reference` replaces with one
autodoc entry per public name, grouped by kind, so a name added to ``__all__``
appears without editing the docs.
"""

from __future__ import annotations

import inspect
import pathlib
import sys
import types
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optaxclip  # noqa: E402

project = "optaxclip"
author = "optaxclip authors"
copyright = "optaxclip authors"  # noqa: A001
release = optaxclip.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_type_aliases = {
    name: f"optaxclip.{name}" for name in ("Threshold", "Ord", "Axis", "AxisName")
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"optaxclip {release}"

API_MARKER = ".. api-reference"


def _kind(obj: Any) -> str:
  if isinstance(obj, type) and issubclass(obj, BaseException):
    return "Exceptions"
  if isinstance(obj, type) and issubclass(obj, tuple):
    # A transformation's state is named ``...State``; the other NamedTuples
    # are records: ClipStats (the statistics every state holds), the rules a
    # transformation takes (ZScore, SpikeEMA, ExampleClip, ...) and what a
    # function returns (PerExampleInfo).
    return "States" if obj.__name__.endswith("State") else "Records"
  if inspect.isfunction(obj):
    returns = str(inspect.signature(obj).return_annotation)
    if "GradientTransformation" in returns:
      return "Transformations"
    return "Functions"
  if isinstance(obj, type):
    return "Classes"
  if isinstance(obj, types.UnionType | types.GenericAlias) or obj is Any:
    return "Type aliases"
  return "Other names"


_DIRECTIVES = {
    "Transformations": "autofunction",
    "Functions": "autofunction",
    "Records": "autoclass",
    "States": "autoclass",
    "Classes": "autoclass",
    "Exceptions": "autoexception",
    "Type aliases": "data",
    "Other names": "autodata",
}


def _alias(name: str) -> str:
  """A type alias, with the docstring written under it where it is defined."""
  from sphinx.pycode import ModuleAnalyzer

  obj = getattr(optaxclip, name)
  doc: list[str] = []
  for modname, module in sorted(sys.modules.items()):
    if modname.startswith("optaxclip.") and getattr(module, name, None) is obj:
      doc = ModuleAnalyzer.for_module(modname).find_attr_docs().get(("", name), [])
      if doc:
        break
  value = str(obj)
  for long, short in [("jax.jaxlib._jax.Array", "jax.Array"),
                      ("collections.abc.", ""), ("typing.", "")]:
    value = value.replace(long, short)
  body = [f"   {line}" if line else "" for line in doc]
  return "\n".join([f".. data:: {name}", f"   :value: {value}", "", *body, ""])


def api_reference() -> str:
  """reStructuredText documenting every name in ``optaxclip.__all__``."""
  groups: dict[str, list[str]] = {kind: [] for kind in _DIRECTIVES}
  for name in optaxclip.__all__:
    groups[_kind(getattr(optaxclip, name))].append(name)
  out = []
  for kind, names in groups.items():
    if names:
      out += [kind, "-" * len(kind), ""]
      out += [_alias(name) if _DIRECTIVES[kind] == "data"
              else f".. {_DIRECTIVES[kind]}:: {name}\n" for name in names]
  return "\n".join(out)


def _api_reference(app: Any, docname: str, source: list[str]) -> None:
  if API_MARKER in source[0]:
    source[0] = source[0].replace(API_MARKER, api_reference())


def _reread_api(app: Any, env: Any, added: Any, changed: Any,
                 removed: Any) -> list[str]:
  # The page follows ``__all__``, not its own source: rebuild it every time.
  return ["api"]


def setup(app: Any) -> dict[str, Any]:
  app.connect("source-read", _api_reference)
  app.connect("env-get-outdated", _reread_api)
  return {"parallel_read_safe": True}
