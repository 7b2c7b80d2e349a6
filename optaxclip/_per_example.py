"""Per-example clipping: every example's gradient is clipped before the sum.

:func:`per_example_clip` takes gradients that already have a leading batch
axis; :func:`clipped_grad` is a ``jax.grad``-like transform that computes them
(with ``vmap``, optionally in microbatches under ``lax.scan``) and clips them
in the same pass. Both return the *sum* of the clipped gradients and a
:class:`PerExampleInfo` of what clipping did, from which
:func:`optaxclip.dp_noise` adds calibrated noise.

Norms are per example, over all of its leaves, accumulated in float32 (float64
for float64 gradients), and overflow-safe: each example is scaled by a power
of two that brings its largest entry near 1 before its squares are summed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip import _example_clip, _tree, _validate
from optaxclip._example_clip import PerExampleInfo


def per_example_clip(
    grads: Any,
    max_norm: Any,
    *,
    per_layer: bool = False,
    normalize: bool = False,
    automatic: float | None = None,
    nan_safe: bool = True,
    example_mask: jax.Array | None = None,
) -> tuple[Any, PerExampleInfo]:
  """Clips each example's gradient to ``max_norm`` and sums over examples.

  Example ``i``'s gradient ``g_i`` (the ``i``-th slice along the leading axis
  of every leaf) is multiplied by ``min(1, max_norm / ||g_i||)``, where
  ``||g_i||`` is its 2-norm over all leaves, and the results are summed: the
  sum changes by at most ``max_norm`` (its *sensitivity*) when one example is
  added or removed, which is what DP-SGD (Abadi et al. 2016) needs.

  Three rules for the weight ``w_i`` of example ``i`` (``C = max_norm``):

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

  Args:
    grads: a pytree of per-example gradients, every leaf with the same
      leading (batch) dimension.
    max_norm: the clipping norm: a non-negative number or JAX scalar (traced
      values are allowed, e.g. an adaptive threshold).
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
      ``max_norm`` (1 with ``normalize``). ``num_clipped`` still counts the
      examples whose norm is above ``max_norm``. With ``per_layer``, each
      layer is weighted by its own threshold over its own norm plus
      ``gamma``. Needs a finite ``max_norm`` with ``max_norm / gamma`` at
      most 8.5e37 (a quarter of float32's largest number), so that no
      weight overflows; a run-time ``max_norm`` above that is lowered to it.
    nan_safe: drop (and count) examples whose norm is not finite.
    example_mask: optional ``(batch,)`` booleans, ``False`` for padding
      examples, which then add nothing and are not counted.

  Returns:
    ``(clipped_sum, info)``: a pytree like one example's gradient (leaf
    dtypes kept; summed in the accumulation dtype) and a
    :class:`PerExampleInfo`.

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
    >>> grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4], [jnp.nan, 0.0]])}
    >>> total, info = oc.per_example_clip(grads, 1.0)
    >>> print(total["w"], info.norms[:2], info.num_clipped, info.num_nonfinite)
    [0.90000004 1.2       ] [5.  0.5] 1 1
    >>> total, _ = oc.per_example_clip(grads, 1.0, automatic=0.01)
    >>> print(total["w"])  # 1/5.01 * [3, 4] + 1/0.51 * [0.3, 0.4]
    [1.1870377 1.5827168]
  """
  where = "per_example_clip"
  _example_clip.check_options(max_norm, per_layer, normalize, where,
                              automatic)
  leaves, treedef = _batched_leaves(grads, where)
  batch = leaves[0].shape[0]
  mask = _example_clip.check_mask(example_mask, batch, where)
  dtype = _tree.tree_acc_dtype(grads)
  t = jnp.asarray(max_norm, dtype) if _example_clip.is_number(max_norm) else max_norm
  sums, stats = _example_clip.clip_sum(leaves, treedef, t, per_layer=per_layer,
                          normalize=normalize, automatic=automatic,
                          nan_safe=nan_safe, mask=mask, where=where)
  out = [s.astype(x.dtype) for s, x in zip(sums, leaves)]
  return jax.tree_util.tree_unflatten(treedef, out), _example_clip.info(stats, batch)


# ----------------------------------------------------------------------------
# clipped_grad.


def clipped_grad(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    max_norm: Any,
    batch_argnums: int | Sequence[int] = 1,
    per_layer: bool | Any = False,
    normalize: bool = False,
    automatic: float | None = None,
    microbatch_size: int | None = None,
    nan_safe: bool = True,
    return_norms: bool = False,
    keep_batch_dim: bool = True,
    method: Literal["vmap", "ghost"] = "vmap",
) -> Callable[..., Any]:
  """Like ``jax.grad``, but returns the sum of clipped per-example gradients.

  ``clipped_grad(fun, max_norm=C)(params, batch)`` computes the gradient of
  ``fun`` for each example of ``batch`` (the slices along the leading axis of
  the arguments in ``batch_argnums``), clips each to norm ``C`` and sums
  them, as :func:`per_example_clip` does with the same options and edge cases.
  ``fun`` sees one example at a time: with ``keep_batch_dim=True`` (the
  default) as a batch of size 1, so that a loss written for batches works
  unchanged; with ``False``, without that axis.

  The returned function takes ``fun``'s arguments plus two reserved
  keywords, and passes other keywords to ``fun`` unbatched:

  - ``example_mask``: ``(batch,)`` booleans, ``False`` marks padding
    examples, which add nothing and are not counted: a batch of fixed shape
    holding fewer real examples runs under ``jit`` without recompiling.
  - ``max_norm``: overrides the clipping norm for this call (a traced
    scalar is fine), e.g. the threshold of :func:`optaxclip.quantile_norm`.

  With ``microbatch_size=k``, the batch is processed ``k`` examples at a time
  in a ``lax.scan`` (padded with masked examples to a multiple of ``k``), so
  that only ``k`` per-example gradients exist at once; the result equals the
  unchunked one up to the rounding of the summation order.

  Args:
    fun: the loss; returns a scalar (or ``(scalar, aux)`` with ``has_aux``).
    argnums: the argument(s) to differentiate, as in ``jax.grad``; they have
      no batch axis.
    has_aux: as in ``jax.grad``; the aux outputs come back per example, with
      a leading batch axis (with ``keep_batch_dim=True``, each example's aux
      keeps the size-1 axis ``fun`` saw, so an array aux has shape
      ``(batch, 1, ...)``; jax-privacy drops that axis).
    max_norm: the clipping norm (see :func:`per_example_clip`).
    batch_argnums: the argument(s) holding the batch; every leaf of each has
      the same leading dimension.
    per_layer: as in :func:`per_example_clip`.
    normalize: as in :func:`per_example_clip`.
    automatic: as in :func:`per_example_clip`: ``gamma`` of automatic
      clipping, or ``None``.
    microbatch_size: examples per chunk; ``None`` for the whole batch at once.
    nan_safe: as in :func:`per_example_clip`.
    return_norms: also return the :class:`PerExampleInfo` (per-example norms,
      counts, sensitivity), last.
    keep_batch_dim: pass each example to ``fun`` with a leading axis of size 1.
    method: how per-example gradients are computed: ``"vmap"``
      (``jax.vmap`` of ``jax.grad``), or ``"ghost"`` for Flax NNX models:
      per-example norms from each layer's inputs and output gradients,
      without per-example gradients (ghost clipping, see the guide
      :doc:`/ghost`). With either method, the ``argnums`` arguments may be
      ``nnx.Module`` objects: only their ``nnx.Param`` variables are
      differentiated (not ``BatchStat`` or RNG state), and their gradient
      comes back as the ``nnx.State`` of those, as ``nnx.grad`` returns it.

  Returns:
    A function of ``fun``'s arguments returning the clipped sum (a pytree like
    the ``argnums`` arguments), then the per-example aux with ``has_aux``,
    then the :class:`PerExampleInfo` with ``return_norms``.

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> loss = lambda w, x: 0.5 * jnp.mean((x - w) ** 2)
    >>> grad_fn = oc.clipped_grad(loss, max_norm=2.0, return_norms=True)
    >>> g, info = grad_fn(3.0, jnp.array([0.0, 7.0, 2.5]))
    >>> print(g, info.norms, info.num_clipped)
    0.5 [3.  4.  0.5] 2
  """
  where = "clipped_grad"
  grad_nums, batch_nums, microbatch_size = _checked(
      method, max_norm, per_layer, normalize, automatic, microbatch_size,
      argnums, batch_argnums)
  default_norm = max_norm
  options = dict(per_layer=per_layer, normalize=normalize, nan_safe=nan_safe,
                 where=where, automatic=automatic)

  def clipped(*args, example_mask=None, max_norm=None, **kwargs):
    with _example_clip.no_state_updates(where):
      return _clipped(args, example_mask, max_norm, kwargs)

  def _clipped(args, example_mask, max_norm, kwargs):
    nums = _resolved(grad_nums, batch_nums, len(args), argnums, batch_argnums)
    setup = dict(grad_nums=nums[0], batch_nums=nums[1], has_aux=has_aux,
                 keep_batch_dim=keep_batch_dim,
                 argnums_is_int=isinstance(argnums, (int, np.integer)))
    threshold = default_norm if max_norm is None else max_norm
    batch = _batch_size([args[i] for i in nums[1]], where)
    mask = _example_clip.check_mask(example_mask, batch, where)
    if method == "ghost":
      from optaxclip import _ghost  # Imports flax.
      prepare = _ghost.prepare
    else:
      prepare = _vmap_prepare
    args, leaves_shape, treedef, clip_chunk = prepare(fun, args, kwargs,
                                                      **setup)
    _example_clip.check_float(leaves_shape, where)
    dtype = _tree.common_acc_dtype(leaves_shape)
    t = (jnp.asarray(threshold, dtype) if _example_clip.is_number(threshold)
         else threshold)
    chunk = functools.partial(clip_chunk, threshold=t, **options)
    if microbatch_size is None or microbatch_size >= batch:
      sums, stats, aux = chunk(args, mask)
    else:
      sums, stats, aux = _scan_chunks(chunk, args, nums[1], mask, batch,
                                      microbatch_size)
    out = [s.astype(x.dtype) for s, x in zip(sums, leaves_shape)]
    result = [jax.tree_util.tree_unflatten(treedef, out)]
    if has_aux:
      result.append(aux)
    if return_norms:
      result.append(_example_clip.info(stats, batch))
    return result[0] if len(result) == 1 else tuple(result)

  return clipped


def _vmap_prepare(fun, args, kwargs, *, grad_nums, batch_nums, has_aux,
                  keep_batch_dim, argnums_is_int):
  """Sets up one call of ``clipped_grad(method="vmap")``: per-example
  gradients by ``jax.vmap`` of ``jax.grad``.

  Returns, as :func:`optaxclip._ghost.prepare` does, ``fun``'s arguments,
  the gradient's leaves (shapes) and tree structure, and the function that
  clips one chunk of examples.
  """
  args, modules = _example_clip.split_modules(args, grad_nums)

  def single(*args):
    args = tuple(modules[i](a) if i in modules else a
                 for i, a in enumerate(args))
    if keep_batch_dim:
      args = tuple(
          jax.tree_util.tree_map(lambda x: jnp.expand_dims(x, 0), a)
          if i in batch_nums else a for i, a in enumerate(args))
    return fun(*args, **kwargs)

  argnums = grad_nums[0] if argnums_is_int else grad_nums
  per_example = jax.vmap(
      jax.grad(single, argnums, has_aux=has_aux),
      in_axes=tuple(0 if i in batch_nums else None for i in range(len(args))))
  shapes = jax.eval_shape(per_example, *args)
  leaves_shape, treedef = jax.tree_util.tree_flatten(
      shapes[0] if has_aux else shapes)

  def clip_chunk(chunk_args, mask, threshold, **options):
    out = per_example(*chunk_args)
    grads, aux = (out if has_aux else (out, None))
    sums, stats = _example_clip.clip_sum(jax.tree_util.tree_leaves(grads),
                                         treedef, threshold, mask=mask,
                                         **options)
    return sums, stats, aux

  return args, leaves_shape, treedef, clip_chunk


def _checked(method, max_norm, per_layer, normalize, automatic,
             microbatch_size, argnums, batch_argnums):
  """``clipped_grad``'s checked arguments: the differentiated and the batch
  argument numbers, and the microbatch size."""
  where = "clipped_grad"
  if method not in ("vmap", "ghost"):
    raise ValueError(f"{where}: method={method!r} is not available; use"
                     " 'vmap' (jax.vmap of jax.grad) or 'ghost' (ghost norms"
                     " of Flax NNX layers).")
  _example_clip.check_options(max_norm, per_layer, normalize, where,
                              automatic)
  if microbatch_size is not None:
    _validate.check_int(microbatch_size, "microbatch_size", where, lo=1)
    microbatch_size = int(microbatch_size)
  batch_nums = _as_tuple(batch_argnums)
  grad_nums = _as_tuple(argnums)
  for name, nums in (("argnums", grad_nums), ("batch_argnums", batch_nums)):
    if not nums:
      raise ValueError(f"{where}: {name}=() names no argument; give an int"
                       " or a non-empty tuple of ints.")
  if min(grad_nums + batch_nums) >= 0:  # Else checked at the call.
    _resolved(grad_nums, batch_nums, max(grad_nums + batch_nums) + 1,
              argnums, batch_argnums)
  return grad_nums, batch_nums, microbatch_size


def _resolved(grad_nums, batch_nums, num_args, argnums, batch_argnums):
  """The argument numbers, negative ones counted from the end as
  ``jax.grad`` counts them, checked against the call's arguments."""
  where = "clipped_grad"
  for name, given, nums in (("argnums", argnums, grad_nums),
                            ("batch_argnums", batch_argnums, batch_nums)):
    if any(not -num_args <= i < num_args for i in nums):
      raise ValueError(f"{where}: {name}={given} but the function got"
                       f" {num_args} positional arguments.")
  grad_nums = tuple(i % num_args for i in grad_nums)
  batch_nums = tuple(i % num_args for i in batch_nums)
  if set(batch_nums) & set(grad_nums):
    raise ValueError(f"{where}: argnums={argnums} and batch_argnums="
                     f"{batch_argnums} overlap; the differentiated arguments"
                     " must not carry the batch.")
  return grad_nums, batch_nums


def _scan_chunks(chunk, args, batch_nums, mask, batch, size):
  """Runs ``chunk`` on ``size`` examples at a time in a ``lax.scan``."""
  num = -(-batch // size)
  pad = num * size - batch

  def split(x):
    x = jnp.asarray(x)
    if pad:
      x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    return x.reshape((num, size) + x.shape[1:])

  batched = {i: jax.tree_util.tree_map(split, args[i]) for i in batch_nums}
  masks = split(mask)

  def body(carry, xs):
    chunk_batch, chunk_mask = xs
    chunk_args = tuple(chunk_batch[i] if i in chunk_batch else a
                       for i, a in enumerate(args))
    sums, stats, aux = chunk(chunk_args, chunk_mask)
    acc_sums, acc_stats = carry
    acc_stats = acc_stats._replace(
        threshold=stats.threshold, sensitivity=stats.sensitivity,
        num_examples=acc_stats.num_examples + stats.num_examples,
        num_clipped=acc_stats.num_clipped + stats.num_clipped,
        num_nonfinite=acc_stats.num_nonfinite + stats.num_nonfinite)
    return ([a + s for a, s in zip(acc_sums, sums)], acc_stats), (
        stats.norms, stats.included, aux)

  first = jax.eval_shape(
      lambda: chunk(tuple(jax.tree_util.tree_map(lambda x: x[0], batched[i])
                          if i in batched else a for i, a in enumerate(args)),
                    masks[0]))
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 (first[0], first[1]))
  (sums, stats), (norms, included, aux) = jax.lax.scan(body, zeros, (batched, masks))
  unchunk = lambda x: x.reshape((num * size,) + x.shape[2:])[:batch]  # noqa: E731
  stats = stats._replace(norms=unchunk(norms), included=unchunk(included))
  return sums, stats, jax.tree_util.tree_map(unchunk, aux)


# ----------------------------------------------------------------------------
# Arguments.


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return (int(x),) if isinstance(x, (int, np.integer)) else tuple(
      int(i) for i in x)


def _batched_leaves(grads, where):
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  if not leaves:
    raise ValueError(f"{where}: the gradient tree has no leaves.")
  _example_clip.check_float(leaves, where)
  sizes = {x.shape[0] if x.ndim else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        f"{where}: every gradient leaf needs the same leading (batch)"
        f" dimension; got shapes {[x.shape for x in leaves]}. Per-example"
        " clipping takes per-example gradients, one slice per example along"
        " a leading axis (jax.vmap(jax.grad(loss)) gives them, or use"
        " oc.clipped_grad).")
  return leaves, treedef


def _batch_size(batch_args, where):
  leaves = jax.tree_util.tree_leaves(batch_args)
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if not leaves or None in sizes or len(sizes) != 1:
    raise ValueError(
        f"{where}: the batch arguments need one common leading dimension;"
        f" got shapes {[jnp.shape(x) for x in leaves]}.")
  return sizes.pop()


