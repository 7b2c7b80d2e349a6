"""Update clipping: StableAdamW's per-tensor rule, and the update's global norm
against its own recent history."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _apply, _norms, _stats, _thresholds, _transform, _tree, _validate
from optaxclip._norms import AxisName
from optaxclip._thresholds import Threshold


class ClipUpdateRMSState(NamedTuple):
  """State of :func:`clip_update_rms`.

  Attributes:
    count: updates seen so far (int32).
    max_rms: the largest per-tensor RMS ``u`` of the last step (the number
      each tensor's ``1 / max(1, u)`` is taken from).
    scale: the smallest per-tensor factor of the last step, ``1 / max(1,
      max_rms)``.
    clipped: whether any tensor's update was scaled down at the last step.
    num_clipped: how many steps have had a tensor scaled down so far.
    frac_clipped: the fraction of the tensors scaled down at the last step.
    num_leaves_clipped: how many tensors were scaled down at the last step
      (int32).
    inner_state: the state of the wrapped optimizer.
    leaf_norms: (``leaf_norms=True``) each tensor's RMS ``u`` of the last
      step, a tree like the updates; ``None`` otherwise.
  """

  count: jax.Array
  max_rms: jax.Array
  scale: jax.Array
  clipped: jax.Array
  num_clipped: jax.Array
  frac_clipped: jax.Array
  num_leaves_clipped: jax.Array
  inner_state: Any
  leaf_norms: Any = None


class ClipUpdateByHistoryState(NamedTuple):
  """State of :func:`clip_update_by_history`.

  Attributes:
    count: updates seen so far (int32).
    grad_norm: the global 2-norm of the last incoming update (the
      optimizer's output), before clipping.
    threshold: the threshold in force at the last step, ``mean + sigma *
      max(std, min_std)`` of the recorded norms, or ``inf`` while fewer
      than ``min_history`` norms are recorded.
    scale: the factor the last update was multiplied by, ``min(1, t / n)``.
    clipped: whether the last update was scaled down.
    num_clipped: how many updates have been scaled down so far.
    norm_history: the ring buffer of recorded (unclipped, finite) norms,
      shape ``(window,)``; only the first ``fill`` slots hold norms.
    fill: how many slots of ``norm_history`` hold norms (int32, at most
      ``window``).
    index: the slot the next norm is written to (int32).
    leaf_norms: (``leaf_norms=True``) each leaf's norm of the last incoming
      update, a tree like the updates; ``None`` otherwise.
  """

  count: jax.Array
  grad_norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped: jax.Array
  num_clipped: jax.Array
  norm_history: jax.Array
  fill: jax.Array
  index: jax.Array
  leaf_norms: Any = None


def clip_update_rms(
    inner: optax.GradientTransformation,
    *,
    b2: float | jax.Array | None,
    eps: float = 1e-6,
    axis_name: AxisName = None,
    leaf_norms: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""StableAdamW's update clipping: each tensor's step shrunk by its RMS.

  Wraps an Adam-family optimizer. For each tensor (leaf) with gradient ``g``
  and the optimizer's second moment ``v`` (its ``nu``, read from its state:
  no buffer of its own),

  .. math::

     u = \sqrt{\operatorname{mean}\left(g^2 / \max(\hat v, \epsilon^2)
     \right)}, \qquad \text{update} \leftarrow \text{update} / \max(1, u),

  where ``v̂ = nu / (1 - b2 ** t)`` is ``nu`` *after* this step's update
  (it includes ``g``), bias-corrected with the optimizer's step count ``t``.
  This is the rule of StableAdamW (Wortsman et al. 2023, Algorithm 2) as
  the ``torch-optimi`` package implements it: its second moment is updated
  with a debiased ``beta2`` and so equals the bias-corrected ``v̂`` above,
  the RMS is taken after that update, and ``eps`` (1e-6 there and here)
  enters squared. The whole update of the tensor is divided, so with
  ``inner=optax.adamw(...)`` the decoupled weight decay is scaled too, as
  StableAdamW scales it (it multiplies the learning rate that both use).
  ``optax.adamw(lr, b1, b2, eps=1e-6, weight_decay=wd)`` wrapped with the
  same ``b2`` is StableAdamW.

  ``b2`` must be the wrapped optimizer's ``b2`` (the state keeps only the
  step count, not the decay). ``b2=None`` reads ``nu`` as it is, for an
  optimizer without bias correction (e.g. ``optax.rmsprop``).

  Edge cases: a zero gradient gives ``u = 0`` and passes unchanged; an
  element with ``g = 0`` counts 0 whatever ``v`` (so ``eps = 0`` with an
  all-zero tensor is defined); ``u <= 1`` leaves the tensor's update bit for
  bit. At the first step ``v̂ = g ** 2``, so ``u = 1`` up to rounding: the
  tensor is then divided by a factor within an ulp of 1, and the counters
  count a tensor as clipped only where ``u`` exceeds 1 by more than 16 ulps
  of the accumulation dtype.
  A NaN gradient gives NaN ``u`` and a NaN update; an infinite one
  makes ``nu`` infinite and ``u`` NaN. A tensor whose ``u`` overflows float32
  (``g`` huge against ``eps``) is scaled exactly by the overflow-safe kernel.

  The RMS is computed in float32 (float64 for float64 parameters), one read
  of ``g`` and ``nu`` per step, fused by XLA with the rest of the step.
  Inside ``shard_map`` or ``pmap`` with sharded tensors, give ``axis_name``
  so that ``u`` is that of the whole tensor on every device.

  Args:
    inner: the optimizer to wrap, keeping a second moment ``nu`` shaped
      like the gradients (``optax.adamw``, ``adam``, ``nadam``, ``lamb``,
      alone or inside ``chain``/``inject_hyperparams``); the first such
      ``nu`` in its state is read.
    b2: the wrapped optimizer's ``b2``, in ``[0, 1)``, for the bias
      correction of ``nu``; ``None``: no bias correction.
    eps: the floor of the second moment, applied as ``max(v̂, eps ** 2)``
      (>= 0); StableAdamW's default is 1e-6.
    axis_name: inside ``shard_map``/``pmap``, the axis name (or names) to
      reduce each tensor's mean over.
    leaf_norms: also keep each tensor's ``u`` in the state (a tree);
      :func:`optaxclip.clip_stats` with ``scalars=True`` lists them by path.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ClipUpdateRMSState`.

  References:
    Wortsman et al., `Stable and low-precision training for large-scale
    vision-language models <https://arxiv.org/abs/2304.13013>`_, NeurIPS
    2023. ``torch-optimi``'s ``StableAdamW``:
    https://pypi.org/project/torch-optimi/.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = oc.clip_update_rms(optax.adamw(0.1, b2=0.99, eps=1e-6),
    ...                          b2=0.99, leaf_norms=True)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    >>> state = opt.init(params)
    >>> for g in [1.0, 1.0, 50.0]:
    ...   grads = {"a": jnp.full(2, g), "b": jnp.ones(2)}
    ...   updates, state = opt.update(grads, state, params)
    >>> u = state.leaf_norms  # Each tensor's RMS.
    >>> print(f"{u['a']:.4f} {u['b']:.4f}", state.num_leaves_clipped)
    1.7227 1.0000 1
    >>> print(jnp.round(updates["a"], 4))  # adamw's step (0.0658) / 1.7227
    [-0.0382 -0.0382]
  """
  where = "clip_update_rms"
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f"{where}: inner must be an optax.GradientTransformation keeping a"
        " second moment (e.g. optax.adamw(...)), got"
        f" {type(inner).__name__}.")
  if b2 is not None:
    _validate.check_range(b2, "b2", where, lo=0.0, hi=1.0, open_hi=True,
                          schedule=False)
  _validate.check_range(eps, "eps", where, lo=0.0, hi=np.inf, schedule=False)
  _validate.check_bool(leaf_norms, "leaf_norms", where)
  wrapped = optax.with_extra_args_support(inner)

  def init_fn(params):
    _tree.check_real(params, where)
    inner_state = wrapped.init(params)
    _moment(inner_state, params, b2, where)  # A clear error now.
    dtype = _tree.tree_acc_dtype(params)
    return ClipUpdateRMSState(
        **_stats.counters(frac=True), max_rms=jnp.zeros((), dtype),
        scale=jnp.ones((), dtype),
        num_leaves_clipped=jnp.zeros((), jnp.int32), inner_state=inner_state,
        leaf_norms=_tree.zero_leaf_norms(params) if leaf_norms else None)

  def update_fn(updates, state, params=None, **extra_args):
    out, inner_state = wrapped.update(updates, state.inner_state, params,
                                      **extra_args)
    nu, count = _moment(inner_state, updates, b2, where)
    dtype = state.max_rms.dtype
    out, rms, scales, each, rebuild = _divide_by_rms(
        updates, out, nu, b2, count, eps, axis_name, where)
    # Counted where u exceeds 1 by more than rounding: at the first step
    # u = 1 up to an ulp, which jit and eager round differently.
    num = sum((jnp.sum(u > 1 + 16 * jnp.finfo(u.dtype).eps, dtype=jnp.int32)
               for u in rms), jnp.zeros((), jnp.int32))
    return out, ClipUpdateRMSState(
        **_stats.tally(state, num > 0, num=num, of=len(each)),
        max_rms=_apply.largest(rms, dtype),
        scale=_apply.smallest(scales, dtype), num_leaves_clipped=num,
        inner_state=inner_state,
        leaf_norms=rebuild([u.astype(dtype) for u in each])
        if leaf_norms else None)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


def _divide_by_rms(updates: Any, out: Any, nu: Any, b2: Any,
                   count: jax.Array | None, eps: float, axis_name: AxisName,
                   where: str) -> tuple[Any, list[jax.Array],
                                        list[jax.Array], list[jax.Array], Any]:
  """Each tensor of ``out`` divided by ``max(1, u)``.

  Returns the clipped ``out``; the ``u`` and the factors stacked per group
  of tensors of one type; the ``u`` per tensor, and the rebuilder of the
  gradients' tree.
  """
  leaves, rebuild = _tree.live_leaves(updates, where)
  gs = [x for _, x in leaves]
  axes = [tuple(range(g.ndim)) for g in gs]  # Whole tensors.
  groups, norms = _norms.grouped_leaf_norms(
      _normalized(gs, _tree.float_leaves(nu, where), b2, count, eps),
      "rms", axes, axis_name=axis_name)
  ys, rebuild_out = _tree.live_leaves(out, where)
  one = jnp.ones((), _tree.common_acc_dtype(gs))
  clipped, values, scales = _apply.apply_grouped(
      [y for _, y in ys], groups, norms, [one] * len(groups))
  each = _apply.ungroup(groups, values, gs, axes)
  return rebuild_out(clipped), values, scales, each, rebuild


def _moment(inner_state: Any, like: Any, b2: Any, where: str
            ) -> tuple[Any, jax.Array | None]:
  """The wrapped optimizer's ``nu`` and its step count (``None`` without
  ``b2``: no bias correction)."""
  node = _tree.find_second_moment(inner_state, like, where)
  if b2 is None:
    return node.nu, None
  if "count" not in getattr(node, "_fields", ()):  # tuple.count is a method.
    raise ValueError(
        f"{where}: the state holding the second moment"
        f" ({type(node).__name__}) keeps no step count to bias-correct it"
        " with; pass b2=None for an optimizer without bias correction.")
  return node.nu, jnp.asarray(node.count)


def _normalized(gs: list[jax.Array], nus: list[jax.Array],
                b2: Any, count: jax.Array | None, eps: float
                ) -> list[jax.Array]:
  """Each ``g / sqrt(max(v̂, eps**2))`` (0 where ``g`` is 0), in the
  accumulation dtype: its RMS is the tensor's ``u``."""
  out = []
  for g, v in zip(gs, nus):
    dtype = _tree.acc_dtype(g.dtype)
    ga, va = g.astype(dtype), v.astype(dtype)
    if count is not None:
      va = va / (1 - jnp.asarray(b2, dtype) ** count.astype(dtype))
    floor = jnp.asarray(eps, dtype) ** 2
    out.append(jnp.where(ga == 0, jnp.zeros((), dtype),
                         ga / jnp.sqrt(jnp.maximum(va, floor))))
  return out


def clip_update_by_history(
    window: int = 128,
    sigma: Threshold = 3.0,
    *,
    min_history: int | None = None,
    min_std: float = 1e-6,
    axis_name: AxisName = None,
    leaf_norms: bool = False,
) -> optax.GradientTransformation:
  """Clips the update's global norm to ``mean + sigma * std`` of its history.

  Placed *after* the optimizer (``chain(adamw(...),
  clip_update_by_history())``), it scales the whole update by
  ``min(1, t / n)``, ``n`` the update's global 2-norm and

  ``t = mean + sigma * max(std, min_std)``

  over the norms of the last ``window`` updates, the current one excluded
  (population standard deviation, ``ddof = 0``). While fewer than
  ``min_history`` norms are recorded (by default ``max(2, window // 2)``:
  64 of 128), ``t = inf`` and nothing is clipped. Each step's *unclipped*
  norm is recorded, so a run of clipped steps raises the threshold instead of
  locking it in place. This is levanter's
  ``clip_update_by_historical_norm`` (its ``rolling_interval_length`` is
  ``window``, its ``sigma_factor`` is ``sigma``; the floor on the standard
  deviation, 1e-6, is its constant).

  One deviation: a non-finite norm (NaN or inf, or a finite update whose
  norm overflows) is not recorded. Recorded, it would make the mean NaN or
  infinite, and so switch clipping off for the next ``window`` steps. That
  step's update is still scaled by the rule (a NaN norm gives a NaN update,
  an infinite one a zero factor, as :func:`optaxclip.clip_by_global_norm`);
  :func:`optaxclip.skip_step` drops such steps.

  Edge cases: a zero update passes unchanged; a history of equal norms has
  ``std = 0`` and clips above ``mean + sigma * min_std``; ``sigma = inf``
  never clips; a ``sigma`` schedule's negative or NaN value acts as 0.

  Args:
    window: how many recent norms to keep (the ring buffer's size), >= 2.
    sigma: how many standard deviations above the mean to allow (>= 0): a
      number, JAX scalar or Optax schedule of the step count.
    min_history: how many norms must be recorded before anything is
      clipped, in ``[1, window]``; ``None`` means ``max(2, window // 2)``.
    min_std: the floor on the standard deviation (>= 0).
    axis_name: inside ``shard_map``/``pmap`` with sharded updates, the axis
      name (or names) to reduce the norm over.
    leaf_norms: also keep each leaf's norm in the state (a tree), as
      :func:`optaxclip.clip_by_global_norm` does.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`ClipUpdateByHistoryState`.

  References:
    levanter's ``clip_update_by_historical_norm``:
    https://github.com/stanford-crfm/levanter.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> clip = oc.clip_update_by_history(window=4, sigma=1.0)
    >>> state = clip.init(jnp.zeros(1))
    >>> for n in [1.0, 3.0, 10.0, 2.0, 1.0, 30.0]:
    ...   u, state = clip.update(jnp.array([n]), state)
    ...   print(f"{float(u[0]):.4f} {float(state.threshold):.4f}")
    1.0000 inf
    3.0000 inf
    3.0000 3.0000
    2.0000 8.5253
    1.0000 7.5355
    7.5355 7.5355
    >>> print(state.norm_history)  # The last 4 norms, unclipped: a ring.
    [ 1. 30. 10.  2.]
  """
  where = "clip_update_by_history"
  _validate.check_int(window, "window", where, lo=2)
  size = _validate.static_size(window, "window", where)
  least = max(2, size // 2) if min_history is None else min_history
  _validate.check_int(least, "min_history", where, lo=1)
  if int(least) > size:
    raise ValueError(
        f"{where}: min_history={int(least)} exceeds window={size}: the"
        " window never holds that many norms, so nothing would be clipped."
        " Give min_history <= window.")
  _validate.check_threshold(sigma, "sigma", where)
  _validate.check_range(min_std, "min_std", where, lo=0.0, hi=np.inf,
                        schedule=False)
  _validate.check_bool(leaf_norms, "leaf_norms", where)

  def init_fn(params):
    dtype = _tree.tree_acc_dtype(params)
    return ClipUpdateByHistoryState(
        **_stats.counters(), grad_norm=jnp.zeros((), dtype),
        threshold=jnp.full((), jnp.inf, dtype), scale=jnp.ones((), dtype),
        norm_history=jnp.zeros((size,), dtype),
        fill=jnp.zeros((), jnp.int32), index=jnp.zeros((), jnp.int32),
        leaf_norms=_tree.zero_leaf_norms(params) if leaf_norms else None)

  def update_fn(updates, state, params=None):
    del params
    dtype = state.norm_history.dtype
    parts, each = _norms.global_and_leaf_norms(
        updates, 2, axis_name=axis_name, leaves=leaf_norms)
    norm = parts.value().astype(dtype)
    s = _thresholds.resolve(sigma, state.count, dtype)
    threshold = _history_threshold(state, s, int(least), min_std)
    updates, scale = _apply.clip_tree(updates, parts, threshold)
    return updates, ClipUpdateByHistoryState(
        **_stats.tally(state, norm > threshold), grad_norm=norm,
        threshold=threshold, scale=scale.value().astype(dtype),
        **_record(state, norm), leaf_norms=each)

  return _transform.transformation(init_fn, update_fn)


def _history_threshold(state: ClipUpdateByHistoryState, sigma: jax.Array,
                       least: int, min_std: float) -> jax.Array:
  """``mean + sigma * max(std, min_std)`` of the recorded norms, or ``inf``
  while fewer than ``least`` are recorded."""
  h = state.norm_history
  dtype = h.dtype
  valid = jnp.arange(h.shape[0]) < state.fill
  k = jnp.maximum(state.fill, 1).astype(dtype)
  mean = jnp.sum(jnp.where(valid, h, 0), dtype=dtype) / k
  var = jnp.sum(jnp.where(valid, jnp.square(h - mean), 0), dtype=dtype) / k
  std = jnp.maximum(jnp.sqrt(var), jnp.asarray(min_std, dtype))
  # sigma = inf with std = 0 would give inf * 0; inf is meant.
  spread = jnp.where(jnp.isinf(sigma), sigma, sigma * std)
  return jnp.where(state.fill >= least, mean + spread,
                   jnp.asarray(jnp.inf, dtype))


def _record(state: ClipUpdateByHistoryState, norm: jax.Array
            ) -> dict[str, jax.Array]:
  """The ring buffer with ``norm`` written, when it is finite."""
  ok = jnp.isfinite(norm)
  size = state.norm_history.shape[0]
  history = jnp.where(ok, state.norm_history.at[state.index].set(norm),
                      state.norm_history)
  return dict(norm_history=history,
              fill=jnp.where(ok, jnp.minimum(state.fill + 1, size), state.fill),
              index=jnp.where(ok, (state.index + 1) % size, state.index))

