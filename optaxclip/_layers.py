"""The ``layer_axis`` tree of a Flax NNX model, read from its variables.

Flax NNX stacks a model's blocks with ``nnx.vmap`` (and runs them with
``nnx.scan``): each of the blocks' parameters gets a leading axis that
indexes the layer. ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME:
"layers"})`` records that axis in a parameter's sharding metadata
(``out_sharding``, inserting ``"layers"`` at the stacked position), but
only where the parameter carries sharding metadata already (given with
``nnx.with_partitioning`` or a layer's ``kernel_metadata=``...): Flax keeps
no record of the stacking otherwise. :func:`layer_axes` reads that record.
"""

from __future__ import annotations

import sys
from typing import Any

import jax

from optaxclip import _validate

_SHARDING = ("out_sharding", "sharding_names", "sharding")


def layer_axes(model: Any, *, name: str = "layers") -> Any:
  """The ``layer_axis`` tree of a Flax NNX model with stacked blocks.

  Reads each parameter's sharding metadata: a parameter whose sharding
  names hold ``name`` is stacked along that axis; one whose sharding names
  do not is not stacked (``None``). ``nnx.vmap(...,
  transform_metadata={nnx.PARTITION_NAME: name})`` records the name when it
  stacks a parameter that carries sharding metadata. Pass the result as
  ``layer_axis=`` to any optaxclip transform; it has the structure of the
  gradients ``nnx.grad`` returns and an ``nnx.Optimizer`` passes on.

  Flax records nothing for a parameter without sharding metadata (by
  default, ``nnx.Linear``'s bias, ``nnx.LayerNorm``'s scale, ...), so such
  a parameter raises a ValueError naming it: annotate it (e.g.
  ``bias_metadata={"out_sharding": (None,), "eager_sharding": False}``;
  Flax before 0.12.4 spells the key ``"sharding_names"``), or write the
  tree by hand, e.g. ``nnx.State({"blocks": 0, "head": None})``.

  Args:
    model: an ``nnx.Module``, whose ``nnx.Param`` variables are read, or an
      ``nnx.State`` of variables (``nnx.state(model, wrt)`` for other
      filters).
    name: the axis name given to ``nnx.vmap`` as ``nnx.PARTITION_NAME``.

  Returns:
    An ``nnx.State`` like ``nnx.state(model, nnx.Param)`` holding, for
    each parameter, its layer axis (an int) or ``None``.

  Raises:
    TypeError: ``model`` is neither an ``nnx.Module`` nor an ``nnx.State``,
      or ``name`` is not a string.
    ValueError: a parameter carries no sharding metadata, or names
      ``name`` at more than one axis.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> import optaxclip as oc
    >>> meta = {"out_sharding": (None,), "eager_sharding": False}
    >>> @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: "layers"})
    ... def blocks(key):
    ...   return nnx.LayerNorm(4, rngs=nnx.Rngs(key), scale_metadata=meta,
    ...                        bias_metadata=meta)
    >>> model = blocks(jax.random.split(jax.random.key(0), 3))
    >>> print(dict(oc.layer_axes(model)))
    {'bias': 0, 'scale': 0}
  """
  caller = "layer_axes"
  if not isinstance(name, str):
    raise TypeError(f"{caller}: name must be a string (the axis name given"
                    f" as nnx.PARTITION_NAME), got {name!r}.")
  nnx = sys.modules.get("flax.nnx")
  if nnx is None or not isinstance(model, (nnx.Module, nnx.State)):
    raise TypeError(
        f"{caller}: model must be a Flax NNX Module or an nnx.State of its"
        f" variables, got {type(model).__name__}.")
  state = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else (
      model)
  unknown: list[str] = []

  def axis_of(path, v):
    return _axis_of(path, v, name, nnx, unknown)

  axes = jax.tree_util.tree_map_with_path(
      axis_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  if unknown:
    raise ValueError(
        f"{caller}: {len(unknown)} parameter(s) carry no sharding metadata,"
        f" so Flax kept no record of a stacking axis: {', '.join(unknown[:5])}"
        + (", ..." if len(unknown) > 5 else "") + ". Give them sharding"
        " metadata (nnx.with_partitioning, or kernel_metadata= / bias_metadata"
        "= / scale_metadata= with an 'out_sharding' entry) and create the"
        f" blocks with nnx.vmap(..., transform_metadata={{nnx.PARTITION_NAME:"
        f" {name!r}}}); or write layer_axis by hand, e.g."
        " nnx.State({'blocks': 0, 'head': None}).")
  _validate.check_layer_axis(axes, caller)
  return axes


def _axis_of(path: Any, v: Any, name: str, nnx: Any,
             unknown: list[str]) -> int | None:
  """One variable's layer axis from its sharding names (``None`` if not
  stacked); a variable without sharding names is added to ``unknown``."""
  caller = "layer_axes"
  at = jax.tree_util.keystr(path, simple=True, separator="/") or "root"
  metadata = v.get_metadata() if isinstance(v, nnx.Variable) else {}
  names = next((metadata[k] for k in _SHARDING if metadata.get(k)), None)
  if names is None:
    unknown.append(at)
    return None
  found = [i for i, n in enumerate(tuple(names)) if n == name]
  if len(found) > 1:
    raise ValueError(
        f"{caller}: the parameter {at} names {name!r} at axes {found} of its"
        f" sharding {tuple(names)}; a stacked parameter has one layer axis.")
  return found[0] if found else None
