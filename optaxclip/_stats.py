"""Reading the statistics of every optaxclip transform in an optimizer state."""

from __future__ import annotations

import sys
from typing import Any

import jax

_REGISTRY: dict[type, str] = {}


def register_state(state_type: type, name: str) -> type:
  """Marks a NamedTuple state type as one whose fields :func:`clip_stats` reads."""
  _REGISTRY[state_type] = name
  return state_type


def clip_stats(opt_state: Any) -> dict[str, Any]:
  """The statistics of every optaxclip transform found in ``opt_state``.

  Searches any nested optimizer state (``optax.chain``, ``masked``,
  ``multi_transform``, ``inject_hyperparams``, ``MultiSteps``, a Flax NNX
  ``nnx.Optimizer``'s ``opt_state`` whose arrays sit in NNX variables, ...)
  for optaxclip states and returns their fields in one flat dict, ready to log.

  With one optaxclip transform in the state, the keys are its field names
  (``"grad_norm"``, ``"scale"``, ``"clipped"``, ``"count"``,
  ``"num_clipped"``, ...). With several, each key is prefixed by the
  transform's name, plus ``"#i"`` (``i`` counting from 0 in tree order) when
  the same transform appears more than once: ``"clip_by_global_norm/grad_norm"``,
  ``"zclip#1/threshold"``.

  Args:
    opt_state: an optimizer state, or any pytree containing one.

  Returns:
    A dict from names to arrays (or pytrees of arrays for per-leaf clippers).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> _, state = opt.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> stats = oc.clip_stats(state)
    >>> print(stats["grad_norm"], stats["scale"], stats["num_clipped"])
    5.0 0.2 1
  """
  found = jax.tree_util.tree_leaves(
      _unwrap_variables(opt_state),
      is_leaf=lambda x: type(x) in _REGISTRY)
  states = [s for s in found if type(s) in _REGISTRY]
  if len(states) == 1:
    return dict(states[0]._asdict())
  names = [_REGISTRY[type(s)] for s in states]
  out: dict[str, Any] = {}
  seen: dict[str, int] = {}
  for name, state in zip(names, states):
    if names.count(name) > 1:
      key = f"{name}#{seen.get(name, 0)}"
      seen[name] = seen.get(name, 0) + 1
    else:
      key = name
    for field, value in state._asdict().items():
      out[f"{key}/{field}"] = value
  return out


def _unwrap_variables(tree: Any) -> Any:
  """Replaces Flax NNX variables (if any) by the arrays they hold."""
  nnx = sys.modules.get("flax.nnx")  # Only a state built by Flax holds them.
  if nnx is None:
    return tree
  return jax.tree_util.tree_map(
      lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
