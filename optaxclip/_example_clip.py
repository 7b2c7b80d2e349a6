"""Per-example clipping shared by ``method="vmap"`` and ``method="ghost"``.

From per-example norms (:func:`optaxclip._norms.example_norms`, or ghost
norms) to each example's weight (:func:`clip_weights`), and the weighted sum
over examples (:func:`weighted_sum`); the :class:`PerExampleInfo` of a batch
and the checks of per-example arguments.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip import _norms, _thresholds, _tree, _validate
from optaxclip._numerics import clip_scale


class PerExampleInfo(NamedTuple):
  """What per-example clipping did to one batch.

  Attributes:
    norms: ``(batch,)``, each example's global 2-norm before clipping, in the
      accumulation dtype (NaN or inf for a non-finite example; padding
      examples have theirs too, and are ignored by everything else).
    threshold: the clipping norm in force (``max_norm``).
    sensitivity: the most one example can change the clipped sum (in
      2-norm): ``max_norm`` (with ``automatic`` too); ``1`` with
      ``normalize=True``; the root sum of squares of the per-layer
      thresholds with ``per_layer``.
    included: ``(batch,)``, the examples counted: not padding, finite norm.
    num_examples: how many are included (with ``nan_safe=False``, non-finite
      examples also enter the sum, which is then non-finite, but are not
      counted here).
    num_clipped: of those, how many were scaled down (norm above threshold;
      with ``per_layer``, above the threshold of some layer). With
      ``automatic``, which rescales every example, the same count: the
      examples whose norm is above the threshold.
    num_nonfinite: non-padding examples with a non-finite norm. With
      ``nan_safe`` they were dropped; without, they made the sum non-finite.
    batch_size: the leading dimension of the batch, padding included.
  """

  norms: jax.Array
  threshold: jax.Array
  sensitivity: jax.Array
  included: jax.Array
  num_examples: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array
  batch_size: jax.Array


def clip_sum(leaves, treedef, max_norm, *, per_layer, normalize, nan_safe,
              mask, where, automatic=None):
  """Sums of the clipped examples, one per leaf in the accumulation dtype."""
  leaf_norms, norms = _norms.example_norms(leaves)
  weights, keep, stats = clip_weights(
      leaf_norms, norms, treedef, max_norm, per_layer=per_layer,
      normalize=normalize, automatic=automatic, nan_safe=nan_safe, mask=mask,
      where=where)
  return [weighted_sum(x, w, keep) for x, w in zip(leaves, weights)], stats


def clip_weights(leaf_norms, norms, treedef, max_norm, *, per_layer,
                  normalize, nan_safe, mask, where, automatic=None):
  """Each example's weight per leaf (0 where dropped), the kept examples, stats.

  ``leaf_norms`` are the per-example norms of each leaf of the gradient tree
  ``treedef``, ``norms`` those of whole examples, all in the accumulation
  dtype. The weight is the clip factor ``min(1, t / n)``, or with
  ``automatic=gamma`` :func:`automatic_weight` ``t / (n + gamma)``; with
  ``normalize``, divided by the sensitivity.
  """
  dtype = norms.dtype
  t = jnp.asarray(max_norm, dtype)
  t = jnp.where(t >= 0, t, jnp.zeros((), dtype))  # NaN or negative: 0.
  if automatic is None:
    rule = clip_scale
  else:
    t = automatic_threshold(t, automatic)
    rule = functools.partial(automatic_weight, gamma=automatic)
  if per_layer is False:
    sensitivity = t
    over = norms > t
    scales = [rule(norms, t)] * len(leaf_norms)
  else:
    sensitivity, over, scales = _layer_scales(
        leaf_norms, norms, treedef, t, per_layer, rule, automatic, where)
  if normalize:
    # A run-time threshold of 0 (or NaN, or inf) leaves nothing to divide
    # by: every weight is 0 and the sum is 0, of sensitivity 1 as always.
    usable = (sensitivity > 0) & jnp.isfinite(sensitivity)
    scales = [jnp.where(usable, s / jnp.where(usable, sensitivity, 1), 0)
              for s in scales]
    sensitivity = jnp.ones((), dtype)
  finite = jnp.isfinite(norms)
  keep = mask & finite if nan_safe else mask
  counted = mask & finite
  count = lambda b: jnp.sum(b, dtype=jnp.int32)  # noqa: E731
  return [jnp.where(keep, s, 0) for s in scales], keep, PerExampleInfo(
      norms=norms, threshold=t, sensitivity=jnp.asarray(sensitivity, dtype),
      included=counted, num_examples=count(counted),
      num_clipped=count(counted & over), num_nonfinite=count(mask & ~finite),
      batch_size=jnp.asarray(mask.shape[0], jnp.int32))


def automatic_weight(norm: jax.Array, threshold: jax.Array, gamma: float
                     ) -> jax.Array:
  """Automatic clipping's weight ``threshold / (norm + gamma)`` (AUTO-S).

  The weighted example has norm ``norm * threshold / (norm + gamma)``, below
  ``threshold`` for every finite norm. The weight is at most
  ``threshold / gamma``, finite for a threshold from
  :func:`automatic_threshold`, so a zero example adds exactly 0. A NaN norm
  gives a NaN weight, an infinite one 0 (as the clip factor does: without
  ``nan_safe`` the sum is non-finite).
  """
  return threshold / (norm + jnp.asarray(gamma, norm.dtype))


def automatic_threshold(t: jax.Array, gamma: float) -> jax.Array:
  """A run-time threshold made safe for automatic clipping: NaN, negative
  and infinite ones act as 0 (an infinite one would make every weight
  infinite), and one above ``gamma`` times a quarter of the dtype's
  largest number is lowered to that, so that no weight overflows."""
  biggest = float(jnp.finfo(t.dtype).max)
  top = jnp.asarray(min(gamma * biggest / 4, biggest), t.dtype)
  ok = jnp.isfinite(t) & (t >= 0)
  return jnp.minimum(jnp.where(ok, t, jnp.zeros((), t.dtype)), top)


def _layer_scales(leaf_norms, norms, treedef, t, per_layer, rule, automatic,
                  where):
  """Per-layer clipping: the sensitivity, which examples had some layer
  above its threshold, and each leaf's weights (its layer's)."""
  dtype = norms.dtype
  thresholds, layer = _thresholds.layer_groups(
      per_layer, t, jax.tree_util.tree_unflatten(treedef, leaf_norms),
      dtype, where)
  if automatic is not None:
    thresholds = [automatic_threshold(x, automatic) for x in thresholds]
  sensitivity = jnp.sqrt(sum(jnp.square(x) for x in thresholds))
  over = jnp.zeros(norms.shape, bool)
  layer_scales: list[Any] = []
  for k, tl in enumerate(thresholds):
    members = [n for n, j in zip(leaf_norms, layer) if j == k]
    if not members:  # A prefix leaf over an empty subtree.
      layer_scales.append(None)
      continue
    n = _norms.example_norms([jnp.stack(members, axis=1)])[1]
    over |= n > tl
    layer_scales.append(rule(n, tl))
  return sensitivity, over, [layer_scales[j] for j in layer]


def weighted_sum(x, weights, keep):
  """``sum_i weights[i] * x[i]`` over the leading axis; dropped examples add 0."""
  acc = _tree.acc_dtype(x.dtype)
  k = keep.reshape((-1,) + (1,) * (x.ndim - 1))
  # Selects, not a multiply by 0: a dropped NaN example adds exactly 0.
  # The weighted sum over examples is a contraction, which XLA runs as a
  # matrix product: three times faster on CPU than a reduction over the
  # leading axis. HIGHEST precision: no reduced-precision passes on
  # GPU/TPU, which could push a clipped norm above max_norm.
  return jnp.tensordot(
      weights.astype(acc), jnp.where(k, x, 0).astype(acc), axes=1,
      precision=jax.lax.Precision.HIGHEST, out_sharding=_summed_sharding(x))


def _summed_sharding(x: jax.Array) -> Any:
  """The sharding of ``x`` summed over its leading axis, where JAX asks.

  Under explicit mesh axes a contraction over a sharded axis needs its output
  sharding spelled out: that of the remaining axes. Elsewhere, ``None``.
  """
  typeof = getattr(jax, "typeof", None)
  sharding = getattr(typeof(x) if typeof else None, "sharding", None)
  spec = getattr(sharding, "spec", None)
  if sharding is None or not spec or spec[0] is None:
    return None
  return jax.sharding.NamedSharding(sharding.mesh,
                                    jax.sharding.PartitionSpec(*spec[1:]))


def split_modules(args: tuple[Any, ...], grad_nums: tuple[int, ...]
                  ) -> tuple[tuple[Any, ...], dict[int, Any]]:
  """Each ``nnx.Module`` among the differentiated arguments replaced by the
  ``nnx.State`` of its ``nnx.Param`` variables (what is differentiated:
  not batch statistics, not RNG state), and per such argument the function
  that merges a state back into the module."""
  try:
    from flax import nnx
  except ImportError:  # No Flax, so no modules.
    return args, {}
  new_args, rebuild = list(args), {}
  for i in grad_nums:
    if isinstance(args[i], nnx.Module):
      graphdef, params, rest = nnx.split(args[i], nnx.Param, ...)  # type: ignore[misc]
      rebuild[i] = functools.partial(_merge, graphdef, rest=rest)
      new_args[i] = params
  return tuple(new_args), rebuild


@contextlib.contextmanager
def no_state_updates(where: str) -> Iterator[None]:
  """Explains Flax's error for a module that updates its own state (batch
  statistics, RNG counts) inside the per-example trace."""
  try:
    yield
  except Exception as e:
    if type(e).__name__ != "TraceContextError":
      raise
    raise ValueError(
        f"{where}: fun updates a variable of an nnx.Module that is not"
        f" differentiated ({e}). Each example runs in a trace of its own, whose"
        " state updates cannot come out, and a batch statistic or a shared"
        " random stream would mix examples. Call model.eval() (or"
        " use_running_average=True) for nnx.BatchNorm, or use nnx.LayerNorm"
        " or nnx.GroupNorm; for nnx.Dropout, pass one key per example as a"
        " batch argument and call the module with rngs=nnx.Rngs(dropout=key)."
    ) from e


def _merge(graphdef: Any, params: Any, *, rest: Any) -> Any:
  from flax import nnx
  return nnx.merge(graphdef, params, rest)


# ----------------------------------------------------------------------------
# Arguments.


def check_options(max_norm, per_layer, normalize, where, automatic=None):
  _validate.check_threshold(max_norm, "max_norm", where)
  if _validate.is_schedule(max_norm):
    raise TypeError(f"{where}: max_norm must be a number or a JAX scalar, not"
                    " a schedule (there is no step count here); pass the"
                    " value in force.")
  if per_layer is not False and per_layer is not True:
    _validate.check_threshold(per_layer, "per_layer", where, allow_tree=True)
  if normalize and _validate.is_concrete(max_norm):
    v = float(np.asarray(max_norm))
    if not 0 < v < math.inf:
      raise ValueError(f"{where}: normalize=True divides by max_norm, so it"
                       f" must be positive and finite; got {v}.")
  if automatic is not None:
    _check_automatic(automatic, max_norm, per_layer, where)


def _check_automatic(gamma, max_norm, per_layer, where):
  """``automatic`` is the stability constant gamma: a positive finite number,
  with ``max_norm / gamma`` (the largest weight) finite in float32."""
  if isinstance(gamma, (bool, np.bool_)) or not isinstance(
      gamma, (int, float, np.integer, np.floating)):
    raise TypeError(f"{where}: automatic is the stability constant gamma of"
                    " automatic clipping, a positive number (0.01 in Bu et"
                    f" al. 2022), or None to clip; got {gamma!r}.")
  g = float(gamma)
  tiny = float(np.finfo(np.float32).tiny)
  if not tiny <= g < math.inf:
    raise ValueError(f"{where}: automatic={g} is not a valid gamma; it must"
                     f" be positive and finite (at least {tiny}, float32's"
                     " smallest normal number), e.g. 0.01.")
  big = float(np.finfo(np.float32).max) / 4
  if per_layer is False or per_layer is True:
    thresholds = [("max_norm", max_norm)]
  else:
    thresholds = [("per_layer", t) for t in jax.tree_util.tree_leaves(
        per_layer)]
  for name, t in thresholds:
    if _validate.is_schedule(t) or not _validate.is_concrete(t):
      continue
    v = float(np.asarray(t))
    if not v / g < big:
      raise ValueError(
          f"{where}: with automatic={g}, {name}={v} gives weights up to"
          f" {name} / automatic = {v / g}; automatic clipping needs a"
          f" finite {name} (inf does not mean 'no clip' here) with that"
          f" ratio at most {big:.2g}, a quarter of float32's largest"
          " number.")


def is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.number, np.ndarray, jax.Array))


def check_float(leaves, where):
  for x in leaves:
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{where}: per-example clipping needs real"
                      f" floating-point gradients; got a {x.dtype} leaf.")


def check_mask(mask, batch, where):
  if mask is None:
    return jnp.ones((batch,), bool)
  mask = jnp.asarray(mask)
  if mask.shape != (batch,):
    raise ValueError(f"{where}: example_mask has shape {mask.shape}; it needs"
                     f" one entry per example, shape ({batch},).")
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{where}: example_mask must be boolean (True for real"
                    f" examples, False for padding); got {mask.dtype}.")
  return mask


def info(stats: PerExampleInfo, batch: int) -> PerExampleInfo:
  """A chunk's (or the chunks' summed) info as the whole batch's."""
  return stats._replace(batch_size=jnp.asarray(batch, jnp.int32))
