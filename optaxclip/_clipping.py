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
from optaxclip._stats import ClipStats
from optaxclip._thresholds import Threshold
from optaxclip._tree import Axis


@_stats.named("clip_by_global_norm")
class ClipByGlobalNormState(NamedTuple):
  """State of :func:`clip_by_global_norm`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`: ``norm`` is the global norm of
      the last incoming update, ``scale`` the factor ``min(1, t / norm)``
      (applied to the leaves ``mask`` selects), ``leaf_norms``
      (``leaf_norms=True``) each leaf's norm, from the same partial sums
      as ``norm`` (see :func:`optaxclip.global_norm`).
  """

  stats: ClipStats


@_stats.named("clip_by_norm", unit_norms=True)
class ClipByNormState(NamedTuple):
  """State of :func:`clip_by_norm`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`: ``norm`` is the largest leaf
      (or unit) norm of the last incoming update, the norm the threshold
      was compared with; ``threshold`` a tree of scalars when ``max_norm``
      is a tree; ``scale`` the smallest factor applied; ``frac_clipped``
      the fraction of leaves (or units) scaled down; ``leaf_norms``
      (``leaf_norms=True``) per leaf, the norm (per unit when ``axis`` is
      given, reduced axes dropped).
  """

  stats: ClipStats


@_stats.named("clip_by_value")
class ClipByValueState(NamedTuple):
  """State of :func:`clip_by_value`.

  Value clipping needs no reduction, so by default its record keeps only
  what is free (``count`` and ``threshold``); ``full_stats=True`` adds the
  rest, at the cost of reading the update again (see the benchmarks).

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`: ``threshold`` is ``max_value``
      in force at the last update (a scalar, or a tree of scalars when
      ``max_value`` is a tree). With ``full_stats=True`` also ``norm``, the
      global 2-norm of the last incoming update; ``scale``,
      ``norm(clipped update) / norm``, the factor by which clipping shrank
      the update as a whole (1 when nothing was clipped or the update is
      zero); ``clipped``, whether any element was changed (a NaN element
      counts as changed); ``frac_clipped``, the fraction of elements
      changed; and ``num_clipped``.
  """

  stats: ClipStats


@_validate.renamed(where="mask")
def clip_by_global_norm(
    max_norm: Threshold, *, ord: Ord = 2, axis_name: AxisName = None,
    leaf_norms: bool = False, mask: Any = None, layer_axis: Any = None,
    reproducible: bool = False,
) -> optax.GradientTransformationExtraArgs:
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

  With ``mask``, the norm is still that of *all* leaves (and is what the
  state records), but only the chosen leaves are multiplied by the factor;
  the others come back bit for bit. This is the clip to put before an
  optimizer that handles some leaves by orthogonalising them
  (``optax.contrib.muon``): its matrix leaves ignore their input's scale,
  so only the others (Adam's) are scaled; see the guide :doc:`/which_clipper`.
  ``mask=False`` (or a tree of ``False``) scales nothing and only records.

  A norm computed elsewhere (by pipeline stages that run as separate
  programs, by an engine that already has it) is passed as
  ``update(updates, state, params, global_norm=norm)``, also through
  ``optax.chain``: a :class:`optaxclip.NormParts` of the same ``ord``
  (:func:`optaxclip.norm_parts`, merged across the programs) gives the
  updates and state of ``reproducible=True`` bit for bit; a number is taken
  as the norm (as :func:`optaxclip.global_norm` returns it, the same bits
  wherever that norm is finite). It must be the norm of the ``updates``
  this transformation receives; ``leaf_norms`` are still computed here.

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
    mask: which leaves the factor is applied to (as ``optax.masked``'s
      ``mask``): ``None`` (all), a pytree
      prefix of the updates holding ``True`` or ``False`` (each value
      covering its subtree), or a function of the updates returning one, as
      optax's masks take (e.g. ``lambda u: jax.tree.map(lambda x: x.ndim !=
      2, u)``: all but the matrices). The leaves of the tree are Python or
      NumPy bools, known when tracing.
    layer_axis: for leaves that stack layers (Flax ``nnx.vmap`` /
      ``nnx.scan``), the axis that stacks them: an int for every leaf, or a
      pytree prefix of the updates holding ints and ``None`` (not
      stacked), e.g. ``{"blocks": 0, "head": None}``
      (:func:`optaxclip.layer_axes` reads it off a Flax NNX model). A
      stacked leaf's ``leaf_norms`` entry is then one norm per layer,
      shape ``(num_layers,)``. The clip itself is global either way.
    reproducible: accumulate the norm exactly, in integers
      (:func:`optaxclip.norm_parts`): the same norm, and so the same clip,
      bit for bit, on every mesh, sharding and pipeline split, at the cost
      of a second pass over the update (see ``docs/sharding.md``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
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
    >>> print(updates["w"], state.stats.norm, state.stats.clipped)
    [0.6 0.8] 5.0 True
    >>> clip = oc.clip_by_global_norm(1.0, mask={"w": False, "b": True})
    >>> grads = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
    >>> updates, state = clip.update(grads, clip.init(grads))
    >>> print(updates["w"], updates["b"], state.stats.norm)
    [3. 0.] [0.8] 5.0
  """
  caller = "clip_by_global_norm"
  _validate.check_threshold(max_norm, "max_norm", caller)
  _validate.check_bool(leaf_norms, "leaf_norms", caller)
  _validate.check_mask(mask, caller)
  _validate.check_layer_axis(layer_axis, caller)
  _validate.check_bool(reproducible, "reproducible", caller)
  p = _validate.canonical_ord(ord)
  if reproducible and isinstance(p, jax.Array):
    raise TypeError(f"{caller}: reproducible=True needs an ord known when"
                    " tracing, not one injected as an array.")

  def init_fn(params):
    dtype = _tree.tree_acc_dtype(params)
    return ClipByGlobalNormState(_stats.fresh(
        dtype, threshold=_thresholds.resolve(
            max_norm, jnp.zeros((), jnp.int32), dtype),
        leaf_norms=_norms.zero_leaf_norms(params, layer_axis, caller)
        if leaf_norms else None))

  def update_fn(updates, state, params=None, *, global_norm=None, **extra):
    del params, extra
    stats = state.stats
    dtype = stats.norm.dtype
    norm, each = global_norm_of(updates, global_norm, dtype)
    threshold = _thresholds.resolve(max_norm, stats.count, dtype)
    updates, scale = _clip_masked(updates, norm, threshold, mask, caller)
    value = norm.value().astype(dtype)
    return updates, ClipByGlobalNormState(_stats.advance(
        stats, clipped=value > threshold, norm=value, threshold=threshold,
        scale=scale.value().astype(dtype), leaf_norms=each))

  def global_norm_of(updates, supplied, dtype):
    norm, each = None, None
    if leaf_norms or (supplied is None and not reproducible):
      norm, each = _norms.global_and_leaf_norms(
          updates, p, axis_name=axis_name, leaves=leaf_norms,
          layer_axis=layer_axis, caller=caller)
    if supplied is None and reproducible:
      supplied = _norms.norm_parts(updates, ord=p, axis_name=axis_name)
    if supplied is not None:
      norm = _norms.supplied_norm(supplied, p, dtype, caller)
    return norm, each

  return _transform.transformation(init_fn, update_fn, extra_args=True)


def _clip_masked(updates: Any, norm: Any, threshold: jax.Array, mask: Any,
                 caller: str) -> tuple[Any, Scale]:
  """The leaves ``mask`` selects times ``min(1, threshold / norm)``."""
  if mask is None:
    return _apply.clip_tree(updates, norm, threshold)
  if callable(mask):
    mask = mask(updates)
    if mask is None or callable(mask):
      raise TypeError(f"{caller}: the mask function returned {mask!r};"
                      " it must return a tree of True/False.")
    _validate.check_mask(mask, caller)
  try:
    full = _thresholds.broadcast_prefix(mask, updates, "mask", caller)
  except ValueError as e:
    raise ValueError(
        f"{caller}: the mask tree is not a prefix of the updates; give the"
        " updates' containers and keys with True or False where a whole"
        f" subtree is or is not scaled. {e.__cause__}") from e
  scale = clip_factors(norm, threshold)
  return _tree.map_arrays(lambda g, m: scale_leaf(g, scale) if m else g,
                          updates, full), scale


def clip_by_norm(
    max_norm: Any, *, ord: Ord = 2, axis: Axis = None,
    axis_name: AxisName = None, leaf_norms: bool = False,
    layer_axis: Any = None,
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
    layer_axis: for leaves that stack layers (Flax ``nnx.vmap`` /
      ``nnx.scan``), the axis that stacks them: an int for every leaf, or a
      pytree prefix of the updates holding ints and ``None`` (not
      stacked). Each layer's slice of a stacked leaf is then clipped as a
      tensor of its own, by its own norm, and its ``leaf_norms`` entry has
      shape ``(num_layers,)``. ``axis`` counts in the stacked leaf and
      must not name the layer axis (a ValueError); with ``axis`` the units
      are those of each layer, and ``leaf_norms`` keeps the layer axis
      among the unit axes.

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
    >>> print(updates["a"], updates["b"], state.stats.frac_clipped)
    [0.6 0.8] [0.5] 0.5
  """
  caller = "clip_by_norm"
  _validate.check_threshold(max_norm, "max_norm", caller, allow_tree=True)
  _validate.check_bool(leaf_norms, "leaf_norms", caller)
  _validate.check_layer_axis(layer_axis, caller)
  p = _validate.canonical_ord(ord)

  def record(per_leaf, count, dtype):
    """The threshold to keep: the per-leaf tree only for a tree max_norm."""
    if _validate.is_tree_threshold(max_norm):
      return per_leaf
    return _thresholds.resolve(max_norm, count, dtype)

  def init_fn(params):
    leaves, rebuild, axes = _reduced(params, axis, layer_axis)
    dtype = _tree.tree_acc_dtype(params)
    count = jnp.zeros((), jnp.int32)
    norms = rebuild([
        jnp.zeros(_tree.kept_shape(x.shape, a), _tree.acc_dtype(x.dtype))
        for (_, x), a in zip(leaves, axes)]) if leaf_norms else None
    return ClipByNormState(_stats.fresh(
        dtype, frac=True, threshold=record(_thresholds.leaf_thresholds(
            max_norm, params, count, "max_norm", caller), count, dtype),
        leaf_norms=norms))

  def update_fn(updates, state, params=None):
    del params
    leaves, rebuild, axes = _reduced(updates, axis, layer_axis)
    xs = [x for _, x in leaves]
    groups, norms = _norms.grouped_leaf_norms(xs, p, axes,
                                              axis_name=axis_name)
    stats = state.stats
    thresholds = _thresholds.leaf_thresholds(max_norm, updates, stats.count,
                                             "max_norm", caller)
    t_leaves = _tree.float_leaves(thresholds, caller)
    t_groups = [_apply.stack_scalars([t_leaves[i] for i in g], n.scaled.ndim)
                for g, n in zip(groups, norms)]
    out, values, scales = _apply.apply_grouped(xs, groups, norms, t_groups)
    num_over = sum((jnp.sum(v > t, dtype=jnp.int32)
                    for v, t in zip(values, t_groups)),
                   jnp.zeros((), jnp.int32))
    dtype = stats.norm.dtype
    return rebuild(out), ClipByNormState(_stats.advance(
        stats, clipped=num_over > 0, num=num_over,
        of=sum(v.size for v in values), norm=_apply.largest(values, dtype),
        threshold=record(thresholds, stats.count, dtype),
        scale=_apply.smallest(scales, dtype),
        leaf_norms=rebuild(_apply.ungroup(groups, values, xs, axes))
        if leaf_norms else None))

  return _transform.transformation(init_fn, update_fn)


@_validate.renamed(stats="full_stats")
def clip_by_value(
    max_value: Any, *, min_value: Any = None, full_stats: bool = False
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
    full_stats: also record the pre-clip norm, the fraction of elements
      changed and the norm ratio (:class:`ClipByValueState`). This reads the update
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
    >>> clip = oc.clip_by_value(1.0, full_stats=True)
    >>> grads = jnp.array([-3.0, 0.5, 2.0])
    >>> state = clip.init(grads)
    >>> updates, state = clip.update(grads, state)
    >>> print(updates, state.stats.frac_clipped)
    [-1.   0.5  1. ] 0.6666667
  """
  caller = "clip_by_value"
  symmetric = min_value is None
  _validate.check_threshold(max_value, "max_value", caller, allow_tree=True,
                          allow_negative=not symmetric)
  if not symmetric:
    _validate.check_threshold(min_value, "min_value", caller, allow_tree=True,
                            allow_negative=True)
    _check_order(min_value, max_value, caller)
  _validate.check_bool(full_stats, "full_stats", caller)
  tree_valued = _validate.is_tree_threshold(max_value)

  def bound(value, updates, count, name):
    if symmetric:
      return _thresholds.leaf_thresholds(value, updates, count, name, caller)
    return _thresholds.leaf_thresholds(value, updates, count, name, caller,
                                   lo=-math.inf, nan=0.0)

  def record(hi, updates, count, dtype):
    if tree_valued:
      return hi
    if symmetric:
      return _thresholds.resolve(max_value, count, dtype)
    return _thresholds.resolve(max_value, count, dtype, lo=-math.inf, nan=0.0)

  def init_fn(params):
    _tree.check_real(params, caller)
    dtype = _tree.tree_acc_dtype(params)
    count = jnp.zeros((), jnp.int32)
    hi = bound(max_value, params, count, "max_value")
    return ClipByValueState(_stats.fresh(
        dtype, norm=full_stats, scale=full_stats, clipped=full_stats,
        frac=full_stats, threshold=record(hi, params, count, dtype)))

  def update_fn(updates, state, params=None):
    del params
    _tree.check_real(updates, caller)
    dtype = _tree.tree_acc_dtype(updates)
    stats = state.stats
    hi = bound(max_value, updates, stats.count, "max_value")
    # jnp.clip gives max_value where a run-time min_value exceeds it.
    lo = (_tree.map_arrays(jnp.negative, hi) if symmetric else
          bound(min_value, updates, stats.count, "min_value"))
    out = _tree.map_arrays(
        lambda g, a, b: jnp.clip(g, a.astype(g.dtype), b.astype(g.dtype)),
        updates, lo, hi)
    threshold = record(hi, updates, stats.count, dtype)
    if not full_stats:
      return out, ClipByValueState(_stats.advance(stats, threshold=threshold))
    return out, ClipByValueState(_stats.advance(
        stats, threshold=threshold, **_value_stats(updates, out, dtype)))

  return _transform.transformation(init_fn, update_fn)


def _reduced(tree: Any, axis: Axis, layer_axis: Any
             ) -> tuple[list[tuple[Any, jax.Array]], Any, list[tuple[int, ...]]]:
  """The live leaves, their rebuilder, and the axes each leaf's norm reduces
  (every axis but its layer axis by default): a clear error for a bad axis
  or layer axis."""
  leaves, rebuild = _tree.live_leaves(tree, "clip_by_norm")
  layers = _thresholds.leaf_layers(layer_axis, tree, "clip_by_norm")
  return leaves, rebuild, [_tree.leaf_axes(path, x, axis, k)
                           for (path, x), k in zip(leaves, layers)]


def _value_stats(updates: Any, out: Any, dtype: Any) -> dict[str, Any]:
  """``clip_by_value(full_stats=True)``'s fields: the norm before, the norm
  ratio after, and the counts of changed elements."""
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
      clipped=clipped, num=changed, of=sum(x.size for x in leaves),
      norm=before.value().astype(dtype),
      scale=jnp.where(clipped & (before.scaled > 0), ratio, 1).astype(dtype))


def _check_order(min_value: Any, max_value: Any, caller: str) -> None:
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
            f"{caller}: min_value and max_value must have the same tree"
            " structure (or one of them be a single number).") from None
  else:
    pairs = [(min_value, max_value, "")]
  for lo, hi, path in pairs:
    if known(lo) and known(hi) and float(np.asarray(lo)) > float(
        np.asarray(hi)):
      raise ValueError(
          f"{caller}: min_value{path}={float(np.asarray(lo))} is above"
          f" max_value{path}={float(np.asarray(hi))}; swap them.")
