"""Thresholds, argument checks and tree helpers shared by every transform."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _norms

Threshold = float | jax.Array | Callable[[jax.Array], Any]
"""A number, a JAX scalar, or an Optax schedule ``step -> value``."""


is_masked = _norms.is_masked


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


def resolve(value: Threshold, count: jax.Array, dtype: Any, *,
            lo: float = 0.0, hi: float = math.inf,
            nan: float | None = None) -> jax.Array:
  """The hyper-parameter in force at step ``count``, as a scalar of ``dtype``.

  Values that arrive at run time (a schedule's output, an array injected by
  ``optax.inject_hyperparams``) are clamped into ``[lo, hi]``, and NaN
  becomes ``nan`` (``lo`` by default): a threshold of -1 or NaN acts as 0,
  it never flips the sign of an update or poisons it. The value returned is
  the one in force, and the one clippers record in their state.
  """
  if callable(value) and not isinstance(value, jax.Array):
    value = value(count)
  v = jnp.asarray(value, dtype)
  v = jnp.where(jnp.isnan(v), jnp.asarray(lo if nan is None else nan, dtype),
                v)
  return jnp.clip(v, lo, hi)


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
                    where: str, **bounds: Any) -> Any:
  """A tree like ``updates`` holding the threshold in force for each leaf.

  ``bounds`` (``lo``, ``hi``, ``nan``) are passed to :func:`resolve`.
  """
  if not _is_tree_threshold(value):
    t = resolve(value, count, _norms.tree_acc_dtype(updates), **bounds)
    return tree_map_arrays(lambda g: t.astype(_norms.acc_dtype(g.dtype)),
                           updates)
  full = broadcast_prefix(value, updates, name, where)
  return tree_map_arrays(
      lambda g, t: resolve(t, count, _norms.acc_dtype(g.dtype), **bounds),
      updates, full)


def _is_tree_threshold(value: Any) -> bool:
  return not (callable(value) or isinstance(
      value, (int, float, np.number, np.ndarray, jax.Array)))


def tree_map_arrays(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``tree_map`` that leaves ``None`` and ``optax.MaskedNode`` untouched."""
  return jax.tree_util.tree_map(
      lambda x, *r: x if is_masked(x) else fn(x, *r), tree, *rest,
      is_leaf=is_masked)


class Scale(NamedTuple):
  """A clip factor as two normal floats: ``g * scale`` is ``(g * a) * b``.

  ``a`` is 1 or ``2**-126``; splitting keeps the product exact where the
  factor itself is below the smallest normal number (a norm more than ~1e38
  times the threshold), which a CPU or GPU would flush to zero. ``factor``
  is the same number as one float, to record: it may underflow to 0 where
  the pair does not. (``a * b`` is never formed: XLA would reuse that
  product in place of the two multiplies.)
  """

  a: jax.Array
  b: jax.Array
  factor: jax.Array

  def value(self) -> jax.Array:
    """The factor as one number (it may underflow to 0; the pair does not)."""
    return self.factor


def clip_factors(norm: _norms.Norm | jax.Array, threshold: jax.Array) -> Scale:
  """``min(1, threshold / norm)``: the one scale rule of every clipper.

  Edge cases (``n`` the norm, ``t`` the threshold):

  ======================  ==========================================
  ``n <= t``              1, exactly: the update is returned bit for bit
  ``n = 0``               1 (``t = 0`` included)
  ``t = inf``             1 (``n = inf`` included)
  ``t = 0 < n``           0
  ``t`` negative or NaN   acts as ``t = 0``
  ``n = inf``, finite t   0 (an infinite entry becomes NaN, others 0)
  ``n`` NaN               NaN: the update is NaN, as in optax
  ``t / n`` subnormal     exact: applied as two normal factors
  ======================  ==========================================

  The derivative with respect to the update is finite everywhere, at a
  zero norm and at ``n = t`` included.

  Args:
    norm: a :class:`optaxclip._norms.Norm` (exact beyond overflow) or an
      array of norms.
    threshold: the threshold(s), broadcastable against ``norm``.

  Returns:
    The factor as a :class:`Scale` pair, in the norm's dtype.
  """
  if not isinstance(norm, _norms.Norm):
    norm = _norms.Norm(jnp.ones_like(norm), norm)
  hi, lo = norm
  dtype = lo.dtype
  t = jnp.asarray(threshold).astype(dtype)
  t = jnp.where(t >= 0, t, jnp.zeros((), dtype))
  n = hi * lo  # May overflow to inf where hi * lo is beyond the dtype.
  over = n > t  # False for a NaN norm.
  # t / n as (t / hi) / lo: exact where hi * lo overflows (hi is 1 or a
  # power of two). Where that quotient is below 2**-100 (or flushed to 0) it
  # is applied as 2**-126 * (t * 2**126 / n), two normal factors, with the
  # 2**126 taken so that nothing overflows. A few scalar operations only:
  # XLA copies them into every kernel that applies the factor.
  # No chained divisions: XLA rewrites (x / hi) / lo as x / (hi * lo), which
  # overflows. 1 / hi is exact (hi is 1 or a power of two).
  one = jnp.ones((), dtype)
  inv_hi = 1 / jnp.where(over, hi, one)
  lo = jnp.where(over & (lo > 0), lo, one)
  q = (t * inv_hi) / lo
  split = q < 2.0**-100
  up = jnp.asarray(2.0**126, dtype)
  ts = jnp.where(t > 1, (t * inv_hi) * up, (t * up) * inv_hi)
  b = jnp.where(over, jnp.where(split, ts / lo, q), one)
  a = jnp.where(over & split, jnp.asarray(2.0**-126, dtype), one)
  nan = jnp.isnan(n)
  return Scale(a, jnp.where(nan, jnp.nan, b),
               jnp.where(nan, jnp.nan, jnp.where(over, q, one)))


def clip_scale(norm: _norms.Norm | jax.Array, threshold: jax.Array
               ) -> jax.Array:
  """:func:`clip_factors` as one number, to record or to compare."""
  return clip_factors(norm, threshold).value()


def scale_leaf(g: jax.Array, s: Scale | jax.Array) -> jax.Array:
  """``g * s`` computed in the wider dtype and cast back to ``g``'s.

  A :class:`Scale` pair is applied as two multiplies, which XLA fuses into
  the same elementwise kernel.
  """
  if isinstance(s, Scale):
    return ((g * s.a) * s.b).astype(g.dtype)
  return (g * s).astype(g.dtype)


def stack_scalars(values: list[jax.Array], ndim: int) -> jax.Array:
  """Per-leaf scalars as one array of shape ``(len(values), 1, ..., 1)``.

  One scalar shared by every leaf (the common case: one threshold for the
  whole tree) stays a scalar, broadcasting against the group.
  """
  if all(v is values[0] for v in values):
    return values[0]
  return jnp.stack(values).reshape((len(values),) + (1,) * (ndim - 1))


def apply_grouped(leaves: list[jax.Array], groups: list[list[int]],
                  norms: list[_norms.Norm], thresholds: list[jax.Array]
                  ) -> tuple[list[jax.Array], list[jax.Array],
                             list[jax.Array]]:
  """Clips each leaf by its own (per-unit) factor, computed per group.

  ``norms`` and ``groups`` come from
  :func:`optaxclip._norms.grouped_leaf_norms`; ``thresholds[k]`` is group
  ``k``'s thresholds, broadcastable against its stacked norms. The rule is
  evaluated once per group, not once per leaf, and each leaf takes its
  factor with one :func:`optaxclip._norms.pick`: the pair ``(a, b)`` travels
  as one signed number, ``-b`` where ``a`` is ``2**-126`` (``b`` is never
  negative), which halves the picks (measured: each pick per leaf costs
  about as much compile time as the leaf's own norm).

  Returns:
    The clipped leaves (in order), and per group the norms and the factors
    (stacked, keepdims).
  """
  out: list[Any] = [None] * len(leaves)
  values, scales = [], []
  for group, n, t in zip(groups, norms, thresholds):
    s = clip_factors(n, t)
    signed = jnp.where(jnp.broadcast_to(s.a, n.lo.shape) < 1, -s.b, s.b)
    for j, i in enumerate(group):
      c = _norms.pick(signed, j)
      tiny = jnp.asarray(2.0**-126, c.dtype)
      out[i] = scale_leaf(leaves[i], Scale(
          jnp.where(c < 0, tiny, jnp.ones((), c.dtype)), jnp.abs(c),
          jnp.abs(c)))
    values.append(n.value())
    scales.append(s.value())
  return out, values, scales


def ungroup(groups: list[list[int]], stacked: list[jax.Array],
            leaves: list[jax.Array], axes: list[tuple[int, ...]]
            ) -> list[jax.Array]:
  """Per-leaf arrays, reduced axes dropped, from per-group stacked ones."""
  out: list[Any] = [None] * len(leaves)
  for group, v in zip(groups, stacked):
    for j, i in enumerate(group):
      out[i] = jnp.reshape(_norms.pick(v, j),
                           _norms.kept_shape(leaves[i].shape, axes[i]))
  return out


def largest(values: list[jax.Array], dtype: Any) -> jax.Array:
  """The largest entry of several arrays (NaN if any is NaN), as a scalar."""
  if not values:
    return jnp.zeros((), dtype)
  return jnp.max(jnp.stack([jnp.max(v) for v in values])).astype(dtype)


def smallest(values: list[jax.Array], dtype: Any) -> jax.Array:
  """The smallest entry of several arrays (NaN if any is NaN), as a scalar."""
  if not values:
    return jnp.ones((), dtype)
  return jnp.min(jnp.stack([jnp.min(v) for v in values])).astype(dtype)


def zero_leaf_norms(params: Any) -> Any:
  """Zeros shaped like a tree of per-leaf norms (one scalar per leaf)."""
  leaves, rebuild = _norms.live_leaves(params, "optaxclip")
  return rebuild([jnp.zeros((), _norms.acc_dtype(x.dtype)) for _, x in leaves])


def check_bool(value: Any, name: str, where: str) -> None:
  """A TypeError naming ``name`` unless ``value`` is True or False."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{where}: {name} must be True or False, got {value!r}.")


def increment(count: jax.Array) -> jax.Array:
  return optax.safe_increment(count)


def check_range(value: Any, name: str, where: str, *, lo: float, hi: float,
                open_lo: bool = False, open_hi: bool = False,
                schedule: bool = True) -> None:
  """Raises when a scalar known at construction lies outside ``[lo, hi]``.

  Schedules (where ``schedule`` allows them) and traced arrays are checked
  at run time: :func:`resolve` clamps their values into range.
  """
  if callable(value) and not isinstance(value, jax.Array):
    if schedule:
      return
    raise TypeError(f"{where}: {name} does not take a schedule; give a"
                    " number or a JAX scalar.")
  if isinstance(value, bool) or not isinstance(
      value, (int, float, np.number, np.ndarray, jax.Array)):
    raise TypeError(f"{where}: {name} must be a number, a JAX scalar"
                    + (" or an Optax schedule" if schedule else "")
                    + f"; got {type(value).__name__}.")
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
