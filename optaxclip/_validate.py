"""Argument checks: every check of a hyper-parameter, named for what it checks.

Values known at construction are checked at construction, with an error that
names the function, the argument and the fix. Values known only at run time
(schedules, traced arrays) are checked by type here and made safe by
:func:`optaxclip._thresholds.resolve`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

_NUMBER = (int, float, np.number, np.ndarray, jax.Array)
_RMS = "rms"
_F = TypeVar("_F", bound=Callable[..., Any])


def renamed(**old: str) -> Callable[[_F], _F]:
  """Makes a keyword of an earlier release raise a TypeError naming its
  replacement (``old=new``); a value holding a space is the whole hint
  (``skip_update_on_spike="was removed: wrap the optimizer in
  oc.skip_step"``). Every such keyword is in the CHANGELOG's table."""
  def wrap(fn: _F) -> _F:
    params = inspect.signature(fn).parameters.values()
    positional = [p.name for p in params
                  if p.kind == p.POSITIONAL_OR_KEYWORD]
    keywords = [p.name for p in params if p.kind == p.KEYWORD_ONLY]

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
      if len(args) > len(positional) and keywords:
        raise TypeError(
            f"{fn.__name__}: takes {len(positional)} positional argument(s)"
            f" ({', '.join(positional) or 'none'}), got {len(args)}; pass"
            f" the others by keyword: {', '.join(k + '=' for k in keywords)}"
            " (see the CHANGELOG's table of renamed names).")
      for name in kwargs:
        if name in old:
          hint = old[name]
          if " " not in hint:
            hint = f"is now {hint}="
          raise TypeError(f"{fn.__name__}: {name}= {hint} (see the"
                          " CHANGELOG's table of renamed names).")
      return fn(*args, **kwargs)
    return checked  # type: ignore[return-value]
  return wrap


def is_concrete(x: Any) -> bool:
  """True when ``x`` has a value known at trace time."""
  try:
    np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return False
  return True


def is_schedule(value: Any) -> bool:
  """A callable that is not an array: an Optax schedule of the step count."""
  return callable(value) and not isinstance(value, jax.Array)


def check_schedule(value: Any, name: str, caller: str) -> None:
  """A TypeError naming ``name`` unless the schedule takes the step count."""
  try:
    inspect.signature(value).bind(0)
  except TypeError:
    raise TypeError(
        f"{caller}: {name} is a callable that cannot take the step count;"
        " give a number, a JAX scalar, or a schedule step -> value (e.g."
        " optax.linear_schedule(...)).") from None
  except ValueError:  # No signature to read (a builtin): trust it.
    pass


def is_tree_threshold(value: Any) -> bool:
  """A threshold given as a pytree (one value per subtree), not one value."""
  return not (is_schedule(value) or isinstance(value, _NUMBER))


def canonical_ord(ord: Any) -> float | str | jax.Array:
  """Validates ``ord`` and returns it as a float, ``"rms"`` or a traced array."""
  if isinstance(ord, str):
    if ord.lower() == _RMS:
      return _RMS
    if ord.lower() == "inf":
      return math.inf
    raise ValueError(
        f"ord={ord!r} is not a known norm; use 1, 2, inf, any p > 0, or 'rms'."
    )
  if isinstance(ord, bool) or not isinstance(ord, _NUMBER):
    raise TypeError(
        f"ord must be a number > 0 or 'rms', got {type(ord).__name__}."
    )
  if isinstance(ord, jax.Array) and not is_concrete(ord):
    return ord  # Traced, e.g. injected by optax.inject_hyperparams.
  p = float(ord)
  if not p > 0:  # Also catches NaN.
    raise ValueError(f"ord must be > 0 (1, 2, inf, any p > 0, or 'rms'), got {p}.")
  return p


def check_threshold(value: Any, name: str, caller: str, *,
                    allow_tree: bool = False,
                    allow_negative: bool = False) -> None:
  """Raises at construction for a threshold whose value is known and bad.

  Values only known at run time (schedules, traced arrays) are checked by
  their type only.
  """
  if is_schedule(value):
    check_schedule(value, name, caller)
    return
  leaves = jax.tree_util.tree_leaves(value) if allow_tree else [value]
  if allow_tree and not leaves:
    raise ValueError(f"{caller}: {name} is an empty tree; give a number.")
  for leaf in leaves:
    if is_schedule(leaf):
      check_schedule(leaf, name, caller)
      continue
    if isinstance(leaf, bool) or not isinstance(leaf, _NUMBER):
      raise TypeError(
          f"{caller}: {name} must be a number, a JAX scalar, an Optax schedule"
          + (" or a pytree prefix of the gradients" if allow_tree else "")
          + f"; got {type(leaf).__name__}."
      )
    if jnp.ndim(leaf) != 0:
      raise ValueError(
          f"{caller}: {name} must be a scalar, got shape {jnp.shape(leaf)};"
          " for one threshold per leaf give a pytree of scalars."
      )
    if not is_concrete(leaf):
      continue
    v = float(np.asarray(leaf).real)
    if math.isnan(v) or (v < 0 and not allow_negative):
      raise ValueError(
          f"{caller}: {name}={v} is not a valid threshold; it must be a"
          " non-negative number (inf disables clipping)."
      )


def check_layer_axis(value: Any, caller: str) -> None:
  """A TypeError unless ``layer_axis`` holds ints and ``None`` only.

  ``layer_axis`` is ``None``, an int, or a pytree prefix of the gradients
  whose leaves are ints or ``None``; whether each int fits its leaf is
  checked when the gradients arrive (:func:`optaxclip._tree.layer_index`).
  """
  for path, v in jax.tree_util.tree_leaves_with_path(
      value, is_leaf=lambda x: x is None):
    if v is None:
      continue
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
      at = jax.tree_util.keystr(path)
      raise TypeError(
          f"{caller}: layer_axis{at} must be an int (the axis that stacks"
          f" a leaf's layers) or None (a leaf that is not stacked), got"
          f" {v!r}. Give one int for every leaf, or a pytree prefix of the"
          " gradients holding ints and None, e.g. {'blocks': 0, 'head':"
          " None}.")


def check_bool(value: Any, name: str, caller: str) -> None:
  """A TypeError naming ``name`` unless ``value`` is True or False."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{caller}: {name} must be True or False, got {value!r}.")


def check_range(value: Any, name: str, caller: str, *, lo: float, hi: float,
                open_lo: bool = False, open_hi: bool = False,
                schedule: bool = True) -> None:
  """Raises when a scalar known at construction lies outside ``[lo, hi]``.

  Schedules (where ``schedule`` allows them) and traced arrays are checked
  at run time: :func:`optaxclip._thresholds.resolve` clamps their values
  into range.
  """
  if is_schedule(value):
    if schedule:
      check_schedule(value, name, caller)
      return
    raise TypeError(f"{caller}: {name} does not take a schedule; give a"
                    " number or a JAX scalar.")
  if isinstance(value, bool) or not isinstance(value, _NUMBER):
    raise TypeError(f"{caller}: {name} must be a number, a JAX scalar"
                    + (" or an Optax schedule" if schedule else "")
                    + f"; got {type(value).__name__}.")
  if jnp.ndim(value) != 0:
    raise ValueError(f"{caller}: {name} must be a scalar, got shape"
                     f" {jnp.shape(value)}.")
  if not is_concrete(value):
    return
  v = float(np.asarray(value))
  below = v <= lo if open_lo else v < lo
  above = v >= hi if open_hi else v > hi
  if math.isnan(v) or below or above:
    interval = (("(" if open_lo else "[") + f"{lo:g}, {hi:g}"
                + (")" if open_hi else "]"))
    raise ValueError(f"{caller}: {name}={v} is outside {interval}; give a"
                     f" value in {interval}.")


def check_int(value: Any, name: str, caller: str, *, lo: int) -> None:
  """Raises unless ``value`` is an integer >= ``lo`` (traced ones pass)."""
  if isinstance(value, bool) or not isinstance(
      value, (int, np.integer, np.ndarray, jax.Array)):
    raise TypeError(f"{caller}: {name} must be an integer >= {lo}; got"
                    f" {type(value).__name__}.")
  if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value),
                                                jnp.integer):
    raise TypeError(f"{caller}: {name} must be an integer >= {lo}; got"
                    f" {value!r}.")
  if is_concrete(value) and int(np.asarray(value)) < lo:
    raise ValueError(f"{caller}: {name}={int(np.asarray(value))} must be an"
                     f" integer >= {lo}.")


def static_size(value: Any, name: str, caller: str) -> int:
  """``value`` as a Python int, or a clear error when it is traced."""
  if not is_concrete(value):
    raise TypeError(
        f"{caller}: {name} sizes a buffer in the state, so init needs its"
        " value; under optax.inject_hyperparams with a jitted init, pass"
        f" static_args=({name!r},).")
  return int(np.asarray(value))


def check_mask(mask: Any, caller: str) -> None:
  """``mask=``: None, a function of the updates, or a tree of bools (a
  pytree prefix of the updates; True: the leaves the transform acts on)."""
  if mask is None or callable(mask):
    return
  leaves = jax.tree_util.tree_leaves(mask)
  bad = [x for x in leaves if not isinstance(x, (bool, np.bool_))]
  if bad or not leaves:
    raise TypeError(
        f"{caller}: mask must be None, True or False, a pytree prefix of the"
        " updates holding True/False (the leaves to clip), or a function of"
        " the updates returning one; got"
        f" {'an empty tree' if not leaves else repr(bad[0])}.")
