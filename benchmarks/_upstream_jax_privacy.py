"""jax-privacy's clipping tests, transcribed, for ``benchmarks.upstream_tests``.

The cases of ``tests/clipping_test.py`` (``clip_pytree``) and
``tests/gradient_clipping_test.py`` (``clipped_grad``) of
google-deepmind/jax_privacy: the same inputs and expected results, written
as pytest functions that take the implementation as a parameter, so that
each runs against jax-privacy itself (which checks the transcription) and
against optaxclip through :mod:`benchmarks._upstream_shims`.

The harness copies this file into a temporary folder as a test file and
runs pytest on it; its name keeps pytest from collecting it in place.
The cases of ``clipped_fun`` (which clips a function's outputs, not
gradients) have no optaxclip counterpart and are not transcribed.
"""

from __future__ import annotations

import itertools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import _upstream_shims

BACKENDS = ("jax_privacy", "optaxclip")


@pytest.fixture(params=BACKENDS)
def lib(request: Any) -> Any:
  """The implementation under test: ``clip_pytree`` and ``clipped_grad``."""
  if request.param == "optaxclip":
    return _upstream_shims
  from jax_privacy import clipping
  return clipping


# --------------------------------------------------------------------------
# tests/clipping_test.py: ClipPyTreeTest

STRUCTS = {
    "f32_5x5": jax.ShapeDtypeStruct((5, 5), jnp.float32),
    "mixed_f16_f32_bf16": {
        "a": jax.ShapeDtypeStruct((10,), jnp.float16),
        "b": jax.ShapeDtypeStruct((5, 5), jnp.float32),
        "c": jax.ShapeDtypeStruct((), jnp.bfloat16),
    },
}


def _grid(**axes: Any) -> list[Any]:
  """Every combination, with readable ids."""
  names = list(axes)
  cases = []
  for values in itertools.product(*axes.values()):
    ident = "-".join(f"{n}={v}" for n, v in zip(names, values))
    cases.append(pytest.param(*values, id=ident))
  return cases


def _random(name: str) -> Any:
  return optax.tree.random_like(jax.random.key(0), STRUCTS[name])


OPTIONS = dict(struct=list(STRUCTS), clip_norm=[0.0, 1.0, 2.0, np.inf],
               rescale=[True, False], nan_safe=[True, False],
               return_zero=[True, False])


@pytest.mark.parametrize("struct,clip_norm,rescale,nan_safe,return_zero",
                         _grid(**OPTIONS))
def test_clip_pytree_output_dtype_matches_input(lib, struct, clip_norm, rescale,
                                                nan_safe, return_zero):
  tree = _random(struct)
  kw = dict(clip_norm=clip_norm, rescale_to_unit_norm=rescale,
            nan_safe=nan_safe, return_zero=return_zero)
  eager, _ = lib.clip_pytree(tree, **kw)
  # Upstream marks arguments 2 and 3 static and passes return_zero traced;
  # here it is static too (jax-privacy reads it with lax.select either way).
  jitted = jax.jit(lib.clip_pytree, static_argnames=(
      "rescale_to_unit_norm", "nan_safe", "return_zero"))
  traced, _ = jitted(tree, **kw)
  chex.assert_trees_all_equal_shapes_and_dtypes(tree, eager, traced)


@pytest.mark.parametrize("struct,clip_norm,rescale,nan_safe,return_zero",
                         _grid(**OPTIONS))
def test_clip_pytree_has_bounded_norm(lib, struct, clip_norm, rescale, nan_safe,
                                      return_zero):
  tree = _random(struct)
  clipped, _ = lib.clip_pytree(tree, clip_norm, rescale_to_unit_norm=rescale,
                               nan_safe=nan_safe, return_zero=return_zero)
  if return_zero:
    chex.assert_trees_all_close(clipped, optax.tree.zeros_like(tree))
  bound = 1.0 if rescale else clip_norm
  assert optax.tree.norm(clipped) <= bound


@pytest.mark.parametrize("struct", list(STRUCTS))
def test_clip_pytree_with_large_clip_norm(lib, struct):
  tree = _random(struct)
  clipped, _ = lib.clip_pytree(tree, optax.tree.norm(tree) * 1.5)
  chex.assert_trees_all_close(clipped, tree, atol=1e-6)


def test_clip_pytree_clip_norm_zero_rescale(lib):
  # clip_norm 0 with rescaling: the limit as clip_norm -> 0, x / ||x||.
  tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([0.0, 4.0])}
  clipped, norm = lib.clip_pytree(tree, 0.0, rescale_to_unit_norm=True)
  np.testing.assert_allclose(norm, 5.0, rtol=1e-7)
  np.testing.assert_allclose(optax.tree.norm(clipped), 1.0, rtol=1e-6)
  chex.assert_trees_all_close(
      clipped, {"a": jnp.array([0.6, 0.0]), "b": jnp.array([0.0, 0.8])})


@pytest.mark.parametrize("struct,clip_norm",
                         _grid(struct=list(STRUCTS), clip_norm=[0.0, 1.0, np.inf]))
def test_clip_pytree_zero_norm_pytree(lib, struct, clip_norm):
  zeros = optax.tree.zeros_like(STRUCTS[struct])
  for rescale in (False, True):
    clipped, norm = lib.clip_pytree(zeros, clip_norm,
                                    rescale_to_unit_norm=rescale, nan_safe=True)
    np.testing.assert_allclose(norm, 0.0, atol=1e-7)
    chex.assert_trees_all_close(clipped, zeros)
    np.testing.assert_allclose(optax.tree.norm(clipped), 0.0, atol=1e-7)


@pytest.mark.parametrize("clip_norm,return_zero,rescale",
                         _grid(clip_norm=[0.0, 1.0, 2.0, np.inf],
                               return_zero=[False, True], rescale=[False, True]))
def test_nan_safety(lib, clip_norm, return_zero, rescale):
  kw = dict(nan_safe=True, clip_norm=clip_norm, return_zero=return_zero,
            rescale_to_unit_norm=rescale)
  for bad in ([3.0, 0.0, 1.0, np.nan, 2.0], [3.0, 0.0, np.inf, -np.inf, 2.0]):
    clipped, _ = lib.clip_pytree(jnp.array(bad), **kw)
    chex.assert_tree_all_finite(clipped)


def test_clip_pytree_with_nan(lib):
  # A NaN entry counts as 0: the rest of the tree is clipped as without it.
  clipped = lib.clip_pytree(jnp.array([3.0, 0.0, 1.0, np.nan, 2.0]), 1.0)[0]
  assert jnp.linalg.norm(clipped) <= 1.0
  expected = lib.clip_pytree(jnp.array([3.0, 0.0, 1.0, 0.0, 2.0]), 1.0)[0]
  chex.assert_trees_all_close(clipped, expected)


def test_clip_pytree_with_inf(lib):
  # Infinite entries count as 0, as NaN does.
  clipped = lib.clip_pytree(jnp.array([3.0, 0.0, np.inf, -np.inf, 2.0]), 1.0)[0]
  expected = lib.clip_pytree(jnp.array([3.0, 0.0, 0.0, 0.0, 2.0]), 1.0)[0]
  chex.assert_trees_all_close(clipped, expected)
  assert jnp.linalg.norm(clipped) <= 1.0


# --------------------------------------------------------------------------
# tests/gradient_clipping_test.py: GradientClippingTest


def quadratic(params, x):
  """Half the mean squared distance of ``params`` from the rows of ``x``."""
  assert params.ndim == 1 and x.ndim == 2
  return 0.5 * jnp.mean((params - x) ** 2)


def quadratic_with_aux(params, x):
  assert params.ndim == 1 and x.ndim == 2
  return 0.5 * jnp.mean((params - x) ** 2), {"key": jnp.mean(x, axis=0)}


def logistic(params, inputs, targets):
  assert inputs.ndim == 2 and targets.ndim == 2
  logits = inputs @ params["weights"] + params["bias"]
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * targets, axis=-1))


PARAMS = jnp.array([2.0])
X = jnp.array([[1.0], [4.0], [7.0]])  # Per-example gradients 1, -2, -5.


def test_validate_args_overlap(lib):
  with pytest.raises(ValueError, match="overlap"):
    lib.clipped_grad(quadratic, l2_clip_norm=1.0, argnums=0, batch_argnums=0)


def test_validate_args_empty_batch(lib):
  with pytest.raises(ValueError, match="Batch Argnums must not be empty"):
    lib.clipped_grad(quadratic, l2_clip_norm=1.0, argnums=0, batch_argnums=())


def test_validate_args_inconsistent_batch_size(lib):
  grad_fn = lib.clipped_grad(quadratic, l2_clip_norm=1.0, argnums=0,
                             batch_argnums=(1, 2))
  with pytest.raises(ValueError, match="Batch axis"):
    grad_fn(jnp.zeros(3), jnp.zeros((10, 3)), jnp.zeros(5))


def test_sum_clipped_grad_basic(lib):
  grad_fn = lib.clipped_grad(quadratic, argnums=0, batch_argnums=1,
                             l2_clip_norm=2.5, rescale_to_unit_norm=False)
  chex.assert_trees_all_close(grad_fn(PARAMS, X), jnp.array([-3.5]), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16],
                         ids=["float16", "bfloat16"])
def test_sum_clipped_grad_float16(lib, dtype):
  grad_fn = jax.jit(lib.clipped_grad(quadratic, argnums=0, batch_argnums=1,
                                     l2_clip_norm=2.5,
                                     rescale_to_unit_norm=False))
  out = grad_fn(PARAMS.astype(dtype), X.astype(dtype))
  chex.assert_trees_all_close(out, jnp.array([-3.5]), atol=1e-6)


MICRO = pytest.mark.parametrize("microbatch_size", [None, 1, 3])


@MICRO
def test_sum_clipped_grad_with_rescale(lib, microbatch_size):
  grad_fn = lib.clipped_grad(quadratic, argnums=0, batch_argnums=1,
                             l2_clip_norm=2.5, rescale_to_unit_norm=True,
                             microbatch_size=microbatch_size)
  chex.assert_trees_all_close(grad_fn(PARAMS, X), jnp.array([-3.5 / 2.5]),
                              atol=1e-6)


@MICRO
def test_sum_clipped_grad_with_padding_examples(lib, microbatch_size):
  grad_fn = jax.jit(lib.clipped_grad(quadratic, argnums=0, batch_argnums=1,
                                     l2_clip_norm=2.5, rescale_to_unit_norm=True,
                                     microbatch_size=microbatch_size))
  for padding, expected in (([False, False, False], -3.5 / 2.5),
                            ([True, True, True], 0.0),
                            ([False, True, True], 1.0 / 2.5)):
    out = grad_fn(PARAMS, X, is_padding_example=jnp.array(padding))
    chex.assert_trees_all_close(out, jnp.array([expected]), atol=1e-6)


@MICRO
def test_sum_clipped_grad_has_aux(lib, microbatch_size):
  grad_fn = lib.clipped_grad(quadratic_with_aux, argnums=0, has_aux=True,
                             batch_argnums=1, l2_clip_norm=10.0,
                             microbatch_size=microbatch_size)
  total, aux_output = grad_fn(PARAMS, X)
  aux_mean = jax.tree.map(lambda a: a.mean(axis=0), aux_output.aux)
  expected_grad, expected_aux = jax.grad(quadratic_with_aux, has_aux=True)(
      PARAMS, X)
  chex.assert_trees_all_close(total / X.shape[0], expected_grad)
  chex.assert_trees_all_close(aux_mean, expected_aux)


@MICRO
def test_sum_clipped_grad_return_metrics(lib, microbatch_size):
  grad_fn = lib.clipped_grad(quadratic, argnums=0, batch_argnums=1,
                             l2_clip_norm=10.0, rescale_to_unit_norm=False,
                             return_grad_norms=True,
                             microbatch_size=microbatch_size)
  total, aux_output = grad_fn(PARAMS, X)
  chex.assert_trees_all_close(total, jnp.array([1.0 - 2.0 - 5.0]))
  chex.assert_trees_all_close(aux_output.grad_norms, jnp.array([1.0, 2.0, 5.0]))


@pytest.mark.parametrize("microbatch_size", [None, 1, 2])
def test_sum_clipped_grad_leaf_scales(lib, microbatch_size):
  params = {"w": jnp.array([2.0]), "b": jnp.array([1.0])}
  x = jnp.array([[1.0], [2.0]])

  def loss(p, data):
    return jnp.sum((p["w"] * data + p["b"] - data) ** 2)

  def scale_leaves(grad):
    return jax.tree.map(jnp.multiply,
                        {"w": jnp.array([0.1]), "b": jnp.array([1.0])}, grad)

  grad_fn = lib.clipped_grad(loss, argnums=0, batch_argnums=1,
                             l2_clip_norm=1.0, rescale_to_unit_norm=False,
                             pre_clipping_transform=scale_leaves,
                             microbatch_size=microbatch_size)
  # Per-example gradients (4, 4) and (12, 6), scaled to (0.4, 4), (1.2, 6).
  n1, n2 = np.hypot(0.4, 4.0), np.hypot(1.2, 6.0)
  expected = {"w": jnp.array([0.4 / n1 + 1.2 / n2]),
              "b": jnp.array([4.0 / n1 + 6.0 / n2])}
  chex.assert_trees_all_close(grad_fn(params, x), expected, atol=1e-5)


@pytest.mark.parametrize("microbatch_size", [None, 1, 2])
def test_sum_clipped_grad_extra_batch_axis(lib, microbatch_size):
  # Two users of three examples each: clipping per user.
  x = jnp.array([[[1.0], [2.0], [3.0]], [[3.0], [4.0], [5.0]]])
  grad_fn = lib.clipped_grad(quadratic_with_aux, has_aux=True, argnums=0,
                             batch_argnums=1, l2_clip_norm=1000,
                             rescale_to_unit_norm=False,
                             microbatch_size=microbatch_size,
                             keep_batch_dim=False)
  total, _ = grad_fn(PARAMS, x)
  chex.assert_shape(total, (1,))
  expected = jax.grad(quadratic)(PARAMS, x.reshape(6, 1))
  chex.assert_trees_all_close(total / x.shape[0], expected)


def test_values_and_sum_per_example_clipped_grads(lib):
  grad_fn = lib.clipped_grad(quadratic_with_aux, argnums=0, has_aux=True,
                             batch_argnums=1, l2_clip_norm=10.0,
                             rescale_to_unit_norm=False, return_values=True)
  total, aux_output = grad_fn(PARAMS, X)
  expected_value, expected_aux = quadratic_with_aux(PARAMS, X)
  np.testing.assert_allclose(aux_output.values.mean(axis=0), expected_value,
                             rtol=1e-6)
  chex.assert_trees_all_close(
      jax.tree.map(lambda a: a.mean(axis=0), aux_output.aux), expected_aux)
  chex.assert_trees_all_close(total, jnp.array([1.0 - 2.0 - 5.0]))


def test_values_and_sum_per_example_clipped_grads_no_aux(lib):
  grad_fn = lib.clipped_grad(quadratic, argnums=0, has_aux=False,
                             batch_argnums=1, l2_clip_norm=10.0,
                             rescale_to_unit_norm=False, return_values=True)
  total, aux_output = grad_fn(PARAMS, X)
  chex.assert_trees_all_close(aux_output.values, jnp.array([0.5, 2.0, 12.5]))
  chex.assert_trees_all_close(total, jnp.array([1.0 - 2.0 - 5.0]))


def test_sum_clipped_grad_pytree_params_and_data(lib):
  params = {"weights": jnp.array([[1.0], [2.0]]), "bias": jnp.array([0.5])}
  inputs = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  targets = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  grad_fn = lib.clipped_grad(logistic, argnums=0, batch_argnums=(1, 2),
                             l2_clip_norm=1.0, rescale_to_unit_norm=False)
  total = jax.jit(grad_fn)(params, inputs, targets)
  chex.assert_trees_all_equal_structs(total, params)


def test_sum_clipped_grad_prng_key(lib):
  def loss(params, data, key):
    out = params["w"] * data + params["b"]
    return jnp.mean(out + jax.random.normal(key, out.shape))

  params = {"w": 2.5, "b": 1.0}
  grad_fn = lib.clipped_grad(loss, l2_clip_norm=1.0, prng_argnum=2)
  total = grad_fn(params, jnp.array([10.0, 20.0, 30.0]), jax.random.key(0))
  chex.assert_trees_all_equal_structs(total, params)
