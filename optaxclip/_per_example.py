"""Per-example clipping: every example's gradient is clipped before the sum.

:func:`per_example_clip` takes gradients that already have a leading batch
axis; :func:`clipped_grad` is a ``jax.grad``-like transform that computes them
(with ``vmap``, optionally in microbatches under ``lax.scan``) and clips them
in the same pass. Both clip by a rule, an :class:`ExampleClip` (or a number:
its clipping norm), and return the *sum* of the clipped gradients and a
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


@_validate.renamed(
    max_norm="is now clip= (a number, or oc.ExampleClip(max_norm, ...))",
    **_example_clip.MOVED_INTO_RULE)
def per_example_clip(
    grads: Any,
    clip: Any,
    *,
    example_mask: jax.Array | None = None,
) -> tuple[Any, PerExampleInfo]:
  """Clips each example's gradient by the rule ``clip`` and sums over examples.

  Example ``i``'s gradient ``g_i`` (the ``i``-th slice along the leading axis
  of every leaf) is multiplied by ``min(1, C / ||g_i||)``, where ``||g_i||``
  is its 2-norm over all leaves and ``C`` the clipping norm, and the results
  are summed: the sum changes by at most ``C`` (its *sensitivity*) when one
  example is added or removed, which is what DP-SGD (Abadi et al. 2016)
  needs. An :class:`~optaxclip.ExampleClip` rule clips per layer, normalises
  the sum or clips automatically (Bu et al. 2022) instead; its docstring
  lists the weights, sensitivities and edge cases (a zero, non-finite or
  padding example; ``C`` of 0 or ``inf``).

  Args:
    grads: a pytree of per-example gradients, every leaf with the same
      leading (batch) dimension.
    clip: the clipping norm ``C`` (a non-negative number or JAX scalar;
      traced values are allowed, e.g. an adaptive threshold), shorthand for
      ``oc.ExampleClip(C)``; or an :class:`~optaxclip.ExampleClip`.
    example_mask: optional ``(batch,)`` booleans, ``False`` for padding
      examples, which then add nothing and are not counted.

  Returns:
    ``(clipped_sum, info)``: a pytree like one example's gradient (leaf
    dtypes kept; summed in the accumulation dtype) and a
    :class:`PerExampleInfo`.

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016;
    Bu et al., `Automatic Clipping: Differentially Private Deep Learning Made
    Easier and Stronger <https://arxiv.org/abs/2206.07136>`_, 2022
    (``automatic``).

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4], [jnp.nan, 0.0]])}
    >>> total, info = oc.per_example_clip(grads, 1.0)
    >>> print(total["w"], info.norms[:2], info.num_examples_clipped,
    ...       info.num_nonfinite)
    [0.90000004 1.2       ] [5.  0.5] 1 1
    >>> total, _ = oc.per_example_clip(grads, oc.ExampleClip(1.0,
    ...                                                      automatic=0.01))
    >>> print(total["w"])  # 1/5.01 * [3, 4] + 1/0.51 * [0.3, 0.4]
    [1.1870377 1.5827168]
  """
  caller = "per_example_clip"
  rule = _example_clip.as_rule(clip, caller)
  leaves, treedef = _batched_leaves(grads, caller)
  batch = leaves[0].shape[0]
  mask = _example_clip.check_mask(example_mask, batch, caller)
  t = jnp.asarray(rule.max_norm, _tree.tree_acc_dtype(grads))
  sums, stats = _example_clip.clip_sum(
      leaves, treedef, t, mask=mask, **_example_clip.options(rule, caller))
  out = [s.astype(x.dtype) for s, x in zip(sums, leaves)]
  return (jax.tree_util.tree_unflatten(treedef, out),
          _example_clip.info(stats, batch))


# ----------------------------------------------------------------------------
# clipped_grad.


@_validate.renamed(
    max_norm="is now clip= (a number, or oc.ExampleClip(max_norm, ...))",
    **_example_clip.MOVED_INTO_RULE,
    return_norms="was removed: the function always returns the"
    " PerExampleInfo last (grads, info = grad_fn(...))")
def clipped_grad(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    clip: Any,
    batch_argnums: int | Sequence[int] = 1,
    microbatch_size: int | None = None,
    keep_batch_dim: bool = True,
    method: Literal["vmap", "ghost"] = "vmap",
) -> Callable[..., Any]:
  """Like ``jax.grad``, but returns the sum of clipped per-example gradients.

  ``clipped_grad(fun, clip=C)(params, batch)`` computes the gradient of
  ``fun`` for each example of ``batch`` (the slices along the leading axis of
  the arguments in ``batch_argnums``), clips each to norm ``C`` and sums
  them, as :func:`per_example_clip` does with the same rule and edge cases
  (see :class:`~optaxclip.ExampleClip`). ``fun`` sees one example at a time:
  with ``keep_batch_dim=True`` (the default) as a batch of size 1, so that a
  loss written for batches works unchanged; with ``False``, without that
  axis.

  The returned function takes ``fun``'s arguments plus two reserved
  keywords, and passes other keywords to ``fun`` unbatched:

  - ``example_mask``: ``(batch,)`` booleans, ``False`` marks padding
    examples, which add nothing and are not counted: a batch of fixed shape
    holding fewer real examples runs under ``jit`` without recompiling.
  - ``max_norm``: overrides the rule's clipping norm for this call (a
    traced scalar is fine: one compilation serves every value), e.g. the
    threshold of :func:`optaxclip.quantile_norm` that
    :func:`optaxclip.dp_noise` keeps in ``next_threshold``.

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
    clip: the clipping norm ``C`` (a non-negative number or JAX scalar),
      shorthand for ``oc.ExampleClip(C)``; or an
      :class:`~optaxclip.ExampleClip` (per-layer, normalised or automatic
      clipping, NaN safety).
    batch_argnums: the argument(s) holding the batch; every leaf of each has
      the same leading dimension.
    microbatch_size: examples per chunk; ``None`` for the whole batch at once.
    keep_batch_dim: pass each example to ``fun`` with a leading axis of size 1.
    method: how per-example gradients are computed: ``"vmap"``
      (``jax.vmap`` of ``jax.grad``), or ``"ghost"``: per-example norms
      from the inputs and output gradients of the matrix products,
      convolutions, lookups and scales that each parameter enters, read
      from ``fun``'s jaxpr (any framework), without per-example gradients
      (ghost clipping, see the guide :doc:`/ghost`); ``info.fell_back``
      names the parameters that got per-example gradients. With either
      method, the ``argnums`` arguments may be
      ``nnx.Module`` objects: only their ``nnx.Param`` variables are
      differentiated (not ``BatchStat`` or RNG state), and their gradient
      comes back as the ``nnx.State`` of those, as ``nnx.grad`` returns it.

  Returns:
    A function of ``fun``'s arguments returning ``(clipped_sum, info)``, or
    ``(clipped_sum, aux, info)`` with ``has_aux``: the clipped sum is a
    pytree like the ``argnums`` arguments, ``aux`` the per-example aux, and
    ``info`` the :class:`PerExampleInfo` (per-example norms, counts,
    sensitivity) that :func:`optaxclip.dp_noise` calibrates its noise from.

  References:
    Abadi et al., `Deep Learning with Differential Privacy
    <https://arxiv.org/abs/1607.00133>`_, 2016.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> loss = lambda w, x: 0.5 * jnp.mean((x - w) ** 2)
    >>> grad_fn = oc.clipped_grad(loss, clip=2.0)
    >>> g, info = grad_fn(3.0, jnp.array([0.0, 7.0, 2.5]))
    >>> print(g, info.norms, info.num_examples_clipped)
    0.5 [3.  4.  0.5] 2
    >>> g, info = grad_fn(3.0, jnp.array([0.0, 7.0, 2.5]), max_norm=0.25)
    >>> print(g, info.num_examples_clipped)  # 0.25 - 0.25 + 0.25
    0.25 3
  """
  caller = "clipped_grad"
  rule = _example_clip.as_rule(clip, caller)
  grad_nums, batch_nums, microbatch_size = _checked(
      method, microbatch_size, argnums, batch_argnums)
  options = _example_clip.options(rule, caller)

  def clipped(*args, example_mask=None, max_norm=None, **kwargs):
    with _example_clip.no_state_updates(caller):
      return _clipped(args, example_mask, max_norm, kwargs)

  def _clipped(args, example_mask, max_norm, kwargs):
    nums = _resolved(grad_nums, batch_nums, len(args), argnums, batch_argnums)
    setup = dict(grad_nums=nums[0], batch_nums=nums[1], has_aux=has_aux,
                 keep_batch_dim=keep_batch_dim,
                 argnums_is_int=isinstance(argnums, (int, np.integer)))
    threshold = rule.max_norm if max_norm is None else max_norm
    batch = _batch_size([args[i] for i in nums[1]], caller)
    mask = _example_clip.check_mask(example_mask, batch, caller)
    if method == "ghost":
      from optaxclip import _ghost
      prepare = _ghost.prepare
    else:
      prepare = _vmap_prepare
    args, leaves_shape, treedef, clip_chunk = prepare(fun, args, kwargs,
                                                      **setup)
    _example_clip.check_float(leaves_shape, caller)
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
    grads = jax.tree_util.tree_unflatten(treedef, out)
    info = _example_clip.info(stats, batch)
    return (grads, aux, info) if has_aux else (grads, info)

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


def _checked(method, microbatch_size, argnums, batch_argnums):
  """``clipped_grad``'s checked arguments: the differentiated and the batch
  argument numbers, and the microbatch size."""
  caller = "clipped_grad"
  if method not in ("vmap", "ghost"):
    raise ValueError(f"{caller}: method={method!r} is not available; use"
                     " 'vmap' (jax.vmap of jax.grad) or 'ghost' (ghost norms"
                     " from the loss's jaxpr).")
  if microbatch_size is not None:
    _validate.check_int(microbatch_size, "microbatch_size", caller, lo=1)
    microbatch_size = int(microbatch_size)
  batch_nums = _as_tuple(batch_argnums)
  grad_nums = _as_tuple(argnums)
  for name, nums in (("argnums", grad_nums), ("batch_argnums", batch_nums)):
    if not nums:
      raise ValueError(f"{caller}: {name}=() names no argument; give an int"
                       " or a non-empty tuple of ints.")
  if min(grad_nums + batch_nums) >= 0:  # Else checked at the call.
    _resolved(grad_nums, batch_nums, max(grad_nums + batch_nums) + 1,
              argnums, batch_argnums)
  return grad_nums, batch_nums, microbatch_size


def _resolved(grad_nums, batch_nums, num_args, argnums, batch_argnums):
  """The argument numbers, negative ones counted from the end as
  ``jax.grad`` counts them, checked against the call's arguments."""
  caller = "clipped_grad"
  for name, given, nums in (("argnums", argnums, grad_nums),
                            ("batch_argnums", batch_argnums, batch_nums)):
    if any(not -num_args <= i < num_args for i in nums):
      raise ValueError(f"{caller}: {name}={given} but the function got"
                       f" {num_args} positional arguments.")
  grad_nums = tuple(i % num_args for i in grad_nums)
  batch_nums = tuple(i % num_args for i in batch_nums)
  if set(batch_nums) & set(grad_nums):
    raise ValueError(f"{caller}: argnums={argnums} and batch_argnums="
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
        num_examples_clipped=(acc_stats.num_examples_clipped
                              + stats.num_examples_clipped),
        num_nonfinite=acc_stats.num_nonfinite + stats.num_nonfinite,
        fell_back=stats.fell_back)
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


def _batched_leaves(grads, caller):
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  if not leaves:
    raise ValueError(f"{caller}: the gradient tree has no leaves.")
  _example_clip.check_float(leaves, caller)
  sizes = {x.shape[0] if x.ndim else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        f"{caller}: every gradient leaf needs the same leading (batch)"
        f" dimension; got shapes {[x.shape for x in leaves]}. Per-example"
        " clipping takes per-example gradients, one slice per example along"
        " a leading axis (jax.vmap(jax.grad(loss)) gives them, or use"
        " oc.clipped_grad).")
  return leaves, treedef


def _batch_size(batch_args, caller):
  leaves = jax.tree_util.tree_leaves(batch_args)
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if not leaves or None in sizes or len(sizes) != 1:
    raise ValueError(
        f"{caller}: the batch arguments need one common leading dimension;"
        f" got shapes {[jnp.shape(x) for x in leaves]}.")
  return sizes.pop()


