"""ZClip: z-score clipping against an EMA of the norm's mean and variance."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _apply, _norms, _stats, _thresholds, _transform, _tree, _validate
from optaxclip._norms import AxisName, Ord
from optaxclip._thresholds import Threshold

_MODES = ("adaptive", "mean", "percentile")


class ZClipState(NamedTuple):
  """State of :func:`zclip`.

  Attributes:
    count: updates seen so far (int32).
    grad_norm: the global norm of the last incoming update, before clipping.
    threshold: the threshold in force at the last update: ``max_norm`` (or
      ``inf``) during warm-up; afterwards the clipping value on a spike, and
      otherwise the spike boundary ``mean + z_thresh * (std + eps)``
      (``mean + z_thresh * std`` in ``"percentile"`` mode), capped by
      ``max_norm``. The update is clipped exactly when ``grad_norm`` exceeds
      it.
    scale: the factor the last update was multiplied by.
    clipped: whether the last update was scaled down.
    num_clipped: how many updates have been scaled down so far.
    spike: whether the last update was a spike (its z-score above
      ``z_thresh``; never during warm-up).
    z: the z-score of the last norm, ``(norm - mean) / (std + eps)``, against
      the statistics before that update (0 during warm-up).
    mean: the EMA of the norm (after the last update).
    var: the EMA of the norm's variance (after the last update).
    warmup_norms: the norms collected during warm-up, shape
      ``(warmup_steps,)``.
    fill: how many warm-up norms are collected; the EMA is in use once it
      equals ``warmup_steps``.
    leaf_norms: (``leaf_norms=True``) each leaf's norm of the last incoming
      update, a tree like the updates, from the same partial sums as
      ``grad_norm``; ``None`` otherwise.
  """

  count: jax.Array
  grad_norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped: jax.Array
  num_clipped: jax.Array
  spike: jax.Array
  z: jax.Array
  mean: jax.Array
  var: jax.Array
  warmup_norms: jax.Array
  fill: jax.Array
  leaf_norms: Any = None


def zclip(
    alpha: Threshold = 0.97,
    z_thresh: Threshold = 2.5,
    warmup_steps: int = 25,
    *,
    max_norm: Threshold | None = None,
    mode: Literal["adaptive", "mean", "percentile"] = "adaptive",
    skip_update_on_spike: bool = False,
    eps: float = 1e-6,
    std_floor: float = 0.01,
    ord: Ord = 2,
    axis_name: AxisName = None,
    leaf_norms: bool = False,
    layer_axis: Any = None,
) -> optax.GradientTransformation:
  """ZClip: clips norm spikes detected by a z-score against EMA statistics.

  The global norm ``g`` of each update is compared with exponential moving
  averages of its mean ``mu`` and variance ``var``:

  1. Warm-up: the first ``warmup_steps`` norms are collected (the update is
     only clipped to ``max_norm``, if given); after the last of them,
     ``mu`` and ``var`` start as their mean and (population) variance.
  2. Then, with ``std = sqrt(var)`` and ``z = (g - mu) / (std + eps)``, a
     step with ``z > z_thresh`` is a spike and its norm is clipped to
     ``mu + z_thresh * std / (z / z_thresh)`` (``mode="adaptive"``: the
     larger the spike, the harder the clip) or to ``mu`` (``mode="mean"``).
     ``mode="percentile"`` clips any norm above ``mu + z_thresh * std`` to
     that value.
  3. ``max_norm``, if given, caps the threshold at every step.
  4. The statistics are updated with the norm after the z-score clip (the
     clipping value on a spike, ``g`` otherwise; the ``max_norm`` cap is
     not applied to it): ``mu <- alpha * mu + (1 - alpha) * v``, then
     ``var <- alpha * var + (1 - alpha) * (v - mu) ** 2`` with the new
     ``mu``. With ``skip_update_on_spike=True`` a spike leaves them as they
     were.

  This is the algorithm of the paper and its reference implementation,
  computed in float32 (float64 for float64 updates) on the device, with no
  host round-trip and a fixed-size state. Differences: the scale is
  ``min(1, threshold / g)`` rather than ``threshold / (g + 1e-6)``; and a
  non-finite norm (a NaN, or an Inf during warm-up) is not folded into the
  statistics, which would otherwise stay NaN for the rest of training. That
  step's update still carries its NaN or Inf unless it is dropped, e.g. by
  :func:`optaxclip.skip_step`.

  Args:
    alpha: the EMA decay in ``(0, 1)``: a number, JAX scalar or Optax
      schedule of the step count.
    z_thresh: the z-score above which a norm is a spike, >= 0 (number, JAX
      scalar or schedule).
    warmup_steps: how many norms to collect before the EMA starts, >= 1.
    max_norm: an optional fixed cap on the norm, applied at every step
      (warm-up included): a non-negative number, JAX scalar or schedule.
    mode: ``"adaptive"`` (the paper's default), ``"mean"`` or
      ``"percentile"``, as described above.
    skip_update_on_spike: leave the statistics unchanged on a spike.
    eps: added to ``std`` in the z-score's denominator, >= 0.
    std_floor: the smallest ``std`` used, as a fraction of the mean, >= 0.
      The z-score measures a norm against the run's own scatter; where the
      recorded norms barely vary (a repeated batch, a plateau), ``std``
      tends to 0 and a rise of 0.1% would read as a spike of z in the
      thousands. The paper's rule assumes the scatter of real training
      (its norms vary by several percent step to step); the floor keeps
      that assumption: with the default 0.01 and ``z_thresh=2.5``, a norm
      must exceed the mean by at least 2.5% to count as a spike. 0 gives
      the reference code's rule.
    ord: the norm: ``1``, ``2``, ``inf``, any ``p > 0``, or ``"rms"``.
    axis_name: inside ``shard_map``/``pmap`` with sharded updates, the axis
      name (or names) to reduce the norm over.
    leaf_norms: also keep each leaf's norm in the state, as
      :func:`clip_by_global_norm` does (no extra pass).
    layer_axis: for leaves that stack layers (Flax ``nnx.vmap`` /
      ``nnx.scan``), the axis that stacks them (an int, or a pytree prefix
      of the updates holding ints and ``None``): a stacked leaf's
      ``leaf_norms`` entry is then one norm per layer, shape
      ``(num_layers,)``, as for
      :func:`optaxclip.clip_by_global_norm`.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ZClipState`.

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> clip = oc.zclip(warmup_steps=4)
    >>> state = clip.init(jnp.zeros(1))
    >>> for g in [1.0, 1.2, 0.8, 1.0, 1.1, 5.0]:
    ...   updates, state = clip.update(jnp.array([g]), state)
    >>> print(updates, state.spike, state.threshold)
    [1.0338] True 1.0338
  """
  _check(alpha, z_thresh, warmup_steps, max_norm, mode, eps, leaf_norms)
  _validate.check_range(std_floor, "std_floor", "zclip", lo=0.0, hi=np.inf,
                        schedule=False)
  _validate.check_layer_axis(layer_axis, "zclip")
  p = _validate.canonical_ord(ord)

  def init_fn(params):
    dtype = _tree.tree_acc_dtype(params)
    size = _validate.static_size(warmup_steps, "warmup_steps", "zclip")
    zero = jnp.zeros((), dtype)
    return ZClipState(
        **_stats.counters(), grad_norm=zero,
        threshold=jnp.full((), jnp.inf, dtype), scale=jnp.ones((), dtype),
        spike=jnp.zeros((), bool), z=zero, mean=zero, var=zero,
        warmup_norms=jnp.zeros((size,), dtype),
        fill=jnp.zeros((), jnp.int32),
        leaf_norms=_norms.zero_leaf_norms(params, layer_axis, "zclip")
        if leaf_norms else None)

  def update_fn(updates, state, params=None):
    del params
    dtype = state.grad_norm.dtype
    parts, each = _norms.global_and_leaf_norms(
        updates, p, axis_name=axis_name, leaves=leaf_norms,
        layer_axis=layer_axis, where="zclip")
    g = parts.value().astype(dtype)
    a = _thresholds.resolve(alpha, state.count, dtype, hi=1.0)
    zt = _thresholds.resolve(z_thresh, state.count, dtype)

    cap = (None if max_norm is None else
           _thresholds.resolve(max_norm, state.count, dtype))
    threshold, new = _statistics(state, g, a, zt, cap, mode=mode, eps=eps,
                                 std_floor=std_floor,
                                 skip_on_spike=skip_update_on_spike)
    over = g > threshold
    updates, scale = _apply.clip_tree(updates, parts, threshold)

    return updates, state._replace(
        **new, **_stats.tally(state, over), grad_norm=g, threshold=threshold,
        scale=scale.value().astype(dtype), leaf_norms=each)

  return _transform.transformation(init_fn, update_fn)


def _statistics(state, g, a, zt, cap, *, mode, eps, std_floor, skip_on_spike):
  """The threshold in force, and the new warm-up and EMA fields."""
  dtype = state.grad_norm.dtype
  size = state.warmup_norms.shape[0]  # Static even when injected.
  # Warm-up: collect the norm; after the last one, start the statistics.
  warm = state.fill < size
  keep = warm & jnp.isfinite(g)
  slot = jnp.minimum(state.fill, size - 1)
  buf = jnp.where(keep, state.warmup_norms.at[slot].set(g),
                  state.warmup_norms)
  fill = state.fill + keep.astype(jnp.int32)
  mean0 = jnp.mean(buf)
  var0 = jnp.mean(jnp.square(buf - mean0))
  start = keep & (fill == size)

  # After warm-up: z-score against the statistics so far.
  std = jnp.maximum(jnp.sqrt(state.var), std_floor * state.mean)
  z = (g - state.mean) / (std + eps)
  if mode == "percentile":
    boundary = state.mean + zt * std
    clip_value = boundary
  else:
    boundary = state.mean + zt * (std + eps)
    clip_value = (state.mean + zt * std / (z / zt) if mode == "adaptive"
                  else state.mean)
  spike = ~warm & (g > boundary)
  threshold = jnp.where(warm, jnp.inf,
                        jnp.where(spike, clip_value, boundary))
  if cap is not None:
    threshold = jnp.minimum(threshold, cap)
  threshold = threshold.astype(dtype)

  v = jnp.where(spike, clip_value, g)
  track = ~warm & jnp.isfinite(v)
  if skip_on_spike:
    track &= ~spike
  mean1 = a * state.mean + (1 - a) * v
  var1 = a * state.var + (1 - a) * jnp.square(v - mean1)
  mean = jnp.where(track, mean1, jnp.where(start, mean0, state.mean))
  var = jnp.where(track, var1, jnp.where(start, var0, state.var))
  return threshold, dict(
      spike=spike, z=jnp.where(warm, 0, z).astype(dtype),
      mean=mean.astype(dtype), var=var.astype(dtype), warmup_norms=buf,
      fill=fill)


def _check(alpha, z_thresh, warmup_steps, max_norm, mode, eps, leaf_norms):
  where = "zclip"
  _validate.check_bool(leaf_norms, "leaf_norms", where)
  _validate.check_range(alpha, "alpha", where, lo=0.0, hi=1.0, open_lo=True,
              open_hi=True)
  _validate.check_range(z_thresh, "z_thresh", where, lo=0.0, hi=np.inf)
  _validate.check_int(warmup_steps, "warmup_steps", where, lo=1)
  if max_norm is not None:
    _validate.check_threshold(max_norm, "max_norm", where)
  _validate.check_range(eps, "eps", where, lo=0.0, hi=np.inf, schedule=False)
  if mode not in _MODES:
    raise ValueError(f"{where}: mode={mode!r} is not one of {_MODES}.")
