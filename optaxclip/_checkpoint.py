"""Switching a running job's optimizer: carry its state into a new chain.

A checkpoint written with one optimizer restores into that optimizer's
state tree alone; :func:`adopt_state` moves what it holds into the state
tree of another (a clipper added, swapped or removed; the optimizer wrapped
in :func:`optaxclip.skip_step`, or unwrapped), matching the states by type
and structure.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax


def adopt_state(opt_state: Any, *, init_state: Any) -> Any:
  """``init_state``, with every part that ``opt_state`` also has carried over.

  Use it to switch a running job to another optimizer chain, e.g. from
  ``chain(optax.clip_by_global_norm(1.0), adamw)`` to
  ``oc.skip_step(chain(oc.clip_by_global_norm(1.0), adamw))``, or back:
  restore the checkpoint with the old optimizer's state as the target (as
  it was written), then::

    opt_state = oc.adopt_state(restored, init_state=new_opt.init(params))

  The states are matched by type and structure, in order:

  - a sub-state whose tree (types, keys, shapes and dtypes) is the same on
    both sides is carried over whole, bit for bit (AdamW's moments and
    count, a schedule's count, ``MultiSteps``' accumulator and counters);
  - a chain's states are aligned in order, so a transform added to or
    removed from a chain leaves the others matched;
  - a state that wraps others (``skip_step``, ``MultiSteps``,
    ``inject_hyperparams``, ``masked``, ...) is matched field by field
    against the same wrapper, and a wrapper on one side alone is looked
    through: its inner state matches the other side's state;
  - everything else, the new transforms' states included, stays as
    ``init_state`` has it (a fresh start: zero counts, empty windows).

  A state is carried over whole or not at all: a state whose buffers
  changed shape (a longer window, another tree of parameters) starts
  afresh. Where several alignments fit, the one that carries over the most
  arrays wins.

  Args:
    opt_state: the old optimizer's state, as restored.
    init_state: the new optimizer's fresh state, ``new_opt.init(params)``
      (or an ``nnx.Optimizer``'s ``opt_state``); the result has its tree
      structure.

  Returns:
    A state with the tree structure of ``init_state``.

  Raises:
    TypeError: ``opt_state`` or ``init_state`` is an optimizer, not a state.
    ValueError: nothing of ``opt_state`` fits anywhere in ``init_state``
      while both hold arrays (the wrong checkpoint, or the wrong
      parameters).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optaxclip as oc
    >>> params = {"w": jnp.zeros(2)}
    >>> old = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))
    >>> state = old.init(params)
    >>> _, state = old.update({"w": jnp.ones(2)}, state, params)
    >>> new = oc.skip_step(optax.chain(oc.clip_by_global_norm(1.0),
    ...                                optax.adam(0.1)))
    >>> adopted = oc.adopt_state(state, init_state=new.init(params))
    >>> print(adopted.inner_state[1][0].count, adopted.stats.count)
    1 0
  """
  for name, x in (("opt_state", opt_state), ("init_state", init_state)):
    if isinstance(x, (optax.GradientTransformation, optax.MultiSteps)):
      raise TypeError(
          f"adopt_state: {name} is an optimizer ({type(x).__name__}), not"
          " its state; pass the state: the restored one as opt_state,"
          " new_opt.init(params) as init_state.")
  out, matched = _adopt(opt_state, init_state, {})
  if matched == 0 and _num_arrays(opt_state) and _num_arrays(init_state):
    raise ValueError(
        "adopt_state: no part of opt_state fits init_state: no sub-state"
        " has the same types, shapes and dtypes on both sides. Pass the"
        " state restored with the old optimizer's own state as the target,"
        " and init_state from the new optimizer's init on the same"
        " parameters.")
  return out


def _adopt(old: Any, new: Any, memo: dict) -> tuple[Any, int]:
  """``new`` with the parts ``old`` also has carried over, and how many
  arrays were carried."""
  key = (id(old), id(new))
  if key in memo:
    return memo[key]
  if _same(old, new):
    best = (old, _num_arrays(old))
  else:
    best = (new, 0)
    for candidate in _candidates(old, new, memo):
      if candidate[1] > best[1]:
        best = candidate
  memo[key] = best
  return best


def _candidates(old: Any, new: Any, memo: dict):
  """The ways ``old`` may fit ``new`` other than whole."""
  if _is_chain(old) and _is_chain(new):
    yield _align(list(old), list(new), type(new), memo)
  elif _inner(new) and (type(old) is type(new)) and (
      not isinstance(new, dict) or set(old) == set(new)):
    # The same wrapper: its own fields whole, its inner states matched.
    parts, carried = {}, 0
    for k in _keys(new):
      if k in _inner(new):
        parts[k], c = _adopt(_get(old, k), _get(new, k), memo)
      else:
        same = _same(_get(old, k), _get(new, k))
        parts[k] = _get(old if same else new, k)
        c = _num_arrays(parts[k]) if same else 0
      carried += c
    if carried:
      yield _rebuild(new, parts), carried
  for k in _inner(new):  # A wrapper or a link that new alone has.
    t, c = _adopt(old, _get(new, k), memo)
    if c:
      yield _rebuild(new, {k: t}), c
  for k in _inner(old):  # A wrapper or a link that old alone had.
    t, c = _adopt(_get(old, k), new, memo)
    if c:
      yield t, c


def _align(old: list, new: list, kind: type, memo: dict) -> tuple[Any, int]:
  """Two chains' states aligned in order (the alignment that carries the
  most arrays over), as a chain like ``new``."""
  n, m = len(old), len(new)
  score = np.zeros((n + 1, m + 1), np.int64)
  for i in range(n - 1, -1, -1):
    for j in range(m - 1, -1, -1):
      score[i, j] = max(score[i + 1, j], score[i, j + 1],
                        score[i + 1, j + 1] + _adopt(old[i], new[j], memo)[1])
  out, i, j = list(new), 0, 0
  while i < n and j < m:
    t, c = _adopt(old[i], new[j], memo)
    if c and score[i, j] == score[i + 1, j + 1] + c:
      out[j] = t
      i, j = i + 1, j + 1
    elif score[i, j] == score[i + 1, j]:
      i += 1
    else:
      j += 1
  return kind(out), int(score[0, 0])


def _same(old: Any, new: Any) -> bool:
  """Whether two trees have the same structure, shapes and dtypes."""
  a, tree_a = jax.tree_util.tree_flatten(old)
  b, tree_b = jax.tree_util.tree_flatten(new)
  return _same_structure(tree_a, tree_b) and all(
      np.shape(x) == np.shape(y) and _dtype(x) == _dtype(y)
      for x, y in zip(a, b))


def _same_structure(a: Any, b: Any) -> bool:
  return bool(a == b)


def _dtype(x: Any) -> Any:
  return getattr(x, "dtype", type(x))


def _num_arrays(tree: Any) -> int:
  return sum(1 for x in jax.tree_util.tree_leaves(tree)
             if hasattr(x, "shape"))


def _is_state(x: Any) -> bool:
  """An optimizer state record: a NamedTuple."""
  return isinstance(x, tuple) and hasattr(x, "_fields")


def _is_chain(x: Any) -> bool:
  """``optax.chain``'s state: a plain tuple (or list) of states."""
  return type(x) in (tuple, list) and all(_holds_states(s) for s in x)


def _holds_states(x: Any) -> bool:
  """A state, a chain of them, or a dict of them (``multi_transform``)."""
  if isinstance(x, dict):
    return bool(x) and all(_holds_states(v) for v in x.values())
  return _is_state(x) or _is_chain(x)


def _inner(x: Any) -> list[Any]:
  """The keys of the states ``x`` holds: a chain's links, the values of a
  dict of states, and a wrapper's fields named ``inner...`` (optax's
  convention: ``inner_state``, ``inner_opt_state``, ``inner_states``)."""
  if _is_chain(x):
    return list(range(len(x)))
  if isinstance(x, dict):
    return list(x) if _holds_states(x) else []
  if _is_state(x):
    return [f for f in x._fields if f.startswith("inner")
            and _holds_states(getattr(x, f))]
  return []


def _keys(x: Any) -> list[Any]:
  return list(x) if isinstance(x, dict) else (
      list(x._fields) if _is_state(x) else list(range(len(x))))


def _get(x: Any, k: Any) -> Any:
  return getattr(x, k) if _is_state(x) else x[k]


def _rebuild(x: Any, parts: dict[Any, Any]) -> Any:
  """``x`` with the children ``parts`` replaced."""
  if isinstance(x, dict):
    return {**x, **parts}
  if _is_state(x):
    return x._replace(**parts)
  return type(x)(parts.get(i, v) for i, v in enumerate(x))
