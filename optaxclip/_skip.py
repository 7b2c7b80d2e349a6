"""The step guard: skip a bad step without touching the optimizer's state."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jcore

from optaxclip import _norms, _stats, _thresholds, _transform, _tree, _validate
from optaxclip._norms import AxisName, Ord
from optaxclip._stats import ClipStats
from optaxclip._thresholds import Threshold


class SpikeEMA(NamedTuple):
  """The moving-average spike rule of :func:`skip_step` (``rule=``).

  Once ``warmup_steps`` steps have been taken, a step is skipped when the
  global norm of its gradients exceeds ``max_ratio`` times the moving
  average of the norms of the steps taken before it. The average is an
  exponential one of decay ``decay``, bias-corrected (as Adam's moments
  are), so it tracks the mean of the norms from the first step taken; the
  state keeps it as ``norm_ema``.

  With ``follow=True`` (the default) every finite norm enters the average,
  skipped steps' included (as every value enters :class:`SpikeWindow`'s
  window), so a lasting rise of the norm to more than ``max_ratio`` times
  the old level becomes the new baseline: skipped for some steps, then
  taken. A spike is judged against the average before it, and raises it by
  ``(1 - decay)`` times its excess (a x20 spike: by 19% at the default
  decay), so the next spike is caught as well. With ``follow=False`` the
  skipped steps stay out of the average, so a spike raises nothing; but a
  lasting rise to more than ``max_ratio`` times the old level is then
  skipped step after step, for the rest of the run, as the average never
  catches up. Measured on synthetic runs (``python tests/test_lockin.py``):
  after a lasting x10 rise of a norm with 1% noise, ``follow=True`` skips
  6 steps and takes the rest, ``follow=False`` skips every step after it;
  three planted x20 spikes are skipped either way, and no other step.

  Edge cases: a NaN or infinite norm is skipped by ``nonfinite`` (and
  never enters the average); a norm equal to the bound is taken. The
  average's bias correction and ``warmup_steps`` count the steps taken.

  Attributes:
    max_ratio: the largest ratio of a step's norm to the moving average of
      the accepted norms (at least 1: below, it would skip ordinary steps,
      whose norms scatter around that average).
    decay: the decay of that moving average, in ``[0, 1)``.
    warmup_steps: how many steps must have been taken before the rule
      applies (at least 1).
    follow: whether the average follows a lasting change of the norm
      level: ``True`` puts every finite norm in it, skipped steps' too;
      ``False`` the norms of the steps taken alone (which locks in after a
      rise of more than ``max_ratio``).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = oc.skip_step(optax.sgd(0.1),
    ...                    rule=oc.SpikeEMA(max_ratio=4.0, warmup_steps=3))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> for norm in [1.0, 1.2, 0.8, 1.0, 20.0]:
    ...   _, state = opt.update({"w": jnp.array([norm, 0.0])}, state, params)
    >>> print(state.skipped, state.stats.norm, state.stats.threshold)
    True 20.0 3.998
  """

  max_ratio: float = 5.0
  decay: float = 0.99
  warmup_steps: int = 20
  follow: bool = True


class SpikeWindow(NamedTuple):
  """The rolling spike rule of :func:`skip_step` (``rule=``).

  A step is skipped when its loss, or the global norm of its gradients, lies
  more than ``num_std`` standard deviations above the mean of the last
  ``window`` values before it, once ``min_history`` values are in the
  window: the rule of OLMo-core's ``SkipStepOptimizer``, levanter's
  ``SkipStepConfig`` and MaxText's ``skip_step_on_spikes``. All three are
  one-sided (a loss that drops is never skipped), test the loss and the
  norm both, and put every step's values in the window, skipped steps'
  included, so that a lasting change of level becomes the new baseline
  within a few steps (where a moving average of the steps taken alone, as
  :class:`SpikeEMA`'s, never catches up). They differ in the deviation and
  the warm-up:

  ==========  ========================================  ===================
  rule        deviation                                 judged from
  ==========  ========================================  ===================
  levanter    population (``jnp.std``), at least 1e-6   ``window // 2``
                                                        earlier values
  OLMo-core   sample (``torch.std_mean``: Bessel)       ``window // 2 - 1``
  MaxText     sample (Bessel), as OLMo-core             ``window // 2 - 1``
  ==========  ========================================  ===================

  The default is levanter's rule (``ddof=0``, ``min_history = window //
  2``), the JAX one whose ``update(..., loss=loss)`` this follows; with
  ``window=128`` the two deviations differ by 0.4%. ``SpikeWindow(ddof=1,
  min_history=63, std_floor=0.0)`` is OLMo-core's and MaxText's rule.

  Edge cases, where optaxclip chooses:

  - Empty or short window: before ``min_history`` finite values are in it,
    no finite value is skipped, however large (the bounds read ``inf``).
  - Equal values (deviation 0): the deviation used is at least
    ``std_floor * |mean|`` (default 1e-3), so a window of losses of exactly
    2.0 lets 2.0002 through and skips 2.02. In the references, without a
    floor (OLMo-core, MaxText) or with an absolute 1e-6 (levanter), any rise
    above a constant window is skipped. A window of zeros has no floor.
  - NaN or infinite loss or norm (watched): the step is skipped, in the
    warm-up too, and the value stays out of the window. In the references
    it enters the window, whose mean then reads NaN, and every step is
    skipped until it has left (``window`` steps).
  - A value equal to the bound is taken (``<=``, as in the references).

  Attributes:
    window: how many earlier values the mean and the deviation are taken
      over (at least 2).
    num_std: how many standard deviations above the mean a value may lie
      (> 0).
    min_history: how many earlier values must be in the window before the
      rule skips anything (2 to ``window``); ``None`` for
      ``max(2, window // 2)``.
    watch: ``"both"`` (skip when either spikes), ``"loss"`` or ``"norm"``
      (the global norm of the gradients). The loss comes as
      ``update(..., loss=loss)``: the batch's mean loss, a scalar; with
      ``axis_name``, averaged over it.
    two_sided: also skip values more than ``num_std`` deviations *below* the
      mean (e.g. a batch of padding whose loss drops to near zero). None of
      the references does.
    ddof: 0 for the population deviation (levanter), 1 for the sample
      deviation with Bessel's correction (OLMo-core, MaxText).
    std_floor: the deviation used is at least ``std_floor * |mean|``; 0 for
      none.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = oc.skip_step(optax.sgd(0.1), rule=oc.SpikeWindow(window=8))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.ones(2)}
    >>> for loss in [2.0, 2.1, 1.9, 2.0, 2.1, 1.9, 2.0, 9.0]:
    ...   _, state = opt.update(grads, state, params, loss=loss)
    >>> print(state.skipped, state.loss_threshold)
    True 2.4536
  """

  window: int = 128
  num_std: float = 6.0
  min_history: int | None = None
  watch: str = "both"
  two_sided: bool = False
  ddof: int = 0
  std_floor: float = 1e-3


@_stats.named("skip_step")
class SkipStepState(NamedTuple):
  """State of :func:`skip_step`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`: ``count`` counts every step,
      skipped ones included; ``norm`` is the global norm of the last
      incoming update; ``threshold`` the norm above which the last step
      was or would have been skipped: the smallest of ``skip_norm``,
      :class:`SpikeEMA`'s ``max_ratio * norm_ema`` and
      :class:`SpikeWindow`'s norm bound (``inf`` when none was in force);
      ``scale`` the factor applied to the wrapped update in the last step,
      1 when it was taken, 0 when it was skipped; ``leaf_norms``
      (``leaf_norms=True``) each leaf's norm of the last incoming update,
      from the same partial sums as ``norm``. ``clipped`` and
      ``num_clipped`` are ``None``: skipping is not clipping (see
      ``skipped`` and ``num_skipped``).
    skipped: whether the last step was skipped.
    num_skipped: how many steps have been skipped so far.
    norm_ema: the bias-corrected exponential moving average of the norms of
      the steps taken (0 before the first one), of :class:`SpikeEMA`'s
      ``decay`` (0.99 without a :class:`SpikeEMA`); that rule's baseline.
      With ``SpikeEMA(follow=True)``, skipped steps' finite norms enter it
      too.
    loss: (a :class:`SpikeWindow` watching the loss) the loss of the last
      step, as passed to ``update``; ``None`` otherwise.
    loss_threshold: (idem) the loss above which the last step was or would
      have been skipped by the rolling rule (``inf`` before ``min_history``
      losses were in the window).
    history: (a :class:`SpikeWindow`) the rolling window, ``(2, window)``:
      row 0 the losses, row 1 the gradient norms, oldest overwritten first;
      ``None`` otherwise.
    history_count: (idem) how many values of each row have entered the
      window (int32, ``(2,)``; kept below ``2 * window``).
    inner_state: the state of the wrapped transformation, as it was after the
      last step that was taken.

  An attribute this state lacks is read from ``inner_state``: code written
  for the wrapped optimizer's state keeps working behind the guard, e.g.
  ``state.gradient_step``, ``state.mini_step`` and ``state.acc_grads`` of
  a wrapped ``optax.MultiSteps`` (and ``optax.MultiSteps.has_updated``),
  or ``state.hyperparams`` of a wrapped ``optax.inject_hyperparams``.
  Indexing is the NamedTuple's own: ``state[0]`` is ``stats``; a wrapped
  chain's first state is ``state.inner_state[0]``.
  """

  stats: ClipStats
  skipped: jax.Array
  num_skipped: jax.Array
  norm_ema: jax.Array
  loss: jax.Array | None
  loss_threshold: jax.Array | None
  history: jax.Array | None
  history_count: jax.Array | None
  inner_state: Any

  def __getattr__(self, name: str) -> Any:
    # Called only for names the NamedTuple lacks; special names are never
    # delegated (copy, pickle and friends look those up and expect their
    # absence to read as absence).
    if name.startswith("__"):
      raise AttributeError(name)
    inner = self.inner_state
    try:
      return getattr(inner, name)
    except AttributeError:
      raise AttributeError(
          f"'SkipStepState' object has no attribute {name!r}, nor has its"
          f" inner_state ({type(inner).__name__})") from None


def _moved(field: str) -> str:
  """The hint of a keyword that became a field of :class:`SpikeEMA`."""
  return (f"moved into oc.SpikeEMA({field}=...):"
          " skip_step(opt, rule=oc.SpikeEMA(...))")


@_validate.renamed(max_norm="skip_norm", spike_factor=_moved("max_ratio"),
                   spike_decay=_moved("decay"),
                   spike_warmup=_moved("warmup_steps"),
                   spike_window="rule")
def skip_step(
    inner: optax.GradientTransformation | optax.MultiSteps,
    *,
    nonfinite: bool = True,
    skip_norm: Threshold | None = None,
    rule: SpikeWindow | SpikeEMA | None = None,
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
  - the norm exceeds ``skip_norm``;
  - ``rule`` is a :class:`SpikeEMA`, at least its ``warmup_steps`` steps
    have been taken, and the norm exceeds ``max_ratio`` times the moving
    average of the norms of the steps taken (a loss spike);
  - ``rule`` is a :class:`SpikeWindow` and the loss passed as
    ``update(grads, state, params, loss=loss)``, or the norm, lies more
    than ``num_std`` standard deviations above the mean of the last
    ``window`` values (OLMo-core's, levanter's and MaxText's rule), or is
    NaN or infinite. Every finite value enters that window, skipped steps'
    included.

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
  micro-batch's norm, and loss: pass each micro-batch's mean loss, and a
  :class:`SpikeWindow` judges it against a window of micro-batch values (its
  ``window`` counts micro-batches; a micro-batch's loss scatters more than
  the mean of ``k``, so the bounds are wider). Nested the other way,
  ``optax.MultiSteps(skip_step(opt), k)``, the guard sees the accumulated
  gradients and keeps its state once per step: it cannot drop a bad
  micro-batch (a NaN stays in MultiSteps' accumulator, out of its reach,
  and every later step is skipped), and its loss rule would judge the last
  micro-batch's loss alone. Nothing in the call tells the guard that
  MultiSteps made it, so it does not refuse that nesting: there give
  MultiSteps ``should_skip_update_fn=optax.skip_not_finite`` and the guard
  ``skip_norm`` or ``SpikeWindow(watch="norm")``, which judge the
  accumulated gradients' norm.

  ``updates`` whose tree structure or leaf shapes differ from those of the
  tree given to ``init`` raise a ``ValueError`` naming the first
  differences.

  Args:
    inner: the transformation to guard, or an ``optax.MultiSteps``; extra
      keyword arguments of a ``GradientTransformationExtraArgs`` (e.g.
      ``value`` for ``optax.contrib.reduce_on_plateau``) are passed through.
    nonfinite: skip steps whose gradients hold a NaN or an Inf.
    skip_norm: skip steps whose norm exceeds this: a non-negative number, a
      JAX scalar, or an Optax schedule of the step count. ``None`` for no
      limit.
    rule: the spike rule: a :class:`SpikeEMA` (the norm against a moving
      average of the accepted norms), a :class:`SpikeWindow` (the loss and
      the norm against a rolling window of recent values; its window, the
      last loss and the loss bound are kept in the state), or ``None``
      (default) for none.
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
    spikes); ``optax.apply_if_finite``; OLMo-core's ``SkipStepOptimizer``
    (``olmo_core/optim/skip_step_optimizer.py``), levanter's
    ``SkipStepConfig`` (``levanter/optim/skip_step.py``) and MaxText's
    ``skip_step_on_spikes`` (``optimizers.py``).

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
    >>> print(state.num_skipped, state.stats.scale)
    1 0.0
  """
  inner = _checked(inner, nonfinite, skip_norm, rule, leaf_norms,
                   layer_axis)
  ema = rule if isinstance(rule, SpikeEMA) else None
  window = rule if isinstance(rule, SpikeWindow) else None
  decay = (ema if ema is not None else SpikeEMA()).decay
  p = _validate.canonical_ord(ord)
  trees: list[list[tuple[str, tuple[int, ...]]]] = []

  def init_fn(params):
    _remember_tree(trees, params)
    dtype = _tree.tree_acc_dtype(params)
    return SkipStepState(
        stats=_stats.fresh(
            dtype, clipped=False,
            threshold=(jnp.full((), jnp.inf, dtype) if skip_norm is None
                       else _thresholds.resolve(
                           skip_norm, jnp.zeros((), jnp.int32), dtype)),
            leaf_norms=(_norms.zero_leaf_norms(params, layer_axis, "skip_step")
                        if leaf_norms else None)),
        skipped=jnp.zeros((), bool), num_skipped=jnp.zeros((), jnp.int32),
        norm_ema=jnp.zeros((), dtype), **_window_init(window, dtype),
        inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    _check_call(state, trees, updates)
    dtype = state.stats.norm.dtype
    taken = state.stats.count - state.num_skipped
    norm, each, threshold = _norm_and_threshold(
        updates, state, p, axis_name, leaf_norms, layer_axis, skip_norm, ema,
        extra_args.get("global_norm"))
    skip = norm > threshold
    if nonfinite:
      skip |= ~jnp.isfinite(norm)
    fields = _window_init(None, dtype)
    if window is not None:
      loss = _loss_arg(extra_args, window, dtype, axis_name)
      spiked, threshold, fields = _window_update(window, state, loss, norm,
                                                 threshold)
      skip |= spiked

    new_updates, new_inner = _update_keeping_state(
        skip, inner.update, updates, state.inner_state, params, extra_args)
    new_updates = _tree.map_arrays(
        lambda u: jnp.where(skip, jnp.negative(jnp.zeros_like(u)), u),
        new_updates)

    new_ema = _norm_ema(state.norm_ema, norm, taken, decay)
    use = (~skip | (ema is not None and ema.follow)) & jnp.isfinite(norm)
    return new_updates, SkipStepState(
        stats=_stats.advance(
            state.stats, norm=norm, threshold=threshold,
            scale=jnp.where(skip, 0, 1).astype(dtype), leaf_norms=each),
        skipped=skip, num_skipped=state.num_skipped + skip.astype(jnp.int32),
        norm_ema=jnp.where(use, new_ema, state.norm_ema), **fields,
        inner_state=new_inner)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


def _check_call(state: Any, trees: Any, updates: Any) -> None:
  """Raises for a state or a tree ``init`` did not make."""
  _check_state(state)
  _check_tree(trees, updates)


def _norm_and_threshold(updates, state, p, axis_name, leaf_norms, layer_axis,
                        skip_norm, ema, supplied=None):
  """The global norm of ``updates`` (and each leaf's, with ``leaf_norms``),
  and the norm above which ``skip_norm`` or the moving-average spike rule
  (``ema``: a :class:`SpikeEMA` or ``None``) skips the step."""
  stats = state.stats
  dtype = stats.norm.dtype
  # The barrier keeps XLA from sharing the squares of this norm with an
  # inner optimizer's squares of the same gradients (Adam's second
  # moment): shared, they are written out as a temporary as large as the
  # gradients, where a fused reduction reads them once. Inside shard_map
  # (axis_name given) it is left out: its outputs lose the record of which
  # leaves vary across devices, which the norm needs.
  seen = updates if axis_name is not None else (
      jax.lax.optimization_barrier(updates))
  each = None
  if supplied is None or leaf_norms:
    parts, each = _norms.global_and_leaf_norms(
        seen, p, axis_name=axis_name, leaves=leaf_norms,
        layer_axis=layer_axis, caller="skip_step")
  if supplied is not None:  # Computed elsewhere (docs/sharding.md).
    parts = _norms.supplied_norm(supplied, p, dtype, "skip_step")
  norm = parts.value().astype(dtype)
  threshold = jnp.full((), jnp.inf, dtype)
  if skip_norm is not None:
    threshold = _thresholds.resolve(skip_norm, stats.count, dtype)
  if ema is not None:
    taken = stats.count - state.num_skipped
    bound = jnp.asarray(ema.max_ratio, dtype) * state.norm_ema
    threshold = jnp.where(taken >= ema.warmup_steps,
                          jnp.minimum(threshold, bound), threshold)
  return norm, each, threshold


def _checked(inner, nonfinite, skip_norm, rule, leaf_norms, layer_axis):
  """``inner`` as an ``ExtraArgs`` transformation, once every argument is
  checked."""
  caller = "skip_step"
  if isinstance(inner, optax.MultiSteps):
    inner = optax.GradientTransformationExtraArgs(inner.init, inner.update)
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f"{caller}: inner must be an optax.GradientTransformation (e.g."
        f" optax.chain(clipper, optimizer)) or an optax.MultiSteps, got"
        f" {type(inner).__name__}.")
  _validate.check_bool(nonfinite, "nonfinite", caller)
  if skip_norm is not None:
    _validate.check_threshold(skip_norm, "skip_norm", caller)
  if isinstance(rule, SpikeEMA):
    _check_ema(rule)
  elif isinstance(rule, SpikeWindow):
    _check_window(rule)
  elif rule is not None:
    raise TypeError(
        f"{caller}: rule must be an oc.SpikeWindow (e.g."
        " oc.SpikeWindow(window=128, num_std=6.0)), an oc.SpikeEMA (e.g."
        " oc.SpikeEMA(max_ratio=5.0)) or None, got"
        f" {type(rule).__name__}.")
  if not nonfinite and skip_norm is None and rule is None:
    raise ValueError(
        f"{caller}: with nonfinite=False, give skip_norm or rule;"
        " otherwise no step is ever skipped.")
  _validate.check_bool(leaf_norms, "leaf_norms", caller)
  _validate.check_layer_axis(layer_axis, caller)
  return optax.with_extra_args_support(inner)


def _check_ema(rule: SpikeEMA) -> None:
  """Raises unless ``rule``'s fields are sound."""
  caller = "skip_step: SpikeEMA"
  _validate.check_range(rule.max_ratio, "max_ratio", caller, lo=1.0,
                        hi=math.inf, schedule=False)
  _validate.check_range(rule.decay, "decay", caller, lo=0.0, hi=1.0,
                        open_hi=True, schedule=False)
  _validate.check_int(rule.warmup_steps, "warmup_steps", caller, lo=1)
  _validate.check_bool(rule.follow, "follow", caller)


def _check_window(rule: SpikeWindow) -> None:
  """Raises unless ``rule``'s fields are sound."""
  caller = "skip_step: SpikeWindow"
  _validate.check_int(rule.window, "window", caller, lo=2)
  _validate.check_range(rule.num_std, "num_std", caller, lo=0.0, hi=math.inf,
                        open_lo=True, schedule=False)
  if rule.min_history is not None:
    _validate.check_int(rule.min_history, "min_history", caller, lo=2)
    if rule.min_history > rule.window:
      raise ValueError(
          f"{caller}: min_history={rule.min_history} exceeds window="
          f"{rule.window}, so the rule would never apply; give at most"
          " window.")
  if rule.watch == "grad_norm":
    raise ValueError(f"{caller}: watch='grad_norm' is now watch='norm'"
                     " (the global norm of the gradients).")
  if rule.watch not in _WATCH:
    raise ValueError(f"{caller}: watch={rule.watch!r} is not one of"
                     f" {sorted(_WATCH)}.")
  _validate.check_bool(rule.two_sided, "two_sided", caller)
  if isinstance(rule.ddof, bool) or rule.ddof not in (0, 1):
    raise ValueError(f"{caller}: ddof={rule.ddof!r} must be 0 (population"
                     " deviation) or 1 (sample deviation).")
  _validate.check_range(rule.std_floor, "std_floor", caller, lo=0.0,
                        hi=math.inf, open_hi=True, schedule=False)


_WATCH = {"both": (True, True), "loss": (True, False), "norm": (False, True)}


def _watches_loss(rule: SpikeWindow | None) -> bool:
  return rule is not None and _WATCH[rule.watch][0]


def _window_init(rule: SpikeWindow | None, dtype: Any) -> dict[str, Any]:
  """The rolling rule's fields of a fresh :class:`SkipStepState` (``None``
  where the rule does not keep them)."""
  loss = _watches_loss(rule)
  return dict(
      loss=jnp.zeros((), dtype) if loss else None,
      loss_threshold=jnp.full((), jnp.inf, dtype) if loss else None,
      history=None if rule is None else jnp.zeros((2, rule.window), dtype),
      history_count=None if rule is None else jnp.zeros((2,), jnp.int32))


def _loss_arg(extra_args: dict[str, Any], rule: SpikeWindow, dtype: Any,
              axis_name: AxisName) -> jax.Array:
  """The ``loss`` extra argument as a scalar of ``dtype`` (0 when the rule
  does not watch it), averaged over ``axis_name``."""
  if not _watches_loss(rule):
    return jnp.zeros((), dtype)
  loss = extra_args.get("loss")
  if loss is None:
    raise ValueError(
        "skip_step: rule=oc.SpikeWindow(...) watches the loss, but update"
        " was called without it; pass it as opt.update(grads, state, params,"
        " loss=loss), or watch the gradient norm alone with"
        " oc.SpikeWindow(watch='norm').")
  if jnp.size(loss) != 1:
    raise ValueError(
        f"skip_step: loss must be a scalar, got shape {jnp.shape(loss)};"
        " pass the batch's mean loss.")
  loss = jnp.reshape(jnp.asarray(loss), ()).astype(dtype)
  return loss if axis_name is None else jax.lax.pmean(loss, axis_name)


def _window_update(rule: SpikeWindow, state: SkipStepState, loss: jax.Array,
                   norm: jax.Array, threshold: jax.Array):
  """The rolling rule's decision on ``(loss, norm)``, the norm threshold
  lowered to its own bound, and the rule's new state fields."""
  window = rule.window
  min_history = (max(2, window // 2) if rule.min_history is None
                 else rule.min_history)
  values = jnp.stack([loss, norm])
  watched = jnp.asarray(_WATCH[rule.watch])
  hist, count = state.history, state.history_count
  assert hist is not None and count is not None  # Made by _window_init.
  dtype = hist.dtype
  n = jnp.minimum(count, window)
  mask = jnp.arange(window) < n[:, None]
  nf = n.astype(dtype)
  mean = jnp.sum(jnp.where(mask, hist, 0), axis=1) / jnp.maximum(nf, 1)
  dev = jnp.where(mask, hist - mean[:, None], 0)
  var = jnp.sum(dev * dev, axis=1) / jnp.maximum(nf - rule.ddof, 1)
  std = jnp.maximum(jnp.sqrt(var),
                    jnp.asarray(rule.std_floor, dtype) * jnp.abs(mean))
  k = jnp.asarray(rule.num_std, dtype)
  ready = n >= min_history
  out = values > mean + k * std
  if rule.two_sided:
    out |= values < mean - k * std
  finite = jnp.isfinite(values)
  spiked = jnp.any(watched & (~finite | (ready & out)))
  bound = jnp.where(ready & watched, mean + k * std, jnp.inf)
  enter = finite & watched
  slot = jnp.expand_dims(count % window, 1) == jnp.arange(window)
  new_count = count + 1
  new_count = jnp.where(new_count >= 2 * window, new_count - window, new_count)
  fields = dict(
      history=jnp.where(enter[:, None] & slot, values[:, None], hist),
      history_count=jnp.where(enter, new_count, count), loss=None,
      loss_threshold=None)
  if _watches_loss(rule):
    fields.update(loss=loss, loss_threshold=bound[0])
  return spiked, jnp.minimum(threshold, bound[1]), fields


def _signature(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
  """Each leaf of ``tree`` as ``(path, shape)``, the path made of its dict
  keys and sequence indices alone: attribute steps are left out, so that
  Flax NNX's ``Param`` wrappers (``['kernel'].value``, as ``init`` sees
  them) match the bare gradients (``['kernel']``)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(tuple(
      k for k in path if isinstance(k, (jax.tree_util.DictKey,
                                        jax.tree_util.SequenceKey)))),
           tuple(jnp.shape(x))) for path, x in flat]


def _remember_tree(trees: list, params: Any) -> None:
  """Records the leaf paths and shapes of a tree given to ``init``, and of
  each field of a record of trees (``optax.lookahead``'s
  ``LookaheadParams(fast, slow)``: its updates are one field's tree)."""
  fields = getattr(params, "_fields", None) if isinstance(
      params, tuple) else None
  for tree in [getattr(params, f) for f in fields or ()] + [params]:
    entry = _signature(tree)
    if entry not in trees:
      trees.append(entry)


def _check_tree(trees: list, updates: Any) -> None:
  """Raises when ``updates`` matches none of the trees given to ``init``
  (no check when ``init`` ran elsewhere). Leaves that vary across a
  ``shard_map`` axis are local blocks: their shapes are not compared."""
  if not trees:
    return
  got = _signature(updates)
  local = [bool(getattr(jax.typeof(x), "vma", ()))
           for x in jax.tree_util.tree_leaves(updates)]
  for ref in trees:
    if len(ref) == len(got) and all(
        a[0] == b[0] and (lo or a[1] == b[1])
        for lo, a, b in zip(local, got, ref)):
      return
  ref = trees[-1]
  paths, ref_paths = [p for p, _ in got], [p for p, _ in ref]
  if paths != ref_paths:
    extra = [p for p in paths if p not in ref_paths][:3]
    missing = [p for p in ref_paths if p not in paths][:3]
    what = (f"its tree structure differs (leaves not in init's tree:"
            f" {', '.join(extra) or 'none'}; leaves missing:"
            f" {', '.join(missing) or 'none'}; {len(paths)} leaves, init's"
            f" tree had {len(ref_paths)})")
  else:
    what = "; ".join(f"leaf {p} has shape {s}, init's had {r}"
                     for (p, s), (_, r) in zip(got, ref) if s != r)
  raise ValueError(
      f"skip_step: the updates do not match the tree given to init: {what}."
      " Pass gradients of the very params the optimizer was initialised"
      " with (same keys, same shapes), or call init again on the new"
      " params.")


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

