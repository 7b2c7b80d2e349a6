"""clip_stats over nested optimizer states, and check_finite."""

import typing
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

PARAMS = {"emb": jnp.ones((4, 3)), "w": jnp.ones((3, 2))}
GRADS = jax.tree.map(lambda p: 2 * p, PARAMS)

# The record's fields a global clip keeps: every one but frac_clipped, which
# only per-leaf clippers keep, and leaf_norms, kept on request.
RECORD = {f for f in oc.ClipStats._fields
          if f not in ("frac_clipped", "leaf_norms")}


def step(opt, steps=1):
  state = opt.init(PARAMS)
  for _ in range(steps):
    _, state = jax.jit(opt.update)(GRADS, state, PARAMS)
  return state


def test_keys_are_always_prefixed():
  state = step(optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-3)), 3)
  stats = oc.clip_stats(state)
  assert set(stats) == {f"clip_by_global_norm/{f}" for f in RECORD}
  np.testing.assert_allclose(stats["clip_by_global_norm/norm"],
                             2 * np.sqrt(18), rtol=1e-6)
  assert int(stats["clip_by_global_norm/count"]) == 3
  assert int(stats["clip_by_global_norm/num_clipped"]) == 3


def test_several_clippers_are_numbered_from_the_second():
  opt = optax.chain(oc.clip_by_value(1.5, full_stats=True), oc.clip_by_global_norm(1.0),
                    oc.clip_by_global_norm(0.5), optax.sgd(0.1))
  stats = oc.clip_stats(step(opt))
  assert "clip_by_value/frac_clipped" in stats
  np.testing.assert_allclose(stats["clip_by_value/norm"], 2 * np.sqrt(18),
                             rtol=1e-6)
  # The first global clip sees the value-clipped update; the second sees
  # the first one's output, of norm 1.
  np.testing.assert_allclose(stats["clip_by_global_norm/norm"],
                             1.5 * np.sqrt(18), rtol=1e-6)
  np.testing.assert_allclose(stats["clip_by_global_norm#1/norm"], 1.0,
                             rtol=1e-6)


def _nnx_stats(tx):
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)

  train_step(model, optimizer, jnp.ones((5, 3)))
  return oc.clip_stats(optimizer.opt_state)


WRAPPERS = {
    "chain": lambda c: optax.chain(c(), optax.adam(1e-3)),
    "skip_step": lambda c: oc.skip_step(optax.chain(c(), optax.adam(1e-3))),
    "masked": lambda c: optax.masked(c(), lambda p: jax.tree.map(
        lambda _: True, p)),
    "multi_steps": lambda c: optax.MultiSteps(
        optax.chain(c(), optax.adam(1e-3)), 1).gradient_transformation(),
    "inject_hyperparams": lambda c: optax.inject_hyperparams(
        oc.clip_by_global_norm)(max_norm=1.0),
    "other_clipper": lambda c: optax.chain(oc.clip_by_value(10.0), c(),
                                           optax.adam(1e-3)),
    "other_clipper_after": lambda c: optax.chain(c(), oc.zclip(),
                                                 optax.adam(1e-3)),
}


@pytest.mark.parametrize("wrapper", [*WRAPPERS, "nnx"])
@pytest.mark.slow
def test_keys_do_not_move_when_wrapped(wrapper):
  def clipper():
    return oc.clip_by_global_norm(1.0)

  if wrapper == "nnx":
    stats = _nnx_stats(optax.chain(clipper(), optax.adam(1e-3)))
  else:
    stats = oc.clip_stats(step(WRAPPERS[wrapper](clipper)))
  own = {k for k in stats if k.startswith("clip_by_global_norm/")}
  assert own == {f"clip_by_global_norm/{f}" for f in RECORD}
  assert float(stats["clip_by_global_norm/norm"]) > 1.0
  assert int(stats["clip_by_global_norm/num_clipped"]) == 1


def test_skip_step_and_its_inner_clipper_both_report():
  opt = oc.skip_step(optax.chain(oc.clip_by_global_norm(1.0),
                                 optax.sgd(0.1)))
  stats = oc.clip_stats(step(opt))
  assert "skip_step/inner_state" not in stats
  assert int(stats["skip_step/num_skipped"]) == 0
  assert float(stats["skip_step/scale"]) == 1.0
  assert int(stats["clip_by_global_norm/num_clipped"]) == 1


def test_scalars_view_is_flat_and_keyed_by_leaf_path():
  opt = optax.chain(oc.clip_by_global_norm(1.0, leaf_norms=True),
                    oc.zclip(), optax.sgd(0.1))
  stats = oc.clip_stats(step(opt), scalars=True)
  assert all(np.ndim(v) == 0 for v in stats.values())
  assert "zclip/warmup_norms" not in stats  # A buffer, not a scalar.
  assert "zclip/norm" in stats and "zclip/z" in stats
  for name, leaf in PARAMS.items():
    np.testing.assert_allclose(
        stats[f"clip_by_global_norm/leaf_norms/{name}"],
        np.linalg.norm(2 * np.asarray(leaf)), rtol=1e-6)
  full = oc.clip_stats(step(opt))
  assert full["zclip/warmup_norms"].ndim == 1


def test_no_clipper_is_an_error():
  with pytest.raises(ValueError, match="no optaxclip transform"):
    oc.clip_stats(step(optax.adam(1e-3)))


def test_check_finite_names_the_leaf():
  opt = optax.chain(oc.check_finite(), oc.clip_by_global_norm(1.0))
  grads = {"a": jnp.ones(2), "b": {"c": jnp.array([1.0, jnp.inf, jnp.nan])}}
  state = opt.init(grads)
  with pytest.raises(Exception, match=r"\['b'\]\['c'\]: 1 NaN and 1 Inf"):
    jax.block_until_ready(jax.jit(opt.update)(grads, state))
  updates, state = jax.jit(opt.update)(GRADS, opt.init(GRADS))
  assert np.isfinite(oc.global_norm(updates))
  assert int(state[0].stats.count) == 1


def test_check_finite_without_jit_raises_python_error():
  tx = oc.check_finite()
  grads = {"w": jnp.array([jnp.nan])}
  with pytest.raises(Exception, match=r"non-finite gradient at \['w'\]"):
    jax.block_until_ready(tx.update(grads, tx.init(grads)))


def test_records_are_found_by_type_in_a_state_of_ones_own():
  """A state class of one's own that holds a ClipStats is reported, under
  its ``stats_name`` or its class name in snake case."""

  class MyClipState(NamedTuple):
    stats: oc.ClipStats
    ema: jax.Array

  class Named(NamedTuple):
    stats: oc.ClipStats
    stats_name = "custom"

  record = oc.ClipStats(count=jnp.asarray(3), norm=jnp.asarray(2.0))
  stats = oc.clip_stats((MyClipState(record, jnp.asarray(0.5)),
                         {"x": Named(record)}))
  assert set(stats) == {"my_clip/count", "my_clip/norm", "my_clip/ema",
                        "custom/count", "custom/norm"}
  assert float(stats["my_clip/ema"]) == 0.5


def test_every_state_holds_one_record_first():
  states = [getattr(oc, n) for n in oc.__all__ if n.endswith("State")]
  assert len(states) >= 10
  for state in states:
    assert state._fields[0] == "stats", state.__name__
    assert typing.get_type_hints(state)["stats"] is oc.ClipStats, (
        state.__name__)
    assert isinstance(state.stats_name, str), state.__name__


def test_advance_counts_and_keeps_the_structure():
  from optaxclip import _stats
  fresh = _stats.fresh(jnp.float32, frac=True)
  one = _stats.advance(fresh, clipped=jnp.asarray(True), num=3, of=4,
                       norm=jnp.asarray(2.0))
  two = _stats.advance(one, clipped=jnp.asarray(False), num=0, of=4)
  assert jax.tree.structure(two) == jax.tree.structure(fresh)
  assert (int(two.count), int(two.num_clipped)) == (2, 1)
  assert float(one.frac_clipped) == 0.75 and float(two.frac_clipped) == 0.0
  assert float(two.norm) == 2.0  # Not given: kept.
  with pytest.raises(ValueError, match="leaf_norms"):
    _stats.advance(fresh, leaf_norms={"a": jnp.zeros(())})


def test_register_state_is_gone():
  assert not hasattr(oc, "register_state")
