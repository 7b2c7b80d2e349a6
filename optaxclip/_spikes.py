"""Coordinate-wise spike clipping against a second-moment estimate (SPAM)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _norms, _stats, _thresholds, _transform, _tree, _validate
from optaxclip._stats import ClipStats
from optaxclip._thresholds import Threshold


@_stats.named("clip_spikes")
class ClipSpikesState(NamedTuple):
  """State of :func:`clip_spikes`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`: ``norm`` is the global 2-norm
      of the last incoming update, before clipping; ``clipped`` whether any
      element of it was clipped; ``frac_clipped`` the fraction of its
      elements clipped. ``threshold`` and ``scale`` are ``None``: both are
      per element (``sqrt(max_ratio * v)`` and its ratio to ``|g|``), and
      keeping them would cost a buffer the size of the parameters.
    nu: the EMA of the squared clipped updates (like the updates, in float32,
      or float64 for float64 updates).
    num_spikes: how many elements of the last update were clipped (int32).
  """

  stats: ClipStats
  nu: Any
  num_spikes: jax.Array


@_stats.named("spike_clipped")
class SpikeClippedState(NamedTuple):
  """State of :func:`spike_clipped`: no buffer of its own.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`, as :class:`ClipSpikesState`'s
      (``threshold`` and ``scale`` ``None``: they are per element).
    num_spikes: how many elements of the last update were clipped (int32).
    inner_state: the state of the wrapped optimizer, whose second moment
      ``nu`` is the one the rule reads.
  """

  stats: ClipStats
  num_spikes: jax.Array
  inner_state: Any


@_validate.renamed(
    theta="max_ratio", beta2="decay",
    inner="was removed: the wrapper form is oc.spike_clipped(inner,"
    " max_ratio=...)")
def clip_spikes(
    max_ratio: Threshold = 5000.0,
    *,
    decay: Threshold = 0.999,
) -> optax.GradientTransformation:
  r"""SPAM's spike clipping: caps each element against its second moment.

  An element ``g`` of the update whose square exceeds ``max_ratio * v``,
  where ``v`` is that element's second-moment estimate (the exponential
  moving average of its past squares, not bias-corrected, as Adam's
  ``nu``), is replaced by ``sign(g) * sqrt(max_ratio * v)``; every other
  element passes unchanged. ``v`` is the estimate *before* this step, and
  it is then updated with the clipped value,
  ``v <- decay * v + (1 - decay) * g_clipped ** 2``, as in SPAM where
  Adam's moments see the clipped gradient.

  Chain it before any optimizer: ``chain(clip_spikes(), sgd(...))``.
  Memory: one float32 value per parameter (float64 for float64
  parameters), 4 bytes per parameter. Before an optimizer that keeps its
  own second moment (Adam's ``nu``), :func:`optaxclip.spike_clipped`
  applies the same rule against that one, with no buffer of its own.

  Deviation from the rule as written: an element whose ``v`` is exactly 0
  passes unclipped. Applied literally, the rule would zero every element of
  the first step (``v = 0`` everywhere) and keep an element whose gradient
  was zero until now (an unused embedding row) at zero for ever, since its
  ``v`` would never grow. A non-finite clipped element leaves its ``v`` as
  it was; an infinite element with ``v > 0`` is clipped to a finite value;
  a NaN element passes as NaN.

  Edge cases: ``max_ratio = inf`` clips nothing; ``max_ratio = 0`` zeroes
  every element with ``v > 0``.

  Only the spike clipping of SPAM is here; its periodic momentum reset and
  the warm-up after each reset belong to the optimizer.

  The rule is element-wise, so it needs no ``axis_name`` under ``shard_map``
  or ``pmap``: each device clips its shard exactly as one device would clip
  the whole. Only the statistics (``norm``, ``num_spikes``,
  ``frac_clipped``) are then those of the local shard.

  Args:
    max_ratio: SPAM's ``theta``, the largest ratio ``g ** 2 / v`` let
      through (>= 0): a number, JAX scalar or Optax schedule of the step
      count. SPAM's default is 5000.
    decay: the decay of the EMA ``v`` in ``[0, 1)``, SPAM's (and Adam's)
      ``beta2`` (number, scalar or schedule); 0.999 by default, Adam's.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ClipSpikesState`.

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> clip = oc.clip_spikes(100.0, decay=0.9)
    >>> state = clip.init(jnp.zeros(2))
    >>> for g in [[1.0, 1.0], [1.0, 1.0], [1.0, 50.0]]:
    ...   u, state = clip.update(jnp.array(g), state)
    >>> print(u, state.num_spikes)  # sqrt(100 * 0.19) = 4.3589
    [1.     4.3589] 1
  """
  caller = "clip_spikes"
  _validate.check_range(max_ratio, "max_ratio", caller, lo=0.0, hi=np.inf)
  _validate.check_range(decay, "decay", caller, lo=0.0, hi=1.0, open_hi=True)
  return _standalone(max_ratio, decay)


@_validate.renamed(
    theta="max_ratio",
    beta2="was removed: spike_clipped reads the wrapped optimizer's own"
    " second moment, whose decay is the optimizer's b2")
def spike_clipped(
    inner: optax.GradientTransformation,
    *,
    max_ratio: Threshold = 5000.0,
) -> optax.GradientTransformationExtraArgs:
  r"""SPAM's spike clipping against the wrapped optimizer's second moment.

  The rule of :func:`optaxclip.clip_spikes`, with ``v`` the second moment
  ``nu`` that the wrapped optimizer already keeps (the first state in it
  with a ``nu`` field shaped like the updates: ``adam``, ``adamw``,
  ``nadam``, ``rmsprop``'s ``nu``, ... alone or inside
  ``chain``/``inject_hyperparams``): an element ``g`` whose square exceeds
  ``max_ratio * nu`` becomes ``sign(g) * sqrt(max_ratio * nu)``, and the
  clipped gradient goes on to the optimizer, whose moments then see it, as
  in SPAM. The rule reads ``nu`` before the optimizer updates it, so the
  EMA's decay is the optimizer's own ``b2``. Memory: no buffer of its own,
  a few scalars of statistics.

  An element whose ``nu`` is exactly 0 passes unclipped (see
  :func:`optaxclip.clip_spikes`); an infinite element with ``nu > 0`` is
  clipped to a finite value; a NaN element passes as NaN. What the
  optimizer makes of a non-finite element is its own business.

  Args:
    inner: an optimizer keeping a second moment ``nu`` (e.g.
      ``optax.adamw(...)``) to wrap.
    max_ratio: SPAM's ``theta``, the largest ratio ``g ** 2 / nu`` let
      through (>= 0): a number, JAX scalar or Optax schedule of the step
      count. SPAM's default is 5000.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SpikeClippedState`; extra arguments of ``update`` go on to
    ``inner``.

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = oc.spike_clipped(optax.adam(1e-3, b2=0.9), max_ratio=100.0)
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> for g in [[1.0, 1.0], [1.0, 1.0], [1.0, 50.0]]:
    ...   u, state = opt.update(jnp.array(g), state, params)
    >>> print(state.num_spikes, state.inner_state[0].nu)
    1 [0.271 2.071]
  """
  caller = "spike_clipped"
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f"{caller}: inner must be an optax.GradientTransformation keeping a"
        f" second moment (e.g. optax.adamw(...)), got {type(inner).__name__}.")
  _validate.check_range(max_ratio, "max_ratio", caller, lo=0.0, hi=np.inf)
  return _wrapper(max_ratio, optax.with_extra_args_support(inner))


def _standalone(max_ratio: Threshold, decay: Threshold
                ) -> optax.GradientTransformation:
  caller = "clip_spikes"

  def init_fn(params):
    _tree.check_real(params, caller)
    return ClipSpikesState(
        stats=_fresh(params),
        nu=_tree.map_arrays(
            lambda x: jnp.zeros(jnp.shape(x), _tree.acc_dtype(x.dtype)),
            params),
        num_spikes=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    stats = state.stats
    dtype = stats.norm.dtype
    t = _thresholds.resolve(max_ratio, stats.count, dtype)
    b = _thresholds.resolve(decay, stats.count, dtype)
    _tree.check_same_tree(updates, state.nu, caller, _FIX)
    clipped, stats, spikes = _clip(updates, state.nu, t, stats, dtype, caller)

    def ema(v, c):
      c = c.astype(v.dtype)
      new = b.astype(v.dtype) * v + (1 - b.astype(v.dtype)) * c * c
      return jnp.where(jnp.isfinite(c), new, v)

    nu = _tree.map_arrays(ema, state.nu, clipped)
    return clipped, ClipSpikesState(stats=stats, nu=nu, num_spikes=spikes)

  return _transform.transformation(init_fn, update_fn)


def _wrapper(max_ratio: Threshold,
             inner: optax.GradientTransformationExtraArgs
             ) -> optax.GradientTransformationExtraArgs:
  caller = "spike_clipped"

  def init_fn(params):
    _tree.check_real(params, caller)
    inner_state = inner.init(params)
    _tree.find_second_moment(inner_state, params, caller)  # Fail now.
    return SpikeClippedState(stats=_fresh(params),
                             num_spikes=jnp.zeros((), jnp.int32),
                             inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    dtype = state.stats.norm.dtype
    t = _thresholds.resolve(max_ratio, state.stats.count, dtype)
    nu = _tree.find_second_moment(state.inner_state, updates, caller,
                                  changed=_FIX).nu
    _tree.check_same_tree(updates, nu, caller, _FIX)
    clipped, stats, spikes = _clip(updates, nu, t, state.stats, dtype, caller)
    new_updates, inner_state = inner.update(clipped, state.inner_state,
                                            params, **extra_args)
    return new_updates, SpikeClippedState(stats=stats, num_spikes=spikes,
                                          inner_state=inner_state)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


_FIX = ("Its second-moment estimates are kept leaf by leaf: call init again"
        " with the new tree (fresh estimates).")


def _fresh(params: Any) -> ClipStats:
  """The record of a new state: per-element thresholds and factors are not
  kept."""
  return _stats.fresh(_tree.tree_acc_dtype(params), scale=False, frac=True)


def _clip(updates: Any, nu: Any, max_ratio: jax.Array, stats: ClipStats,
          dtype: Any, caller: str) -> tuple[Any, ClipStats, jax.Array]:
  """Applies the rule leaf by leaf; returns the updates, the new record
  (its norm in ``dtype``) and the number of elements clipped."""
  out = _tree.map_arrays(lambda g, v: _clip_leaf(g, v, max_ratio),
                         updates, nu)
  clipped = _tree.map_arrays(lambda _, p: p[0], updates, out)
  counts = jax.tree_util.tree_leaves(
      _tree.map_arrays(lambda _, p: p[1], updates, out))
  spikes = sum(counts, jnp.zeros((), jnp.int32))
  size = sum(x.size for x in _tree.float_leaves(updates, caller))
  return clipped, _stats.advance(
      stats, clipped=spikes > 0, num=spikes, of=size,
      norm=_norms.global_norm(updates).astype(dtype)), spikes


def _clip_leaf(g: jax.Array, v: jax.Array, max_ratio: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  acc = _tree.acc_dtype(g.dtype)
  ga = g.astype(acc)
  va = v.astype(acc)
  bound = max_ratio.astype(acc) * va
  spike = (va > 0) & (ga * ga > bound)
  out = jnp.where(spike, jnp.copysign(jnp.sqrt(bound), ga), ga)
  return out.astype(g.dtype), jnp.sum(spike, dtype=jnp.int32)
