"""Traversal of gradient trees: live leaves, rebuilding, paths, dtypes.

``None`` leaves and ``optax.MaskedNode`` (what ``optax.masked`` leaves out)
are skipped everywhere and come back unchanged; integer leaves are refused
with the leaf's path. Norms accumulate in the *accumulation dtype* of a
leaf: float32 for float8, float16, bfloat16 and float32 (and complex64),
float64 for float64 (and complex128).
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


def live_leaves(tree: Any, caller: str) -> tuple[list[tuple[Any, jax.Array]],
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
    _check_float(path, x, caller)

  def rebuild(values: Sequence[Any]) -> Any:
    it = iter(values)
    return jax.tree_util.tree_unflatten(
        treedef, [x if is_masked(x) else next(it) for _, x in with_path])

  return live, rebuild


def float_leaves(tree: Any, caller: str) -> list[jax.Array]:
  """The array leaves of ``tree``; a clear TypeError on non-float ones."""
  return [x for _, x in live_leaves(tree, caller)[0]]


def map_arrays(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``tree_map`` that leaves ``None`` and ``optax.MaskedNode`` untouched
  (and gives ``fn`` a Python number as an array)."""
  return jax.tree_util.tree_map(
      lambda x, *r: x if is_masked(x) else fn(
          x if hasattr(x, "dtype") else jnp.asarray(x), *r), tree, *rest,
      is_leaf=is_masked)


def check_same_tree(updates: Any, like: Any, caller: str, fix: str, *,
                    shapes: bool = True) -> None:
  """Raises, naming the first difference, unless ``updates`` has the tree
  structure (and with ``shapes``, the leaf shapes) of ``like``: the tree
  ``init`` was given, or state kept leaf by leaf for it. ``fix`` says what to
  do instead."""
  got = jax.tree_util.tree_structure(updates, is_leaf=is_masked)
  want = jax.tree_util.tree_structure(like, is_leaf=is_masked)
  if got != want:  # type: ignore[operator]
    raise ValueError(
        f"{caller}: the updates' tree differs from the tree init was given:"
        f" got {got}, initialised with {want}. {fix}")
  if not shapes:
    return
  for (path, g), w in zip(
      jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_masked)[0],
      jax.tree_util.tree_leaves(like, is_leaf=is_masked)):
    if np.shape(g) != np.shape(w):
      raise ValueError(
          f"{caller}: leaf {jax.tree_util.keystr(path)} has shape"
          f" {np.shape(g)}, but init was given one of shape {np.shape(w)}."
          f" {fix}")


def check_real(tree: Any, caller: str) -> None:
  """A TypeError naming the first complex leaf: for transforms that compare
  entries with a bound, which complex numbers lack."""
  for path, x in live_leaves(tree, caller)[0]:
    if jnp.iscomplexobj(x):
      raise TypeError(
          f"{caller}: the gradient leaf at"
          f" {jax.tree_util.keystr(path) or 'root'} is complex; {caller}"
          " compares entries with a bound, which complex numbers lack. Clip"
          " it by norm (clip_by_norm) or split it into real and imaginary"
          " parts.")


def _check_float(path: Any, x: Any, caller: str) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
        f"{caller}: the gradient leaf at {jax.tree_util.keystr(path) or 'root'}"
        f" has dtype {dtype}; clipping needs floating-point or complex"
        " gradients. Exclude integer leaves with optax.masked or cast them."
    )


def acc_dtype(dtype: Any) -> np.dtype:
  """float32 for 8/16/32-bit floats and complex64; float64 for 64-bit ones.

  float8 dtypes have no implicit promotion in JAX: they are widened here,
  explicitly, like float16 and bfloat16.
  """
  real = np.dtype(jnp.finfo(dtype).dtype)  # The real dtype of a complex one.
  if real.itemsize <= 4:
    return np.dtype(jnp.float32)
  return np.dtype(jnp.promote_types(real, jnp.float32))


def common_acc_dtype(leaves: Sequence[Any]) -> np.dtype:
  """The widest accumulation dtype over ``leaves`` (float32 for none)."""
  return np.dtype(jnp.result_type(jnp.float32,
                                  *[acc_dtype(x.dtype) for x in leaves]))


def tree_acc_dtype(tree: Any) -> np.dtype:
  """The widest accumulation dtype over the leaves of ``tree``."""
  return common_acc_dtype(float_leaves(tree, "optaxclip"))


def zero_leaf_norms(params: Any,
                    layers: Sequence[int | None] | None = None) -> Any:
  """Zeros shaped like a tree of per-leaf norms: one scalar per leaf, or
  one per layer (shape ``(num_layers,)``) for a leaf whose ``layers`` entry
  (one per live leaf, see :func:`layer_index`) is its layer axis."""
  leaves, rebuild = live_leaves(params, "optaxclip")
  layers = layers or [None] * len(leaves)
  return rebuild([jnp.zeros(tensor_shape(x, k), acc_dtype(x.dtype))
                  for (_, x), k in zip(leaves, layers)])


def layer_index(path: Any, x: Any, layer: int | None, caller: str
                ) -> int | None:
  """``layer`` (an int or None) as a non-negative axis of ``x``; a
  ValueError naming the leaf when ``x`` has no such axis."""
  if layer is None:
    return None
  ndim = jnp.ndim(x)
  if not -ndim <= layer < ndim:
    raise ValueError(
        f"{caller}: layer_axis={layer} does not fit the gradient leaf at"
        f" {jax.tree_util.keystr(path) or 'root'} of shape {jnp.shape(x)}"
        f" (it has {ndim} axes). Give each stacked leaf the axis that"
        " stacks its layers, and None to the leaves that are not stacked"
        " (layer_axis takes a pytree prefix of the gradients).")
  return int(layer) % ndim


def tensor_shape(x: Any, layer: int | None) -> tuple[int, ...]:
  """The shape of a leaf's per-tensor statistics: ``()``, or
  ``(num_layers,)`` for a leaf stacked along axis ``layer``."""
  return () if layer is None else (jnp.shape(x)[layer],)


def leaf_axes(path: Any, x: Any, axis: Axis,
              layer: int | None = None) -> tuple[int, ...]:
  """The axes of ``x`` that ``axis`` names, non-negative and sorted.

  With ``layer`` (the leaf's layer axis, non-negative), ``axis=None``
  names every axis but that one, and an ``axis`` that names it is an error:
  each layer's slice is a tensor of its own.
  """
  ndim = jnp.ndim(x)
  if axis is None:
    return tuple(i for i in range(ndim) if i != layer)
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
  if layer is not None and layer in out:
    raise ValueError(
        f"axis={axis!r} reduces axis {layer} of the gradient leaf at"
        f" {jax.tree_util.keystr(path) or 'root'} of shape {jnp.shape(x)},"
        " which is its layer axis (layer_axis): the layer axis indexes"
        " tensors and is never reduced. Drop it from axis (axes count in"
        " the stacked leaf).")
  return tuple(sorted(set(out)))


def kept_shape(shape: Sequence[int], axes: tuple[int, ...]) -> tuple[int, ...]:
  """``shape`` without the reduced ``axes``: one entry per unit."""
  return tuple(d for i, d in enumerate(shape) if i not in axes)


def unit_size(x: jax.Array, axes: tuple[int, ...]) -> int:
  """How many elements one unit (the reduced ``axes``) of ``x`` holds."""
  return math.prod(x.shape[a] for a in axes)


def find_second_moment(state: Any, like: Any, caller: str, *,
                       changed: str = "") -> Any:
  """The first node of ``state`` with a ``nu`` field structured like ``like``.

  The node (e.g. optax's ``ScaleByAdamState``, ``ScaleByRmsState``) found
  first in tree order, inside ``chain``, ``inject_hyperparams``, ``masked``
  or any other wrapper: its ``nu`` is the wrapped optimizer's second moment,
  and its other fields (e.g. ``count``) come with it. A ValueError, from
  ``caller``, when there is none; at ``update``, where ``init`` found one,
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
        f"{caller}: the updates' tree differs from the tree init was given (no"
        f" second moment `nu` of the inner state has its structure, {want})."
        f" {changed}")
  raise ValueError(
      f"{caller}: the inner optimizer's state has no second moment `nu`"
      " shaped like the gradients (as optax.adam, adamw, nadam or rmsprop"
      " keep); wrap such an optimizer.")
