"""Classic clipping: by value, by each leaf's norm, by the global norm."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _common, _norms
from optaxclip._common import Threshold
from optaxclip._norms import Axis, AxisName, Ord


class ClipByGlobalNormState(NamedTuple):
  """State of :func:`clip_by_global_norm`.

  Attributes:
    count: updates seen so far (int32).
    grad_norm: the global norm of the last incoming update, before clipping.
    threshold: the threshold in force at the last update.
    scale: the factor the last update was multiplied by, ``min(1, t / n)``.
    clipped: whether the last update was scaled down.
    num_clipped: how many updates have been scaled down so far.
  """

  count: jax.Array
  grad_norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped: jax.Array
  num_clipped: jax.Array


class ClipByNormState(NamedTuple):
  """State of :func:`clip_by_norm`.

  Attributes:
    count: updates seen so far (int32).
    grad_norm: per leaf, the norm (per unit when ``axis`` is given) of the
      last incoming update, before clipping; reduced axes are dropped.
    threshold: per leaf, the threshold in force at the last update.
    scale: per leaf, the factor applied (same shape as ``grad_norm``).
    clipped: whether any leaf or unit was scaled down at the last update.
    frac_clipped: the fraction of leaves (or units) scaled down at the last
      update.
    num_clipped: how many updates have had something scaled down so far.
  """

  count: jax.Array
  grad_norm: Any
  threshold: Any
  scale: Any
  clipped: jax.Array
  frac_clipped: jax.Array
  num_clipped: jax.Array


class ClipByValueState(NamedTuple):
  """State of :func:`clip_by_value`.

  Attributes:
    count: updates seen so far (int32).
    grad_norm: the global 2-norm of the last incoming update, before clipping.
    scale: ``norm(clipped update) / grad_norm``, the factor by which clipping
      shrank the update as a whole (1 when nothing was clipped).
    clipped: whether any element of the last update was clipped.
    frac_clipped: the fraction of elements clipped at the last update.
    num_clipped: how many updates have had an element clipped so far.
  """

  count: jax.Array
  grad_norm: jax.Array
  scale: jax.Array
  clipped: jax.Array
  frac_clipped: jax.Array
  num_clipped: jax.Array


def clip_by_global_norm(
    max_norm: Threshold, *, ord: Ord = 2, axis_name: AxisName = None
) -> optax.GradientTransformation:
  """Scales the whole update so that its global norm is at most ``max_norm``.

  Every leaf is multiplied by the same factor ``min(1, max_norm / norm)``,
  where ``norm`` is the norm of all leaves taken together
  (:func:`optaxclip.global_norm`: float32-accumulated and overflow-safe). An
  update whose norm is at or below ``max_norm`` is returned unchanged, bit for
  bit. The scale is a single multiply per element, so under ``jax.jit`` it
  fuses into the transformation that follows (e.g. AdamW's update).

  Args:
    max_norm: the largest global norm allowed: a non-negative number, a JAX
      scalar, or an Optax schedule of the step count. ``inf`` disables
      clipping while keeping the statistics.
    ord: the norm: ``1``, ``2``, ``inf``, any ``p > 0``, or ``"rms"``.
    axis_name: inside ``shard_map``/``pmap`` with sharded updates, the axis
      name (or tuple of names) to reduce the norm over, so that every device
      uses the norm of the whole update.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ClipByGlobalNormState`.

  References:
    Pascanu et al., `On the difficulty of training recurrent neural networks
    <https://arxiv.org/abs/1211.5063>`_, 2013.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> clip = oc.clip_by_global_norm(1.0)
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> state = clip.init(grads)
    >>> updates, state = clip.update(grads, state)
    >>> print(updates["w"], state.grad_norm, state.clipped)
    [0.6 0.8] 5.0 True
  """
  where = "clip_by_global_norm"
  _common.check_threshold(max_norm, "max_norm", where)
  p = _norms.canonical_ord(ord)

  def init_fn(params):
    dtype = _norms.tree_acc_dtype(params)
    zero = jnp.zeros((), dtype)
    return ClipByGlobalNormState(
        count=jnp.zeros((), jnp.int32), grad_norm=zero,
        threshold=_common.resolve(max_norm, jnp.zeros((), jnp.int32), dtype),
        scale=jnp.ones((), dtype), clipped=jnp.zeros((), bool),
        num_clipped=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    dtype = state.grad_norm.dtype
    norm = _norms.global_norm(updates, p, axis_name=axis_name).astype(dtype)
    threshold = _common.resolve(max_norm, state.count, dtype)
    scale = _common.clip_scale(norm, threshold)
    updates = _common.tree_map_arrays(
        lambda g: _common.scale_leaf(g, scale), updates)
    clipped = norm > threshold
    return updates, ClipByGlobalNormState(
        count=_common.increment(state.count), grad_norm=norm,
        threshold=threshold, scale=scale, clipped=clipped,
        num_clipped=state.num_clipped + clipped.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_norm(
    max_norm: Any, *, ord: Ord = 2, axis: Axis = None
) -> optax.GradientTransformation:
  """Scales each leaf (or each unit of a leaf) to a norm of at most ``max_norm``.

  Each leaf ``g`` becomes ``g * min(1, max_norm / norm(g))``. With ``axis``,
  the norm is taken over those axes only and each slice along the remaining
  axes (a row, an output channel) is scaled on its own, as in
  ``tf.clip_by_norm(g, max_norm, axes=axis)``. ``ord="rms"`` divides the
  2-norm by the square root of the number of elements reduced, which is
  ``optax.clip_by_block_rms``.

  Args:
    max_norm: the largest norm allowed for each leaf: a non-negative number,
      a JAX scalar, an Optax schedule of the step count, or a pytree prefix
      of the updates holding any of these (one threshold per subtree).
    ord: the norm: ``1``, ``2``, ``inf``, any ``p > 0``, or ``"rms"``.
    axis: ``None`` (one norm per leaf), or the axis or axes to reduce over;
      every leaf must have them.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ClipByNormState`.

  References:
    Keras ``clipnorm``; `tf.clip_by_norm
    <https://www.tensorflow.org/api_docs/python/tf/clip_by_norm>`_.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> clip = oc.clip_by_norm(1.0)
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> state = clip.init(grads)
    >>> updates, state = clip.update(grads, state)
    >>> print(updates["a"], updates["b"], state.frac_clipped)
    [0.6 0.8] [0.5] 0.5
  """
  where = "clip_by_norm"
  _common.check_threshold(max_norm, "max_norm", where, allow_tree=True)
  p = _norms.canonical_ord(ord)

  def squeeze(norms, tree):
    return _common.tree_map_arrays(
        lambda g, n: jnp.reshape(n, _kept_shape(g, axis)), tree, norms)

  def init_fn(params):
    jax.eval_shape(lambda t: _norms.leaf_norms(t, p, axis=axis), params)
    zeros = _common.tree_map_arrays(
        lambda g: jnp.zeros(_kept_shape(g, axis), _norms.acc_dtype(g.dtype)),
        params)
    count = jnp.zeros((), jnp.int32)
    return ClipByNormState(
        count=count, grad_norm=zeros,
        threshold=_common.leaf_thresholds(max_norm, params, count, "max_norm",
                                          where),
        scale=_common.tree_map_arrays(jnp.ones_like, zeros),
        clipped=jnp.zeros((), bool), frac_clipped=jnp.zeros((), jnp.float32),
        num_clipped=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    norms = _norms.leaf_norms(updates, p, axis=axis)
    thresholds = _common.leaf_thresholds(max_norm, updates, state.count,
                                         "max_norm", where)
    scales = _common.tree_map_arrays(_common.clip_scale, norms, thresholds)
    updates = _common.tree_map_arrays(_common.scale_leaf, updates, scales)
    over = jax.tree_util.tree_leaves(
        _common.tree_map_arrays(lambda n, t: n > t, norms, thresholds))
    num_over = sum((jnp.sum(o, dtype=jnp.int32) for o in over),
                   jnp.zeros((), jnp.int32))
    num_units = max(sum(o.size for o in over), 1)
    clipped = num_over > 0
    return updates, ClipByNormState(
        count=_common.increment(state.count),
        grad_norm=squeeze(norms, updates), threshold=thresholds,
        scale=squeeze(scales, updates), clipped=clipped,
        frac_clipped=num_over.astype(jnp.float32) / num_units,
        num_clipped=state.num_clipped + clipped.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_value(
    max_value: Any, min_value: Any = None
) -> optax.GradientTransformation:
  """Clips every element of the update to ``[-max_value, max_value]``.

  With ``min_value`` given, the interval is ``[min_value, max_value]``
  (``tf.clip_by_value``); otherwise it is symmetric (Keras ``clipvalue``,
  ``torch.nn.utils.clip_grad_value_``, ``optax.clip``). Unlike norm
  clipping, value clipping changes the direction of the update.

  Args:
    max_value: the upper bound (and, negated, the lower bound when
      ``min_value`` is ``None``): a number, a JAX scalar, an Optax schedule of
      the step count, or a pytree prefix of the updates holding any of these.
      Must be non-negative when ``min_value`` is ``None``.
    min_value: the lower bound, in the same forms; must not exceed
      ``max_value``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ClipByValueState`.

  References:
    Mikolov, `Statistical Language Models Based on Neural Networks
    <https://www.fit.vut.cz/study/phd-thesis/283/.en>`_, 2012.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> clip = oc.clip_by_value(1.0)
    >>> grads = jnp.array([-3.0, 0.5, 2.0])
    >>> state = clip.init(grads)
    >>> updates, state = clip.update(grads, state)
    >>> print(updates, state.frac_clipped)
    [-1.   0.5  1. ] 0.6666667
  """
  where = "clip_by_value"
  symmetric = min_value is None
  _common.check_threshold(max_value, "max_value", where, allow_tree=True,
                          allow_negative=not symmetric)
  if not symmetric:
    _common.check_threshold(min_value, "min_value", where, allow_tree=True,
                            allow_negative=True)
    _check_order(min_value, max_value, where)

  def init_fn(params):
    dtype = _norms.tree_acc_dtype(params)
    return ClipByValueState(
        count=jnp.zeros((), jnp.int32), grad_norm=jnp.zeros((), dtype),
        scale=jnp.ones((), dtype), clipped=jnp.zeros((), bool),
        frac_clipped=jnp.zeros((), jnp.float32),
        num_clipped=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    dtype = state.grad_norm.dtype
    hi = _common.leaf_thresholds(max_value, updates, state.count, "max_value",
                                 where)
    lo = (_common.tree_map_arrays(jnp.negative, hi) if symmetric else
          _common.leaf_thresholds(min_value, updates, state.count,
                                  "min_value", where))
    norm = _norms.global_norm(updates).astype(dtype)
    leaves = _norms.float_leaves(updates, where)
    out_sq, num_changed = _value_clip_stats(
        leaves, _norms.float_leaves(lo, where), _norms.float_leaves(hi, where),
        jnp.where(norm > 0, norm, 1), dtype)
    # An exact zero that depends on the statistics: the clip then runs after
    # them, in place, instead of on a copy of the updates.
    t = out_sq + num_changed
    after = 0 * jnp.where(jnp.isfinite(t), t, 0)
    clipped_updates = _common.tree_map_arrays(
        lambda g, a, b: jnp.clip(g, (a + after).astype(g.dtype),
                                 (b + after).astype(g.dtype)),
        updates, lo, hi)
    size = max(sum(x.size for x in leaves), 1)
    clipped = ~(num_changed <= 0)  # A NaN element counts as changed.
    scale = jnp.where(clipped & (norm > 0), jnp.sqrt(out_sq), 1)
    return clipped_updates, ClipByValueState(
        count=_common.increment(state.count), grad_norm=norm,
        scale=scale.astype(dtype), clipped=clipped,
        frac_clipped=num_changed / size,
        num_clipped=state.num_clipped + clipped.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


_SMALL = 1 << 16  # Leaves up to this size take the plain, compact form.


def _value_clip_stats(leaves: list[jax.Array], lo: list[jax.Array],
                      hi: list[jax.Array], norm: jax.Array,
                      dtype: Any) -> tuple[jax.Array, jax.Array]:
  """``sum((clip(g) / norm) ** 2)`` and the number of elements clipping changes.

  Each is one plain sum per leaf of a min/max/abs/multiply expression, which
  XLA fuses into one reduction kernel that reads the leaf once. CPU backends
  materialise, as full-size temporaries, comparisons, selects and any
  broadcast scalar or constant that two such kernels share; so there are no
  comparisons, no constants, and the ``j``-th leaf of a given shape scales by
  its own power of two ``2**-j`` (exact) so that its scalars are its own.
  Dividing by the pre-clip ``norm`` keeps every term in [0, 1], so the sum
  cannot overflow. An element counts as changed when its distance to the
  interval, times about 2**126, reaches 1: exactly the elements outside it,
  down to distances in the subnormal range (which count fractionally).
  On one device, small leaves are concatenated (a copy of little cost) and
  take the plain form, a clip and a comparison: one reduction each for all
  of them, where XLA would otherwise emit (and compile) one unrolled kernel
  per leaf.
  """
  seen: dict[tuple[Any, ...], int] = {}
  out_sq = jnp.zeros((), dtype)
  changed = jnp.zeros((), jnp.float32)
  inv = _norms._ratio(jnp.ones((), dtype), norm.astype(dtype))
  small, merge = [], _norms.single_device()
  for g, a, b in zip(leaves, lo, hi):
    j = seen[g.shape, g.dtype] = seen.get((g.shape, g.dtype), -1) + 1
    j %= 32  # Beyond, a shared scalar costs memory, never correctness.
    acc = _norms.acc_dtype(g.dtype)
    a = a.astype(g.dtype).astype(acc)  # The bounds the clip itself uses.
    b = b.astype(g.dtype).astype(acc)
    x = g.astype(acc)
    if g.size <= _SMALL and merge:
      small.append((x.ravel(), jnp.full(g.size, a), jnp.full(g.size, b)))
      continue
    s = jnp.asarray(2.0 ** -j, acc)
    r = inv.astype(acc) * s  # 2**-j / norm.
    # clip(x, a, b) * r as min(-min(-x r, -a r), b r): no clamp op.
    c = jnp.minimum(-jnp.minimum(-(x * r), -(a * r)), b * r)
    out_sq += jnp.sum(jnp.square(c), dtype=dtype) * 4.0 ** j
    # Twice the distance to [a, b], times 2**-j: relu(d) = (d + |d|) / 2.
    above, below = x * s - b * s, a * s - x * s
    twice = (above + jnp.abs(above)) + (below + jnp.abs(below))
    changed += jnp.sum(jnp.minimum(twice * 2.0 ** (125 - j), s),
                       dtype=jnp.float32) * 2.0 ** j
  if small:
    x, a, b = (jnp.concatenate(v).astype(dtype) for v in zip(*small))
    c = jnp.clip(x, a, b)
    out_sq += jnp.sum(jnp.square(c * inv))
    changed += jnp.sum(x != c, dtype=jnp.float32)
  return out_sq, changed


def _check_order(min_value: Any, max_value: Any, where: str) -> None:
  """Raises when both bounds are known numbers and ``min > max``."""
  def known(v):
    return (not callable(v) and isinstance(v, (int, float, jax.Array))
            and _norms.is_concrete(v))
  if known(min_value) and known(max_value) and float(min_value) > float(
      max_value):
    raise ValueError(
        f"{where}: min_value={float(min_value)} is above"
        f" max_value={float(max_value)}; swap them.")


def _kept_shape(g: jax.Array, axis: Axis) -> tuple[int, ...]:
  """The shape of ``g`` with the reduced axes dropped."""
  if axis is None:
    return ()
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  reduced = {a % g.ndim for a in axes}
  return tuple(d for i, d in enumerate(g.shape) if i not in reduced)
