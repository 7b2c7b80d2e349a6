"""The step guard: skip a bad step without touching the optimizer's state."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _common, _norms
from optaxclip._common import Threshold
from optaxclip._norms import AxisName, Ord


class SkipStepStats(NamedTuple):
  """What :func:`skip_step` saw and did; the first field of its state.

  Attributes:
    count: steps seen so far, skipped ones included (int32).
    grad_norm: the global norm of the last incoming update.
    threshold: the norm above which the last step would have been skipped:
      the smaller of ``max_norm`` and ``spike_factor * norm_ema`` (``inf``
      when neither rule was in force).
    skipped: whether the last step was skipped.
    num_skipped: how many steps have been skipped so far.
    norm_ema: the bias-corrected exponential moving average of the norms of
      the steps taken (0 before the first one); the spike rule's baseline.
  """

  count: jax.Array
  grad_norm: jax.Array
  threshold: jax.Array
  skipped: jax.Array
  num_skipped: jax.Array
  norm_ema: jax.Array


class SkipStepState(NamedTuple):
  """State of :func:`skip_step`.

  Attributes:
    stats: a :class:`SkipStepStats`.
    inner_state: the state of the wrapped transformation, as it was after the
      last step that was taken.
  """

  stats: SkipStepStats
  inner_state: Any


def skip_step(
    inner: optax.GradientTransformation,
    *,
    nonfinite: bool = True,
    max_norm: Threshold | None = None,
    spike_factor: float | None = None,
    spike_decay: float = 0.99,
    spike_warmup: int = 20,
    ord: Ord = 2,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips bad steps: zero update, and the wrapped state left as it was.

  Wrap the whole optimizer, e.g. ``skip_step(chain(clipper, adamw))``. Each
  step, the global norm of the incoming gradients is computed once
  (:func:`optaxclip.global_norm`: float32-accumulated and overflow-safe, so a
  finite gradient has a finite norm unless that norm exceeds the float32
  range). The step is skipped when

  - ``nonfinite`` and the norm is NaN or infinite (the gradients hold a NaN or
    an Inf);
  - the norm exceeds ``max_norm``;
  - ``spike_factor`` is given, at least ``spike_warmup`` steps have been
    taken, and the norm exceeds ``spike_factor`` times the moving average of
    the norms of the steps taken (a loss spike).

  A skipped step emits an update of zeros (each leaf's dtype kept) and
  returns the wrapped transformation's state unchanged: Adam's moments and
  count, a schedule's step, every clipper's statistics stay exactly as they
  were. A run with a bad batch at step ``k`` thus gives, bit for bit, the same
  parameters and optimizer state as a run in which batch ``k`` never came.
  The zeros are negative zeros, so that ``params + update`` reproduces every
  parameter bit for bit, signed zeros included.

  The wrapped update is computed every step and its result selected away on a
  skipped step, with no branch. Under ``jax.jit``, XLA merges the norm
  computed here with the identical one of an inner
  :func:`optaxclip.clip_by_global_norm` (same ``ord``, same ``axis_name``),
  so the guard adds no pass over the gradients to find the norm.

  Args:
    inner: the transformation to guard; extra keyword arguments of a
      ``GradientTransformationExtraArgs`` (e.g. ``value`` for
      ``optax.contrib.reduce_on_plateau``) are passed through.
    nonfinite: skip steps whose gradients hold a NaN or an Inf.
    max_norm: skip steps whose norm exceeds this: a non-negative number, a
      JAX scalar, or an Optax schedule of the step count. ``None`` for no
      limit.
    spike_factor: skip steps whose norm exceeds this multiple (> 0) of the
      moving average of the accepted norms. ``None`` disables the rule.
    spike_decay: the decay of that moving average, in ``[0, 1)``; it is
      bias-corrected (as Adam's moments are), so it tracks the mean of the
      norms from the first step taken.
    spike_warmup: how many steps must have been taken before the spike rule
      applies (at least 1).
    ord: the norm: ``1``, ``2``, ``inf``, any ``p > 0``, or ``"rms"``.
    axis_name: inside ``shard_map``/``pmap`` with sharded updates, the axis
      name (or tuple of names) to reduce the norm over, so that every device
      takes the same decision.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SkipStepState`.

  References:
    Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
    <https://arxiv.org/abs/2204.02311>`_, 2022 (skipping batches around loss
    spikes); ``optax.apply_if_finite``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = oc.skip_step(optax.chain(oc.clip_by_global_norm(1.0),
    ...                                optax.adam(0.1)))
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.array([jnp.nan, 1.0])}
    >>> updates, state = opt.update(grads, state, params)
    >>> print(optax.apply_updates(params, updates)["w"], state.stats.skipped)
    [1. 2.] True
    >>> print(oc.clip_stats(state)["skip_step/num_skipped"])
    1
  """
  where = "skip_step"
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f"{where}: inner must be an optax.GradientTransformation (e.g."
        f" optax.chain(clipper, optimizer)), got {type(inner).__name__}.")
  if not isinstance(nonfinite, (bool, np.bool_)):
    raise TypeError(f"{where}: nonfinite must be True or False, got"
                    f" {nonfinite!r}.")
  if max_norm is not None:
    _common.check_threshold(max_norm, "max_norm", where)
  if spike_factor is not None:
    _common.check_range(spike_factor, "spike_factor", where, lo=0.0,
                        hi=math.inf, open_lo=True, schedule=False)
  _common.check_range(spike_decay, "spike_decay", where, lo=0.0, hi=1.0,
                      open_hi=True, schedule=False)
  _common.check_int(spike_warmup, "spike_warmup", where, lo=1)
  if not nonfinite and max_norm is None and spike_factor is None:
    raise ValueError(
        f"{where}: with nonfinite=False, give max_norm or spike_factor;"
        " otherwise no step is ever skipped.")
  p = _norms.canonical_ord(ord)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    dtype = _norms.tree_acc_dtype(params)
    count = jnp.zeros((), jnp.int32)
    stats = SkipStepStats(
        count=count, grad_norm=jnp.zeros((), dtype),
        threshold=(jnp.full((), jnp.inf, dtype) if max_norm is None
                   else _common.resolve(max_norm, count, dtype)),
        skipped=jnp.zeros((), bool), num_skipped=jnp.zeros((), jnp.int32),
        norm_ema=jnp.zeros((), dtype))
    return SkipStepState(stats=stats, inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    stats = state.stats
    dtype = stats.grad_norm.dtype
    norm = _norms.global_norm(updates, p, axis_name=axis_name).astype(dtype)
    threshold = jnp.full((), jnp.inf, dtype)
    if max_norm is not None:
      threshold = _common.resolve(max_norm, stats.count, dtype)
    taken = stats.count - stats.num_skipped
    if spike_factor is not None:
      spike = jnp.asarray(spike_factor, dtype) * stats.norm_ema
      threshold = jnp.where(taken >= spike_warmup,
                            jnp.minimum(threshold, spike), threshold)
    skip = norm > threshold
    if nonfinite:
      skip |= ~jnp.isfinite(norm)

    new_updates, new_inner = inner.update(updates, state.inner_state, params,
                                          **extra_args)
    new_updates = _common.tree_map_arrays(
        lambda u: jnp.where(skip, jnp.negative(jnp.zeros_like(u)), u),
        new_updates)
    new_inner = jax.tree_util.tree_map(
        lambda old, new: jnp.where(skip, old, new), state.inner_state,
        new_inner)

    # The moving average of the norms of the steps taken, bias-corrected:
    # after n such steps it weighs them as Adam's corrected moment does.
    decay = jnp.asarray(spike_decay, dtype)
    n = (taken + 1).astype(dtype)
    weight = (1 - decay) / -jnp.expm1(n * jnp.log(decay))
    ema = stats.norm_ema + weight * (norm - stats.norm_ema)
    use = ~skip & jnp.isfinite(norm)
    new_stats = SkipStepStats(
        count=_common.increment(stats.count), grad_norm=norm,
        threshold=threshold, skipped=skip,
        num_skipped=stats.num_skipped + skip.astype(jnp.int32),
        norm_ema=jnp.where(use, ema, stats.norm_ema))
    return new_updates, SkipStepState(stats=new_stats, inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
