"""The API's vocabulary: every public parameter and field name has one row,
one meaning, in the conventions table of ``docs/semantics.md``.

Read from the live package: the signatures of every public function and
the fields of every public record and state. (The keywords of the function
``clipped_grad`` returns, ``example_mask`` and ``max_norm``, are in the table
as well, by hand.) A name missing from the table fails; so
does a row naming nothing public (a stale row), and a public function with
more than 8 parameters.
"""

import inspect
import pathlib
import re

import pytest

import optaxclip as oc

TABLE_PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "semantics.md"
MAX_PARAMETERS = 8
# Functions whose parameters are another library's protocol: Flax calls
# max_logit_attention as an attention_fn(query, key, value, bias, mask, ...).
EXTERNAL = {"max_logit_attention"}


def table() -> dict[str, str]:
  """``name -> meaning`` from the rows of the conventions table."""
  text = TABLE_PAGE.read_text()
  start = text.index("## Conventions")
  rows = re.findall(r"^\| `([a-z_0-9]+)` \| (.+?) \|", text[start:], re.M)
  names = [n for n, _ in rows]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  assert not duplicates, f"names with two rows: {duplicates}"
  return dict(rows)


def public_functions():
  for name in oc.__all__:
    obj = getattr(oc, name)
    if inspect.isfunction(obj) or (callable(obj) and not inspect.isclass(obj)
                                   and hasattr(obj, "__wrapped__")):
      yield name, obj


def public_records():
  for name in oc.__all__:
    obj = getattr(oc, name)
    if inspect.isclass(obj) and hasattr(obj, "_fields"):
      yield name, obj


def used_names() -> dict[str, set[str]]:
  """Every public parameter and field name, with where it is used."""
  out: dict[str, set[str]] = {}
  for name, fn in public_functions():
    if name in EXTERNAL:
      continue
    for p in inspect.signature(fn).parameters.values():
      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
        out.setdefault(p.name, set()).add(f"{name}()")
  for name, cls in public_records():
    for f in cls._fields:
      out.setdefault(f, set()).add(name)
  return out


def test_every_public_name_has_a_row():
  rows = table()
  missing = {n: sorted(w) for n, w in used_names().items() if n not in rows}
  assert not missing, f"names missing from the conventions table: {missing}"


def test_every_row_names_something_public():
  used = used_names()
  stale = sorted(n for n in table() if n not in used)
  assert not stale, f"rows naming no public parameter or field: {stale}"


@pytest.mark.parametrize("name, fn", list(public_functions()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_at_most_eight_parameters(name, fn):
  params = [p for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
  assert len(params) <= MAX_PARAMETERS, (
      f"{name} takes {len(params)} parameters: group what travels together"
      " into a record")


@pytest.mark.parametrize("name, fn", list(public_functions()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_only_the_first_parameter_is_positional(name, fn):
  """Positional: the first parameter, and optax's own positional ones where
  optax has the same function (adaptive_grad_clip's clipping, eps and axis;
  dp_aggregate's clip and noise_multiplier, as optax's
  differentially_private_aggregate) or JAX's (clipped_grad's fun, argnums
  and has_aux, as jax.grad's)."""
  if name in EXTERNAL:
    return
  allowed = {"adaptive_grad_clip": 3, "clipped_grad": 3, "dp_aggregate": 2,
             # What the call acts on, then its threshold or the tree to read.
             "per_example_clip": 2, "raise_if_nonfinite": 2}.get(name, 1)
  positional = [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  assert len(positional) <= allowed, (name, positional)
