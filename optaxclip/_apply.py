"""Applying the scale rule: one factor for a whole tree, or one per leaf.

:func:`clip_tree` scales every leaf by one factor (global clippers).
Per-leaf clippers (:func:`optaxclip.clip_by_norm`,
:func:`optaxclip.adaptive_grad_clip`) take their norms from
:func:`optaxclip._norms.grouped_leaf_norms`, stacked by group of leaves of one
type, and apply the scale rule once per group here; each leaf then takes its
own factor.

A leaf that stacks layers (``layer_axis``) holds one tensor per layer: its
per-tensor values have shape ``(num_layers,)`` and :func:`along_layer`
broadcasts them along the layer axis (:func:`scale_tensor` applies a
factor so).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optaxclip import _norms, _tree
from optaxclip._numerics import Norm, Scale, clip_factors, scale_leaf


def clip_tree(updates: Any, norm: Norm | jax.Array, threshold: jax.Array
              ) -> tuple[Any, Scale]:
  """Every leaf of ``updates`` times ``min(1, threshold / norm)``, and the
  factor (:func:`optaxclip._numerics.clip_factors`)."""
  scale = clip_factors(norm, threshold)
  return _tree.map_arrays(lambda g: scale_leaf(g, scale), updates), scale


def along_layer(value: jax.Array, x: jax.Array,
                layer: int | None) -> jax.Array:
  """A per-tensor value of leaf ``x`` (shape ``()``, or ``(num_layers,)``
  for a leaf stacked along axis ``layer``), shaped to broadcast against
  ``x``: the layer axis kept, every other axis of size 1."""
  if layer is None or jnp.ndim(value) == 0:
    return value
  shape = [1] * x.ndim
  shape[layer] = x.shape[layer]
  return jnp.reshape(value, shape)


def scale_tensor(x: jax.Array, scale: Scale, layer: int | None) -> jax.Array:
  """``x`` times its per-tensor factor (one per layer of a stacked leaf)."""
  return scale_leaf(x, Scale(*(along_layer(v, x, layer) for v in scale)))


def split_tensors(values: jax.Array, leaves: list[jax.Array],
                  layers: list[int | None]) -> list[jax.Array]:
  """One vector of per-tensor values, all leaves' tensors in order, as one
  array per leaf: a scalar, or ``(num_layers,)`` for a stacked leaf."""
  out, start = [], 0
  for x, k in zip(leaves, layers):
    if k is None:
      out.append(values[start])
      start += 1
    else:
      out.append(values[start:start + x.shape[k]])
      start += x.shape[k]
  return out


def stack_scalars(values: list[jax.Array], ndim: int) -> jax.Array:
  """Per-leaf scalars as one array of shape ``(len(values), 1, ..., 1)``.

  One scalar shared by every leaf (the common case: one threshold for the
  whole tree) stays a scalar, broadcasting against the group.
  """
  if all(v is values[0] for v in values):
    return values[0]
  return jnp.stack(values).reshape((len(values),) + (1,) * (ndim - 1))


def apply_grouped(leaves: list[jax.Array], groups: list[list[int]],
                  norms: list[Norm], thresholds: list[jax.Array]
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
    signed = jnp.where(jnp.broadcast_to(s.a, n.scaled.shape) < 1, -s.b, s.b)
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
                           _tree.kept_shape(leaves[i].shape, axes[i]))
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
