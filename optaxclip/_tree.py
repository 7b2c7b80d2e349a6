"""Traversal of gradient trees: live leaves, rebuilding, paths, dtypes.

``None`` leaves and ``optax.MaskedNode`` (what ``optax.masked`` leaves out)
are skipped everywhere and come back unchanged; integer leaves are refused
with the leaf's path. Norms accumulate in the *accumulation dtype* of a
leaf: float32 for float16, bfloat16 and float32 (and complex64), float64 for
float64 (and complex128).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Axis = int | Sequence[int] | None
"""The axes a per-unit norm reduces over; ``None`` for the whole leaf."""


def is_masked(x: Any) -> bool:
  """``optax.MaskedNode``: a leaf that ``optax.masked`` left out."""
  return isinstance(x, optax.MaskedNode)


def live_leaves(tree: Any, where: str) -> tuple[list[tuple[Any, jax.Array]],
                                                 Any]:
  """The ``(path, leaf)`` pairs of the array leaves, and a rebuilder.

  ``None`` and ``optax.MaskedNode`` leaves are skipped; integer leaves raise
  a TypeError naming the leaf. ``rebuild(values)`` returns a tree of the same
  structure whose live leaves are ``values`` (in order) and whose masked
  leaves are kept.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_masked)
  # A Python number is a leaf too (optax takes one): as an array.
  live = [(path, x if hasattr(x, "dtype") else jnp.asarray(x))
          for path, x in with_path if not is_masked(x)]
  for path, x in live:
    _check_float(path, x, where)

  def rebuild(values: Sequence[Any]) -> Any:
    it = iter(values)
    return jax.tree_util.tree_unflatten(
        treedef, [x if is_masked(x) else next(it) for _, x in with_path])

  return live, rebuild


def float_leaves(tree: Any, where: str) -> list[jax.Array]:
  """The array leaves of ``tree``; a clear TypeError on non-float ones."""
  return [x for _, x in live_leaves(tree, where)[0]]


def map_arrays(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``tree_map`` that leaves ``None`` and ``optax.MaskedNode`` untouched
  (and gives ``fn`` a Python number as an array)."""
  return jax.tree_util.tree_map(
      lambda x, *r: x if is_masked(x) else fn(
          x if hasattr(x, "dtype") else jnp.asarray(x), *r), tree, *rest,
      is_leaf=is_masked)


def check_same_tree(updates: Any, like: Any, where: str, fix: str, *,
                    shapes: bool = True) -> None:
  """Raises, naming the first difference, unless ``updates`` has the tree
  structure (and with ``shapes``, the leaf shapes) of ``like``: the tree
  ``init`` was given, or state kept leaf by leaf for it. ``fix`` says what to
  do instead."""
  got = jax.tree_util.tree_structure(updates, is_leaf=is_masked)
  want = jax.tree_util.tree_structure(like, is_leaf=is_masked)
  if got != want:  # type: ignore[operator]
    raise ValueError(
        f"{where}: the updates' tree differs from the tree init was given:"
        f" got {got}, initialised with {want}. {fix}")
  if not shapes:
    return
  for (path, g), w in zip(
      jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_masked)[0],
      jax.tree_util.tree_leaves(like, is_leaf=is_masked)):
    if np.shape(g) != np.shape(w):
      raise ValueError(
          f"{where}: leaf {jax.tree_util.keystr(path)} has shape"
          f" {np.shape(g)}, but init was given one of shape {np.shape(w)}."
          f" {fix}")


def check_real(tree: Any, where: str) -> None:
  """A TypeError naming the first complex leaf: for transforms that compare
  entries with a bound, which complex numbers lack."""
  for path, x in live_leaves(tree, where)[0]:
    if jnp.iscomplexobj(x):
      raise TypeError(
          f"{where}: the gradient leaf at"
          f" {jax.tree_util.keystr(path) or 'root'} is complex; {where}"
          " compares entries with a bound, which complex numbers lack. Clip"
          " it by norm (clip_by_norm) or split it into real and imaginary"
          " parts.")


def _check_float(path: Any, x: Any, where: str) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
        f"{where}: the gradient leaf at {jax.tree_util.keystr(path) or 'root'}"
        f" has dtype {dtype}; clipping needs floating-point or complex"
        " gradients. Exclude integer leaves with optax.masked or cast them."
    )


def acc_dtype(dtype: Any) -> np.dtype:
  """float32 for 16/32-bit floats and complex64; float64 for 64-bit ones."""
  real = jnp.finfo(dtype).dtype  # The real dtype of a complex one.
  return np.dtype(jnp.promote_types(real, jnp.float32))


def common_acc_dtype(leaves: Sequence[Any]) -> np.dtype:
  """The widest accumulation dtype over ``leaves`` (float32 for none)."""
  return np.dtype(jnp.result_type(jnp.float32,
                                  *[acc_dtype(x.dtype) for x in leaves]))


def tree_acc_dtype(tree: Any) -> np.dtype:
  """The widest accumulation dtype over the leaves of ``tree``."""
  return common_acc_dtype(float_leaves(tree, "optaxclip"))


def zero_leaf_norms(params: Any) -> Any:
  """Zeros shaped like a tree of per-leaf norms (one scalar per leaf)."""
  leaves, rebuild = live_leaves(params, "optaxclip")
  return rebuild([jnp.zeros((), acc_dtype(x.dtype)) for _, x in leaves])


def leaf_axes(path: Any, x: Any, axis: Axis) -> tuple[int, ...]:
  """The axes of ``x`` that ``axis`` names, non-negative and sorted."""
  ndim = jnp.ndim(x)
  if axis is None:
    return tuple(range(ndim))
  axes = (axis,) if isinstance(axis, (int, np.integer)) else (
      tuple(axis) if isinstance(axis, (tuple, list)) else None)
  if axes is None or not all(isinstance(a, (int, np.integer))
                             and not isinstance(a, bool) for a in axes):
    raise TypeError(f"axis={axis!r} must be None, an int or a tuple of ints"
                    " (the axes a norm reduces over).")
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"axis={axis!r} does not fit the gradient leaf at"
          f" {jax.tree_util.keystr(path) or 'root'} of shape {jnp.shape(x)};"
          " give axes that every leaf has, or clip those leaves separately"
          " (optax.multi_transform)."
      )
    out.append(a % ndim if ndim else a)
  return tuple(sorted(set(out)))


def kept_shape(shape: Sequence[int], axes: tuple[int, ...]) -> tuple[int, ...]:
  """``shape`` without the reduced ``axes``: one entry per unit."""
  return tuple(d for i, d in enumerate(shape) if i not in axes)


def unit_size(x: jax.Array, axes: tuple[int, ...]) -> int:
  """How many elements one unit (the reduced ``axes``) of ``x`` holds."""
  return math.prod(x.shape[a] for a in axes)


def find_second_moment(state: Any, like: Any, where: str, *,
                       changed: str = "") -> Any:
  """The first node of ``state`` with a ``nu`` field structured like ``like``.

  The node (e.g. optax's ``ScaleByAdamState``, ``ScaleByRmsState``) found
  first in tree order, inside ``chain``, ``inject_hyperparams``, ``masked``
  or any other wrapper: its ``nu`` is the wrapped optimizer's second moment,
  and its other fields (e.g. ``count``) come with it. A ValueError naming
  ``where`` when there is none; at ``update``, where ``init`` found one,
  pass ``changed`` (what to do): a miss means the updates' tree changed.
  """
  want = jax.tree_util.tree_structure(like, is_leaf=is_masked)
  nodes = jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, tuple) and hasattr(x, "nu"))
  for node in nodes:
    nu = getattr(node, "nu", None)
    if nu is not None and isinstance(node, tuple) and str(
        jax.tree_util.tree_structure(nu, is_leaf=is_masked)) == str(want):
      return node
  if changed:
    raise ValueError(
        f"{where}: the updates' tree differs from the tree init was given (no"
        f" second moment `nu` of the inner state has its structure, {want})."
        f" {changed}")
  raise ValueError(
      f"{where}: the inner optimizer's state has no second moment `nu`"
      " shaped like the gradients (as optax.adam, adamw, nadam or rmsprop"
      " keep); wrap such an optimizer.")
