"""AdaGC: per-tensor clipping against an EMA of each tensor's clipped norms."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _apply, _norms, _numerics, _stats, _thresholds, _transform, _tree, _validate
from optaxclip._norms import AxisName
from optaxclip._stats import ClipStats
from optaxclip._thresholds import Threshold


@_stats.named("adagc")
class AdaGCState(NamedTuple):
  """State of :func:`adagc`.

  The per-tensor fields are trees with the structure of the updates, one
  scalar per tensor (``optax.MaskedNode`` where the updates have one); with
  ``layer_axis``, a stacked leaf holds one value per layer, shape
  ``(num_layers,)``.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`: ``count`` (warm-up while
      ``count < warmup_steps``); ``norm``, the global 2-norm of the last
      incoming update, the norm the warm-up clip compares with
      ``max_norm``; ``scale``, the smallest factor a tensor was multiplied
      by at the last update; ``clipped``, whether any tensor of the last
      update was scaled down; ``num_clipped``, how many updates have had a
      tensor scaled down so far; ``frac_clipped``, the fraction of tensors
      scaled down at the last update; ``leaf_norms``, each tensor's 2-norm
      of the last incoming update, before clipping (a tree, always kept:
      the rule needs it). Its ``threshold`` is ``None``: the thresholds are
      per tensor (``leaf_thresholds``).
    leaf_thresholds: the norm each tensor was held to at the last update
      (a tree): ``max_ratio * gamma`` after warm-up; during warm-up the
      global threshold ``max_norm`` (it bounds the global norm, not each
      tensor's).
    leaf_scales: the factor each tensor was multiplied by at the last
      update (a tree).
    gamma: each tensor's reference norm ``gamma_i`` after the last update
      (a tree; ``inf`` until a finite norm was seen).
  """

  stats: ClipStats
  leaf_thresholds: Any
  leaf_scales: Any
  gamma: Any


@_validate.renamed(lambda_rel="max_ratio", beta="decay", lambda_abs="max_norm")
def adagc(
    max_ratio: Threshold = 1.05,
    *,
    decay: Threshold = 0.98,
    warmup_steps: int = 100,
    max_norm: Threshold = 1.0,
    eps: float = 0.0,
    follow: bool = True,
    axis_name: AxisName = None,
    layer_axis: Any = None,
) -> optax.GradientTransformation:
  r"""AdaGC: clips each tensor relative to an EMA of its own clipped norms.

  Each tensor ``i`` (each leaf of the updates) keeps a reference norm
  ``gamma_i``. With ``g_i`` the tensor's gradient at step ``t`` (counting
  from 1) and ``T = warmup_steps``:

  1. Warm-up, ``t <= T``: the whole update is clipped to global 2-norm
     ``max_norm``, ``g_i <- min(1, max_norm / ||g||) * g_i``, and
     ``gamma_i <- min(gamma_i, ||g_i||)`` with the clipped ``g_i``
     (``gamma_i`` starts at ``inf``, so at step 1 it is the first clipped
     norm).
  2. After warm-up, ``t > T``: each tensor is clipped on its own,
     ``h_i = min(1, max_ratio * gamma_i / ||g_i||) * g_i``, and
     ``gamma_i <- decay * gamma_i + (1 - decay) * ||h_i||``.
  3. With ``follow=True`` (the default), a tensor clipped after warm-up at
     two consecutive steps takes its norm as it came as its reference at
     the second one: ``gamma_i <- ||g_i||`` (that step is still clipped).

  **Lasting changes (the default departs from the paper here).** Fed the
  clipped norms, ``gamma`` can rise by at most ``1 + (1 - decay) *
  (max_ratio - 1)`` per step (x1.001 at the defaults): after a lasting
  rise of x3 every step is clipped for over 1,000 steps. Step 3 lets a
  rise that outlasts one step become the reference at once, while a
  single spike (one clipped step between unclipped ones) still leaves
  ``gamma`` where it was. Measured on synthetic runs (one tensor, a norm
  level with 1% noise, 1000 steps, a lasting change at step 100; ``python
  tests/test_lockin.py`` prints the table): with
  ``follow=False`` a lasting x3 or x10 rise leaves all of the last 500
  steps clipped, and x1.5 takes 382 steps to recover; with
  ``follow=True`` none of them is clipped after the first few steps, and
  three planted x20 spikes are all caught. Neither form follows a steady
  rise faster than about ``(max_ratio - 1) * (1 - decay) / decay`` per
  step (0.1% at the defaults): the EMA lags it by more than
  ``max_ratio``'s margin. Under a x10 drift over 1000 steps (0.23% per
  step) ``follow=True`` clips 11.2% of the last 500 steps (a run of two
  clips resets ``gamma``, which then falls behind again), ``follow=False``
  all of them; a larger ``max_ratio`` or a smaller ``decay`` follows it.

  The cost: two spikes in a row make the second one a tensor's reference,
  and ``gamma`` then takes about ``log(spike) / (1 - decay)`` steps to
  come back down, unclipped meanwhile.

  With ``follow=False`` this is Algorithm 1 of the paper (its ``T_start``
  is ``warmup_steps + 1``; its ``lambda_rel``, ``beta`` and
  ``lambda_abs`` are ``max_ratio``, ``decay`` and ``max_norm``), computed on the device with per-tensor norms
  accumulated in float32 and a state of a few scalars per tensor;
  ``||h_i||`` is ``scale_i * ||g_i||``, so no second pass over the
  gradients is made. Deviations, each only where the paper's rule would
  produce a NaN or an Inf:

  - a warm-up step whose global norm is non-finite leaves every ``gamma``
    as it was (its clipped norms, ``0 * inf``, say nothing);
  - after warm-up, a tensor whose clipped norm is non-finite (a NaN or an
    Inf in that tensor) leaves its ``gamma`` as it was.

  The update itself still carries the NaN or Inf of such a step unless it
  is dropped, e.g. by :func:`optaxclip.skip_step`.

  Edge cases: a tensor whose gradient is exactly zero at any warm-up step
  gets ``gamma = 0``; with ``follow=False`` it is then zeroed at every step
  (the paper's rule: ``||h|| <= max_ratio * gamma`` keeps it at 0), with
  ``follow=True`` at its first two non-zero steps after warm-up, the
  second of which makes its norm ``gamma``; ``max_norm = inf``
  turns warm-up clipping off; a tensor whose ``gamma`` is still ``inf``
  after warm-up (every warm-up step non-finite) is never clipped. A zero
  norm gives scale 1 (0 where the threshold is 0 too: the update is 0
  either way); a NaN norm gives a NaN scale.

  Args:
    max_ratio: the largest ratio of a tensor's norm to its reference norm
      (> 0; AdaGC's ``lambda_rel``): each tensor's norm is held to
      ``max_ratio * gamma_i``. A number, JAX scalar or Optax schedule of the
      step count.
    decay: the EMA decay of ``gamma`` in ``[0, 1]`` (AdaGC's ``beta``;
      number, scalar or schedule).
    warmup_steps: how many steps (>= 1) use global clipping to
      ``max_norm`` and set ``gamma`` to the running minimum.
    max_norm: the global-norm threshold during warm-up (>= 0; AdaGC's
      ``lambda_abs``; number, scalar or schedule).
    eps: added to each tensor's norm in the scale's denominator after
      warm-up, ``min(1, max_ratio * gamma_i / (||g_i|| + eps))``, >= 0; 0
      (the default) is the paper's formula.
    follow: whether ``gamma`` follows a lasting change of the norm level:
      ``True`` lets a tensor clipped at two consecutive steps take its norm
      as its reference (step 3); ``False`` is the paper's rule, which locks
      in after a lasting rise.
    axis_name: inside ``shard_map``/``pmap`` with sharded updates, the axis
      name (or names) to reduce the norms over.
    layer_axis: for leaves that stack layers (Flax ``nnx.vmap`` /
      ``nnx.scan``), the axis that stacks them: an int for every leaf, or a
      pytree prefix of the updates holding ints and ``None`` (not
      stacked). Each layer's slice is then a tensor of its own, with its
      own ``gamma``, threshold and scale (arrays of shape
      ``(num_layers,)`` in the state), as if each layer were a leaf.

  Returns:
    An ``optax.GradientTransformation`` whose state is an
    :class:`AdaGCState`.

  References:
    Wang et al., `AdaGC: Improving Training Stability for Large Language
    Model Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> clip = oc.adagc(1.05, decay=0.98, warmup_steps=2, max_norm=10.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 0.5])}
    >>> state = clip.init(g)
    >>> for s in [1.0, 0.8, 1.0]:  # Warm-up, then a step near the trend.
    ...   u, state = clip.update({k: s * v for k, v in g.items()}, state)
    >>> print(state.gamma["a"], state.gamma["b"],
    ...       state.leaf_thresholds["a"])
    4.004 0.4004 4.2
    >>> u, state = clip.update({k: 10 * v for k, v in g.items()}, state)
    >>> print(u["a"][1], state.leaf_scales["a"], state.stats.clipped)
    3.3634 0.084084 True
  """
  caller = "adagc"
  _check(max_ratio, decay, warmup_steps, max_norm, eps, follow)
  _validate.check_layer_axis(layer_axis, caller)

  def init_fn(params):
    dtype = _tree.tree_acc_dtype(params)
    leaves, rebuild = _tree.live_leaves(params, caller)
    shapes = [_tree.tensor_shape(x, k) for (_, x), k in zip(
        leaves, _thresholds.leaf_layers(layer_axis, params, caller))]

    def full(value):
      return rebuild([jnp.full(s, value, dtype) for s in shapes])

    return AdaGCState(
        _stats.fresh(dtype, frac=True, leaf_norms=full(0)),
        leaf_thresholds=full(jnp.inf), leaf_scales=full(1),
        gamma=full(jnp.inf))

  def update_fn(updates, state, params=None, *, global_norm=None, **extra):
    del params, extra
    dtype = state.stats.norm.dtype
    count = state.stats.count
    layers = _thresholds.leaf_layers(layer_axis, updates, caller)
    _check_same_tree(updates, state.gamma, layers)
    parts, rebuild = _tensor_norms(updates, axis_name, dtype, layers)
    total = _norms.combine(parts)  # Exact beyond overflow, as each part.
    if global_norm is not None:  # Computed elsewhere (docs/sharding.md).
      total = _norms.supplied_norm(global_norm, 2.0, dtype, caller)
    warm = count < warmup_steps
    rel = _thresholds.resolve(max_ratio, count, dtype)
    b = _thresholds.resolve(decay, count, dtype)
    t_abs = _thresholds.resolve(max_norm, count, dtype)
    step = functools.partial(
        _per_tensor, warm=warm, t_abs=t_abs, t_rel=rel, decay=b,
        s_global=_numerics.clip_factors(total, t_abs),
        track_warm=warm & jnp.isfinite(total.value()), eps=eps, dtype=dtype,
        again=(count > warmup_steps) if follow else False)
    out = [step(n, gamma, last) for n, gamma, last in zip(
        parts, _tree.float_leaves(state.gamma, caller),
        _tree.float_leaves(state.leaf_scales, caller))]
    threshold, scale, gamma = (rebuild([o[i] for o in out]) for i in range(3))
    factors = [o[1] for o in out]
    updates = rebuild([_apply.scale_tensor(g, o[3], k) for g, o, k in zip(
        _tree.float_leaves(updates, caller), out, layers)])
    num = sum((jnp.sum(s < 1, dtype=jnp.int32) for s in factors),
              jnp.zeros((), jnp.int32))
    return updates, AdaGCState(
        _stats.advance(state.stats, clipped=jnp.asarray(num) > 0, num=num,
                       of=sum(s.size for s in factors),
                       norm=total.value().astype(dtype),
                       scale=_apply.smallest(factors, dtype),
                       leaf_norms=rebuild([n.value().astype(dtype)
                                           for n in parts])),
        leaf_thresholds=threshold, leaf_scales=scale, gamma=gamma)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


def _tensor_norms(updates: Any, axis_name: AxisName, dtype: Any,
                  layers: list[int | None]
                  ) -> tuple[list[_numerics.Norm], Any]:
  """Each tensor's 2-norm as a :class:`Norm` pair of ``dtype`` (scalars, or
  one per layer of a stacked leaf), and the function that rebuilds a tree
  like ``updates`` from leaves."""
  leaves, rebuild = _tree.live_leaves(updates, "adagc")
  parts = _norms.tensor_norm_parts([x for _, x in leaves], 2, layers,
                                   axis_name)
  return [_numerics.Norm(*(v.astype(dtype) for v in n))
          for n in parts], rebuild


def _per_tensor(n, gamma, last, *, warm, t_abs, t_rel, decay, s_global,
                track_warm, eps, dtype, again):
  """One tensor's threshold, recorded scale and new ``gamma`` (its EMA of
  clipped norms; during warm-up, the smallest norm seen; its norm, where
  ``again`` (the last step was after warm-up, with ``follow``) and it is
  clipped now and was at the last step, whose factor was ``last``), and the
  factor to apply as a :class:`Scale` pair (exact where it is
  subnormal)."""
  t = jnp.where(warm, t_abs, t_rel * gamma)
  own = _numerics.clip_factors(
      _numerics.Norm(n.power, n.scaled + eps / n.power), t_rel * gamma)
  s = _numerics.Scale(*(jnp.where(warm, g, o) for g, o in zip(s_global, own)))
  # The clipped norm ||h_i|| (||g_i|| during warm-up), finite where the
  # norm overflows: the power of two meets the factor first.
  kept = ((n.power * s.a) * s.b) * n.scaled
  ema = decay * gamma + (1 - decay) * kept
  new_gamma = jnp.where(
      warm, jnp.where(track_warm, jnp.minimum(gamma, kept), gamma),
      jnp.where(jnp.isfinite(kept), ema, gamma))
  raw = n.value()
  adopt = again & ~warm & (s.value() < 1) & (last < 1) & jnp.isfinite(raw)
  new_gamma = jnp.where(adopt, raw, new_gamma)
  return (t.astype(dtype), s.value().astype(dtype), new_gamma.astype(dtype),
          s)


def _check_same_tree(updates: Any, gamma: Any,
                     layers: list[int | None]) -> None:
  """Each tensor keeps its own ``gamma``: the updates must have the tree
  (and each stacked leaf the number of layers) ``init`` was given."""
  leaves = _tree.float_leaves(updates, "adagc")
  got = [_tree.tensor_shape(x, k) for x, k in zip(leaves, layers)]
  want = [jnp.shape(g) for g in _tree.float_leaves(gamma, "adagc")]
  if got != want:
    raise ValueError(
        "adagc keeps one reference norm (gamma) per tensor of the tree init"
        " was given (one per layer of a stacked leaf), so the updates must"
        f" have as many leaves and layers: got {len(got)} leaves"
        f" {jax.tree_util.tree_structure(updates)}, initialised with"
        f" {len(want)} {jax.tree_util.tree_structure(gamma)}. Call init on"
        " a tree like the updates (e.g. the params the gradients are taken"
        " of).")


def _check(max_ratio, decay, warmup_steps, max_norm, eps, follow):
  caller = "adagc"
  _validate.check_range(max_ratio, "max_ratio", caller, lo=0.0, hi=np.inf,
                        open_lo=True)
  _validate.check_range(decay, "decay", caller, lo=0.0, hi=1.0)
  _validate.check_int(warmup_steps, "warmup_steps", caller, lo=1)
  _validate.check_threshold(max_norm, "max_norm", caller)
  _validate.check_range(eps, "eps", caller, lo=0.0, hi=np.inf)
  _validate.check_bool(follow, "follow", caller)

