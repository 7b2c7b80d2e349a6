"""Statistics: the counters every clipper keeps, and reading them back.

:func:`counters` and :func:`tally` are the one place where a state's
``count``, ``clipped``, ``num_clipped`` and ``frac_clipped`` are made (int32
counts, a bool, a float32 fraction, whatever the gradients' dtype);
:func:`clip_stats` reads every registered state out of an optimizer state.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

_REGISTRY: dict[type, str] = {}
_UNIT_NORMS: set[type] = set()  # Types whose leaf_norms may be per unit.
_INNER = "inner_state"  # A wrapper's field holding the wrapped state.


def counters(*, frac: bool = False) -> dict[str, jax.Array]:
  """The counters of a fresh state: ``count``, ``clipped``, ``num_clipped``
  and, with ``frac``, ``frac_clipped``."""
  out = dict(count=jnp.zeros((), jnp.int32), clipped=jnp.zeros((), bool),
             num_clipped=jnp.zeros((), jnp.int32))
  if frac:
    out["frac_clipped"] = jnp.zeros((), jnp.float32)
  return out


def tally(state: Any, clipped: jax.Array, *, num: jax.Array | None = None,
          of: int | jax.Array | None = None) -> dict[str, jax.Array]:
  """The counters after one step of ``state``'s transform.

  ``count`` goes up by one (saturating), ``num_clipped`` by one where
  ``clipped``; with ``num`` (how many leaves, units or elements were
  clipped) out of ``of``, ``frac_clipped`` is their ratio in float32.
  """
  out = dict(count=optax.safe_increment(state.count), clipped=clipped,
             num_clipped=state.num_clipped + clipped.astype(jnp.int32))
  if num is not None:
    out["frac_clipped"] = (jnp.asarray(num).astype(jnp.float32)
                           / jnp.maximum(jnp.asarray(of, jnp.float32), 1))
  return out


def register_state(state_type: type, name: str, *,
                   unit_norms: bool = False) -> type:
  """Marks a NamedTuple state type as one whose fields :func:`clip_stats` reads.

  Its fields are reported as ``name/field``; a field named ``inner_state``
  (a wrapped transformation's state) is searched in turn instead.

  Args:
    state_type: a ``NamedTuple`` class.
    name: the prefix of its keys, e.g. ``"my_clipper"``.
    unit_norms: its ``leaf_norms`` field may hold per-unit norms (arrays
      with an entry per unit), which ``clip_stats(scalars=True)`` leaves
      out. Otherwise a one-dimensional ``leaf_norms`` entry is one norm per
      layer of a stacked leaf, listed by layer index.

  Returns:
    ``state_type``, so that this can decorate the class.

  Raises:
    TypeError: ``state_type`` is not a ``NamedTuple`` class (an instance, a
      plain class), ``name`` is not a string, or ``unit_norms`` is not a
      bool.
    ValueError: ``name`` is empty or holds ``/`` or ``#`` (they separate
      keys), or another type is registered under it, or ``state_type`` is
      registered under another name.
  """
  where = "register_state"
  if not (isinstance(state_type, type) and issubclass(state_type, tuple)
          and hasattr(state_type, "_fields")):
    raise TypeError(
        f"{where}: state_type must be a NamedTuple class, got"
        f" {state_type!r}; pass the class itself, not an instance.")
  if not isinstance(name, str):
    raise TypeError(f"{where}: name must be a string, got {name!r}.")
  if not isinstance(unit_norms, (bool, np.bool_)):
    raise TypeError(f"{where}: unit_norms must be True or False, got"
                    f" {unit_norms!r}.")
  if not name or "/" in name or "#" in name:
    raise ValueError(f"{where}: name={name!r} cannot be a key prefix; give"
                     " a non-empty name without '/' or '#'.")
  owner = next((t for t, n in _REGISTRY.items() if n == name), None)
  if owner is not None and owner is not state_type:
    raise ValueError(f"{where}: {name!r} already names {owner.__name__};"
                     " choose another name.")
  if _REGISTRY.get(state_type, name) != name:
    raise ValueError(
        f"{where}: {state_type.__name__} is registered as"
        f" {_REGISTRY[state_type]!r}; its keys do not change.")
  _REGISTRY[state_type] = name
  if unit_norms:
    _UNIT_NORMS.add(state_type)
  return state_type


def clip_stats(opt_state: Any, *, scalars: bool = False) -> dict[str, Any]:
  """The statistics of every optaxclip transform found in ``opt_state``.

  Searches any nested optimizer state (``optax.chain``, ``masked``,
  ``multi_transform``, ``inject_hyperparams``, ``MultiSteps``,
  :func:`optaxclip.skip_step`, a Flax NNX ``nnx.Optimizer``'s
  ``opt_state`` whose arrays sit in NNX variables, ...) for optaxclip states
  and returns their fields in one flat dict.

  Keys are always ``"<transform>/<field>"``, e.g.
  ``"clip_by_global_norm/grad_norm"``, whatever wraps the transform and
  whatever else is in the chain, so a logging call keeps working when the
  optimizer is wrapped in :func:`optaxclip.skip_step` or another clipper is
  added. A transform that appears more than once is numbered in tree order
  from its second appearance: ``"zclip/..."``, ``"zclip#1/..."``. Fields
  that a transform does not keep (``None``) are left out.

  With ``scalars=True`` only scalar statistics are returned, ready for a
  logger (TensorBoard, Weights & Biases, CLU): buffers such as ZClip's
  warm-up norms are dropped, and per-leaf norms (``leaf_norms=True`` on
  the clippers that offer it) come one key per leaf, named by the leaf's
  path: ``"clip_by_global_norm/leaf_norms/dense/kernel"``. A leaf that
  stacks layers (``layer_axis``) comes one key per layer, its index in
  brackets: ``"clip_by_global_norm/leaf_norms/blocks/kernel[0]"``, ...
  (not for :func:`optaxclip.clip_by_norm` and
  :func:`optaxclip.adaptive_grad_clip`, whose arrays of norms may be per
  unit: read those from ``leaf_norms`` without ``scalars``).
  ``jax.device_get`` turns the values into NumPy scalars.

  Args:
    opt_state: an optimizer state, or any pytree containing one.
    scalars: return only scalars, per-leaf norms spread out by path.

  Returns:
    A dict from names to arrays (or, without ``scalars``, pytrees of arrays
    for per-leaf fields).

  Raises:
    ValueError: when ``opt_state`` holds no optaxclip transform's state.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> opt = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> _, state = opt.update({"w": jnp.array([3.0, 4.0])}, state, params)
    >>> stats = oc.clip_stats(state)
    >>> print(stats["clip_by_global_norm/grad_norm"],
    ...       stats["clip_by_global_norm/scale"])
    5.0 0.2
  """
  states: list[Any] = []
  _collect(_unwrap_variables(opt_state), states)
  if not states:
    raise ValueError(
        "clip_stats: found no optaxclip transform in this state"
        f" ({type(opt_state).__name__}). Pass the optimizer state that"
        " update() returned (for Flax NNX, optimizer.opt_state; for a linen"
        " TrainState, state.opt_state) of an optimizer that contains an"
        " optaxclip transform.")
  out: dict[str, Any] = {}
  seen: dict[str, int] = {}
  for state in states:
    name = _REGISTRY[type(state)]
    n = seen.get(name, 0)
    seen[name] = n + 1
    key = name if n == 0 else f"{name}#{n}"
    for field, value in state._asdict().items():
      if field == _INNER or value is None:
        continue
      if not scalars:
        out[f"{key}/{field}"] = value
      elif field == "leaf_norms":
        out.update(_leaf_scalars(f"{key}/{field}", value,
                                 type(state) not in _UNIT_NORMS))
      elif _is_scalar(value):
        out[f"{key}/{field}"] = value
  return out


def _collect(tree: Any, out: list[Any]) -> None:
  """Appends the registered states in ``tree``, in tree order, outer first."""
  for x in jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: type(x) in _REGISTRY):
    if type(x) in _REGISTRY:
      out.append(x)
      inner = getattr(x, _INNER, None)
      if inner is not None:
        _collect(inner, out)


def _leaf_scalars(prefix: str, norms: Any, layers: bool) -> dict[str, Any]:
  """Per-leaf norms one key per leaf, by path; with ``layers``, a vector (a
  stacked leaf's per-layer norms) one key per layer: ``path[i]``."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(norms):
    name = f"{prefix}/{_path_name(path)}"
    if np.ndim(leaf) == 0:
      out[name] = leaf
    elif layers and np.ndim(leaf) == 1:
      out.update({f"{name}[{i}]": leaf[i] for i in range(leaf.shape[0])})
  return out


def _is_scalar(value: Any) -> bool:
  return (not isinstance(value, (dict, list, tuple))
          and hasattr(value, "shape") and np.ndim(value) == 0)


def _path_name(path: Any) -> str:
  """``dense/kernel`` for the path of ``tree["dense"]["kernel"]``."""
  return jax.tree_util.keystr(path, simple=True, separator="/") or "root"


def _unwrap_variables(tree: Any) -> Any:
  """Replaces Flax NNX variables (if any) by the arrays they hold."""
  nnx = sys.modules.get("flax.nnx")  # Only a state built by Flax holds them.
  if nnx is None:
    return tree
  return jax.tree_util.tree_map(
      lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, tree,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
