"""Norms that accumulate in float32 (or wider) and stay finite.

Every norm here is computed in the *accumulation dtype* of its input: float32
for float16, bfloat16 and float32 (and complex64) gradients, float64 for
float64 (and complex128) gradients. The common case is a single fused pass:
``sum(|x| ** p)`` followed by a root. When that plain sum overflows (float32
values near 1e38), or is so small that its terms went subnormal, one
``lax.cond`` switches to a rescaled form, ``m * sum((|x| / m) ** p) ** (1/p)``
with ``m = max |x|``, which is exact for every finite input whose norm is
representable. The rescaled branch runs only on those rare steps (and, for the
global norm, when the whole tree is zero). Per-leaf norms trust an exact zero
sum: a leaf or unit whose entries all lie below ~4e-23 (float32) reads as norm
0, which clips it exactly as its true norm would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Ord = int | float | str | jax.Array
"""A norm: ``1``, ``2``, ``inf``, any ``p > 0``, or ``"rms"``."""
Axis = int | Sequence[int] | None
"""The axes a per-unit norm reduces over; ``None`` for the whole leaf."""
AxisName = str | Sequence[str] | None
"""A mesh axis name, or a tuple of them, inside ``shard_map`` or ``pmap``."""

_RMS = "rms"


def global_norm(
    tree: Any, ord: Ord = 2, *, axis_name: AxisName = None
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
    leaves).

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
  p = canonical_ord(ord)
  leaves = float_leaves(tree, "global_norm")
  if isinstance(p, jax.Array):
    return _traced_ord_norm(leaves, p, axis_name)
  return _global_norm(leaves, p, axis_name)


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
  p = canonical_ord(ord)
  if isinstance(p, jax.Array):  # Traced, e.g. injected by inject_hyperparams.
    return jax.lax.switch(
        _ord_index(p),
        [lambda: leaf_norms(tree, 2, axis=axis),
         lambda: leaf_norms(tree, 1, axis=axis),
         lambda: leaf_norms(tree, math.inf, axis=axis),
         lambda: _tree_general_leaf_norms(tree, p, axis)])
  float_leaves(tree, "leaf_norms")  # A clear error for integer leaves.
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_masked
  )
  axes = [() if _is_masked(x) else _leaf_axes(path, x, axis)
          for path, x in paths_leaves]
  leaves = [x for _, x in paths_leaves]
  live = [(i, x, a) for i, (x, a) in enumerate(zip(leaves, axes))
          if not _is_masked(x)]
  norms = _leaf_norms([x for _, x, _ in live], p, [a for _, _, a in live])
  out = list(leaves)
  for (i, _, _), n in zip(live, norms):
    out[i] = n
  return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------
# Arguments and dtypes.


def canonical_ord(ord: Any) -> float | str | jax.Array:
  """Validates ``ord`` and returns it as a float, ``"rms"`` or a traced array."""
  if isinstance(ord, str):
    if ord.lower() == _RMS:
      return _RMS
    if ord.lower() in ("inf", "infinity"):
      return math.inf
    raise ValueError(
        f"ord={ord!r} is not a known norm; use 1, 2, inf, any p > 0, or 'rms'."
    )
  if isinstance(ord, bool) or not isinstance(
      ord, (int, float, np.number, np.ndarray, jax.Array)
  ):
    raise TypeError(
        f"ord must be a number > 0 or 'rms', got {type(ord).__name__}."
    )
  if isinstance(ord, jax.Array) and not is_concrete(ord):
    return ord  # Traced, e.g. injected by optax.inject_hyperparams.
  p = float(ord)
  if not p > 0:  # Also catches NaN.
    raise ValueError(f"ord must be > 0 (1, 2, inf, any p > 0, or 'rms'), got {p}.")
  return p


def is_concrete(x: Any) -> bool:
  """True when ``x`` has a value known at trace time."""
  try:
    np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return False
  return True


def acc_dtype(dtype: Any) -> np.dtype:
  """float32 for 16/32-bit floats and complex64; float64 for 64-bit ones."""
  real = jnp.finfo(dtype).dtype  # The real dtype of a complex one.
  return np.dtype(jnp.promote_types(real, jnp.float32))


def tree_acc_dtype(tree: Any) -> np.dtype:
  """The widest accumulation dtype over the leaves of ``tree``."""
  dtypes = [acc_dtype(x.dtype) for x in float_leaves(tree, "optaxclip")]
  return np.dtype(jnp.result_type(jnp.float32, *dtypes))


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def float_leaves(tree: Any, where: str) -> list[jax.Array]:
  """The array leaves of ``tree``; a clear TypeError on non-float ones."""
  out = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_masked):
    if _is_masked(x):
      continue
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"{where}: the gradient leaf at {jax.tree_util.keystr(path) or 'root'}"
          f" has dtype {dtype}; clipping needs floating-point or complex"
          " gradients. Exclude integer leaves with optax.masked or cast them."
      )
    out.append(x)
  return out


def _leaf_axes(path: Any, x: Any, axis: Axis) -> tuple[int, ...]:
  ndim = jnp.ndim(x)
  if axis is None:
    return tuple(range(ndim))
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
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


# ----------------------------------------------------------------------------
# The norm kernels.


def _abs_pow(x: jax.Array, p: float) -> jax.Array:
  """``|x| ** p`` in the accumulation dtype, fused with the cast."""
  acc = acc_dtype(x.dtype)
  if jnp.iscomplexobj(x):
    if p == 2:
      return jnp.square(x.real.astype(acc)) + jnp.square(x.imag.astype(acc))
    a = jnp.abs(x).astype(acc)
  else:
    a = x.astype(acc)
    if p == 2:
      return jnp.square(a)
    a = jnp.abs(a)
  return a if p == 1 else a ** p


def _abs(x: jax.Array) -> jax.Array:
  return jnp.abs(x).astype(acc_dtype(x.dtype))


def _root(s: jax.Array, p: float) -> jax.Array:
  if p == 2:
    return jnp.sqrt(s)
  return s if p == 1 else s ** (1.0 / p)


def _needs_rescale(s: jax.Array, p: float, zero: bool) -> jax.Array:
  """Sums that overflowed, or whose terms may have gone subnormal.

  With ``zero``, an exact 0 counts too: every term may have underflowed.
  """
  bad = ~jnp.isfinite(s)
  if p > 1:
    info = jnp.finfo(s.dtype)
    bad |= (s < info.tiny / info.eps) if zero else (
        (s > 0) & (s < info.tiny / info.eps))
  return bad


def _ratio(a: jax.Array, m: jax.Array) -> jax.Array:
  """``a / m`` for ``0 < m`` finite, exact even where ``1/m`` is subnormal.

  XLA turns a division by a broadcast scalar into a multiply by its
  reciprocal, and CPUs flush subnormal reciprocals (of ``m`` above ~1e38) to
  zero; a power-of-two pre-scale, exact in floating point, keeps ``m`` and
  ``1/m`` normal.
  """
  c = jnp.where(m > 2.0**64, 2.0**-64, jnp.where(m < 2.0**-64, 2.0**64, 1.0))
  c = c.astype(m.dtype)
  return (a * c) / (m * c)


def _over(x: jax.Array, m: jax.Array) -> jax.Array:
  """``x / m`` in the accumulation dtype (complex stays complex).

  The absolute value is left to ``_abs_pow``: an ``|x|`` shared with the
  max reduction would be materialised as a temporary copy of the leaf.
  """
  if not jnp.iscomplexobj(x):
    x = x.astype(acc_dtype(x.dtype))
  return _ratio(x, m.astype(acc_dtype(x.dtype)))


def _rescaled(x: jax.Array, p: float, axes: tuple[int, ...],
              m: jax.Array | None = None) -> jax.Array:
  """``m * sum((|x|/m) ** p) ** (1/p)``: exact where the plain sum is not."""
  if m is None:
    m = jnp.max(_abs(x), axis=axes, keepdims=True, initial=0)
  safe = jnp.where((m > 0) & jnp.isfinite(m), m, jnp.ones_like(m))
  s = jnp.sum(_abs_pow(_over(x, safe), p), axis=axes, keepdims=True)
  n = safe * _root(s, p)
  return jnp.where(jnp.isinf(m), m, n)  # An infinite entry: infinite norm.


def _global_norm(leaves: list[jax.Array], p: float | str,
                 axis_name: AxisName) -> jax.Array:
  if not leaves:
    return jnp.zeros((), jnp.float32)
  dtype = jnp.result_type(jnp.float32, *[acc_dtype(x.dtype) for x in leaves])
  if axis_name is None and single_device():
    leaves = _merge_small(leaves, dtype)
  if p == _RMS:
    size = _global_size(leaves, axis_name)
    n = _global_norm(leaves, 2.0, axis_name)
    return n / jnp.sqrt(jnp.asarray(max(size, 1) if isinstance(size, int)
                                    else size, dtype))
  if p == math.inf:
    m = _tree_max(leaves, dtype, axis_name)
    return m

  def plain(s):
    return _root(s, p)

  def rescaled(s):
    del s
    m = _tree_max(leaves, dtype, axis_name)
    safe = jnp.where((m > 0) & jnp.isfinite(m), m, jnp.ones_like(m))
    f = _distinct_factors(leaves)
    t = _psum_leaves([jnp.sum(_abs_pow(_over(x, safe * k), p), dtype=dtype)
                      * k ** p for x, k in zip(leaves, f)], leaves, axis_name)
    return jnp.where(jnp.isinf(m), m, safe * _root(t, p))

  s = _psum_leaves([jnp.sum(_abs_pow(x, p), dtype=dtype) for x in leaves],
                   leaves, axis_name)
  return jax.lax.cond(_needs_rescale(s, p, zero=True), rescaled, plain, s)


_SMALL = 1 << 16


def single_device() -> bool:
  """One device: concatenating leaves moves no data between devices."""
  return jax.device_count() == 1


def _merge_small(leaves: list[jax.Array], dtype: Any) -> list[jax.Array]:
  """The leaves, with all real ones of at most 2**16 elements concatenated.

  XLA emits one unrolled reduction kernel per small leaf, slow to compile
  (biases and norm scales are most of a network's leaves); one concatenated
  vector (a copy of little cost, in the accumulation dtype) needs one.
  """
  small = [x for x in leaves
           if x.size <= _SMALL and not jnp.iscomplexobj(x)]
  if len(small) < 2:
    return leaves
  big = [x for x in leaves if x.size > _SMALL or jnp.iscomplexobj(x)]
  return big + [jnp.concatenate([jnp.ravel(x).astype(dtype) for x in small])]


def _distinct_factors(leaves: list[jax.Array]) -> list[float]:
  """``1 + j / 1024`` for the ``j``-th leaf of each shape and dtype.

  Leaves of one shape scaled by one shared scalar would share its broadcast,
  which CPU backends materialise as a full-size temporary between reduction
  kernels; a factor of their own (within 0.1% of 1, rounding errors of 1 ulp)
  keeps every kernel reading only its leaf.
  """
  seen: dict[tuple[Any, ...], int] = {}
  out = []
  for x in leaves:
    j = seen[x.shape, x.dtype] = seen.get((x.shape, x.dtype), -1) + 1
    out.append(1.0 + (j % 1024) / 1024)
  return out


def _tree_max(leaves, dtype, axis_name):
  m = jnp.max(jnp.stack([jnp.max(_abs(x), initial=0).astype(dtype)
                         for x in leaves]))
  if axis_name is not None and (axes := _split_axes(m, _axis_names(axis_name))):
    m = jax.lax.pmax(m, axes)
  return m


def _psum_leaves(partials: list[jax.Array], leaves: list[jax.Array],
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
    return sum(partials)
  splits = [_split_axes(x, _axis_names(axis_name)) for x in leaves]
  axes = tuple(n for n in _axis_names(axis_name) if any(n in s for s in splits))
  groups: dict[int, jax.Array] = {}
  for s, split in zip(partials, splits):
    copies = math.prod(_axis_size(n) for n in axes if n not in split)
    groups[copies] = groups[copies] + s if copies in groups else s
  total = sum(s if c == 1 else s / c for c, s in groups.items())
  return jax.lax.psum(total, axes) if axes else total


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


def _leaf_norms(leaves: list[jax.Array], p: float | str,
                axes: list[tuple[int, ...]]) -> list[jax.Array]:
  """Per-leaf (per-unit) norms with one ``lax.cond`` for the whole tree."""
  if not leaves:
    return []
  if p == _RMS:
    out = _leaf_norms(leaves, 2.0, axes)
    return [n / math.sqrt(max(_unit_size(x, a), 1))
            for n, x, a in zip(out, leaves, axes)]
  if p == math.inf:
    return [jnp.max(_abs(x), axis=a, keepdims=True, initial=0)
            for x, a in zip(leaves, axes)]
  sums = [jnp.sum(_abs_pow(x, p), axis=a, keepdims=True)
          for x, a in zip(leaves, axes)]
  # A zero sum is taken at its word here (dead units are common and their
  # clipping is the same either way); tiny nonzero sums are rescaled.
  bad = jnp.stack([jnp.any(_needs_rescale(s, p, zero=False))
                   for s in sums]).any()

  def plain(sums):
    return [_root(s, p) for s in sums]

  def rescaled(sums):
    del sums
    return [_rescaled(x, p, a) for x, a in zip(leaves, axes)]

  return jax.lax.cond(bad, rescaled, plain, sums)


def _unit_size(x: jax.Array, axes: tuple[int, ...]) -> int:
  return math.prod(x.shape[a] for a in axes)


def _traced_ord_norm(leaves, p, axis_name):
  """Global norm for an ``ord`` only known at run time (inject_hyperparams)."""
  branches = [lambda: _global_norm(leaves, 2.0, axis_name),
              lambda: _global_norm(leaves, 1.0, axis_name),
              lambda: _global_norm(leaves, math.inf, axis_name)]
  # A general p uses the rescaled form, which is exact for every p > 0.

  def general():
    dtype = jnp.result_type(jnp.float32, *[acc_dtype(x.dtype) for x in leaves])
    q = jnp.asarray(p, dtype)
    m = _tree_max(leaves, dtype, axis_name)
    safe = jnp.where((m > 0) & jnp.isfinite(m), m, jnp.ones_like(m))
    f = _distinct_factors(leaves)
    t = _psum_leaves([jnp.sum(jnp.abs(_over(x, safe * k)) ** q, dtype=dtype)
                      * k ** q for x, k in zip(leaves, f)], leaves, axis_name)
    return jnp.where(jnp.isinf(m), m, safe * t ** (1 / q))

  branches.append(general)
  return jax.lax.switch(_ord_index(p), branches)


def _ord_index(p: jax.Array) -> jax.Array:
  """0, 1, 2 for a traced ord of 2, 1, inf; 3 for any other p."""
  return jnp.select([p == 2, p == 1, jnp.isinf(p)], [0, 1, 2], 3)


def _tree_general_leaf_norms(tree: Any, p: jax.Array, axis: Axis) -> Any:
  """Per-leaf norms for a traced p: the rescaled form, exact for any p > 0."""
  def one(path, x):
    if _is_masked(x):
      return x
    axes = _leaf_axes(path, x, axis)
    m = jnp.max(_abs(x), axis=axes, keepdims=True, initial=0)
    q = jnp.asarray(p, m.dtype)
    safe = jnp.where((m > 0) & jnp.isfinite(m), m, jnp.ones_like(m))
    s = jnp.sum(jnp.abs(_over(x, safe)) ** q, axis=axes, keepdims=True)
    return jnp.where(jnp.isinf(m), m, safe * s ** (1 / q))
  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_masked)
