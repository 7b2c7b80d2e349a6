"""Adaptive gradient clipping (AGC): unit-wise, relative to the parameters."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _apply, _norms, _stats, _thresholds, _transform, _tree, _validate
from optaxclip._norms import AxisName
from optaxclip._stats import ClipStats
from optaxclip._thresholds import Threshold
from optaxclip._tree import Axis

_NO_PARAMS = ("adaptive_grad_clip needs params: call update(grads, state,"
              " params).")


@_stats.named("adaptive_grad_clip", unit_norms=True)
class AdaptiveGradClipState(NamedTuple):
  """State of :func:`adaptive_grad_clip`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`: ``norm`` is ``None`` (the rule
      compares ratios, in ``ratio``); ``threshold`` is ``clipping`` in force
      at the last update (a ratio); ``scale`` the smallest factor applied
      at the last update (1 when nothing was clipped); ``clipped`` whether
      any unit was scaled down; ``frac_clipped`` the fraction of units
      scaled down; ``leaf_norms`` (``leaf_norms=True``) per leaf, the
      2-norm of each unit of the last incoming update, before clipping,
      the reduced axes dropped (a scalar for a leaf that is one unit).
    ratio: the largest ratio, over the units of the last incoming update,
      of a unit's update norm to its clipping norm ``max(|w|, eps)``: the
      number compared with ``threshold`` (``inf`` for a nonzero update of a
      unit whose clipping norm is 0).
  """

  stats: ClipStats
  ratio: jax.Array


def adaptive_grad_clip(
    clipping: Threshold, eps: Threshold = 1e-3, axis: Axis = None, *,
    axis_name: AxisName = None, leaf_norms: bool = False,
    layer_axis: Any = None,
) -> optax.GradientTransformation:
  """Clips each unit's update norm to ``clipping`` times its parameters' norm.

  For every unit (an output unit of a dense kernel, an output channel of a
  convolution, a whole bias vector), the update ``g`` and the parameters
  ``w`` of that unit give ``g * min(1, clipping * max(|w|, eps) / |g|)``,
  with 2-norms accumulated in float32. The units are those of
  ``optax.adaptive_grad_clip``: with ``axis=None``, a scalar or vector (or
  any leaf with one non-trivial dimension) is one unit; a 2-D ``(in, out)``
  kernel or 3-D multi-head kernel is reduced over axis 0; a 4-D ``HWIO``
  convolution over ``(0, 1, 2)``; a 5-D ``DHWIO`` one over ``(0, 1, 2, 3)``.
  Give ``axis`` (the axes to reduce) for other layouts; it then applies to
  every leaf. The result is ``optax.adaptive_grad_clip``'s, except that
  bfloat16 and float16 norms are accumulated in float32 here rather than in
  their own dtype.

  Edge cases: a unit whose update norm is 0 is unchanged; a unit with zero
  parameters may move up to ``clipping * eps``; a negative or NaN
  ``clipping`` or ``eps`` arriving at run time acts as 0; a NaN update norm
  gives a NaN unit; a NaN parameter zeroes its unit's update, which counts
  as clipped.

  Args:
    clipping: the largest ratio of a unit's update norm to its parameter
      norm: a non-negative number, a JAX scalar or an Optax schedule of the
      step count.
    eps: the smallest parameter norm used, so that zero-initialised units
      (biases) can move: a non-negative number, JAX scalar or schedule.
    axis: ``None`` for the per-shape rules above, or the axes to reduce
      over (keyword-only).
    axis_name: inside ``shard_map``/``pmap``, the mesh axis name (or names)
      over which leaves are split, so that each shard is clipped by the norm
      of its whole unit, for the
      update and the parameters alike. Each leaf's sums are added over the named
      axes it varies over (``shard_map`` records which); replicated leaves
      are not. This is right for a leaf split along the axes its norm
      reduces; a leaf split only along the
      axes that index its units needs no ``axis_name`` for its norms.
    leaf_norms: also keep every unit's update norm in the state, as a tree
      (:class:`AdaptiveGradClipState`); off by default, as a tree output
      per leaf costs compile time.
    layer_axis: for leaves that stack layers (Flax ``nnx.vmap`` /
      ``nnx.scan``), the axis that stacks them: an int for every leaf, or a
      pytree prefix of the updates holding ints and ``None`` (not
      stacked). Each layer's slice is then a tensor of its own: with
      ``axis=None`` the per-shape rules above apply to the slice (a stacked
      ``(layers, in, out)`` kernel has the units of an ``(in, out)`` one, a
      stacked bias is one unit per layer); an ``axis`` counts in the
      stacked leaf and must not name the layer axis (a ValueError).

  Returns:
    An ``optax.GradientTransformation`` whose state is an
    :class:`AdaptiveGradClipState`. Its ``update`` needs ``params``.

  References:
    Brock et al., `High-Performance Large-Scale Image Recognition Without
    Normalization <https://arxiv.org/abs/2102.06171>`_, 2021.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> clip = oc.adaptive_grad_clip(0.1)
    >>> params = {"w": jnp.array([[3.0, 0.0], [4.0, 1.0]])}  # unit norms 5, 1
    >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 0.05]])}  # unit norms 1, 0.05
    >>> state = clip.init(params)
    >>> updates, state = clip.update(grads, state, params)
    >>> print(updates["w"], state.stats.frac_clipped)
    [[0.5  0.  ]
     [0.   0.05]] 0.5
  """
  caller = "adaptive_grad_clip"
  _validate.check_threshold(clipping, "clipping", caller)
  _validate.check_threshold(eps, "eps", caller)
  _validate.check_bool(leaf_norms, "leaf_norms", caller)
  _validate.check_layer_axis(layer_axis, caller)

  def init_fn(params):
    leaves, rebuild, axes = _units(params, axis, layer_axis)
    norms = rebuild([
        jnp.zeros(_tree.kept_shape(x.shape, a), _tree.acc_dtype(x.dtype))
        for (_, x), a in zip(leaves, axes)]) if leaf_norms else None
    dtype = _tree.tree_acc_dtype(params)
    count = jnp.zeros((), jnp.int32)
    return AdaptiveGradClipState(
        _stats.fresh(dtype, norm=False, frac=True,
                     threshold=_thresholds.resolve(
                         clipping, count, dtype,
                         name="adaptive_grad_clip: clipping"),
                     leaf_norms=norms),
        ratio=jnp.zeros((), dtype))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_NO_PARAMS)
    leaves, rebuild, axes = _units(updates, axis, layer_axis)
    p_leaves = _param_leaves(updates, params, leaves)
    g_leaves = [g for _, g in leaves]
    groups, g_norms = _norms.grouped_leaf_norms(g_leaves, 2.0, axes,
                                                axis_name=axis_name)
    _, p_norms = _norms.grouped_leaf_norms(list(p_leaves), 2.0, axes, groups,
                                           axis_name=axis_name)
    dtype = _tree.tree_acc_dtype(updates)
    count = state.stats.count
    c = _thresholds.resolve(clipping, count, dtype,
                            name="adaptive_grad_clip: clipping")
    e = _thresholds.resolve(eps, count, dtype, name="adaptive_grad_clip: eps")
    floors = [jnp.maximum(pn.value().astype(gn.scaled.dtype), e.astype(
        gn.scaled.dtype)) for gn, pn in zip(g_norms, p_norms)]
    # A NaN parameter norm makes a NaN threshold, which acts as 0 (the unit
    # is zeroed): counted as clipped, as it is.
    thresholds = [jnp.where(c * f >= 0, c * f, 0).astype(f.dtype)
                  for f in floors]
    out, values, scales = _apply.apply_grouped(g_leaves, groups, g_norms,
                                                thresholds)
    num_over = sum((jnp.sum(v > t, dtype=jnp.int32)
                    for v, t in zip(values, thresholds)),
                   jnp.zeros((), jnp.int32))
    ratios = [jnp.where(f > 0, v / jnp.where(f > 0, f, 1),
                        jnp.where(v > 0, jnp.inf, v))
              for v, f in zip(values, floors)]
    return rebuild(out), AdaptiveGradClipState(
        _stats.advance(
            state.stats, clipped=num_over > 0, num=num_over,
            of=sum(v.size for v in values), threshold=c,
            scale=_apply.smallest(scales, dtype),
            leaf_norms=rebuild(_apply.ungroup(groups, values, g_leaves, axes))
            if leaf_norms else None),
        ratio=_apply.largest(ratios, dtype))

  return _transform.transformation(init_fn, update_fn)


def _units(tree: Any, axis: Axis, layer_axis: Any
           ) -> tuple[list[tuple[Any, jax.Array]], Any, list[tuple[int, ...]]]:
  """The live leaves, their rebuilder, and the axes each leaf's units span
  (a clear error for a leaf with no units or a bad layer axis)."""
  leaves, rebuild = _tree.live_leaves(tree, "adaptive_grad_clip")
  layers = _thresholds.leaf_layers(layer_axis, tree, "adaptive_grad_clip")
  return leaves, rebuild, [_unit_axes(path, x, axis, k)
                           for (path, x), k in zip(leaves, layers)]


def _param_leaves(updates: Any, params: Any,
                  leaves: list[tuple[Any, jax.Array]]) -> list[jax.Array]:
  """The parameter of each live update leaf, checked to match its shape."""
  caller = "adaptive_grad_clip"
  treedef = jax.tree_util.tree_structure(updates, is_leaf=_tree.is_masked)
  try:
    params_flat = treedef.flatten_up_to(params)  # type: ignore[attr-defined]
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{caller}: params do not have the structure of the updates;"
        " pass the parameters the updates are for.") from e
  p_leaves = [w for w, x in zip(params_flat, treedef.flatten_up_to(updates))  # type: ignore[attr-defined]
              if not _tree.is_masked(x)]
  for (path, g), w in zip(leaves, p_leaves):
    if jnp.shape(g) != jnp.shape(w):
      raise ValueError(
          f"{caller}: the update at {jax.tree_util.keystr(path) or 'root'}"
          f" has shape {jnp.shape(g)} but its parameter has shape"
          f" {jnp.shape(w)}.")
  return p_leaves


def _unit_axes(path: Any, x: jax.Array, axis: Axis,
               layer: int | None = None) -> tuple[int, ...]:
  """The axes a unit spans: ``axis`` if given, else optax's per-shape rule
  (applied to each layer's slice of a leaf stacked along ``layer``)."""
  if axis is not None:
    if isinstance(axis, (jax.Array, np.ndarray)):
      if not _validate.is_concrete(axis):
        raise TypeError(
            "adaptive_grad_clip: axis must be static; with"
            " optax.inject_hyperparams pass static_args=('axis',).")
      axis = tuple(int(a) for a in np.atleast_1d(np.asarray(axis)))
    return _tree.leaf_axes(path, x, axis, layer)
  shape = list(jnp.shape(x))
  if layer is not None:
    del shape[layer]  # The rule reads one layer's slice.
  ndim = len(shape)
  if sum(d != 1 for d in shape) <= 1:
    slice_axes = tuple(range(ndim))
  elif ndim in (2, 3):
    slice_axes = (0,)
  elif ndim in (4, 5):
    slice_axes = tuple(range(ndim - 1))
  else:
    slice_axes = None
  if slice_axes is not None:
    return tuple(a + int(layer is not None and a >= layer)
                 for a in slice_axes)
  raise ValueError(
      f"adaptive_grad_clip: no default units for the leaf at"
      f" {jax.tree_util.keystr(path) or 'root'} of shape {jnp.shape(x)}"
      + ("" if layer is None else f" (layer axis {layer})") + "; pass axis="
      " (the axes one unit spans) or clip that leaf with another"
      " transformation (optax.multi_transform).")
