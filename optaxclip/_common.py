"""Thresholds, argument checks and tree helpers shared by every transform."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _norms

Threshold = float | jax.Array | Callable[[jax.Array], Any]
"""A number, a JAX scalar, or an Optax schedule ``step -> value``."""


def is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def check_threshold(value: Any, name: str, where: str, *,
                    allow_tree: bool = False,
                    allow_negative: bool = False) -> None:
  """Raises at construction for a threshold whose value is known and bad.

  Values only known at run time (schedules, traced arrays) are checked by
  their type only.
  """
  if callable(value) and not isinstance(value, jax.Array):
    return
  leaves = jax.tree_util.tree_leaves(value) if allow_tree else [value]
  if allow_tree and not leaves:
    raise ValueError(f"{where}: {name} is an empty tree; give a number.")
  for leaf in leaves:
    if callable(leaf) and not isinstance(leaf, jax.Array):
      continue
    if isinstance(leaf, bool) or not isinstance(
        leaf, (int, float, np.number, np.ndarray, jax.Array)):
      raise TypeError(
          f"{where}: {name} must be a number, a JAX scalar, an Optax schedule"
          + (" or a pytree prefix of the gradients" if allow_tree else "")
          + f"; got {type(leaf).__name__}."
      )
    if jnp.ndim(leaf) != 0:
      raise ValueError(
          f"{where}: {name} must be a scalar, got shape {jnp.shape(leaf)};"
          " for one threshold per leaf give a pytree of scalars."
      )
    if not _norms.is_concrete(leaf):
      continue
    v = float(np.asarray(leaf).real)
    if math.isnan(v) or (v < 0 and not allow_negative):
      raise ValueError(
          f"{where}: {name}={v} is not a valid threshold; it must be a"
          " non-negative number (inf disables clipping)."
      )


def resolve(value: Threshold, count: jax.Array, dtype: Any) -> jax.Array:
  """The threshold in force at step ``count``, as a scalar of ``dtype``."""
  if callable(value) and not isinstance(value, jax.Array):
    value = value(count)
  return jnp.asarray(value, dtype)


def broadcast_prefix(prefix: Any, tree: Any, name: str, where: str) -> Any:
  """Copies each leaf of ``prefix`` over the matching subtree of ``tree``."""
  try:
    return jax.tree_util.tree_map(
        lambda t, sub: jax.tree_util.tree_map(lambda _: t, sub,
                                              is_leaf=is_masked),
        prefix, tree, is_leaf=is_masked)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(
        f"{where}: the {name} tree does not match the gradients. Give one"
        " number, or a pytree prefix of the gradients (the same containers"
        " and keys, with a number or schedule where a whole subtree shares"
        f" a threshold). Threshold structure:"
        f" {jax.tree_util.tree_structure(prefix)}; gradient structure:"
        f" {jax.tree_util.tree_structure(tree, is_leaf=is_masked)}."
    ) from e


def leaf_thresholds(value: Any, updates: Any, count: jax.Array, name: str,
                    where: str) -> Any:
  """A tree like ``updates`` holding the threshold in force for each leaf."""
  if not _is_tree_threshold(value):
    t = resolve(value, count, _norms.tree_acc_dtype(updates))
    return tree_map_arrays(lambda g: t.astype(_norms.acc_dtype(g.dtype)),
                           updates)
  full = broadcast_prefix(value, updates, name, where)
  return tree_map_arrays(
      lambda g, t: resolve(t, count, _norms.acc_dtype(g.dtype)), updates, full)


def _is_tree_threshold(value: Any) -> bool:
  return not (callable(value) or isinstance(
      value, (int, float, np.number, np.ndarray, jax.Array)))


def tree_map_arrays(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``tree_map`` that leaves ``None`` and ``optax.MaskedNode`` untouched."""
  return jax.tree_util.tree_map(
      lambda x, *r: x if is_masked(x) else fn(x, *r), tree, *rest,
      is_leaf=is_masked)


def scale_leaf(g: jax.Array, s: jax.Array) -> jax.Array:
  """``g * s`` computed in the wider dtype and cast back to ``g``'s."""
  return (g * s).astype(g.dtype)


def clip_scale(norm: jax.Array, threshold: jax.Array) -> jax.Array:
  """``min(1, threshold / norm)``: 1 for a zero norm, NaN for a NaN norm."""
  tiny = jnp.finfo(norm.dtype).tiny
  return jnp.minimum(1, threshold.astype(norm.dtype) / jnp.maximum(norm, tiny))


def increment(count: jax.Array) -> jax.Array:
  return optax.safe_increment(count)


def check_range(value: Any, name: str, where: str, *, lo: float, hi: float,
                open_lo: bool = False, open_hi: bool = False) -> None:
  """Raises when a scalar known at construction lies outside ``[lo, hi]``.

  Schedules and traced arrays are checked at run time by nobody: their values
  are the caller's to keep in range.
  """
  if callable(value) and not isinstance(value, jax.Array):
    return
  if isinstance(value, bool) or not isinstance(
      value, (int, float, np.number, np.ndarray, jax.Array)):
    raise TypeError(f"{where}: {name} must be a number, a JAX scalar or an"
                    f" Optax schedule; got {type(value).__name__}.")
  if jnp.ndim(value) != 0:
    raise ValueError(f"{where}: {name} must be a scalar, got shape"
                     f" {jnp.shape(value)}.")
  if not _norms.is_concrete(value):
    return
  v = float(np.asarray(value))
  below = v <= lo if open_lo else v < lo
  above = v >= hi if open_hi else v > hi
  if math.isnan(v) or below or above:
    interval = (("(" if open_lo else "[") + f"{lo:g}, {hi:g}"
                + (")" if open_hi else "]"))
    raise ValueError(f"{where}: {name}={v} is outside {interval}; give a"
                     f" value in {interval}.")


def check_int(value: Any, name: str, where: str, *, lo: int) -> None:
  """Raises unless ``value`` is an integer >= ``lo`` (traced ones pass)."""
  if isinstance(value, bool) or not isinstance(
      value, (int, np.integer, np.ndarray, jax.Array)):
    raise TypeError(f"{where}: {name} must be an integer >= {lo}; got"
                    f" {type(value).__name__}.")
  if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value),
                                                jnp.integer):
    raise TypeError(f"{where}: {name} must be an integer >= {lo}; got"
                    f" {value!r}.")
  if _norms.is_concrete(value) and int(np.asarray(value)) < lo:
    raise ValueError(f"{where}: {name}={int(np.asarray(value))} must be an"
                     f" integer >= {lo}.")


def static_size(value: Any, name: str, where: str) -> int:
  """``value`` as a Python int, or a clear error when it is traced."""
  if not _norms.is_concrete(value):
    raise TypeError(
        f"{where}: {name} sizes a buffer in the state, so init needs its"
        " value; under optax.inject_hyperparams with a jitted init, pass"
        f" static_args=({name!r},).")
  return int(np.asarray(value))
