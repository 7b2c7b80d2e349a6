"""Classic clipping: by value, by each leaf's norm, by the global norm."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _apply, _norms, _stats, _thresholds, _transform, _tree, _validate
from optaxclip._norms import AxisName, Ord
from optaxclip._numerics import Scale, clip_factors, scale_leaf
from optaxclip._thresholds import Threshold
from optaxclip._tree import Axis


class ClipByGlobalNormState(NamedTuple):
  """State of :func:`clip_by_global_norm`.

  Attributes:
    count: updates seen so far (int32).
    grad_norm: the global norm of the last incoming update, before clipping.
    threshold: the threshold in force at the last update.
    scale: the factor the last update was multiplied by, ``min(1, t / n)``.
    clipped: whether the last update was scaled down.
    num_clipped: how many updates have been scaled down so far.
    leaf_norms: (``leaf_norms=True``) each leaf's norm of the last incoming
      update, a tree like the updates, from the same partial sums as
      ``grad_norm`` (see :func:`optaxclip.global_norm`); ``None`` otherwise.
  """

  count: jax.Array
  grad_norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped: jax.Array
  num_clipped: jax.Array
  leaf_norms: Any = None


class ClipByNormState(NamedTuple):
  """State of :func:`clip_by_norm`.

  Attributes:
    count: updates seen so far (int32).
    grad_norm: the largest leaf (or unit) norm of the last incoming update,
      before clipping: the norm the threshold was compared with.
    threshold: the threshold in force at the last update (a tree of scalars
      when ``max_norm`` is a tree).
    scale: the smallest factor applied at the last update (1 when nothing
      was clipped).
    clipped: whether any leaf or unit was scaled down at the last update.
    frac_clipped: the fraction of leaves (or units) scaled down at the last
      update.
    num_clipped: how many updates have had something scaled down so far.
    leaf_norms: (``leaf_norms=True``) per leaf, the norm (per unit when
      ``axis`` is given, reduced axes dropped) of the last incoming update;
      ``None`` otherwise.
  """

  count: jax.Array
  grad_norm: jax.Array
  threshold: Any
  scale: jax.Array
  clipped: jax.Array
  frac_clipped: jax.Array
  num_clipped: jax.Array
  leaf_norms: Any = None


class ClipByValueState(NamedTuple):
  """State of :func:`clip_by_value`.

  Value clipping needs no reduction, so by default it keeps only what is
  free; ``stats=True`` adds the fields marked below, at the cost of reading
  the update again (see the benchmarks). Fields that are not kept are
  ``None``.

  Attributes:
    count: updates seen so far (int32).
    threshold: ``max_value`` in force at the last update (a scalar, or a tree
      of scalars when ``max_value`` is a tree).
    grad_norm: (``stats=True``) the global 2-norm of the last incoming
      update, before clipping.
    scale: (``stats=True``) ``norm(clipped update) / grad_norm``, the factor
      by which clipping shrank the update as a whole (1 when nothing was
      clipped or the update is zero).
    clipped: (``stats=True``) whether any element of the last update was
      changed (a NaN element counts as changed).
    frac_clipped: (``stats=True``) the fraction of elements changed.
    num_clipped: (``stats=True``) how many updates have had an element
      changed so far.
  """

  count: jax.Array
  threshold: Any
  grad_norm: jax.Array | None = None
  scale: jax.Array | None = None
  clipped: jax.Array | None = None
  frac_clipped: jax.Array | None = None
  num_clipped: jax.Array | None = None


def clip_by_global_norm(
    max_norm: Threshold, *, ord: Ord = 2, axis_name: AxisName = None,
    leaf_norms: bool = False, where: Any = None,
) -> optax.GradientTransformation:
  """Scales the whole update so that its global norm is at most ``max_norm``.

  Every leaf is multiplied by the same factor ``min(1, max_norm / norm)``,
  where ``norm`` is the norm of all leaves taken together
  (:func:`optaxclip.global_norm`: float32-accumulated and overflow-safe). An
  update whose norm is at or below ``max_norm`` is returned unchanged, bit for
  bit. The scale is applied by multiplying (no divide, no select), so under
  ``jax.jit`` it fuses into the transformation that follows (e.g. AdamW's
  update) and adds no pass over the gradients of its own.

  Edge cases: a zero update (norm 0) is returned unchanged, whatever the
  threshold; ``max_norm=inf`` never clips, ``max_norm=0`` zeroes the
  update; a negative or NaN threshold arriving at run time acts as 0 and is
  recorded as 0. A NaN in the update gives a NaN norm and a NaN update (as in
  optax; :func:`optaxclip.skip_step` drops such steps); an infinite entry
  gives an infinite norm and a zero factor. A norm beyond float32's range
  (entries near 3.4e38) is recorded as ``inf`` but clipped exactly.

  With ``where``, the norm is still that of *all* leaves (and is what the
  state records), but only the chosen leaves are multiplied by the factor;
  the others come back bit for bit. This is the clip to put before an
  optimizer that handles some leaves by orthogonalising them
  (``optax.contrib.muon``): its matrix leaves ignore their input's scale,
  so only the others (Adam's) are scaled; see the guide :doc:`/which_clipper`.
  ``where=False`` (or a tree of ``False``) scales nothing and only records.

  Args:
    max_norm: the largest global norm allowed: a non-negative number, a JAX
      scalar, or an Optax schedule of the step count. ``inf`` disables
      clipping while keeping the statistics.
    ord: the norm: ``1``, ``2``, ``inf``, any ``p > 0``, or ``"rms"``.
    axis_name: inside ``shard_map``/``pmap`` with sharded updates, the axis
      name (or tuple of names) to reduce the norm over, so that every device
      uses the norm of the whole update.
    leaf_norms: also keep each leaf's norm in the state (a tree): the
      partial sums of the global norm, at no extra pass over the update;
      :func:`optaxclip.clip_stats` with ``scalars=True`` lists them by path.
    where: which leaves the factor is applied to: ``None`` (all), a pytree
      prefix of the updates holding ``True`` or ``False`` (each value
      covering its subtree), or a function of the updates returning one, as
      optax's masks take (e.g. ``lambda u: jax.tree.map(lambda x: x.ndim !=
      2, u)``: all but the matrices). The leaves of the tree are Python or
      NumPy bools, known when tracing.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ClipByGlobalNormState` (``scale`` and ``clipped`` describe the
    factor, applied to the chosen leaves).

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
    >>> clip = oc.clip_by_global_norm(1.0, where={"w": False, "b": True})
    >>> grads = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
    >>> updates, state = clip.update(grads, clip.init(grads))
    >>> print(updates["w"], updates["b"], state.grad_norm)
    [3. 0.] [0.8] 5.0
  """
  chosen = where  # The leaves to scale; ``where`` names this function below.
  where = "clip_by_global_norm"
  _validate.check_threshold(max_norm, "max_norm", where)
  _validate.check_bool(leaf_norms, "leaf_norms", where)
  _check_chosen(chosen, where)
  p = _validate.canonical_ord(ord)

  def init_fn(params):
    dtype = _tree.tree_acc_dtype(params)
    zero = jnp.zeros((), dtype)
    return ClipByGlobalNormState(
        **_stats.counters(), grad_norm=zero,
        threshold=_thresholds.resolve(max_norm, jnp.zeros((), jnp.int32), dtype),
        scale=jnp.ones((), dtype),
        leaf_norms=_tree.zero_leaf_norms(params) if leaf_norms else None)

  def update_fn(updates, state, params=None):
    del params
    dtype = state.grad_norm.dtype
    norm, each = _norms.global_and_leaf_norms(
        updates, p, axis_name=axis_name, leaves=leaf_norms)
    threshold = _thresholds.resolve(max_norm, state.count, dtype)
    updates, scale = _clip_chosen(updates, norm, threshold, chosen, where)
    grad_norm = norm.value().astype(dtype)
    return updates, ClipByGlobalNormState(
        **_stats.tally(state, grad_norm > threshold), grad_norm=grad_norm,
        threshold=threshold, scale=scale.value().astype(dtype),
        leaf_norms=each)

  return _transform.transformation(init_fn, update_fn)


def _check_chosen(chosen: Any, where: str) -> None:
  """``where=`` of :func:`clip_by_global_norm`: None, a callable, or a tree
  of bools."""
  if chosen is None or callable(chosen):
    return
  leaves = jax.tree_util.tree_leaves(chosen)
  bad = [x for x in leaves if not isinstance(x, (bool, np.bool_))]
  if bad or not leaves:
    raise TypeError(
        f"{where}: where must be None, True or False, a pytree prefix of the"
        " updates holding True/False (the leaves to scale), or a function of"
        " the updates returning one; got"
        f" {'an empty tree' if not leaves else repr(bad[0])}.")


def _clip_chosen(updates: Any, norm: Any, threshold: jax.Array, chosen: Any,
                 where: str) -> tuple[Any, Scale]:
  """The leaves ``chosen`` selects times ``min(1, threshold / norm)``."""
  if chosen is None:
    return _apply.clip_tree(updates, norm, threshold)
  if callable(chosen):
    chosen = chosen(updates)
    if chosen is None or callable(chosen):
      raise TypeError(f"{where}: the where function returned {chosen!r};"
                      " it must return a tree of True/False.")
    _check_chosen(chosen, where)
  try:
    full = _thresholds.broadcast_prefix(chosen, updates, "where", where)
  except ValueError as e:
    raise ValueError(
        f"{where}: the where tree is not a prefix of the updates; give the"
        " updates' containers and keys with True or False where a whole"
        f" subtree is or is not scaled. {e.__cause__}") from e
  scale = clip_factors(norm, threshold)
  return _tree.map_arrays(lambda g, m: scale_leaf(g, scale) if m else g,
                          updates, full), scale


def clip_by_norm(
    max_norm: Any, *, ord: Ord = 2, axis: Axis = None,
    axis_name: AxisName = None, leaf_norms: bool = False,
) -> optax.GradientTransformation:
  """Scales each leaf (or each unit of a leaf) to a norm of at most ``max_norm``.

  Each leaf ``g`` becomes ``g * min(1, max_norm / norm(g))``. With ``axis``,
  the norm is taken over those axes only and each slice along the remaining
  axes (a row, an output channel) is scaled on its own, as in
  ``tf.clip_by_norm(g, max_norm, axes=axis)``. ``ord="rms"`` divides the
  2-norm by the square root of the number of elements reduced, which is
  ``optax.clip_by_block_rms``.

  Edge cases, per leaf or unit, as for :func:`clip_by_global_norm`: a zero
  norm is left unchanged, ``inf`` never clips, ``0`` (or a negative or NaN
  run-time threshold) zeroes, a NaN norm gives NaN. A leaf or unit whose
  every ``|g| ** p`` underflows float32 reads as norm 0 (and is unchanged).

  Args:
    max_norm: the largest norm allowed for each leaf: a non-negative number,
      a JAX scalar, an Optax schedule of the step count, or a pytree prefix
      of the updates holding any of these (one threshold per subtree).
    ord: the norm: ``1``, ``2``, ``inf``, any ``p > 0``, or ``"rms"``.
    axis: ``None`` (one norm per leaf), or the axis or axes to reduce over;
      every leaf must have them.
    axis_name: inside ``shard_map``/``pmap``, the mesh axis name (or names)
      over which leaves are split, so that each shard is clipped by the norm
      of its whole leaf (or unit). Each leaf's sums are added over the named
      axes it varies over (``shard_map`` records which); replicated leaves
      are not. This is right for a leaf split along the axes its norm
      reduces (any split with ``axis=None``); a leaf split only along the
      axes that index its units needs no ``axis_name`` for its norms.
    leaf_norms: also keep every leaf's (unit's) norm in the state, as a tree
      (:class:`ClipByNormState`). Off by default: the norms are computed
      anyway, but a tree of them is one output per leaf, which costs compile
      time (see the benchmarks).

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
  _validate.check_threshold(max_norm, "max_norm", where, allow_tree=True)
  _validate.check_bool(leaf_norms, "leaf_norms", where)
  p = _validate.canonical_ord(ord)

  def record(per_leaf, count, dtype):
    """The threshold to keep: the per-leaf tree only for a tree max_norm."""
    if _validate.is_tree_threshold(max_norm):
      return per_leaf
    return _thresholds.resolve(max_norm, count, dtype)

  def init_fn(params):
    leaves, rebuild = _tree.live_leaves(params, where)
    for path, x in leaves:
      _tree.leaf_axes(path, x, axis)  # A clear error for a bad axis.
    dtype = _tree.tree_acc_dtype(params)
    count = jnp.zeros((), jnp.int32)
    norms = None
    if leaf_norms:
      norms = rebuild([
          jnp.zeros(_tree.kept_shape(x.shape,
                                      _tree.leaf_axes(path, x, axis)),
                    _tree.acc_dtype(x.dtype)) for path, x in leaves])
    return ClipByNormState(
        **_stats.counters(frac=True), grad_norm=jnp.zeros((), dtype),
        threshold=record(_thresholds.leaf_thresholds(
            max_norm, params, count, "max_norm", where), count, dtype),
        scale=jnp.ones((), dtype), leaf_norms=norms)

  def update_fn(updates, state, params=None):
    del params
    leaves, rebuild = _tree.live_leaves(updates, where)
    axes = [_tree.leaf_axes(path, x, axis) for path, x in leaves]
    xs = [x for _, x in leaves]
    groups, norms = _norms.grouped_leaf_norms(xs, p, axes,
                                              axis_name=axis_name)
    thresholds = _thresholds.leaf_thresholds(max_norm, updates, state.count,
                                         "max_norm", where)
    t_leaves = _tree.float_leaves(thresholds, where)
    t_groups = [_apply.stack_scalars([t_leaves[i] for i in g], n.scaled.ndim)
                for g, n in zip(groups, norms)]
    out, values, scales = _apply.apply_grouped(xs, groups, norms, t_groups)
    num_over = sum((jnp.sum(v > t, dtype=jnp.int32)
                    for v, t in zip(values, t_groups)),
                   jnp.zeros((), jnp.int32))
    dtype = state.grad_norm.dtype
    return rebuild(out), ClipByNormState(
        **_stats.tally(state, num_over > 0, num=num_over,
                       of=sum(v.size for v in values)),
        grad_norm=_apply.largest(values, dtype),
        threshold=record(thresholds, state.count, dtype),
        scale=_apply.smallest(scales, dtype),
        leaf_norms=rebuild(_apply.ungroup(groups, values, xs, axes))
        if leaf_norms else None)

  return _transform.transformation(init_fn, update_fn)


def clip_by_value(
    max_value: Any, min_value: Any = None, *, stats: bool = False
) -> optax.GradientTransformation:
  """Clips every element of the update to ``[-max_value, max_value]``.

  With ``min_value`` given, the interval is ``[min_value, max_value]``
  (``tf.clip_by_value``); otherwise it is symmetric (Keras ``clipvalue``,
  ``torch.nn.utils.clip_grad_value_``, ``optax.clip``). Unlike norm
  clipping, value clipping changes the direction of the update.

  Edge cases: a NaN element stays NaN; ``max_value=inf`` changes nothing;
  ``max_value=0`` zeroes the update. A bound that arrives at run time (a
  schedule, an injected value) is made safe: a negative or NaN symmetric
  ``max_value`` acts as 0, a NaN bound of ``[min_value, max_value]`` acts as
  0, and where a ``min_value`` exceeds ``max_value`` every element becomes
  ``max_value``.

  Args:
    max_value: the upper bound (and, negated, the lower bound when
      ``min_value`` is ``None``): a number, a JAX scalar, an Optax schedule of
      the step count, or a pytree prefix of the updates holding any of these.
      Must be non-negative when ``min_value`` is ``None``.
    min_value: the lower bound, in the same forms; must not exceed
      ``max_value``.
    stats: also record the pre-clip norm, the fraction of elements changed
      and the norm ratio (:class:`ClipByValueState`). This reads the update
      twice more per step; without it the clip is a single elementwise pass,
      as ``optax.clip``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ClipByValueState`.

  References:
    Mikolov, `Statistical Language Models Based on Neural Networks
    <https://www.fit.vut.cz/study/phd-thesis/283/.en>`_, 2012.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> clip = oc.clip_by_value(1.0, stats=True)
    >>> grads = jnp.array([-3.0, 0.5, 2.0])
    >>> state = clip.init(grads)
    >>> updates, state = clip.update(grads, state)
    >>> print(updates, state.frac_clipped)
    [-1.   0.5  1. ] 0.6666667
  """
  where = "clip_by_value"
  symmetric = min_value is None
  _validate.check_threshold(max_value, "max_value", where, allow_tree=True,
                          allow_negative=not symmetric)
  if not symmetric:
    _validate.check_threshold(min_value, "min_value", where, allow_tree=True,
                            allow_negative=True)
    _check_order(min_value, max_value, where)
  _validate.check_bool(stats, "stats", where)
  tree_valued = _validate.is_tree_threshold(max_value)

  def bound(value, updates, count, name):
    if symmetric:
      return _thresholds.leaf_thresholds(value, updates, count, name, where)
    return _thresholds.leaf_thresholds(value, updates, count, name, where,
                                   lo=-math.inf, nan=0.0)

  def record(hi, updates, count, dtype):
    if tree_valued:
      return hi
    if symmetric:
      return _thresholds.resolve(max_value, count, dtype)
    return _thresholds.resolve(max_value, count, dtype, lo=-math.inf, nan=0.0)

  def init_fn(params):
    _tree.check_real(params, where)
    dtype = _tree.tree_acc_dtype(params)
    count = jnp.zeros((), jnp.int32)
    hi = bound(max_value, params, count, "max_value")
    state = ClipByValueState(count=count,
                             threshold=record(hi, params, count, dtype))
    if not stats:
      return state
    return state._replace(**_stats.counters(frac=True),
                          grad_norm=jnp.zeros((), dtype),
                          scale=jnp.ones((), dtype))

  def update_fn(updates, state, params=None):
    del params
    _tree.check_real(updates, where)
    dtype = _tree.tree_acc_dtype(updates)
    hi = bound(max_value, updates, state.count, "max_value")
    # jnp.clip gives max_value where a run-time min_value exceeds it.
    lo = (_tree.map_arrays(jnp.negative, hi) if symmetric else
          bound(min_value, updates, state.count, "min_value"))
    out = _tree.map_arrays(
        lambda g, a, b: jnp.clip(g, a.astype(g.dtype), b.astype(g.dtype)),
        updates, lo, hi)
    new = ClipByValueState(count=optax.safe_increment(state.count),
                           threshold=record(hi, updates, state.count, dtype))
    if not stats:
      return out, new
    return out, new._replace(**_value_stats(updates, out, state, dtype))

  return _transform.transformation(init_fn, update_fn)


def _value_stats(updates: Any, out: Any, state: ClipByValueState,
                 dtype: Any) -> dict[str, Any]:
  """``clip_by_value(stats=True)``'s fields: the norm before, the norm ratio
  after, and the counts of changed elements."""
  before = _norms.global_norm_parts(updates)
  after = _norms.global_norm_parts(out)
  leaves = _tree.float_leaves(updates, "clip_by_value")
  changed = sum((jnp.sum(g != c, dtype=jnp.int32) for g, c in
                 zip(leaves, _tree.float_leaves(out, "clip_by_value"))),
                jnp.zeros((), jnp.int32))
  clipped = changed > 0
  ratio = (after.power / before.power) * (after.scaled / jnp.where(
      before.scaled > 0, before.scaled, 1))
  return dict(
      **_stats.tally(state, clipped, num=changed,
                     of=sum(x.size for x in leaves)),
      grad_norm=before.value().astype(dtype),
      scale=jnp.where(clipped & (before.scaled > 0), ratio, 1).astype(dtype))


def _check_order(min_value: Any, max_value: Any, where: str) -> None:
  """Raises when both bounds are known numbers and ``min > max``.

  Trees of bounds are compared leaf by leaf where one is a prefix of the
  other; a number is compared with every leaf of the other bound.
  """
  def known(v):
    return (not callable(v) and isinstance(v, (int, float, np.number,
                                               np.ndarray, jax.Array))
            and _validate.is_concrete(v))

  pairs: list[tuple[Any, Any, str]] = []
  if _validate.is_tree_threshold(min_value) or _validate.is_tree_threshold(
      max_value):
    if not _validate.is_tree_threshold(max_value):
      pairs = [(v, max_value, jax.tree_util.keystr(k)) for k, v in
               jax.tree_util.tree_leaves_with_path(min_value)]
    elif not _validate.is_tree_threshold(min_value):
      pairs = [(min_value, v, jax.tree_util.keystr(k)) for k, v in
               jax.tree_util.tree_leaves_with_path(max_value)]
    else:
      try:
        jax.tree_util.tree_map_with_path(
            lambda k, a, b: pairs.append((a, b, jax.tree_util.keystr(k))),
            min_value, max_value)
      except (ValueError, TypeError):
        raise ValueError(
            f"{where}: min_value and max_value must have the same tree"
            " structure (or one of them be a single number).") from None
  else:
    pairs = [(min_value, max_value, "")]
  for lo, hi, path in pairs:
    if known(lo) and known(hi) and float(np.asarray(lo)) > float(
        np.asarray(hi)):
      raise ValueError(
          f"{where}: min_value{path}={float(np.asarray(lo))} is above"
          f" max_value{path}={float(np.asarray(hi))}; swap them.")
