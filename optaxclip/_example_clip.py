"""Per-example clipping shared by ``method="vmap"`` and ``method="ghost"``.

The rule, :class:`ExampleClip` (checked by :func:`as_rule`); from per-example
norms (:func:`optaxclip._norms.example_norms`, or ghost
norms) to each example's weight (:func:`clip_weights`), and the weighted sum
over examples (:func:`weighted_sum`); the :class:`PerExampleInfo` of a batch
and the checks of per-example arguments.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip import _norms, _thresholds, _tree, _validate
from optaxclip._numerics import clip_scale


class ExampleClip(NamedTuple):
  """The per-example clipping rule of :func:`optaxclip.per_example_clip`,
  :func:`optaxclip.clipped_grad` and :func:`optaxclip.dp_aggregate`.

  Example ``i``'s gradient ``g_i`` (the ``i``-th slice along the leading
  axis of every leaf) gets a weight ``w_i``, where ``||g_i||`` is its
  2-norm over all leaves, and the weighted gradients are summed: the sum
  changes by at most its *sensitivity* when one example is added or
  removed, which is what DP-SGD (Abadi et al. 2016) needs. A number ``C``
  given where a rule is expected is ``ExampleClip(C)``.

  Three rules for ``w_i`` (``C = max_norm``):

  ======================  ============================  ===========
  rule                    ``w_i``                       sensitivity
  ======================  ============================  ===========
  clip (default)          ``min(1, C / ||g_i||)``       ``C``
  ``normalize=True``      ``min(1, C / ||g_i||) / C``   1
  ``automatic=gamma``     ``C / (||g_i|| + gamma)``     ``C``
  both                    ``1 / (||g_i|| + gamma)``     1
  ======================  ============================  ===========

  ``normalize`` keeps the clip and divides by ``C``: an example of norm at
  least ``C`` comes out with norm exactly 1, a smaller one keeps its
  direction with norm ``||g_i|| / C``. ``automatic`` rescales *every*
  example, small ones up and large ones down, to norm
  ``C ||g_i|| / (||g_i|| + gamma)``, just below ``C`` unless ``||g_i||`` is
  comparable to ``gamma``: the per-example normalisation of Bu et al. 2022
  (AUTO-S), whose ``gamma`` keeps the weight of a near-zero gradient bounded
  by ``C / gamma``.

  Edge cases:

  ========================  ===============================================
  ``||g_i|| = 0``           scale 1 (``g_i`` is zero and adds nothing);
                            with ``automatic``, weight 0 (``C / gamma``
                            times a zero gradient is 0 too)
  ``max_norm = inf``        scale 1: the plain sum (``normalize`` and
                            ``automatic`` refuse it; with ``automatic``, a
                            run-time inf, NaN or negative value acts as 0)
  ``max_norm = 0``          scale 0: the sum is zero (``normalize`` refuses it)
  non-finite ``g_i``        ``nan_safe``: adds exactly 0 (it is never
                            multiplied, so NaN cannot leak) and counts in
                            ``num_nonfinite``; else the sum is non-finite
  ``||g_i||`` overflows     (finite entries, norm above the float32 range,
                            ~3.4e38) treated as non-finite
  padding example           (``example_mask`` False) adds exactly 0 and is
                            counted nowhere
  ========================  ===============================================

  The fields are checked where the rule is used.

  Attributes:
    max_norm: the clipping norm ``C``: a non-negative number or JAX scalar
      (traced values are allowed, e.g. an adaptive threshold); for
      :func:`optaxclip.dp_aggregate` also a :func:`optaxclip.quantile_norm`.
    per_layer: clip each layer of each example to its own threshold instead
      of the whole example. ``True``: every one of the ``L`` leaves is a
      layer, with ``max_norm / sqrt(L)`` (``optax.per_example_layer_norm_clip
      (..., uniform=True)``), so the sensitivity stays ``max_norm``. Or a
      pytree prefix of one example's gradient holding thresholds: each of its
      leaves is a layer, the whole subtree below it clipped as one by its
      joint norm (as jax-privacy clips a prefix); the sensitivity is the root
      sum of the squares of those thresholds.
    normalize: divide the result by the sensitivity, so that every clipped
      example has norm at most 1 and the sum has sensitivity 1
      (jax-privacy's ``rescale_to_unit_norm``): the learning rate no longer
      depends on ``max_norm``. Examples below ``max_norm`` keep their
      norm's share (``||g_i|| / max_norm``); they are not raised to norm 1.
      Needs ``0 < max_norm < inf``.
    automatic: ``None`` to clip; or ``gamma > 0``, the stability constant
      of automatic clipping (Bu et al. 2022 use 0.01): every example is
      weighted ``max_norm / (||g_i|| + gamma)``. The sensitivity stays
      ``max_norm`` (1 with ``normalize``).
      :attr:`PerExampleInfo.num_examples_clipped` still counts the examples
      whose norm is above ``max_norm``. With ``per_layer``, each layer is
      weighted by its own threshold over its own norm plus ``gamma``. Needs
      a finite ``max_norm`` with ``max_norm / gamma`` at most 8.5e37 (a
      quarter of float32's largest number), so that no weight overflows; a
      run-time ``max_norm`` above that is lowered to it.
    nan_safe: drop (and count) examples whose norm is not finite.

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016;
    McMahan et al., `Learning Differentially Private Recurrent Language Models
    <https://arxiv.org/abs/1710.06963>`_, 2018 (per-layer clipping);
    Bu et al., `Automatic Clipping: Differentially Private Deep Learning Made
    Easier and Stronger <https://arxiv.org/abs/2206.07136>`_, 2022
    (``automatic``).

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> total, info = oc.per_example_clip(grads, oc.ExampleClip(1.0,
    ...                                                         normalize=True))
    >>> print(total["w"], info.sensitivity)
    [0.90000004 1.2       ] 1.0
  """

  max_norm: Any
  per_layer: Any = False
  normalize: bool = False
  automatic: float | None = None
  nan_safe: bool = True


class PerExampleInfo(NamedTuple):
  """What per-example clipping did to one batch.

  Attributes:
    norms: ``(batch,)``, each example's global 2-norm before clipping, in the
      accumulation dtype (NaN or inf for a non-finite example; padding
      examples have theirs too, and are ignored by everything else).
    threshold: the clipping norm in force (the rule's ``max_norm``, or the
      call's ``max_norm=`` override of :func:`optaxclip.clipped_grad`).
    sensitivity: the most one example can change the clipped sum (in
      2-norm): ``max_norm`` (with ``automatic`` too); ``1`` with
      ``normalize=True``; the root sum of squares of the per-layer
      thresholds with ``per_layer`` (see :class:`ExampleClip`).
    included: ``(batch,)``, the examples counted: not padding, finite norm.
    num_examples: how many are included (with ``nan_safe=False``, non-finite
      examples also enter the sum, which is then non-finite, but are not
      counted here).
    num_examples_clipped: of those, how many were scaled down (norm above
      threshold; with ``per_layer``, above the threshold of some layer).
      With ``automatic``, which rescales every example, the same count: the
      examples whose norm is above the threshold.
    num_nonfinite: non-padding examples with a non-finite norm. With
      ``nan_safe`` they were dropped; without, they made the sum non-finite.
    batch_size: the leading dimension of the batch, padding included.
    fell_back: with ``clipped_grad(method="ghost")``, a pytree like the
      gradient holding one boolean per leaf: ``True`` where the leaf's
      per-example gradients were formed because its use has no ghost norm
      (see :doc:`/ghost`), ``False`` where its norm is a ghost norm;
      ``None`` for the other per-example functions.
  """

  norms: jax.Array
  threshold: jax.Array
  sensitivity: jax.Array
  included: jax.Array
  num_examples: jax.Array
  num_examples_clipped: jax.Array
  num_nonfinite: jax.Array
  batch_size: jax.Array
  fell_back: Any = None


def clip_sum(leaves, treedef, max_norm, *, per_layer, normalize, nan_safe,
              mask, caller, automatic=None):
  """Sums of the clipped examples, one per leaf in the accumulation dtype."""
  leaf_norms, norms = _norms.example_norms(leaves)
  weights, keep, stats = clip_weights(
      leaf_norms, norms, treedef, max_norm, per_layer=per_layer,
      normalize=normalize, automatic=automatic, nan_safe=nan_safe, mask=mask,
      caller=caller)
  return [weighted_sum(x, w, keep) for x, w in zip(leaves, weights)], stats


def clip_weights(leaf_norms, norms, treedef, max_norm, *, per_layer,
                  normalize, nan_safe, mask, caller, automatic=None):
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
        leaf_norms, norms, treedef, t, per_layer, rule, automatic, caller)
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
      num_examples_clipped=count(counted & over), num_nonfinite=count(mask & ~finite),
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
                  caller):
  """Per-layer clipping: the sensitivity, which examples had some layer
  above its threshold, and each leaf's weights (its layer's)."""
  dtype = norms.dtype
  thresholds, layer = _thresholds.layer_groups(
      per_layer, t, jax.tree_util.tree_unflatten(treedef, leaf_norms),
      dtype, caller)
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
def no_state_updates(caller: str) -> Iterator[None]:
  """Explains Flax's error for a module that updates its own state (batch
  statistics, RNG counts) inside the per-example trace."""
  try:
    yield
  except Exception as e:
    if type(e).__name__ != "TraceContextError":
      raise
    raise ValueError(
        f"{caller}: fun updates a variable of an nnx.Module that is not"
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


MOVED_INTO_RULE = {
    name: f"moved into the rule: clip=oc.ExampleClip(max_norm, {name}=...)"
    for name in ("per_layer", "normalize", "automatic", "nan_safe")}
"""The hints of :func:`optaxclip._validate.renamed` for the keywords that
became :class:`ExampleClip`'s fields."""


def as_rule(clip: Any, caller: str, *, adaptive: tuple[type, ...] = ()
            ) -> ExampleClip:
  """``clip`` (a number or JAX scalar, an :class:`ExampleClip`, or one of
  the ``adaptive`` types) as a checked :class:`ExampleClip`."""
  if isinstance(clip, adaptive) or (
      not isinstance(clip, ExampleClip) and is_number(clip)):
    clip = ExampleClip(clip)
  if not isinstance(clip, ExampleClip):
    raise TypeError(
        f"{caller}: clip must be a number, a JAX scalar"
        + (", an oc.quantile_norm(...)" if adaptive else "")
        + " or an oc.ExampleClip(max_norm, ...) (a schedule has no step"
        f" count here: pass the value in force); got {type(clip).__name__}.")
  max_norm: Any = clip.max_norm
  if isinstance(max_norm, adaptive):
    max_norm = cast(Any, max_norm)[0]  # The initial norm, checked as fixed.
  elif not (is_number(max_norm) or _validate.is_schedule(max_norm)):
    raise TypeError(
        f"{caller}: ExampleClip's max_norm must be a number or a JAX scalar"
        + (" or an oc.quantile_norm(...)" if adaptive else
           " (an adaptive oc.quantile_norm(...) belongs to oc.dp_aggregate,"
           " or to oc.dp_noise(adaptive_norm=...) after clipped_grad)")
        + f"; got {type(max_norm).__name__}.")
  _validate.check_bool(clip.normalize, "normalize", caller)
  _validate.check_bool(clip.nan_safe, "nan_safe", caller)
  check_options(max_norm, clip.per_layer, clip.normalize, caller,
                clip.automatic)
  return clip


def options(rule: ExampleClip, caller: str) -> dict[str, Any]:
  """The keyword arguments of :func:`clip_sum` and :func:`clip_weights`
  (all but the threshold) that ``rule`` sets."""
  return dict(per_layer=rule.per_layer, normalize=rule.normalize,
              automatic=rule.automatic, nan_safe=rule.nan_safe, caller=caller)


def check_options(max_norm, per_layer, normalize, caller, automatic=None):
  _validate.check_threshold(max_norm, "max_norm", caller)
  if _validate.is_schedule(max_norm):
    raise TypeError(f"{caller}: max_norm must be a number or a JAX scalar, not"
                    " a schedule (there is no step count here); pass the"
                    " value in force.")
  if per_layer is not False and per_layer is not True:
    _validate.check_threshold(per_layer, "per_layer", caller, allow_tree=True)
  if normalize and _validate.is_concrete(max_norm):
    v = float(np.asarray(max_norm))
    if not 0 < v < math.inf:
      raise ValueError(f"{caller}: normalize=True divides by max_norm, so it"
                       f" must be positive and finite; got {v}.")
  if automatic is not None:
    _check_automatic(automatic, max_norm, per_layer, caller)


def _check_automatic(gamma, max_norm, per_layer, caller):
  """``automatic`` is the stability constant gamma: a positive finite number,
  with ``max_norm / gamma`` (the largest weight) finite in float32."""
  if isinstance(gamma, (bool, np.bool_)) or not isinstance(
      gamma, (int, float, np.integer, np.floating)):
    raise TypeError(f"{caller}: automatic is the stability constant gamma of"
                    " automatic clipping, a positive number (0.01 in Bu et"
                    f" al. 2022), or None to clip; got {gamma!r}.")
  g = float(gamma)
  tiny = float(np.finfo(np.float32).tiny)
  if not tiny <= g < math.inf:
    raise ValueError(f"{caller}: automatic={g} is not a valid gamma; it must"
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
          f"{caller}: with automatic={g}, {name}={v} gives weights up to"
          f" {name} / automatic = {v / g}; automatic clipping needs a"
          f" finite {name} (inf does not mean 'no clip' here) with that"
          f" ratio at most {big:.2g}, a quarter of float32's largest"
          " number.")


def is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.number, np.ndarray, jax.Array))


def check_float(leaves, caller):
  for x in leaves:
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{caller}: per-example clipping needs real"
                      f" floating-point gradients; got a {x.dtype} leaf.")


def check_mask(mask, batch, caller):
  if mask is None:
    return jnp.ones((batch,), bool)
  mask = jnp.asarray(mask)
  if mask.shape != (batch,):
    raise ValueError(f"{caller}: example_mask has shape {mask.shape}; it needs"
                     f" one entry per example, shape ({batch},).")
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{caller}: example_mask must be boolean (True for real"
                    f" examples, False for padding); got {mask.dtype}.")
  return mask


def info(stats: PerExampleInfo, batch: int) -> PerExampleInfo:
  """A chunk's (or the chunks' summed) info as the whole batch's."""
  return stats._replace(batch_size=jnp.asarray(batch, jnp.int32))
