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
import optax

from optaxclip import _example_clip, _per_example, _transform, _tree, _validate
from optaxclip._example_clip import PerExampleInfo


class QuantileNorm(NamedTuple):
  """An adaptive clipping norm; build it with :func:`quantile_norm`."""

  initial: float
  target_quantile: float
  learning_rate: float
  count_noise_multiplier: float


def quantile_norm(
    initial: float = 1.0,
    target_quantile: float = 0.5,
    learning_rate: float = 0.2,
    *,
    count_noise_multiplier: float = 0.0,
) -> QuantileNorm:
  """A clipping norm that tracks a quantile of the per-example norms.

  Pass it as ``max_norm`` to :func:`dp_aggregate` or :func:`dp_noise`. After
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
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> dp = oc.dp_aggregate(oc.quantile_norm(1.0, 0.5, learning_rate=0.5),
    ...                      noise_multiplier=0.0, seed=0)
    >>> grads = {"w": jnp.array([[3.0], [4.0], [5.0], [6.0]])}  # all clipped
    >>> state = dp.init({"w": jnp.zeros(1)})
    >>> _, state = dp.update(grads, state)
    >>> print(state.threshold, state.next_threshold)  # exp(0.25): it grows
    1.0 1.2840254
  """
  where = "quantile_norm"
  _validate.check_range(initial, "initial", where, lo=0, hi=math.inf,
                      open_lo=True, open_hi=True)
  _validate.check_range(target_quantile, "target_quantile", where, lo=0, hi=1)
  _validate.check_range(learning_rate, "learning_rate", where, lo=0,
                      hi=math.inf, open_hi=True)
  _validate.check_range(count_noise_multiplier, "count_noise_multiplier", where,
                      lo=0, hi=math.inf, open_hi=True)
  return QuantileNorm(initial, target_quantile, learning_rate,
                      count_noise_multiplier)


class DPState(NamedTuple):
  """State of :func:`dp_aggregate` and :func:`dp_noise`.

  Attributes:
    count: steps taken (int32).
    key: the PRNG key for the next step's noise.
    threshold: the clipping norm in force at the last step.
    next_threshold: the clipping norm for the next step (the same as
      ``threshold`` unless adaptive; with :func:`dp_noise`, pass it to
      ``clipped_grad``'s function as ``max_norm``).
    noise_std: the standard deviation of the noise added to the clipped sum
      at the last step (before dividing by the batch size).
    clipped: whether any example was clipped at the last step.
    frac_clipped: the fraction of the last step's counted examples clipped.
    num_clipped: how many steps have clipped some example so far.
    num_examples: examples counted at the last step (not padding, finite).
    num_nonfinite: non-finite examples dropped at the last step.
    mean_norm: the mean pre-clip norm of the last step's counted examples.
    max_norm_seen: the largest pre-clip norm among them.
    frac_unclipped: the (noised, for the adaptive norm) fraction of the batch
      left unclipped, which drives :func:`quantile_norm`'s update.
  """

  count: jax.Array
  key: jax.Array
  threshold: jax.Array
  next_threshold: jax.Array
  noise_std: jax.Array
  clipped: jax.Array
  frac_clipped: jax.Array
  num_clipped: jax.Array
  num_examples: jax.Array
  num_nonfinite: jax.Array
  mean_norm: jax.Array
  max_norm_seen: jax.Array
  frac_unclipped: jax.Array


def dp_aggregate(
    max_norm: float | jax.Array | QuantileNorm,
    noise_multiplier: float,
    *,
    seed: int,
    per_layer: bool | Any = False,
    normalize: bool = False,
    automatic: float | None = None,
    nan_safe: bool = True,
    batch_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DP-SGD's aggregation step on per-example gradients, chainable.

  The update must hold per-example gradients (a leading batch axis on every
  leaf, e.g. from ``jax.vmap(jax.grad(loss))``); the output has no batch axis:
  ``(per_example_clip(grads, C) + N(0, (noise_multiplier * S)^2)) / batch``,
  with ``S`` the sensitivity (``C``, also with ``automatic``; 1 with
  ``normalize``), the semantics of
  ``optax.contrib.differentially_private_aggregate`` plus per-layer and
  normalised clipping, NaN safety, a padding mask, an adaptive norm and
  statistics. Place it first in a chain: ``optax.chain(oc.dp_aggregate(...),
  optax.adam(...))``. ``update`` takes an optional keyword ``example_mask``
  (``(batch,)`` booleans, ``False`` for padding); ``optax.chain`` forwards it.

  Args:
    max_norm: the per-example clipping norm (a number or JAX scalar), or a
      :func:`quantile_norm` to adapt it.
    noise_multiplier: the noise standard deviation in units of the
      sensitivity (>= 0; 0 adds no noise).
    seed: seeds the PRNG key kept in the state.
    per_layer: see :func:`optaxclip.per_example_clip`.
    normalize: see :func:`optaxclip.per_example_clip`.
    automatic: ``gamma`` of automatic clipping (Bu et al. 2022), or ``None``;
      see :func:`optaxclip.per_example_clip`.
    nan_safe: see :func:`optaxclip.per_example_clip`.
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
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = optax.chain(oc.dp_aggregate(1.0, noise_multiplier=0.0, seed=0),
    ...                   optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> per_example = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> updates, state = opt.update(per_example, state, params)
    >>> print(updates["w"], state[0].frac_clipped)
    [-0.45 -0.6 ] 0.5
  """
  where = "dp_aggregate"
  _check_noise(noise_multiplier, batch_size, seed, where, max_norm)
  if not isinstance(max_norm, QuantileNorm):
    _example_clip.check_options(max_norm, per_layer, normalize, where,
                                automatic)
  elif automatic is not None:
    _example_clip.check_options(max_norm.initial, per_layer, normalize,
                                where, automatic)

  def init_fn(params):
    return _init_state(max_norm, seed, _tree.tree_acc_dtype(params))

  def update_fn(updates, state, params=None, *, example_mask=None, **extra):
    del params, extra
    total, info = _per_example.per_example_clip(
        updates, state.next_threshold, per_layer=per_layer,
        normalize=normalize, automatic=automatic, nan_safe=nan_safe,
        example_mask=example_mask)
    return _noise_step(total, info, state, max_norm, noise_multiplier,
                       batch_size)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


def dp_noise(
    noise_multiplier: float,
    *,
    seed: int,
    max_norm: QuantileNorm | None = None,
    batch_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Adds DP-SGD's noise to the output of :func:`optaxclip.clipped_grad`.

  ``update(clipped_sum, state, params, clip_info=info)`` returns
  ``(clipped_sum + N(0, (noise_multiplier * info.sensitivity)^2)) / batch``:
  the noise is calibrated from the :class:`optaxclip.PerExampleInfo` that
  ``clipped_grad(..., return_norms=True)`` returned with the sum, so it always
  matches the clipping that was done. ``optax.chain`` and
  ``nnx.Optimizer.update`` forward ``clip_info`` to it.

  It must be the first link of the chain, before the learning rate and any
  other transformation: the sensitivity describes the clipped sum itself,
  and a link before it (a learning rate, momentum) would rescale the sum
  but not the noise. That cannot be detected from inside the chain, which
  hands each link only the previous link's output, so it is not checked.

  Args:
    noise_multiplier: the noise standard deviation in units of the
      sensitivity (>= 0).
    seed: seeds the PRNG key kept in the state.
    max_norm: ``None`` (the clipping norm is ``clipped_grad``'s), or a
      :func:`quantile_norm`: the state's ``next_threshold`` is then the norm
      to clip the next batch with (``grad_fn(..., max_norm=...)``).
    batch_size: the divisor; ``None`` for ``info.batch_size`` (the leading
      dimension, padding included). Under Poisson sampling give the expected
      batch size.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`DPState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> loss = lambda w, x: 0.5 * jnp.mean((x - w) ** 2)
    >>> grad_fn = oc.clipped_grad(loss, max_norm=1.0, return_norms=True)
    >>> noise = oc.dp_noise(noise_multiplier=1.0, seed=0)
    >>> state = noise.init(jnp.zeros(()))
    >>> g, info = grad_fn(0.0, jnp.array([2.0, -0.5, 3.0, 1.0]))
    >>> update, state = noise.update(g, state, clip_info=info)
    >>> print(state.noise_std, state.num_examples, state.frac_clipped)
    1.0 4 0.5
  """
  where = "dp_noise"
  _check_noise(noise_multiplier, batch_size, seed, where, max_norm)
  if max_norm is not None and not isinstance(max_norm, QuantileNorm):
    raise TypeError(f"{where}: max_norm is None (the norm clipped_grad used)"
                    " or an oc.quantile_norm(...); a fixed norm belongs to"
                    f" clipped_grad. Got {type(max_norm).__name__}.")

  def init_fn(params):
    return _init_state(max_norm, seed, _tree.tree_acc_dtype(params))

  def update_fn(updates, state, params=None, *, clip_info=None, **extra):
    del params, extra
    if not isinstance(clip_info, PerExampleInfo):
      raise TypeError(
          f"{where}: update needs clip_info=, the PerExampleInfo that"
          " oc.clipped_grad(..., return_norms=True) returns with the sum"
          f" (got {type(clip_info).__name__}).")
    return _noise_step(updates, clip_info, state, max_norm, noise_multiplier,
                       batch_size)

  return _transform.transformation(init_fn, update_fn, extra_args=True)


# ----------------------------------------------------------------------------


def _check_noise(noise_multiplier, batch_size, seed, where, max_norm=None):
  if isinstance(max_norm, QuantileNorm):  # Built by hand: check it as built.
    quantile_norm(*max_norm[:3], count_noise_multiplier=max_norm[3])
  _validate.check_range(noise_multiplier, "noise_multiplier", where, lo=0,
                      hi=math.inf, open_hi=True)
  if batch_size is not None:
    _validate.check_int(batch_size, "batch_size", where, lo=1)
  _validate.check_int(seed, "seed", where, lo=-(2**63))


def _init_state(max_norm, seed, dtype):
  if isinstance(max_norm, QuantileNorm):
    t = jnp.asarray(max_norm.initial, dtype)
  elif max_norm is None:
    t = jnp.full((), jnp.nan, dtype)  # Set by the first clip_info.
  else:
    t = jnp.asarray(max_norm, dtype)
  zero = jnp.zeros((), dtype)
  izero = jnp.zeros((), jnp.int32)
  return DPState(
      count=izero, key=jax.random.PRNGKey(seed), threshold=t,
      next_threshold=t, noise_std=zero, clipped=jnp.zeros((), bool),
      frac_clipped=jnp.zeros((), jnp.float32), num_clipped=izero,
      num_examples=izero, num_nonfinite=izero, mean_norm=zero,
      max_norm_seen=zero, frac_unclipped=jnp.zeros((), jnp.float32))


def _noise_step(total, info: PerExampleInfo, state: DPState, max_norm,
                noise_multiplier, batch_size):
  """Noise, divide by the batch size, update the threshold and statistics."""
  dtype = state.threshold.dtype
  adaptive = isinstance(max_norm, QuantileNorm)
  z = _grad_noise_multiplier(noise_multiplier, max_norm)
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
  num_unclipped = (n - info.num_clipped).astype(jnp.float32)
  if adaptive:
    s = max_norm.count_noise_multiplier
    noisy = num_unclipped + s * jax.random.normal(count_key, (), jnp.float32)
    frac_unclipped = noisy / denom.astype(jnp.float32)
    step = -max_norm.learning_rate * (frac_unclipped
                                      - max_norm.target_quantile)
    next_threshold = threshold * jnp.exp(step).astype(dtype)
  else:
    frac_unclipped = num_unclipped / jnp.maximum(n, 1)
    next_threshold = state.next_threshold if max_norm is not None else threshold
  counted = info.included
  norms = info.norms.astype(dtype)
  mean = jnp.sum(jnp.where(counted, norms, 0)) / jnp.maximum(n, 1).astype(
      dtype)
  biggest = jnp.max(jnp.where(counted, norms, 0), initial=0)
  clipped = info.num_clipped > 0
  return jax.tree_util.tree_unflatten(treedef, out), DPState(
      count=optax.safe_increment(state.count), key=key, threshold=threshold,
      next_threshold=next_threshold, noise_std=std, clipped=clipped,
      frac_clipped=info.num_clipped / jnp.maximum(n, 1).astype(jnp.float32),
      num_clipped=state.num_clipped + clipped.astype(jnp.int32),
      num_examples=n, num_nonfinite=info.num_nonfinite, mean_norm=mean,
      max_norm_seen=biggest, frac_unclipped=frac_unclipped)


def _grad_noise_multiplier(z, max_norm):
  """The gradient noise multiplier: ``z``, or raised to pay for the count."""
  if not isinstance(max_norm, QuantileNorm) or not (
      max_norm.count_noise_multiplier > 0) or not z > 0:
    return z
  s = max_norm.count_noise_multiplier
  if not s > z / 2:
    raise ValueError(
        f"quantile_norm: count_noise_multiplier={s} must exceed half the"
        f" noise_multiplier ({z / 2}) for the gradient noise to pay for the"
        " private count (Andrew et al. 2021, Theorem 1).")
  return float((z ** -2 - (2 * s) ** -2) ** -0.5)

