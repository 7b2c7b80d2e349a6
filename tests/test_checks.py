"""Tests for check_finite and raise_if_nonfinite."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

GRADS = {"a": jnp.ones(2), "b": {"c": jnp.array([1.0, jnp.inf, jnp.nan]),
                                 "d": jnp.array([jnp.nan])}}
FINITE = jax.tree.map(jnp.ones_like, GRADS)


def test_eager_update_raises_the_class():
  tx = oc.check_finite()
  with pytest.raises(oc.NonFiniteGradientError,
                     match=r"\['b'\]\['c'\]: 1 NaN and 1 Inf entries at step 1"):
    tx.update(GRADS, tx.init(GRADS))


def test_jit_without_callback_records_and_helper_raises_the_class():
  opt = optax.chain(oc.check_finite(callback=False),
                    oc.clip_by_global_norm(1.0))
  update = jax.jit(opt.update)
  state = opt.init(GRADS)
  _, state = update(FINITE, state)
  oc.raise_if_nonfinite(state, GRADS)  # Finite: nothing raised.
  assert int(state[0].first_bad_leaf) == -1
  _, state = update(GRADS, state)
  assert int(state[0].num_nonfinite) == 3
  assert int(state[0].first_bad_leaf) == 1  # a, b.c, b.d in tree order.
  with pytest.raises(oc.NonFiniteGradientError,
                     match=r"3 NaN or Inf entries in the update at step 2,"
                     r" the first in \['b'\]\['c'\]"):
    oc.raise_if_nonfinite(state, GRADS)
  with pytest.raises(oc.NonFiniteGradientError, match=r"leaf 1 \(in tree"):
    oc.raise_if_nonfinite({"opt": state})


def test_jit_with_callback_raises_a_runtime_error_with_the_message():
  tx = oc.check_finite()
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=r"NonFiniteGradientError.*\['b'\]\['c'\]"):
    jax.block_until_ready(jax.jit(tx.update)(GRADS, tx.init(GRADS)))


def test_update_passes_through_and_stats_are_logged():
  opt = optax.chain(oc.check_finite(callback=False),
                    oc.clip_by_global_norm(100.0))
  state = opt.init(GRADS)
  updates, state = jax.jit(opt.update)(FINITE, state)
  np.testing.assert_array_equal(updates["b"]["c"], FINITE["b"]["c"])
  stats = oc.clip_stats(state)
  assert int(stats["check_finite/count"]) == 1
  assert int(stats["check_finite/num_nonfinite"]) == 0
  assert int(stats["check_finite/first_bad_leaf"]) == -1


def test_empty_tree():
  tx = oc.check_finite()
  updates, state = tx.update({}, tx.init({}))
  assert updates == {} and int(state.count) == 1


def test_bad_argument():
  with pytest.raises(TypeError, match="callback"):
    oc.check_finite(callback="no")
