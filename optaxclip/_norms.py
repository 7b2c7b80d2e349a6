"""Norm kernels: float32 (or wider) accumulation, never an overflow.

Every norm here is computed in the accumulation dtype of its input
(:func:`optaxclip._tree.acc_dtype`). One formulation serves every device
count, mesh and backend:

- **Hot path.** One reduction per leaf, ``sum(|x| ** p)``, exactly what
  ``optax.global_norm`` does, then a root. Nothing is concatenated or copied,
  so leaves may carry any sharding.
- **Cold path.** When that sum overflowed, or (for ``p > 1``) is so small that
  its terms may have gone subnormal, one ``lax.cond`` recomputes the norm
  with :func:`scaled_power_sum`, the one overflow-safe kernel:
  ``2**e * sum(|x * 2**-e| ** p) ** (1/p)`` with ``2**e`` the power of two
  just above ``max |x|``. Power-of-two scaling is exact, so the result is
  exact for every finite input. Leaves of one type (shape, dtype, sharding)
  are stacked, in chunks of at most ``_CHUNK_BYTES``, so the cold branch has
  a handful of reductions rather than one per leaf and compiles in about the
  time of the hot path.
- **Per example** (:func:`example_norms`, DP-SGD and ghost clipping): the
  same kernel, every example scaled by its own power of two, with no
  ``lax.cond`` (whose operands XLA would copy).

The result is a :class:`optaxclip._numerics.Norm`, a pair ``(power, scaled)``
whose product is the norm: ``power`` is ``2**e`` on the cold path (``1`` on
the hot path). A norm too large for the accumulation dtype (float32 values near
3.4e38) reads as ``inf`` when multiplied out, but the pair still clips
exactly (:func:`optaxclip._numerics.clip_factors`).

Per-leaf norms trust an exact zero sum: a leaf or unit whose every
``|x| ** p`` lies below the smallest normal number (entries below ~1e-19 for
``p = 2`` in float32) reads as norm 0, which clips it as its true norm would
for any threshold above that norm; dead units then cost no cold path. The
global norm rescales even then.

Inside ``shard_map``/``pmap`` (``axis_name``), sums are added over the named
axes each leaf varies over: see :func:`_psum`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip import _thresholds, _tree, _validate
from optaxclip._numerics import Norm, exponent, pow2, widen
from optaxclip._tree import Axis

Ord = int | float | str | jax.Array
"""A norm: ``1``, ``2``, ``inf``, any ``p > 0``, or ``"rms"``."""
AxisName = str | Sequence[str] | None
"""A mesh axis name, or a tuple of them, inside ``shard_map`` or ``pmap``."""

_RMS = "rms"
_CHUNK_BYTES = 16 << 20  # The largest temporary the cold path stacks.


def global_norm(
    tree: Any, *, ord: Ord = 2, axis_name: AxisName = None
) -> jax.Array:
  """Norm of a whole pytree, accumulated in float32 and overflow-safe.

  The tree is treated as one flat vector: ``(sum_i |x_i| ** p) ** (1/p)`` over
  every element of every leaf. float16 and bfloat16 leaves are squared in
  float32, so neither overflow (float16 values above ~256) nor the
  bfloat16 rounding of each square affects the result. float32 values near
  the top of their range (1e38) are rescaled instead of overflowing.

  Args:
    tree: a pytree of floating-point or complex arrays. ``None`` leaves and
      ``optax.MaskedNode`` are ignored. Complex leaves use the modulus.
    ord: ``1``, ``2``, ``inf``, any ``p > 0``, or ``"rms"`` (the 2-norm
      divided by ``sqrt(number of elements)``).
    axis_name: inside ``shard_map`` or ``pmap``, the mapped axis name (or a
      tuple of names) over which the tree is sharded; the norm is then the
      norm of the whole, unsharded tree on every device.

  Returns:
    A scalar in the accumulation dtype (float32, or float64 for float64
    leaves): exact to rounding for every finite input whose norm is
    representable, ``inf`` above that (or for an infinite entry), NaN when an
    entry is NaN, ``0`` for an empty tree.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
    >>> print(oc.global_norm(tree))
    5.0
    >>> big = jnp.full((4,), 300.0, jnp.float16)  # its squares overflow float16
    >>> print(oc.global_norm(big))
    600.0
  """
  return global_norm_parts(tree, ord, axis_name=axis_name).value()


def global_norm_parts(tree: Any, ord: Ord = 2, *,
                      axis_name: AxisName = None) -> Norm:
  """:func:`global_norm` as a :class:`Norm` pair (exact beyond overflow)."""
  return global_and_leaf_norms(tree, ord, axis_name=axis_name)[0]


def global_and_leaf_norms(tree: Any, ord: Ord = 2, *,
                          axis_name: AxisName = None, leaves: bool = False,
                          layer_axis: Any = None, caller: str = "global_norm"
                          ) -> tuple[Norm, Any]:
  """The global norm and, with ``leaves``, each leaf's norm as a tree.

  The leaf norms come from the partial sums the global norm adds up, at no
  extra pass over the tree (inside ``shard_map``, one more ``psum``, of one
  vector). They are as float32 (float64) accumulates them: a leaf whose
  ``sum |x| ** p`` overflows reads ``inf``, and one whose terms underflow
  reads low, where the global norm is exact. Without ``leaves`` the second
  result is ``None``.

  ``layer_axis`` (``None``, an int, or a pytree prefix of ``tree`` holding
  ints and ``None``; see :func:`optaxclip._thresholds.leaf_layers`) makes
  the leaf norm of a stacked leaf one norm per layer, shape
  ``(num_layers,)``: its partial sums are taken over every axis but the
  layer axis. The global norm is the same either way. Inside ``shard_map``
  a stacked leaf must not be split along its layer axis (the ``psum`` would
  add different layers' sums).
  """
  p = _validate.canonical_ord(ord)
  live, rebuild = _tree.live_leaves(tree, caller)
  xs = [x for _, x in live]
  dtype = _tree.common_acc_dtype(xs)
  layers: list[int | None] = [None] * len(xs)
  if leaves:
    layers = _thresholds.leaf_layers(layer_axis, tree, caller)
  if not xs:
    zero = jnp.zeros((), dtype)
    return Norm(jnp.ones((), dtype), zero), rebuild([]) if leaves else None
  run = functools.partial(_global_norm, xs, axis_name=axis_name,
                          dtype=dtype, each=leaves, layers=layers)
  if p == _RMS:
    n, each = run(2.0)
    size = _global_size(xs, axis_name)
    root = jnp.sqrt(jnp.maximum(jnp.asarray(size, dtype), 1))
    if leaves:
      each = [v / math.sqrt(max(_global_size([x], axis_name) // (
          1 if k is None else x.shape[k]), 1))
              for v, x, k in zip(each, xs, layers)]
    n = Norm(n.power, n.scaled / root)
  elif isinstance(p, jax.Array):  # Traced, e.g. injected by inject_hyperparams.
    n, each = jax.lax.switch(_ord_index(p), [
        lambda: run(2.0), lambda: run(1.0), lambda: run(math.inf),
        lambda: run(p.astype(dtype))])
  else:
    n, each = run(p)
  return n, rebuild(each) if leaves else None


def zero_leaf_norms(params: Any, layer_axis: Any, caller: str) -> Any:
  """Zeros shaped like :func:`global_and_leaf_norms`' leaf norms: a scalar
  per leaf, ``(num_layers,)`` for a leaf stacked by ``layer_axis``."""
  return _tree.zero_leaf_norms(
      params, _thresholds.leaf_layers(layer_axis, params, caller))


def tensor_norm_parts(leaves: list[jax.Array], ord: Ord,
                      layers: Sequence[int | None],
                      axis_name: AxisName = None) -> list[Norm]:
  """The norm of each tensor: each leaf, or each layer of a stacked leaf.

  ``layers[i]`` is leaf ``i``'s layer axis (non-negative) or ``None``. A
  leaf's :class:`Norm` has shape ``()``, or ``(num_layers,)`` for a stacked
  leaf, whose norms reduce every axis but the layer axis. With
  ``axis_name`` (inside ``shard_map``), each leaf's sums are added over the
  named axes it varies over (a stacked leaf must not be split along its
  layer axis).
  """
  out: list[Any] = [None] * len(leaves)
  rest = []
  for i, (x, k) in enumerate(zip(leaves, layers)):
    if axis_name is not None and k is None:
      out[i] = global_norm_parts(x, ord, axis_name=axis_name)
    else:
      rest.append(i)
  axes = [tuple(d for d in range(leaves[i].ndim) if d != layers[i])
          for i in rest]
  groups, norms = grouped_leaf_norms([leaves[i] for i in rest], ord, axes,
                                     axis_name=axis_name)
  for group, n in zip(groups, norms):
    for j, r in enumerate(group):
      i = rest[r]
      shape = _tree.tensor_shape(leaves[i], layers[i])
      out[i] = Norm(*(jnp.reshape(pick(v, j), shape) for v in n))
  return out


def leaf_norms(tree: Any, ord: Ord = 2, *, axis: Axis = None) -> Any:
  """Norm of each leaf (or of each unit along ``axis``) of a pytree.

  Args:
    tree: a pytree of floating-point or complex arrays.
    ord: as for :func:`global_norm`.
    axis: ``None`` for one norm per leaf, or the axes to reduce over (as in
      ``tf.clip_by_norm``): ``axis=0`` on a ``(fan_in, fan_out)`` kernel gives
      one norm per output unit. Negative axes count from the end.

  Returns:
    A pytree with the structure of ``tree`` whose leaves are the norms, with
    the reduced axes kept as size-1 dimensions (so they broadcast against the
    leaf), in the accumulation dtype.
  """
  leaves, rebuild = _tree.live_leaves(tree, "leaf_norms")
  axes = [_tree.leaf_axes(path, x, axis) for path, x in leaves]
  norms = leaf_norm_parts([x for _, x in leaves], ord, axes)
  return rebuild([n.value() for n in norms])


def leaf_norm_parts(leaves: list[jax.Array], ord: Ord,
                    axes: list[tuple[int, ...]]) -> list[Norm]:
  """Per-leaf (per-unit) norms as :class:`Norm` pairs, keepdims."""
  groups, norms = grouped_leaf_norms(leaves, ord, axes)
  out: list[Any] = [None] * len(leaves)
  for group, n in zip(groups, norms):
    for j, i in enumerate(group):
      out[i] = Norm(pick(n.power, j), pick(n.scaled, j))
  return out


def combine(parts: Sequence[Norm]) -> Norm:
  """The 2-norm of several 2-norms given as pairs, exact beyond overflow.

  Each ``power`` is a power of two, so dividing by the largest is exact and
  each scaled norm stays below ``sqrt(size)``: the squares cannot overflow.
  A part may hold several norms (one per layer): each counts.
  """
  if not parts:
    return Norm(jnp.ones(()), jnp.zeros(()))
  top = functools.reduce(jnp.maximum, [_largest(n.power) for n in parts])
  total = jnp.sqrt(sum(_total(jnp.square((n.power / top) * n.scaled))
                       for n in parts))
  return Norm(top, total)


def _largest(x: jax.Array) -> jax.Array:
  return x if jnp.ndim(x) == 0 else jnp.max(x)


def _total(x: jax.Array) -> jax.Array:
  return x if jnp.ndim(x) == 0 else jnp.sum(x)


def pick(stacked: jax.Array, j: int) -> jax.Array:
  """``stacked[j]``, taken as a masked sum over the leading axis.

  XLA:CPU compiles a masked sum several times faster than a slice of a
  computed vector (300 slices of a 300-vector: 2.3 s; as sums: 0.4 s), and
  picking is done once per leaf. Exact: the other entries add zeros.
  """
  k = stacked.shape[0]
  if k == 1:
    return jnp.reshape(stacked, stacked.shape[1:])
  mask = np.zeros((k,) + (1,) * (stacked.ndim - 1), bool)
  mask[j] = True
  return jnp.sum(jnp.where(mask, stacked, 0), axis=0).astype(stacked.dtype)


def grouped_leaf_norms(leaves: list[jax.Array], ord: Ord,
                       axes: list[tuple[int, ...]],
                       groups: list[list[int]] | None = None,
                       axis_name: AxisName = None,
                       ) -> tuple[list[list[int]], list[Norm]]:
  """Per-leaf (per-unit) norms, stacked by group of leaves of one type.

  Returns ``(groups, norms)``: ``groups[k]`` lists the indices of the leaves
  of group ``k`` (same shape, dtype, sharding and ``axes``), and
  ``norms[k]`` holds their norms stacked along a new leading axis (reduced
  axes kept as size 1). Working on groups keeps the number of operations
  per step, and so the compile time, proportional to the number of leaf
  types rather than of leaves. ``groups`` (e.g. those of the gradients, for
  the parameters) is used where every group's leaves share shape and axes.
  With ``axis_name`` (inside ``shard_map``), each leaf's sums are added over
  the named axes it varies over: the norm of the whole leaf (or unit), for
  leaves split along their reduced axes.
  """
  p = _validate.canonical_ord(ord)
  if not leaves:
    return [], []
  if groups is None or any(
      len({(leaves[i].shape, axes[i]) for i in g}) > 1 for g in groups):
    groups = _groups(leaves, axes)
  if p == _RMS:
    _, norms = grouped_leaf_norms(leaves, 2.0, axes, groups, axis_name)
    return groups, [
        Norm(n.power, n.scaled / math.sqrt(max(
            _tree.unit_size(leaves[g[0]], axes[g[0]]) * _copies_split(
                leaves[g[0]], axis_name), 1)))
        for g, n in zip(groups, norms)]
  if isinstance(p, jax.Array):  # Traced, e.g. injected by inject_hyperparams.
    return groups, jax.lax.switch(_ord_index(p), [
        lambda: _leaf_norms(leaves, 2.0, axes, groups, axis_name),
        lambda: _leaf_norms(leaves, 1.0, axes, groups, axis_name),
        lambda: _leaf_norms(leaves, math.inf, axes, groups, axis_name),
        lambda: _leaf_norms(leaves, p.astype(jnp.float32), axes, groups,
                            axis_name)])
  return groups, _leaf_norms(leaves, p, axes, groups, axis_name)


# ----------------------------------------------------------------------------
# The kernels.


def _abs_pow(x: jax.Array, p: Any) -> jax.Array:
  """``|x| ** p`` in the accumulation dtype, fused with the cast.

  For ``p`` other than 1, 2 and a traced ``p``, zeros are kept out of the
  power so that its derivative stays finite at 0.
  """
  acc = _tree.acc_dtype(x.dtype)
  if jnp.iscomplexobj(x):
    if isinstance(p, float) and p == 2:
      return jnp.square(x.real.astype(acc)) + jnp.square(x.imag.astype(acc))
    a = jnp.abs(x).astype(acc)
  else:
    a = x.astype(acc)
    if isinstance(p, float) and p == 2:
      return jnp.square(a)
    a = jnp.abs(a)
  if isinstance(p, float) and p == 1:
    return a
  pos = a > 0
  return jnp.where(pos, jnp.where(pos, a, 1) ** p, 0)


def _root(s: jax.Array, p: Any) -> jax.Array:
  """``s ** (1/p)`` with a finite derivative at ``s = 0``."""
  if isinstance(p, float) and p == 1:
    return s
  pos = s > 0
  safe = jnp.where(pos, s, 1)
  r = jnp.sqrt(safe) if isinstance(p, float) and p == 2 else safe ** (1 / p)
  return jnp.where(pos, r, jnp.where(jnp.isnan(s), s, 0))


def _needs_rescale(s: jax.Array, p: Any, zero: bool) -> jax.Array:
  """Sums that overflowed, or (``p > 1``) whose terms may have gone subnormal.

  With ``zero``, an exact 0 counts too: every term may have underflowed.
  """
  bad = ~jnp.isfinite(s)
  if isinstance(p, float) and p <= 1:
    return bad
  info = jnp.finfo(s.dtype)
  small = s < info.tiny / info.eps
  if not zero:
    small &= s > 0
  return bad | (small & (p > 1))


def scaled_power_sum(x: jax.Array, e: jax.Array, p: Any,
                     axis: int | tuple[int, ...] | None = None, *,
                     keepdims: bool = False, dtype: Any = None) -> jax.Array:
  """``sum(|x * 2**-e| ** p)`` over ``axis``: the one overflow-safe kernel.

  ``e`` (from :func:`optaxclip._numerics.exponent` of ``max |x|`` over the
  values reduced, broadcastable against ``x``) brings the largest entry into
  ``[0.5, 1)``, exactly, so the sum can neither overflow nor lose its large
  terms to underflow; :func:`_unscaled` (or ``root * 2**e``) scales the
  root back. Accumulated in the accumulation dtype (or ``dtype``).
  """
  down = pow2(-e, _tree.acc_dtype(x.dtype))
  return jnp.sum(_abs_pow(widen(x) * down, p), axis=axis, keepdims=keepdims,
                 dtype=dtype)


def _unscaled(s: jax.Array, e: jax.Array, p: Any, m: jax.Array) -> Norm:
  """The norm ``2**e * s ** (1/p)`` as a pair; ``m`` (the largest entry)
  where it is not finite."""
  finite = jnp.isfinite(m)
  return Norm(jnp.where(finite, pow2(e, m.dtype), 1).astype(m.dtype),
              jnp.where(finite, _root(s, p), m))


def example_norms(leaves: Sequence[jax.Array]
                  ) -> tuple[list[jax.Array], jax.Array]:
  """Per-example 2-norms of each leaf and of all leaves together.

  Every leaf has a leading batch axis; the norms are ``(batch,)`` arrays in
  the accumulation dtype. Each example is scaled by the power of two that
  brings its largest entry into ``[0.5, 1)`` (:func:`scaled_power_sum`), so
  the result is exact for every finite input whose norm is representable.
  One max and one sum per leaf, both fused reductions: no ``lax.cond``,
  whose operands XLA would copy (a second full-size buffer of per-example
  gradients). A non-finite entry gives a NaN or inf norm. In a leaf whose
  entries are all below ~1e-19 (float32) times the example's largest entry,
  squares may underflow: its per-leaf norm, used by ``per_layer``, may then
  read low.
  """
  dtype = _tree.common_acc_dtype(leaves)
  m = functools.reduce(jnp.maximum, [
      jnp.max(_abs(x), axis=tuple(range(1, x.ndim)), initial=0).astype(dtype)
      for x in leaves])  # NaN entries give NaN.
  e = exponent(m)
  sums = [scaled_power_sum(x, e.reshape((-1,) + (1,) * (x.ndim - 1)), 2.0,
                           tuple(range(1, x.ndim))).astype(dtype)
          for x in leaves]
  up = pow2(e, dtype)
  return [jnp.sqrt(s) * up for s in sums], jnp.sqrt(sum(sums)) * up


def _global_norm(leaves: list[jax.Array], p: Any, axis_name: AxisName,
                 dtype: Any, each: bool = False,
                 layers: Sequence[int | None] | None = None,
                 ) -> tuple[Norm, list[jax.Array] | None]:
  """The global norm, and with ``each`` the per-leaf norms it is made of
  (per layer, shape ``(num_layers,)``, where ``layers`` names an axis)."""
  one = jnp.ones((), dtype)
  keep = [_kept(x, k) for x, k in zip(leaves, layers or [None] * len(leaves))]
  if isinstance(p, float) and p == math.inf:
    maxes = [jnp.max(_abs(x), axis=a, initial=0).astype(dtype)
             for x, a in zip(leaves, keep)]
    total = jnp.max(jnp.stack([_largest(m) for m in maxes]))
    if axis_name is not None and (
        axes := _split_axes(total, _axis_names(axis_name))):
      total = jax.lax.pmax(total, axes)
      if each:
        maxes = _unpack(jax.lax.pmax(_pack(maxes), axes), maxes)
    return Norm(one, total), maxes if each else None
  partials = [jnp.sum(_abs_pow(x, p), axis=a, dtype=dtype)
              for x, a in zip(leaves, keep)]
  s = _psum([_total(v) for v in partials], leaves, axis_name)
  per_leaf = None
  if each:
    sums = _psum_each(partials, leaves, axis_name)
    per_leaf = [_root(v, p) for v in sums]

  def plain(s):
    return Norm(_one_like(s), _root(s, p))

  def rescaled(s):
    del s
    stacks = _stacked(leaves)
    m = _tree_max(stacks, axis_name, dtype)
    e = exponent(m)
    t = _psum([scaled_power_sum(x, e, p, dtype=dtype) for x in stacks],
              stacks, axis_name)
    return _unscaled(t, e, p, m)

  return jax.lax.cond(_needs_rescale(s, p, zero=True), rescaled, plain,
                      s), per_leaf


def _leaf_norms(leaves: list[jax.Array], p: Any,
                axes: list[tuple[int, ...]],
                groups: list[list[int]],
                axis_name: AxisName = None) -> list[Norm]:
  """Per-group stacked norms with one ``lax.cond`` for the whole tree."""
  # The named axes each group's leaves vary over (one type, so the same).
  split = [_group_axes(leaves[g[0]], axis_name) for g in groups]

  def total(v, k, op=jax.lax.psum):
    return op(v, split[k]) if split[k] else v

  if isinstance(p, float) and p == math.inf:
    maxes = [total(_stack([jnp.max(_abs(leaves[i]), axis=axes[i],
                                   keepdims=True, initial=0) for i in g]), k,
                   jax.lax.pmax) for k, g in enumerate(groups)]
    return [Norm(_one_like(m), m) for m in maxes]
  sums = [total(_stack([jnp.sum(_abs_pow(leaves[i], p), axis=axes[i],
                                keepdims=True) for i in g]), k)
          for k, g in enumerate(groups)]
  # A zero sum is taken at its word here (dead units are common, and their
  # clipping is the same either way); tiny nonzero sums are rescaled.
  bad = jnp.stack([jnp.any(_needs_rescale(s, p, zero=False))
                   for s in sums]).any()

  def plain(sums):
    return [Norm(_one_like(s), _root(s, p)) for s in sums]

  def rescaled(sums):
    out = []
    for k, (group, s0) in enumerate(zip(groups, sums)):
      x = _stack([leaves[i] for i in group])
      a = tuple(d + 1 for d in axes[group[0]])
      m = total(jnp.max(_abs(x), axis=a, keepdims=True, initial=0), k,
                jax.lax.pmax)
      e = exponent(m)
      s = total(scaled_power_sum(x, e, p, a, keepdims=True), k)
      n = _unscaled(s, e, p, m)
      out.append(Norm(n.power.astype(s0.dtype), n.scaled.astype(s0.dtype)))
    return out

  return jax.lax.cond(bad, rescaled, plain, sums)


def _group_axes(x: jax.Array, axis_name: AxisName) -> tuple[Any, ...]:
  """The named axes ``x`` is split over (none without ``axis_name``)."""
  if axis_name is None:
    return ()
  return _split_axes(x, _axis_names(axis_name))


def _copies_split(x: jax.Array, axis_name: AxisName) -> int:
  """How many devices share ``x``'s elements along the axes it is split over."""
  return math.prod(_axis_size(n) for n in _group_axes(x, axis_name))


def _one_like(x: jax.Array) -> jax.Array:
  """Ones shaped, typed and (under ``shard_map``) varying like ``x``."""
  return jnp.where(jnp.isnan(x), 1, 1).astype(x.dtype)


def _abs(x: jax.Array) -> jax.Array:
  return jnp.abs(x).astype(_tree.acc_dtype(x.dtype))


def _type_key(x: jax.Array) -> Any:
  """Leaves with equal keys can be stacked: same shape, dtype and sharding."""
  aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
  return str(aval), x.shape, x.dtype


def _groups(leaves: list[jax.Array],
            axes: list[tuple[int, ...]] | None = None) -> list[list[int]]:
  """Indices of leaves of one type, in chunks of at most ``_CHUNK_BYTES``."""
  by_key: dict[Any, list[list[int]]] = {}
  for i, x in enumerate(leaves):
    key = (_type_key(x), None if axes is None else axes[i])
    chunks = by_key.setdefault(key, [[]])
    if chunks[-1] and (len(chunks[-1]) + 1) * x.nbytes > _CHUNK_BYTES:
      chunks.append([])
    chunks[-1].append(i)
  return [c for chunks in by_key.values() for c in chunks]


def _stack(xs: list[jax.Array]) -> jax.Array:
  return xs[0][None] if len(xs) == 1 else jnp.stack(xs)


def _stacked(leaves: list[jax.Array]) -> list[jax.Array]:
  """The leaves stacked by type: few reductions, bounded temporaries."""
  return [_stack([leaves[i] for i in g]) for g in _groups(leaves)]


def _tree_max(leaves: list[jax.Array], axis_name: AxisName,
              dtype: Any) -> jax.Array:
  m = jnp.max(jnp.stack([jnp.max(_abs(x), initial=0).astype(dtype)
                         for x in leaves]))
  if axis_name is not None and (axes := _split_axes(m, _axis_names(axis_name))):
    m = jax.lax.pmax(m, axes)
  return m


# ----------------------------------------------------------------------------
# Sharded reductions (shard_map / pmap with ``axis_name``).


def _psum(partials: list[jax.Array], leaves: list[jax.Array],
          axis_name: AxisName) -> jax.Array:
  """The total of per-leaf partial sums over the whole, unsharded tree.

  Inside ``shard_map``/``pmap`` one ``psum`` of one scalar does it: the
  partials are added on each device first, each divided by the number of
  copies of its leaf among the devices summed over. A leaf is split over the
  named axes it varies over and replicated over the others (a bias under
  FSDP); ``shard_map`` records which (``check_vma=True``, its default), and
  the ``psum`` runs over the axes some leaf varies over. Without that record
  (``pmap``, ``check_vma=False``) every leaf counts as split over every named
  axis.
  """
  if axis_name is None:
    return sum(partials[1:], partials[0])
  splits = [_split_axes(x, _axis_names(axis_name)) for x in leaves]
  axes = tuple(n for n in _axis_names(axis_name) if any(n in s for s in splits))
  groups: dict[int, jax.Array] = {}
  for s, split in zip(partials, splits):
    copies = math.prod(_axis_size(n) for n in axes if n not in split)
    groups[copies] = groups[copies] + s if copies in groups else s
  total = sum(s if c == 1 else s / c for c, s in groups.items())
  return jax.lax.psum(total, axes) if axes else total


def _psum_each(partials: list[jax.Array], leaves: list[jax.Array],
               axis_name: AxisName) -> list[jax.Array]:
  """Each leaf's partial sum over the whole, unsharded leaf: one ``psum``."""
  if axis_name is None:
    return partials
  names = _axis_names(axis_name)
  splits = [_split_axes(x, names) for x in leaves]
  axes = tuple(n for n in names if any(n in s for s in splits))
  if not axes:
    return partials
  scaled = []
  for s, split in zip(partials, splits):
    copies = math.prod(_axis_size(n) for n in axes if n not in split)
    scaled.append(s if copies == 1 else s / copies)
  return _unpack(jax.lax.psum(_pack(scaled), axes), scaled)


def _pack(values: list[jax.Array]) -> jax.Array:
  """Scalars (and per-layer vectors) as one vector, for one collective."""
  if all(jnp.ndim(v) == 0 for v in values):
    return jnp.stack(values)
  return jnp.concatenate([jnp.reshape(v, (-1,)) for v in values])


def _unpack(packed: jax.Array, like: list[jax.Array]) -> list[jax.Array]:
  """:func:`_pack` undone: arrays shaped as ``like``."""
  if all(jnp.ndim(v) == 0 for v in like):
    return list(packed)
  out, start = [], 0
  for v in like:
    out.append(jnp.reshape(packed[start:start + v.size], v.shape))
    start += v.size
  return out


def _kept(x: jax.Array, layer: int | None) -> tuple[int, ...] | None:
  """The axes a leaf's norm reduces: all (``None``), or all but its layer
  axis."""
  return None if layer is None else tuple(
      d for d in range(x.ndim) if d != layer)


def _global_size(leaves: list[jax.Array], axis_name: AxisName) -> int:
  """The number of elements of the whole, unsharded tree."""
  if axis_name is None:
    return sum(x.size for x in leaves)
  names = _axis_names(axis_name)
  return sum(x.size * math.prod(_axis_size(n) for n in _split_axes(x, names))
             for x in leaves)


def _axis_names(axis_name: AxisName) -> tuple[Any, ...]:
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (
      axis_name,)


def _axis_size(name: Any) -> int:
  return jax.lax.psum(1, name)


def _split_axes(x: Any, names: tuple[Any, ...]) -> tuple[Any, ...]:
  """The named axes ``x`` varies over: all of them when this is not tracked."""
  varying = _varying(x)
  return tuple(n for n in names if varying is None or n in varying
               or n not in (_varying(jax.lax.axis_index(n)) or ()))


def _varying(x: Any) -> frozenset | None:
  """The manual mesh axes ``x`` varies over, or None where JAX keeps no record."""
  aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
  mat = getattr(aval, "mat", None)  # Older JAX releases: aval.vma.
  return getattr(mat, "varying", None) if mat is not None else getattr(
      aval, "vma", None)


def _ord_index(p: jax.Array) -> jax.Array:
  """0, 1, 2 for a traced ord of 2, 1, inf; 3 for any other p."""
  return jnp.select([p == 2, p == 1, jnp.isinf(p)], [0, 1, 2], 3)


# ----------------------------------------------------------------------------
# Partial norms that merge exactly: fixed-point sums in int32 limbs.

_LIMB_BITS = 8
_FRACTION_BITS = 56  # Below the peak's power: 7 limbs.
_LIMBS = 12  # 96 bits: sums of up to 2**40 elements of a norm.
_LIMB_MASK = (1 << _LIMB_BITS) - 1
# Elements one float32 sum of limbs (each below 2**8) may add: every partial
# sum is then an integer below 2**24, exact in float32 in any order.
_MAX_RUN = 1 << 16


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["peak", "limbs"], meta_fields=["ord", "size"])
@dataclasses.dataclass(frozen=True)
class NormParts:
  """A partial norm that merges exactly: the norm of part of a tree.

  Made by :func:`optaxclip.norm_parts` from a tree (or some of its leaves),
  merged with ``+`` (or :meth:`merge`), and turned into the norm with
  :meth:`norm`. It holds ``peak``, the largest ``|x|`` of the elements
  counted, and ``limbs``, the sum ``sum |x * 2**-e| ** p`` (``2**e`` the
  power of two just above ``peak``) as an exact fixed-point number: 96 bits,
  56 of them below the binary point, in twelve int32 limbs of 8 bits, least
  significant first. Each term is rounded down onto that grid, element by
  element, and the terms are added as integers, so the sum is the same bits
  whatever the order, the grouping, the sharding or the number of programs
  that add it: merging is associative and commutative, exactly, among parts
  on one ``peak`` (:func:`optaxclip.norm_parts` takes the peak agreed between
  programs). Parts on different peaks are merged by rounding the smaller
  part's sum down onto the larger's grid (a relative change below ``2**-50``),
  which is commutative but not exactly associative.

  A pytree: it passes through ``jax.jit``, collectives
  (``jax.experimental.multihost_utils.process_allgather``) and optax's extra
  arguments. ``ord`` and ``size`` are static.

  Attributes:
    peak: the largest magnitude counted, in the accumulation dtype (NaN if an
      element is NaN, ``inf`` if one is infinite, 0 for no elements).
    limbs: ``(12,)`` int32, the fixed-point sum, least significant limb first
      (zeros for ``ord=inf``, whose norm is ``peak``).
    ord: the norm, as :func:`optaxclip.global_norm` takes it (a float or
      ``"rms"``).
    size: how many elements the parts count (static; divides for ``"rms"``).
  """

  _fields = ("peak", "limbs", "ord", "size")
  peak: jax.Array
  limbs: jax.Array
  ord: Any = 2.0
  size: int = 0

  def merge(self, other: NormParts) -> NormParts:
    """The parts of both: exact among parts on one peak (see the class)."""
    if not isinstance(other, NormParts):
      raise TypeError(f"NormParts.merge: got {type(other).__name__}; merge"
                      " with another NormParts (from oc.norm_parts).")
    if other.ord != self.ord:
      raise ValueError(f"NormParts.merge: ord={self.ord!r} and"
                       f" ord={other.ord!r}; parts of one norm share one ord.")
    dtype = np.result_type(self.peak.dtype, other.peak.dtype)
    both = NormParts(
        jnp.stack([self.peak.astype(dtype), other.peak.astype(dtype)]),
        jnp.stack([self.limbs, other.limbs]), self.ord, 0).merge_stacked()
    return dataclasses.replace(both, size=self.size + other.size)

  __add__ = merge

  def merge_stacked(self) -> NormParts:
    """Parts stacked along a leading axis (as ``process_allgather`` returns
    them), merged into one. ``size`` is taken as one row's times the rows."""
    if jnp.ndim(self.peak) == 0:
      return self
    rows = self.peak.shape[0]
    peak = jnp.max(self.peak)  # NaN if any is NaN.
    limbs = self.limbs
    if self.ord != math.inf:
      shift = _grid_shift(self.peak, peak, _parts_p(self.ord))
      limbs = _normalize_limbs(jnp.sum(shift(limbs), axis=0))
    else:
      limbs = limbs[0] * 0
    return NormParts(peak, limbs, self.ord, self.size * rows)

  def norm(self) -> jax.Array:
    """The norm of every element counted: deterministic, to float rounding.

    ``inf`` where it is beyond the accumulation dtype (or an element is
    infinite), NaN if an element is NaN, 0 for none.
    """
    return parts_norm(self).value()


def _parts_p(ord: Any) -> float:
  return 2.0 if ord == _RMS else float(ord)


def norm_parts(tree: Any, *, ord: Ord = 2, axis_name: AxisName = None,
               mask: Any = None, peak: Any = None) -> NormParts:
  """The mergeable partial norm of a tree (or of the leaves ``mask`` picks).

  Each element's ``|x * 2**-e| ** p`` (``2**e`` the power of two just above
  the largest ``|x|``, so that no term overflows) is rounded down onto a
  fixed-point grid of 56 bits below the binary point and the terms are added
  as integers: the result is the same bits for the same values, whatever the
  order of the reduction, the mesh, the sharding, or how many programs add
  up the parts. Two passes over the tree (the largest element, then the
  sums), where :func:`optaxclip.global_norm` makes one: see the benchmarks.

  Pipeline stages that run as separate programs each make the parts of
  their own leaves and exchange them (``+`` merges); to merge bit for bit as
  one program would, they first agree on the largest element (one scalar
  exchanged, its maximum passed as ``peak``). A tensor shared between stages
  (a tied embedding) is counted by one stage only: the others leave it out
  with ``mask``.

  Args:
    tree: a pytree of floating-point or complex arrays (``None`` leaves and
      ``optax.MaskedNode`` are ignored).
    ord: the norm: ``1``, ``2``, ``inf``, any ``p > 0``, or ``"rms"``.
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axes the tree is
      split over; the parts are then those of the whole tree, on every
      device (each leaf counted once, as for :func:`optaxclip.global_norm`).
    mask: which leaves count (as ``optax.masked``'s ``mask``): ``None``
      (all), a pytree prefix of ``tree`` holding ``True``/``False``, or a
      function of the tree returning one.
    peak: the largest ``|x|`` agreed between the programs whose parts will
      be merged (a scalar; the larger of it and this tree's own is used).

  Returns:
    A :class:`optaxclip.NormParts`.

  Raises:
    TypeError: ``mask`` holds anything but ``True``/``False``, or ``peak``
      is not a scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
    >>> a = oc.norm_parts(grads, mask={"a": True, "b": False})
    >>> b = oc.norm_parts(grads, mask={"a": False, "b": True})
    >>> print((a + b).norm(), oc.norm_parts(grads).norm())
    5.0 5.0
    >>> print(oc.norm_parts({"w": jnp.zeros(3)}).norm())  # zero norm
    0.0
  """
  caller = "norm_parts"
  p = _validate.canonical_ord(ord)
  if isinstance(p, jax.Array):
    raise TypeError(f"{caller}: ord must be known when tracing (1, 2, inf,"
                    " p > 0 or 'rms'), not a traced array.")
  if peak is not None and (
      isinstance(peak, (bool, np.bool_, str)) or not isinstance(
          peak, (int, float, np.number, np.ndarray, jax.Array))
      or np.ndim(peak) != 0):
    raise TypeError(f"{caller}: peak must be a scalar (the largest |x| the"
                    f" programs agreed on), got {peak!r}.")
  live, _ = _tree.live_leaves(tree, caller)
  if mask is not None:
    if callable(mask):
      mask = mask(tree)
    given = jax.tree_util.tree_leaves(mask)
    if not given or not all(isinstance(f, (bool, np.bool_)) for f in given):
      raise TypeError(f"{caller}: mask must be None, True or False, a pytree"
                      " prefix of the tree holding True/False (the leaves to"
                      " count), or a function of the tree returning one; got"
                      f" {mask!r}.")
    keep = _thresholds.broadcast_prefix(mask, tree, "mask", caller)
    flags = [bool(m) for m in jax.tree_util.tree_leaves(
        keep, is_leaf=lambda x: isinstance(x, (bool, np.bool_)))]
    if len(flags) != len(live):
      raise ValueError(f"{caller}: mask must be a prefix of the tree holding"
                       " True/False, one per leaf or subtree.")
    live = [x for x, f in zip(live, flags) if f]
  xs = [x for _, x in live if x.size]
  dtype = _tree.common_acc_dtype(xs)
  size = _global_size(xs, axis_name)
  m = _tree_max(xs, axis_name, dtype) if xs else jnp.zeros((), dtype)
  if peak is not None:
    m = jnp.maximum(m, jnp.asarray(peak).astype(dtype))
  if p == math.inf:
    return NormParts(m, jnp.zeros((_LIMBS,), jnp.int32), p, size)
  e = _grid_exponent(m)
  q = _parts_p(p)
  limbs = jnp.zeros((_LIMBS,), jnp.int32)
  by_axes: dict[tuple[Any, ...], list[jax.Array]] = {}
  for x in xs:
    split = () if axis_name is None else _split_axes(x, _axis_names(axis_name))
    by_axes.setdefault(split, []).append(_leaf_limbs(x, e, q, dtype))
  for split, group in by_axes.items():
    total = _normalize_limbs(functools.reduce(jnp.add, group))
    if split:
      total = _normalize_limbs(jax.lax.psum(total, split))
    limbs = limbs + total
  return NormParts(m, _normalize_limbs(limbs), p, size)


def parts_norm(parts: NormParts) -> Norm:
  """The norm of :class:`NormParts` as a :class:`Norm` pair (exact beyond
  overflow), as :func:`clip_factors` takes it."""
  m = parts.peak
  one = jnp.ones((), m.dtype)
  if parts.ord == math.inf:
    return Norm(one, m)
  p = _parts_p(parts.ord)
  s = _from_limbs(parts.limbs, m.dtype)
  if parts.ord == _RMS:
    s = s / max(parts.size, 1)
  finite = jnp.isfinite(m)
  e = exponent(m)
  extra = pow2(_grid_exponent(m) - e, m.dtype)
  return Norm(jnp.where(finite, pow2(e, m.dtype), one),
              jnp.where(finite, _root(s, p) * extra, m))


def _grid_exponent(m: jax.Array) -> jax.Array:
  """``e`` with ``|x| * 2**-e`` below 1 for every ``|x| <= m``: the power
  of two just above ``m``, or ``2`` more where that exceeds the dtype's
  normal powers (values near its largest)."""
  e = exponent(m)
  top = jnp.isfinite(m) & (m >= 2.0 ** (jnp.finfo(m.dtype).maxexp - 2))
  return e + jnp.where(top, 2, 0).astype(e.dtype)


def supplied_norm(norm: Any, ord: Any, dtype: Any, caller: str) -> Norm:
  """A norm computed elsewhere, passed as ``update(..., global_norm=...)``:
  :class:`NormParts` (of this ``ord``) or a number, as a :class:`Norm`."""
  if isinstance(norm, NormParts):
    if isinstance(ord, jax.Array) or norm.ord != ord:
      raise ValueError(
          f"{caller}: global_norm= holds parts of ord={norm.ord!r} but the"
          f" transformation clips ord={ord!r}; make the parts with"
          " oc.norm_parts(updates, ord=...) of the same ord.")
    n = parts_norm(norm)
    return Norm(n.power.astype(dtype), n.scaled.astype(dtype))
  value = jnp.asarray(norm)
  if value.ndim or not (jnp.issubdtype(value.dtype, jnp.floating)
                        or jnp.issubdtype(value.dtype, jnp.integer)):
    raise TypeError(
        f"{caller}: global_norm= must be a scalar norm or a NormParts (from"
        f" oc.norm_parts), got shape {value.shape}, dtype {value.dtype}.")
  return Norm(jnp.ones((), dtype), value.astype(dtype))


def _leaf_limbs(x: jax.Array, e: jax.Array, p: float, dtype: Any
                ) -> jax.Array:
  """One leaf's terms ``|x * 2**-e| ** p`` (each below 1) added exactly."""
  acc = np.dtype(dtype)
  top = jnp.finfo(acc).maxexp - 2  # 2**-e in two normal factors.
  y = (widen(x).astype(acc) * pow2(-jnp.minimum(e, top), acc)
       ) * pow2(jnp.minimum(top - e, 0), acc)
  t = _abs_pow(y, p).astype(acc)
  z = _limbs_of(t, _FRACTION_BITS // _LIMB_BITS, acc)
  while z.ndim > 1:
    axes: list[int] = []
    run = 1
    for a in reversed(range(1, z.ndim)):
      if run * z.shape[a] > _MAX_RUN:
        break
      run *= z.shape[a]
      axes.append(a)
    if not axes:  # The last axis alone is too long: split it.
      n = z.shape[-1]
      f = max(d for d in range(1, _MAX_RUN + 1) if n % d == 0)
      if f == 1:
        raise ValueError(
            f"norm_parts: an axis of length {n} (a prime above {_MAX_RUN})"
            " cannot be summed exactly in steps; reshape the leaf.")
      z = jnp.reshape(z, z.shape[:-1] + (n // f, f))
      continue
    z = _normalize_limbs(jnp.sum(z, axis=tuple(axes))).astype(jnp.float32)
  return _normalize_limbs(z)


def _limbs_of(v: jax.Array, count: int, dtype: Any) -> jax.Array:
  """The ``count`` low limbs of ``floor(v * 2**56)`` (``v >= 0``), least
  significant first, stacked on a new leading axis as float32 integers:
  exactly, as differences of floors of power-of-two multiples of ``v``
  (each an integer float, each difference an integer below ``2**8``, so no
  step rounds). float32, not int32: XLA sums float32 several times faster
  on CPUs, and sums of at most ``_MAX_RUN`` limbs are exact in any order."""
  floors = [jnp.floor(v * np.asarray(
      2.0 ** (_FRACTION_BITS - _LIMB_BITS * j), dtype))
            for j in range(count + 1)]
  return jnp.stack([(floors[j] - floors[j + 1] * (1 << _LIMB_BITS)
                     ).astype(jnp.float32) for j in range(count)])


def _normalize_limbs(z: jax.Array) -> jax.Array:
  """Limb sums (first axis, least significant first) with the carries
  propagated: ``(12, ...)`` int32 limbs, each below ``2**8``."""
  z = z.astype(jnp.int32)  # Exact: float sums here are integers < 2**24.
  out, carry = [], None
  for j in range(_LIMBS):
    v = z[j] if j < z.shape[0] else jnp.zeros_like(z[0])
    if carry is not None:
      v = v + carry
    out.append(v & _LIMB_MASK)
    carry = v >> _LIMB_BITS
  return jnp.stack(out)


def _from_limbs(limbs: jax.Array, dtype: Any) -> jax.Array:
  """The fixed-point number as a float, least significant limb first."""
  out = jnp.zeros(limbs.shape[:-1], dtype)
  for j in range(_LIMBS):
    out = out + limbs[..., j].astype(dtype) * np.asarray(
        2.0 ** (_LIMB_BITS * j - _FRACTION_BITS), dtype)
  return out


def _grid_shift(peaks: jax.Array, top: jax.Array, p: float) -> Any:
  """A function moving rows of limbs from their own peak's grid onto
  ``top``'s: shifted right (rounded down) by ``p`` times the difference of
  the exponents; through the float value for a fractional ``p``."""
  gap = jnp.maximum(_grid_exponent(top) - _grid_exponent(peaks), 0)

  def shift(limbs):
    if float(p).is_integer():
      return _shift_right(limbs, gap * int(p))
    v = _from_limbs(limbs, peaks.dtype) * jnp.exp2(-p * gap.astype(
        peaks.dtype))
    frac = jnp.moveaxis(_limbs_of(v, _LIMBS, peaks.dtype), 0, -1).astype(
        jnp.int32)
    return jnp.where((gap == 0)[..., None], limbs, frac)

  return shift


def _shift_right(limbs: jax.Array, bits: jax.Array) -> jax.Array:
  """``floor(limbs / 2**bits)`` for rows of normalized limbs, ``bits >= 0``."""
  q = (bits // _LIMB_BITS)[..., None]
  r = (bits % _LIMB_BITS)[..., None]
  j = jnp.arange(_LIMBS)

  def take(k):
    inside = k < _LIMBS
    got = jnp.take_along_axis(limbs, jnp.where(inside, k, 0), axis=-1)
    return jnp.where(inside, got, 0)

  lo = take(j + q) >> r
  hi = (take(j + q + 1) << (_LIMB_BITS - r)) & _LIMB_MASK
  return lo | hi
