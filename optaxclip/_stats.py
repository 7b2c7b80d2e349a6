"""Statistics: the one record every clipping state holds, and reading it back.

:class:`ClipStats` is the record; :func:`fresh` makes the record of a new
state and :func:`advance` the record after one step: the one place where
``count``, ``clipped``, ``num_clipped`` and ``frac_clipped`` are made (int32
counts, a bool, a float32 fraction, whatever the gradients' dtype).
:func:`clip_stats` finds the records in an optimizer state by their type.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ClipStats(NamedTuple):
  """What a transformation saw and did at its last step, and its counts.

  Every optaxclip state holds one, as its ``stats`` field, beside the
  buffers of its own rule; :func:`optaxclip.clip_stats` finds them by this
  type. A field that a transformation does not keep is ``None`` (fixed for
  the transformation, so the state's tree structure never changes).

  Attributes:
    count: steps seen so far (int32, saturating), skipped steps included.
    norm: the norm of the updates the transformation received at its last
      step, before it acted on them: the global norm for transformations
      that act on the whole update, the largest leaf (or unit) norm for
      per-leaf ones (:func:`optaxclip.clip_by_norm`), the update's norm for
      update clipping (the optimizer's output).
    threshold: the threshold in force at the last step, in the units of
      what the rule compares (a norm; a ratio for
      :func:`optaxclip.adaptive_grad_clip`; a logit for
      :func:`optaxclip.qk_clip`); a tree of scalars for tree thresholds.
    scale: the smallest factor the last step multiplied by (1 when nothing
      was scaled down; 0 for a step :func:`optaxclip.skip_step` skipped).
    clipped: whether the last step scaled anything down.
    num_clipped: how many steps so far have scaled something down.
    frac_clipped: the fraction of the last step's leaves, units, elements,
      examples or heads that were scaled down (float32); ``None`` for
      transformations that scale the whole update by one factor.
    leaf_norms: (``leaf_norms=True``) each leaf's norm of the last incoming
      update, a tree like the updates (per layer for a stacked leaf, per
      unit with ``axis``); ``None`` otherwise.
  """

  count: jax.Array
  norm: jax.Array | None = None
  threshold: Any = None
  scale: jax.Array | None = None
  clipped: jax.Array | None = None
  num_clipped: jax.Array | None = None
  frac_clipped: jax.Array | None = None
  leaf_norms: Any = None


_T = TypeVar("_T", bound=type)


def named(name: str, *, unit_norms: bool = False) -> Callable[[_T], _T]:
  """Class decorator: ``clip_stats`` reports the state's fields under
  ``name`` (the function that makes the state); ``unit_norms``: its
  ``leaf_norms`` may hold one norm per unit, not spread by layer."""
  def mark(cls: _T) -> _T:
    cls.stats_name = name  # type: ignore[attr-defined]
    cls.unit_norms = unit_norms  # type: ignore[attr-defined]
    return cls
  return mark


def fresh(dtype: Any, *, norm: bool = True, threshold: Any = None,
          scale: bool = True, clipped: bool = True, frac: bool = False,
          leaf_norms: Any = None) -> ClipStats:
  """The record of a new state: zero counts, a zero ``norm`` and a unit
  ``scale`` in ``dtype``; the fields switched off are ``None``."""
  return ClipStats(
      count=jnp.zeros((), jnp.int32),
      norm=jnp.zeros((), dtype) if norm else None,
      threshold=threshold,
      scale=jnp.ones((), dtype) if scale else None,
      clipped=jnp.zeros((), bool) if clipped else None,
      num_clipped=jnp.zeros((), jnp.int32) if clipped else None,
      frac_clipped=jnp.zeros((), jnp.float32) if frac else None,
      leaf_norms=leaf_norms)


def advance(prev: ClipStats, *, clipped: jax.Array | None = None,
            num: jax.Array | None = None, of: int | jax.Array | None = None,
            **fields: Any) -> ClipStats:
  """The record after one step of ``prev``'s transformation.

  ``count`` goes up by one (saturating) and ``num_clipped`` by one where
  ``clipped``; with ``num`` (how many leaves, units, elements, ... were
  scaled down) out of ``of``, ``frac_clipped`` is their ratio in float32.
  ``fields`` (``norm``, ``threshold``, ``scale``, ``leaf_norms``) replace
  the previous values; a field not given keeps its value. A field that
  ``prev`` does not keep cannot be given (the structure would change).
  """
  new = dict(fields)
  if clipped is not None:
    new["clipped"] = clipped
  if num is not None:
    new["frac_clipped"] = (jnp.asarray(num).astype(jnp.float32)
                           / jnp.maximum(jnp.asarray(of, jnp.float32), 1))
  off = sorted(k for k, v in new.items()
               if v is not None and getattr(prev, k) is None)
  if off:
    raise ValueError(f"ClipStats: {', '.join(off)} not kept by this state.")
  if clipped is not None:
    assert prev.num_clipped is not None  # fresh() keeps both or neither.
    new["num_clipped"] = prev.num_clipped + clipped.astype(jnp.int32)
  return prev._replace(count=optax.safe_increment(prev.count), **new)


def clip_stats(opt_state: Any, *, scalars: bool = False) -> dict[str, Any]:
  """The statistics of every optaxclip transform found in ``opt_state``.

  Searches any nested optimizer state (``optax.chain``, ``masked``,
  ``multi_transform``, ``inject_hyperparams``, ``MultiSteps``,
  :func:`optaxclip.skip_step`, a Flax NNX ``nnx.Optimizer``'s
  ``opt_state`` whose arrays sit in NNX variables, ...) for states holding
  a :class:`ClipStats` record and returns their fields in one flat dict:
  the record's fields, then the state's own (ZClip's ``z``, ``skip_step``'s
  ``skipped``, ...).

  Keys are always ``"<transform>/<field>"``, e.g.
  ``"clip_by_global_norm/norm"``, whatever wraps the transform and whatever
  else is in the chain, so a logging call keeps working when the optimizer
  is wrapped in :func:`optaxclip.skip_step` or another clipper is added.
  ``<transform>`` is the name of the function that made the state; for a
  state class of one's own that holds a :class:`ClipStats`, its
  ``stats_name`` class attribute if it has one, else its class name in
  snake case without ``State`` (``MyClipState``: ``my_clip``). A transform that appears more than once is
  numbered in tree order from its second appearance: ``"zclip/..."``,
  ``"zclip#1/..."``. Fields that a transform does not keep (``None``) are
  left out.

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
    >>> print(stats["clip_by_global_norm/norm"],
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
    name = stats_name(type(state))
    n = seen.get(name, 0)
    seen[name] = n + 1
    key = name if n == 0 else f"{name}#{n}"
    units = getattr(type(state), "unit_norms", False)
    for field, value in _fields(state):
      if value is None:
        continue
      if not scalars:
        out[f"{key}/{field}"] = value
      elif field == "leaf_norms":
        out.update(_leaf_scalars(f"{key}/{field}", value, not units))
      elif _is_scalar(value):
        out[f"{key}/{field}"] = value
  return out


def stats_name(state_type: type) -> str:
  """The key prefix of a state type: its ``stats_name``, or its class name
  in snake case without ``State`` (``MyClipState`` -> ``my_clip``)."""
  name = getattr(state_type, "stats_name", None)
  if isinstance(name, str):
    return name
  base = state_type.__name__.removesuffix("State") or state_type.__name__
  return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", base).lower()


def _is_state(x: Any) -> bool:
  """A NamedTuple that holds a :class:`ClipStats` in one of its fields."""
  return (isinstance(x, tuple) and hasattr(x, "_fields")
          and not isinstance(x, ClipStats)
          and any(isinstance(v, ClipStats) for v in x))


def _fields(state: Any) -> list[tuple[str, Any]]:
  """A state's record fields, then its own fields (a wrapped
  transformation's ``inner_state``, and any field holding states, left
  out: those are reported under their own names)."""
  record: list[tuple[str, Any]] = []
  own: list[tuple[str, Any]] = []
  for field, value in state._asdict().items():
    if isinstance(value, ClipStats):
      record.extend(value._asdict().items())
    elif field != "inner_state" and not _holds_state(value):
      own.append((field, value))
  return record + own


def _holds_state(tree: Any) -> bool:
  return any(_is_state(x) for x in jax.tree_util.tree_leaves(
      tree, is_leaf=_is_state))


def _collect(tree: Any, out: list[Any]) -> None:
  """Appends the states in ``tree`` that hold a record, in tree order,
  outer first."""
  for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_state):
    if _is_state(x):
      out.append(x)
      for value in x:
        if not isinstance(value, ClipStats):
          _collect(value, out)


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

