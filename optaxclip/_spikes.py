"""Coordinate-wise spike clipping against a second-moment estimate (SPAM)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _norms, _stats, _thresholds, _transform, _tree, _validate
from optaxclip._thresholds import Threshold


class SpikeStats(NamedTuple):
  """What :func:`clip_spikes` saw and did at the last update.

  There is no ``threshold`` or ``scale`` field: both are per element
  (``sqrt(theta * v)`` and its ratio to ``|g|``), and keeping them would cost
  a buffer the size of the parameters.

  Attributes:
    count: updates seen so far (int32).
    grad_norm: the global 2-norm of the last incoming update, before clipping.
    clipped: whether any element of the last update was clipped.
    num_clipped: how many updates have had an element clipped so far.
    num_spikes: how many elements of the last update were clipped (int32).
    frac_clipped: the fraction of the elements of the last update clipped.
  """

  count: jax.Array
  grad_norm: jax.Array
  clipped: jax.Array
  num_clipped: jax.Array
  num_spikes: jax.Array
  frac_clipped: jax.Array


class ClipSpikesState(NamedTuple):
  """State of the standalone :func:`clip_spikes`.

  Attributes:
    stats: a :class:`SpikeStats`.
    nu: the EMA of the squared clipped updates (like the updates, in float32,
      or float64 for float64 updates).
  """

  stats: SpikeStats
  nu: Any


class SpikeClippedState(NamedTuple):
  """State of :func:`clip_spikes` with ``inner``: no buffer of its own.

  Attributes:
    stats: a :class:`SpikeStats`.
    inner_state: the state of the wrapped optimizer, whose second moment
      ``nu`` is the one the rule reads.
  """

  stats: SpikeStats
  inner_state: Any


def clip_spikes(
    theta: Threshold = 5000.0,
    *,
    beta2: Threshold | None = None,
    inner: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
  r"""SPAM's spike clipping: caps each element against its second moment.

  An element ``g`` of the update whose square exceeds ``theta * v``, where
  ``v`` is that element's second-moment estimate (the exponential moving
  average of its past squares, not bias-corrected, as Adam's ``nu``), is
  replaced by ``sign(g) * sqrt(theta * v)``; every other element passes
  unchanged. ``v`` is the estimate *before* this step, and it is then updated
  with the clipped value, as in SPAM where Adam's moments see the clipped
  gradient.

  Two forms, the same rule:

  - **Standalone** (``inner=None``): keeps its own
    ``v <- beta2 * v + (1 - beta2) * g_clipped ** 2`` (``beta2`` defaults to
    0.999, Adam's). Chain it before any optimizer:
    ``chain(clip_spikes(), sgd(...))``. Memory: one float32 value per
    parameter (float64 for float64 parameters), 4 bytes per parameter.
  - **Wrapper** (``inner=adam(...)``): clips the gradient against the
    second moment ``nu`` that the wrapped optimizer already keeps (the first
    state in it with a ``nu`` field shaped like the updates: ``adam``,
    ``adamw``, ``nadam``, ``rmsprop``'s ``nu``, ... alone or inside
    ``chain``/``inject_hyperparams``), then passes the clipped gradient to
    it. Memory: no buffer of its own, a few scalars of statistics; the rule
    reads ``nu`` before the optimizer updates it, as SPAM does. Use the
    optimizer's ``b2`` as the EMA decay (``beta2`` must be ``None``).

  Deviation from the rule as written: an element whose ``v`` is exactly 0
  passes unclipped. Applied literally, the rule would zero every element of
  the first step (``v = 0`` everywhere) and keep an element whose gradient
  was zero until now (an unused embedding row) at zero for ever, since its
  ``v`` would never grow. A non-finite clipped element leaves its ``v`` as
  it was in the standalone form (the wrapped optimizer's ``nu`` is its own
  business); an infinite element with ``v > 0`` is clipped to a finite
  value; a NaN element passes as NaN.

  Edge cases: ``theta = inf`` clips nothing; ``theta = 0`` zeroes every
  element with ``v > 0``.

  Only the spike clipping of SPAM is here; its periodic momentum reset and
  the warm-up after each reset belong to the optimizer.

  The rule is element-wise, so it needs no ``axis_name`` under ``shard_map``
  or ``pmap``: each device clips its shard exactly as one device would clip
  the whole. Only the statistics (``grad_norm``, ``num_spikes``,
  ``frac_clipped``) are then those of the local shard.

  Args:
    theta: the spike threshold (>= 0) on ``g ** 2 / v``: a number, JAX
      scalar or Optax schedule of the step count. SPAM's default is 5000.
    beta2: the standalone form's EMA decay in ``[0, 1)`` (number, scalar or
      schedule); ``None`` means 0.999. Must be ``None`` with ``inner``.
    inner: an optimizer keeping a second moment ``nu`` (e.g.
      ``optax.adamw(...)``) to wrap; ``None`` for the standalone form.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ClipSpikesState` (standalone) or an
    ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SpikeClippedState` (wrapper).

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> clip = oc.clip_spikes(theta=100.0, beta2=0.9)
    >>> state = clip.init(jnp.zeros(2))
    >>> for g in [[1.0, 1.0], [1.0, 1.0], [1.0, 50.0]]:
    ...   u, state = clip.update(jnp.array(g), state)
    >>> print(u, state.stats.num_spikes)  # sqrt(100 * 0.19) = 4.3589
    [1.     4.3589] 1
    >>> opt = oc.clip_spikes(100.0, inner=optax.adam(1e-3, b2=0.9))
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> for g in [[1.0, 1.0], [1.0, 1.0], [1.0, 50.0]]:
    ...   u, state = opt.update(jnp.array(g), state, params)
    >>> print(state.stats.num_spikes, state.inner_state[0].nu)
    1 [0.271 2.071]
  """
  where = "clip_spikes"
  _validate.check_range(theta, "theta", where, lo=0.0, hi=np.inf)
  if inner is None:
    decay = 0.999 if beta2 is None else beta2
    _validate.check_range(decay, "beta2", where, lo=0.0, hi=1.0, open_hi=True)
    return _standalone(theta, decay)
  if beta2 is not None:
    raise ValueError(
        f"{where}: beta2 is the standalone form's EMA decay; with inner, the"
        " wrapped optimizer's own second moment (and its b2) is used. Leave"
        " beta2=None.")
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f"{where}: inner must be an optax.GradientTransformation keeping a"
        f" second moment (e.g. optax.adamw(...)), got {type(inner).__name__}.")
  return _wrapper(theta, optax.with_extra_args_support(inner))


def _standalone(theta: Threshold, beta2: Threshold
                ) -> optax.GradientTransformation:

  def init_fn(params):
    _tree.check_real(params, "clip_spikes")
    return ClipSpikesState(
        stats=_init_stats(params),
        nu=_tree.map_arrays(
            lambda x: jnp.zeros(jnp.shape(x), _tree.acc_dtype(x.dtype)),
            params))

  def update_fn(updates, state, params=None):
    del params
    count = state.stats.count
    t = _thresholds.resolve(theta, count, state.stats.grad_norm.dtype)
    b = _thresholds.resolve(beta2, count, state.stats.grad_norm.dtype)
    _tree.check_same_tree(updates, state.nu, "clip_spikes", _FIX)
    clipped, stats = _clip(updates, state.nu, t, state.stats)

    def ema(v, c):
      c = c.astype(v.dtype)
      new = b.astype(v.dtype) * v + (1 - b.astype(v.dtype)) * c * c
      return jnp.where(jnp.isfinite(c), new, v)

    nu = _tree.map_arrays(ema, state.nu, clipped)
    return clipped, ClipSpikesState(stats=stats, nu=nu)

  return _transform.transformation(init_fn, update_fn)


def _wrapper(theta: Threshold, inner: optax.GradientTransformationExtraArgs
             ) -> optax.GradientTransformationExtraArgs:

  def init_fn(params):
    _tree.check_real(params, "clip_spikes")
    inner_state = inner.init(params)
    _tree.find_second_moment(inner_state, params, "clip_spikes")  # Fail now.
    return SpikeClippedState(stats=_init_stats(params),
                             inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    t = _thresholds.resolve(theta, state.stats.count,
                        state.stats.grad_norm.dtype)
    nu = _tree.find_second_moment(state.inner_state, updates, "clip_spikes",
                                  changed=_FIX).nu
    _tree.check_same_tree(updates, nu, "clip_spikes", _FIX)
    clipped, stats = _clip(updates, nu, t, state.stats)
    new_updates, inner_state = inner.update(clipped, state.inner_state,
                                            params, **extra_args)
    return new_updates, SpikeClippedState(stats=stats,
                                          inner_state=inner_state)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


_FIX = ("Its second-moment estimates are kept leaf by leaf: call init again"
        " with the new tree (fresh estimates).")


def _init_stats(params: Any) -> SpikeStats:
  dtype = _tree.tree_acc_dtype(params)
  return SpikeStats(**_stats.counters(frac=True),
                    grad_norm=jnp.zeros((), dtype),
                    num_spikes=jnp.zeros((), jnp.int32))


def _clip(updates: Any, nu: Any, theta: jax.Array, stats: SpikeStats
          ) -> tuple[Any, SpikeStats]:
  """Applies the rule leaf by leaf; returns the updates and new statistics."""
  dtype = stats.grad_norm.dtype
  out = _tree.map_arrays(lambda g, v: _clip_leaf(g, v, theta),
                                updates, nu)
  clipped = _tree.map_arrays(lambda _, p: p[0], updates, out)
  counts = jax.tree_util.tree_leaves(
      _tree.map_arrays(lambda _, p: p[1], updates, out))
  spikes = sum(counts, jnp.zeros((), jnp.int32))
  size = sum(x.size for x in _tree.float_leaves(updates, "clip_spikes"))
  return clipped, SpikeStats(
      **_stats.tally(stats, spikes > 0, num=spikes, of=size),
      grad_norm=_norms.global_norm(updates).astype(dtype), num_spikes=spikes)


def _clip_leaf(g: jax.Array, v: jax.Array, theta: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  acc = _tree.acc_dtype(g.dtype)
  ga = g.astype(acc)
  va = v.astype(acc)
  bound = theta.astype(acc) * va
  spike = (va > 0) & (ga * ga > bound)
  out = jnp.where(spike, jnp.copysign(jnp.sqrt(bound), ga), ga)
  return out.astype(g.dtype), jnp.sum(spike, dtype=jnp.int32)
