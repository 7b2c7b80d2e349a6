"""The ``layer_axis`` tree of a model, read from its parameter tree.

A model that stacks its blocks keeps each block parameter once, with a
leading axis that indexes the layer: Flax linen's ``nn.scan`` (the blocks'
parameters under the scanned module's name, e.g.
``params["Transformer"]["encoderblock"]``), Flax NNX's ``nnx.vmap`` run by
``nnx.scan``, Equinox's ``eqx.filter_vmap`` run by ``jax.lax.scan``.
:func:`layer_axes` finds that axis for each parameter: under a subtree the
caller names (``stacked=``), or from the metadata a framework records when
it stacks (linen's ``nn.Partitioned`` names, NNX's sharding metadata).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from optaxclip import _validate

_SHARDING = ("out_sharding", "sharding_names", "sharding")


def layer_axes(model: Any, *, stacked: str | Sequence[str] | Mapping[str, int]
               | None = None, name: str = "layers") -> Any:
  """The ``layer_axis`` tree of a model whose blocks are stacked.

  Each parameter's layer axis comes from, in this order:

  - ``stacked``: the subtrees a scan or a vmap stacked, by path. A path is
    a key, or keys joined by ``/`` (``"encoderblock"``,
    ``"Transformer/encoderblock"``, ``"layers"``), and names every
    parameter whose path holds those keys in a row; their layer axis is 0
    (or the path's value, when ``stacked`` is a dict of paths to axes).
  - metadata: a Flax linen ``nn.Partitioned`` / ``nn.LogicallyPartitioned``
    box whose names hold ``name`` (``nn.scan(..., metadata_params=
    {nn.PARTITION_NAME: name})`` inserts it), or a Flax NNX variable whose
    sharding metadata does (``nnx.vmap(..., transform_metadata=
    {nnx.PARTITION_NAME: name})`` inserts it where a parameter carries
    sharding metadata); a name list without ``name`` means not stacked.
  - otherwise, with ``stacked`` given, the parameter is not stacked
    (``None``); without it, nothing records whether it is, and a
    ValueError names such parameters, lists the model's keys and the
    subtrees whose parameters share a leading dimension, and shows the
    call that fixes it (e.g. ``stacked="encoderblock"``).

  Pass the result as ``layer_axis=`` to any optaxclip transform: it has
  the structure of the gradients (an ``nnx.State`` for an NNX model, a
  dict for linen params, a module for an Equinox model, with an int or
  ``None`` in place of each array and ``None`` for everything else). A
  plain dict of ints and ``None`` is also accepted as ``layer_axis`` for
  gradients held in an ``nnx.State``.

  Args:
    model: the parameters: a Flax NNX ``Module`` (its ``nnx.Param``
      variables are read) or an ``nnx.State``, Flax linen params (boxed
      or not; the ``"params"`` collection, not the whole variables dict),
      an Equinox module, or any pytree of arrays.
    stacked: the stacked subtrees: a path, a sequence of paths (axis 0),
      or a dict from paths to axes; ``None`` to read the metadata alone.
    name: the axis name given to ``nn.scan`` / ``nnx.vmap`` as
      ``PARTITION_NAME``.

  Returns:
    A tree like the gradients of ``model``, holding each parameter's layer
    axis (an int) or ``None``.

  Raises:
    TypeError: ``name`` is not a string, or ``stacked`` is none of the
      forms above.
    ValueError: a path of ``stacked`` names no parameter, or its
      parameters disagree on the number of layers or lack the axis; a
      parameter's metadata names ``name`` twice; or a parameter has no
      record of a stacking axis and ``stacked`` is not given.

  Example:
    >>> import jax.numpy as jnp
    >>> import optaxclip as oc
    >>> params = {"encoderblock": {"kernel": jnp.zeros((3, 4, 4)),
    ...                            "bias": jnp.zeros((3, 4))},
    ...           "head": {"kernel": jnp.zeros((4, 2))}}
    >>> print(oc.layer_axes(params, stacked="encoderblock"))
    {'encoderblock': {'bias': 0, 'kernel': 0}, 'head': {'kernel': None}}
  """
  caller = "layer_axes"
  if not isinstance(name, str):
    raise TypeError(f"{caller}: name must be a string (the axis name given"
                    f" as PARTITION_NAME), got {name!r}.")
  paths = _stacked_paths(stacked)
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and isinstance(model, nnx.Module):
    model = nnx.state(model, nnx.Param)
  is_box = _box_test(nnx)
  flat, treedef = jax.tree_util.tree_flatten_with_path(model, is_leaf=is_box)
  found: dict[tuple[str, ...], list[tuple[str, int]]] = {p: [] for p in paths}
  unknown: list[str] = []
  axes: list[int | None] = []
  for path, leaf in flat:
    keys = tuple(_key(k) for k in path)
    at = "/".join(keys) or "root"
    shape = _shape(leaf, nnx)
    if shape is None:  # Not an array: no gradient, no layer axis.
      axes.append(None)
      continue
    hit = next((p for p in paths if _holds(keys, p)), None)
    if hit is not None:
      axis = paths[hit]
      if not -len(shape) <= axis < len(shape):
        raise ValueError(
            f"{caller}: stacked={'/'.join(hit)!r} names the parameter {at}"
            f" of shape {shape}, which has no axis {axis}.")
      found[hit].append((at, shape[axis]))
      axes.append(axis % len(shape))
      continue
    names = _names(leaf, nnx)
    if names is None:
      if not paths:
        unknown.append(at)
      axes.append(None)
      continue
    at_name = [i for i, n in enumerate(names) if n == name]
    if len(at_name) > 1:
      raise ValueError(
          f"{caller}: the parameter {at} names {name!r} at axes {at_name}"
          f" of its partition names {names}; a stacked parameter has one"
          " layer axis.")
    axes.append(at_name[0] if at_name else None)
  _check_found(found, flat, caller)
  if unknown:
    raise ValueError(_unrecorded(unknown, flat, name, nnx, is_box))
  out = jax.tree_util.tree_unflatten(treedef, axes)
  _validate.check_layer_axis(out, caller)
  return out


def _stacked_paths(stacked: Any) -> dict[tuple[str, ...], int]:
  """``stacked`` as ``{keys: axis}``; a TypeError for any other form."""
  caller = "layer_axes"
  if stacked is None:
    return {}
  if isinstance(stacked, str):
    stacked = {stacked: 0}
  elif not isinstance(stacked, Mapping):
    if not isinstance(stacked, Sequence) or not all(
        isinstance(s, str) for s in stacked):
      raise TypeError(
          f"{caller}: stacked must be a path (e.g. 'encoderblock'), a"
          " sequence of paths, or a dict from paths to axes, got"
          f" {stacked!r}.")
    stacked = dict.fromkeys(stacked, 0)
  out = {}
  for path, axis in stacked.items():
    if not isinstance(path, str) or not path.strip("/"):
      raise TypeError(f"{caller}: stacked paths must be non-empty strings"
                      f" such as 'blocks' or 'Transformer/encoderblock', got"
                      f" {path!r}.")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(
        axis, (int, np.integer)):
      raise TypeError(f"{caller}: stacked[{path!r}] must be an int (the"
                      f" axis that stacks the layers), got {axis!r}.")
    out[tuple(k for k in path.split("/") if k)] = int(axis)
  return out


def _check_found(found: dict[tuple[str, ...], list[tuple[str, int]]],
                 flat: list, caller: str) -> None:
  """Raises for a ``stacked`` path that names no parameter, or whose
  parameters disagree on the number of layers."""
  for keys, hits in found.items():
    path = "/".join(keys)
    if not hits:
      raise ValueError(
          f"{caller}: stacked={path!r} names no parameter of this model."
          f" Its parameters' paths begin with: {_top_paths(flat)}.")
    sizes = sorted({n for _, n in hits})
    if len(sizes) > 1:
      first = {n: at for at, n in reversed(hits)}
      raise ValueError(
          f"{caller}: the parameters under stacked={path!r} disagree on"
          " the number of layers: "
          + ", ".join(f"{first[n]} has {n}" for n in sizes)
          + ". Name the subtree the scan stacked (all of its parameters"
          " have the layers along one axis).")


def _unrecorded(unknown: list[str], flat: list, name: str, nnx: Any,
                is_box: Any) -> str:
  """The error for parameters without a record of a stacking axis."""
  candidates = _candidates(flat, nnx)
  if candidates:
    guess = ", ".join(f"{p!r} ({n} layers)" for p, n in candidates)
    fix = (f"stacked={candidates[0][0]!r}" if len(candidates) == 1 else
           f"stacked={[p for p, _ in candidates]!r}")
    hint = (f" The subtrees whose parameters share a leading dimension:"
            f" {guess}; if those are the stacked blocks, call"
            f" oc.layer_axes(model, {fix}).")
  else:
    hint = (" No subtree's parameters share a leading dimension (nothing"
            " looks stacked): layer_axis=None may be what you want.")
  return (
      f"layer_axes: {len(unknown)} parameter(s) carry no record of a"
      f" stacking axis ({', '.join(unknown[:4])}"
      + (", ..." if len(unknown) > 4 else "") + "): neither partition"
      f" names holding {name!r} (nn.scan(..., metadata_params="
      f"{{nn.PARTITION_NAME: {name!r}}}) over nn.Partitioned parameters,"
      f" or nnx.vmap(..., transform_metadata={{nnx.PARTITION_NAME:"
      f" {name!r}}}) over parameters with sharding metadata) nor a"
      " stacked= path. The model's parameters' paths begin with:"
      f" {_top_paths(flat)}." + hint)


def _top_paths(flat: list, depth: int = 2, most: int = 12) -> str:
  """The first ``depth`` keys of the parameters' paths, each once."""
  seen: list[str] = []
  for path, _ in flat:
    p = "/".join(_key(k) for k in path[:depth])
    if p not in seen:
      seen.append(p)
  if not seen:
    return "(none: the model holds no parameters)"
  return (", ".join(repr(p) for p in seen[:most])
          + (", ..." if len(seen) > most else ""))


def _candidates(flat: list, nnx: Any, depth: int = 3
                ) -> list[tuple[str, int]]:
  """The outermost subtrees (at most ``depth`` keys deep, two or more
  parameters, all with two or more axes) whose parameters share a leading
  dimension: what a scan over layers leaves behind."""
  leaves: list[tuple[tuple[str, ...], tuple[int, ...]]] = []
  for path, x in flat:
    shape = _shape(x, nnx)
    if shape is not None:
      leaves.append((tuple(_key(k) for k in path), shape))
  out: list[tuple[str, int]] = []
  taken: list[tuple[str, ...]] = []
  for d in range(1, depth + 1):
    for prefix in dict.fromkeys(k[:d] for k, _ in leaves if len(k) > d):
      if any(prefix[:len(t)] == t for t in taken):
        continue
      shapes = [s for k, s in leaves if k[:d] == prefix]
      if (len(shapes) >= 2 and all(len(s) >= 2 for s in shapes)
          and len({s[0] for s in shapes}) == 1):
        taken.append(prefix)
        out.append(("/".join(prefix), shapes[0][0]))
  return out


def _holds(keys: tuple[str, ...], sub: tuple[str, ...]) -> bool:
  """Whether ``keys`` holds ``sub`` as a run of consecutive keys."""
  n = len(sub)
  return any(keys[i:i + n] == sub for i in range(len(keys) - n + 1))


def _key(k: Any) -> str:
  """One step of a path as text: a dict key, an attribute, an index."""
  for field in ("key", "name", "idx"):
    if hasattr(k, field):
      return str(getattr(k, field))
  return str(k)


def _box_test(nnx: Any) -> Any:
  """``is_leaf`` for the boxes that carry metadata: linen's
  ``nn.Partitioned`` and NNX's variables."""
  meta = sys.modules.get("flax.core.meta")
  kinds = tuple(t for t in (getattr(meta, "Partitioned", None),
                            getattr(nnx, "Variable", None)) if t is not None)
  return lambda x: isinstance(x, kinds) if kinds else False


def _value(leaf: Any, nnx: Any) -> Any:
  """The array inside a box (or the leaf itself)."""
  if nnx is not None and isinstance(leaf, nnx.Variable):
    return leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
  meta = sys.modules.get("flax.core.meta")
  if meta is not None and isinstance(leaf, meta.Partitioned):
    return leaf.value
  return leaf


def _shape(leaf: Any, nnx: Any) -> tuple[int, ...] | None:
  """The shape of an array leaf (boxed or not); ``None`` for others."""
  value = _value(leaf, nnx)
  shape = getattr(value, "shape", None)
  return None if shape is None else tuple(shape)


def _names(leaf: Any, nnx: Any) -> tuple[Any, ...] | None:
  """A leaf's partition names: linen's box names, or an NNX variable's
  sharding metadata; ``None`` where it records none."""
  meta = sys.modules.get("flax.core.meta")
  if meta is not None and isinstance(leaf, meta.Partitioned):
    return tuple(leaf.names)
  if nnx is not None and isinstance(leaf, nnx.Variable):
    metadata = leaf.get_metadata()
    names = next((metadata[k] for k in _SHARDING if metadata.get(k)), None)
    return None if names is None else tuple(names)
  return None
