"""What every factory returns: an Optax transformation, fast without ``jit``.

An ``update`` called eagerly (in a notebook, a unit test, under a debugger)
would otherwise run op by op and trace and compile its ``lax.cond`` anew on
every call. :func:`transformation` compiles it once per input structure
instead: the eager call runs the very program a ``jax.jit`` of ``update``
runs, so its results are the jitted ones, bit for bit. Under an outer trace
(``jax.jit``, ``vmap``, ``grad``, ``shard_map``), and where an input is not
an array, ``update`` runs as written; under ``jax.disable_jit()`` so does
the compiled one. Given a state of another type than its ``init`` returned
(another transformation's state, a chain's inner state), ``update`` raises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

_ARRAY = (jax.Array, np.ndarray, np.generic, int, float, complex)


def transformation(init_fn: Callable[..., Any], update_fn: Callable[..., Any],
                   *, extra_args: bool = False) -> Any:
  """``optax.GradientTransformation(init_fn, update_fn)`` (or its
  ``ExtraArgs`` form), with ``update_fn`` compiled for eager calls."""
  compiled = jax.jit(update_fn)
  made: set[type] = set()  # The types of the states init has returned.

  @functools.wraps(init_fn)
  def init(params):
    state = init_fn(params)
    made.add(type(state))
    return state

  @functools.wraps(update_fn)
  def update(updates, state, params=None, **extra):
    if made and type(state) not in made:
      raise TypeError(
          f"update: got a state of type {type(state).__name__}, but this"
          f" transformation's init returns"
          f" {' or '.join(sorted(t.__name__ for t in made))}. Pass each"
          " transformation the state its own init returned (to a chain's"
          " update, the chain's whole state).")
    leaves = jax.tree_util.tree_leaves((updates, state, params, extra))
    if any(isinstance(x, jax.core.Tracer) or not isinstance(x, _ARRAY)
           for x in leaves):
      return update_fn(updates, state, params, **extra)
    return compiled(updates, state, params, **extra)

  if extra_args:
    return optax.GradientTransformationExtraArgs(init, update)
  return optax.GradientTransformation(init, update)
