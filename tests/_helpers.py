"""What the test files share: gradient trees of a given norm, float64 norms,
and one way to run a transformation over many steps.

Running a transformation over a sequence of gradients goes through
:func:`run_scan`: one ``jax.jit`` of a ``lax.scan``, so a test compiles once
however many steps it takes. A test that sweeps a hyper-parameter passes the
values as a traced argument (:func:`sweep`) instead of building and
compiling a transformation per value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optaxclip as oc

# Two leaves of different shapes; the trees below scale this direction.
DIRECTION = {"a": np.linspace(-1.0, 2.0, 6).reshape(2, 3),
             "b": np.array([0.5, -0.25, 3.0])}


def np_norm(tree: Any, ord: float | str = 2) -> float:
  """The global ``ord``-norm of ``tree``'s leaves, in float64 NumPy.

  ``ord`` is a number ``p > 0``, ``inf`` or ``"rms"`` (the 2-norm over the
  square root of the number of elements); complex leaves count by their
  modulus.
  """
  x = np.concatenate([np.ravel(np.abs(np.asarray(
      v, np.complex128 if np.iscomplexobj(v) else np.float64)))
                      for v in jax.tree.leaves(tree)])
  if ord == "rms":
    return float(np.sqrt(np.sum(x ** 2) / max(x.size, 1)))
  if ord == np.inf:
    return float(np.max(np.abs(x))) if x.size else 0.0
  return float(np.sum(np.abs(x) ** ord) ** (1.0 / ord))


_UNIT = np_norm(DIRECTION)


def tree_with_norm(norm: float, dtype: Any = jnp.float32) -> Any:
  """A two-leaf gradient whose global 2-norm is ``norm``."""
  return jax.tree.map(lambda d: jnp.asarray(d * (norm / _UNIT), dtype),
                      DIRECTION)


def batch_of_trees(norms: Sequence[float], dtype: Any = jnp.float32) -> Any:
  """Leaves stacked over steps: step ``i`` has global 2-norm ``norms[i]``."""
  n = np.asarray(norms, np.float64)
  return jax.tree.map(
      lambda d: jnp.asarray(n.reshape((-1,) + (1,) * d.ndim) * d / _UNIT,
                            dtype), DIRECTION)


def run_scan(tx: Any, grads: Any, params: Any = None, **extra: Any
             ) -> tuple[Any, Any]:
  """Runs ``tx`` over ``grads`` (leaves stacked over steps) under one
  ``jit`` + ``lax.scan``; returns every step's updates and state.

  ``tx.init`` gets ``params`` (default: the first step's gradients);
  ``extra`` holds per-step keyword arguments of ``update``, stacked over
  steps like ``grads`` (e.g. ``loss=losses``).
  """
  params = jax.tree.map(lambda x: x[0], grads) if params is None else params
  state = tx.init(params)

  def step(state, xs):
    g, kw = xs
    updates, state = tx.update(g, state, params, **kw)
    return state, (updates, state)

  _, out = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(
      state, (grads, extra))
  return out


def run_norms(tx: Any, norms: Sequence[float]) -> tuple[np.ndarray, Any]:
  """Runs ``tx`` over gradients of the given global norms; returns the
  float64 norms after it and every step's state."""
  updates, states = run_scan(tx, batch_of_trees(norms))
  after = jax.vmap(oc.global_norm)(updates)
  return np.asarray(after, np.float64), states


def sweep(make: Callable[[Any], Any], values: Sequence[float], grads: Any,
          params: Any = None) -> tuple[Any, Any]:
  """One step of ``make(value)`` on ``grads`` for every value, compiled
  once: ``value`` is a traced float32 scalar, so the transformation is
  built inside one ``jit`` of a ``vmap`` over the values. Returns the
  updates and states, stacked over the values."""
  params = grads if params is None else params

  def one(value):
    tx = make(value)
    return tx.update(grads, tx.init(params), params)

  return jax.jit(jax.vmap(one))(jnp.asarray(values, jnp.float32))


def maybe_jit(fn: Callable[..., Any], jitted: bool) -> Callable[..., Any]:
  """``jax.jit(fn)`` or ``fn`` as it is: for the tests that run both ways
  (parametrize over ``jitted`` with :data:`JIT`)."""
  return jax.jit(fn) if jitted else fn


JIT = dict(argnames="jitted", argvalues=[True, False], ids=["jit", "eager"])
"""``@pytest.mark.parametrize(**JIT)``: a test run with and without jit."""
