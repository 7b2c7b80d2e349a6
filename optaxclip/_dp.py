"""DP-SGD aggregation: clipped sum, Gaussian noise, adaptive clipping norm.

:func:`dp_aggregate` takes per-example gradients (Optax's
``differentially_private_aggregate``); :func:`dp_noise` takes the output of
:func:`optaxclip.clipped_grad` (the common path: per-example gradients need
not exist as a tree). Both add ``N(0, (noise_multiplier * sensitivity)^2)``
noise to the clipped sum, divide by the batch size, and record statistics in a
:class:`DPState`. :func:`quantile_norm` makes the clipping norm follow a
quantile of the per-example norms (Andrew et al. 2021).

What is guaranteed: the clipped sum has the sensitivity recorded in
:class:`optaxclip.PerExampleInfo` and the noise is calibrated to it. What is
not: the privacy spent (epsilon) depends on how batches are sampled and on the
number of steps; computing it is the caller's, e.g. with ``dp-accounting``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _example_clip, _per_example, _stats, _transform, _tree, _validate
from optaxclip._example_clip import ExampleClip, PerExampleInfo
from optaxclip._stats import ClipStats

_SEED = ("is now key= (a jax.random key; an int n stands for"
         " jax.random.PRNGKey(n), so key=0 gives what seed=0 gave)")


class QuantileNorm(NamedTuple):
  """An adaptive clipping norm; build it with :func:`quantile_norm`."""

  initial: float
  target_quantile: float
  learning_rate: float
  count_noise_multiplier: float


def quantile_norm(
    initial: float = 1.0,
    *,
    target_quantile: float = 0.5,
    learning_rate: float = 0.2,
    count_noise_multiplier: float = 0.0,
) -> QuantileNorm:
  """A clipping norm that tracks a quantile of the per-example norms.

  Pass it as ``clip`` (or an :class:`~optaxclip.ExampleClip`'s ``max_norm``)
  to :func:`dp_aggregate`, or as ``adaptive_norm`` to :func:`dp_noise`. After
  each step, with ``b`` the fraction of the batch whose norm was at most the
  threshold ``C`` (noised: ``(#unclipped + N(0, s^2)) / batch_size`` with
  ``s = count_noise_multiplier``), the threshold becomes
  ``C * exp(-learning_rate * (b - target_quantile))``: the geometric update
  of Andrew et al. (2021). With ``count_noise_multiplier > 0`` the count is
  private too, and the gradient noise multiplier is raised to
  ``(z^-2 - (2 s)^-2)^-1/2`` so that the step as a whole has the privacy of
  noise multiplier ``z`` (their Theorem 1); this needs ``s > z / 2``. With
  ``count_noise_multiplier=0`` the threshold depends on the data without
  noise: the threshold itself is then not private.

  Args:
    initial: the first threshold (> 0).
    target_quantile: the fraction of examples to leave unclipped, in [0, 1].
    learning_rate: the step of the geometric update (>= 0).
    count_noise_multiplier: standard deviation of the noise on the count of
      unclipped examples (>= 0).

  Returns:
    A :class:`QuantileNorm`.

  References:
    Andrew et al., `Differentially Private Learning with Adaptive Clipping
    <https://arxiv.org/abs/1905.03871>`_, NeurIPS 2021.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> dp = oc.dp_aggregate(oc.quantile_norm(1.0, target_quantile=0.5, learning_rate=0.5),
    ...                      noise_multiplier=0.0, key=jax.random.key(0))
    >>> grads = {"w": jnp.array([[3.0], [4.0], [5.0], [6.0]])}  # all clipped
    >>> state = dp.init({"w": jnp.zeros(1)})
    >>> _, state = dp.update(grads, state)
    >>> print(state.stats.threshold, state.next_threshold)  # exp(0.25): grows
    1.0 1.2840254
  """
  caller = "quantile_norm"
  _validate.check_range(initial, "initial", caller, lo=0, hi=math.inf,
                      open_lo=True, open_hi=True)
  _validate.check_range(target_quantile, "target_quantile", caller, lo=0, hi=1)
  _validate.check_range(learning_rate, "learning_rate", caller, lo=0,
                      hi=math.inf, open_hi=True)
  _validate.check_range(count_noise_multiplier, "count_noise_multiplier", caller,
                      lo=0, hi=math.inf, open_hi=True)
  return QuantileNorm(initial, target_quantile, learning_rate,
                      count_noise_multiplier)


@_stats.named("dp")
class DPState(NamedTuple):
  """State of :func:`dp_aggregate` and :func:`dp_noise`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats`: ``threshold`` is the clipping
      norm in force at the last step (NaN before the first step of a
      :func:`dp_noise` without ``adaptive_norm``: the norm comes with the
      first ``clip_info``); ``clipped`` whether any example was clipped at
      the last step, ``num_clipped`` how many steps clipped some example so
      far, ``frac_clipped`` the fraction of the last step's counted examples
      clipped. ``norm`` and ``scale`` are ``None``: each example has its
      own (``mean_norm``, ``largest_norm``).
    key: the PRNG key for the next step's noise (raw key data, as
      ``jax.random.PRNGKey`` makes it, for a key of JAX's default
      implementation).
    next_threshold: the clipping norm for the next step (the same as
      ``threshold`` unless adaptive; with :func:`dp_noise`, pass it to
      ``clipped_grad``'s function as ``max_norm``).
    noise_std: the standard deviation of the noise added to the clipped sum
      at the last step (before dividing by the batch size).
    num_examples: examples counted at the last step (not padding, finite).
    num_nonfinite: non-finite examples dropped at the last step.
    mean_norm: the mean pre-clip norm of the last step's counted examples.
    largest_norm: the largest pre-clip norm among them.
    frac_unclipped: the (noised, for the adaptive norm) fraction of the batch
      left unclipped, which drives :func:`quantile_norm`'s update.
  """

  stats: ClipStats
  key: jax.Array
  next_threshold: jax.Array
  noise_std: jax.Array
  num_examples: jax.Array
  num_nonfinite: jax.Array
  mean_norm: jax.Array
  largest_norm: jax.Array
  frac_unclipped: jax.Array


@_validate.renamed(
    max_norm="is now clip= (a number, an oc.quantile_norm(...), or"
    " oc.ExampleClip(max_norm, ...))",
    **_example_clip.MOVED_INTO_RULE,
    seed=_SEED)
def dp_aggregate(
    clip: float | jax.Array | QuantileNorm | ExampleClip,
    noise_multiplier: float,
    *,
    key: jax.Array | int,
    batch_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DP-SGD's aggregation step on per-example gradients, chainable.

  The update must hold per-example gradients (a leading batch axis on every
  leaf, e.g. from ``jax.vmap(jax.grad(loss))``); the output has no batch axis:
  ``(per_example_clip(grads, clip) + N(0, (noise_multiplier * S)^2)) /
  batch``, with ``S`` the sensitivity (the clipping norm ``C``, also with
  ``automatic``; 1 with ``normalize``), the semantics of
  ``optax.contrib.differentially_private_aggregate`` plus per-layer and
  normalised clipping, NaN safety, a padding mask, an adaptive norm and
  statistics. Place it first in a chain: ``optax.chain(oc.dp_aggregate(...),
  optax.adam(...))``. ``update`` takes an optional keyword ``example_mask``
  (``(batch,)`` booleans, ``False`` for padding); ``optax.chain`` forwards it.

  Args:
    clip: the per-example clipping norm (a number or JAX scalar), or a
      :func:`quantile_norm` to adapt it; or an :class:`~optaxclip.ExampleClip`
      whose ``max_norm`` is either (per-layer, normalised or automatic
      clipping, NaN safety; see :func:`optaxclip.per_example_clip`).
    noise_multiplier: the noise standard deviation in units of the
      sensitivity (>= 0; 0 adds no noise).
    key: the PRNG key of the noise (``jax.random.key(0)`` or
      ``jax.random.PRNGKey(0)``), kept in the state; an int ``n`` stands for
      ``jax.random.PRNGKey(n)``.
    batch_size: the divisor; ``None`` for the leading dimension of the
      update, padding included. Under Poisson sampling give the *expected*
      batch size: dividing by the number of real examples would leak it.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`DPState`.

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = optax.chain(
    ...     oc.dp_aggregate(1.0, noise_multiplier=0.0, key=jax.random.key(0)),
    ...     optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> updates, state = opt.update(per_example, state, params)
    >>> print(updates["w"], state[0].stats.frac_clipped)
    [-0.45 -0.6 ] 0.5
  """
  caller = "dp_aggregate"
  norm = clip.max_norm if isinstance(clip, ExampleClip) else clip
  adaptive = norm if isinstance(norm, QuantileNorm) else None
  _check_noise(noise_multiplier, batch_size, key, caller, adaptive)
  rule = _example_clip.as_rule(clip, caller, adaptive=(QuantileNorm,))

  def init_fn(params):
    return _init_state(rule.max_norm, key, _tree.tree_acc_dtype(params))

  def update_fn(updates, state, params=None, *, example_mask=None, **extra):
    del params, extra
    total, info = _per_example.per_example_clip(
        updates, rule._replace(max_norm=state.next_threshold),
        example_mask=example_mask)
    return _noise_step(total, info, state, adaptive, noise_multiplier,
                       batch_size, follow=False)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


@_validate.renamed(max_norm="adaptive_norm", seed=_SEED)
def dp_noise(
    noise_multiplier: float,
    *,
    key: jax.Array | int,
    adaptive_norm: QuantileNorm | None = None,
    batch_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Adds DP-SGD's noise to the output of :func:`optaxclip.clipped_grad`.

  ``update(clipped_sum, state, params, clip_info=info)`` returns
  ``(clipped_sum + N(0, (noise_multiplier * info.sensitivity)^2)) / batch``:
  the noise is calibrated from the :class:`optaxclip.PerExampleInfo` that
  ``clipped_grad``'s function returned with the sum, so it always matches
  the clipping that was done. ``optax.chain`` and ``nnx.Optimizer.update``
  forward ``clip_info`` to it.

  It must be the first link of the chain, before the learning rate and any
  other transformation: the sensitivity describes the clipped sum itself,
  and a link before it (a learning rate, momentum) would rescale the sum
  but not the noise. That cannot be detected from inside the chain, which
  hands each link only the previous link's output, so it is not checked.

  Args:
    noise_multiplier: the noise standard deviation in units of the
      sensitivity (>= 0).
    key: the PRNG key of the noise (``jax.random.key(0)`` or
      ``jax.random.PRNGKey(0)``), kept in the state; an int ``n`` stands for
      ``jax.random.PRNGKey(n)``.
    adaptive_norm: ``None`` (the clipping norm is ``clipped_grad``'s), or a
      :func:`quantile_norm`: the state's ``next_threshold`` is then the norm
      to clip the next batch with (``grad_fn(..., max_norm=...)``).
    batch_size: the divisor; ``None`` for ``info.batch_size`` (the leading
      dimension, padding included). Under Poisson sampling give the expected
      batch size.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`DPState`.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> loss = lambda w, x: 0.5 * jnp.mean((x - w) ** 2)
    >>> grad_fn = oc.clipped_grad(loss, clip=1.0)
    >>> noise = oc.dp_noise(noise_multiplier=1.0, key=jax.random.key(0))
    >>> state = noise.init(jnp.zeros(()))
    >>> g, info = grad_fn(0.0, jnp.array([2.0, -0.5, 3.0, 1.0]))
    >>> update, state = noise.update(g, state, clip_info=info)
    >>> print(state.noise_std, state.num_examples, state.stats.frac_clipped)
    1.0 4 0.5
  """
  caller = "dp_noise"
  if adaptive_norm is not None and not isinstance(adaptive_norm, QuantileNorm):
    raise TypeError(f"{caller}: adaptive_norm is None (the norm clipped_grad"
                    " used) or an oc.quantile_norm(...); a fixed norm belongs"
                    f" to clipped_grad. Got {type(adaptive_norm).__name__}.")
  _check_noise(noise_multiplier, batch_size, key, caller, adaptive_norm)

  def init_fn(params):
    return _init_state(adaptive_norm, key, _tree.tree_acc_dtype(params))

  def update_fn(updates, state, params=None, *, clip_info=None, **extra):
    del params, extra
    if not isinstance(clip_info, PerExampleInfo):
      raise TypeError(
          f"{caller}: update needs clip_info=, the PerExampleInfo that"
          " oc.clipped_grad's function returns with the sum (g, info ="
          f" grad_fn(...)); got {type(clip_info).__name__}.")
    return _noise_step(updates, clip_info, state, adaptive_norm,
                       noise_multiplier, batch_size,
                       follow=adaptive_norm is None)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


# ----------------------------------------------------------------------------


def _check_noise(noise_multiplier, batch_size, key, caller, adaptive=None):
  if adaptive is not None:  # Built by hand: check it as built.
    quantile_norm(adaptive[0], target_quantile=adaptive[1],
                  learning_rate=adaptive[2], count_noise_multiplier=adaptive[3])
  _validate.check_range(noise_multiplier, "noise_multiplier", caller, lo=0,
                        hi=math.inf, open_hi=True)
  if batch_size is not None:
    _validate.check_int(batch_size, "batch_size", caller, lo=1)
  _check_key(key, caller)


def _is_seed(key: Any) -> bool:
  """An int (or integer scalar) seed rather than a PRNG key."""
  return (isinstance(key, (int, np.integer)) and not isinstance(key, bool)
          ) or (isinstance(key, (np.ndarray, jax.Array)) and key.ndim == 0
                and jnp.issubdtype(key.dtype, jnp.integer))


def _check_key(key: Any, caller: str) -> None:
  """``key`` is a PRNG key (typed, or raw ``uint32`` data) or an int seed."""
  if _is_seed(key):
    _validate.check_int(key, "key", caller, lo=-(2**63))
    return
  if isinstance(key, (np.ndarray, jax.Array)) and (
      (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 0)
      or (key.dtype == jnp.uint32 and key.ndim == 1)):
    return
  raise TypeError(
      f"{caller}: key must be a JAX PRNG key (jax.random.key(0) or"
      " jax.random.PRNGKey(0)) or an int, which stands for"
      f" jax.random.PRNGKey(int); got {key!r}.")


def _state_key(key: Any) -> jax.Array:
  """The key kept in the state: raw key data, as ``jax.random.PRNGKey``
  makes it (the same random numbers), unless it is a typed key of another
  implementation than JAX's default."""
  if _is_seed(key):
    return jax.random.PRNGKey(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and str(
      jax.random.key_impl(key)) == str(jax.random.key_impl(jax.random.key(0))):
    return jax.random.key_data(key)
  return key


def _init_state(max_norm, key, dtype):
  if isinstance(max_norm, QuantileNorm):
    t = jnp.asarray(max_norm.initial, dtype)
  elif max_norm is None:
    t = jnp.full((), jnp.nan, dtype)  # Set by the first clip_info.
  else:
    t = jnp.asarray(max_norm, dtype)
  zero = jnp.zeros((), dtype)
  izero = jnp.zeros((), jnp.int32)
  return DPState(
      stats=_stats.fresh(dtype, norm=False, threshold=t, scale=False,
                         frac=True),
      key=_state_key(key), next_threshold=t, noise_std=zero,
      num_examples=izero, num_nonfinite=izero, mean_norm=zero,
      largest_norm=zero, frac_unclipped=jnp.zeros((), jnp.float32))


def _noise_step(total, info: PerExampleInfo, state: DPState,
                adaptive: QuantileNorm | None, noise_multiplier, batch_size,
                *, follow: bool):
  """Noise, divide by the batch size, update the threshold and statistics.

  The next threshold follows ``adaptive``'s update, or with ``follow`` the
  norm ``info`` was clipped with; else it stays.
  """
  dtype = state.next_threshold.dtype
  z = _grad_noise_multiplier(noise_multiplier, adaptive)
  denom = (jnp.asarray(batch_size, dtype) if batch_size is not None
           else info.batch_size.astype(dtype))
  key, grad_key, count_key = jax.random.split(state.key, 3)
  # No noise means none, even for an infinite sensitivity (no clipping).
  std = jnp.asarray(0, dtype) if z == 0 else (
      jnp.asarray(z, dtype) * info.sensitivity.astype(dtype))
  leaves, treedef = jax.tree_util.tree_flatten(total)
  keys = jax.random.split(grad_key, len(leaves))
  out = []
  for x, k in zip(leaves, keys):
    acc = _tree.acc_dtype(x.dtype)
    noise = jax.random.normal(k, x.shape, acc) * std.astype(acc)
    out.append(((x.astype(acc) + noise) / denom.astype(acc)).astype(x.dtype))

  threshold = info.threshold.astype(dtype)
  n = info.num_examples
  num_unclipped = (n - info.num_examples_clipped).astype(jnp.float32)
  if adaptive is not None:
    s = adaptive.count_noise_multiplier
    noisy = num_unclipped + s * jax.random.normal(count_key, (), jnp.float32)
    frac_unclipped = noisy / denom.astype(jnp.float32)
    step = -adaptive.learning_rate * (frac_unclipped
                                      - adaptive.target_quantile)
    next_threshold = threshold * jnp.exp(step).astype(dtype)
  else:
    frac_unclipped = num_unclipped / jnp.maximum(n, 1)
    next_threshold = threshold if follow else state.next_threshold
  counted = info.included
  norms = info.norms.astype(dtype)
  mean = jnp.sum(jnp.where(counted, norms, 0)) / jnp.maximum(n, 1).astype(
      dtype)
  biggest = jnp.max(jnp.where(counted, norms, 0), initial=0)
  return jax.tree_util.tree_unflatten(treedef, out), DPState(
      stats=_stats.advance(state.stats, clipped=info.num_examples_clipped > 0,
                           num=info.num_examples_clipped, of=n,
                           threshold=threshold),
      key=key, next_threshold=next_threshold, noise_std=std, num_examples=n,
      num_nonfinite=info.num_nonfinite, mean_norm=mean, largest_norm=biggest,
      frac_unclipped=frac_unclipped)


def _grad_noise_multiplier(z, adaptive):
  """The gradient noise multiplier: ``z``, or raised to pay for the count."""
  if adaptive is None or not adaptive.count_noise_multiplier > 0 or not z > 0:
    return z
  s = adaptive.count_noise_multiplier
  if not s > z / 2:
    raise ValueError(
        f"quantile_norm: count_noise_multiplier={s} must exceed half the"
        f" noise_multiplier ({z / 2}) for the gradient noise to pay for the"
        " private count (Andrew et al. 2021, Theorem 1).")
  return float((z ** -2 - (2 * s) ** -2) ** -0.5)

