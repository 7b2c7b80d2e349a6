"""Dynamic loss scaling for float16 training: unscale, skip on overflow, adapt.

:func:`dynamic_loss_scale` wraps an optimizer; :func:`loss_scale` reads the
scale to multiply the next loss by out of any optimizer state. The rule is
``torch.amp.GradScaler``'s; the skipping is :func:`optaxclip.skip_step`'s.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip import _numerics, _stats, _transform, _tree, _validate
from optaxclip._norms import AxisName
from optaxclip._skip import SkipStepState, skip_step
from optaxclip._stats import ClipStats


@_stats.named("dynamic_loss_scale")
class DynamicLossScaleState(NamedTuple):
  """State of :func:`dynamic_loss_scale`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats` holding ``count`` (every step,
      skipped ones included) alone: the norm of the unscaled gradients,
      whether the step was skipped and how many were are the overflow
      guard's, reported under ``skip_step/`` by
      :func:`optaxclip.clip_stats`.
    loss_scale: the factor to multiply the next loss by (float32): the
      gradients that ``update`` receives next are divided by it.
    good_steps: how many steps in a row have been taken since the scale
      last changed (int32; torch's ``growth_tracker``).
    inner_state: the state of the overflow guard, a
      :class:`~optaxclip.SkipStepState` whose ``inner_state`` is the wrapped
      transformation's.
  """

  stats: ClipStats
  loss_scale: jax.Array
  good_steps: jax.Array
  inner_state: SkipStepState


def dynamic_loss_scale(
    inner: optax.GradientTransformation | optax.MultiSteps,
    *,
    init_scale: float = 2.0**15,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    min_scale: float = 1.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Dynamic loss scaling for float16: unscale, skip on overflow, adapt.

  The gradients given to ``update`` are those of the loss multiplied by
  :func:`loss_scale` of the state (``S``), so that small float16 gradients
  do not underflow. Each step:

  1. each leaf is multiplied by ``1 / S`` (in float32, then cast back to
     its dtype) and handed to ``inner``, wrapped in
     ``oc.skip_step(inner, nonfinite=True)``: a clipper inside ``inner``
     clips the unscaled gradients, by their true norm;
  2. if an entry is NaN or infinite (an overflow), the step is skipped: the
     update is zeros and ``inner``'s state is left as it was, bit for bit;
     ``S`` is multiplied by ``backoff_factor`` (not below ``min_scale``)
     and ``good_steps`` goes back to 0;
  3. otherwise ``good_steps`` goes up by one; when it reaches
     ``growth_interval``, ``S`` is multiplied by ``growth_factor`` (unless
     that overflows float32) and ``good_steps`` goes back to 0.

  This is the rule of ``torch.amp.GradScaler`` (``_amp_update_scale_``),
  step for step; ``min_scale=0`` gives it exactly. The floor (default 1,
  DeepSpeed's ``min_loss_scale``) departs from it: without one, a run whose
  every step overflows (a NaN in the forward pass) halves the scale down to
  0, where every later gradient reads NaN and the run never recovers.

  Put :func:`optaxclip.skip_step` with a spike rule *inside*
  (``dynamic_loss_scale(oc.skip_step(opt, rule=...))``), where it sees the
  unscaled gradients: outside, it would judge gradients multiplied by a
  changing ``S`` and, skipping the overflowed steps itself, keep this
  transformation from ever lowering ``S``. For gradient accumulation nest
  ``dynamic_loss_scale(optax.MultiSteps(opt, k))`` (one ``S`` per
  micro-batch, as for ``skip_step``).

  Edge cases: ``S`` is a float32 power of two with the default factors, so
  unscaling is exact (unless a result is subnormal; a scale above
  ``2**126``, whose inverse is subnormal, too); the factors act as float32
  numbers: ``S`` is torch's bit for bit where they are float32 numbers (2,
  0.5, 1.5, ...), and within a float32 ulp per change otherwise (torch
  multiplies in float64); a gradient of zeros is a good step, and so is a
  step that a ``skip_step`` inside ``inner`` skips; a float16 gradient
  unscaled into float16 may underflow where its float32 value would not:
  keep float32 master weights (float16 compute) and their gradients are
  float32.

  Args:
    inner: the optimizer to guard, e.g. ``optax.chain(oc.clip_by_global_norm
      (1.0), optax.adamw(1e-3))``, or an ``optax.MultiSteps``.
    init_scale: the loss scale of the first step (``2**15``: a float16 loss
      of up to 2 stays finite once scaled; torch's default is ``2**16``).
    growth_factor: what the scale is multiplied by after
      ``growth_interval`` good steps (> 1).
    backoff_factor: what the scale is multiplied by on an overflow, in
      ``(0, 1)``.
    growth_interval: how many good steps in a row raise the scale (>= 1).
    min_scale: the scale never backs off below this (>= 0; 0 for torch's
      rule, no floor); at most ``init_scale``.
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the
      mesh axes to check for overflow over, so that every device skips
      (and scales) alike.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`DynamicLossScaleState`.

  References:
    Micikevicius et al., `Mixed Precision Training
    <https://arxiv.org/abs/1710.03740>`_, 2018; ``torch.amp.GradScaler``
    (``torch/amp/grad_scaler.py``, ``_amp_update_scale_``).

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = oc.dynamic_loss_scale(
    ...     optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1)),
    ...     growth_interval=2)
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> state = opt.init(params)
    >>> def loss_fn(p):
    ...   return jnp.sum(p["w"] ** 2)
    >>> grads = jax.grad(lambda p: loss_fn(p) * oc.loss_scale(state))(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> print(updates["w"], oc.loss_scale(state), state.good_steps)
    [-0.04472136 -0.08944272] 32768.0 1
    >>> bad = {"w": jnp.array([jnp.inf, 1.0])}  # a float16 overflow
    >>> updates, state = opt.update(bad, state, params)
    >>> print(updates["w"], oc.loss_scale(state), state.good_steps)
    [-0. -0.] 16384.0 0
  """
  caller = "dynamic_loss_scale"
  _check(init_scale, growth_factor, backoff_factor, growth_interval,
         min_scale)
  guard = skip_step(inner, nonfinite=True, axis_name=axis_name)
  f32 = jnp.float32

  def init_fn(params):
    return DynamicLossScaleState(
        stats=_stats.fresh(f32, norm=False, scale=False, clipped=False),
        loss_scale=jnp.asarray(init_scale, f32),
        good_steps=jnp.zeros((), jnp.int32), inner_state=guard.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, DynamicLossScaleState):
      raise TypeError(
          f"{caller}: state must be the DynamicLossScaleState that its own"
          f" init returned, got {type(state).__name__}.")
    scale = state.loss_scale
    inv = _inverse(scale)
    unscaled = _tree.map_arrays(lambda g: _numerics.scale_leaf(g, inv),
                                updates)
    new_updates, guarded = guard.update(unscaled, state.inner_state, params,
                                        **extra_args)
    scale, good = _next_scale(scale, state.good_steps, guarded.skipped,
                              growth_factor, backoff_factor, growth_interval,
                              min_scale)
    return new_updates, DynamicLossScaleState(
        stats=_stats.advance(state.stats), loss_scale=scale, good_steps=good,
        inner_state=guarded)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


def loss_scale(opt_state: Any) -> jax.Array:
  """The factor to multiply the next loss by: the loss scale in the state.

  Searches any nested optimizer state (``optax.chain``,
  ``inject_hyperparams``, a Flax NNX ``nnx.Optimizer``'s ``opt_state``, ...)
  for the state of :func:`dynamic_loss_scale` (the outermost, if several).

  Args:
    opt_state: an optimizer state, or any pytree holding one.

  Returns:
    The loss scale, a float32 scalar.

  Raises:
    ValueError: when ``opt_state`` holds no :func:`dynamic_loss_scale`
      state.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = oc.dynamic_loss_scale(optax.adam(1e-3), init_scale=1024.0)
    >>> print(oc.loss_scale(opt.init({"w": jnp.zeros(3)})))
    1024.0
  """
  found = [x for x in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, DynamicLossScaleState))
           if isinstance(x, DynamicLossScaleState)]
  if not found:
    raise ValueError(
        "loss_scale: found no dynamic_loss_scale state in this state"
        f" ({type(opt_state).__name__}); pass the optimizer state of an"
        " optimizer made by oc.dynamic_loss_scale (for Flax NNX,"
        " optimizer.opt_state).")
  value = found[0].loss_scale
  get = getattr(value, "get_value", None)  # A Flax NNX variable.
  return jnp.asarray(get() if callable(get) else value)


def _inverse(scale: jax.Array) -> _numerics.Scale:
  """``1 / scale`` as two normal factors, so that a scale above ``2**126``
  (whose inverse is subnormal: XLA flushes it to zero) unscales exactly;
  ``inf`` for a scale of 0 (every gradient then reads NaN)."""
  big = scale > 2.0**64
  a = jnp.where(big, 2.0**-64, 1.0).astype(scale.dtype)
  b = 1 / jnp.where(big, scale * 2.0**-64, scale)
  return _numerics.Scale(a, b, 1 / scale)


def _next_scale(scale: jax.Array, good: jax.Array, overflow: jax.Array,
                growth_factor: float, backoff_factor: float,
                growth_interval: int, min_scale: float
                ) -> tuple[jax.Array, jax.Array]:
  """GradScaler's update of the scale and of its count of good steps."""
  f32 = jnp.float32
  backed = jnp.maximum(scale * jnp.asarray(backoff_factor, f32),
                       jnp.asarray(min_scale, f32))
  good = good + 1
  grow = good == growth_interval
  grown = scale * jnp.asarray(growth_factor, f32)
  grown = jnp.where(grow & jnp.isfinite(grown), grown, scale)
  new_scale = jnp.where(overflow, backed, grown)
  new_good = jnp.where(overflow | grow, 0, good)
  return new_scale, new_good.astype(jnp.int32)


def _check(init_scale: Any, growth_factor: Any, backoff_factor: Any,
           growth_interval: Any, min_scale: Any) -> None:
  """Raises unless the hyper-parameters are sound."""
  caller = "dynamic_loss_scale"
  big = float(jnp.finfo(jnp.float32).max)
  _validate.check_range(init_scale, "init_scale", caller, lo=0.0, hi=big,
                        open_lo=True, schedule=False)
  _validate.check_range(growth_factor, "growth_factor", caller, lo=1.0,
                        hi=math.inf, open_lo=True, open_hi=True,
                        schedule=False)
  _validate.check_range(backoff_factor, "backoff_factor", caller, lo=0.0,
                        hi=1.0, open_lo=True, open_hi=True, schedule=False)
  _validate.check_int(growth_interval, "growth_interval", caller, lo=1)
  if _validate.is_concrete(growth_interval) and int(growth_interval) >= 2**31:
    raise ValueError(f"{caller}: growth_interval={int(growth_interval)} does"
                     " not fit the int32 count of good steps; give less"
                     " than 2**31.")
  _validate.check_range(min_scale, "min_scale", caller, lo=0.0, hi=big,
                        schedule=False)
  if (_validate.is_concrete(min_scale) and _validate.is_concrete(init_scale)
      and float(min_scale) > float(init_scale)):
    raise ValueError(
        f"{caller}: min_scale={float(min_scale)} exceeds init_scale="
        f"{float(init_scale)}; give a floor at most the initial scale.")
