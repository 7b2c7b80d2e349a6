"""The step guard: skip a bad step without touching the optimizer's state."""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jcore

from optaxclip import _norms, _thresholds, _transform, _tree, _validate
from optaxclip._norms import AxisName, Ord
from optaxclip._thresholds import Threshold


class SkipStepState(NamedTuple):
  """State of :func:`skip_step`.

  Attributes:
    count: steps seen so far, skipped ones included (int32).
    grad_norm: the global norm of the last incoming update.
    threshold: the norm above which the last step would have been skipped:
      the smaller of ``max_norm`` and ``spike_factor * norm_ema`` (``inf``
      when neither rule was in force).
    scale: the factor applied to the wrapped update in the last step: 1 when
      it was taken, 0 when it was skipped.
    skipped: whether the last step was skipped.
    num_skipped: how many steps have been skipped so far.
    norm_ema: the bias-corrected exponential moving average of the norms of
      the steps taken (0 before the first one); the spike rule's baseline.
    leaf_norms: (``leaf_norms=True``) each leaf's norm of the last incoming
      update, a tree like the updates, from the same partial sums as
      ``grad_norm``; ``None`` otherwise.
    inner_state: the state of the wrapped transformation, as it was after the
      last step that was taken.
  """

  count: jax.Array
  grad_norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  skipped: jax.Array
  num_skipped: jax.Array
  norm_ema: jax.Array
  leaf_norms: Any
  inner_state: Any


_IN_MULTISTEPS = (
    "skip_step: wrapped in optax.MultiSteps, a non-finite micro-batch stays in"
    " MultiSteps' accumulator, out of skip_step's reach, and spoils the"
    " following steps. Nest it the other way round,"
    " oc.skip_step(optax.MultiSteps(opt, k)), to drop a bad micro-batch"
    " alone; or, to judge the accumulated gradients, pass nonfinite=False"
    " with max_norm or spike_factor and give MultiSteps"
    " should_skip_update_fn=optax.skip_not_finite.")


SkipStepStats = SkipStepState
"""Deprecated alias of :class:`SkipStepState`, whose fields it held."""


def skip_step(
    inner: optax.GradientTransformation | optax.MultiSteps,
    *,
    nonfinite: bool = True,
    max_norm: Threshold | None = None,
    spike_factor: float | None = None,
    spike_decay: float = 0.99,
    spike_warmup: int = 20,
    ord: Ord = 2,
    axis_name: AxisName = None,
    leaf_norms: bool = False,
    layer_axis: Any = None,
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

  The wrapped update runs every step, with no branch: each array of its new
  state is selected (new when taken, old when skipped) where it is computed,
  and the rest of the update reads the selected value, so that under
  ``jax.jit`` with donated buffers XLA updates the state in place, as it does
  for the wrapped optimizer alone.

  With gradient accumulation, nest ``skip_step(optax.MultiSteps(opt, k))``:
  a bad micro-batch is dropped alone (the accumulator, the micro-step counter
  and ``opt``'s state are left as they were) and the rules apply to each
  micro-batch's norm. ``optax.MultiSteps(skip_step(opt), k)`` with
  ``nonfinite=True`` raises a ``TypeError`` when traced: there a NaN would
  stay in MultiSteps' accumulator.

  Args:
    inner: the transformation to guard, or an ``optax.MultiSteps``; extra
      keyword arguments of a ``GradientTransformationExtraArgs`` (e.g.
      ``value`` for ``optax.contrib.reduce_on_plateau``) are passed through.
    nonfinite: skip steps whose gradients hold a NaN or an Inf.
    max_norm: skip steps whose norm exceeds this: a non-negative number, a
      JAX scalar, or an Optax schedule of the step count. ``None`` for no
      limit.
    spike_factor: skip steps whose norm exceeds this multiple (>= 1) of the
      moving average of the accepted norms; below 1 it would skip ordinary
      steps, whose norms scatter around that average. ``None`` disables the
      rule.
    spike_decay: the decay of that moving average, in ``[0, 1)``; it is
      bias-corrected (as Adam's moments are), so it tracks the mean of the
      norms from the first step taken.
    spike_warmup: how many steps must have been taken before the spike rule
      applies (at least 1).
    ord: the norm: ``1``, ``2``, ``inf``, any ``p > 0``, or ``"rms"``.
    axis_name: inside ``shard_map``/``pmap`` with sharded updates, the axis
      name (or tuple of names) to reduce the norm over, so that every device
      takes the same decision.
    leaf_norms: also keep each leaf's norm in the state, as
      :func:`clip_by_global_norm` does (no extra pass).
    layer_axis: for leaves that stack layers (Flax ``nnx.vmap`` /
      ``nnx.scan``), the axis that stacks them (an int, or a pytree prefix
      of the updates holding ints and ``None``): a stacked leaf's
      ``leaf_norms`` entry is then one norm per layer, shape
      ``(num_layers,)``, as for :func:`clip_by_global_norm`.

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
    >>> print(optax.apply_updates(params, updates)["w"], state.skipped)
    [1. 2.] True
    >>> print(state.num_skipped, state.scale)
    1 0.0
  """
  inner = _checked(inner, nonfinite, max_norm, spike_factor, spike_decay,
                   spike_warmup, leaf_norms, layer_axis)
  p = _validate.canonical_ord(ord)

  def init_fn(params):
    dtype = _tree.tree_acc_dtype(params)
    count = jnp.zeros((), jnp.int32)
    return SkipStepState(
        count=count, grad_norm=jnp.zeros((), dtype),
        threshold=(jnp.full((), jnp.inf, dtype) if max_norm is None
                   else _thresholds.resolve(max_norm, count, dtype)),
        scale=jnp.ones((), dtype), skipped=jnp.zeros((), bool),
        num_skipped=jnp.zeros((), jnp.int32), norm_ema=jnp.zeros((), dtype),
        leaf_norms=_norms.zero_leaf_norms(params, layer_axis, "skip_step") if leaf_norms else None,
        inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    _check_state(state)
    if nonfinite and _called_by_multisteps():
      raise TypeError(_IN_MULTISTEPS)
    dtype = state.grad_norm.dtype
    # The barrier keeps XLA from sharing the squares of this norm with an
    # inner optimizer's squares of the same gradients (Adam's second
    # moment): shared, they are written out as a temporary as large as the
    # gradients, where a fused reduction reads them once. Inside shard_map
    # (axis_name given) it is left out: its outputs lose the record of which
    # leaves vary across devices, which the norm needs.
    seen = updates if axis_name is not None else (
        jax.lax.optimization_barrier(updates))
    parts, each = _norms.global_and_leaf_norms(
        seen, p, axis_name=axis_name, leaves=leaf_norms, layer_axis=layer_axis, where="skip_step")
    norm = parts.value().astype(dtype)
    threshold = jnp.full((), jnp.inf, dtype)
    if max_norm is not None:
      threshold = _thresholds.resolve(max_norm, state.count, dtype)
    taken = state.count - state.num_skipped
    if spike_factor is not None:
      spike = jnp.asarray(spike_factor, dtype) * state.norm_ema
      threshold = jnp.where(taken >= spike_warmup,
                            jnp.minimum(threshold, spike), threshold)
    skip = norm > threshold
    if nonfinite:
      skip |= ~jnp.isfinite(norm)

    new_updates, new_inner = _update_keeping_state(
        skip, inner.update, updates, state.inner_state, params, extra_args)
    new_updates = _tree.map_arrays(
        lambda u: jnp.where(skip, jnp.negative(jnp.zeros_like(u)), u),
        new_updates)

    ema = _norm_ema(state.norm_ema, norm, taken, spike_decay)
    use = ~skip & jnp.isfinite(norm)
    return new_updates, SkipStepState(
        count=optax.safe_increment(state.count), grad_norm=norm,
        threshold=threshold, scale=jnp.where(skip, 0, 1).astype(dtype),
        skipped=skip, num_skipped=state.num_skipped + skip.astype(jnp.int32),
        norm_ema=jnp.where(use, ema, state.norm_ema), leaf_norms=each,
        inner_state=new_inner)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


def _checked(inner, nonfinite, max_norm, spike_factor, spike_decay,
             spike_warmup, leaf_norms, layer_axis=None):
  """``inner`` as an ``ExtraArgs`` transformation, once every argument is
  checked."""
  where = "skip_step"
  if isinstance(inner, optax.MultiSteps):
    inner = optax.GradientTransformationExtraArgs(inner.init, inner.update)
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f"{where}: inner must be an optax.GradientTransformation (e.g."
        f" optax.chain(clipper, optimizer)) or an optax.MultiSteps, got"
        f" {type(inner).__name__}.")
  _validate.check_bool(nonfinite, "nonfinite", where)
  if max_norm is not None:
    _validate.check_threshold(max_norm, "max_norm", where)
  if spike_factor is not None:
    _validate.check_range(spike_factor, "spike_factor", where, lo=1.0,
                          hi=math.inf, schedule=False)
  _validate.check_range(spike_decay, "spike_decay", where, lo=0.0, hi=1.0,
                      open_hi=True, schedule=False)
  _validate.check_int(spike_warmup, "spike_warmup", where, lo=1)
  if not nonfinite and max_norm is None and spike_factor is None:
    raise ValueError(
        f"{where}: with nonfinite=False, give max_norm or spike_factor;"
        " otherwise no step is ever skipped.")
  _validate.check_bool(leaf_norms, "leaf_norms", where)
  _validate.check_layer_axis(layer_axis, where)
  return optax.with_extra_args_support(inner)


def _check_state(state: Any) -> None:
  if not isinstance(state, SkipStepState):
    raise TypeError(
        "skip_step: state must be the SkipStepState that skip_step's own"
        f" init returned, got {type(state).__name__}; pass the state of the"
        " guard, not of the optimizer it wraps (that one is its"
        " inner_state).")


def _norm_ema(ema: jax.Array, norm: jax.Array, taken: jax.Array,
              decay: float) -> jax.Array:
  """The moving average of the norms of the steps taken, bias-corrected:
  after ``n`` such steps it weighs them as Adam's corrected moment does."""
  d = jnp.asarray(decay, ema.dtype)
  n = (taken + 1).astype(ema.dtype)
  weight = (1 - d) / -jnp.expm1(n * jnp.log(d))
  return ema + weight * (norm - ema)


def _update_keeping_state(skip, update, updates, state, params, extra_args):
  """``update(updates, state, params, **extra_args)``, old state if ``skip``.

  Each array of the new state is replaced by ``where(skip, old, new)`` right
  where it is computed, and every later operation reads the selected value.
  When the step is taken the results are those of ``update``, bit for bit;
  when it is skipped the returned state is ``state`` and the returned updates
  are meaningless (the caller replaces them). Selecting the results only at
  the end would leave the update reading the unselected new state: XLA then
  recomputes it from the old one, which must outlive the in-place write of
  the selected state, and copies every donated state buffer.
  """
  closed, out_shape = jax.make_jaxpr(
      lambda s: update(updates, s, params, **extra_args),
      return_shape=True)(state)
  jaxpr = closed.jaxpr
  old = jax.tree_util.tree_leaves(state)
  num_updates = len(jax.tree_util.tree_leaves(out_shape[0]))
  state_out = jaxpr.outvars[num_updates:]
  # The state position whose old value each computed variable falls back to.
  fallback: dict[Any, Any] = {}
  for i, v in enumerate(state_out):
    if not isinstance(v, jcore.Literal) and v not in jaxpr.invars:
      fallback.setdefault(v, old[i])

  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  def write(v, x):
    env[v] = jnp.where(skip, fallback[v], x) if v in fallback else x

  for v, x in zip(jaxpr.constvars, closed.consts):
    write(v, x)
  for v, x in zip(jaxpr.invars, old):
    env[v] = x
  for eqn in jaxpr.eqns:
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    # jax < 0.9 returns (subfuns, params); later versions the params alone.
    subfuns, bind_params = (bind_params if isinstance(bind_params, tuple)
                            else ((), bind_params))
    with eqn.ctx.manager:
      out = eqn.primitive.bind(*subfuns, *map(read, eqn.invars),
                               **bind_params)
    for v, x in zip(eqn.outvars, out if eqn.primitive.multiple_results
                    else [out]):
      write(v, x)
  outs = [read(v) for v in jaxpr.outvars]
  for i, v in enumerate(state_out):
    # Literals, inputs passed to another position, and variables whose
    # fallback is another position's old value are selected here.
    if isinstance(v, jcore.Literal):
      owned = False
    elif v in fallback:
      owned = fallback[v] is old[i]
    else:
      owned = v is jaxpr.invars[i]
    if not owned:
      outs[num_updates + i] = jnp.where(skip, old[i], outs[num_updates + i])
  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(out_shape), outs)


def _called_by_multisteps() -> bool:
  """Whether an ``optax.MultiSteps`` update is on the Python call stack."""
  frame = sys._getframe(2)
  while frame is not None:
    if isinstance(frame.f_locals.get("self"), optax.MultiSteps):
      return True
    frame = frame.f_back
  return False
