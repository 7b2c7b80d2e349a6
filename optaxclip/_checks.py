"""A transformation that raises on non-finite gradients, naming the leaf."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _stats, _validate
from optaxclip._stats import ClipStats


@_stats.named("check_finite")
class CheckFiniteState(NamedTuple):
  """State of :func:`check_finite`.

  Attributes:
    stats: a :class:`~optaxclip.ClipStats` holding ``count`` alone, the
      updates seen so far (int32): the check neither clips nor takes a
      norm.
    num_nonfinite: NaN and Inf entries in the last update (int32).
    first_bad_leaf: the index, in tree order (``None`` leaves left out), of
      the first leaf of the last update holding one; -1 when it was finite.
  """

  stats: ClipStats
  num_nonfinite: jax.Array
  first_bad_leaf: jax.Array


class NonFiniteGradientError(FloatingPointError):
  """A gradient holds a NaN or an Inf; see :func:`check_finite`."""


def check_finite(*, callback: bool = True) -> optax.GradientTransformation:
  """Raises :class:`NonFiniteGradientError` when an update is not finite.

  A debugging aid: put it first in the chain. The update passes through
  unchanged; the state records how many entries were NaN or Inf and which
  leaf held the first one.

  - Called eagerly (not under ``jax.jit``), ``update`` raises
    :class:`NonFiniteGradientError`, naming the first offending leaf (in
    tree order), its NaN and Inf counts and the step.
  - Under ``jax.jit`` an exception cannot leave the compiled step with its
    class: with ``callback=True`` the device calls back to the host only
    when a leaf is not finite, and the error, with the same message,
    surfaces as a ``jax.errors.JaxRuntimeError`` when the step's results are
    next used or waited for. With ``callback=False`` nothing is raised
    inside the step; call :func:`raise_if_nonfinite` on the returned state
    (or the whole optimizer state) to raise :class:`NonFiniteGradientError`
    on the host.

  Args:
    callback: under ``jax.jit``, raise from a host callback (as a
      ``JaxRuntimeError``) as soon as a non-finite update is found.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`CheckFiniteState`.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = optax.chain(oc.check_finite(callback=False),
    ...                   oc.clip_by_global_norm(1.0))
    >>> grads = {"b": jnp.ones(2), "w": jnp.array([1.0, jnp.nan])}
    >>> state = opt.init(grads)
    >>> _, state = jax.jit(opt.update)(grads, state)
    >>> try:
    ...   oc.raise_if_nonfinite(state, grads)
    ... except oc.NonFiniteGradientError as e:
    ...   print(e)
    1 NaN or Inf entries in the update at step 1, the first in ['w'].
  """
  _validate.check_bool(callback, "callback", "check_finite")

  def init_fn(params):
    del params
    return CheckFiniteState(
        stats=_stats.fresh(jnp.float32, norm=False, scale=False,
                           clipped=False),
        num_nonfinite=jnp.zeros((), jnp.int32),
        first_bad_leaf=jnp.full((), -1, jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    paths_leaves = jax.tree_util.tree_leaves_with_path(updates)
    names = [_name(path) for path, _ in paths_leaves]
    leaves = [x for _, x in paths_leaves]
    stats = _stats.advance(state.stats)
    count = stats.count
    if not leaves:
      return updates, state._replace(stats=stats)
    bad = jnp.stack([jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
                     for x in leaves])
    total = jnp.sum(bad)
    first = jnp.where(total > 0, jnp.argmax(bad > 0), -1).astype(jnp.int32)
    if not any(isinstance(x, jax.core.Tracer) for x in leaves):
      if int(total):  # Eager: raise the class itself.
        i = int(first)
        _raise(i, jnp.sum(jnp.isnan(leaves[i])), jnp.sum(jnp.isinf(leaves[i])),
               count, names=names)
    elif callback:

      def report(i, count):
        nans = jnp.stack([jnp.sum(jnp.isnan(x)) for x in leaves])[i]
        infs = jnp.stack([jnp.sum(jnp.isinf(x)) for x in leaves])[i]
        jax.debug.callback(functools.partial(_raise, names=names), i, nans,
                           infs, count)

      jax.lax.cond(total > 0, report, lambda i, c: None, first, count)
    return updates, CheckFiniteState(stats=stats, num_nonfinite=total,
                                     first_bad_leaf=first)

  return optax.GradientTransformation(init_fn, update_fn)


def raise_if_nonfinite(opt_state: Any, tree: Any = None) -> None:
  """Raises :class:`NonFiniteGradientError` if :func:`check_finite` saw one.

  Reads every :class:`CheckFiniteState` in ``opt_state`` (an optimizer state,
  or any pytree holding one) on the host, which waits for the step that
  produced it. Use it after a jitted step built with
  ``check_finite(callback=False)``, where an exception cannot leave the step
  with its class.

  Args:
    opt_state: the state returned by the step.
    tree: optional, a pytree with the structure of the checked updates (the
      parameters or the gradients): the error names the leaf by its path in
      it. Without it, by its index in tree order.

  Raises:
    NonFiniteGradientError: when the last update held a NaN or an Inf.
    ValueError: when ``opt_state`` holds no :class:`CheckFiniteState`.
    TypeError: when called inside ``jax.jit`` (it reads values on the host).
  """
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, CheckFiniteState))
           if isinstance(s, CheckFiniteState)]
  if not found:
    raise ValueError(
        "raise_if_nonfinite: opt_state holds no check_finite state, so there"
        " is nothing to read; chain oc.check_finite(callback=False) into the"
        " optimizer (e.g. optax.chain(oc.check_finite(callback=False), opt))"
        " and pass the state it returns.")
  if any(isinstance(x, jax.core.Tracer)
         for x in jax.tree_util.tree_leaves(found)):
    raise TypeError(
        "raise_if_nonfinite reads the state on the host, so it cannot run"
        " inside jax.jit; call it on the state a jitted step returned, or use"
        " check_finite(callback=True), which raises from inside the step.")
  names = None
  if tree is not None:
    names = [_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  for state in found:
    total, first, count = (int(np.asarray(x)) for x in (
        state.num_nonfinite, state.first_bad_leaf, state.stats.count))
    if total:
      leaf = (names[first] if names is not None and first < len(names)
              else f"leaf {first} (in tree order)")
      raise NonFiniteGradientError(
          f"{total} NaN or Inf entries in the update at step {count}, the"
          f" first in {leaf}.")


def _name(path) -> str:
  return jax.tree_util.keystr(path) or "the root"


def _raise(first, nans, infs, count, *, names) -> None:
  raise NonFiniteGradientError(
      f"non-finite gradient at {names[int(first)]}: {int(nans)} NaN and"
      f" {int(infs)} Inf entries at step {int(count)}. Look for a log of 0, a"
      " division by zero or an overflow in the loss; wrap the optimizer in"
      " optaxclip.skip_step to skip such steps instead.")
