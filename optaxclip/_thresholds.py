"""Hyper-parameters at run time: schedules, injected values, prefix trees.

A threshold is a number, a JAX scalar, an Optax schedule of the step count,
or (where a transform says so) a pytree prefix of the gradients holding any
of these. :func:`resolve` turns one into the value in force at a step, made
safe; :func:`leaf_thresholds` and :func:`layer_groups` spread a prefix
tree over the gradients' leaves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip import _tree, _validate

Threshold = float | jax.Array | Callable[[jax.Array], Any]
"""A number, a JAX scalar, or an Optax schedule ``step -> value``."""


def resolve(value: Threshold, count: jax.Array, dtype: Any, *,
            lo: float = 0.0, hi: float = math.inf,
            nan: float | None = None, name: str | None = None) -> jax.Array:
  """The hyper-parameter in force at step ``count``, as a scalar of ``dtype``.

  Values that arrive at run time (a schedule's output, an array injected by
  ``optax.inject_hyperparams``) are clamped into ``[lo, hi]``, and NaN
  becomes ``nan`` (``lo`` by default): a threshold of -1 or NaN acts as 0,
  it never flips the sign of an update or poisons it. The value returned is
  the one in force, and the one clippers record in their state. A value
  that is not a real number (a schedule returning a string, say) raises a
  TypeError naming ``name``.
  """
  value_now: Any = value(count) if _validate.is_schedule(value) else value  # type: ignore[operator]
  _check_number(value_now, value, name)
  if jnp.ndim(value_now) != 0:
    raise ValueError(
        f"a threshold or hyper-parameter arrived with shape"
        f" {jnp.shape(value_now)} at run time (from a schedule or"
        " optax.inject_hyperparams); it must be a scalar. For one threshold"
        " per leaf, give a pytree of scalars where the transform takes one.")
  v = jnp.asarray(value_now, dtype)
  v = jnp.where(jnp.isnan(v), jnp.asarray(lo if nan is None else nan, dtype),
                v)
  return jnp.clip(v, lo, hi)


def _check_number(value_now: Any, given: Any, name: str | None) -> None:
  """A TypeError unless ``value_now`` (``given``, or what it returned) is a
  real number: a string such as ``"0.01"`` would otherwise be parsed."""
  kind = getattr(getattr(value_now, "dtype", None), "kind", None)
  if kind is None and isinstance(value_now, (bool, int, float, np.number)):
    return
  if kind in ("b", "i", "u", "f"):
    return
  what = name or "a threshold or hyper-parameter"
  source = ("its schedule returned" if _validate.is_schedule(given)
            else "it is")
  raise TypeError(
      f"{what} must be a real number at run time, but {source}"
      f" {value_now!r} ({type(value_now).__name__}); give a number, a JAX"
      " scalar, or a schedule that returns one (e.g."
      " optax.constant_schedule(0.01) or"
      " optax.linear_schedule(0.01, 0.1, 1000)).")


def broadcast_prefix(prefix: Any, tree: Any, name: str, caller: str, *,
                     hint: str | None = None) -> Any:
  """Copies each leaf of ``prefix`` over the matching subtree of ``tree``.

  ``hint`` replaces the error's description of what a prefix holds. A
  plain dict in ``prefix`` matches any mapping of ``tree`` with the same
  keys (a Flax ``nnx.State``, a ``FrozenDict``).
  """
  try:
    return jax.tree_util.tree_map(
        lambda t, sub: jax.tree_util.tree_map(lambda _: t, sub,
                                              is_leaf=_tree.is_masked),
        _like_mappings(prefix, tree), tree, is_leaf=_tree.is_masked)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(
        f"{caller}: the {name} tree does not match the gradients. "
        + (hint or "Give one number, or a pytree prefix of the gradients"
           " (the same containers and keys, with a number or schedule"
           " where a whole subtree shares a threshold).")
        + f" {name} structure:"
        f" {jax.tree_util.tree_structure(prefix)}; gradient structure:"
        f" {jax.tree_util.tree_structure(tree, is_leaf=_tree.is_masked)}."
    ) from e


def _like_mappings(prefix: Any, tree: Any) -> Any:
  """``prefix`` with each plain dict that stands where ``tree`` has
  another mapping type rebuilt as that type (so that a dict prefix matches
  an ``nnx.State``); everything else as it is."""
  if isinstance(prefix, (list, tuple)) and type(prefix) is type(tree) and (
      len(prefix) == len(tree)) and not hasattr(prefix, "_fields"):
    return type(prefix)(_like_mappings(p, t) for p, t in zip(prefix, tree))
  if type(prefix) is not dict or not isinstance(tree, Mapping):
    return prefix
  inner = {k: _like_mappings(v, tree[k]) if k in tree else v
           for k, v in prefix.items()}
  if type(tree) is dict or set(prefix) != set(tree.keys()):
    return inner
  make: Any = type(tree)
  try:
    return make(inner)
  except (TypeError, ValueError):
    return inner


def leaf_thresholds(value: Any, updates: Any, count: jax.Array, name: str,
                    caller: str, **bounds: Any) -> Any:
  """A tree like ``updates`` holding the threshold in force for each leaf.

  ``bounds`` (``lo``, ``hi``, ``nan``) are passed to :func:`resolve`.
  """
  if not _validate.is_tree_threshold(value):
    t = resolve(value, count, _tree.tree_acc_dtype(updates), **bounds)
    return _tree.map_arrays(lambda g: t.astype(_tree.acc_dtype(g.dtype)),
                            updates)
  full = broadcast_prefix(value, updates, name, caller)
  return _tree.map_arrays(
      lambda g, t: resolve(t, count, _tree.acc_dtype(g.dtype), **bounds),
      updates, full)


_NOT_STACKED = object()  # None in a layer_axis tree, kept as a leaf.
_LAYER_HINT = (
    "Give one int, or a pytree prefix of the gradients with the same"
    " containers and keys (a plain dict also for Flax NNX gradients, e.g."
    " {'blocks': 0, 'head': None}; or oc.layer_axes(model)),"
    " with an int or None where a whole subtree shares a layer axis.")


def leaf_layers(layer_axis: Any, tree: Any, caller: str) -> list[int | None]:
  """Each live leaf's layer axis (non-negative) or ``None``, in order.

  ``layer_axis`` is ``None``, an int (every leaf), or a pytree prefix of
  ``tree`` holding ints and ``None``, spread by :func:`broadcast_prefix`.
  A ValueError names a leaf the int does not fit, or the mismatch.
  """
  leaves, _ = _tree.live_leaves(tree, caller)
  if layer_axis is None:
    return [None] * len(leaves)
  values: list[Any]
  if isinstance(layer_axis, (int, np.integer)):
    values = [layer_axis] * len(leaves)
  else:
    marked = jax.tree_util.tree_map(
        lambda v: _NOT_STACKED if v is None else v, layer_axis,
        is_leaf=lambda v: v is None)
    full = broadcast_prefix(marked, tree, "layer_axis", caller,
                            hint=_LAYER_HINT)
    flat = jax.tree_util.tree_leaves(full, is_leaf=_tree.is_masked)
    kinds = jax.tree_util.tree_leaves(tree, is_leaf=_tree.is_masked)
    values = [None if v is _NOT_STACKED else v
              for v, x in zip(flat, kinds) if not _tree.is_masked(x)]
  return [_tree.layer_index(path, x, k, caller)
          for (path, x), k in zip(leaves, values)]


def layer_groups(per_layer: Any, max_norm: jax.Array, example: Any,
                 dtype: Any, caller: str) -> tuple[list[jax.Array], list[int]]:
  """Per-layer clipping's layers: each one's threshold, and each leaf's layer.

  ``per_layer=True`` makes every one of the ``L`` leaves of one example's
  tree a layer of its own, with threshold ``max_norm / sqrt(L)``; a pytree
  prefix of ``example`` makes each of its leaves a layer: the whole subtree
  below it, clipped as one (as jax-privacy clips a prefix), with that
  value as its threshold.
  """
  num = len(jax.tree_util.tree_leaves(example))
  if per_layer is True:
    return [max_norm / math.sqrt(num)] * num, list(range(num))
  values = jax.tree_util.tree_leaves(per_layer)
  ids = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(per_layer),
                                     list(range(len(values))))
  full = broadcast_prefix(ids, example, "per_layer", caller)
  return ([jnp.asarray(v, dtype) for v in values],
          jax.tree_util.tree_leaves(full))
