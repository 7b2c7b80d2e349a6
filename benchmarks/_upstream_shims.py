"""Optax's and jax-privacy's clipping names, answered by optaxclip.

Used by ``python -m benchmarks.upstream_tests``: the upstream test files call
these in place of the library's own functions. Each shim adapts the calling
convention only (argument names, a ``None`` state for a stateless transform,
the shape of the returned tuple, the names of state fields) and returns what
the optaxclip call returned; where optaxclip has no counterpart for an
option, the shim skips the test (``pytest.skip``) and says which option.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest

import optaxclip as oc

# --------------------------------------------------------------------------
# optax.transforms._clipping


class _Stateless(NamedTuple):
  """An optaxclip transform called as optax calls its stateless clippers.

  Optax's tests pass ``None`` for the state of a clipper that keeps none;
  here the state is initialised from the call's ``params`` (or updates).
  """

  inner: optax.GradientTransformation

  def init(self, params: Any) -> Any:
    return self.inner.init(params)

  def update(self, updates: Any, state: Any, params: Any = None) -> Any:
    if state is None:
      state = self.inner.init(updates if params is None else params)
    return self.inner.update(updates, state, params)


class OptaxClipping:
  """The names the test of ``optax.transforms._clipping`` calls."""

  @staticmethod
  def clip(max_delta: Any) -> _Stateless:
    return _Stateless(oc.clip_by_value(max_delta))

  @staticmethod
  def clip_by_block_rms(threshold: Any) -> _Stateless:
    return _Stateless(oc.clip_by_norm(threshold, ord="rms"))

  @staticmethod
  def clip_by_global_norm(max_norm: Any) -> _Stateless:
    return _Stateless(oc.clip_by_global_norm(max_norm))

  @staticmethod
  def adaptive_grad_clip(clipping: Any, eps: Any = 1e-3,
                         axis: Any = None) -> _Stateless:
    return _Stateless(oc.adaptive_grad_clip(clipping, eps, axis=axis))

  @staticmethod
  def per_example_global_norm_clip(grads: Any, l2_norm_clip: Any) -> Any:
    """optax returns ``(sum, number of examples clipped)``."""
    total, info = oc.per_example_clip(grads, l2_norm_clip)
    return total, info.num_examples_clipped

  @staticmethod
  def per_example_layer_norm_clip(grads: Any, global_l2_norm_clip: Any,
                                  uniform: bool = True) -> Any:
    """optax's options as ``oc.ExampleClip``'s ``per_layer``; the count as
    returned.

    ``uniform=True`` is ``per_layer=True``; ``uniform=False`` gives layer
    ``i`` (leaf ``i``, of ``D_i`` elements of ``D``) the threshold
    ``C * sqrt(D_i / D)``, written as a ``per_layer`` tree of thresholds.
    optaxclip counts clipped examples once, not per layer: the count is
    returned as it comes, a scalar, where optax returns a list per layer.
    """
    if uniform:
      per_layer: Any = True
    else:
      sizes = jax.tree.map(lambda g: g[0].size, grads)
      total = sum(jax.tree.leaves(sizes))
      per_layer = jax.tree.map(
          lambda d: global_l2_norm_clip * (d / total) ** 0.5, sizes)
    out, info = oc.per_example_clip(
        grads, oc.ExampleClip(global_l2_norm_clip, per_layer=per_layer))
    return out, info.num_examples_clipped

  # A measuring helper of the test, not a transform: optax's own.
  unitwise_norm = staticmethod(optax.transforms._clipping.unitwise_norm)


optax_clipping = OptaxClipping()

# --------------------------------------------------------------------------
# optax.transforms._conditionality


class ApplyIfFiniteView(NamedTuple):
  """``oc.skip_step``'s state under ``apply_if_finite``'s field names.

  ``last_finite`` is ``not skipped`` and ``total_notfinite`` is
  ``num_skipped`` (with only the non-finite rule on, every skip is a
  non-finite step); ``inner_state`` is the wrapped state. optaxclip keeps
  no count of consecutive non-finite steps: ``notfinite_count`` raises.
  """

  state: oc.SkipStepState

  @property
  def last_finite(self) -> jax.Array:
    return ~self.state.skipped

  @property
  def total_notfinite(self) -> jax.Array:
    return self.state.num_skipped

  @property
  def inner_state(self) -> Any:
    return self.state.inner_state

  @property
  def notfinite_count(self) -> jax.Array:
    raise AttributeError(
        "oc.skip_step keeps no count of consecutive non-finite steps"
        " (apply_if_finite's notfinite_count)")


class _SkipStep(NamedTuple):
  inner: optax.GradientTransformationExtraArgs

  def init(self, params: Any) -> ApplyIfFiniteView:
    return ApplyIfFiniteView(self.inner.init(params))

  def update(self, updates: Any, state: ApplyIfFiniteView, params: Any = None,
             **extra_args: Any) -> tuple[Any, ApplyIfFiniteView]:
    out, new = self.inner.update(updates, state.state, params, **extra_args)
    return out, ApplyIfFiniteView(new)


class OptaxConditionality:
  """The name the test of ``optax.transforms._conditionality`` calls."""

  @staticmethod
  def apply_if_finite(inner: optax.GradientTransformation,
                      max_consecutive_errors: int) -> _SkipStep:
    """``oc.skip_step(inner)``; it has no ``max_consecutive_errors``."""
    del max_consecutive_errors  # No counterpart: every bad step is skipped.
    return _SkipStep(oc.skip_step(inner))


optax_conditionality = OptaxConditionality()

# --------------------------------------------------------------------------
# jax_privacy.clipping

AuxiliaryOutput = collections.namedtuple(
    "AuxiliaryOutput", ["values", "grad_norms", "aux"])


def _unmapped(option: str) -> None:
  pytest.skip(f"no optaxclip counterpart for jax-privacy's {option}")


def clip_pytree(pytree: Any, clip_norm: Any, rescale_to_unit_norm: bool = False,
                nan_safe: bool = True, return_zero: Any = False) -> Any:
  """jax-privacy's clip of one tree: ``oc.per_example_clip`` of a batch of 1.

  Returns ``(clipped, norm)`` as jax-privacy does: the clipped sum of the
  one example, and its norm from ``PerExampleInfo.norms``.
  """
  if return_zero is not False:
    _unmapped("return_zero")
  batch = jax.tree.map(lambda x: jnp.asarray(x)[None], pytree)
  total, info = oc.per_example_clip(
      batch, oc.ExampleClip(clip_norm, normalize=rescale_to_unit_norm,
                            nan_safe=nan_safe))
  return total, info.norms[0]


def clipped_grad(fun: Any, argnums: Any = 0, has_aux: bool = False, *,
                 l2_clip_norm: Any, rescale_to_unit_norm: bool = False,
                 normalize_by: float = 1.0, batch_argnums: Any = 1,
                 keep_batch_dim: bool = True, return_values: bool = False,
                 return_grad_norms: bool = False,
                 pre_clipping_transform: Any = None,
                 microbatch_size: int | None = None, nan_safe: bool = True,
                 dtype: Any = None, prng_argnum: int | None = None,
                 spmd_axis_name: str | None = None) -> Any:
  """jax-privacy's ``clipped_grad`` as ``oc.clipped_grad``.

  ``l2_clip_norm``, ``rescale_to_unit_norm`` and ``nan_safe`` are
  ``clip=oc.ExampleClip(max_norm, normalize=..., nan_safe=...)``;
  ``oc.clipped_grad``'s function always returns its ``PerExampleInfo``
  last, and ``return_grad_norms`` passes its ``norms`` on in
  ``AuxiliaryOutput.grad_norms`` (without it the info is dropped);
  ``is_padding_example`` is ``~example_mask``. Options with no counterpart
  skip the test.
  """
  for name, value, default in (
      ("normalize_by", normalize_by, 1.0), ("return_values", return_values, False),
      ("pre_clipping_transform", pre_clipping_transform, None),
      ("dtype", dtype, None), ("prng_argnum", prng_argnum, None),
      ("spmd_axis_name", spmd_axis_name, None)):
    if value != default:
      _unmapped(name)
  grad_fn = oc.clipped_grad(
      fun, argnums, has_aux,
      clip=oc.ExampleClip(l2_clip_norm, normalize=rescale_to_unit_norm,
                          nan_safe=nan_safe),
      batch_argnums=batch_argnums, microbatch_size=microbatch_size,
      keep_batch_dim=keep_batch_dim)

  def call(*args: Any, is_padding_example: Any = None, **kwargs: Any) -> Any:
    if is_padding_example is not None:
      kwargs["example_mask"] = ~jnp.asarray(is_padding_example)
    out = grad_fn(*args, **kwargs)
    grads, aux, info = out if has_aux else (out[0], None, out[1])
    if not (has_aux or return_grad_norms):
      return grads
    norms = info.norms if return_grad_norms else None
    return grads, AuxiliaryOutput(values=None, grad_norms=norms, aux=aux)

  return call
