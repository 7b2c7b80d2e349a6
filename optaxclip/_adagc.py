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
from optaxclip._thresholds import Threshold


class AdaGCState(NamedTuple):
  """State of :func:`adagc`.

  Every tree below has the structure of the updates, one scalar per tensor
  (``optax.MaskedNode`` where the updates have one); with ``layer_axis``, a
  stacked leaf holds one value per layer, shape ``(num_layers,)``.

  Attributes:
    count: updates seen so far (int32); warm-up while ``count <
      warmup_steps``.
    grad_norm: each tensor's 2-norm before clipping (a tree).
    global_norm: the global 2-norm of the last update before clipping.
    threshold: the norm each tensor was held to at the last update (a
      tree): ``lambda_rel * gamma`` after warm-up; during warm-up the
      global threshold ``lambda_abs`` (it bounds the global norm, not each
      tensor's).
    scale: the factor each tensor was multiplied by (a tree).
    clipped: whether any tensor of the last update was scaled down.
    num_clipped: how many updates have had a tensor scaled down so far.
    frac_clipped: the fraction of tensors scaled down at the last update.
    gamma: each tensor's reference norm ``gamma_i`` after the last update
      (a tree; ``inf`` until a finite norm was seen).
  """

  count: jax.Array
  grad_norm: Any
  global_norm: jax.Array
  threshold: Any
  scale: Any
  clipped: jax.Array
  num_clipped: jax.Array
  frac_clipped: jax.Array
  gamma: Any


def adagc(
    lambda_rel: Threshold = 1.05,
    beta: Threshold = 0.98,
    warmup_steps: int = 100,
    lambda_abs: Threshold = 1.0,
    *,
    eps: float = 0.0,
    axis_name: AxisName = None,
    layer_axis: Any = None,
) -> optax.GradientTransformation:
  r"""AdaGC: clips each tensor relative to an EMA of its own clipped norms.

  Each tensor ``i`` (each leaf of the updates) keeps a reference norm
  ``gamma_i``. With ``g_i`` the tensor's gradient at step ``t`` (counting
  from 1) and ``T = warmup_steps``:

  1. Warm-up, ``t <= T``: the whole update is clipped to global 2-norm
     ``lambda_abs``, ``g_i <- min(1, lambda_abs / ||g||) * g_i``, and
     ``gamma_i <- min(gamma_i, ||g_i||)`` with the clipped ``g_i``
     (``gamma_i`` starts at ``inf``, so at step 1 it is the first clipped
     norm).
  2. After warm-up, ``t > T``: each tensor is clipped on its own,
     ``h_i = min(1, lambda_rel * gamma_i / ||g_i||) * g_i``, and
     ``gamma_i <- beta * gamma_i + (1 - beta) * ||h_i||``.

  This is Algorithm 1 of the paper (its ``T_start`` is ``warmup_steps +
  1``), computed on the device with per-tensor norms accumulated in float32
  and a state of a few scalars per tensor; ``||h_i||`` is ``scale_i *
  ||g_i||``, so no second pass over the gradients is made. Deviations,
  each only where the paper's rule would produce a NaN or an Inf:

  - a warm-up step whose global norm is non-finite leaves every ``gamma``
    as it was (its clipped norms, ``0 * inf``, say nothing);
  - after warm-up, a tensor whose clipped norm is non-finite (a NaN or an
    Inf in that tensor) leaves its ``gamma`` as it was.

  The update itself still carries the NaN or Inf of such a step unless it
  is dropped, e.g. by :func:`optaxclip.skip_step`.

  Edge cases: a tensor whose gradient is exactly zero at any warm-up step
  gets ``gamma = 0`` and is then zeroed at every step (the paper's rule:
  ``||h|| <= lambda_rel * gamma`` keeps it at 0); ``lambda_abs = inf``
  turns warm-up clipping off; a tensor whose ``gamma`` is still ``inf``
  after warm-up (every warm-up step non-finite) is never clipped. A zero
  norm gives scale 1 (0 where the threshold is 0 too: the update is 0
  either way); a NaN norm gives a NaN scale.

  Args:
    lambda_rel: the relative threshold (> 0): each tensor's norm is held to
      ``lambda_rel * gamma_i``. A number, JAX scalar or Optax schedule of the
      step count.
    beta: the EMA decay of ``gamma`` in ``[0, 1]`` (number, scalar or
      schedule).
    warmup_steps: how many steps (>= 1) use global clipping to
      ``lambda_abs`` and set ``gamma`` to the running minimum.
    lambda_abs: the global-norm threshold during warm-up (>= 0; number,
      scalar or schedule).
    eps: added to each tensor's norm in the scale's denominator after
      warm-up, ``min(1, lambda_rel * gamma_i / (||g_i|| + eps))``, >= 0; 0
      (the default) is the paper's formula.
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
    >>> clip = oc.adagc(lambda_rel=1.05, beta=0.98, warmup_steps=2,
    ...                 lambda_abs=10.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 0.5])}
    >>> state = clip.init(g)
    >>> for s in [1.0, 0.8, 1.0]:  # Warm-up, then a step near the trend.
    ...   u, state = clip.update({k: s * v for k, v in g.items()}, state)
    >>> print(state.gamma["a"], state.gamma["b"], state.threshold["a"])
    4.004 0.4004 4.2
    >>> u, state = clip.update({k: 10 * v for k, v in g.items()}, state)
    >>> print(u["a"][1], state.scale["a"], state.clipped)  # A 10x spike.
    3.3634 0.084084 True
  """
  where = "adagc"
  _check(lambda_rel, beta, warmup_steps, lambda_abs, eps)
  _validate.check_layer_axis(layer_axis, where)

  def init_fn(params):
    dtype = _tree.tree_acc_dtype(params)
    leaves, rebuild = _tree.live_leaves(params, where)
    shapes = [_tree.tensor_shape(x, k) for (_, x), k in zip(
        leaves, _thresholds.leaf_layers(layer_axis, params, where))]

    def full(value):
      return rebuild([jnp.full(s, value, dtype) for s in shapes])

    return AdaGCState(
        **_stats.counters(frac=True), grad_norm=full(0),
        global_norm=jnp.zeros((), dtype), threshold=full(jnp.inf),
        scale=full(1), gamma=full(jnp.inf))

  def update_fn(updates, state, params=None):
    del params
    dtype = state.global_norm.dtype
    count = state.count
    layers = _thresholds.leaf_layers(layer_axis, updates, where)
    parts, rebuild = _tensor_norms(updates, axis_name, dtype, layers)
    total = _norms.combine(parts)  # Exact beyond overflow, as each part.
    warm = count < warmup_steps
    rel = _thresholds.resolve(lambda_rel, count, dtype)
    b = _thresholds.resolve(beta, count, dtype)
    t_abs = _thresholds.resolve(lambda_abs, count, dtype)
    step = functools.partial(
        _per_tensor, warm=warm, t_abs=t_abs, t_rel=rel, beta=b,
        s_global=_numerics.clip_factors(total, t_abs),
        track_warm=warm & jnp.isfinite(total.value()), eps=eps, dtype=dtype)
    out = [step(n, gamma) for n, gamma in
           zip(parts, _tree.float_leaves(state.gamma, where))]
    threshold, scale, gamma = (rebuild([o[i] for o in out]) for i in range(3))
    factors = [o[1] for o in out]
    updates = rebuild([_apply.scale_tensor(g, o[3], k) for g, o, k in zip(
        _tree.float_leaves(updates, where), out, layers)])
    num = sum((jnp.sum(s < 1, dtype=jnp.int32) for s in factors),
              jnp.zeros((), jnp.int32))
    return updates, AdaGCState(
        **_stats.tally(state, jnp.asarray(num) > 0, num=num,
                       of=sum(s.size for s in factors)),
        grad_norm=rebuild([n.value().astype(dtype) for n in parts]),
        global_norm=total.value().astype(dtype), threshold=threshold,
        scale=scale, gamma=gamma)

  return _transform.transformation(init_fn, update_fn)


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


def _per_tensor(n, gamma, *, warm, t_abs, t_rel, beta, s_global, track_warm,
                eps, dtype):
  """One tensor's threshold, recorded scale and new ``gamma`` (its EMA of
  clipped norms; during warm-up, the smallest norm seen), and the factor to
  apply as a :class:`Scale` pair (exact where it is subnormal)."""
  t = jnp.where(warm, t_abs, t_rel * gamma)
  own = _numerics.clip_factors(
      _numerics.Norm(n.power, n.scaled + eps / n.power), t_rel * gamma)
  s = _numerics.Scale(*(jnp.where(warm, g, o) for g, o in zip(s_global, own)))
  # The clipped norm ||h_i|| (||g_i|| during warm-up), finite where the
  # norm overflows: the power of two meets the factor first.
  kept = ((n.power * s.a) * s.b) * n.scaled
  ema = beta * gamma + (1 - beta) * kept
  new_gamma = jnp.where(
      warm, jnp.where(track_warm, jnp.minimum(gamma, kept), gamma),
      jnp.where(jnp.isfinite(kept), ema, gamma))
  return (t.astype(dtype), s.value().astype(dtype), new_gamma.astype(dtype),
          s)


def _check(lambda_rel, beta, warmup_steps, lambda_abs, eps):
  where = "adagc"
  _validate.check_range(lambda_rel, "lambda_rel", where, lo=0.0, hi=np.inf,
                      open_lo=True)
  _validate.check_range(beta, "beta", where, lo=0.0, hi=1.0)
  _validate.check_int(warmup_steps, "warmup_steps", where, lo=1)
  _validate.check_threshold(lambda_abs, "lambda_abs", where)
  _validate.check_range(eps, "eps", where, lo=0.0, hi=np.inf)

