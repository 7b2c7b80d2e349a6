"""A transformation that raises on non-finite gradients, naming the leaf."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class CheckFiniteState(NamedTuple):
  """State of :func:`check_finite`: the number of updates seen."""

  count: jax.Array


class NonFiniteGradientError(FloatingPointError):
  """Raised by :func:`check_finite` when a gradient holds a NaN or an Inf."""


def check_finite() -> optax.GradientTransformation:
  """Raises :class:`NonFiniteGradientError` when an update is not finite.

  A debugging aid: put it first in the chain. The check runs on the device;
  only when a leaf holds a NaN or an Inf does it call back to the host,
  which raises an error naming the first offending leaf (in tree order), the
  number of NaN and Inf entries in it and the step. Under ``jax.jit`` the
  error surfaces (as a ``jax.errors.JaxRuntimeError`` carrying the message)
  when the step's results are next used or waited for. The update passes
  through unchanged.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`CheckFiniteState`.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = optax.chain(oc.check_finite(), oc.clip_by_global_norm(1.0))
    >>> grads = {"w": jnp.array([1.0, jnp.nan])}
    >>> state = opt.init(grads)
    >>> try:
    ...   jax.block_until_ready(opt.update(grads, state))
    ... except Exception as e:
    ...   print("non-finite gradient at ['w']" in str(e))
    True
  """

  def init_fn(params):
    del params
    return CheckFiniteState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    paths_leaves = jax.tree_util.tree_leaves_with_path(updates)
    names = [jax.tree_util.keystr(path) or "the root" for path, _ in
             paths_leaves]
    leaves = [x for _, x in paths_leaves]
    finite = [jnp.all(jnp.isfinite(x)) for x in leaves]
    if finite:
      all_finite = jnp.stack(finite).all()

      def report(count):
        first = jnp.argmin(jnp.stack(finite))
        nans = jnp.stack([jnp.sum(jnp.isnan(x)) for x in leaves])[first]
        infs = jnp.stack([jnp.sum(jnp.isinf(x)) for x in leaves])[first]
        jax.debug.callback(functools.partial(_raise, names=names), first,
                           nans, infs, count)

      jax.lax.cond(all_finite, lambda c: None, report, state.count)
    return updates, CheckFiniteState(
        count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _raise(first, nans, infs, count, *, names) -> None:
  raise NonFiniteGradientError(
      f"non-finite gradient at {names[int(first)]}: {int(nans)} NaN and"
      f" {int(infs)} Inf entries at step {int(count)}. Look for a log of 0, a"
      " division by zero or an overflow in the loss; wrap the optimizer in"
      " optaxclip.skip_step to skip such steps instead.")
