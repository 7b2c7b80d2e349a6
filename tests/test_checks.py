"""Tests for check_finite and raise_if_nonfinite."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_state_holds_a_record_of_the_count_alone():
  tx = oc.check_finite(callback=False)
  state = tx.init(GRADS)
  assert state._fields[0] == "stats"
  assert type(state).stats_name == "check_finite"
  _, state = tx.update(FINITE, state)
  assert isinstance(state.stats, oc.ClipStats)
  assert int(state.stats.count) == 1
  assert all(v is None for k, v in state.stats._asdict().items()
             if k != "count")


def test_update_passes_through_and_stats_are_logged():
  opt = optax.chain(oc.check_finite(callback=False),
                    oc.clip_by_global_norm(100.0))
  state = opt.init(GRADS)
  updates, state = jax.jit(opt.update)(FINITE, state)
  np.testing.assert_array_equal(updates["b"]["c"], FINITE["b"]["c"])
  stats = oc.clip_stats(state)
  assert {k for k in stats if k.startswith("check_finite/")} == {
      "check_finite/count", "check_finite/num_nonfinite",
      "check_finite/first_bad_leaf"}
  assert int(stats["check_finite/count"]) == 1
  assert int(stats["check_finite/num_nonfinite"]) == 0
  assert int(stats["check_finite/first_bad_leaf"]) == -1


_SIZES = (3, 1, 4, 2)
_UPDATE = jax.jit(oc.check_finite(callback=False).update)


@settings(max_examples=20, deadline=None)
@given(entries=st.lists(st.sampled_from([0.5, np.nan, np.inf, -np.inf]),
                        min_size=sum(_SIZES), max_size=sum(_SIZES)))
def test_counts_and_first_bad_leaf_match_numpy(entries):
  # Four leaves, each a random mix of finite, NaN and +-Inf entries; one
  # compiled update for every example.
  x = np.asarray(entries, np.float32)
  leaves = np.split(x, np.cumsum(_SIZES)[:-1])
  grads = {f"l{i}": jnp.asarray(v) for i, v in enumerate(leaves)}
  state = oc.check_finite(callback=False).init(grads)
  updates, state = _UPDATE(grads, state)
  bad = [int(np.sum(~np.isfinite(v))) for v in leaves]
  first = next((i for i, b in enumerate(bad) if b), -1)
  assert int(state.num_nonfinite) == sum(bad)
  assert int(state.first_bad_leaf) == first
  np.testing.assert_array_equal(np.concatenate(
      [np.asarray(updates[f"l{i}"]) for i in range(len(_SIZES))]), x)
  if first >= 0:
    with pytest.raises(oc.NonFiniteGradientError,
                       match=rf"{sum(bad)} NaN or Inf .* the first in"
                       rf" \['l{first}'\]"):
      oc.raise_if_nonfinite(state, grads)
  else:
    oc.raise_if_nonfinite(state, grads)


def test_empty_tree():
  tx = oc.check_finite()
  updates, state = tx.update({}, tx.init({}))
  assert updates == {} and int(state.stats.count) == 1


def test_raise_if_nonfinite_without_a_check_finite_state():
  opt = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"oc\.check_finite\(callback=False\)"):
    oc.raise_if_nonfinite(opt.init(FINITE))


def test_raise_if_nonfinite_inside_jit_is_refused():
  tx = oc.check_finite(callback=False)
  with pytest.raises(TypeError, match="cannot run inside jax.jit"):
    jax.jit(oc.raise_if_nonfinite)(tx.init(FINITE))


def test_bad_argument():
  with pytest.raises(TypeError, match="callback"):
    oc.check_finite(callback="no")
